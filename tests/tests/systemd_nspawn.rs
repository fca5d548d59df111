//! The Debian package and its service under a real systemd: a Debian 12 root booted with
//! `systemd-nspawn -b` (tests/src/container.rs), driven as an operator would. Needs root,
//! debootstrap, systemd-container, Debian's archive (the first time on a machine) and the
//! package (`cargo xtask deb`). Without them it says what is missing and passes, unless
//! `DCMON_REQUIRE_PACKAGING=1` (CI), where it fails.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dcmon_tests::container::{self, Container};
use dcmon_tests::{
    Accepted, Receiver, agent_bin, ebpf_required, is_root, packaging_required, wait_until, workspace_root,
};
use serde_json::{Value, json};

const UNIT: &str = "dcmon-client";
/// Short enough for a test to see several rounds, long enough for a loaded CI machine.
const INTERVAL: u64 = 2;
/// What a container needs for the BPF programs: systemd-nspawn's seccomp filter refuses bpf()
/// and its bounding set has no CAP_BPF or CAP_PERFMON (the capabilities alone are not enough).
const ALLOW_BPF: &[&str] = &["--capability=CAP_BPF,CAP_PERFMON", "--system-call-filter=bpf perf_event_open"];

/// The package `cargo xtask deb` (or `cargo deb -p dcmon-agent`) made for this version.
/// The families only the eBPF programs can report (README, Metrics: what /proc cannot say);
/// with eBPF off they are absent, and every other family must stay.
const EBPF_ONLY_FAMILIES: [&str; 8] = [
    "disk_io_latency_seconds_bucket",
    "disk_io_latency_seconds_sum",
    "disk_io_latency_seconds_count",
    "network_drops_total",
    "tcp_retransmits_total",
    "tcp_resets_sent_total",
    "tcp_resets_received_total",
    "oom_kills_total",
];

fn package() -> PathBuf {
    let version = env!("CARGO_PKG_VERSION");
    workspace_root().join(format!("target/debian/dcmon-agent_{version}-1_amd64.deb"))
}

/// One container at a time: two booting at once on a small CI machine make both slow.
static ONE_CONTAINER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Why this test cannot run here, if it cannot.
fn missing_prerequisite() -> Option<String> {
    if !is_root() {
        return Some("not root (booting a container needs it)".into());
    }
    for tool in ["debootstrap", "systemd-nspawn", "nsenter"] {
        if which(tool).is_none() {
            return Some(format!("{tool} is not installed (packages debootstrap, systemd-container)"));
        }
    }
    if !package().exists() {
        return Some(format!("{} is missing: build it with `cargo xtask deb`", package().display()));
    }
    None
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(tool)).find(|p| p.exists())
}

fn show(c: &Container, property: &str) -> String {
    let out = c.ok(&["systemctl", "show", "-P", property, UNIT]).expect("systemctl show");
    out.trim().to_owned()
}

fn journal(c: &Container) -> String {
    c.ok(&["journalctl", "-u", UNIT, "--no-pager", "-o", "cat"]).expect("journalctl")
}

fn write_config(c: &Container, receiver: &Receiver, interval: u64, extra: Value) {
    let mut config = json!({"server_url": receiver.url(), "collection_interval": interval});
    if let (Some(base), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        base.extend(extra.clone());
    }
    std::fs::write(c.path("/etc/dcmon/config.json"), config.to_string()).expect("write the config");
}

/// Accepted batches after `since`, once `n` have arrived (fails with the journal otherwise).
fn batches_after(c: &Container, receiver: &Receiver, since: Instant, n: usize, timeout: Duration) -> Vec<Accepted> {
    wait_until(timeout, || {
        let got: Vec<Accepted> = receiver.accepted().into_iter().filter(|b| b.at > since).collect();
        (got.len() >= n).then_some(got)
    })
    .unwrap_or_else(|| panic!("fewer than {n} batches in {timeout:?}; journal:\n{}", journal(c)))
}

