//! What the eBPF programs cost. Run as root:
//! `cargo run --release -p dcmon-agent --example ebpf_bench [events|memory|reads|json] [--rounds N]`
//!
//! Prints numbers; it is not a timed test. `json` runs all three parts and prints their
//! figures as one JSON object (a part that failed as `{"error": "..."}`): `cargo xtask bench`
//! reads it and sets the figures against the targets. For each workload it alternates runs
//! without programs, with an empty `tp_btf` program on each measured tracepoint (what any
//! program there costs) and with dcmon's programs attached, `kernel.bpf_stats_enabled` held at
//! 0, and reports medians:
//! - N loopback UDP packets (send + receive: one net_dev_xmit and one netif_receive_skb run
//!   per packet; the sending thread's CPU time, which the receive softirq is charged to) and N
//!   4 KiB O_DIRECT reads of a loop device backed by /dev/shm (wall time: the loop worker
//!   completes them; block_rq_issue and block_rq_complete run once per read);
//! - the programs' in-kernel run time per run from BPF_ENABLE_STATS (a separate run: the
//!   stats accounting itself costs time);
//! - their own work per event: bpf_stats' ns per run includes its two clock reads and the
//!   program entry, so an empty `tp_btf` program (`r0 = 0; exit`, loaded with raw bpf(2) calls)
//!   on the same tracepoints, alternating with dcmon's, measures that floor; dcmon's ns per run
//!   minus the empty one's is what the programs themselves do per event; a third program that
//!   only calls bpf_ktime_get_ns measures what one clock read costs there (the I/O latency
//!   programs read the clock once each, at issue and at completion);
//! - one round's map reads at a 256-CPU server's scale (16 disks, 32 interfaces): the shared
//!   arrays (latency histograms, drop counters, TCP counters, the OOM kill total), read as the
//!   agent reads them, through their mapping, and the counters laid out per CPU, summed from
//!   their mapping as the agent does, measured at this host's CPU count and on scratch mapped
//!   arrays sized for 256 CPU ids, in cache and after evicting the caches; beside them what the
//!   per-CPU arrays' bpf(2) batch reads cost before, computed for 256 CPUs from the cost of one
//!   CPU's copy measured on scratch maps (`ebpf_bench reads`: only these);
//! - `ebpf_bench memory`: the peak resident memory (VmHWM) of a fresh process that does only
//!   one step of the load each: nothing, read /sys/kernel/btf/vmlinux, our offset parse, aya's
//!   parse of the whole BTF (which the agent no longer does, for comparison), the stand-in
//!   BTF the programs attach with, and the whole attach.
#![allow(clippy::print_stdout, reason = "a benchmark prints its numbers")]

use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};
use dcmon_agent::ebpf::Probes;
use dcmon_agent::ebpf::btf::Btf;
use dcmon_agent::ebpf::maps::prog_counters;
use serde_json::{Value, json};

#[path = "ebpf_bench/reads.rs"]
mod reads;
use reads::{print_reads, slot_reads};

/// Alternating rounds per workload unless `--rounds N` says otherwise.
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

/// This thread's CPU time in ns (CLOCK_THREAD_CPUTIME_ID).
fn thread_cpu_ns() -> anyhow::Result<u64> {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } != 0 {
        bail!("clock_gettime(CLOCK_THREAD_CPUTIME_ID): {}", io::Error::last_os_error());
    }
    Ok(t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64)
}

