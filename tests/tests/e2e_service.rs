//! Running as a service: install/uninstall into a temporary root, the systemd unit, register,
//! check, SIGHUP reload, sd_notify readiness and watchdog, --version.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use dcmon_agent::collector::capabilities;
use dcmon_agent::config::{Config, EbpfMode};
use dcmon_agent::install::render_unit;
use dcmon_tests::{AgentProcess, Receiver, agent_bin, wait_until, write_key};
use serde_json::json;

const KEY: &str = "dcmon_serviceKeyServiceKeyServiceKeyServiceK";
const MACHINE: &str = "service-test-machine";

fn agent(args: &[&str]) -> Output {
    Command::new(agent_bin()).args(args).output().expect("run dcmon-agent")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o7777
}

#[test]
fn install_is_complete_idempotent_and_keeps_the_operators_config() {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path().to_str().expect("utf8");

    // --dry-run prints every action and changes nothing.
    let dry = agent(&["install", "--root", r, "--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry));
    let out = text(&dry);
    for want in [
        "would write /usr/local/bin/dcmon-agent (mode 0755)",
        "would write /etc/dcmon/config.json (mode 0644)",
        "would create directory /var/lib/dcmon (mode 0750)",
        "would write /etc/systemd/system/dcmon-client.service (mode 0644)",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert_eq!(std::fs::read_dir(root.path()).expect("ls").count(), 0, "dry run wrote something");

    let first = agent(&["install", "--root", r]);
    assert!(first.status.success(), "{}", text(&first));
    let bin = root.path().join("usr/local/bin/dcmon-agent");
    assert_eq!(std::fs::read(&bin).expect("binary"), std::fs::read(agent_bin()).expect("agent"));
    assert_eq!(mode(&bin), 0o755);
    let cfg = root.path().join("etc/dcmon/config.json");
    assert_eq!(mode(&cfg), 0o644);
    let (parsed, unknown) =
        Config::parse(&cfg, &std::fs::read_to_string(&cfg).expect("config"), &dcmon_agent::collector::schema())
            .expect("valid config");
    assert_eq!(parsed, Config::default());
    assert!(unknown.is_empty());
    assert_eq!(mode(&root.path().join("var/lib/dcmon")), 0o750);
    let unit_path = root.path().join("etc/systemd/system/dcmon-client.service");
    assert_eq!(mode(&unit_path), 0o644);
    let unit = std::fs::read_to_string(&unit_path).expect("unit");
    assert!(unit.contains("ExecStart=/usr/local/bin/dcmon-agent --config /etc/dcmon/config.json run"), "{unit}");
    assert!(text(&first).contains("systemctl daemon-reload && systemctl enable --now dcmon-client.service"));

    // Twice: nothing changes.
    let second = agent(&["install", "--root", r]);
    assert!(second.status.success());
    let stdout = String::from_utf8_lossy(&second.stdout).into_owned();
    let changes: Vec<&str> = stdout
        .lines()
        .filter(|l| !l.starts_with("unchanged") && !l.starts_with("systemd is not running") && !l.starts_with("next:"))
        .collect();
    assert!(changes.is_empty(), "second install changed: {changes:?}");

    // An operator's config survives, and the unit follows it (no NVMe, IPMI or GPU XIDs: no caps).
    std::fs::write(
        &cfg,
        r#"{"server_url": "http://dcmon.example:8000", "ebpf": "off", "exporters": {"nvme": false, "ipmi": false, "gpu_xid": false}}"#,
    )
    .expect("write");
    let third = agent(&["install", "--root", r]);
    assert!(third.status.success());
    assert!(std::fs::read_to_string(&cfg).expect("cfg").contains("dcmon.example"));
    let unit = std::fs::read_to_string(&unit_path).expect("unit");
    assert!(unit.contains("\nCapabilityBoundingSet=\n"), "{unit}");
    assert!(text(&third).contains("update /etc/systemd/system/dcmon-client.service"));

    // Uninstall keeps config, key and outbox; --purge removes them; both are idempotent.
    std::fs::write(root.path().join("etc/dcmon/api_key"), "k").expect("key");
    let un = agent(&["uninstall", "--root", r]);
    assert!(un.status.success(), "{}", text(&un));
    assert!(!bin.exists() && !unit_path.exists());
    assert!(
        cfg.exists() && root.path().join("etc/dcmon/api_key").exists() && root.path().join("var/lib/dcmon").exists()
    );
    let again = agent(&["uninstall", "--root", r]);
    assert!(again.status.success() && text(&again).contains("unchanged: /usr/local/bin/dcmon-agent is not there"));
    let purge = agent(&["uninstall", "--root", r, "--purge"]);
    assert!(purge.status.success());
    assert!(!root.path().join("etc/dcmon").exists() && !root.path().join("var/lib/dcmon").exists());
}

#[test]
fn systemd_analyze_verifies_the_unit_for_every_capability_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = agent_bin();
    for (ebpf, nvme, ipmi) in [
        (EbpfMode::Auto, true, true),
        (EbpfMode::On, false, false),
        (EbpfMode::Off, true, false),
        (EbpfMode::Off, false, false),
    ] {
        let mut config = Config { ebpf, ..Config::default() };
        config.exporters.set("nvme", nvme);
        config.exporters.set("ipmi", ipmi);
        let unit = render_unit(&bin, Path::new("/etc/dcmon/config.json"), &config);
        let caps = capabilities(&config).join(" ");
        assert!(unit.contains(&format!("\nCapabilityBoundingSet={caps}\n")), "{unit}");
        let path = dir.path().join("dcmon-client.service");
        std::fs::write(&path, &unit).expect("write unit");
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .expect("systemd-analyze (package systemd)");
        let msg = text(&out);
        assert!(
            out.status.success() && !msg.contains("dcmon-client.service:"),
            "systemd-analyze verify:\n{msg}\n{unit}"
        );
    }
}

#[test]
fn register_writes_the_key_0600_and_never_overwrites_without_force() {
    let receiver = Receiver::start(&[]).expect("receiver");
    let dir = tempfile::tempdir().expect("tempdir");
    let key_path = dir.path().join("etc/api_key");
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, json!({"machine_id": MACHINE, "api_key_file": key_path}).to_string()).expect("cfg");
    let c = cfg.to_str().expect("utf8");
    let out = agent(&["--config", c, "register", "--server", &receiver.url()]);
    assert!(out.status.success(), "{}", text(&out));
    let key = std::fs::read_to_string(&key_path).expect("key").trim().to_owned();
    assert!(key.starts_with("dcmon_") && key.len() == 49, "{key}");
    assert_eq!(mode(&key_path), 0o600);
    assert!(!text(&out).contains(&key), "register printed the key");

    let again = agent(&["--config", c, "register", "--server", &receiver.url()]);
    assert!(!again.status.success());
    assert!(text(&again).contains("already exists") && text(&again).contains("--force"), "{}", text(&again));
    std::fs::write(&key_path, "operator-key\n").expect("write");
    let forced = agent(&["--config", c, "register", "--server", &receiver.url(), "--force"]);
    assert!(forced.status.success(), "{}", text(&forced));
    assert_eq!(std::fs::read_to_string(&key_path).expect("key").trim(), key, "same machine, same key");
    assert_eq!(mode(&key_path), 0o600);
}

fn check(dir: &Path, server: &str, key: Option<&str>) -> Output {
    if let Some(k) = key {
        write_key(dir, k).expect("key");
    }
    let cfg = dir.join("config.json");
    std::fs::write(
        &cfg,
        json!({"server_url": server, "machine_id": MACHINE, "api_key_file": dir.join("api_key"),
        "connect_timeout": 1, "upload_timeout": 3})
        .to_string(),
    )
    .expect("cfg");
    Command::new(agent_bin()).arg("--config").arg(&cfg).arg("check").output().expect("check")
}

#[test]
fn check_reports_and_exit_codes() {
    let receiver = Receiver::start(&[(KEY, MACHINE)]).expect("receiver");
    let dir = tempfile::tempdir().expect("tempdir");

    let good = check(dir.path(), &receiver.url(), Some(KEY));
    let report = text(&good);
    assert!(good.status.success(), "{report}");
    for want in [
        "[ OK ] config:",
        "[ OK ] machine id: service-test-machine",
        "[ OK ] API key:",
        "[ OK ] server:",
        "[ OK ] key accepted:",
        "[ OK ] collector os:",
        "[ OK ] collector disk:",
    ] {
        assert!(report.contains(want), "missing {want:?}:\n{report}");
    }
    assert_eq!(receiver.accepted().len(), 1, "check sends one real batch");
    assert!(!report.contains(KEY));

    let bad_key = check(dir.path(), &receiver.url(), Some("dcmon_wrongKeyWrongKeyWrongKeyWrongKeyWrongKe"));
    assert_eq!(bad_key.status.code(), Some(1));
    assert!(text(&bad_key).contains("[FAIL] key accepted: server answered 401"), "{}", text(&bad_key));

    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    let unreachable = check(dir.path(), &format!("http://127.0.0.1:{port}"), Some(KEY));
    assert_eq!(unreachable.status.code(), Some(1));
    assert!(text(&unreachable).contains("[FAIL] server: cannot reach"), "{}", text(&unreachable));

    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, "{\"collection_interval\": }").expect("cfg");
    let malformed = Command::new(agent_bin()).arg("--config").arg(&cfg).arg("check").output().expect("check");
    assert_eq!(malformed.status.code(), Some(1));
    assert!(
        text(&malformed).contains("[FAIL] config: config ") && text(&malformed).contains("line 1, column"),
        "{}",
        text(&malformed)
    );

    std::fs::remove_file(dir.path().join("api_key")).expect("rm key");
    let no_key = check(dir.path(), &receiver.url(), None);
    assert_eq!(no_key.status.code(), Some(1));
    assert!(text(&no_key).contains("[FAIL] API key:"), "{}", text(&no_key));
}