/// The gaps between consecutive arrivals, in seconds.
fn gaps(batches: &[Accepted]) -> Vec<f64> {
    batches.windows(2).map(|w| w[1].at.duration_since(w[0].at).as_secs_f64()).collect()
}

/// The metric families of a batch (names without their per-device labels).
fn families(batch: &Value) -> BTreeSet<String> {
    dcmon_tests::batch::metrics(batch).iter().filter_map(|m| m["name"].as_str().map(str::to_owned)).collect()
}

fn ebpf_active(batch: &Value) -> Option<f64> {
    dcmon_tests::batch::find(batch, "dcmon_ebpf_active", "")?.as_f64()
}

/// The collectors whose last round succeeded (`dcmon_collector_success` 1).
fn collectors_ok(batch: &Value) -> BTreeSet<String> {
    dcmon_tests::batch::metrics(batch)
        .iter()
        .filter(|m| m["name"] == "dcmon_collector_success" && m["value"] == 1)
        .filter_map(|m| m["labels"]["collector"].as_str().map(str::to_owned))
        .collect()
}

/// Boot, install the package (checking what a first install does), point the agent at
/// `receiver` and register; returns the container and the key.
fn installed_and_registered(options: &[&str], receiver: &Receiver) -> (Container, String) {
    let started = Instant::now();
    let root = container::debian_root().expect("the Debian 12 root");
    let made_root = started.elapsed();
    let c = Container::boot(&root, options).expect("boot the container");
    eprintln!("root ready in {made_root:.1?}, booted in {:.1?}", started.elapsed() - made_root);

    // Install: enabled, not started without a key, and says how to add one.
    std::fs::copy(package(), c.path("/root/dcmon-agent.deb")).expect("copy the package in");
    let installed = c.ok(&["dpkg", "-i", "/root/dcmon-agent.deb"]).expect("dpkg -i");
    assert!(installed.contains("dcmon-agent register --server URL"), "{installed}");
    assert!(installed.contains("chmod 600 /etc/dcmon/api_key"), "{installed}");
    assert_eq!(show(&c, "UnitFileState"), "enabled");
    assert_eq!(show(&c, "ActiveState"), "inactive");
    let version = c.ok(&["dcmon-agent", "--version"]).expect("--version");
    let here = std::process::Command::new(agent_bin()).arg("--version").output().expect("--version");
    assert_eq!(version.trim(), String::from_utf8_lossy(&here.stdout).trim(), "the package is stale: cargo xtask deb");

    // Register against the receiver on the host's loopback; the key is 0600 and unprinted.
    write_config(&c, receiver, INTERVAL, json!({}));
    let registered = c.ok(&["dcmon-agent", "register", "--server", &receiver.url()]).expect("dcmon-agent register");
    let key_path = c.path("/etc/dcmon/api_key");
    let key = std::fs::read_to_string(&key_path).expect("the key file").trim().to_owned();
    assert!(!key.is_empty() && !registered.contains(&key), "{registered}");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&key_path).expect("key").permissions().mode() & 0o777, 0o600);
    (c, key)
}

/// What `dcmon-agent once` collects in the container outside the service's sandbox.
fn once_unsandboxed(c: &Container) -> Value {
    let out = c.exec(&["dcmon-agent", "once"]).expect("dcmon-agent once");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("once prints a batch")
}

fn wait_for_restart(c: &Container, restarts_before: u32, old_pid: &str) -> String {
    wait_until(Duration::from_secs(60), || {
        let pid = show(c, "MainPID");
        let restarts: u32 = show(c, "NRestarts").parse().ok()?;
        (restarts > restarts_before && pid != "0" && pid != old_pid && show(c, "ActiveState") == "active")
            .then_some(pid)
    })
    .unwrap_or_else(|| panic!("not restarted; journal:\n{}", journal(c)))
}

