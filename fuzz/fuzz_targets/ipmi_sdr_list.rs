//! `ipmitool sdr list all` output.
#![no_main]
use dcmon_agent::collector::ipmi::parse_sdr_list;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    // The exec runner hands tool output over as lossy UTF-8.
    let text = String::from_utf8_lossy(data);
    let list = parse_sdr_list(&text);
    assert!(list.readings.len() + list.unreadable <= list.rows, "{list:?}");
    assert!(list.readings.windows(2).all(|w| w[0].id < w[1].id), "row ids increase: {list:?}");
    for r in &list.readings {
        assert!(r.id < list.rows && !r.sensor.is_empty(), "{r:?}");
        common::check_finite(&format!("ipmi sensor {:?}", r.sensor), r.value);
    }
});
