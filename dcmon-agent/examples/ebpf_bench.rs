//! What the eBPF programs cost. Run as root:
//! `cargo run --release -p dcmon-agent --example ebpf_bench [events|memory|reads]`
//!
//! Prints numbers; it is not a timed test. For each workload it alternates runs without and
//! with the programs attached and reports medians:
//! - N loopback UDP packets (send + receive: one net_dev_xmit and one netif_receive_skb run
//!   per packet) and N 4 KiB O_DIRECT reads of a loop device (block_rq_complete runs for the
//!   loop request and for the backing file's request on the real disk);
//! - the programs' in-kernel run time per run from BPF_ENABLE_STATS (a separate run: the
//!   stats accounting itself costs time);
//! - one round's map reads at a 256-CPU server's scale (16 disks, 32 interfaces): the shared
//!   arrays (latency histograms, drop counters; read a lookup per slot and, as the agent reads
//!   them, in one batch) and the per-CPU counter arrays measured at this
//!   host's CPU count, the per-CPU arrays computed for 256 CPUs from the cost of one CPU's copy
//!   measured on scratch maps (`ebpf_bench reads`: only these);
//! - `ebpf_bench memory`: the peak resident memory (VmHWM) of a fresh process that does only
//!   one step of the load each: nothing, read /sys/kernel/btf/vmlinux, our offset parse, aya's
//!   parse of the whole BTF (which the agent no longer does, for comparison), the stand-in
//!   BTF the programs attach with, and the whole attach.
#![allow(clippy::print_stdout, reason = "a benchmark prints its numbers")]

use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::process::Command;
use std::time::Instant;

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

/// Alternates ROUNDS runs of `f` without and with the programs attached (after one warm-up) and
/// prints the medians and the added time: the median of each round's difference and their range.
fn compare(name: &str, per: &str, mut f: impl FnMut() -> anyhow::Result<f64>) -> anyhow::Result<()> {
    f()?; // warm-up
    let (mut without, mut with, mut added) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let a = f()?;
        let probes = Probes::attach(None)?;
        let b = f()?;
        drop(probes);
        without.push(a);
        with.push(b);
        added.push(b - a);
    }
    let (lo, hi) = added.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &d| (lo.min(d), hi.max(d)));
    println!(
        "{name}: {:.0} ns/{per} without, {:.0} ns/{per} with programs; added {:.0} ns/{per} (median of {ROUNDS} alternating rounds' differences, range {lo:.0} to {hi:.0})",
        median(without),
        median(with),
        median(added)
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
/// interfaces, given slots here under device numbers and interface indexes no device has):
/// measured for the shared arrays, whose read does not depend on the CPU count, and for the
/// per-CPU counter arrays at this host's CPU count, and computed for 256 CPUs from the cost of
/// one CPU copy measured by `copy_cost`.
fn slot_reads() -> anyhow::Result<()> {
    use dcmon_common::ebpf::{DiskKey, DiskValue, NetKey, NetValue, TcpCounts};
    let probes = Probes::attach(None)?;
    let ncpus = dcmon_agent::ebpf::maps::possible_cpus()?;
    let mut disk_slots = Vec::new();
    for minor in 0..16 {
        disk_slots.push(probes.disk_slot(DiskKey::new(4095, minor))?.context("a free disk slot")?);
    }
    let mut net_slots = Vec::new();
    for ifindex in 0..32 {
        net_slots.push(probes.net_slot(NetKey { ifindex: 1_000_000 + ifindex, netns: 1 })?.context("a free slot")?);
    }
    let lat_ns = time_ns(&mut || {
        for &slot in &disk_slots {
            probes.disk_latency(slot)?;
        }
        Ok(())
    })?;
    let drop_ns = time_ns(&mut || {
        for &slot in &net_slots {
            probes.net_drops(slot)?;
        }
        Ok(())
    })?;
    // What the agent does each round: one batch read of each shared array's used prefix.
    let lat_batch_ns = time_ns(&mut || probes.disk_latency_all().map(|_| ()))?;
    let drop_batch_ns = time_ns(&mut || probes.net_drops_all().map(|_| ()))?;
    let disk_ns = time_ns(&mut || probes.disk_counters().map(|_| ()))?;
    let net_ns = time_ns(&mut || probes.net_counters().map(|_| ()))?;
    let tcp_ns = time_ns(&mut || probes.tcp_counts().map(|_| ()))?;
    let (disk_entries, net_entries) = (probes.disk_counters()?.len(), probes.net_counters()?.len());
    println!(
        "shared array read (any CPU count), a lookup per slot: 16 disks' latency histograms {:.1} us, 32 interfaces' drop counters {:.1} us",
        lat_ns / 1e3,
        drop_ns / 1e3
    );
    println!(
        "shared array read (any CPU count), one batch (the agent's round): 16 disks' latency histograms {:.1} us, 32 interfaces' drop counters {:.1} us",
        lat_batch_ns / 1e3,
        drop_batch_ns / 1e3
    );
    println!(
        "per-CPU counter arrays at {ncpus} CPUs: disks ({disk_entries} slots, one batch) {:.1} us, interfaces ({net_entries} slots, one batch) {:.1} us, TCP {:.1} us",
        disk_ns / 1e3,
        net_ns / 1e3,
        tcp_ns / 1e3
    );
    let (fixed_ns, per_byte_ns, per_cpu_ns) = copy_cost()?;
    // A batch read of `entries` per-CPU values: the syscall's fixed part once, then every
    // possible CPU's copy of each entry.
    let per_cpu_read = |entries: usize, bytes: usize, cpus: f64| {
        fixed_ns + entries as f64 * cpus * (per_cpu_ns + bytes as f64 * per_byte_ns)
    };
    for cpus in [ncpus as f64, 256.0] {
        let percpu_ns = per_cpu_read(disk_entries, std::mem::size_of::<DiskValue>(), cpus)
            + per_cpu_read(net_entries, std::mem::size_of::<NetValue>(), cpus)
            + per_cpu_read(1, std::mem::size_of::<TcpCounts>(), cpus);
        println!(
            "round at {cpus} CPUs, 16 disks, 32 interfaces: {:.0} us (shared arrays {:.0} us measured, per-CPU counters {:.0} us computed)",
            (lat_batch_ns + drop_batch_ns + percpu_ns) / 1e3,
            (lat_batch_ns + drop_batch_ns) / 1e3,
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
    if std::env::args().nth(1).as_deref() == Some("reads") {
        return slot_reads();
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
        slot_reads()
    })();
    let _ = sh(&["losetup", "-d", &dev]);
    result
}
