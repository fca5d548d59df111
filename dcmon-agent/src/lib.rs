//! dcmon-agent: a host monitoring agent for GPU datacenters.
//!
//! The flow: [`collector`]s (one per data source) produce [`batch::Sample`]s, the
//! [`agent`] scheduler runs them concurrently on a fixed cadence and builds a [`batch::Batch`],
//! and [`upload`] posts it to the dcmon server.

pub mod agent;
pub mod api_key;
pub mod batch;
pub mod collector;
pub mod config;
pub mod ebpf;
pub mod filter;
pub mod host;
pub mod upload;
