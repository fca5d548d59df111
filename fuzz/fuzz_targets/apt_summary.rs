//! `apt-get -s dist-upgrade` output.
#![no_main]
use dcmon_agent::collector::apt::parse_upgrade_summary;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match parse_upgrade_summary(&text) {
        Ok(_) => assert!(text.contains(" not upgraded."), "a count without a summary line"),
        Err(e) => assert!(!e.is_empty()),
    }
});
