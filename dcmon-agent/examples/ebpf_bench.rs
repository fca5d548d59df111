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
//!   agent reads them, through their mapping, and the per-CPU counter arrays (one bpf(2) batch
//!   each) measured at this host's CPU count, the per-CPU arrays computed for 256 CPUs from the
//!   cost of one CPU's copy measured on scratch maps (`ebpf_bench reads`: only these);
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

/// One round's map reads at a 256-CPU server's scale, ns: what [`slot_reads`] measures.
struct Reads {
    ncpus: usize,
    /// The shared arrays read through their mapping, as the agent reads them each round: 16
    /// disks' latency histograms, 32 interfaces' drop counters, the TCP counters, the OOM total.
    lat_ns: f64,
    drop_ns: f64,
    tcp_ns: f64,
    oom_ns: f64,
    /// The same latency and drop reads as one `BPF_MAP_LOOKUP_BATCH` each (the agent's read
    /// before the mapping), on scratch arrays of the same shape.
    lat_syscall_ns: f64,
    drop_syscall_ns: f64,
    /// A walk of the (empty) OOM map, which the round made before the OOM total: now only
    /// after a kill.
    oom_walk_ns: f64,
    oom_entries: usize,
    /// The per-CPU counter arrays at this host's CPU count, one batch each, and their slots.
    disk_ns: f64,
    net_ns: f64,
    disk_entries: usize,
    net_entries: usize,
    copy: CopyCost,
}

impl Reads {
    /// The round's per-CPU counter reads at `cpus` possible CPUs, computed from [`CopyCost`]: a
    /// batch read of `entries` per-CPU values costs the syscall's fixed part once, then every
    /// possible CPU's copy of each entry.
    fn per_cpu_computed_ns(&self, cpus: f64) -> f64 {
        use dcmon_common::ebpf::{DiskValue, NetValue};
        let c = &self.copy;
        let read = |entries: usize, bytes: usize| {
            c.fixed_ns + entries as f64 * cpus * (c.per_cpu_ns + bytes as f64 * c.per_byte_ns)
        };
        read(self.disk_entries, std::mem::size_of::<DiskValue>())
            + read(self.net_entries, std::mem::size_of::<NetValue>())
    }

    /// The shared arrays' reads through their mapping, measured (one value per entry whatever
    /// the CPU count).
    fn shared_ns(&self) -> f64 {
        self.lat_ns + self.drop_ns + self.tcp_ns + self.oom_ns
    }

    /// The per-CPU counter arrays' batch reads at this host's CPU count, measured.
    fn per_cpu_here_ns(&self) -> f64 {
        self.disk_ns + self.net_ns
    }

    /// The whole round at this host's CPU count, every read measured.
    fn round_here_ns(&self) -> f64 {
        self.shared_ns() + self.per_cpu_here_ns()
    }
}

/// One round's reads of the maps at the scale of a 256-CPU GPU server (16 disks, 32
/// interfaces, given slots here under device numbers and interface indexes no device has):
/// measured for the shared arrays (read through their mapping), whose read does not depend on
/// the CPU count, and for the
/// per-CPU counter arrays at this host's CPU count, and computed for 256 CPUs from the cost of
/// one CPU copy measured by `copy_cost`.
fn slot_reads() -> anyhow::Result<Reads> {
    use dcmon_common::ebpf::{DiskKey, DropCounts, LatencyHist, NetKey};
    let probes = Probes::attach(None)?;
    let ncpus = dcmon_agent::ebpf::maps::possible_cpus()?;
    for minor in 0..16 {
        probes.disk_slot(DiskKey::new(4095, minor))?.context("a free disk slot")?;
    }
    for ifindex in 0..32 {
        probes.net_slot(NetKey { ifindex: 1_000_000 + ifindex, netns: 1 })?.context("a free slot")?;
    }
    let lat_entries = probes.disk_latency_all()?.len() * dcmon_common::ebpf::LAT_OPS as usize;
    let drop_entries = probes.net_drops_all()?.len();
    Ok(Reads {
        ncpus,
        lat_syscall_ns: scratch_read_ns(ARRAY, std::mem::size_of::<LatencyHist>(), lat_entries)?,
        drop_syscall_ns: scratch_read_ns(ARRAY, std::mem::size_of::<DropCounts>(), drop_entries)?,
        oom_walk_ns: time_ns(&mut || probes.oom_kills().map(|_| ()))?,
        oom_entries: probes.oom_kills()?.len(),
        lat_ns: time_ns(&mut || probes.disk_latency_all().map(|_| ()))?,
        drop_ns: time_ns(&mut || probes.net_drops_all().map(|_| ()))?,
        tcp_ns: time_ns(&mut || probes.tcp_counts().map(|_| ()))?,
        oom_ns: time_ns(&mut || {
            std::hint::black_box(probes.oom_kill_total());
            Ok(())
        })?,
        disk_ns: time_ns(&mut || probes.disk_counters().map(|_| ()))?,
        net_ns: time_ns(&mut || probes.net_counters().map(|_| ()))?,
        disk_entries: probes.disk_counters()?.len(),
        net_entries: probes.net_counters()?.len(),
        copy: copy_cost()?,
    })
}

