//! Nothing lost: an outage, a crash, torn files, an unwritable or full outbox and a second
//! agent, with the real agent binary against the test receiver. The retry policy (no answer,
//! 5xx, Retry-After, 4xx, 401/403 and the key re-read, poison batches, shutdown mid-send) is
//! tested in paused time by deliver.rs's unit tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dcmon_agent::agent::phase_offset;
use dcmon_tests::{Accepted, AgentConfig, AgentProcess, Receiver, wait_until, write_key};
use serde_json::{Value, json};

const KEY: &str = "dcmon_deliveryKeyDeliveryKeyDeliveryKeyDeliv";

/// A machine id whose 1 s phase is mid-second, so every tick's timestamp is exactly one more
/// than the last and a missing second is a missing batch.
fn machine_id() -> String {
    (0..)
        .map(|n| format!("delivery-test-{n}"))
        .find(|id| (300..700).contains(&phase_offset(id, Duration::from_secs(1)).as_millis()))
        .unwrap_or_default()
}

/// A receiver that accepts `KEY` for a fresh machine id, and a folder holding the key.
fn set_up() -> (String, Receiver, tempfile::TempDir) {
    let machine = machine_id();
    let receiver = Receiver::start(&[(KEY, &machine)]).expect("receiver");
    let dir = tempfile::tempdir().expect("tempdir");
    write_key(dir.path(), KEY).expect("key");
    (machine, receiver, dir)
}

/// The agent's config in `dir` (1 s rounds, short timeouts, no exporters), `extra` on top.
fn config(dir: &Path, server: &str, machine: &str, extra: Value) -> PathBuf {
    AgentConfig::without_exporters()
        .extend(json!({
            "server_url": server,
            "collection_interval": 1,
            "machine_id": machine,
            "api_key_file": dir.join("api_key"),
            "outbox_dir": dir.join("outbox"),
            "retry_max_backoff": 2,
            "connect_timeout": 1,
            "upload_timeout": 3,
        }))
        .extend(extra)
        .write(dir)
}

fn timestamps(batches: &[Accepted]) -> Vec<i64> {
    batches.iter().filter_map(|b| b.json["timestamp"].as_i64()).collect()
}

/// Every second from the first to the last delivered timestamp arrived, in order; returns how
/// many arrived twice.
fn assert_complete_in_order(ts: &[i64]) -> usize {
    let mut seen = BTreeMap::new();
    for t in ts {
        *seen.entry(*t).or_insert(0) += 1;
    }
    let distinct: Vec<i64> = seen.keys().copied().collect();
    for w in distinct.windows(2) {
        assert_eq!(w[1] - w[0], 1, "a second is missing between {} and {}: {ts:?}", w[0], w[1]);
    }
    let mut first_seen: Vec<i64> = Vec::new();
    for t in ts {
        if !first_seen.contains(t) {
            first_seen.push(*t);
        }
    }
    assert_eq!(first_seen, distinct, "delivered out of order: {ts:?}");
    seen.values().filter(|&&n| n > 1).count()
}

/// Timestamps of the batches waiting in the outbox at `dir`, oldest first.
fn outbox_timestamps(dir: &Path) -> Vec<i64> {
    dcmon_agent::outbox::inspect(dir).expect("read the outbox").iter().map(|b| b.timestamp).collect()
}

