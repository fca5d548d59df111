//! Each BPF program optional: on a kernel that lacks one program's tracepoint the agent loads
//! the others, `check` names the one left out and why, and disk and network I/O each fall back
//! to procfs alone when their own programs cannot load.
//!
//! The kernel lacks the tracepoint as far as the agent can tell: the host root (`host_root`,
//! where the agent reads /proc and /sys) mirrors this host but for a copy of the kernel's BTF
//! in which that tracepoint's `btf_trace_<name>` typedef is renamed, so the real load and
//! attach path finds no attach target for it. Needs root (see tests/ebpf.rs).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use dcmon_agent::batch::{Batch, Labels};
use dcmon_agent::config::{Config, DeviceFilter, EbpfMode, Exporters, Loaded};
use dcmon_agent::filter::PatternList;

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// A host root that is this host's `/` but for `sys/kernel/btf/vmlinux`, a copy of the
/// kernel's BTF without tracepoint `tracepoint`; None (a skip) where the kernel has no BTF.
fn host_root_without(tracepoint: &str) -> Option<tempfile::TempDir> {
    common::require_root("loading BPF programs");
    let Ok(mut btf) = std::fs::read(VMLINUX) else {
        assert!(!dcmon_tests::ebpf_required(), "DCMON_REQUIRE_EBPF=1 but {VMLINUX} is unreadable");
        eprintln!("SKIP: no {VMLINUX}");
        return None;
    };
    // Same length, so every other string offset stays: the last letter becomes a '#'.
    let name = format!("\0btf_trace_{tracepoint}\0");
    let at: Vec<usize> =
        btf.windows(name.len()).enumerate().filter(|(_, w)| *w == name.as_bytes()).map(|(i, _)| i).collect();
    assert_eq!(at.len(), 1, "{name:?} once in the string section");
    btf[at[0] + name.len() - 2] = b'#';
    Some(mirror_host_root(|vmlinux| std::fs::write(vmlinux, &btf).expect("write the BTF copy")))
}

/// A host root that is this host's `/` but for `sys/kernel/btf/vmlinux`, which `make_btf`
/// creates.
fn mirror_host_root(make_btf: impl FnOnce(&Path)) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    // Each level down to the BTF is a directory of links to the real entries, less the one
    // replaced below it.
    let mut dir = root.path().to_owned();
    for (real, keep_out) in [("/", "sys"), ("/sys", "kernel"), ("/sys/kernel", "btf"), ("/sys/kernel/btf", "vmlinux")] {
        std::fs::create_dir_all(&dir).expect("mkdir");
        for entry in std::fs::read_dir(real).expect("list") {
            let entry = entry.expect("entry");
            if entry.file_name() != keep_out {
                std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name())).expect("symlink");
            }
        }
        dir.push(keep_out);
    }
    make_btf(&dir);
    root
}

fn match_all() -> DeviceFilter {
    DeviceFilter { include: PatternList::match_all(), exclude: PatternList::default() }
}

fn config(root: &Path) -> Config {
    Config {
        ebpf: EbpfMode::Auto,
        host_root: root.to_owned(),
        machine_id: Some("ebpf-partial-test".into()),
        dcmon_output: false,
        disks: match_all(),
        interfaces: match_all(),
        exporters: Exporters::none(),
        ..Config::default()
    }
}

async fn check_text(config: Config) -> String {
    let loaded = Loaded { config, unknown_keys: Vec::new(), from_file: true };
    let report = dcmon_agent::check::check(Path::new("config.json"), Ok(loaded)).await;
    eprintln!("{}", report.text);
    report.text
}

/// `dcmon_ebpf_program_attached` by program.
fn attached(batch: &Batch) -> BTreeMap<String, f64> {
    batch
        .samples()
        .iter()
        .filter(|s| s.name == "dcmon_ebpf_program_attached")
        .map(|s| (s.labels.iter().map(|(_, v)| v.to_string()).collect(), s.value.as_f64()))
        .collect()
}

