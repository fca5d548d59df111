//! The whole batch `dcmon-agent once` prints for each fixture host (tests/fixtures/hosts/HOST)
//! against the one checked in at tests/fixtures/golden/HOST.json, so that any change to what
//! the agent reports from a host (a metric, a label, a value, their order) shows up as a diff
//! to review. Timestamps and collector durations differ from run to run: they are written as 0.
//!
//! After an intended change, regenerate the files and review the diff:
//! `DCMON_BLESS=1 cargo test -p dcmon-tests --test golden` (README, Testing).

use std::path::{Path, PathBuf};

use dcmon_tests::agent::run_once;
use dcmon_tests::{AgentConfig, fixture_host, fixture_hosts, fixtures_dir, validate_batch};
use serde_json::json;

const BLESS_COMMAND: &str = "DCMON_BLESS=1 cargo test -p dcmon-tests --test golden";

/// The metric whose value is a measured time.
const DURATION_METRIC: &str = "dcmon_collector_duration_seconds";

fn golden_path(host: &str) -> PathBuf {
    fixtures_dir().join("golden").join(format!("{host}.json"))
}

fn blessing() -> bool {
    std::env::var("DCMON_BLESS").is_ok_and(|v| v == "1")
}

/// The batch `once` prints for the fixture host. The hardware exporters are off: they read
/// this machine's devices (ipmitool, NVML, /dev/nvme*), not the host root.
fn batch_of(host: &str, dir: &Path) -> String {
    let config = AgentConfig::without_exporters().set("host_root", json!(fixture_host(host))).write(dir);
    run_once(dir, &config).0
}

/// `once`'s output (serde_json's pretty format: one key a line) with the values that change
/// from run to run set to 0. Done on the text, so every other number stays as the agent wrote it.
fn normalised(pretty: &str) -> String {
    let mut out = String::with_capacity(pretty.len());
    let mut in_duration_metric = false;
    for line in pretty.lines() {
        let key = line.trim_start();
        let indent = &line[..line.len() - key.len()];
        let comma = if key.ends_with(',') { "," } else { "" };
        if let Some(name) = key.strip_prefix("\"name\": ") {
            in_duration_metric = name.trim_end_matches(',') == format!("\"{DURATION_METRIC}\"");
        }
        if key.starts_with("\"timestamp\": ") {
            out.push_str(&format!("{indent}\"timestamp\": 0{comma}\n"));
        } else if in_duration_metric && key.starts_with("\"value\": ") {
            out.push_str(&format!("{indent}\"value\": 0{comma}\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// A unified diff of the golden file against what the agent printed.
fn diff(golden: &str, got: &str, path: &Path) -> String {
    similar::TextDiff::from_lines(golden, got)
        .unified_diff()
        .context_radius(4)
        .header(&path.display().to_string(), "dcmon-agent once (normalised)")
        .to_string()
}

#[test]
fn once_on_every_fixture_host_prints_its_golden_batch() {
    let hosts = fixture_hosts();
    assert!(!hosts.is_empty(), "no fixture hosts under {}", fixtures_dir().join("hosts").display());
    let mut failures = Vec::new();
    for host in &hosts {
        let dir = tempfile::tempdir().expect("tempdir");
        let got = normalised(&batch_of(host, dir.path()));
        let batch: serde_json::Value = serde_json::from_str(&got)
            .unwrap_or_else(|e| panic!("{host}: the normalised batch is not JSON ({e}):\n{got}"));
        if let Err(problems) = validate_batch(&batch) {
            panic!("{host}: the server would refuse this batch: {problems:?}");
        }
        let path = golden_path(host);
        if blessing() {
            std::fs::write(&path, &got).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
            eprintln!("blessed {}", path.display());
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(golden) if golden == got => {}
            Ok(golden) => failures
                .push(format!("{host}: the batch differs from the golden file:\n{}", diff(&golden, &got, &path))),
            Err(e) => {
                failures.push(format!("{host}: cannot read {} ({e}); write it with `{BLESS_COMMAND}`", path.display()))
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{}\nIf the change is intended, regenerate the golden files with `{BLESS_COMMAND}` and commit them.",
        failures.join("\n")
    );
}

/// A golden file whose fixture host was removed or renamed would never be compared again.
#[test]
fn every_golden_file_has_its_fixture_host() {
    let dir = fixtures_dir().join("golden");
    let hosts = fixture_hosts();
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("golden dir entry").path();
        let host = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        assert!(
            path.extension().is_some_and(|e| e == "json") && hosts.contains(&host),
            "{}: no fixture host tests/fixtures/hosts/{host} for it (left over from a renamed or removed host?)",
            path.display()
        );
    }
}

#[test]
fn normalising_zeroes_timestamps_and_durations_only() {
    let pretty = "{\n  \"machine_id\": \"m\",\n  \"timestamp\": 1796172458,\n  \"metrics\": [\n    {\n      \
        \"name\": \"dcmon_collector_duration_seconds\",\n      \"value\": 0.000216194,\n      \"labels\": {\n        \
        \"collector\": \"os\"\n      },\n      \"timestamp\": 1796172458\n    },\n    {\n      \
        \"name\": \"cpu_load_1m\",\n      \"value\": 12.48,\n      \"labels\": {},\n      \"timestamp\": 1796172458\n    }\n  ]\n}\n";
    let want = pretty.replace("1796172458", "0").replace("0.000216194", "0");
    assert_eq!(normalised(pretty), want);
}