/// This thread's CPU ns per packet for PACKETS loopback UDP round trips of 64-byte datagrams.
///
/// CPU time, not wall time: on loopback the receive path (netif_receive_skb included) runs in
/// the softirq the send itself raises, in this thread's context, and this kernel charges
/// softirq time to the task it interrupts (no CONFIG_IRQ_TIME_ACCOUNTING; where it is set the
/// receive side drops out of the figure). Wall time would add whatever the host's other work
/// took the CPU for, which swings by microseconds a packet on a shared VM.
fn udp_loopback() -> anyhow::Result<f64> {
    let rx = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let tx = std::net::UdpSocket::bind("127.0.0.1:0")?;
    tx.connect(rx.local_addr()?)?;
    let payload = [0u8; 64];
    let mut buf = [0u8; 128];
    let start = thread_cpu_ns()?;
    for _ in 0..PACKETS {
        tx.send(&payload)?;
        rx.recv(&mut buf)?;
    }
    Ok((thread_cpu_ns()? - start) as f64 / PACKETS as f64)
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

/// The kernel's `bpf_stats_enabled` switch, held at 0 while this lives and set back to what it
/// was when dropped (on an error or a panic too).
struct StatsOff {
    was: Option<String>,
}

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl StatsOff {
    fn hold() -> anyhow::Result<StatsOff> {
        let read = || std::fs::read_to_string(BPF_STATS_SYSCTL).with_context(|| format!("reading {BPF_STATS_SYSCTL}"));
        let was = read()?.trim().to_owned();
        if was == "0" {
            return Ok(StatsOff { was: None });
        }
        std::fs::write(BPF_STATS_SYSCTL, "0").with_context(|| format!("writing 0 to {BPF_STATS_SYSCTL}"))?;
        let guard = StatsOff { was: Some(was) };
        // A BPF_ENABLE_STATS descriptor held by another process keeps the stats on whatever
        // the switch says: the added time would then include the stats' clock reads.
        if read()?.trim() != "0" {
            bail!("{BPF_STATS_SYSCTL} stays on after writing 0: another process holds BPF_ENABLE_STATS");
        }
        Ok(guard)
    }
}

impl Drop for StatsOff {
    fn drop(&mut self) {
        if let Some(was) = &self.was
            && let Err(e) = std::fs::write(BPF_STATS_SYSCTL, was)
        {
            eprintln!("error: setting {BPF_STATS_SYSCTL} back to {was}: {e}");
        }
    }
}

/// One workload's time per event, without programs, with an empty program on each measured
/// tracepoint, and with dcmon's, for each round.
struct Added {
    without: Vec<f64>,
    empty: Vec<f64>,
    with: Vec<f64>,
}

impl Added {
    /// Each round's difference: with dcmon's programs minus without.
    fn added(&self) -> Vec<f64> {
        self.with.iter().zip(&self.without).map(|(b, a)| b - a).collect()
    }

    /// Each round's difference: with the empty programs minus without, what attaching any
    /// tp_btf program to these tracepoints costs (the tracepoint's call into BPF).
    fn added_empty(&self) -> Vec<f64> {
        self.empty.iter().zip(&self.without).map(|(b, a)| b - a).collect()
    }
}

/// Alternates `rounds` runs of `f` without programs, with empty programs on
/// [`OWN_WORK_TRACEPOINTS`] and with dcmon's programs attached (after one warm-up),
/// `kernel.bpf_stats_enabled` at 0.
fn compare(btf: &Btf<'_>, rounds: usize, mut f: impl FnMut() -> anyhow::Result<f64>) -> anyhow::Result<Added> {
    let _stats_off = StatsOff::hold()?;
    f()?; // warm-up
    let mut added = Added { without: Vec::new(), empty: Vec::new(), with: Vec::new() };
    for _ in 0..rounds {
        added.without.push(f()?);
        let empty: Vec<_> =
            OWN_WORK_TRACEPOINTS.iter().map(|tp| attach_raw(btf, tp, &EMPTY_PROGRAM)).collect::<Result<_, _>>()?;
        added.empty.push(f()?);
        drop(empty);
        let probes = Probes::attach(None)?;
        added.with.push(f()?);
        drop(probes);
    }
    Ok(added)
}

/// The median of `v` and its range.
fn spread(v: Vec<f64>) -> (f64, f64, f64) {
    let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &d| (lo.min(d), hi.max(d)));
    (median(v), lo, hi)
}

/// Prints the medians and the added time: the median of each round's difference and their range.
fn print_added(name: &str, per: &str, a: &Added) {
    let (added, lo, hi) = spread(a.added());
    let (empty, elo, ehi) = spread(a.added_empty());
    println!(
        "{name}: {:.0} ns/{per} without, {:.0} ns/{per} with programs; added {added:.0} ns/{per} (median of {} alternating rounds' differences, range {lo:.0} to {hi:.0}); empty programs on the same tracepoints add {empty:.0} ns/{per} (range {elo:.0} to {ehi:.0})",
        median(a.without.clone()),
        median(a.with.clone()),
        a.without.len(),
    );
}

/// One program's runs and run time in the kernel over the stats pass.
struct InKernel {
    program: &'static str,
    runs: u64,
    ns: u64,
}

/// The programs' in-kernel time per run: both workloads once with the programs attached and
/// BPF_ENABLE_STATS held (the kernel turns the stats off again when its descriptor closes,
/// however this process ends).
fn in_kernel_stats(dev: &str) -> anyhow::Result<Vec<InKernel>> {
    let probes = Probes::attach(None)?;
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let before = probes.program_stats()?;
    udp_loopback()?;
    direct_reads(dev)?;
    let after = probes.program_stats()?;
    Ok(before
        .iter()
        .zip(&after)
        .map(|(b, a)| InKernel {
            program: a.program,
            runs: a.run_count - b.run_count,
            ns: a.run_time_ns - b.run_time_ns,
        })
        .collect())
}

