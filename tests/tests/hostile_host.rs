//! The agent on a host that works against it: a FIFO where a procfs file should be, a hung
//! FUSE file (lxcfs) where one should be, and `"ebpf": "off"`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use dcmon_tests::agent::run_once;
use dcmon_tests::batch::{find, metrics};
use dcmon_tests::{AgentConfig, AgentProcess, Receiver, fixture_host, require_root, write_key};
use serde_json::{Value, json};

const KEY: &str = "dcmon_hostileKeyHostileKeyHostileKeyHostileK";
const MACHINE: &str = "hostile-host-machine";

/// Copies the fixture host tree `name` into `to`.
fn copy_fixture(name: &str, to: &Path) {
    let out = Command::new("cp").arg("-a").arg(fixture_host(name)).arg(to).output().expect("cp");
    assert!(out.status.success(), "cp: {}", String::from_utf8_lossy(&out.stderr));
}

/// A copy of the debian12-virtio fixture whose proc/loadavg is a FIFO that nothing writes to.
fn host_with_fifo_loadavg(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("host");
    copy_fixture("debian12-virtio", &root);
    let loadavg = root.join("proc/loadavg");
    std::fs::remove_file(&loadavg).expect("rm loadavg");
    let out = Command::new("mkfifo").arg(&loadavg).output().expect("mkfifo");
    assert!(out.status.success(), "mkfifo: {}", String::from_utf8_lossy(&out.stderr));
    root
}

fn write_config(dir: &Path, settings: Value) -> std::path::PathBuf {
    AgentConfig::without_exporters()
        .extend(json!({
            "machine_id": MACHINE, "collection_interval": 1, "api_key_file": dir.join("api_key"),
            "outbox_dir": dir.join("outbox"),
        }))
        .extend(settings)
        .write(dir)
}

/// `dcmon-agent once`: the batch and the log.
fn once(dir: &Path, config: &Path) -> (Value, String) {
    let (stdout, log) = run_once(dir, config);
    (serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("stdout is not a batch ({e}):\n{log}")), log)
}

/// The os collector fails with the FIFO named, the rest of its batch and the other collectors
/// are reported.
fn assert_only_loadavg_lost(batch: &Value) {
    assert_eq!(find(batch, "cpu_load_1m", ""), None, "no load from a FIFO");
    assert_eq!(find(batch, "dcmon_collector_success", "os"), Some(json!(0)));
    assert!(find(batch, "memory_total_bytes", "").is_some(), "the os collector's other files are read");
    assert_eq!(find(batch, "dcmon_collector_success", "disk"), Some(json!(1)));
    assert_eq!(find(batch, "dcmon_collector_success", "net"), Some(json!(1)));
    assert!(find(batch, "disk_reads_total", "vda").is_some(), "disk counters reported");
    assert!(find(batch, "network_receive_bytes_total", "").is_some(), "network counters reported");
}

#[test]
fn once_with_a_fifo_for_proc_loadavg_finishes_and_reports_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = host_with_fifo_loadavg(dir.path());
    let config = write_config(dir.path(), json!({"host_root": root, "ebpf": "off"}));
    let (batch, log) = once(dir.path(), &config);
    assert_only_loadavg_lost(&batch);
    assert!(
        log.contains(&format!("{}: is a FIFO, expected a regular file", root.join("proc/loadavg").display())),
        "{log}"
    );
}

#[test]
fn run_with_a_fifo_for_proc_loadavg_keeps_sending_and_stops_on_sigterm() {
    let receiver = Receiver::start(&[(KEY, MACHINE)]).expect("receiver");
    let dir = tempfile::tempdir().expect("tempdir");
    write_key(dir.path(), KEY).expect("key");
    let root = host_with_fifo_loadavg(dir.path());
    let config = write_config(dir.path(), json!({"host_root": root, "ebpf": "off", "server_url": receiver.url()}));
    let mut agent = AgentProcess::start(dir.path(), &config, &["run"]).expect("agent");
    let accepted = receiver.wait_for_accepted(3, Duration::from_secs(15));
    assert!(accepted.len() >= 3, "{} batches in 15 s:\n{}", accepted.len(), agent.stderr());
    for a in &accepted {
        assert_only_loadavg_lost(&a.json);
    }
    let started = Instant::now();
    let status = agent.signal_and_wait("TERM", Duration::from_secs(5));
    let log = agent.stderr();
    assert!(status.is_some_and(|s| s.success()), "no clean exit within 5 s of SIGTERM:\n{log}");
    eprintln!("exited {:?} after SIGTERM", started.elapsed());
    let failures = log.lines().filter(|l| l.contains("is a FIFO, expected a regular file")).count();
    assert_eq!(failures, 1, "the failure is logged once, not every round:\n{log}");
}

