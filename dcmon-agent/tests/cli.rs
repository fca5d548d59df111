//! The `dcmon-agent` command line: `once` on a fixture host tree and on this host, `--help`,
//! hostile config and key files, and a reload of the running daemon.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dcmon_tests::batch::find;
use dcmon_tests::{AgentConfig, fixture_host};

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dcmon-agent"))
}

#[test]
fn once_prints_the_batch_of_a_fixture_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = AgentConfig::new().set("host_root", serde_json::json!(fixture_host("gpu-server"))).write(dir.path());
    let out = agent().arg("--config").arg(&config).arg("once").output().expect("run once");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let batch: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON batch");
    assert_eq!(batch["machine_id"], "6b1c0e2f9a8d4e7c8f1a2b3c4d5e6f70");
    let find = |name: &str, label: &str| find(&batch, name, label);
    assert_eq!(find("cpu_load_1m", ""), Some(serde_json::json!(12.48)));
    assert_eq!(find("disk_write_bytes_total", "sda"), Some(serde_json::json!(301_221_800_u64 * 512)));
    assert_eq!(find("network_receive_bytes_total", "eno1"), Some(serde_json::json!(912_003_400_121_u64)));
    assert_eq!(find("dcmon_collector_success", "os"), Some(serde_json::json!(1)));
}

#[test]
fn once_on_this_host_needs_no_server_or_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.json");
    std::fs::write(&config, r#"{"api_key_file": "/nonexistent/api_key", "machine_id": "smoke"}"#).expect("write");
    let out = agent().arg("--config").arg(&config).arg("once").output().expect("run once");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let batch: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON batch");
    let names: Vec<&str> =
        batch["metrics"].as_array().expect("metrics").iter().filter_map(|m| m["name"].as_str()).collect();
    assert!(names.contains(&"cpu_usage_percent"), "the first batch carries CPU usage: {names:?}");
    assert!(names.contains(&"memory_total_bytes"), "{names:?}");
}

#[test]
fn unknown_config_keys_are_warnings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.json");
    std::fs::write(&config, r#"{"machine_id": "x", "legacy_option": 1}"#).expect("write");
    let out = agent().arg("--config").arg(&config).arg("once").output().expect("run once");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown key `legacy_option`"));
}

/// The subcommands `--help` lists: the first word of each line of its `Commands:` section.
fn subcommands_in_help(help: &str) -> Vec<&str> {
    let Some((_, section)) = help.split_once("\nCommands:\n") else { return Vec::new() };
    section.lines().take_while(|l| l.starts_with("  ")).filter_map(|l| l.split_whitespace().next()).collect()
}

#[test]
fn help_lists_the_subcommands() {
    let out = agent().arg("--help").output().expect("help");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(
        subcommands_in_help(&text),
        ["run", "once", "check", "register", "install", "uninstall", "help"],
        "the README's commands, as `--help` lists them:\n{text}"
    );
}

/// A new FIFO at `path`.
fn mkfifo(path: &Path) {
    let made = Command::new("mkfifo").arg(path).status().expect("run mkfifo");
    assert!(made.success(), "mkfifo {}", path.display());
}

/// Wait for `child` to exit; one still running after `limit` is killed and the test fails
/// (these commands take a second at most when they work).
fn wait_or_kill(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_fifo_or_device_as_config_is_refused_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("config.json");
    mkfifo(&fifo);
    for (config, what) in [(fifo.as_path(), "a FIFO"), (Path::new("/dev/zero"), "a character device")] {
        let mut child = agent()
            .arg("--config")
            .arg(config)
            .arg("once")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let status = wait_or_kill(&mut child, Duration::from_secs(20), "once with a FIFO config");
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr).expect("stderr");
        assert_eq!(status.code(), Some(78), "{stderr}");
        assert!(
            stderr.contains(&format!("config {}: is {what}, expected a regular file", config.display())),
            "{stderr}"
        );
    }
}

/// The daemon's stderr, line by line, as it comes.
struct LogLines(mpsc::Receiver<String>, Vec<String>);

impl LogLines {
    fn follow(child: &mut Child) -> Self {
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self(rx, Vec::new())
    }

