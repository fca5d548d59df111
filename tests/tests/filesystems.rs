//! Filesystems collector on this host: the root filesystem's numbers against `df`, and a FUSE
//! mount that never answers statfs, which fails alone, on time, holding one thread.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use dcmon_agent::batch::Sample;
use dcmon_agent::collector::Collector as _;
use dcmon_agent::collector::filesystems::{FilesystemsCollector, FilesystemsConfig};
use dcmon_agent::config::DeviceFilter;
use dcmon_agent::filter::PatternList;
use dcmon_agent::host::Host;
use dcmon_tests::require_root;

fn value(out: &[Sample], name: &str, mountpoint: &str) -> Option<u64> {
    let found: Vec<&Sample> = out
        .iter()
        .filter(|s| s.name == name && s.labels.iter().any(|(k, v)| *k == "mountpoint" && v == mountpoint))
        .collect();
    assert!(found.len() <= 1, "{name} {mountpoint} reported {} times", found.len());
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "counts sent as integers")]
    found.first().map(|s| s.value.as_f64() as u64)
}

/// `df -B1` of `/`: size, used, available bytes, inodes, free inodes.
fn df_root() -> [u64; 5] {
    let out = Command::new("df")
        .args(["-B1", "--output=size,used,avail,itotal,iavail", "/"])
        .output()
        .expect("run df (coreutils)");
    assert!(out.status.success(), "df: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let nums: Vec<u64> = text
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .map(|f| f.parse().unwrap_or_else(|_| panic!("df printed {text:?}")))
        .collect();
    nums.try_into().unwrap_or_else(|_| panic!("df printed {text:?}"))
}

/// Threads of this process named `dcmon-statfs`.
fn statfs_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "dcmon-statfs"))
        .count()
}

fn config(dir: &Path) -> FilesystemsConfig {
    FilesystemsConfig {
        // Every type, tmpfs too (the mount after the hung one is a tmpfs of a known size).
        fstypes: DeviceFilter { include: PatternList::match_all(), exclude: PatternList::default() },
        mount_points: DeviceFilter {
            include: PatternList::new(["/".to_owned(), format!("{}/*", dir.display())]),
            exclude: PatternList::default(),
        },
        timeout: 1,
    }
}

#[test]
fn root_agrees_with_df_and_a_hung_fuse_mount_fails_alone_with_one_thread() {
    use common::fuse::HungFuseFile;
    require_root("mounting FUSE and tmpfs");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mut c = FilesystemsCollector::new(Host::default(), &config(d));

    // The root filesystem, between two df runs (other processes write meanwhile).
    let before = df_root();
    let mut out = Vec::new();
    c.collect(&mut out).expect("collect");
    let after = df_root();
    let within = |v: Option<u64>, a: u64, b: u64, what: &str| {
        let v = v.unwrap_or_else(|| panic!("no {what} for /"));
        let slack = 64 << 20;
        assert!(v + slack >= a.min(b) && v <= a.max(b) + slack, "{what}: {v} against df {a} and {b}");
    };
    assert_eq!(value(&out, "filesystem_size_bytes", "/"), Some(before[0]));
    assert_eq!(value(&out, "filesystem_files", "/"), Some(before[3]));
    within(value(&out, "filesystem_available_bytes", "/"), before[2], after[2], "available bytes");
    within(value(&out, "filesystem_free_bytes", "/"), before[0] - before[1], after[0] - after[1], "free bytes");
    let files_free = value(&out, "filesystem_files_free", "/").expect("files free");
    assert!(files_free.abs_diff(before[4]) < 10_000, "free inodes {files_free} against df {}", before[4]);
    assert_eq!(value(&out, "filesystem_statfs_ok", "/"), Some(1));

    // A FUSE file whose daemon answers one statfs and then nothing, and after it a tmpfs.
    let hung = d.join("hung");
    std::fs::write(&hung, "").expect("touch");
    let fuse = HungFuseFile::mount(&hung);
    let after_mount = d.join("after");
    std::fs::create_dir(&after_mount).expect("mkdir");
    let status = Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "dcmon-after"]).arg(&after_mount).status();
    assert!(status.expect("run mount").success(), "mount tmpfs");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&after_mount);
    let (hung_s, after_s) = (hung.display().to_string(), after_mount.display().to_string());

    let round = |c: &mut FilesystemsCollector| {
        let mut out = Vec::new();
        let start = Instant::now();
        c.collect(&mut out).expect("collect");
        (out, start.elapsed())
    };
    // Round 1: the daemon answers.
    let (out, took) = round(&mut c);
    assert_eq!(value(&out, "filesystem_statfs_ok", &hung_s), Some(1), "{took:?}");
    assert_eq!(fuse.statfs_answered(), 1);
    assert_eq!(value(&out, "filesystem_size_bytes", &after_s), Some(1 << 20));
    // Round 2: the statfs hangs; the round gives up on it after the 1 s timeout and goes on.
    let (out, took) = round(&mut c);
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "{took:?}");
    assert_eq!(value(&out, "filesystem_statfs_ok", &hung_s), Some(0));
    assert_eq!(value(&out, "filesystem_size_bytes", &hung_s), None);
    assert_eq!(value(&out, "filesystem_readonly", &hung_s), Some(0), "from mountinfo, statfs or not");
    assert_eq!(value(&out, "filesystem_size_bytes", &after_s), Some(1 << 20), "the mount after it is read");
    assert_eq!(value(&out, "filesystem_statfs_ok", "/"), Some(1));
    // Later rounds: no new call on the hung mount, so no wait and no new thread.
    for _ in 0..3 {
        let (out, took) = round(&mut c);
        assert!(took < Duration::from_millis(500), "a round waited for the hung mount again: {took:?}");
        assert_eq!(value(&out, "filesystem_statfs_ok", &hung_s), Some(0));
        assert_eq!(value(&out, "filesystem_size_bytes", &after_s), Some(1 << 20));
        assert_eq!(c.runner().stuck(), 1);
        assert_eq!(statfs_threads(), 2, "one worker and the one stuck call");
    }
    // The daemon answers at last (with EIO): the stuck call returns and its thread ends.
    drop(fuse);
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.runner().stuck() > 0 || statfs_threads() > 1 {
        assert!(Instant::now() < deadline, "the stuck call never returned: {} threads", statfs_threads());
        std::thread::sleep(Duration::from_millis(50));
    }
    let (out, _) = round(&mut c);
    assert_eq!(value(&out, "filesystem_statfs_ok", &hung_s), None, "unmounted");
    assert_eq!(value(&out, "filesystem_statfs_ok", &after_s), Some(1));
}
