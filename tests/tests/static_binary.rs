//! The static agent (`cargo xtask static`, x86_64-unknown-linux-musl) on a host that has
//! nothing of it: `once` in an empty chroot that holds only the binary and its config, with
//! /proc and /sys mounted. Needs root (chroot, mounts); without the binary or root it says so
//! and passes, unless `DCMON_REQUIRE_PACKAGING=1` (CI), where it fails.

use std::path::PathBuf;
use std::process::Command;

use dcmon_tests::{is_root, packaging_required, workspace_root};
use serde_json::Value;

fn static_binary() -> PathBuf {
    workspace_root().join("target/x86_64-unknown-linux-musl/release/dcmon-agent")
}

#[test]
fn the_static_agent_runs_once_in_an_empty_chroot() {
    let why = if !is_root() {
        Some("not root (chroot and mounts need it)".to_owned())
    } else if !static_binary().exists() {
        Some(format!("{} is missing: build it with `cargo xtask static`", static_binary().display()))
    } else {
        None
    };
    if let Some(why) = why {
        assert!(!packaging_required(), "DCMON_REQUIRE_PACKAGING=1 but this test cannot run: {why}");
        eprintln!("skipped: {why}");
        return;
    }
    let ldd = Command::new("ldd").arg(static_binary()).output().expect("ldd");
    let said = format!("{}{}", String::from_utf8_lossy(&ldd.stdout), String::from_utf8_lossy(&ldd.stderr));
    assert!(said.contains("not a dynamic executable") || said.contains("statically linked"), "ldd: {said}");

    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    std::fs::copy(static_binary(), root.join("dcmon-agent")).expect("copy the binary");
    for d in ["proc", "sys"] {
        std::fs::create_dir(root.join(d)).expect("mkdir");
    }
    // No /etc in the chroot: the machine id comes from the config.
    std::fs::write(root.join("config.json"), r#"{"machine_id": "static-chroot-test"}"#).expect("config");
    // The mounts live in a mount namespace of their own and go with it.
    let script = "mount -t proc proc \"$1/proc\" && mount -t sysfs sysfs \"$1/sys\" && \
                  exec chroot \"$1\" /dcmon-agent --config /config.json once";
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script, "sh"])
        .arg(root)
        .output()
        .expect("unshare (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "once in the chroot failed ({}):\n{stderr}", out.status);
    let batch: Value = serde_json::from_slice(&out.stdout).expect("once prints a batch");
    assert_eq!(batch["machine_id"], "static-chroot-test");
    let value = |name: &str| dcmon_tests::batch::find(&batch, name, "").and_then(|v| v.as_f64());
    let memory = value("memory_total_bytes").expect("memory_total_bytes from /proc/meminfo");
    assert!(memory > 0.0, "{memory}");
    let cpu = value("cpu_usage_percent").expect("cpu_usage_percent from /proc/stat");
    assert!((0.0..=100.0).contains(&cpu), "{cpu}");
    // NVML is dlopen()ed; a static musl binary cannot load the driver's glibc library, and says
    // so instead of crashing; on a GPU host nvidia-smi is used instead (README, the static build).
    // The GPU collector's own line: other collectors' threads (gpu_xid) may log about NVML first.
    let nvml = stderr
        .lines()
        .find(|l| l.contains("NVML") && l.contains("collector=\"nvsmi\""))
        .unwrap_or_else(|| panic!("no NVML line from the nvsmi collector:\n{stderr}"));
    eprintln!("{nvml}");
    assert!(nvml.contains("Dynamic loading not supported"), "{nvml}");
    assert!(!root.join("proc/self").exists(), "the chroot's /proc is still mounted");
}
