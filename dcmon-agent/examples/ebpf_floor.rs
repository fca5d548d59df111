//! How much of the programs' in-kernel time per run is their own work. Run as root:
//! `cargo run --release -p dcmon-agent --example ebpf_floor`
//!
//! bpf_stats (`kernel.bpf_stats_enabled`) times each program run with two clock reads, which
//! are part of the ns per run it reports. An empty `tp_btf` program (`r0 = 0; exit`, loaded here
//! with raw bpf(2) calls) on the same tracepoint, run by the same packets and reads, costs those
//! clock reads and the program entry and nothing else: the programs' ns per run minus the empty
//! one's is the work they do per event. Rounds alternate: the empty programs attached alone,
//! then dcmon's alone. Prints numbers; it is not a timed test.
#![allow(clippy::print_stdout, reason = "a benchmark prints its numbers")]

use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;

use anyhow::{Context as _, bail};
use dcmon_agent::ebpf::Probes;
use dcmon_agent::ebpf::btf::Btf;
use dcmon_agent::ebpf::maps::prog_counters;

const ROUNDS: usize = 5;
const PACKETS: usize = 100_000;
const READS: usize = 20_000;
/// The tracepoints compared: the per-packet and per-completion ones.
const TRACEPOINTS: [&str; 4] = ["netif_receive_skb", "net_dev_xmit", "block_rq_issue", "block_rq_complete"];

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

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a live, initialized bpf_attr member of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: bpf(2) returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// An empty tp_btf program attached to `tracepoint`: (program, link); dropping both detaches it.
fn attach_empty(btf: &Btf<'_>, tracepoint: &str) -> anyhow::Result<(OwnedFd, OwnedFd)> {
    let btf_id = btf.tracepoint_type_id(tracepoint).with_context(|| format!("no btf_trace_{tracepoint} in BTF"))?;
    // r0 = 0; exit
    let insns: [u64; 2] =
        [u64::from_le_bytes([0xb7, 0, 0, 0, 0, 0, 0, 0]), u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0])];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..11].copy_from_slice(b"dcmon_empty");
    let mut log = vec![0u8; 4096];
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_TRACING,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: name,
        expected_attach_type: BPF_TRACE_RAW_TP,
        attach_btf_id: btf_id,
        ..ProgLoadAttr::default()
    };
    let prog = bpf(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        anyhow::anyhow!("BPF_PROG_LOAD of an empty tp_btf/{tracepoint}: {e}: {}", String::from_utf8_lossy(&log[..end]))
    })?;
    let mut open = RawTracepointAttr { name: 0, prog_fd: prog.as_raw_fd() as u32, _pad: 0 };
    let link =
        bpf(BPF_RAW_TRACEPOINT_OPEN, &mut open).with_context(|| format!("attaching the empty tp_btf/{tracepoint}"))?;
    Ok((prog, link))
}

fn udp_loopback() -> anyhow::Result<()> {
    let rx = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let tx = std::net::UdpSocket::bind("127.0.0.1:0")?;
    tx.connect(rx.local_addr()?)?;
    let (payload, mut buf) = ([0u8; 64], [0u8; 128]);
    for _ in 0..PACKETS {
        tx.send(&payload)?;
        rx.recv(&mut buf)?;
    }
    Ok(())
}

fn direct_reads(dev: &str) -> anyhow::Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .with_context(|| format!("open {dev} O_DIRECT"))?;
    let layout = std::alloc::Layout::from_size_align(4096, 4096)?;
    // SAFETY: non-zero size; freed below with the same layout.
    let buf = unsafe { std::alloc::alloc_zeroed(layout) };
    let mut result = Ok(());
    for i in 0..READS {
        let off = ((i * 7919) % 16384) * 4096;
        // SAFETY: 4 KiB aligned buffer, open fd.
        let n = unsafe { libc::pread(f.as_raw_fd(), buf.cast(), 4096, off as libc::off_t) };
        if n != 4096 {
            result = Err(anyhow::anyhow!("pread {dev}: {}", io::Error::last_os_error()));
            break;
        }
    }
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(buf, layout) };
    result
}

fn workload(dev: &str) -> anyhow::Result<()> {
    udp_loopback()?;
    direct_reads(dev)
}

fn sh(cmd: &[&str]) -> anyhow::Result<String> {
    let out =
        std::process::Command::new(cmd[0]).args(&cmd[1..]).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let data = std::fs::read("/sys/kernel/btf/vmlinux").context("reading /sys/kernel/btf/vmlinux")?;
    let btf = Btf::parse(&data).context("parsing the kernel's BTF")?;
    let image = tempfile::NamedTempFile::new()?;
    image.as_file().set_len(64 << 20)?;
    let dev = sh(&["losetup", "--find", "--show", "--direct-io=off", &image.path().to_string_lossy()])?;
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _detach = Detach(dev.clone());
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    workload(&dev)?; // warm-up
    let (mut empty, mut ours) = (vec![Vec::new(); TRACEPOINTS.len()], vec![Vec::new(); TRACEPOINTS.len()]);
    for _ in 0..ROUNDS {
        let attached: Vec<_> = TRACEPOINTS.iter().map(|tp| attach_empty(&btf, tp)).collect::<Result<_, _>>()?;
        let before: Vec<_> = attached.iter().map(|(p, _)| prog_counters(p.as_fd())).collect::<Result<_, _>>()?;
        workload(&dev)?;
        for (i, ((p, _), b)) in attached.iter().zip(&before).enumerate() {
            let a = prog_counters(p.as_fd())?;
            empty[i].push((a.run_time_ns - b.run_time_ns) as f64 / (a.run_count - b.run_count).max(1) as f64);
        }
        drop(attached);
        let probes = Probes::attach(None)?;
        let before = probes.program_stats()?;
        workload(&dev)?;
        let after = probes.program_stats()?;
        for (i, tp) in TRACEPOINTS.iter().enumerate() {
            let find = |s: &[dcmon_agent::ebpf::ProgramStats]| {
                s.iter().find(|p| p.program == *tp).map(|p| (p.run_time_ns, p.run_count))
            };
            let ((t0, n0), (t1, n1)) = (
                find(&before).with_context(|| format!("{tp} not attached"))?,
                find(&after).with_context(|| format!("{tp} not attached"))?,
            );
            ours[i].push((t1 - t0) as f64 / (n1 - n0).max(1) as f64);
        }
    }
    for (i, tp) in TRACEPOINTS.iter().enumerate() {
        let range = |v: &[f64]| v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        let ((elo, ehi), (olo, ohi)) = (range(&empty[i]), range(&ours[i]));
        let (e, o) = (median(empty[i].clone()), median(ours[i].clone()));
        println!(
            "{tp}: empty program {e:.1} ns/run [{elo:.1}-{ehi:.1}], dcmon's {o:.1} [{olo:.1}-{ohi:.1}]: its own work {:.1} ns per event (medians of {ROUNDS} alternating rounds, bpf_stats on)",
            o - e
        );
    }
    Ok(())
}
