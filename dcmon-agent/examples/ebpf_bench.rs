//! What the eBPF programs cost. Run as root:
//! `cargo run --release -p dcmon-agent --example ebpf_bench [events]`
//!
//! Prints numbers; it is not a timed test. For each workload it alternates runs without and
//! with the programs attached and reports medians:
//! - N loopback UDP packets (send + receive: one net_dev_xmit and one netif_receive_skb run
//!   per packet) and N 4 KiB O_DIRECT reads of a loop device (block_rq_complete runs for the
//!   loop request and for the backing file's request on the real disk);
//! - the programs' in-kernel run time per run from BPF_ENABLE_STATS (a separate run: the
//!   stats accounting itself costs time);
//! - one round's map reads at a 256-CPU server's scale (16 disks, 32 interfaces): the shared
//!   arrays (latency histograms, drop counters) measured, the per-CPU maps computed from the
//!   cost of one CPU's copy measured on scratch maps;
//! - `ebpf_bench memory`: the peak resident memory (VmHWM) of a fresh process that does only
//!   one step of the load each: nothing, read /sys/kernel/btf/vmlinux, our offset parse, aya's
//!   parse of the whole BTF (which the agent no longer does, for comparison), the stand-in
//!   BTF the programs attach with, and the whole attach;
//! - one full read of the network map (BPF_MAP_LOOKUP_BATCH, and aya's per-key iteration for
//!   comparison) with 10, 1,000 and 10,000 interfaces (veth pairs) in a namespace.
#![allow(clippy::print_stdout, reason = "a benchmark prints its numbers")]

use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use dcmon_agent::ebpf::Probes;

const ROUNDS: usize = 7;
const PACKETS: usize = 100_000;
const READS: usize = 20_000;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn sh(cmd: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// ns per packet for PACKETS loopback UDP round trips of 64-byte datagrams.
fn udp_loopback() -> anyhow::Result<f64> {
    let rx = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let tx = std::net::UdpSocket::bind("127.0.0.1:0")?;
    tx.connect(rx.local_addr()?)?;
    let payload = [0u8; 64];
    let mut buf = [0u8; 128];
    let start = Instant::now();
    for _ in 0..PACKETS {
        tx.send(&payload)?;
        rx.recv(&mut buf)?;
    }
    Ok(start.elapsed().as_nanos() as f64 / PACKETS as f64)
}

struct Aligned(*mut u8, std::alloc::Layout);
impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in direct_reads with this layout.
        unsafe { std::alloc::dealloc(self.0, self.1) }
    }
}

