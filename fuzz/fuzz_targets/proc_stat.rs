//! /proc/stat, its `cpu ` line: two snapshots (the input split at its first NUL byte) and the
//! usage between them.
#![no_main]
use dcmon_agent::collector::os::parse_cpu_ticks;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let Some(text) = common::text(data) else { return };
    let (first, second) = text.split_once('\0').unwrap_or((text, text));
    let (Ok(a), Ok(b)) = (parse_cpu_ticks(first), parse_cpu_ticks(second)) else { return };
    assert!(a.busy <= a.total && b.busy <= b.total, "busy ticks above total: {a:?} {b:?}");
    for (later, earlier) in [(b, a), (a, b)] {
        if let Some(pct) = later.usage_percent_since(earlier) {
            common::check_finite("cpu_usage_percent", pct);
            assert!((0.0..=100.0).contains(&pct), "cpu_usage_percent {pct} from {earlier:?} to {later:?}");
        }
    }
});
