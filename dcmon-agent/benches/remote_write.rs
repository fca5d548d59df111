//! What remote_write costs per batch: the CPU time to turn one stored JSON batch into snappy
//! protobuf requests (parse, labels, sort, stale-marker state, encode, compress), and the bytes
//! on the wire against the JSON body the dcmon server gets. Two host sizes: a CPU-only server
//! (~75 samples) and an 8-GPU host (~300). Each round encodes the batch with the previous
//! round's state, as the client does, so the stale-marker lookups are paid. Prints numbers;
//! asserts nothing about speed.
//!
//! `cargo bench -p dcmon-agent --bench remote_write`
#![allow(clippy::print_stdout, reason = "a benchmark prints its numbers")]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use dcmon_agent::batch::{Batch, Sample};
use dcmon_agent::output::remote_write::{StaleState, encode};

const ROUNDS: usize = 2000;
const REPEATS: usize = 5;

/// A host's batch: CPU and memory gauges, per-disk and per-interface counters, and `gpus`
/// GPUs with a dozen readings each. `timestamp` in seconds.
fn host_batch(timestamp: i64, disks: u64, interfaces: u64, gpus: u64) -> Vec<u8> {
    let mut batch = Batch::new("3f2c9a7e-5b1d-4c8e-9a0f-1e2d3c4b5a69", timestamp);
    for name in ["cpu_usage_percent", "cpu_load_1m", "cpu_load_5m", "cpu_load_15m", "memory_used_percent"] {
        batch.push(Sample::gauge(name, 12.345));
    }
    for name in ["memory_total_bytes", "memory_available_bytes", "memory_used_bytes", "swap_used_bytes"] {
        batch.push(Sample::count(name, 270_582_939_648));
    }
    for d in 0..disks {
        for name in [
            "disk_read_bytes_total",
            "disk_write_bytes_total",
            "disk_reads_total",
            "disk_writes_total",
            "disk_used_bytes",
            "disk_total_bytes",
        ] {
            batch.push(Sample::count(name, 1_234_567_890_123 + d).label("device", format!("nvme{d}n1")));
        }
        batch.push(Sample::gauge("nvme_temperature_celsius", 41.0).label("device", format!("nvme{d}n1")));
    }
    for i in 0..interfaces {
        for name in ["network_receive_bytes_total", "network_transmit_bytes_total", "network_receive_errors_total"] {
            batch
                .push(Sample::count(name, 98_765_432_100 + i).label("interface", format!("enp{}s0f{}", 65 + i, i % 2)));
        }
    }
    for g in 0..gpus {
        for name in [
            "gpu_temperature_celsius",
            "gpu_power_watts",
            "gpu_utilization_percent",
            "gpu_memory_used_bytes",
            "gpu_memory_total_bytes",
            "gpu_sm_clock_mhz",
            "gpu_mem_clock_mhz",
            "gpu_fan_speed_percent",
            "gpu_pcie_rx_bytes",
            "gpu_pcie_tx_bytes",
            "gpu_ecc_errors_total",
            "gpu_xid_errors_total",
            "gpu_nvlink_rx_bytes_total",
            "gpu_nvlink_tx_bytes_total",
            "gpu_throttle_reasons",
            "gpu_energy_joules_total",
            "gpu_power_limit_watts",
            "gpu_encoder_utilization_percent",
            "gpu_decoder_utilization_percent",
            "gpu_retired_pages",
            "gpu_remapped_rows",
            "gpu_performance_state",
            "gpu_memory_utilization_percent",
            "gpu_graphics_clock_mhz",
            "gpu_video_clock_mhz",
            "gpu_pcie_replay_total",
            "gpu_nvlink_crc_errors_total",
            "gpu_violation_power_seconds_total",
        ] {
            batch.push(
                Sample::gauge(name, 71.5 + g as f64).label("gpu", g.to_string()).label("name", "NVIDIA H100 80GB HBM3"),
            );
        }
    }
    batch.to_json()
}

fn main() {
    let external: BTreeMap<String, String> =
        [("cluster".to_owned(), "gpu-a".to_owned()), ("datacenter".to_owned(), "fra1".to_owned())].into();
    println!(
        "encode, per batch (median of {ROUNDS} rounds, {REPEATS} repeats), external labels cluster and datacenter:"
    );
    println!(
        "{:<10} {:>7} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8}",
        "host", "samples", "JSON B", "proto B", "snappy B", "snappy%", "CPU µs", "wall µs"
    );
    for (host, disks, interfaces, gpus) in [("cpu-only", 6_u64, 8_u64, 0_u64), ("8-gpu", 8, 8, 8)] {
        let bodies =
            [host_batch(1_795_540_732, disks, interfaces, gpus), host_batch(1_795_540_762, disks, interfaces, gpus)];
        let mut state = StaleState::new();
        let first = encode(&bodies[0], &external, &state, 1 << 20).expect("encode");
        let (samples, proto, snappy): (usize, usize, usize) =
            (first.samples, first.uncompressed_bytes.iter().sum(), first.requests.iter().map(|r| r.len()).sum());
        state.advance(first);
        for _ in 0..REPEATS {
            let (mut cpu, mut wall) = (Vec::with_capacity(ROUNDS), Vec::with_capacity(ROUNDS));
            for i in 0..ROUNDS {
                let (c, w) = (common::thread_cpu(), Instant::now());
                let encoded = encode(&bodies[(i + 1) % 2], &external, &state, 1 << 20).expect("encode");
                state.advance(std::hint::black_box(encoded));
                cpu.push(common::thread_cpu() - c);
                wall.push(w.elapsed());
            }
            let median = |v: &mut Vec<Duration>| {
                v.sort_unstable();
                v[v.len() / 2].as_secs_f64() * 1e6
            };
            println!(
                "{host:<10} {samples:>7} {:>9} {proto:>9} {snappy:>9} {:>7.1}% {:>8.1} {:>8.1}",
                bodies[0].len(),
                snappy as f64 * 100.0 / bodies[0].len() as f64,
                median(&mut cpu),
                median(&mut wall)
            );
        }
    }
}