/// ns per read for READS 4 KiB O_DIRECT reads spread over the first 64 MiB of `dev`.
fn direct_reads(dev: &str) -> anyhow::Result<f64> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .with_context(|| format!("open {dev} O_DIRECT"))?;
    let layout = std::alloc::Layout::from_size_align(4096, 4096)?;
    // SAFETY: non-zero size.
    let buf = Aligned(unsafe { std::alloc::alloc_zeroed(layout) }, layout);
    let start = Instant::now();
    for i in 0..READS {
        let off = ((i * 7919) % 16384) * 4096;
        // SAFETY: 4 KiB aligned buffer, open fd.
        let n = unsafe { libc::pread(f.as_raw_fd(), buf.0.cast(), 4096, off as libc::off_t) };
        if n != 4096 {
            bail!("pread {dev}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(start.elapsed().as_nanos() as f64 / READS as f64)
}

fn compare(name: &str, per: &str, mut f: impl FnMut() -> anyhow::Result<f64>) -> anyhow::Result<()> {
    f()?; // warm-up
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        without.push(f()?);
        let probes = Probes::attach(None)?;
        with.push(f()?);
        drop(probes);
    }
    let (a, b) = (median(without), median(with));
    println!(
        "{name}: {a:.0} ns/{per} without, {b:.0} ns/{per} with programs, added {:.0} ns/{per} (median of {ROUNDS} alternating runs)",
        b - a
    );
    Ok(())
}

fn in_kernel_stats(dev: &str) -> anyhow::Result<()> {
    let probes = Probes::attach(None)?;
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let before = probes.program_stats()?;
    udp_loopback()?;
    direct_reads(dev)?;
    let after = probes.program_stats()?;
    for (b, a) in before.iter().zip(&after) {
        let runs = a.run_count - b.run_count;
        let ns = a.run_time_ns - b.run_time_ns;
        println!("bpf stats {}: {runs} runs, {:.1} ns/run in kernel", a.program, ns as f64 / runs.max(1) as f64);
    }
    Ok(())
}

/// Median ns of 201 runs of `f`.
fn time_ns(f: &mut dyn FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut v = Vec::new();
    for _ in 0..201 {
        let s = Instant::now();
        f()?;
        v.push(s.elapsed().as_nanos() as f64);
    }
    Ok(median(v))
}

/// One round's reads of the maps at the scale of a 256-CPU GPU server (16 disks, 32
/// interfaces): measured for the shared arrays, whose read does not depend on the CPU count, and
/// computed for the per-CPU maps from the cost of one CPU copy measured by `copy_cost`.
fn slot_reads() -> anyhow::Result<()> {
    use dcmon_common::ebpf::{DISK_SLOTS, DiskValue, NET_SLOTS, NetValue, TcpCounts};
    let probes = Probes::attach(None)?;
    let ncpus = dcmon_agent::ebpf::maps::possible_cpus()?;
    let lat_ns = time_ns(&mut || {
        for slot in DISK_SLOTS - 16..DISK_SLOTS {
            probes.disk_latency(slot)?;
        }
        Ok(())
    })?;
    let drop_ns = time_ns(&mut || {
        for slot in NET_SLOTS - 32..NET_SLOTS {
            probes.net_drops(slot)?;
        }
        Ok(())
    })?;
    println!(
        "shared array read (any CPU count): 16 disks' latency histograms {:.1} us, 32 interfaces' drop counters {:.1} us",
        lat_ns / 1e3,
        drop_ns / 1e3
    );
    let (fixed_ns, per_byte_ns, per_cpu_ns) = copy_cost()?;
    // The per-CPU reads left in a round: one lookup per disk and per interface (the counter hash
    // maps) and one of the TCP counters, each copying every possible CPU's value.
    let per_cpu_lookup =
        |lookups: f64, bytes: usize, cpus: f64| lookups * (fixed_ns + cpus * (per_cpu_ns + bytes as f64 * per_byte_ns));
    for cpus in [ncpus as f64, 256.0] {
        let percpu_ns = per_cpu_lookup(16.0, std::mem::size_of::<DiskValue>(), cpus)
            + per_cpu_lookup(32.0, std::mem::size_of::<NetValue>(), cpus)
            + per_cpu_lookup(1.0, std::mem::size_of::<TcpCounts>(), cpus);
        println!(
            "round at {cpus} CPUs, 16 disks, 32 interfaces: {:.0} us (shared arrays {:.0} us measured, per-CPU counters {:.0} us computed)",
            (lat_ns + drop_ns + percpu_ns) / 1e3,
            (lat_ns + drop_ns) / 1e3,
            percpu_ns / 1e3
        );
    }
    Ok(())
}

/// The cost of one per-CPU map lookup as `fixed + cpus * (per_cpu + bytes * per_byte)` ns, from
/// scratch maps made here: a batch read of 1,024 8-byte values from a plain array (one copy per
/// key) against a per-CPU array (one copy per key and possible CPU) gives the cost of one CPU's
/// copy; one 32 KiB value against one 8-byte value of a per-CPU array the cost per byte; one
/// lookup of an 8-byte plain array value the syscall's fixed part. A map sized for 256 CPUs
/// cannot be made on a host with fewer: the kernel sizes per-CPU values by its possible CPUs.
fn copy_cost() -> anyhow::Result<(f64, f64, f64)> {
    const ARRAY: u32 = 2;
    const PERCPU_ARRAY: u32 = 6;
    const LOOKUP_ELEM: libc::c_long = 1;
    const LOOKUP_BATCH: libc::c_long = 24;
    const KEYS: usize = 1024;
    let ncpus = dcmon_agent::ebpf::maps::possible_cpus()?;
    let bpf = |cmd: libc::c_long, attr: &mut [u64]| -> std::io::Result<i64> {
        // SAFETY: `attr` is a zeroed bpf_attr prefix with the command's fields set; every
        // address in it points to a live buffer sized for what the command writes.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr) as u32) };
        if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
    };
    // Median ns of reading every key of a new map (one lookup, or one batch for many keys).
    let read_ns = |map_type: u32, value_size: usize, entries: usize| -> anyhow::Result<f64> {
        let mut create = [0u64; 16];
        create[0] = u64::from(map_type) | 4 << 32; // map_type, key_size
        create[1] = value_size as u64 | (entries as u64) << 32; // value_size, max_entries
        let fd = bpf(0, &mut create).with_context(|| format!("BPF_MAP_CREATE type {map_type}, {value_size} B"))?;
        // SAFETY: the kernel just returned this fd to us.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        let copies = if map_type == PERCPU_ARRAY { ncpus } else { 1 };
        let mut values = vec![0u64; value_size.div_ceil(8) * copies * entries];
        let mut keys = vec![0u32; entries];
        let mut out_batch = 0u64;
        time_ns(&mut || {
            let mut attr = [0u64; 8];
            if entries == 1 {
                attr[0] = fd.as_raw_fd() as u64;
                attr[1] = keys.as_ptr() as u64;
                attr[2] = values.as_mut_ptr() as u64;
                bpf(LOOKUP_ELEM, &mut attr).context("BPF_MAP_LOOKUP_ELEM")?;
            } else {
                // in_batch NULL (from the start), out_batch, keys, values, count | map_fd << 32.
                attr[1] = &raw mut out_batch as u64;
                attr[2] = keys.as_mut_ptr() as u64;
                attr[3] = values.as_mut_ptr() as u64;
                attr[4] = entries as u64 | (fd.as_raw_fd() as u64) << 32;
                match bpf(LOOKUP_BATCH, &mut attr) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(e).context("BPF_MAP_LOOKUP_BATCH"),
                }
                anyhow::ensure!(attr[4] as u32 as usize == entries, "batch read {} of {entries} keys", attr[4] as u32);
            }
            Ok(())
        })
    };
    let fixed = read_ns(ARRAY, 8, 1)?;
    let (arr_batch, pc_batch) = (read_ns(ARRAY, 8, KEYS)?, read_ns(PERCPU_ARRAY, 8, KEYS)?);
    let (pc_small, pc_large) = (read_ns(PERCPU_ARRAY, 8, 1)?, read_ns(PERCPU_ARRAY, 32 << 10, 1)?);
    let per_byte = ((pc_large - pc_small) / ncpus as f64 / ((32 << 10) - 8) as f64).max(0.0);
    let per_cpu = ((pc_batch - arr_batch) / KEYS as f64 / (ncpus - 1).max(1) as f64).max(0.0);
    println!(
        "lookup, {ncpus} possible CPUs: one 8 B array value {fixed:.0} ns; batch of {KEYS} 8 B values: array {:.1} us, per-CPU array {:.1} us; one per-CPU value of 8 B {pc_small:.0} ns, of 32 KiB {pc_large:.0} ns => {per_cpu:.1} ns per CPU copy, {per_byte:.3} ns per byte",
        arr_batch / 1e3,
        pc_batch / 1e3
    );
    Ok((fixed, per_byte, per_cpu))
}

