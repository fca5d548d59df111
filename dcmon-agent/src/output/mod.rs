//! Where batches go besides the outbox: each output delivers the outbox's batches with its own
//! cursor, so one slow or dead output never delays another.
//!
//! - the dcmon server (JSON, [`crate::upload`]), the default output, named [`DCMON_OUTPUT`];
//! - Prometheus remote_write receivers ([`remote_write`]), each named by its config;
//! - the latest round served at `/metrics` for scrapers (pull; no cursor): [`metrics_endpoint`]
//!   serves it, [`exposition`] renders it.

pub mod exposition;
pub mod metrics_endpoint;
pub mod remote_write;

/// The `output` label and cursor name of the dcmon server output. No remote_write output may
/// take this name.
pub const DCMON_OUTPUT: &str = "dcmon";
