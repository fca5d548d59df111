//! Disks coming and going on the live host, read from their /sys/block/DEV/stat files: loop
//! devices added and removed through /dev/loop-control (which needs root; CI runs as root).

mod common;

use std::time::Duration;

use common::{LoopDevice, require_root};
use dcmon_agent::batch::Sample;
use dcmon_agent::collector::Collector;
use dcmon_agent::collector::disk::{DiskCollector, RELIST_EVERY};
use dcmon_agent::config::DeviceFilter;
use dcmon_agent::filter::PatternList;
use dcmon_agent::host::Host;

fn devices(c: &mut DiskCollector) -> Vec<String> {
    let mut out: Vec<Sample> = Vec::new();
    c.collect(&mut out).unwrap_or_else(|e| panic!("collect: {e:#}"));
    out.iter().step_by(4).map(|s| s.labels[0].1.to_string()).collect()
}

#[test]
fn disks_coming_and_going_are_followed() {
    require_root("adding and removing loop devices");
    let dev = LoopDevice::add();
    let name = dev.name();
    let filter = DeviceFilter { include: PatternList::new([name.as_str()]), exclude: PatternList::default() };
    let collector = |every: Duration| DiskCollector::new(Host::default(), filter.clone()).relist_every(every);
    // One disk of this host's block devices: read from its stat file.
    let (mut slow, mut fast) = (collector(RELIST_EVERY), collector(Duration::ZERO));
    assert_eq!(devices(&mut slow), [name.as_str()]);
    assert!(slow.is_per_disk(), "one disk of several devices");
    assert_eq!(devices(&mut fast), [name.as_str()]);

    // Removed: noticed at once (its open stat file answers ENODEV), and not an error.
    dev.remove();
    assert_eq!(devices(&mut slow), Vec::<String>::new());
    assert_eq!(devices(&mut fast), Vec::<String>::new());

    // Added again: found at the next listing of /sys/block, not before.
    dev.readd();
    assert_eq!(devices(&mut slow), Vec::<String>::new(), "listed again only every {RELIST_EVERY:?}");
    assert_eq!(devices(&mut fast), [name.as_str()]);

    // Replaced under the same name between two rounds: the stale open file is reopened.
    let mut holding = collector(RELIST_EVERY);
    assert_eq!(devices(&mut holding), [name.as_str()]);
    dev.remove();
    dev.readd();
    assert_eq!(devices(&mut holding), [name.as_str()]);
    assert_eq!(devices(&mut holding), [name.as_str()]);
}

fn run(cmd: &[&str]) {
    let out = std::process::Command::new(cmd[0]).args(&cmd[1..]).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// `disk_write_bytes_total` of `c`'s one disk.
fn write_bytes(c: &mut DiskCollector) -> f64 {
    let mut out: Vec<Sample> = Vec::new();
    c.collect(&mut out).unwrap_or_else(|e| panic!("collect: {e:#}"));
    let bytes: Vec<f64> = out.iter().filter(|s| s.name == "disk_write_bytes_total").map(|s| s.value.as_f64()).collect();
    assert_eq!(bytes.len(), 1, "one disk expected: {out:?}");
    bytes[0]
}

/// The kernel counts disk I/O in 512-byte sectors whatever a disk's logical block size
/// (`dcmon_common::SECTOR_BYTES`): 64 KiB written to a loop device with 4 KiB logical blocks
/// shows as 64 KiB more `disk_write_bytes_total`, and its size in sectors is its file's size.
#[test]
fn bytes_count_512_byte_sectors_on_a_disk_with_4k_blocks() {
    require_root("setting up a loop device with 4 KiB blocks");
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("disk.img");
    let file_bytes: u64 = 4 << 20;
    std::fs::File::create(&backing).and_then(|f| f.set_len(file_bytes)).expect("backing file");
    let dev = LoopDevice::add();
    let (name, path) = (dev.name(), format!("/dev/{}", dev.name()));
    run(&["losetup", "--sector-size", "4096", &path, backing.to_str().expect("utf-8 path")]);
    let sys = |file: &str| -> u64 {
        let text = std::fs::read_to_string(format!("/sys/block/{name}/{file}")).expect(file);
        text.trim().parse().unwrap_or_else(|_| panic!("{file}: {text:?}"))
    };
    assert_eq!(sys("queue/logical_block_size"), 4096, "the test needs a disk whose blocks are not sectors");
    assert_eq!(sys("size") * dcmon_common::SECTOR_BYTES, file_bytes, "/sys/block/{name}/size in sectors");
    let filter = DeviceFilter { include: PatternList::new([name.as_str()]), exclude: PatternList::default() };
    let mut collector = DiskCollector::new(Host::default(), filter);
    let before = write_bytes(&mut collector);
    run(&["dd", "if=/dev/zero", &format!("of={path}"), "bs=65536", "count=1", "oflag=direct"]);
    let after = write_bytes(&mut collector);
    assert_eq!(after - before, 65536.0, "bytes written, counted from sectors");
    run(&["losetup", "-d", &path]);
}
