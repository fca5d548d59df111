//! APT: pending upgrades, the reboot flag, and how old the package lists are.
//!
//! Counting upgrades means resolving the whole dependency graph (seconds of CPU; README,
//! Performance), so it runs on its own thread and slow interval, and again as soon as dpkg's
//! status or the package lists change; every round reports the cached count. The reboot flag and
//! the list age are a stat each and are read every round.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;

use super::background::{FirstRunWait, Refresher};
use super::{CollectError, Collector};
use crate::batch::Sample;
use crate::config::{Limit, Section, SectionSpec, UP_TO_A_WEEK, UP_TO_AN_HOUR};
use crate::exec::{Cmd, ExecError};
use crate::host::Host;

/// This collector's row in the table ([`super::SOURCES`]).
pub const SOURCE: super::Source = super::Source {
    name: "apt",
    switch: super::Switch::Exporter { default: true },
    caps: &[],
    section: Some(SectionSpec::of::<AptConfig>()),
    build: Some(|host, config| Box::new(AptCollector::new(host.clone(), &config.section::<AptConfig>()))),
};

/// The `apt` section: pending upgrades, reboot flag, package list age.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct AptConfig {
    /// Seconds between upgrade counts (also recounted when dpkg's status or the lists change).
    pub interval: u64,
    /// Seconds one count may take before apt-get is killed.
    pub timeout: u64,
    /// The apt-get program.
    pub apt_get: PathBuf,
}

impl Default for AptConfig {
    fn default() -> Self {
        Self { interval: 3600, timeout: 120, apt_get: PathBuf::from("apt-get") }
    }
}

impl Section for AptConfig {
    fn durations(&self) -> Vec<(&'static str, u64, Limit)> {
        vec![("apt.interval", self.interval, UP_TO_A_WEEK), ("apt.timeout", self.timeout, UP_TO_AN_HOUR)]
    }
}

const DPKG_STATUS: &str = "/var/lib/dpkg/status";
const APT_LISTS: &str = "/var/lib/apt/lists";
const REBOOT_REQUIRED: &str = "/run/reboot-required";
/// How long the daemon's first round waits for the first count, so the first batch carries it
/// when apt-get is quick; later rounds never wait. Below the default collector timeout (10 s).
/// `dcmon-agent once` waits up to the apt timeout instead
/// ([`Collector::wait_for_first_result`]).
const FIRST_COUNT_WAIT: Duration = Duration::from_secs(6);
/// Beyond the apt-get timeout: killing and reaping it and storing the result.
const FIRST_COUNT_GRACE: Duration = Duration::from_secs(1);
/// apt-get -s prints one line per package; 2000 upgrades is about 300 KiB.
const MAX_OUTPUT_BYTES: usize = 16 << 20;

/// Why a count produced no number (cloneable: it is cached and reported every round).
#[derive(Debug, Clone, PartialEq, Eq)]
enum CountError {
    NotPresent(String),
    Failed(String),
}

/// ```text
/// 132 upgraded, 0 newly installed, 0 to remove and 3 not upgraded.
/// ```
/// (the summary of `apt-get -s dist-upgrade`) into the number of installed packages with a newer
/// candidate: upgraded plus not upgraded (held or kept back), which is what
/// `apt list --upgradable` lists.
pub fn parse_upgrade_summary(text: &str) -> Result<u64, String> {
    for line in text.lines() {
        let Some((upgraded, rest)) = line.trim().split_once(" upgraded, ") else {
            continue;
        };
        let Some((_, not_part)) = rest.split_once(" to remove and ") else {
            continue;
        };
        let Some(not_upgraded) = not_part.strip_suffix(" not upgraded.") else {
            continue;
        };
        let number = |s: &str, what: &str| {
            s.trim().parse::<u64>().map_err(|_| format!("{what} count {s:?} in {line:?} is not a number"))
        };
        let upgraded = number(upgraded, "upgraded")?;
        let not_upgraded = number(not_upgraded, "not upgraded")?;
        return upgraded.checked_add(not_upgraded).ok_or_else(|| format!("counts overflow in {line:?}"));
    }
    Err("no \"N upgraded, … not upgraded.\" summary line in apt-get output".into())
}

