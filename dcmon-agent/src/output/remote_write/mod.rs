//! Prometheus Remote-Write 1.0 outputs (`remote_write` in the config).

mod config;

pub use self::config::{BasicAuth, RemoteWriteConfig};