fn map_reads() -> anyhow::Result<()> {
    let probes = Probes::attach(None)?;
    let ns = format!("dcmon-bench{}", std::process::id());
    sh(&["ip", "netns", "add", &ns])?;
    let result = (|| -> anyhow::Result<()> {
        let mut created = 0;
        for target in [10usize, 1_000, 10_000] {
            let mut batch = String::new();
            // Pairs of veths: this kernel has no dummy driver (CONFIG_DUMMY off, no modules).
            for i in (created..target).step_by(2) {
                batch
                    .push_str(&format!("link add d{i} type veth peer name e{i}\nlink set d{i} up\nlink set e{i} up\n"));
            }
            let file = std::env::temp_dir().join(format!("{ns}.batch"));
            std::fs::write(&file, batch)?;
            sh(&["ip", "-n", &ns, "-batch", &file.to_string_lossy()])?;
            let _ = std::fs::remove_file(&file);
            created = target;
            // Bringing an interface up sends IPv6 DAD/MLD packets through it, which creates its map
            // entry; wait until every interface has one.
            let deadline = Instant::now() + Duration::from_secs(60);
            let netns = std::fs::metadata(format!("/run/netns/{ns}"))
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m) as u32)?;
            let mut ours = 0;
            while Instant::now() < deadline {
                ours = probes.net_totals()?.iter().filter(|(k, _)| k.netns == netns).count();
                if ours >= target {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let total = probes.net_totals()?.len();
            let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
                let mut v = Vec::new();
                for _ in 0..21 {
                    let s = Instant::now();
                    f()?;
                    v.push(s.elapsed().as_nanos() as f64 / 1e3);
                }
                Ok(median(v))
            };
            let batch_us = time(&mut || probes.net_totals().map(|_| ()))?;
            let per_key_us = time(&mut || probes.net_totals_per_key().map(|_| ()))?;
            println!(
                "map read, {target} interfaces ({ours} with entries, {total} entries in the map): batch {batch_us:.0} us, per-key {per_key_us:.0} us"
            );
        }
        Ok(())
    })();
    let _ = sh(&["ip", "netns", "del", &ns]);
    result
}

