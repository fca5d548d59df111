//! Prometheus Remote-Write 1.0 outputs (`remote_write` in the config).
//!
//! - [`config`](RemoteWriteConfig): one entry of the config;
//! - [`proto`]: the protobuf messages;
//! - [`encode()`]: a stored JSON batch to snappy-compressed requests, with stale markers;
//! - [`RemoteWriteClient`]: posts them and classifies the answers for the delivery loop;
//! - `credentials`: the bearer token or basic-auth password, read from their files.

mod client;
mod config;
mod credentials;
mod encode;
pub mod proto;

pub use self::client::{
    REMOTE_WRITE_VERSION, RemoteWriteClient, RemoteWriteError, RemoteWriteSent, RemoteWriteSetupError,
};
pub use self::config::{BasicAuth, RemoteWriteConfig};
pub use self::credentials::{Credentials, MAX_SECRET_FILE_BYTES, Secret};
pub use self::encode::{EncodeError, Encoded, STALE_NAN_BITS, StaleState, encode};
