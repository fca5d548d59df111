//! What a `/metrics` scrape costs the agent: rendering a realistic round (a GPU server's
//! ~190 samples) in both formats, and serving it over loopback keep-alive connections with the
//! rendering cached (later scrapes of a round) or fresh (the first scrape of each round). CPU
//! time is the server thread's alone (its own runtime; the client runs on another thread),
//! read from /proc/self/task/TID/schedstat. Prints numbers; asserts nothing about speed.
//!
//! `cargo bench -p dcmon-agent --bench scrape`
#![allow(clippy::print_stdout, reason = "a benchmark prints its numbers")]

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use dcmon_agent::batch::{Batch, Sample};
use dcmon_agent::output::exposition::{self, Format};
use dcmon_agent::output::metrics_endpoint::{LatestRound, Limits, MetricsEndpoint};

const RENDERS: u32 = 2000;
const SCRAPES: u32 = 2000;
const REPEATS: usize = 3;

/// A GPU server's round: OS, 4 disks, 4 NICs, 8 GPUs, 20 IPMI sensors, 2 NVMe drives, the
/// agent's self-metrics.
fn realistic_batch() -> Batch {
    let mut b = Batch::new("4c4c4544-0051-3610-8052-b4c04f4d4e32", 1_700_000_000);
    for (n, v) in [("cpu_load_1m", 3.41), ("cpu_load_5m", 2.97), ("cpu_load_15m", 2.5), ("cpu_usage_percent", 37.25)] {
        b.push(Sample::gauge(n, v));
    }
    b.push(Sample::count("memory_total_bytes", 1_081_774_161_920));
    b.push(Sample::count("memory_available_bytes", 901_774_161_920));
    b.push(Sample::count("memory_used_bytes", 180_000_000_000));
    b.push(Sample::gauge("memory_usage_percent", 16.639_381_408_691_406));
    for d in ["nvme0n1", "nvme1n1", "sda", "sdb"] {
        for n in ["disk_reads_total", "disk_read_bytes_total", "disk_writes_total", "disk_write_bytes_total"] {
            b.push(Sample::count(n, 123_456_789_012).label("device", d));
        }
    }
    for i in ["eno1", "eno2", "ib0", "ib1"] {
        b.push(Sample::count("network_receive_bytes_total", 98_765_432_109_876).label("interface", i));
        b.push(Sample::count("network_transmit_bytes_total", 12_345_678_901_234).label("interface", i));
    }
    for g in 0..8 {
        for (n, v) in [
            ("gpu_temperature", 61.0),
            ("gpu_power_draw_watts", 312.47),
            ("gpu_utilization_percent", 97.0),
            ("gpu_memory_utilization_percent", 43.0),
            ("gpu_memory_used_bytes", 68_719_476_736.0),
            ("gpu_memory_total_bytes", 85_899_345_920.0),
            ("gpu_memory_usage_percent", 80.0),
            ("gpu_fan_speed_percent", 0.0),
            ("gpu_clock_sm_mhz", 1980.0),
            ("gpu_pcie_gen", 5.0),
            ("gpu_pcie_width", 16.0),
            ("gpu_pstate", 0.0),
        ] {
            b.push(
                Sample::gauge(n, v)
                    .label("gpu", g.to_string())
                    .label("model", "NVIDIA H100 80GB HBM3")
                    .label("bus_id", format!("00000000:{:02X}:00.0", 0x18 + g * 0x10))
                    .label("uuid", format!("GPU-6f2c1e7a-3b4d-5e6f-7a8b-9c0d1e2f3a{g:02}")),
            );
        }
    }
    for s in 0..20 {
        b.push(
            Sample::gauge("ipmi_temperature_celsius", 40.0 + f64::from(s))
                .label("sensor", format!("Temp {s}"))
                .label("id", s.to_string()),
        );
    }
    for d in ["nvme0", "nvme1"] {
        for n in ["nvme_temperature_celsius", "nvme_available_spare_ratio", "nvme_percentage_used_ratio"] {
            b.push(Sample::gauge(n, 0.03).label("device", d).label("model", "SAMSUNG MZQL23T8HCLS-00A07"));
        }
        for n in [
            "nvme_critical_warning_total",
            "nvme_power_on_hours_total",
            "nvme_media_errors_total",
            "nvme_unsafe_shutdowns_total",
            "nvme_data_units_read_total",
            "nvme_data_units_written_total",
        ] {
            b.push(Sample::count(n, 4_242).label("device", d).label("model", "SAMSUNG MZQL23T8HCLS-00A07"));
        }
    }
    for c in ["os", "disk", "net", "apt", "nvme", "ipmi", "nvsmi", "ebpf"] {
        b.push(Sample::gauge("dcmon_collector_duration_seconds", 0.000_123_4).label("collector", c));
        b.push(Sample::count("dcmon_collector_success", 1).label("collector", c));
    }
    b.push(Sample::count("dcmon_nonfinite_values_dropped_total", 0));
    b.push(Sample::count("dcmon_outbox_batches", 0));
    b.push(Sample::count("dcmon_outbox_bytes", 0));
    b.push(Sample::count("dcmon_outbox_dropped_batches_total", 0));
    b.push(Sample::count("dcmon_outbox_corrupt_batches_total", 0));
    b.push(Sample::count("dcmon_outbox_rejected_batches_total", 0));
    b
}