/// Builds the collectors for `config` as the daemon does, checks which of disk and net hold
/// BPF programs, and runs a round: each series once, disk and network series present.
async fn one_round(config: &Config, disk_on_ebpf: bool, net_on_ebpf: bool) -> Batch {
    let collectors = dcmon_agent::collector::build(config).expect("build");
    let on_ebpf = |name: &str| collectors.iter().any(|c| c.name() == name && c.uses_bpf_programs());
    assert_eq!((on_ebpf("disk"), on_ebpf("net")), (disk_on_ebpf, net_on_ebpf), "(disk, net) on eBPF");
    assert_eq!(collectors.iter().filter(|c| c.name() == "disk").count(), 1);
    assert_eq!(collectors.iter().filter(|c| c.name() == "net").count(), 1);
    let mut scheduler = dcmon_agent::agent::Scheduler::new(collectors, "m".into(), Duration::from_secs(5));
    let batch = scheduler.collect(1).await;
    let mut series: HashMap<(&str, &Labels), usize> = HashMap::new();
    for s in batch.samples() {
        *series.entry((s.name, &s.labels)).or_default() += 1;
    }
    let repeated: Vec<_> = series.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "series reported more than once: {repeated:?}");
    for name in ["disk_reads_total", "network_receive_bytes_total", "network_transmit_bytes_total"] {
        assert!(series.keys().any(|(n, _)| *n == name), "no {name}");
    }
    let success = |collector: &str| {
        let s = batch.samples().iter().filter(|s| s.name == "dcmon_collector_success");
        s.filter(|s| s.labels.iter().any(|(_, v)| v == collector)).map(|s| s.value.as_f64()).collect::<Vec<_>>()
    };
    for collector in ["disk", "net", "ebpf"] {
        assert_eq!(success(collector), [1.0], "dcmon_collector_success{{collector={collector:?}}}");
    }
    batch
}

#[tokio::test]
async fn check_names_the_program_left_out_and_why() {
    let Some(root) = host_root_without("kfree_skb") else { return };
    let text = check_text(config(root.path())).await;
    assert!(
        text.contains("[ OK ] eBPF: programs load and attach: disk and network I/O counted in the kernel\n"),
        "{text}"
    );
    let left_out: Vec<&str> = text.lines().filter(|l| l.contains("eBPF program")).collect();
    assert_eq!(left_out.len(), 1, "one line for the one program left out, none repeated: {text}");
    assert!(
        left_out[0].starts_with(
            "[WARN] eBPF program kfree_skb: not loaded, its metrics are absent: a tracepoint the programs \
             need is missing in this kernel: program kfree_skb (tp_btf/kfree_skb): load:"
        ),
        "{text}"
    );
    assert!(left_out[0].contains("btf_trace_kfree_skb"), "{text}");
    let batch = one_round(&config(root.path()), true, true).await;
    let attached = attached(&batch);
    assert_eq!(attached.len(), dcmon_common::ebpf::PROGRAMS.len(), "{attached:?}");
    for (program, value) in attached {
        assert_eq!(value, if program == "kfree_skb" { 0.0 } else { 1.0 }, "{program}");
    }
    let active: Vec<f64> =
        batch.samples().iter().filter(|s| s.name == "dcmon_ebpf_active").map(|s| s.value.as_f64()).collect();
    assert_eq!(active, [1.0]);
}

/// Without `block_rq_issue` the disk side stays on eBPF and the completion still times what the
/// kernel stamps: `check` says so (not the issue-time path as if every request were timed),
/// and a round reports the latency overflow count with the histograms.
#[tokio::test]
async fn check_says_what_is_timed_without_the_issue_program() {
    let Some(root) = host_root_without("block_rq_issue") else { return };
    let facts = dcmon_agent::ebpf::load::kernel_facts(Path::new(VMLINUX)).expect("kernel BTF");
    let [io_start, queue_flags, stats_flag] = facts.stamp_facts;
    let (stamps, _) = dcmon_common::ebpf::issue_stamps(io_start, queue_flags, stats_flag, true);
    let text = check_text(config(root.path())).await;
    assert!(
        text.contains("[ OK ] eBPF: programs load and attach: disk and network I/O counted in the kernel\n"),
        "{text}"
    );
    let latency: Vec<&str> = text.lines().filter(|l| l.contains("eBPF I/O latency")).collect();
    let timed = if stamps == dcmon_common::ebpf::IssueStamps::Table {
        "[WARN] eBPF I/O latency: not timed: "
    } else {
        "[WARN] eBPF I/O latency: only requests the kernel stamps itself are timed (io_start_time_ns, on queues \
         with QUEUE_FLAG_STATS, which writeback throttling turns on); those of other queues are not, as \
         block_rq_issue did not load: a tracepoint the programs need is missing in this kernel: program \
         block_rq_issue (tp_btf/block_rq_issue): load:"
    };
    assert!(latency.len() == 1 && latency[0].starts_with(timed), "{stamps:?}: {text}");
    // Its own line says what is lost: not "its metrics", which the completion still sends.
    let lost = if stamps == dcmon_common::ebpf::IssueStamps::Table {
        "no I/O latency is measured"
    } else {
        "the latency of requests the kernel does not stamp itself is not measured"
    };
    let line = format!(
        "[WARN] eBPF program block_rq_issue: not loaded, {lost} (see the I/O latency line): a tracepoint the \
         programs need is missing in this kernel: program block_rq_issue (tp_btf/block_rq_issue): load:"
    );
    let program_lines: Vec<&str> = text.lines().filter(|l| l.contains("eBPF program")).collect();
    assert!(program_lines.len() == 1 && program_lines[0].starts_with(&line), "{stamps:?}: no {line:?} in {text}");
    let batch = one_round(&config(root.path()), true, true).await;
    let overflow = batch.samples().iter().filter(|s| {
        s.name == "dcmon_ebpf_overflow_total" && s.labels.iter().any(|(k, v)| *k == "map" && v == "disk_latency")
    });
    let expected = usize::from(stamps != dcmon_common::ebpf::IssueStamps::Table);
    assert_eq!(overflow.count(), expected, "{stamps:?}: the latency overflow count is sent when requests are timed");
}

