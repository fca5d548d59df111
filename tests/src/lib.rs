//! The test support shared by every test of the workspace (the dcmon-tests end-to-end tests,
//! dcmon-agent's integration tests) and by xtask: where the agent binary and the fixture hosts
//! are, a builder for the agent's config file, loop devices, a booted Debian container (`container`), the root check every root-gated
//! test calls, real time-series databases (`tsdb`: Prometheus and VictoriaMetrics processes and
//! their query APIs), and (feature `receiver`, on by default) a stand-in for the dcmon server
//! and a Prometheus remote-write receiver.
//!
//! This crate does not depend on dcmon-agent (only its tests do), so dcmon-agent can take it
//! as a dev-dependency without a cycle.

use std::time::{Duration, Instant};

pub mod agent;
pub mod batch;
pub mod container;
pub mod fixtures;
pub mod gpu_check;
pub mod loop_device;
pub mod privilege;
#[cfg(feature = "receiver")]
mod receiver;
#[cfg(feature = "receiver")]
pub mod remote_write;
pub mod tsdb;

pub use agent::{AgentConfig, AgentProcess, agent_bin, write_key};
pub use fixtures::{fixture_host, fixture_hosts, fixtures_dir, workspace_root};
pub use loop_device::LoopDevice;
pub use privilege::{ebpf_required, is_root, packaging_required, require_root};
#[cfg(feature = "receiver")]
pub use receiver::{Accepted, Receiver, Rejected, validate_batch};
#[cfg(feature = "receiver")]
pub use remote_write::{RemoteWriteReceiver, WriteAnswer, WriteRequestSeen};
pub use tsdb::{Prometheus, ScrapeJob, Series, VictoriaMetrics};

/// Poll `check` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
