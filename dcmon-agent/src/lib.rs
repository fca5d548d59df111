//! dcmon-agent: a host monitoring agent for GPU datacenters.
//!
//! The flow: [`collector`]s (one per data source) produce [`batch::Sample`]s, the
//! [`agent`] scheduler runs them concurrently on a fixed cadence and builds a [`batch::Batch`],
//! the [`outbox`] stores it durably, and [`deliver`] sends it with [`upload`] to the dcmon server.

pub mod agent;
pub mod api_key;
pub mod batch;
pub mod check;
pub mod collector;
pub mod commands;
pub mod config;
pub mod deliver;
pub mod ebpf;
pub mod exec;
pub mod filter;
pub mod footprint;
pub mod host;
pub mod install;
pub mod jobs;
pub mod netlink;
pub mod notify;
pub mod outbox;
pub mod output;
pub mod register;
pub mod secure_file;
#[cfg(test)]
pub(crate) mod test_log;
pub mod ticker;
pub mod upload;