#[test]
fn the_package_runs_the_service_under_a_real_systemd() {
    if let Some(why) = missing_prerequisite() {
        assert!(!packaging_required(), "DCMON_REQUIRE_PACKAGING=1 but this test cannot run: {why}");
        eprintln!("skipped: {why}");
        return;
    }
    let _one = ONE_CONTAINER.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let started = Instant::now();
    let receiver = Receiver::start(&[]).expect("receiver");
    let (c, key) = installed_and_registered(ALLOW_BPF, &receiver);
    let key_path = c.path("/etc/dcmon/api_key");

    // Start: ready, batches on time, the notify status, the start line and never the key.
    let t = Instant::now();
    c.ok(&["systemctl", "start", UNIT]).expect("systemctl start");
    let on_time = batches_after(&c, &receiver, t, 4, Duration::from_secs(30));
    for gap in gaps(&on_time[1..]) {
        assert!((1.0..3.0).contains(&gap), "interval {INTERVAL} s, gaps {:?}", gaps(&on_time));
    }
    let status = c.exec(&["systemctl", "status", "--no-pager", UNIT]).expect("systemctl status");
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.contains("Active: active (running)"), "{status}");
    assert!(status.contains("Status: \"collecting every 2s\""), "{status}");
    let log = journal(&c);
    assert!(log.contains("dcmon-agent") && log.contains(" started"), "{log}");
    assert!(!log.contains(&key), "the key is in the journal:\n{log}");
    // With bpf() let through and CAP_BPF in the container, the hardened unit loads the programs,
    // and every collector that works outside the sandbox works inside it.
    let latest = &on_time[on_time.len() - 1].json;
    let ebpf_loaded = log.contains("eBPF mode: disk and network I/O counted by BPF programs");
    eprintln!("eBPF in the container with {ALLOW_BPF:?}: {}", if ebpf_loaded { "loaded" } else { "not loaded" });
    if ebpf_required() {
        assert!(ebpf_loaded, "DCMON_REQUIRE_EBPF=1 but the programs did not load:\n{log}");
    }
    let outside = collectors_ok(&once_unsandboxed(&c));
    assert_eq!(collectors_ok(latest), outside, "collectors under the unit's sandbox vs outside it");
    for collector in ["os", "disk", "net", "filesystems", "netstat", "pressure"] {
        assert!(outside.contains(collector), "{collector} did not succeed: {outside:?}");
    }
    let with_ebpf_auto = families(latest);

    // Reload: a changed interval applies; a bad config is kept out and said so.
    write_config(&c, &receiver, 3, json!({"ebpf": "off"}));
    c.ok(&["systemctl", "reload", UNIT]).expect("systemctl reload");
    assert!(
        wait_until(Duration::from_secs(10), || show(&c, "StatusText").contains("every 3s").then_some(())).is_some()
    );
    let t = Instant::now();
    let slower = batches_after(&c, &receiver, t, 3, Duration::from_secs(30));
    for gap in gaps(&slower[1..]) {
        assert!((2.0..4.0).contains(&gap), "interval 3 s, gaps {:?}", gaps(&slower));
    }
    let with_ebpf_off = families(&slower[slower.len() - 1].json);
    // With eBPF off the status collector is not built: its metric is absent, not 0.
    assert_eq!(ebpf_active(&slower[slower.len() - 1].json), None);
    let lost: Vec<&String> = with_ebpf_auto
        .difference(&with_ebpf_off)
        .filter(|f| !f.contains("ebpf") && !EBPF_ONLY_FAMILIES.contains(&f.as_str()))
        .collect();
    assert!(lost.is_empty(), "families lost with eBPF off: {lost:?}");
    for family in ["cpu_usage_percent", "memory_usage_percent", "disk_reads_total"] {
        assert!(with_ebpf_off.contains(family), "{family} missing: {with_ebpf_off:?}");
    }
    std::fs::write(c.path("/etc/dcmon/config.json"), "{\"collection_interval\": ").expect("write");
    c.ok(&["systemctl", "reload", UNIT]).expect("systemctl reload");
    assert!(
        wait_until(Duration::from_secs(10), || journal(&c).contains("config reload rejected").then_some(())).is_some()
    );
    assert_eq!(show(&c, "ActiveState"), "active");
    assert_eq!(show(&c, "StatusText"), "collecting every 3s");
    write_config(&c, &receiver, INTERVAL, json!({}));
    c.ok(&["systemctl", "reload", UNIT]).expect("systemctl reload");

    // Upgrade (the package again) during an outage: the running agent restarts; config, key and
    // the batches waiting in the outbox stay, and the upgraded agent delivers them.
    receiver.force_status(Some(503));
    let outbox = c.path("/var/lib/dcmon/outbox");
    let waiting = wait_until(Duration::from_secs(30), || {
        let stored = dcmon_agent::outbox::inspect(&outbox).ok()?;
        (!stored.is_empty()).then_some(stored)
    })
    .unwrap_or_else(|| panic!("nothing stored during the outage; journal:\n{}", journal(&c)));
    let pid = show(&c, "MainPID");
    let config_before = std::fs::read(c.path("/etc/dcmon/config.json")).expect("config");
    c.ok(&["dpkg", "-i", "/root/dcmon-agent.deb"]).expect("dpkg -i again");
    let new_pid = show(&c, "MainPID");
    assert!(new_pid != pid && show(&c, "ActiveState") == "active", "{pid} -> {new_pid}");
    assert_eq!(std::fs::read(c.path("/etc/dcmon/config.json")).expect("config"), config_before);
    assert_eq!(std::fs::read_to_string(&key_path).expect("key").trim(), key);
    receiver.force_status(None);
    let delivered = wait_until(Duration::from_secs(30), || {
        let got: BTreeSet<i64> = receiver.accepted().iter().filter_map(|b| b.json["timestamp"].as_i64()).collect();
        waiting.iter().all(|b| got.contains(&b.timestamp)).then_some(())
    });
    assert!(delivered.is_some(), "the outbox was not delivered after the upgrade; journal:\n{}", journal(&c));

    // SIGKILL during an outage: systemd restarts it, and the restart delivers the outbox.
    receiver.force_status(Some(503));
    let stored = wait_until(Duration::from_secs(30), || {
        let stored = dcmon_agent::outbox::inspect(&outbox).ok()?;
        (stored.len() >= 2).then_some(stored)
    })
    .unwrap_or_else(|| panic!("nothing stored during the outage; journal:\n{}", journal(&c)));
    let restarts: u32 = show(&c, "NRestarts").parse().expect("NRestarts");
    c.ok(&["systemctl", "kill", "-s", "KILL", UNIT]).expect("systemctl kill");
    receiver.force_status(None);
    let pid = wait_for_restart(&c, restarts, &new_pid);
    let delivered = wait_until(Duration::from_secs(30), || {
        let got: BTreeSet<i64> = receiver.accepted().iter().filter_map(|b| b.json["timestamp"].as_i64()).collect();
        stored.iter().all(|b| got.contains(&b.timestamp)).then_some(())
    });
    assert!(delivered.is_some(), "the outbox was not delivered after the restart; journal:\n{}", journal(&c));

    // The watchdog: a stopped agent stops pinging and is restarted (a short watchdog here).
    let dropin = c.path("/etc/systemd/system/dcmon-client.service.d/test-watchdog.conf");
    std::fs::create_dir_all(dropin.parent().expect("parent")).expect("mkdir");
    std::fs::write(&dropin, "[Service]\nWatchdogSec=4s\nTimeoutAbortSec=3s\n").expect("drop-in");
    c.ok(&["systemctl", "daemon-reload"]).expect("daemon-reload");
    c.ok(&["systemctl", "restart", UNIT]).expect("restart");
    let pid_before = show(&c, "MainPID");
    assert_ne!(pid_before, pid);
    let restarts: u32 = show(&c, "NRestarts").parse().expect("NRestarts");
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(show(&c, "MainPID"), pid_before, "restarted while it still pinged:\n{}", journal(&c));
    c.ok(&["systemctl", "kill", "-s", "STOP", UNIT]).expect("SIGSTOP");
    wait_for_restart(&c, restarts, &pid_before);
    assert!(journal(&c).contains("Watchdog timeout"), "{}", journal(&c));
    std::fs::remove_file(&dropin).expect("rm drop-in");
    c.ok(&["systemctl", "daemon-reload"]).expect("daemon-reload");

    // Hardening, as systemd measures it.
    let security = c.ok(&["systemd-analyze", "security", "--no-pager", UNIT]).expect("systemd-analyze security");
    let exposure = security.lines().find(|l| l.contains("Overall exposure level")).expect("an exposure line");
    eprintln!("{exposure}");

    // Stop exits 0; remove stops it and keeps config and key; `apt-get purge` leaves nothing.
    c.ok(&["systemctl", "stop", UNIT]).expect("systemctl stop");
    assert_eq!(show(&c, "Result"), "success");
    assert_eq!(show(&c, "ExecMainStatus"), "0");
    c.ok(&["systemctl", "start", UNIT]).expect("start");
    c.ok(&["dpkg", "-r", "dcmon-agent"]).expect("dpkg -r");
    assert_ne!(show(&c, "ActiveState"), "active");
    assert!(c.path("/etc/dcmon/config.json").exists() && key_path.exists());
    assert!(!c.path("/usr/bin/dcmon-agent").exists());
    c.ok(&["apt-get", "purge", "-y", "dcmon-agent"]).expect("apt-get purge");
    for gone in ["/etc/dcmon", "/var/lib/dcmon", "/lib/systemd/system/dcmon-client.service"] {
        assert!(!c.path(gone).exists(), "{gone} is left after purge");
    }
    let links = c.ok(&["find", "/etc/systemd", "-name", "dcmon*"]).expect("find");
    assert!(links.trim().is_empty(), "left after purge: {links}");
    eprintln!("the container test took {:.1?}", started.elapsed());
}

