//! The config file (JSON), parsed and validated as `Config::load` does.
//!
//! When config.rs gains a loader on bytes (`Config::from_bytes` or the like), call it here
//! instead, so that the UTF-8 check is fuzzed too.
#![no_main]
use std::path::Path;

use dcmon_agent::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("/etc/dcmon/config.json");
    match Config::parse(path, text) {
        Ok((config, _unknown)) => {
            assert!(config.interval().as_secs() >= 1);
            let base = config.server_base();
            assert!(base.starts_with("http://") || base.starts_with("https://"), "{base:?}");
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.contains("/etc/dcmon/config.json"), "error names the file: {message}");
        }
    }
});