/// VmHWM of this process, in KiB.
fn peak_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).context("no VmHWM in /proc/self/status")?;
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).context("VmHWM value")
}

/// Runs one load step in this (fresh) process and prints its peak.
fn memory_step(step: &str) -> anyhow::Result<()> {
    let path = std::path::Path::new(dcmon_agent::ebpf::load::VMLINUX_BTF);
    match step {
        "nothing" => {}
        "read" => drop(std::fs::read(path)?),
        "offsets" => drop(dcmon_agent::ebpf::load::kernel_offsets(path)?),
        "aya" => drop(aya::Btf::parse(&std::fs::read(path)?, aya::Endianness::default())?),
        "tracepoints-btf" => {
            drop(dcmon_agent::ebpf::load::attach_btf(&dcmon_agent::ebpf::load::kernel_facts(path)?.tracepoint_ids)?)
        }
        "attach" => drop(Probes::attach(None)?),
        other => bail!("unknown step {other}"),
    }
    println!("{}", peak_kib()?);
    Ok(())
}

/// The peak of each load step, each in a process of its own.
fn memory() -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    for step in ["nothing", "read", "offsets", "aya", "tracepoints-btf", "attach"] {
        let out = Command::new(&exe).args(["memory-step", step]).output()?;
        if !out.status.success() {
            bail!("memory step {step}: {}", String::from_utf8_lossy(&out.stderr));
        }
        println!("load memory, {step}: VmHWM {} KiB", String::from_utf8_lossy(&out.stdout).trim());
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match (std::env::args().nth(1).as_deref(), std::env::args().nth(2)) {
        (Some("memory-step"), Some(step)) => return memory_step(&step),
        (Some("memory"), _) => return memory(),
        _ => {}
    }
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root: the benchmark attaches BPF programs and creates a loop device");
    }
    // Backed by a file in /dev/shm: the loop device's reads are served from memory, so the
    // per-read time is a few microseconds and a ~100 ns difference is not lost in the noise
    // of a virtual disk. O_DIRECT on the loop device still sends every read through the block
    // layer (one block_rq_complete per read).
    let file = tempfile::NamedTempFile::new_in("/dev/shm")?;
    std::fs::write(file.path(), vec![0x5au8; 64 << 20])?;
    let dev = sh(&["losetup", "--find", "--show", &file.path().to_string_lossy()])?.trim().to_owned();
    let result = (|| -> anyhow::Result<()> {
        compare("loopback UDP 64-byte packet, send+receive", "packet", udp_loopback)?;
        compare("4 KiB O_DIRECT read of a loop device", "read", || direct_reads(&dev))?;
        in_kernel_stats(&dev)?;
        slot_reads()?;
        // `ebpf_bench events` skips the slow part (creating 10,000 interfaces).
        if std::env::args().nth(1).as_deref() == Some("events") {
            return Ok(());
        }
        map_reads()
    })();
    let _ = sh(&["losetup", "-d", &dev]);
    result
}
