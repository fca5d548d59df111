//! The `dcmon-agent` command line: `once` on a fixture host tree and on this host, `--help`.

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dcmon-agent"))
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hosts").join(name)
}

#[test]
fn once_prints_the_batch_of_a_fixture_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.json");
    let root = fixture("gpu-server");
    std::fs::write(&config, serde_json::json!({ "host_root": root }).to_string()).expect("write");
    let out = agent().arg("--config").arg(&config).arg("once").output().expect("run once");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let batch: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON batch");
    assert_eq!(batch["machine_id"], "6b1c0e2f9a8d4e7c8f1a2b3c4d5e6f70");
    let metrics = batch["metrics"].as_array().expect("metrics");
    let find = |name: &str, label: &str| {
        metrics
            .iter()
            .find(|m| {
                m["name"] == name
                    && (label.is_empty() || m["labels"].as_object().is_some_and(|l| l.values().any(|v| v == label)))
            })
            .map(|m| m["value"].clone())
    };
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

#[test]
fn help_lists_the_subcommands() {
    let out = agent().arg("--help").output().expect("help");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("run") && text.contains("once"), "{text}");
}