fn print_in_kernel(stats: &[InKernel]) {
    for s in stats {
        println!(
            "bpf stats {}: {} runs, {:.1} ns/run in kernel",
            s.program,
            s.runs,
            s.ns as f64 / s.runs.max(1) as f64
        );
    }
}

/// The tracepoints whose programs' own work is measured: per packet and per I/O.
const OWN_WORK_TRACEPOINTS: [&str; 4] = ["netif_receive_skb", "net_dev_xmit", "block_rq_issue", "block_rq_complete"];

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_RAW_TP: u32 = 23;

/// `union bpf_attr`'s BPF_PROG_LOAD member up to `attach_btf_obj_fd` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
    attach_btf_obj_fd: u32,
}

/// `union bpf_attr`'s BPF_RAW_TRACEPOINT_OPEN member.
#[repr(C)]
struct RawTracepointAttr {
    name: u64,
    prog_fd: u32,
    _pad: u32,
}

fn bpf_fd<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a live, initialized bpf_attr member of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: bpf(2) returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `r0 = 0; exit`: a program that does nothing.
const EMPTY_PROGRAM: [u64; 2] =
    [u64::from_le_bytes([0xb7, 0, 0, 0, 0, 0, 0, 0]), u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0])];

/// `call bpf_ktime_get_ns; r0 = 0; exit`: reads the clock the latency programs read, once.
const CLOCK_PROGRAM: [u64; 3] = [
    u64::from_le_bytes([0x85, 0, 0, 0, 5, 0, 0, 0]), // BPF_FUNC_ktime_get_ns is helper 5
    u64::from_le_bytes([0xb7, 0, 0, 0, 0, 0, 0, 0]),
    u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
];

/// A tp_btf program of `insns` attached to `tracepoint`: (program, link); dropping both detaches it.
fn attach_raw(btf: &Btf<'_>, tracepoint: &str, insns: &[u64]) -> anyhow::Result<(OwnedFd, OwnedFd)> {
    let btf_id = btf.tracepoint_type_id(tracepoint).with_context(|| format!("no btf_trace_{tracepoint} in BTF"))?;
    let mut name = [0u8; 16];
    name[..11].copy_from_slice(b"dcmon_bench");
    let mut log = vec![0u8; 4096];
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_TRACING,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: c"GPL".as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: name,
        expected_attach_type: BPF_TRACE_RAW_TP,
        attach_btf_id: btf_id,
        ..ProgLoadAttr::default()
    };
    let prog = bpf_fd(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        anyhow::anyhow!("BPF_PROG_LOAD of a bench tp_btf/{tracepoint}: {e}: {}", String::from_utf8_lossy(&log[..end]))
    })?;
    let mut open = RawTracepointAttr { name: 0, prog_fd: prog.as_raw_fd() as u32, _pad: 0 };
    let link =
        bpf_fd(BPF_RAW_TRACEPOINT_OPEN, &mut open).with_context(|| format!("attaching a bench tp_btf/{tracepoint}"))?;
    Ok((prog, link))
}

/// One tracepoint's ns per run under bpf_stats: an empty program's, one that only reads the
/// clock, and dcmon's, for each of the alternating rounds.
struct OwnWork {
    tracepoint: &'static str,
    empty: Vec<f64>,
    clock: Vec<f64>,
    ours: Vec<f64>,
}

impl OwnWork {
    /// dcmon's program's own work per event: its median ns per run less the empty program's.
    fn own_ns(&self) -> f64 {
        median(self.ours.clone()) - median(self.empty.clone())
    }

    /// What one bpf_ktime_get_ns costs in this program's place: the clock program's median
    /// less the empty one's. The latency programs read it once each, and cannot cost less.
    fn clock_ns(&self) -> f64 {
        median(self.clock.clone()) - median(self.empty.clone())
    }
}

/// Attaches `insns` to every [`OWN_WORK_TRACEPOINTS`] for one pass of both workloads and returns
/// each program's ns per run.
fn bench_program_pass(btf: &Btf<'_>, insns: &[u64], dev: &str) -> anyhow::Result<Vec<f64>> {
    let programs: Vec<_> =
        OWN_WORK_TRACEPOINTS.iter().map(|tp| attach_raw(btf, tp, insns)).collect::<Result<_, _>>()?;
    let counters = || -> io::Result<Vec<(u64, u64)>> {
        programs.iter().map(|(p, _)| prog_counters(p.as_fd()).map(|c| (c.run_time_ns, c.run_count))).collect()
    };
    let before = counters()?;
    udp_loopback()?;
    direct_reads(dev)?;
    Ok(before.into_iter().zip(counters()?).map(|(b, a)| per_run(b, a)).collect())
}

