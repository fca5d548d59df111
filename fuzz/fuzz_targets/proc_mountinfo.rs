//! `/proc/self/mountinfo`.
#![no_main]
use dcmon_agent::collector::filesystems::parse_mountinfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (mounts, errors) = parse_mountinfo(&text);
    assert!(mounts.len() + errors.len() <= text.lines().count(), "{mounts:?} {errors:?}");
    for (i, m) in mounts.iter().enumerate() {
        assert!(m.mount_point.starts_with('/') && !m.fstype.is_empty(), "{m:?}");
        assert!(mounts[i + 1..].iter().all(|n| n.mount_point != m.mount_point), "mount points repeat: {mounts:?}");
    }
    assert!(errors.iter().all(|e| e.starts_with("line ")), "{errors:?}");
});
