//! The APT collector against this machine's real apt (the CI runs on Debian).

use std::time::Duration;

use dcmon_agent::collector::Collector as _;
use dcmon_agent::collector::apt::AptCollector;
use dcmon_agent::config::AptConfig;
use dcmon_agent::exec::Cmd;
use dcmon_agent::host::Host;

#[test]
fn real_apt_count_matches_apt_list_upgradable() {
    let mut collector = AptCollector::new(Host::default(), &AptConfig::default());
    let mut out = Vec::new();
    collector
        .collect(&mut out)
        .expect("apt collector on a Debian host");
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
    let listed = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter(|l| l.contains("[upgradable from:"))
        .count();
    #[allow(clippy::cast_precision_loss, reason = "a package count")]
    let listed = listed as f64;
    assert_eq!(pending, listed, "collector vs apt list --upgradable");
    assert_eq!(
        reboot,
        if std::path::Path::new("/run/reboot-required").exists() {
            1.0
        } else {
            0.0
        }
    );
    assert!(age >= 0.0, "{age}");
}
