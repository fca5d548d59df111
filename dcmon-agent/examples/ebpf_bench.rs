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
//! - one round's read of the per-CPU arrays of one disk's latency histograms (4 lookups of 216
//!   bytes per CPU) and one interface's drop counters (1 lookup of 1,280 bytes per CPU): the time
//!   per CPU copy, and what a round of 16 disks and 32 interfaces costs at 256 CPUs from it;
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

/// The per-CPU array reads of the latency histograms and drop counters.
fn slot_reads() -> anyhow::Result<()> {
    use dcmon_common::ebpf::{DISK_SLOTS, LAT_OPS, NET_SLOTS};
    let probes = Probes::attach(None)?;
    let ncpus = dcmon_agent::ebpf::maps::possible_cpus()?;
    let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        let mut v = Vec::new();
        for _ in 0..201 {
            let s = Instant::now();
            f()?;
            v.push(s.elapsed().as_nanos() as f64);
        }
        Ok(median(v))
    };
    let lat_ns = time(&mut || probes.disk_latency(DISK_SLOTS - 1).map(|_| ()))?;
    let drop_ns = time(&mut || probes.net_drops(NET_SLOTS - 1).map(|_| ()))?;
    let lat_copies = (LAT_OPS as usize * ncpus) as f64;
    let (lat_per_copy, drop_per_copy) = (lat_ns / lat_copies, drop_ns / ncpus as f64);
    println!(
        "slot read, {ncpus} possible CPUs: one disk's latency histograms {:.1} us ({lat_per_copy:.0} ns per CPU copy of 216 B), one interface's drops {:.1} us ({drop_per_copy:.0} ns per CPU copy of 1,280 B)",
        lat_ns / 1e3,
        drop_ns / 1e3
    );
    // A round at 256 CPUs, if each copy costs what it costs here (the syscall's fixed part is
    // counted 256 times over: an upper bound).
    let round_us = (16.0 * LAT_OPS as f64 * lat_per_copy + 32.0 * drop_per_copy) * 256.0 / 1e3;
    println!("slot read projected for 256 CPUs, 16 disks and 32 interfaces: {round_us:.0} us per round");
    Ok(())
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