/// Without `program`'s tracepoint, the side it counts (`on_ebpf`, "disk" or "network") stays on
/// eBPF and the other (`on_procfs`) is read from procfs, as `check` says and a round shows;
/// `"on"` refuses to run so. `left_with_it` are the programs that only work for `program`: they
/// are not attached either, each with its own line.
async fn one_side_falls_back(program: &str, left_with_it: &[&str], on_ebpf: &str, on_procfs: &str) {
    let Some(root) = host_root_without(program) else { return };
    let text = check_text(config(root.path())).await;
    let lines = [
        format!("[WARN] eBPF: {on_ebpf} I/O counted in the kernel, {on_procfs} I/O from procfs (why: below)\n"),
        format!("[WARN] eBPF program {program}: not loaded, its metrics are absent: a tracepoint"),
        format!("[WARN] collectors: eBPF counts {on_ebpf} I/O, {on_procfs} I/O is read from procfs: a tracepoint"),
    ];
    let left_with_it_lines = left_with_it.iter().map(|other| {
        format!(
            "[WARN] eBPF program {other}: not loaded, its metrics are absent: a tracepoint the programs need is \
             missing in this kernel: program {other} (tp_btf/{other}): left out, it only works for {program}, which \
             did not load: "
        )
    });
    for line in lines.into_iter().chain(left_with_it_lines) {
        assert!(text.contains(&line), "no {line:?} in {text}");
    }
    let batch = one_round(&config(root.path()), on_ebpf == "disk", on_ebpf == "network").await;
    let attached = attached(&batch);
    let not_attached: Vec<&str> = attached.iter().filter(|(_, v)| **v == 0.0).map(|(p, _)| p.as_str()).collect();
    let mut expected: Vec<&str> = left_with_it.iter().copied().chain([program]).collect();
    expected.sort_unstable();
    assert_eq!(not_attached, expected, "{attached:?}");
    let on = Config { ebpf: EbpfMode::On, ..config(root.path()) };
    let e = dcmon_agent::collector::build(&on).err().expect("\"on\" refuses I/O from procfs");
    assert!(format!("{e:#}").contains(program), "{e:#}");
}

#[tokio::test]
async fn disk_falls_back_alone_when_its_program_cannot_load() {
    one_side_falls_back("block_rq_complete", &["block_rq_issue"], "network", "disk").await;
}

#[tokio::test]
async fn network_falls_back_alone_when_its_program_cannot_load() {
    one_side_falls_back("net_dev_xmit", &[], "disk", "network").await;
}

/// A host root whose `sys/kernel/btf/vmlinux` is a FIFO: the agent reads the kernel's own BTF
/// instead of waiting forever on the FIFO, and eBPF works.
#[test]
fn a_fifo_in_place_of_the_host_roots_btf_is_not_read() {
    common::require_root("loading BPF programs");
    if !Path::new(VMLINUX).exists() {
        assert!(!dcmon_tests::ebpf_required(), "DCMON_REQUIRE_EBPF=1 but there is no {VMLINUX}");
        return eprintln!("SKIP: no {VMLINUX}");
    }
    let root = mirror_host_root(|vmlinux| {
        let status = std::process::Command::new("mkfifo").arg(vmlinux).status().expect("mkfifo");
        assert!(status.success(), "mkfifo {}", vmlinux.display());
    });
    let config = Config { ebpf: EbpfMode::On, ..config(root.path()) };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(dcmon_agent::collector::build(&config).map(|c| c.len())));
    let built = rx.recv_timeout(Duration::from_secs(60)).expect("build returned (the FIFO was not read)");
    assert!(built.is_ok(), "{built:?}");
}