/// A cheap identity of the inputs of a count: when either changes, the count is redone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    dpkg_status: Option<SystemTime>,
    lists: Option<SystemTime>,
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Newest modification time of the lists directory and the files in it: `apt update` replaces
/// index files by renaming into the directory (its mtime moves), and a `Release` file that
/// changed is rewritten.
fn lists_newest(dir: &Path) -> Option<SystemTime> {
    let mut newest = mtime(dir)?;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name == "lock" || name == "partial" || name == "auxfiles" {
                continue;
            }
            if let Ok(t) = entry.metadata().and_then(|m| m.modified()) {
                newest = newest.max(t);
            }
        }
    }
    Some(newest)
}

/// The APT collector.
#[derive(Debug)]
pub struct AptCollector {
    host: Host,
    interval: Duration,
    timeout: Duration,
    first_wait: FirstRunWait,
    refresher: Option<Refresher<Result<u64, CountError>>>,
    cmd: Cmd,
    last_trigger: Option<Instant>,
    last_fingerprint: Option<Fingerprint>,
}

impl AptCollector {
    /// A collector for `host` with the `apt` config section.
    pub fn new(host: Host, config: &AptConfig) -> Self {
        let mut cmd = Cmd::new(&config.apt_get)
            // The summary line is parsed; translations would change it.
            .env("LANG", "C")
            .env("LC_ALL", "C")
            .timeout(Duration::from_secs(config.timeout))
            .max_output(MAX_OUTPUT_BYTES)
            // -s never changes anything; NoLocking lets it run while apt or unattended-upgrades
            // holds the lock.
            .args(["-s", "-q", "-o", "Debug::NoLocking=true"]);
        if host.root() != Path::new("/") {
            // A host filesystem mounted elsewhere (container): read its dpkg and apt state.
            let mut dir = std::ffi::OsString::from("Dir=");
            dir.push(host.root());
            cmd = cmd.args([std::ffi::OsString::from("-o"), dir]);
        }
        let cmd = cmd.args(["dist-upgrade"]);
        let timeout = Duration::from_secs(config.timeout);
        Self {
            host,
            interval: Duration::from_secs(config.interval),
            timeout,
            first_wait: FirstRunWait::usual(FIRST_COUNT_WAIT.min(timeout)),
            refresher: None,
            cmd,
            last_trigger: None,
            last_fingerprint: None,
        }
    }

    fn fingerprint(&self) -> Fingerprint {
        Fingerprint {
            dpkg_status: mtime(&self.host.path(DPKG_STATUS)),
            lists: lists_newest(&self.host.path(APT_LISTS)),
        }
    }

    fn count(cmd: &Cmd) -> Result<u64, CountError> {
        match cmd.run() {
            Ok(out) => parse_upgrade_summary(&String::from_utf8_lossy(&out.stdout))
                .map_err(|e| CountError::Failed(format!("{}: {e}", cmd.program()))),
            Err(e @ ExecError::NotFound { .. }) => Err(CountError::NotPresent(format!("cannot count upgrades: {e}"))),
            Err(e) => Err(CountError::Failed(e.to_string())),
        }
    }
}

