//! /sys/block/DEV/stat, checked against the same counters as a /proc/diskstats line.
#![no_main]
use dcmon_agent::collector::disk::{WholeDisks, parse_block_stat, parse_diskstats};
use dcmon_agent::config::DeviceFilter;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let Some(text) = common::text(data) else { return };
    let Ok(counters) = parse_block_stat("vda", text) else { return };
    common::check_samples("/sys/block/vda/stat", &counters.samples());
    // A stat file is a diskstats line without major, minor and name: both parsers must agree.
    if !text.contains('\n') {
        let line = format!("254 0 vda {text}");
        if let Ok(from_diskstats) = parse_diskstats(&line, &WholeDisks::ByName, &DeviceFilter::default_disks()) {
            assert_eq!(from_diskstats, [counters], "{line:?}");
        }
    }
});
