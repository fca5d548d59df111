//! /proc/meminfo.
#![no_main]
use dcmon_agent::batch::Value;
use dcmon_agent::collector::os::parse_meminfo;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let Some(text) = common::text(data) else { return };
    let Ok(samples) = parse_meminfo(text) else { return };
    let [total, available, used, percent] = samples.clone().map(|s| s.value);
    let (Value::Count(total), Value::Count(available), Value::Count(used)) = (total, available, used) else {
        panic!("memory byte counts are integers: {samples:?}");
    };
    assert!(available <= total && used == total - available, "{samples:?}");
    if total > 0 {
        // MemTotal 0 gives NaN on purpose (the batch drops it); any other total a percentage.
        common::check_samples("/proc/meminfo", &samples);
        assert!((0.0..=100.0).contains(&percent.as_f64()), "{samples:?}");
    }
});