/// ns per run between two (run time, run count) readings.
fn per_run((t0, n0): (u64, u64), (t1, n1): (u64, u64)) -> f64 {
    (t1 - t0) as f64 / (n1 - n0).max(1) as f64
}

/// [`OWN_WORK_TRACEPOINTS`]' empty programs, clock-only programs and dcmon's, attached in turn
/// for `rounds` rounds of both workloads, bpf_stats held on.
fn own_work(dev: &str, rounds: usize) -> anyhow::Result<Vec<OwnWork>> {
    let data = std::fs::read("/sys/kernel/btf/vmlinux").context("reading /sys/kernel/btf/vmlinux")?;
    let btf = Btf::parse(&data).context("parsing the kernel's BTF")?;
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let mut work: Vec<OwnWork> = OWN_WORK_TRACEPOINTS
        .iter()
        .map(|&tracepoint| OwnWork { tracepoint, empty: Vec::new(), clock: Vec::new(), ours: Vec::new() })
        .collect();
    for _ in 0..rounds {
        for (w, ns) in work.iter_mut().zip(bench_program_pass(&btf, &EMPTY_PROGRAM, dev)?) {
            w.empty.push(ns);
        }
        for (w, ns) in work.iter_mut().zip(bench_program_pass(&btf, &CLOCK_PROGRAM, dev)?) {
            w.clock.push(ns);
        }
        let probes = Probes::attach(None)?;
        let counters = || -> anyhow::Result<Vec<(u64, u64)>> {
            let stats = probes.program_stats()?;
            OWN_WORK_TRACEPOINTS
                .iter()
                .map(|tp| {
                    let s = stats.iter().find(|s| s.program == *tp).with_context(|| format!("{tp} not attached"))?;
                    Ok((s.run_time_ns, s.run_count))
                })
                .collect()
        };
        let before = counters()?;
        udp_loopback()?;
        direct_reads(dev)?;
        for ((w, b), a) in work.iter_mut().zip(before).zip(counters()?) {
            w.ours.push(per_run(b, a));
        }
    }
    Ok(work)
}