/// /proc/loadavg is a FUSE file whose daemon hangs once it is opened (see
/// [`common::fuse::HungFuseFile`]), /proc/stat and /proc/meminfo are the real procfs ones: the
/// os collector sees a file that is not procfs, runs on a thread, and its hung read is
/// abandoned at the collector timeout each round while the other collectors' batches go out;
/// SIGTERM still stops the agent. Without the filesystem check the read hangs the runtime thread:
/// no batch, no SIGTERM.
#[test]
fn run_with_a_hung_fuse_file_for_proc_loadavg_keeps_sending_and_stops_on_sigterm() {
    use common::fuse::{BindMount, HungFuseFile};
    require_root("mounting FUSE and bind mounts");
    let receiver = Receiver::start(&[(KEY, MACHINE)]).expect("receiver");
    let dir = tempfile::tempdir().expect("tempdir");
    write_key(dir.path(), KEY).expect("key");
    let root = dir.path().join("host");
    copy_fixture("debian12-virtio", &root);
    // Declared first, so dropped last: a read the daemon holds keeps a killed agent from
    // exiting until the mount's drop has answered it.
    let mut agent: AgentProcess;
    let fuse = HungFuseFile::mount(&root.join("proc/loadavg"));
    let _procfs: Vec<BindMount> = ["stat", "meminfo"]
        .iter()
        .map(|f| BindMount::new(&Path::new("/proc").join(f), &root.join("proc").join(f)))
        .collect();
    let settings = json!({"host_root": root, "ebpf": "off", "server_url": receiver.url(), "collector_timeout": 1});
    let config = write_config(dir.path(), settings);
    agent = AgentProcess::start(dir.path(), &config, &["run"]).expect("agent");
    let accepted = receiver.wait_for_accepted(3, Duration::from_secs(15));
    assert!(accepted.len() >= 3, "{} batches in 15 s:\n{}", accepted.len(), agent.stderr());
    for a in &accepted {
        let batch = &a.json;
        assert_eq!(find(batch, "dcmon_collector_success", "os"), Some(json!(0)), "the hung read is abandoned");
        assert_eq!(find(batch, "cpu_load_1m", ""), None);
        assert_eq!(find(batch, "dcmon_collector_success", "disk"), Some(json!(1)));
        assert_eq!(find(batch, "dcmon_collector_success", "net"), Some(json!(1)));
        assert!(find(batch, "disk_reads_total", "vda").is_some(), "disk counters reported");
    }
    assert!(fuse.statfs_answered() >= 1, "the agent asked for the file's filesystem");
    let started = Instant::now();
    let status = agent.signal_and_wait("TERM", Duration::from_secs(5));
    let log = agent.stderr();
    assert!(status.is_some_and(|s| s.success()), "no clean exit within 5 s of SIGTERM:\n{log}");
    eprintln!("exited {:?} after SIGTERM", started.elapsed());
    let count = |text: &str| log.lines().filter(|l| l.contains(text)).count();
    let on_fuse = format!("{} is on FUSE, not procfs or sysfs", root.join("proc/loadavg").display());
    assert_eq!(count(&on_fuse), 1, "said once:\n{log}");
    assert_eq!(count("timed out after 1s"), 1, "the timeout is logged once:\n{log}");
    assert_eq!(count("not started again"), 1, "not restarted while the read hangs, logged once:\n{log}");
}

