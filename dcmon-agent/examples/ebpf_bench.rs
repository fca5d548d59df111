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
//!   BTF parse, and the whole attach;
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
    use dcmon_common::ebpf::{DISK_SLOTS, DiskKey, DiskValue, NET_SLOTS, NetKey, NetValue, TcpCounts};
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
    let per_cpu_lookup = |lookups: f64, bytes: usize, cpus: f64| {
        lookups * (fixed_ns + cpus * (per_cpu_ns + bytes as f64 * per_byte_ns))
    };
    for cpus in [ncpus as f64, 256.0] {
        let percpu_ns = per_cpu_lookup(16.0, std::mem::size_of::<DiskValue>() + std::mem::size_of::<DiskKey>(), cpus)
            + per_cpu_lookup(32.0, std::mem::size_of::<NetValue>() + std::mem::size_of::<NetKey>(), cpus)
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
/// lookups of scratch maps made here: plain arrays (one copy) against per-CPU arrays (one copy per
/// possible CPU) with values of 8 B to 32 KiB. A map sized for 256 CPUs cannot be made on a host
/// with fewer: the kernel sizes per-CPU values by its own possible CPUs.
fn copy_cost() -> anyhow::Result<(f64, f64, f64)> {
    const ARRAY: u32 = 2;
    const PERCPU_ARRAY: u32 = 6;
    let ncpus = dcmon_agent::ebpf::maps::possible_cpus()? as f64;
    let lookup_ns = |map_type: u32, value_size: usize| -> anyhow::Result<f64> {
        #[repr(C)]
        struct CreateAttr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            rest: [u64; 12],
        }
        let mut attr = CreateAttr { map_type, key_size: 4, value_size: value_size as u32, max_entries: 1, rest: [0; 12] };
        // SAFETY: a zeroed bpf_attr prefix with the map_create fields set; the kernel reads only it.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, &raw mut attr, std::mem::size_of::<CreateAttr>() as u32) };
        if fd < 0 {
            bail!("BPF_MAP_CREATE type {map_type} value {value_size} B: {}", std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd to us.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        let copies = if map_type == PERCPU_ARRAY { ncpus as usize } else { 1 };
        let mut value = vec![0u64; value_size.div_ceil(8) * copies];
        let key = 0u32;
        #[repr(C)]
        struct ElemAttr {
            map_fd: u32,
            pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        time_ns(&mut || {
            let mut attr = ElemAttr {
                map_fd: fd.as_raw_fd() as u32,
                pad: 0,
                key: &raw const key as u64,
                value: value.as_mut_ptr() as u64,
                flags: 0,
            };
            // SAFETY: BPF_MAP_LOOKUP_ELEM into a buffer sized for every CPU's copy.
            let rc = unsafe { libc::syscall(libc::SYS_bpf, 1, &raw mut attr, std::mem::size_of::<ElemAttr>() as u32) };
            if rc < 0 { bail!("BPF_MAP_LOOKUP_ELEM: {}", std::io::Error::last_os_error()) } else { Ok(()) }
        })
    };
    let (small, large) = (8, 32 << 10);
    let (arr_small, arr_large) = (lookup_ns(ARRAY, small)?, lookup_ns(ARRAY, large)?);
    let (pc_small, pc_large) = (lookup_ns(PERCPU_ARRAY, small)?, lookup_ns(PERCPU_ARRAY, large)?);
    let per_byte = ((pc_large - pc_small) / ncpus / (large - small) as f64).max(0.0);
    // What a per-CPU lookup pays beyond a plain one for the same bytes, per CPU: the loop over CPUs.
    let per_cpu = ((pc_small - arr_small) / (ncpus - 1.0).max(1.0)).max(0.0);
    let fixed = (arr_small - small as f64 * per_byte).max(0.0);
    println!(
        "lookup of one value, {ncpus} possible CPUs: array 8 B {arr_small:.0} ns, 32 KiB {arr_large:.0} ns; per-CPU array 8 B {pc_small:.0} ns, 32 KiB {pc_large:.0} ns => {per_byte:.3} ns per byte copied, {per_cpu:.0} ns per CPU beyond the bytes, {fixed:.0} ns per syscall"
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
        "attach" => drop(Probes::attach(None)?),
        other => bail!("unknown step {other}"),
    }
    println!("{}", peak_kib()?);
    Ok(())
}

/// The peak of each load step, each in a process of its own.
fn memory() -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    for step in ["nothing", "read", "offsets", "aya", "attach"] {
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