impl Collector for AptCollector {
    fn name(&self) -> &'static str {
        SOURCE.name
    }

    fn wait_for_first_result(&mut self) -> Option<Duration> {
        let patient = self.timeout.saturating_add(FIRST_COUNT_GRACE);
        self.first_wait.patient = patient;
        Some(patient)
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        let status_path = self.host.path(DPKG_STATUS);
        if !status_path.exists() {
            return Err(CollectError::NotPresent(format!("no {}: not a dpkg/APT system", status_path.display())));
        }
        let fingerprint = self.fingerprint();
        let first = self.refresher.is_none();
        let refresher = match &self.refresher {
            Some(r) => r,
            None => {
                let cmd = self.cmd.clone();
                let r = Refresher::spawn("dcmon-apt", move || Self::count(&cmd))
                    .map_err(|e| anyhow::anyhow!("cannot start the apt thread: {e}"))?;
                self.refresher.insert(r)
            }
        };

        let due = self.last_trigger.is_none_or(|t| t.elapsed() >= self.interval)
            || self.last_fingerprint != Some(fingerprint);
        if due && refresher.trigger() {
            self.last_trigger = Some(Instant::now());
            self.last_fingerprint = Some(fingerprint);
        }
        if first {
            refresher.wait_first(self.first_wait, &format!("{} (counting pending upgrades)", self.cmd.program()));
        }

        let reboot = self.host.path(REBOOT_REQUIRED);
        match reboot.try_exists() {
            Ok(flag) => out.push(Sample::count("apt_reboot_required", u64::from(flag))),
            Err(e) => {
                return Err(anyhow::anyhow!("cannot check {}: {e}", reboot.display()).into());
            }
        }
        if let Some(newest) = fingerprint.lists {
            // A clock set back makes the lists look newer than now: report 0, not a negative age.
            let age = SystemTime::now().duration_since(newest).unwrap_or(Duration::ZERO);
            out.push(Sample::gauge("apt_lists_age_seconds", age.as_secs_f64().floor()));
        }
        match refresher.latest() {
            Some(Ok(n)) => out.push(Sample::count("apt_upgrades_pending", n)),
            Some(Err(CountError::NotPresent(why))) => return Err(CollectError::NotPresent(why)),
            Some(Err(CountError::Failed(why))) => return Err(anyhow::anyhow!(why).into()),
            // The first count is still running: report the rest now, the count when it is done.
            None => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// Captured from `LANG=C apt-get -s -o Debug::NoLocking=1 dist-upgrade` on Debian 12
    /// (shortened package list).
    const DEBIAN12_DIST_UPGRADE: &str = "\
Reading package lists...
Building dependency tree...
Reading state information...
Calculating upgrade...
The following packages will be upgraded:
  appstream apt apt-transport-https base-files bash ca-certificates
132 upgraded, 0 newly installed, 0 to remove and 0 not upgraded.
Inst base-files [12.4+deb12u11] (12.4+deb12u15 Debian:12.15/oldstable [amd64])
Inst bash [5.2.15-2+b8] (5.2.15-2+b13 Debian:12.15/oldstable [amd64])
Conf base-files (12.4+deb12u15 Debian:12.15/oldstable [amd64])
";

    #[test]
    fn summary_counts_upgraded_and_held() {
        assert_eq!(parse_upgrade_summary(DEBIAN12_DIST_UPGRADE), Ok(132));
        assert_eq!(
            parse_upgrade_summary(
                "Calculating upgrade...\n0 upgraded, 0 newly installed, 0 to remove and 0 not upgraded.\n"
            ),
            Ok(0)
        );
        // Held packages show up as "not upgraded" and are still pending.
        assert_eq!(parse_upgrade_summary("5 upgraded, 2 newly installed, 1 to remove and 3 not upgraded.\n"), Ok(8));
    }

    #[test]
    fn missing_or_garbled_summary_is_an_error() {
        let e = parse_upgrade_summary("E: Could not open lock file\n").expect_err("no summary");
        assert!(e.contains("summary"), "{e}");
        let e = parse_upgrade_summary("x upgraded, 0 newly installed, 0 to remove and 0 not upgraded.")
            .expect_err("garbled");
        assert!(e.contains("\"x\""), "{e}");
    }

    fn fake_root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("var/lib/dpkg")).expect("mkdir");
        std::fs::write(dir.path().join("var/lib/dpkg/status"), "").expect("write");
        std::fs::create_dir_all(dir.path().join("var/lib/apt/lists")).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("run")).expect("mkdir");
        dir
    }

    /// A fake apt-get that prints `summary` and appends one line to `calls` per run.
    fn fake_apt_get(dir: &Path, summary: &str) -> std::path::PathBuf {
        let script = dir.join("apt-get");
        std::fs::write(&script, format!("#!/bin/sh\necho \"$LANG $*\" >> {}/calls\necho '{summary}'\n", dir.display()))
            .expect("write");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        script
    }

    fn value(samples: &[Sample], name: &str) -> Option<f64> {
        samples.iter().find(|s| s.name == name).map(|s| s.value.as_f64())
    }

    #[test]
    fn reboot_flag_age_and_cached_count_from_a_temp_root() {
        let root = fake_root();
        let tools = tempfile::tempdir().expect("tempdir");
        let apt_get = fake_apt_get(tools.path(), "7 upgraded, 0 newly installed, 0 to remove and 1 not upgraded.");
        let config = AptConfig { apt_get, ..AptConfig::default() };
        let mut c = AptCollector::new(Host::new(root.path()), &config);
        let mut out = Vec::new();
        c.collect(&mut out).expect("collect");
        assert_eq!(value(&out, "apt_upgrades_pending"), Some(8.0));
        assert_eq!(value(&out, "apt_reboot_required"), Some(0.0));
        let age = value(&out, "apt_lists_age_seconds").expect("age");
        assert!((0.0..5.0).contains(&age), "{age}");

        std::fs::write(root.path().join("run/reboot-required"), "*** System restart required ***\n").expect("write");
        out.clear();
        c.collect(&mut out).expect("collect");
        assert_eq!(value(&out, "apt_reboot_required"), Some(1.0));
        // Nothing changed and the interval has not passed: still one apt-get run.
        let calls = std::fs::read_to_string(tools.path().join("calls")).expect("calls");
        assert_eq!(calls.lines().count(), 1, "{calls}");
        let first = calls.lines().next().unwrap_or_default();
        assert!(first.starts_with("C -s"), "{first}");
        assert!(first.contains("Dir="), "temp root must be passed: {first}");
        assert!(first.ends_with("dist-upgrade"), "{first}");

        // dpkg's status changing (a package was installed) triggers a recount.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(root.path().join("var/lib/dpkg/status"), "Package: x\n").expect("write");
        let t = filetime_bump(&root.path().join("var/lib/dpkg/status"));
        assert!(t, "could not move the status mtime");
        c.collect(&mut out).expect("collect");
        if let Some(r) = &c.refresher {
            r.wait_past(1, Duration::from_secs(5));
        }
        let calls = std::fs::read_to_string(tools.path().join("calls")).expect("calls");
        assert_eq!(calls.lines().count(), 2, "{calls}");
    }

    /// Move a file's mtime one minute into the future, so the change is visible even on
    /// filesystems with coarse timestamps.
    fn filetime_bump(path: &Path) -> bool {
        let Ok(f) = std::fs::File::options().write(true).open(path) else {
            return false;
        };
        f.set_modified(SystemTime::now() + Duration::from_secs(60)).is_ok()
    }

    #[test]
    fn no_dpkg_means_not_present_and_missing_apt_get_too() {
        let empty = tempfile::tempdir().expect("tempdir");
        let mut c = AptCollector::new(Host::new(empty.path()), &AptConfig::default());
        assert!(matches!(c.collect(&mut Vec::new()), Err(CollectError::NotPresent(_))));
        let root = fake_root();
        let config = AptConfig { apt_get: "/nonexistent/apt-get".into(), ..AptConfig::default() };
        let mut c = AptCollector::new(Host::new(root.path()), &config);
        let err = c.collect(&mut Vec::new()).expect_err("no apt-get");
        assert!(matches!(&err, CollectError::NotPresent(w) if w.contains("/nonexistent/apt-get")), "{err}");
    }

    #[test]
    fn garbled_output_fails_naming_the_tool() {
        let root = fake_root();
        let tools = tempfile::tempdir().expect("tempdir");
        let config =
            AptConfig { apt_get: fake_apt_get(tools.path(), "E: dpkg was interrupted"), ..AptConfig::default() };
        let mut c = AptCollector::new(Host::new(root.path()), &config);
        let mut out = Vec::new();
        let err = c.collect(&mut out).expect_err("garbled");
        assert!(err.to_string().contains("apt-get"), "{err}");
        // The cheap metrics are still reported.
        assert_eq!(value(&out, "apt_reboot_required"), Some(0.0));
    }
}
