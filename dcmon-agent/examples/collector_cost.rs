//! CPU time of each OS collector per cycle, the way the agent runs them: one round a second
//! (so caches are as cold as in the agent), timed with the process's CPU clock, which counts the
//! kernel's work for the collector's system calls too, and the filesystems collector's statfs
//! worker thread (the collectors run one after the other here, so nothing else is running).
//! `cargo run --release -p dcmon-agent --example collector_cost [CYCLES] [--ebpf] [--all-disks]`
//!
//! `--ebpf` loads the BPF programs (root) and times the eBPF disk and network collectors;
//! `--all-disks` reports every whole disk (loop, zram, ... too). Prints the median and the
//! 10th-90th percentiles per collector and for all of them together. No upload, no outbox:
//! `cargo xtask bench` measures the whole agent.
#![allow(clippy::print_stdout, reason = "a benchmark prints its numbers")]

use std::time::Duration;

use dcmon_agent::collector;
use dcmon_agent::config::{Config, DeviceFilter, EbpfMode, Exporters};
use dcmon_agent::filter::PatternList;

/// CPU time this process has used, in microseconds.
fn thread_cpu_us() -> f64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime: {}", std::io::Error::last_os_error());
    t.tv_sec as f64 * 1e6 + t.tv_nsec as f64 / 1e3
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |p: usize| v[(v.len() - 1) * p / 100];
    (at(50), at(10), at(90))
}

fn main() -> anyhow::Result<()> {
    let (mut cycles, mut ebpf, mut all_disks) = (30, false, false);
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--ebpf" => ebpf = true,
            "--all-disks" => all_disks = true,
            n => {
                cycles =
                    n.parse::<usize>().map_err(|_| anyhow::anyhow!("usage: [CYCLES] [--ebpf] [--all-disks]"))?.max(1)
            }
        }
    }
    let exporters = Exporters::none();
    let mut config = Config { exporters, ebpf: if ebpf { EbpfMode::On } else { EbpfMode::Off }, ..Config::default() };
    if all_disks {
        config.disks = DeviceFilter { include: PatternList::match_all(), exclude: PatternList::default() };
    }
    let mut collectors = collector::build(&config)?;
    let mut samples = Vec::new();
    // The first round opens the files and sizes the buffers, as the agent's first round does.
    for c in &mut collectors {
        c.collect(&mut samples).map_err(|e| anyhow::anyhow!("{}: {e}", c.name()))?;
    }
    let mut times = vec![Vec::with_capacity(cycles); collectors.len() + 1];
    for _ in 0..cycles {
        std::thread::sleep(Duration::from_secs(1));
        samples.clear();
        let start = thread_cpu_us();
        for (i, c) in collectors.iter_mut().enumerate() {
            let t = thread_cpu_us();
            c.collect(&mut samples).map_err(|e| anyhow::anyhow!("{}: {e}", c.name()))?;
            times[i].push(thread_cpu_us() - t);
        }
        times[collectors.len()].push(thread_cpu_us() - start);
    }
    println!("CPU µs per cycle over {cycles} cycles, 1 s apart: median [p10-p90]");
    let names = collectors.iter().map(|c| c.name()).chain(std::iter::once("all"));
    for (name, t) in names.zip(times) {
        let (m, lo, hi) = percentiles(t);
        println!("{name:>11}: {m:7.1} [{lo:.1}-{hi:.1}]");
    }
    println!("{} samples a cycle", samples.len());
    Ok(())
}
