//! The APT collector against this machine's real apt (the CI runs on Debian).

use std::time::{Duration, Instant};

use dcmon_agent::batch::Sample;
use dcmon_agent::collector::Collector as _;
use dcmon_agent::collector::apt::AptCollector;
use dcmon_agent::collector::apt::AptConfig;
use dcmon_agent::exec::Cmd;
use dcmon_agent::host::Host;

/// Rounds until the first upgrade count is in: the first round waits only a few seconds for
/// it, and on a loaded CI machine (tests run in parallel) the count can take longer.
fn collect_until_counted(collector: &mut AptCollector) -> Vec<Sample> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut out = Vec::new();
        collector.collect(&mut out).expect("apt collector on a Debian host");
        if out.iter().any(|s| s.name == "apt_upgrades_pending") {
            return out;
        }
        assert!(Instant::now() < deadline, "no count within 90 s: {out:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn real_apt_count_matches_apt_list_upgradable() {
    let mut collector = AptCollector::new(Host::default(), &AptConfig::default());
    let out = collect_until_counted(&mut collector);
    let value = |name: &str| {
        out.iter()
            .find(|s| s.name == name)
            .map(|s| s.value.as_f64())
            .unwrap_or_else(|| panic!("{name} missing from {out:?}"))
    };
    let pending = value("apt_upgrades_pending");
    let reboot = value("apt_reboot_required");
    let age = value("apt_lists_age_seconds");

    // An independent count: apt's own list of upgradable packages.
    let listed = Cmd::new("apt")
        .args(["list", "--upgradable"])
        .env("LANG", "C")
        .timeout(Duration::from_secs(120))
        .run()
        .expect("apt list");
    let listed = String::from_utf8_lossy(&listed.stdout).lines().filter(|l| l.contains("[upgradable from:")).count();
    #[allow(clippy::cast_precision_loss, reason = "a package count")]
    let listed = listed as f64;
    assert_eq!(pending, listed, "collector vs apt list --upgradable");
    assert_eq!(reboot, if std::path::Path::new("/run/reboot-required").exists() { 1.0 } else { 0.0 });
    assert!(age >= 0.0, "{age}");
}

/// Container mode: the host's filesystem under another root (`host_root`). apt-get is pointed
/// at it with `-o Dir=ROOT`; here the root links to this machine's own dpkg and apt state, so
/// the count must equal the direct one.
#[test]
fn host_root_elsewhere_reads_that_roots_apt_state() {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    for dir in ["var/lib", "etc", "var/cache/apt/archives/partial", "run"] {
        std::fs::create_dir_all(r.join(dir)).expect("mkdir");
    }
    for link in ["var/lib/dpkg", "var/lib/apt", "etc/apt"] {
        std::os::unix::fs::symlink(std::path::Path::new("/").join(link), r.join(link)).expect("symlink");
    }
    std::fs::write(r.join("run/reboot-required"), "").expect("flag");
    let count = |host: Host| {
        let out = collect_until_counted(&mut AptCollector::new(host, &AptConfig::default()));
        let get = |name: &str| {
            out.iter()
                .find(|s| s.name == name)
                .map(|s| s.value.as_f64())
                .unwrap_or_else(|| panic!("{name} missing from {out:?}"))
        };
        (get("apt_upgrades_pending"), get("apt_reboot_required"))
    };
    let (direct, _) = count(Host::default());
    let (moved, reboot) = count(Host::new(r));
    assert_eq!(moved, direct);
    assert_eq!(reboot, 1.0, "the reboot flag is read under the root");
}