#[test]
fn ebpf_off_means_no_ebpf_collector_at_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = fixture_host("debian12-virtio");
    let config = write_config(dir.path(), json!({"host_root": root, "ebpf": "off"}));
    let (batch, log) = once(dir.path(), &config);
    let ebpf: Vec<&Value> = metrics(&batch)
        .iter()
        .filter(|m| {
            m["labels"]["collector"] == "ebpf" || m["name"].as_str().is_some_and(|n| n.starts_with("dcmon_ebpf_"))
        })
        .collect();
    assert!(ebpf.is_empty(), "\"ebpf\": \"off\" still reports {ebpf:?}\n{log}");
    assert_eq!(find(&batch, "dcmon_collector_success", "os"), Some(json!(1)));

    // "auto" on a host root where eBPF cannot count (no /proc/self/ns/net in the fixture):
    // the status collector says procfs mode.
    let config = write_config(dir.path(), json!({"host_root": root, "ebpf": "auto"}));
    let (batch, log) = once(dir.path(), &config);
    assert_eq!(find(&batch, "dcmon_ebpf_active", "").and_then(|v| v.as_f64()), Some(0.0), "{log}");
    assert_eq!(find(&batch, "dcmon_collector_success", "ebpf"), Some(json!(1)), "{log}");
}

/// A FUSE mount whose daemon answers one statfs and then nothing (a hung network filesystem):
/// the filesystems collector reports it as failed after its 2 s statfs timeout once, then at
/// once every round, while every batch, with the root filesystem's numbers, goes out on the
/// 1 s cadence; SIGTERM still stops the agent.
#[test]
fn run_with_a_hung_fuse_mount_keeps_the_cadence_and_reports_it_failed() {
    use common::fuse::HungFuseFile;
    require_root("mounting FUSE");
    let receiver = Receiver::start(&[(KEY, MACHINE)]).expect("receiver");
    let dir = tempfile::tempdir().expect("tempdir");
    write_key(dir.path(), KEY).expect("key");
    let hung = dir.path().join("hung-mount");
    std::fs::write(&hung, "").expect("touch");
    let mut agent: AgentProcess;
    let fuse = HungFuseFile::mount(&hung);
    let hung_s = hung.display().to_string();
    let settings = json!({
        "ebpf": "off", "server_url": receiver.url(),
        "filesystems": {"mount_points": {"include": ["/", hung_s]}, "fstypes": {"include": ["*"]}, "timeout": 2},
    });
    let config = write_config(dir.path(), settings);
    agent = AgentProcess::start(dir.path(), &config, &["run"]).expect("agent");
    let accepted = receiver.wait_for_accepted(7, Duration::from_secs(30));
    assert!(accepted.len() >= 7, "{} batches in 30 s:\n{}", accepted.len(), agent.stderr());
    for a in &accepted {
        assert!(find(&a.json, "filesystem_size_bytes", "/").is_some(), "root filesystem reported");
        assert_eq!(find(&a.json, "dcmon_collector_success", "filesystems"), Some(json!(1)));
    }
    let hung_ok: Vec<Option<Value>> = accepted.iter().map(|a| find(&a.json, "filesystem_statfs_ok", &hung_s)).collect();
    assert!(hung_ok[3..].iter().all(|v| *v == Some(json!(0))), "{hung_ok:?}");
    // The fixed cadence holds once the hang is known: batches a second apart (the median, so
    // one late post on a loaded machine does not count; waiting out the 2 s statfs timeout
    // every round would put them 2-3 s apart).
    let mut gaps: Vec<Duration> = accepted[3..].windows(2).map(|p| p[1].at - p[0].at).collect();
    gaps.sort();
    let took: Vec<Option<Value>> =
        accepted.iter().map(|a| find(&a.json, "dcmon_collector_duration_seconds", "filesystems")).collect();
    let stamps: Vec<Option<Value>> = accepted.iter().map(|a| a.json.get("timestamp").cloned()).collect();
    assert!(
        gaps[gaps.len() / 2] < Duration::from_millis(1500),
        "batches apart: {gaps:?}; filesystems took {took:?}; timestamps {stamps:?}\n{}",
        agent.stderr()
    );
    assert!(fuse.statfs_answered() >= 1);
    let status = agent.signal_and_wait("TERM", Duration::from_secs(5));
    let log = agent.stderr();
    assert!(status.is_some_and(|s| s.success()), "no clean exit within 5 s of SIGTERM:\n{log}");
    let warned = log.lines().filter(|l| l.contains(&format!("statfs of {hung_s}"))).count();
    assert_eq!(warned, 1, "the hang is logged once:\n{log}");
}
