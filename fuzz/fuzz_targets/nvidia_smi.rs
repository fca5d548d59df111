//! `nvidia-smi --query-gpu=... --format=csv,noheader,nounits` output.
#![no_main]
use dcmon_agent::collector::nvsmi::parse_query_gpu;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(gpus) = parse_query_gpu(&text) {
        let samples: Vec<_> = gpus.iter().flat_map(|g| g.samples()).collect();
        common::check_samples("nvidia-smi", &samples);
    }
});
