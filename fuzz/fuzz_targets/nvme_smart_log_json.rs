//! `nvme smart-log DEV -o json` output, any nvme-cli version.
#![no_main]
use dcmon_agent::collector::nvme::parse_smart_log_json;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(log) = parse_smart_log_json(&text) {
        common::check_samples("nvme-cli JSON", &log.samples("nvme0", "fuzz model"));
    }
});
