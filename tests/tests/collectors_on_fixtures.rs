//! The OS collectors on captured /proc trees (a Debian 12 virtio VM, a GPU server with partitions, NVMe, md,
//! dm and many interfaces, a container without /sys) and on this host's live /proc and /sys.
//!
//! The fixtures cover the three disk sources: the virtio VM reports 1 of its 11 devices (per-disk
//! /sys/block/DEV/stat files), the GPU server 7 of 13 (/proc/diskstats is cheaper), the
//! container has no /sys (/proc/diskstats, partitions told by name).

use std::collections::BTreeSet;
use std::path::Path;

use dcmon_agent::batch::{Sample, Value};
use dcmon_agent::collector::disk::{DiskCollector, DiskCounters, WholeDisks, parse_block_stat, parse_diskstats};
use dcmon_agent::collector::{self, Collector};
use dcmon_agent::config::Config;
use dcmon_agent::config::DeviceFilter;
use dcmon_agent::filter::PatternList;
use dcmon_agent::host::Host;
use dcmon_tests::fixture_host;

/// The OS collectors only: the hardware exporters have tests of their own.
fn config_for(root: &Path) -> Config {
    let exporters = dcmon_agent::config::Exporters::none();
    Config { host_root: root.to_owned(), exporters, ..Config::default() }
}

/// Every collector's samples; a source the host does not have (no InfiniBand, no EDAC, no
/// /proc/pressure in a fixture tree) sends nothing, any other error fails the test.
fn collect_all(root: &Path) -> Vec<Sample> {
    let mut out = Vec::new();
    for mut c in collector::from_config(&config_for(root)) {
        match c.collect(&mut out) {
            Ok(()) | Err(collector::CollectError::NotPresent(_)) => {}
            Err(e) => panic!("collector {} on {}: {e:#}", c.name(), root.display()),
        }
    }
    out
}

fn value(samples: &[Sample], name: &str, label: Option<(&str, &str)>) -> Option<Value> {
    samples
        .iter()
        .find(|s| s.name == name && label.is_none_or(|(k, v)| s.labels.iter().any(|(lk, lv)| *lk == k && lv == v)))
        .map(|s| s.value)
}

fn label_set(samples: &[Sample], name: &str, key: &str) -> Vec<String> {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter_map(|s| s.labels.iter().find(|(k, _)| *k == key).map(|(_, v)| v.to_string()))
        .collect()
}

#[test]
fn gpu_server_fixture_exact_values() {
    let s = collect_all(&fixture_host("gpu-server"));
    assert_eq!(value(&s, "cpu_load_1m", None), Some(Value::Gauge(12.48)));
    assert_eq!(value(&s, "cpu_load_5m", None), Some(Value::Gauge(10.07)));
    assert_eq!(value(&s, "cpu_load_15m", None), Some(Value::Gauge(9.51)));
    let (total_kib, avail_kib) = (1_056_544_760_u64, 987_654_320_u64);
    assert_eq!(value(&s, "memory_total_bytes", None), Some(Value::Count(total_kib * 1024)));
    assert_eq!(value(&s, "memory_available_bytes", None), Some(Value::Count(avail_kib * 1024)));
    assert_eq!(value(&s, "memory_used_bytes", None), Some(Value::Count((total_kib - avail_kib) * 1024)));
    let pct = (total_kib - avail_kib) as f64 * 1024.0 * 100.0 / (total_kib as f64 * 1024.0);
    assert_eq!(value(&s, "memory_usage_percent", None), Some(Value::Gauge(pct)));

    // Whole disks only: no partitions (sda1, nvme0n1p1), no loop or optical drives.
    assert_eq!(
        label_set(&s, "disk_reads_total", "device"),
        ["sda", "nvme0n1", "nvme1n1", "nvme10n1", "md0", "dm-0", "dm-1"]
    );
    let sda = Some(("device", "sda"));
    assert_eq!(value(&s, "disk_reads_total", sda), Some(Value::Count(1_204_551)));
    assert_eq!(value(&s, "disk_read_bytes_total", sda), Some(Value::Count(98_012_344 * 512)));
    assert_eq!(value(&s, "disk_writes_total", sda), Some(Value::Count(8_812_003)));
    assert_eq!(value(&s, "disk_write_bytes_total", sda), Some(Value::Count(301_221_800 * 512)));
    let nvme = Some(("device", "nvme0n1"));
    assert_eq!(value(&s, "disk_write_bytes_total", nvme), Some(Value::Count(91_233_400_112 * 512)));

    // Physical links, bonds and VLANs; not loopback, containers, bridges or VPN tunnels.
    assert_eq!(
        label_set(&s, "network_receive_bytes_total", "interface"),
        ["bond0", "bond0.100", "eno1", "eno2", "ib0"]
    );
    let ib0 = Some(("interface", "ib0"));
    assert_eq!(value(&s, "network_receive_bytes_total", ib0), Some(Value::Count(18_446_744_073_709_551_000)));
    assert_eq!(value(&s, "network_transmit_bytes_total", ib0), Some(Value::Count(77_120_033_448_811)));
    assert_eq!(Host::new(fixture_host("gpu-server")).machine_id().as_deref(), Some("6b1c0e2f9a8d4e7c8f1a2b3c4d5e6f70"));
}

