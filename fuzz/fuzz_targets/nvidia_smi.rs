//! `nvidia-smi --query-gpu=... --format=csv,noheader,nounits` output (and `--query-remapped-rows`).
#![no_main]
use dcmon_agent::collector::nvsmi::{parse_query_gpu, parse_remapped_rows};
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(gpus) = parse_query_gpu(&text) {
        let samples: Vec<_> = gpus.iter().flat_map(|g| g.samples()).collect();
        common::check_samples("nvidia-smi", &samples);
    }
    if let Ok(gpus) = parse_remapped_rows(&text) {
        let samples: Vec<_> = gpus.into_iter().flat_map(|(_, s)| s).collect();
        common::check_samples("nvidia-smi --query-remapped-rows", &samples);
    }
});