fn daemon_config(dir: &Path, server: &str) -> PathBuf {
    let cfg = dir.join("config.json");
    std::fs::write(
        &cfg,
        json!({"server_url": server, "collection_interval": 1, "machine_id": MACHINE,
               "api_key_file": dir.join("api_key"), "outbox_dir": dir.join("outbox"),
               "exporters": {"ipmi": false, "apt": false, "nvme": false, "nvsmi": false}})
        .to_string(),
    )
    .expect("cfg");
    cfg
}

#[test]
fn sighup_reloads_a_good_config_and_rejects_a_bad_one() {
    let a = Receiver::start(&[(KEY, MACHINE)]).expect("receiver a");
    let b = Receiver::start(&[(KEY, MACHINE)]).expect("receiver b");
    let dir = tempfile::tempdir().expect("tempdir");
    write_key(dir.path(), KEY).expect("key");
    let cfg = daemon_config(dir.path(), &a.url());
    let mut agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("agent");
    assert!(!a.wait_for_accepted(1, Duration::from_secs(10)).is_empty(), "{}", agent.stderr());

    daemon_config(dir.path(), &b.url());
    let _ = Command::new("kill").args(["-HUP", &agent.pid().to_string()]).status();
    assert!(
        b.wait_for_accepted(2, Duration::from_secs(10)).len() >= 2,
        "reload did not switch servers:\n{}",
        agent.stderr()
    );

    std::fs::write(&cfg, "{\"server_url\": 42}").expect("bad cfg");
    let _ = Command::new("kill").args(["-HUP", &agent.pid().to_string()]).status();
    let log =
        wait_until(Duration::from_secs(5), || Some(agent.stderr()).filter(|l| l.contains("config reload rejected")));
    assert!(log.is_some_and(|l| l.contains("field `server_url`")), "{}", agent.stderr());
    let n = b.accepted().len();
    assert!(b.wait_for_accepted(n + 2, Duration::from_secs(10)).len() >= n + 2, "old config not kept");
    assert!(agent.try_wait().is_none());
    let status = agent.signal_and_wait("TERM", Duration::from_secs(10)).expect("exit");
    assert!(status.success());
}

