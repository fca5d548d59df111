//! Passive check on a live host: attach, wait, and print eBPF vs /proc/diskstats and
//! /proc/net/dev for every disk and interface (no traffic generated). Run as root:
//! `cargo run --release -p dcmon-agent --example ebpf_observe -- SECONDS`
#![allow(clippy::print_stdout, reason = "prints its comparison")]

use std::sync::Arc;
use std::time::Duration;

use dcmon_agent::collector::disk::ebpf::EbpfDiskCollector;
use dcmon_agent::collector::disk::{WholeDisks, parse_diskstats};
use dcmon_agent::collector::net::ebpf::{EbpfNetCollector, own_netns};
use dcmon_agent::collector::net::parse_net_dev;
use dcmon_agent::config::DeviceFilter;
use dcmon_agent::ebpf::Probes;
use dcmon_agent::filter::PatternList;
use dcmon_agent::host::Host;

fn main() -> anyhow::Result<()> {
    let secs: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(60);
    let all = DeviceFilter { include: PatternList::match_all(), exclude: PatternList::default() };
    let probes = Arc::new(Probes::attach(Some(own_netns(&Host::default())?))?);
    let mut disk = EbpfDiskCollector::new(Host::default(), all.clone(), probes.clone())?;
    let mut net = EbpfNetCollector::new(Host::default(), all.clone(), probes.clone())?;
    // Every completion the kernel accounted for vda: reads, writes, discards, flushes.
    let vda_ios = || -> u64 {
        std::fs::read_to_string("/proc/diskstats")
            .unwrap_or_default()
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.get(2) == Some(&"vda"))
            .map(|f| [3, 7, 14, 18].iter().filter_map(|&i| f.get(i)?.parse::<u64>().ok()).sum())
            .unwrap_or(0)
    };
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let runs0 = probes.program_stats()?[0].run_count;
    let ios0 = vda_ios();
    let p_start = parse_diskstats(&std::fs::read_to_string("/proc/diskstats")?, &WholeDisks::ByName, &all)?;
    std::thread::sleep(Duration::from_secs(secs));
    // /proc read right before and right after the map: on a busy disk, I/O completing between
    // the two reads shows up as a difference that is not an error, so print both.
    let read_proc = || -> anyhow::Result<_> {
        parse_diskstats(&std::fs::read_to_string("/proc/diskstats")?, &WholeDisks::ByName, &all)
    };
    let p_before = read_proc()?;
    let e_disk = disk.read_all()?;
    let p_disk = read_proc()?;
    let e_net = net.read_all()?;
    let p_net = parse_net_dev(&std::fs::read_to_string("/proc/net/dev")?, &all)?;
    for b in &p_before {
        if let Some(a) = p_disk.iter().find(|a| a.device == b.device)
            && a != b
        {
            println!(
                "{}: /proc moved while reading: reads {:+} writes {:+}",
                b.device,
                a.reads - b.reads,
                a.writes - b.writes
            );
        }
    }
    for e in &e_disk {
        if let Some(p) = p_disk.iter().find(|p| p.device == e.device) {
            if let Some(s) = p_start.iter().find(|s| s.device == e.device)
                && s != p
            {
                println!(
                    "{}: /proc moved by reads {} read_bytes {} writes {} write_bytes {} in {secs} s",
                    e.device,
                    p.reads - s.reads,
                    p.read_bytes - s.read_bytes,
                    p.writes - s.writes,
                    p.write_bytes - s.write_bytes
                );
            }
            println!(
                "{}: reads {:+} read_bytes {:+} writes {:+} write_bytes {:+} (eBPF - /proc)",
                e.device,
                e.reads as i64 - p.reads as i64,
                e.read_bytes as i64 - p.read_bytes as i64,
                e.writes as i64 - p.writes as i64,
                e.write_bytes as i64 - p.write_bytes as i64
            );
        }
    }
    for e in &e_net {
        if let Some(p) = p_net.iter().find(|p| p.interface == e.interface) {
            println!(
                "{}: rx_bytes {:+} tx_bytes {:+} (eBPF - /proc)",
                e.interface,
                e.receive_bytes as i64 - p.receive_bytes as i64,
                e.transmit_bytes as i64 - p.transmit_bytes as i64
            );
        }
    }
    println!(
        "block_rq_complete runs {} vs vda ios accounted (r+w+discard+flush) {}",
        probes.program_stats()?[0].run_count - runs0,
        vda_ios() - ios0
    );
    for (k, v) in probes.disk_totals()? {
        println!("map {}:{} {v:?}", k.major(), k.minor());
    }
    for s in probes.program_stats()? {
        println!("program {}: recursion misses {:?}", s.program, s.recursion_misses);
    }
    Ok(())
}