#[test]
fn container_without_sysfs_finds_the_same_whole_disks_by_name() {
    let with_sysfs = collect_all(&fixture_host("gpu-server"));
    let without = collect_all(&fixture_host("container-no-sysfs"));
    assert_eq!(label_set(&without, "disk_reads_total", "device"), label_set(&with_sysfs, "disk_reads_total", "device"));
    assert_eq!(
        Host::new(fixture_host("container-no-sysfs")).machine_id().as_deref(),
        Some("0f0e0d0c0b0a09080706050403020100"),
        "falls back to /var/lib/dbus/machine-id"
    );
}

#[test]
fn virtio_vm_fixture_reports_its_disk() {
    // The original client matched only sd* and nvme* and reported no disk at all on virtio.
    let s = collect_all(&fixture_host("debian12-virtio"));
    assert_eq!(label_set(&s, "disk_reads_total", "device"), ["vda"]);
    let vda = Some(("device", "vda"));
    assert_eq!(value(&s, "disk_reads_total", vda), Some(Value::Count(33_790)));
    assert_eq!(value(&s, "disk_read_bytes_total", vda), Some(Value::Count(4_713_402 * 512)));
    assert_eq!(value(&s, "disk_writes_total", vda), Some(Value::Count(11_411)));
    assert_eq!(value(&s, "disk_write_bytes_total", vda), Some(Value::Count(4_846_368 * 512)));
    assert_eq!(label_set(&s, "network_receive_bytes_total", "interface"), ["eth0"], "lo and ifb* are skipped");
    assert_eq!(value(&s, "network_receive_bytes_total", Some(("interface", "eth0"))), Some(Value::Count(225_445_968)));
    assert_eq!(value(&s, "network_transmit_bytes_total", Some(("interface", "eth0"))), Some(Value::Count(327_439)));
}

#[test]
fn first_collection_already_has_cpu_usage() {
    // The baseline is taken when the collector is built; the collection then sees new ticks.
    let dir = tempfile::tempdir().expect("tempdir");
    let proc_dir = dir.path().join("proc");
    std::fs::create_dir_all(&proc_dir).expect("mkdir");
    for f in ["loadavg", "meminfo"] {
        std::fs::copy(fixture_host("gpu-server").join("proc").join(f), proc_dir.join(f)).expect("copy");
    }
    std::fs::write(proc_dir.join("stat"), "cpu  1000 0 1000 7000 1000 0 0 0 0 0\n").expect("write");
    let mut os = collector::os::OsCollector::new(Host::new(dir.path()));
    // +300 user, +100 system, +100 steal busy; +400 idle, +100 iowait idle -> 50 %.
    std::fs::write(proc_dir.join("stat"), "cpu  1300 0 1100 7400 1100 0 0 100 0 0\n").expect("write");
    let mut out = Vec::new();
    os.collect(&mut out).expect("collect");
    assert_eq!(value(&out, "cpu_usage_percent", None), Some(Value::Gauge(50.0)));
}

#[test]
fn missing_proc_files_are_reported_with_their_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut out = Vec::new();
    let err = collector::os::OsCollector::new(Host::new(dir.path())).collect(&mut out).expect_err("empty root");
    let msg = format!("{err:#}");
    assert!(msg.contains("proc/loadavg") && msg.contains("proc/meminfo"), "{msg}");
    let filter = dcmon_agent::config::DeviceFilter::default_disks();
    let err =
        collector::disk::DiskCollector::new(Host::new(dir.path()), filter).collect(&mut out).expect_err("no diskstats");
    assert!(matches!(err, collector::CollectError::NotPresent(_)), "{err}");
}