    /// The first line from now on that contains every one of `parts`; fails after 30 s.
    fn wait_for(&mut self, parts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.0.recv_timeout(left) {
                Ok(line) => {
                    self.1.push(line.clone());
                    if parts.iter().all(|p| line.contains(p)) {
                        return line;
                    }
                }
                Err(_) => panic!("no log line with {parts:?} within 30 s; the log so far:\n{}", self.1.join("\n")),
            }
        }
    }
}

/// A daemon that is killed when the test ends, however it ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, name: &str) {
    let sent = Command::new("kill").arg(format!("-{name}")).arg(child.id().to_string()).status().expect("kill");
    assert!(sent.success(), "kill -{name}");
}

/// SIGHUP re-reads the config and the key. A FIFO in place of either is refused at once with
/// what it is, the running config is kept, and SIGTERM still stops the daemon.
#[test]
fn reload_refuses_a_fifo_key_or_config_and_still_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key: PathBuf = dir.path().join("api_key");
    std::fs::write(&key, "dcmon_test_key\n").expect("write key");
    let config = AgentConfig::without_exporters()
        .extend(serde_json::json!({
            // Nothing listens on the discard port: uploads fail and are retried, which is fine here.
            "server_url": "http://127.0.0.1:9",
            "machine_id": "reload-test",
            "api_key_file": key,
            "outbox_dir": dir.path().join("outbox"),
            "ebpf": "off",
        }))
        .write(dir.path());
    let mut daemon = Daemon(
        agent()
            .arg("--config")
            .arg(&config)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn run"),
    );
    let child = &mut daemon.0;
    let mut log = LogLines::follow(child);
    log.wait_for(&["started"]);

    std::fs::remove_file(&key).expect("rm key");
    mkfifo(&key);
    signal(child, "HUP");
    let line = log.wait_for(&["config reload rejected"]);
    assert!(line.contains(&format!("API key file {}: is a FIFO, expected a regular file", key.display())), "{line}");

    std::fs::remove_file(&key).expect("rm fifo");
    std::fs::write(&key, "dcmon_test_key\n").expect("write key");
    std::fs::remove_file(&config).expect("rm config");
    mkfifo(&config);
    signal(child, "HUP");
    let line = log.wait_for(&["config reload rejected"]);
    assert!(line.contains(&format!("config {}: is a FIFO, expected a regular file", config.display())), "{line}");

    signal(child, "TERM");
    let status = wait_or_kill(child, Duration::from_secs(20), "run after SIGTERM");
    assert!(status.success(), "{status}");
}

/// `once` is the first command a newcomer runs: it waits for a slow apt-get (slower than the
/// daemon's first-round wait of 6 s) and says in the log that it is waiting.
#[test]
fn once_waits_for_a_slow_apt_count() {
    use std::os::unix::fs::PermissionsExt as _;
    if !Path::new("/var/lib/dpkg/status").exists() {
        eprintln!("skipped: not a dpkg system, the apt collector is not present");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let apt_get = dir.path().join("apt-get");
    // The summary line of `LANG=C apt-get -s dist-upgrade` on Debian 12.
    std::fs::write(
        &apt_get,
        "#!/bin/sh\nsleep 7\necho 'Calculating upgrade...'\n\
         echo '3 upgraded, 0 newly installed, 0 to remove and 2 not upgraded.'\n",
    )
    .expect("write");
    std::fs::set_permissions(&apt_get, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let config = dir.path().join("config.json");
    let config_text = serde_json::json!({
        "machine_id": "once-apt",
        "ebpf": "off",
        "exporters": {"ipmi": false, "apt": true, "nvme": false, "nvsmi": false},
        "apt": {"apt_get": apt_get, "timeout": 60},
    });
    std::fs::write(&config, config_text.to_string()).expect("write config");
    let out = agent().arg("--config").arg(&config).arg("once").output().expect("run once");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let batch: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON batch");
    assert_eq!(find(&batch, "apt_upgrades_pending", ""), Some(serde_json::json!(5)), "{stderr}");
    assert!(stderr.contains("(counting pending upgrades) is still running; waiting up to"), "{stderr}");
}