fn print_own_work(work: &[OwnWork]) {
    let range = |v: &[f64]| v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    for w in work {
        let ((elo, ehi), (clo, chi), (olo, ohi)) = (range(&w.empty), range(&w.clock), range(&w.ours));
        println!(
            "{}: empty program {:.1} ns/run [{elo:.1}-{ehi:.1}], clock read only {:.1} [{clo:.1}-{chi:.1}], dcmon's {:.1} [{olo:.1}-{ohi:.1}]: its own work {:.1} ns per event, one clock read {:.1} (medians of {} alternating rounds, bpf_stats on)",
            w.tracepoint,
            median(w.empty.clone()),
            median(w.clock.clone()),
            median(w.ours.clone()),
            w.own_ns(),
            w.clock_ns(),
            w.ours.len()
        );
    }
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

/// The load steps `ebpf_bench memory` measures, in order: the last is the whole attach.
const MEMORY_STEPS: [&str; 6] = ["nothing", "read", "offsets", "aya", "tracepoints-btf", "attach"];

/// The peak (VmHWM, KiB) of each load step, each in a process of its own.
fn memory() -> anyhow::Result<Vec<(&'static str, u64)>> {
    let exe = std::env::current_exe()?;
    MEMORY_STEPS
        .iter()
        .map(|&step| {
            let out = Command::new(&exe).args(["memory-step", step]).output()?;
            if !out.status.success() {
                bail!("memory step {step}: {}", String::from_utf8_lossy(&out.stderr));
            }
            let kib = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .with_context(|| format!("memory step {step}: VmHWM"))?;
            Ok((step, kib))
        })
        .collect()
}

fn print_memory(steps: &[(&str, u64)]) {
    for (step, kib) in steps {
        println!("load memory, {step}: VmHWM {kib} KiB");
    }
}

/// A loop device backed by a file in /dev/shm, both removed when dropped. Its reads are served
/// from memory, so the per-read time is a few microseconds and a ~100 ns difference is not lost
/// in the noise of a virtual disk. O_DIRECT on the loop device still sends every read through
/// the block layer (one block_rq_issue and one block_rq_complete per read).
struct ShmLoop {
    dev: dcmon_tests::loop_device::LoopDevice,
    _file: tempfile::NamedTempFile,
}

impl ShmLoop {
    fn new() -> anyhow::Result<ShmLoop> {
        let file = tempfile::NamedTempFile::new_in("/dev/shm")?;
        std::fs::write(file.path(), vec![0x5au8; 64 << 20])?;
        let dev = dcmon_tests::loop_device::LoopDevice::add();
        sh(&["losetup", &format!("/dev/{}", dev.name()), &file.path().to_string_lossy()])?;
        Ok(ShmLoop { dev, _file: file })
    }

    fn path(&self) -> String {
        format!("/dev/{}", self.dev.name())
    }
}

/// The per-event part: both workloads compared, then the in-kernel stats pass and the own-work
/// rounds.
struct Events {
    packet: Added,
    read: Added,
    in_kernel: Vec<InKernel>,
    own_work: Vec<OwnWork>,
}

fn events(rounds: usize) -> anyhow::Result<Events> {
    let disk = ShmLoop::new()?;
    let dev = disk.path();
    let data = std::fs::read("/sys/kernel/btf/vmlinux").context("reading /sys/kernel/btf/vmlinux")?;
    let btf = Btf::parse(&data).context("parsing the kernel's BTF")?;
    Ok(Events {
        packet: compare(&btf, rounds, udp_loopback).context("loopback packets")?,
        read: compare(&btf, rounds, || direct_reads(&dev)).context("O_DIRECT reads")?,
        in_kernel: in_kernel_stats(&dev).context("in-kernel stats pass")?,
        own_work: own_work(&dev, rounds).context("own work against an empty program")?,
    })
}

/// Every part as one JSON object; a part that failed as `{"error": "..."}`.
fn all_json(rounds: usize) -> Value {
    let part = |r: anyhow::Result<Value>| r.unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
    let added = |a: &Added| {
        json!({"without_ns": a.without, "empty_ns": a.empty, "with_ns": a.with, "added_ns": a.added(),
               "added_empty_ns": a.added_empty()})
    };
    let events = part(events(rounds).map(|e| {
        json!({
            "packet": added(&e.packet),
            "read": added(&e.read),
            "in_kernel": e.in_kernel.iter().map(|s| json!({"program": s.program, "runs": s.runs, "ns": s.ns})).collect::<Vec<_>>(),
            "own_work": e.own_work.iter().map(|w| json!({
                "program": w.tracepoint,
                "empty_ns": median(w.empty.clone()),
                "ours_ns": median(w.ours.clone()),
                "own_ns": w.own_ns(),
                "clock_ns": w.clock_ns(),
            })).collect::<Vec<_>>(),
        })
    }));
    let reads = part(slot_reads().map(|r| {
        json!({
            "cpus": r.ncpus,
            "round_here_ns": r.round_here_ns(),
            "shared_ns": r.shared_ns(),
            "per_cpu_here_ns": r.per_cpu_here_ns(),
            "per_cpu_256_ns": r.at_256.cold_ns,
            "per_cpu_256_warm_ns": r.at_256.warm_ns,
            "per_cpu_256_syscall_ns": r.per_cpu_syscall_computed_ns(256.0),
        })
    }));
    let memory = part(
        memory()
            .map(|steps| Value::Object(steps.into_iter().map(|(step, kib)| (step.to_owned(), json!(kib))).collect())),
    );
    json!({"rounds": rounds, "events": events, "reads": reads, "memory": memory})
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds = match args.iter().position(|a| a == "--rounds") {
        Some(i) => {
            args.get(i + 1).and_then(|n| n.parse().ok()).filter(|&n| n > 0).context("--rounds N: N a number above 0")?
        }
        None => ROUNDS,
    };
    match (args.first().map(String::as_str), args.get(1)) {
        (Some("memory-step"), Some(step)) => return memory_step(step),
        (Some("memory"), _) => return memory().map(|steps| print_memory(&steps)),
        _ => {}
    }
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root: the benchmark attaches BPF programs and creates a loop device");
    }
    match args.first().map(String::as_str) {
        Some("reads") => print_reads(&slot_reads()?),
        Some("json") => println!("{}", all_json(rounds)),
        None | Some("events" | "--rounds") => {
            let e = events(rounds)?;
            print_added("loopback UDP 64-byte packet, send+receive", "packet", &e.packet);
            print_added("4 KiB O_DIRECT read of a loop device", "read", &e.read);
            print_in_kernel(&e.in_kernel);
            print_own_work(&e.own_work);
            print_reads(&slot_reads()?);
        }
        Some(other) => bail!("unknown part {other}: events, reads, memory or json"),
    }
    Ok(())
}
