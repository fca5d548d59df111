//! The config file's bytes, parsed and validated by `Config::parse_bytes`, what `Config::load`
//! runs on the file it read (the UTF-8 check included).
#![no_main]
use std::path::Path;

use dcmon_agent::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("/etc/dcmon/config.json");
    match Config::parse_bytes(path, data, &dcmon_agent::collector::schema()) {
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