/// Nanoseconds `tid` (a thread of this process) has run.
fn thread_ns(tid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).unwrap_or_default();
    stat.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// The server on its own thread and runtime: its address and thread id.
fn start_server(latest: LatestRound) -> (SocketAddr, i32) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let ep = MetricsEndpoint::bind(([127, 0, 0, 1], 0).into(), latest, Limits::default()).expect("bind");
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            tx.send((ep.local_addr(), tid)).expect("send");
            std::future::pending::<()>().await;
        });
    });
    rx.recv().expect("server started")
}

/// One keep-alive GET /metrics; the body length.
fn scrape(s: &mut TcpStream, buf: &mut Vec<u8>) -> usize {
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain;version=0.0.4\r\n\r\n").expect("write");
    buf.clear();
    let mut chunk = [0_u8; 65_536];
    loop {
        let n = s.read(&mut chunk).expect("read");
        assert!(n > 0, "closed");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("content-length");
            if buf.len() >= end + 4 + len {
                return len;
            }
        }
    }
}

fn main() {
    let batch = realistic_batch();
    let samples = batch.samples().len();
    for format in [Format::Prometheus, Format::OpenMetrics] {
        let len = exposition::render(&batch, format).len();
        let mut per = Vec::new();
        for _ in 0..REPEATS {
            let (cpu, wall) = (common::thread_cpu(), Instant::now());
            for _ in 0..RENDERS {
                std::hint::black_box(exposition::render(std::hint::black_box(&batch), format));
            }
            per.push(((common::thread_cpu() - cpu) / RENDERS, wall.elapsed() / RENDERS));
        }
        println!("render {format:?}: {samples} samples, {len} bytes: CPU per render {per:.1?} (cpu, wall)");
    }
    // Also what the JSON batch costs, for scale.
    let (cpu, _) = (common::thread_cpu(), ());
    for _ in 0..RENDERS {
        std::hint::black_box(batch.to_json());
    }
    println!("to_json for scale: {:.1?} per batch", (common::thread_cpu() - cpu) / RENDERS);

    let latest = LatestRound::new();
    latest.publish(batch.clone());
    let (addr, tid) = start_server(latest.clone());
    let mut conn = TcpStream::connect(addr).expect("connect");
    conn.set_nodelay(true).expect("nodelay");
    let mut buf = Vec::with_capacity(65_536);
    scrape(&mut conn, &mut buf);
    for _ in 0..REPEATS {
        // Later scrapes of one round: served from the cached rendering.
        let before = thread_ns(tid);
        for _ in 0..SCRAPES {
            scrape(&mut conn, &mut buf);
        }
        let cached = Duration::from_nanos((thread_ns(tid) - before) / u64::from(SCRAPES));
        // The first scrape of each round: rendered, then served. (The copy and publish run on
        // this client thread, not counted.)
        let mut total = 0;
        for _ in 0..SCRAPES {
            latest.publish(batch.clone());
            let before = thread_ns(tid);
            scrape(&mut conn, &mut buf);
            total += thread_ns(tid) - before;
        }
        let fresh = Duration::from_nanos(total / u64::from(SCRAPES));
        // A connection per scrape, as when the connection idled past the header timeout.
        let before = thread_ns(tid);
        for _ in 0..SCRAPES {
            let mut c = TcpStream::connect(addr).expect("connect");
            scrape(&mut c, &mut buf);
        }
        let fresh_conn = Duration::from_nanos((thread_ns(tid) - before) / u64::from(SCRAPES));
        println!(
            "server thread CPU per scrape (loopback): keep-alive cached {cached:.1?}, keep-alive first of a round \
             {fresh:.1?}, new connection cached {fresh_conn:.1?}"
        );
    }
}