#[test]
fn live_host_smoke() {
    let s = collect_all(Path::new("/"));
    for name in [
        "cpu_load_1m",
        "cpu_load_5m",
        "cpu_load_15m",
        "memory_total_bytes",
        "memory_available_bytes",
        "memory_used_bytes",
        "memory_usage_percent",
    ] {
        assert!(value(&s, name, None).is_some(), "{name} missing on this host");
    }
    let Some(Value::Count(total)) = value(&s, "memory_total_bytes", None) else { panic!("memory_total_bytes") };
    let Some(Value::Count(used)) = value(&s, "memory_used_bytes", None) else { panic!("memory_used_bytes") };
    assert!(total > 0 && used <= total);
    // Cross-check against sysfs, an independent source: every whole disk that is not a loop,
    // ram, zram, optical or floppy device, and every interface the default filter keeps.
    let defaults = Config::default();
    let sys_disks: BTreeSet<String> = std::fs::read_dir("/sys/block")
        .expect("/sys/block")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| defaults.disks.allows(n))
        .collect();
    let got_disks: BTreeSet<String> = label_set(&s, "disk_reads_total", "device").into_iter().collect();
    assert_eq!(got_disks, sys_disks);
    let sys_ifaces: BTreeSet<String> = std::fs::read_dir("/sys/class/net")
        .expect("/sys/class/net")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| defaults.interfaces.allows(n))
        .collect();
    let got_ifaces: BTreeSet<String> = label_set(&s, "network_receive_bytes_total", "interface").into_iter().collect();
    assert_eq!(got_ifaces, sys_ifaces);
}

/// Every /sys/block/DEV/stat under `root` with the counters it holds.
fn block_stats(root: &Path) -> Vec<DiskCounters> {
    let dir = root.join("sys/block");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    names
        .iter()
        .map(|n| {
            let path = dir.join(n).join("stat");
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            parse_block_stat(n, &text).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
        })
        .collect()
}

/// The /proc/diskstats counters of every whole disk in `stats`' names, in the same order.
fn diskstats_of(diskstats: &str, stats: &[DiskCounters]) -> Vec<DiskCounters> {
    let all = DeviceFilter { include: PatternList::match_all(), exclude: PatternList::default() };
    let parsed = parse_diskstats(diskstats, &WholeDisks::ByName, &all).expect("parse /proc/diskstats");
    stats
        .iter()
        .map(|s| {
            parsed
                .iter()
                .find(|d| d.device == s.device)
                .cloned()
                .unwrap_or_else(|| panic!("{} not in diskstats", s.device))
        })
        .collect()
}

#[test]
fn fixture_stat_files_hold_their_diskstats_lines() {
    for host in ["debian12-virtio", "gpu-server"] {
        let root = fixture_host(host);
        let stats = block_stats(&root);
        assert!(!stats.is_empty(), "{host}");
        let diskstats = std::fs::read_to_string(root.join("proc/diskstats")).expect("diskstats");
        assert_eq!(stats, diskstats_of(&diskstats, &stats), "{host}: /sys/block/*/stat vs /proc/diskstats");
    }
}

#[test]
fn live_stat_files_and_diskstats_agree() {
    // Counters move under I/O: compare only while /proc/diskstats holds still around the reads.
    for _ in 0..200 {
        let before = std::fs::read_to_string("/proc/diskstats").expect("read /proc/diskstats");
        let stats = block_stats(Path::new("/"));
        if std::fs::read_to_string("/proc/diskstats").expect("read /proc/diskstats") != before {
            std::thread::sleep(std::time::Duration::from_millis(10));
            continue;
        }
        assert!(stats.iter().any(|s| s.reads > 0 && s.writes > 0), "no disk with I/O to compare: {stats:?}");
        assert_eq!(stats, diskstats_of(&before, &stats), "/sys/block/*/stat vs /proc/diskstats on this host");
        return;
    }
    panic!("/proc/diskstats kept changing for 200 tries");
}

#[test]
fn live_disk_samples_equal_what_diskstats_gives() {
    // The default filter reports the real disks; where they are a few of the host's block
    // devices (e.g. vda of vda, loop0-7 and zram0) they come from their stat files. The samples
    // must be those /proc/diskstats gives, in its order.
    let mut c = DiskCollector::new(Host::default(), DeviceFilter::default_disks());
    for _ in 0..200 {
        let before = std::fs::read_to_string("/proc/diskstats").expect("read /proc/diskstats");
        let mut got = Vec::new();
        c.collect(&mut got).expect("collect");
        if std::fs::read_to_string("/proc/diskstats").expect("read /proc/diskstats") != before {
            std::thread::sleep(std::time::Duration::from_millis(10));
            continue;
        }
        let whole = WholeDisks::Sysfs(block_stats(Path::new("/")).into_iter().map(|s| s.device).collect());
        let want: Vec<Sample> = parse_diskstats(&before, &whole, &DeviceFilter::default_disks())
            .expect("parse /proc/diskstats")
            .iter()
            .flat_map(DiskCounters::samples)
            .collect();
        assert!(!want.is_empty(), "this host reports no disk");
        if !c.is_per_disk() {
            // Most of this host's block devices are reported: diskstats is the cheaper source.
            eprintln!("note: this host's disks are read from /proc/diskstats, not their stat files");
        }
        assert_eq!(got, want);
        return;
    }
    panic!("/proc/diskstats kept changing for 200 tries");
}
