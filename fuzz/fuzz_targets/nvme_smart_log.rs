//! The NVMe SMART / Health log page as the admin ioctl returns it.
#![no_main]
use dcmon_agent::collector::nvme::parse_smart_log;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    if let Ok(log) = parse_smart_log(data) {
        common::check_samples("nvme smart log", &log.samples("nvme0", "fuzz model"));
    }
});
