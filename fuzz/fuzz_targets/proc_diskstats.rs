//! /proc/diskstats, whole disks told apart by name and by a /sys/block list.
#![no_main]
use std::collections::HashSet;

use dcmon_agent::collector::disk::{DiskCounters, WholeDisks, parse_diskstats};
use dcmon_agent::config::DeviceFilter;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let Some(text) = common::text(data) else { return };
    let filter = DeviceFilter::default_disks();
    let by_name = parse_diskstats(text, &WholeDisks::ByName, &filter);
    // Every other device name counts as listed in /sys/block.
    let listed: HashSet<String> =
        text.lines().filter_map(|l| l.split_whitespace().nth(2)).step_by(2).map(str::to_owned).collect();
    let sysfs = parse_diskstats(text, &WholeDisks::Sysfs(listed.clone()), &filter);
    assert_eq!(by_name.is_ok(), sysfs.is_ok(), "the whole-disk rule cannot change whether a file parses");
    if let Ok(disks) = sysfs {
        assert!(disks.iter().all(|d| listed.contains(&d.device)), "only listed disks reported");
        let samples: Vec<_> = disks.iter().flat_map(DiskCounters::samples).collect();
        common::check_samples("/proc/diskstats", &samples);
    }
});
