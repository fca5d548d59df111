//! `ipmitool sel list`, `sel info` and `dcmi power reading` output, each parser on the input.
#![no_main]
use dcmon_agent::collector::ipmi_sel::{parse_dcmi_power, parse_sel_info, parse_sel_list};
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(list) = parse_sel_list(&text) {
        assert!(list.len() <= text.lines().count(), "{list:?}");
        for e in &list {
            assert!(e.event == "oem" || !e.text.is_empty(), "{e:?}");
        }
    }
    if let Ok(info) = parse_sel_info(&text) {
        common::check_samples("ipmi sel info", &info.samples());
    }
    if let Ok(Some(power)) = parse_dcmi_power(&text) {
        common::check_samples("ipmi dcmi power", &power.samples());
    }
});