/// Wait until the outbox at `dir` holds at least `count` batches (a loaded host can take
/// seconds to start: eBPF loading, the first tick's phase), or fail with the agent's log.
fn wait_for_stored(dir: &Path, count: usize, agent: &AgentProcess) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while dcmon_agent::outbox::inspect(dir).map_or(0, |b| b.len()) < count {
        assert!(std::time::Instant::now() < deadline, "fewer than {count} batches stored in 30 s:\n{}", agent.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Everything accepted, once a batch stamped after `second` has arrived (or `None` at timeout).
fn accepted_past(receiver: &Receiver, second: i64, timeout: Duration) -> Option<Vec<Accepted>> {
    wait_until(timeout, || {
        let got = receiver.accepted();
        (timestamps(&got).iter().max().copied()? > second).then_some(got)
    })
}

fn unix_now() -> i64 {
    dcmon_agent::agent::unix_now_secs()
}

#[test]
fn outage_503_then_recovery_delivers_every_batch_in_order() {
    let (machine, receiver, dir) = set_up();
    let agent = AgentProcess::start(dir.path(), &config(dir.path(), &receiver.url(), &machine, json!({})), &["run"])
        .expect("agent");
    assert!(receiver.wait_for_accepted(2, Duration::from_secs(10)).len() >= 2, "{}", agent.stderr());

    receiver.force_status(Some(503));
    let outage_start = unix_now();
    std::thread::sleep(Duration::from_secs(10));
    let outage_end = unix_now();
    receiver.force_status(None);
    let recovered = std::time::Instant::now();

    let done = accepted_past(&receiver, outage_end + 2, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no recovery: {:?}\n{}", timestamps(&receiver.accepted()), agent.stderr()));
    let ts = timestamps(&done);
    let dups = assert_complete_in_order(&ts);
    assert_eq!(dups, 0, "no 2xx was cut off, so nothing may arrive twice: {ts:?}");
    assert!(ts.iter().any(|t| *t <= outage_start) && ts.iter().any(|t| *t >= outage_end), "{ts:?}");
    let during = ts.iter().filter(|t| (outage_start + 1..outage_end).contains(*t)).count();
    assert!(during >= 8, "batches collected during the 10 s outage: {during}: {ts:?}");
    assert!(receiver.rejected().iter().all(|r| r.status == 503));
    // Catch-up: from recovery until the last batch of the outage arrived.
    let caught_up = done.iter().find(|b| b.json["timestamp"].as_i64() == Some(outage_end - 1)).map(|b| b.at);
    let took = caught_up.map_or(Duration::ZERO, |at| at.saturating_duration_since(recovered));
    eprintln!(
        "outage 503: {} batches delivered, {during} from the outage, 0 lost, {dups} duplicates; backlog delivered {took:.2?} after recovery",
        ts.len()
    );
}

#[test]
fn kill_9_during_an_outage_loses_nothing() {
    let (machine, receiver, dir) = set_up();
    let cfg = config(dir.path(), &receiver.url(), &machine, json!({}));
    receiver.force_status(Some(503));
    let mut agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("agent");
    wait_for_stored(&dir.path().join("outbox"), 4, &agent);
    assert!(agent.signal_and_wait("KILL", Duration::from_secs(5)).is_some());
    let stored = outbox_timestamps(&dir.path().join("outbox"));
    assert!(stored.len() >= 4, "batches on disk at the kill: {stored:?}");

    let agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("restart");
    std::thread::sleep(Duration::from_secs(2));
    receiver.force_status(None);
    let last_stored = *stored.last().expect("stored");
    let got = accepted_past(&receiver, last_stored + 3, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no delivery after restart:\n{}", agent.stderr()));
    let ts = timestamps(&got);
    let missing: Vec<i64> = stored.iter().copied().filter(|t| !ts.contains(t)).collect();
    assert!(missing.is_empty(), "lost across kill -9: {missing:?} (delivered {ts:?})");
    assert_eq!(ts[..stored.len()], stored[..], "the backlog goes first, oldest first");
    eprintln!("kill -9: {} batches on disk at the kill, all delivered after restart", stored.len());
}

#[test]
fn torn_and_corrupt_outbox_records_are_reported_and_the_rest_delivered() {
    let (machine, receiver, dir) = set_up();
    let cfg = config(dir.path(), &receiver.url(), &machine, json!({}));
    receiver.force_status(Some(503));
    let mut agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("agent");
    wait_for_stored(&dir.path().join("outbox"), 4, &agent);
    let status = agent.signal_and_wait("TERM", Duration::from_secs(10)).expect("exit on SIGTERM");
    assert!(status.success(), "SIGTERM exit: {status:?}\n{}", agent.stderr());
    let outbox = dir.path().join("outbox");
    let stored = outbox_timestamps(&outbox);
    assert!(stored.len() >= 4, "outbox kept after SIGTERM: {stored:?}");
    let segment: PathBuf = std::fs::read_dir(&outbox)
        .expect("outbox")
        .filter_map(|e| Some(e.ok()?.path()))
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .expect("a segment file");
    // Records are lines: batch i is lines 2i (header) and 2i+1 (body). Damage the second
    // batch's body and cut the last batch in half, as a power loss during its write would.
    let mut data = std::fs::read(&segment).expect("read");
    let newlines: Vec<usize> = data.iter().enumerate().filter(|(_, b)| **b == b'\n').map(|(i, _)| i).collect();
    assert_eq!(newlines.len(), stored.len() * 2, "one record per stored batch, none delivered");
    let i = newlines[2] + 10;
    data[i] = data[i].wrapping_add(1);
    let last_body = newlines[newlines.len() - 2] + 1;
    data.truncate(last_body + (data.len() - last_body) / 2);
    std::fs::write(&segment, data).expect("damage the segment");
    let intact: Vec<i64> =
        stored.iter().enumerate().filter(|(i, _)| *i != 1 && *i != stored.len() - 1).map(|(_, t)| *t).collect();

    receiver.force_status(None);
    let agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("restart");
    let got = receiver.wait_for_accepted(intact.len() + 2, Duration::from_secs(15));
    let ts = timestamps(&got);
    assert_eq!(ts[..intact.len()], intact[..], "intact batches first, in order");
    let log = agent.stderr();
    let summary = format!("(1 checksum mismatch, 1 torn write); copied to {}", outbox.join("corrupt").display());
    assert!(log.contains(&summary), "{log}");
    assert_eq!(std::fs::read_dir(outbox.join("corrupt")).expect("corrupt/").count(), 4);
    let corrupt_metric = got.last().and_then(|b| {
        b.json["metrics"]
            .as_array()?
            .iter()
            .find(|m| m["name"] == "dcmon_outbox_corrupt_batches_total")
            .map(|m| m["value"].clone())
    });
    assert_eq!(corrupt_metric, Some(json!(2)));
}

#[test]
fn unwritable_outbox_keeps_sending_from_memory_and_says_why() {
    let (machine, receiver, dir) = set_up();
    std::fs::write(dir.path().join("not-a-dir"), "x").expect("file");
    let cfg = config(dir.path(), &receiver.url(), &machine, json!({"outbox_dir": dir.path().join("not-a-dir/outbox")}));
    let agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("agent");
    let got = receiver.wait_for_accepted(3, Duration::from_secs(10));
    assert!(got.len() >= 3, "{}", agent.stderr());
    assert!(agent.stderr().contains("keeping batches in memory"), "{}", agent.stderr());
}

#[test]
fn full_disk_keeps_sending_from_memory_and_says_why() {
    // A real ENOSPC needs a small filesystem; mounting tmpfs needs root (CI runs as root).
    dcmon_tests::require_root("mounting a small tmpfs");
    let (machine, receiver, dir) = set_up();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).expect("mkdir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=12k", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("mount");
    assert!(mounted.success());
    let _unmount = Unmount(mnt.clone());
    let cfg = config(dir.path(), &receiver.url(), &machine, json!({"outbox_dir": mnt.join("outbox")}));
    // The server is down, so batches pile up until the 12 KiB filesystem is full.
    receiver.force_status(Some(503));
    let agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("agent");
    let log =
        wait_until(Duration::from_secs(20), || Some(agent.stderr()).filter(|l| l.contains("No space left on device")));
    assert!(log.is_some(), "{}", agent.stderr());
    receiver.force_status(None);
    let start = Instant::now();
    let got = receiver.wait_for_accepted(8, Duration::from_secs(20));
    assert!(got.len() >= 8, "after {:?}:\n{}", start.elapsed(), agent.stderr());
    assert_eq!(assert_complete_in_order(&timestamps(&got)), 0);
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_second_agent_on_the_same_outbox_refuses_to_start_naming_the_first() {
    let (machine, receiver, dir) = set_up();
    let cfg = config(dir.path(), &receiver.url(), &machine, json!({}));
    let first = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("agent");
    assert!(!receiver.wait_for_accepted(1, Duration::from_secs(10)).is_empty(), "{}", first.stderr());
    let second_dir = dir.path().join("second");
    std::fs::create_dir(&second_dir).expect("mkdir");
    let mut second = AgentProcess::start(&second_dir, &cfg, &["run"]).expect("second agent");
    let status = wait_until(Duration::from_secs(10), || second.try_wait())
        .unwrap_or_else(|| panic!("the second agent kept running:\n{}", second.stderr()));
    assert!(!status.success(), "{status:?}");
    let log = second.stderr();
    let outbox = dir.path().join("outbox");
    assert!(log.contains(&format!("another dcmon-agent (pid {})", first.pid())), "{log}");
    assert!(log.contains(&outbox.display().to_string()), "{log}");
}

// Issue 16: with the dcmon output off the agent needs no API key and posts nothing to the
// dcmon server; its batches still go to the outbox for the other outputs.
#[test]
fn with_the_dcmon_output_off_no_key_is_read_and_nothing_is_posted() {
    let machine = machine_id();
    let receiver = Receiver::start(&[(KEY, &machine)]).expect("receiver");
    let dir = tempfile::tempdir().expect("tempdir");
    // No key file at all.
    let extra = json!({"dcmon_output": false, "remote_write": [{"url": "http://127.0.0.1:9/api/v1/write"}]});
    let cfg = config(dir.path(), &receiver.url(), &machine, extra);
    let mut agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("agent");
    wait_for_stored(&dir.path().join("outbox"), 2, &agent);
    assert!(agent.try_wait().is_none(), "the agent stopped:\n{}", agent.stderr());
    assert!(receiver.accepted().is_empty() && receiver.rejected().is_empty(), "posted to the dcmon server");
    let log = agent.stderr();
    assert!(!log.contains("API key"), "the key was looked for:\n{log}");
    assert!(log.contains("the dcmon output is off"), "{log}");
}
