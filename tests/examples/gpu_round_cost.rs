//! What one NVIDIA collector round costs per GPU on the fake libnvidia-ml.so (the calls
//! themselves cost next to nothing there: this is the collector's own work, the handoff to
//! each GPU's thread and back, and nvml-wrapper's): wall time of `collect` over many rounds.
//!
//! `cargo run --release -p dcmon-tests --example gpu_round_cost [ROUNDS]` (README, Performance).

use std::time::{Duration, Instant};

use dcmon_agent::collector::Collector as _;
use dcmon_agent::collector::nvsmi::{NvsmiCollector, NvsmiConfig};
use dcmon_agent::host::Host;

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    for gpus in ["2", "3"] {
        // SAFETY: single-threaded here; the fake library reads it at nvmlInit.
        unsafe { std::env::set_var("FAKE_NVML_GPUS", gpus) };
        let config = NvsmiConfig { nvml_library: Some(env!("DCMON_FAKE_NVML_SO").into()), ..NvsmiConfig::default() };
        let mut collector = NvsmiCollector::new(Host::new(dcmon_tests::fixture_host("gpu-server")), &config);
        let mut out = Vec::new();
        let mut times: Vec<Duration> = Vec::with_capacity(rounds);
        let cpu_before = cpu_time();
        for _ in 0..rounds {
            out.clear();
            let t = Instant::now();
            collector.collect(&mut out).expect("collect");
            times.push(t.elapsed());
        }
        let cpu = cpu_time() - cpu_before;
        times.sort_unstable();
        let n: u32 = gpus.parse().expect("count");
        let median = times[rounds / 2];
        let p90 = times[rounds * 9 / 10];
        eprintln!(
            "{gpus} GPUs, {rounds} rounds, {} samples a round: median {median:?} a round ({:?} a GPU), p90 {p90:?}, \
             process CPU {:?} a round",
            out.len(),
            median / n,
            cpu / u32::try_from(rounds).expect("rounds"),
        );
        drop(collector);
    }
}

/// This process's user + system CPU time.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let after_comm = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after_comm.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the state.
    let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).expect("CLK_TCK");
    Duration::from_micros(ticks * 1_000_000 / hz)
}
