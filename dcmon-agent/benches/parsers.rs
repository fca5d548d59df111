//! The hot pure functions of one collection cycle: each /proc parser on this host's real file
//! contents (read once, before timing) and on the GPU-server fixture, and batch serialization.
//!
//! `cargo bench -p dcmon-agent --bench parsers`

use criterion::{Criterion, criterion_group, criterion_main};
use dcmon_agent::batch::{Batch, DISK_IO_LATENCY, HistogramLabels, Sample, le_values};
use dcmon_agent::collector::disk::{WholeDisks, parse_block_stat, parse_diskstats};
use dcmon_agent::collector::net::parse_net_dev;
use dcmon_agent::collector::os::{parse_cpu_ticks, parse_loadavg, parse_meminfo};
use dcmon_agent::config::DeviceFilter;

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn fixture(rel: &str) -> String {
    read(&format!("{}/../tests/fixtures/hosts/gpu-server/{rel}", env!("CARGO_MANIFEST_DIR")))
}

fn parsers(c: &mut Criterion) {
    let (stat, loadavg, meminfo) = (read("/proc/stat"), read("/proc/loadavg"), read("/proc/meminfo"));
    let (diskstats, net_dev) = (fixture("proc/diskstats"), fixture("proc/net/dev"));
    let block_stat = fixture("sys/block/nvme0n1/stat");
    let disks = DeviceFilter::default_disks();
    let ifaces = DeviceFilter::default_interfaces();
    c.bench_function("parse_cpu_ticks /proc/stat", |b| b.iter(|| parse_cpu_ticks(std::hint::black_box(&stat))));
    c.bench_function("parse_loadavg /proc/loadavg", |b| b.iter(|| parse_loadavg(std::hint::black_box(&loadavg))));
    c.bench_function("parse_meminfo /proc/meminfo", |b| b.iter(|| parse_meminfo(std::hint::black_box(&meminfo))));
    c.bench_function("parse_diskstats gpu-server (13 devices)", |b| {
        b.iter(|| parse_diskstats(std::hint::black_box(&diskstats), &WholeDisks::ByName, &disks))
    });
    c.bench_function("parse_block_stat gpu-server nvme0n1 (17 fields)", |b| {
        b.iter(|| parse_block_stat("nvme0n1", std::hint::black_box(&block_stat)))
    });
    c.bench_function("parse_net_dev gpu-server (13 interfaces)", |b| {
        b.iter(|| parse_net_dev(std::hint::black_box(&net_dev), &ifaces))
    });
}

fn serialization(c: &mut Criterion) {
    // A batch shaped like a GPU server's: OS metrics, 8 disks, 8 interfaces, 8 GPUs x 14.
    let mut batch = Batch::new("6b1c0e2f9a8d4e7c8f1a2b3c4d5e6f70", 1_795_540_732);
    for name in ["cpu_load_1m", "cpu_load_5m", "cpu_load_15m", "cpu_usage_percent", "memory_usage_percent"] {
        batch.push(Sample::gauge(name, 12.48));
    }
    for d in 0..8 {
        for name in ["disk_reads_total", "disk_read_bytes_total", "disk_writes_total", "disk_write_bytes_total"] {
            batch.push(Sample::count(name, 91_233_400_112 * 512).label("device", format!("nvme{d}n1")));
        }
    }
    for i in 0..8 {
        for name in ["network_receive_bytes_total", "network_transmit_bytes_total"] {
            batch.push(Sample::count(name, 912_003_400_121).label("interface", format!("eno{i}")));
        }
    }
    for g in 0..8 {
        for _ in 0..14 {
            batch.push(
                Sample::gauge("gpu_temperature", 61.0)
                    .label("gpu", g.to_string())
                    .label("model", "NVIDIA H100 80GB HBM3")
                    .label("bus_id", format!("00000000:{:02X}:00.0", 0x18 + g))
                    .label("uuid", "GPU-6b1c0e2f-9a8d-4e7c-8f1a-2b3c4d5e6f70"),
            );
        }
    }
    let n = batch.samples().len();
    c.bench_function(&format!("Batch::to_json ({n} metrics)"), |b| b.iter(|| std::hint::black_box(&batch).to_json()));

    // The eBPF mode's round on a host with 4 disks: each disk's read, write and flush latency
    // histograms (26 buckets, sum, count), their labels made once and shared as the collector
    // shares them, beside the counters.
    let le = le_values((0..25).map(|k| f64::from(1u32 << k) * 1.024e-6));
    let mut hist_batch = Batch::new("6b1c0e2f9a8d4e7c8f1a2b3c4d5e6f70", 1_795_540_732);
    let mut samples = Vec::new();
    for d in 0..4 {
        for op in ["read", "write", "flush"] {
            let labels = HistogramLabels::new(&[("device", format!("nvme{d}n1").into()), ("op", op.into())], &le);
            let counts: Vec<u64> = (0..25).map(|k| if (8..18).contains(&k) { 91_233 * k } else { 0 }).collect();
            DISK_IO_LATENCY.samples(&labels, &counts, 3, 1_234.567_891, &mut samples);
        }
        for name in ["disk_reads_total", "disk_read_bytes_total", "disk_writes_total", "disk_write_bytes_total"] {
            samples.push(Sample::count(name, 91_233_400_112 * 512).label("device", format!("nvme{d}n1")));
        }
    }
    hist_batch.extend(samples);
    let n = hist_batch.samples().len();
    c.bench_function(&format!("Batch::to_json eBPF round, 12 latency histograms ({n} metrics)"), |b| {
        b.iter(|| std::hint::black_box(&hist_batch).to_json())
    });
}

criterion_group!(benches, parsers, serialization);
criterion_main!(benches);
