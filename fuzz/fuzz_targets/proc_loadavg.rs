//! /proc/loadavg.
#![no_main]
use dcmon_agent::collector::os::parse_loadavg;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let Some(text) = common::text(data) else { return };
    if let Ok(samples) = parse_loadavg(text) {
        common::check_samples("/proc/loadavg", &samples);
    }
});