fn print_reads(r: &Reads) {
    let c = &r.copy;
    println!(
        "lookup, {} possible CPUs: one 8 B array value {:.0} ns; batch of {COPY_KEYS} 8 B values: array {:.1} us, per-CPU array {:.1} us; one per-CPU value of 8 B {:.0} ns, of 32 KiB {:.0} ns => {:.1} ns per CPU copy, {:.3} ns per byte",
        r.ncpus,
        c.fixed_ns,
        c.array_batch_ns / 1e3,
        c.percpu_batch_ns / 1e3,
        c.percpu_small_ns,
        c.percpu_large_ns,
        c.per_cpu_ns,
        c.per_byte_ns,
    );
    println!(
        "shared arrays read through their mapping, no syscall (any CPU count; the agent's round): 16 disks' latency histograms {:.2} us, 32 interfaces' drop counters {:.2} us, TCP counters {:.0} ns, OOM kill total {:.0} ns",
        r.lat_ns / 1e3,
        r.drop_ns / 1e3,
        r.tcp_ns,
        r.oom_ns
    );
    println!(
        "the same read with bpf(2), one BPF_MAP_LOOKUP_BATCH each (the agent's read before the mapping; scratch arrays of the same shape): latency histograms {:.1} us, drop counters {:.1} us; a walk of the OOM map ({} entries), every round before the total, now after a kill only: {:.1} us",
        r.lat_syscall_ns / 1e3,
        r.drop_syscall_ns / 1e3,
        r.oom_entries,
        r.oom_walk_ns / 1e3
    );
    println!(
        "per-CPU counter arrays at {} CPUs: disks ({} slots, one batch) {:.1} us, interfaces ({} slots, one batch) {:.1} us",
        r.ncpus,
        r.disk_entries,
        r.disk_ns / 1e3,
        r.net_entries,
        r.net_ns / 1e3,
    );
    for cpus in [r.ncpus as f64, 256.0] {
        let percpu_ns = r.per_cpu_computed_ns(cpus);
        println!(
            "round at {cpus} CPUs, 16 disks, 32 interfaces: {:.0} us (shared arrays {:.1} us measured, per-CPU counters {:.0} us computed)",
            (r.shared_ns() + percpu_ns) / 1e3,
            r.shared_ns() / 1e3,
            percpu_ns / 1e3
        );
    }
}

/// Keys of the scratch maps' batch reads in [`copy_cost`].
const COPY_KEYS: usize = 1024;

/// What one per-CPU map lookup costs: `fixed + cpus * (per_cpu + bytes * per_byte)` ns, and the
/// scratch-map timings they come from.
struct CopyCost {
    fixed_ns: f64,
    per_cpu_ns: f64,
    per_byte_ns: f64,
    array_batch_ns: f64,
    percpu_batch_ns: f64,
    percpu_small_ns: f64,
    percpu_large_ns: f64,
}

/// The cost of one per-CPU map lookup as `fixed + cpus * (per_cpu + bytes * per_byte)` ns, from
/// scratch maps made here: a batch read of 1,024 8-byte values from a plain array (one copy per
/// key) against a per-CPU array (one copy per key and possible CPU) gives the cost of one CPU's
/// copy; one 32 KiB value against one 8-byte value of a per-CPU array the cost per byte; one
/// lookup of an 8-byte plain array value the syscall's fixed part. A map sized for 256 CPUs
/// cannot be made on a host with fewer: the kernel sizes per-CPU values by its possible CPUs.
fn copy_cost() -> anyhow::Result<CopyCost> {
    const KEYS: usize = COPY_KEYS;
    let ncpus = dcmon_agent::ebpf::maps::possible_cpus()?;
    let read_ns = scratch_read_ns;
    let fixed = read_ns(ARRAY, 8, 1)?;
    let (arr_batch, pc_batch) = (read_ns(ARRAY, 8, KEYS)?, read_ns(PERCPU_ARRAY, 8, KEYS)?);
    let (pc_small, pc_large) = (read_ns(PERCPU_ARRAY, 8, 1)?, read_ns(PERCPU_ARRAY, 32 << 10, 1)?);
    let per_byte = ((pc_large - pc_small) / ncpus as f64 / ((32 << 10) - 8) as f64).max(0.0);
    let per_cpu = ((pc_batch - arr_batch) / KEYS as f64 / (ncpus - 1).max(1) as f64).max(0.0);
    Ok(CopyCost {
        fixed_ns: fixed,
        per_cpu_ns: per_cpu,
        per_byte_ns: per_byte,
        array_batch_ns: arr_batch,
        percpu_batch_ns: pc_batch,
        percpu_small_ns: pc_small,
        percpu_large_ns: pc_large,
    })
}

/// `BPF_MAP_TYPE_ARRAY` and `BPF_MAP_TYPE_PERCPU_ARRAY`.
const ARRAY: u32 = 2;
const PERCPU_ARRAY: u32 = 6;

/// Median ns of reading every key of a new map of `map_type` with `entries` values of
/// `value_size` bytes with bpf(2): one lookup, or one batch for many keys.
fn scratch_read_ns(map_type: u32, value_size: usize, entries: usize) -> anyhow::Result<f64> {
    const LOOKUP_ELEM: libc::c_long = 1;
    const LOOKUP_BATCH: libc::c_long = 24;
    let ncpus = dcmon_agent::ebpf::maps::possible_cpus()?;
    let bpf = |cmd: libc::c_long, attr: &mut [u64]| -> std::io::Result<i64> {
        // SAFETY: `attr` is a zeroed bpf_attr prefix with the command's fields set; every
        // address in it points to a live buffer sized for what the command writes.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr) as u32) };
        if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
    };
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
            "per_cpu_256_ns": r.per_cpu_computed_ns(256.0),
            "per_cpu_copy_ns": r.copy.per_cpu_ns,
            "per_byte_ns": r.copy.per_byte_ns,
            "fixed_ns": r.copy.fixed_ns,
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