#[test]
fn systemd_readiness_and_watchdog_notifications() {
    let receiver = Receiver::start(&[(KEY, MACHINE)]).expect("receiver");
    let dir = tempfile::tempdir().expect("tempdir");
    write_key(dir.path(), KEY).expect("key");
    let cfg = daemon_config(dir.path(), &receiver.url());
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let env: [(&str, &std::ffi::OsStr); 2] =
        [("NOTIFY_SOCKET", sock_path.as_os_str()), ("WATCHDOG_USEC", std::ffi::OsStr::new("2000000"))];
    let mut agent = AgentProcess::start_with_env(dir.path(), &cfg, &["run"], &env).expect("agent");
    let recv = || {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(recv(), "READY=1", "{}", agent.stderr());
    // The status line `systemctl status` shows: the interval in force.
    assert_eq!(recv(), "STATUS=collecting every 1s");
    assert_eq!(recv(), "WATCHDOG=1");
    assert_eq!(recv(), "WATCHDOG=1", "pinged repeatedly");
    let _ = agent.signal_and_wait("TERM", Duration::from_secs(10)).expect("exit");
    let mut rest = Vec::new();
    for _ in 0..5 {
        let m = recv();
        if m.is_empty() {
            break;
        }
        rest.push(m);
    }
    assert_eq!(rest.last().map(String::as_str), Some("STOPPING=1"), "{rest:?}");
}

#[test]
fn version_names_commit_and_ebpf_object() {
    let out = agent(&["--version"]);
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && v.starts_with("dcmon-agent 0.1.0 (commit ") && v.contains("eBPF object: embedded)"),
        "{v}"
    );
}