/// Under systemd-nspawn's defaults (no CAP_BPF, bpf() filtered out) the programs cannot load:
/// the agent says so in the journal and runs every other collector from procfs and sysfs.
#[test]
fn without_bpf_in_the_container_the_service_falls_back_to_procfs() {
    if let Some(why) = missing_prerequisite() {
        assert!(!packaging_required(), "DCMON_REQUIRE_PACKAGING=1 but this test cannot run: {why}");
        eprintln!("skipped: {why}");
        return;
    }
    let _one = ONE_CONTAINER.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let receiver = Receiver::start(&[]).expect("receiver");
    let (c, _key) = installed_and_registered(&[], &receiver);
    let t = Instant::now();
    c.ok(&["systemctl", "start", UNIT]).expect("systemctl start");
    let batches = batches_after(&c, &receiver, t, 1, Duration::from_secs(30));
    let log = journal(&c);
    let fallback = log.lines().find(|l| l.contains("eBPF unavailable, using procfs for disk and network I/O"));
    let fallback = fallback.unwrap_or_else(|| panic!("no fallback line:\n{log}"));
    eprintln!("eBPF in the container with nspawn's defaults: {fallback}");
    assert!(fallback.contains("no privilege to load BPF programs"), "{fallback}");
    let batch = &batches[0].json;
    assert_eq!(ebpf_active(batch), Some(0.0));
    let ok = collectors_ok(batch);
    for collector in ["os", "disk", "net", "filesystems", "netstat", "pressure"] {
        assert!(ok.contains(collector), "{collector} did not succeed: {ok:?}");
    }
    assert!(families(batch).contains("disk_reads_total"), "disk I/O from procfs: {:?}", families(batch));
}
