//! NVIDIA collector through the real nvml-wrapper path, loading a fake libnvidia-ml.so (built
//! from tests/csrc/fake_nvml.c by the build script) via `nvsmi.nvml_library`.
//!
//! One test per binary: the fake library reads its switches from the environment.

mod common;

use dcmon_agent::collector::Collector as _;
use dcmon_agent::collector::nvsmi::NvsmiCollector;
use dcmon_agent::collector::nvsmi::NvsmiConfig;

#[test]
fn nvml_is_loaded_once_reads_both_gpus_and_shuts_down_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("nvml.log");
    // SAFETY: the only test in this binary, set before anything reads the environment.
    unsafe { std::env::set_var("FAKE_NVML_LOG", &log) };
    let config = NvsmiConfig {
        nvml_library: Some(env!("DCMON_FAKE_NVML_SO").into()),
        // Must not be needed: NVML works.
        nvidia_smi: "/nonexistent/nvidia-smi".into(),
        timeout: 5,
    };
    let mut collector = NvsmiCollector::new(&config);
    for _ in 0..3 {
        let mut out = Vec::new();
        collector.collect(&mut out).expect("collect through NVML");
        assert_eq!(common::gpu::rows(&out), common::gpu::expected());
    }
    assert_eq!(std::fs::read_to_string(&log).expect("log"), "init\n");
    drop(collector);
    assert_eq!(std::fs::read_to_string(&log).expect("log"), "init\nshutdown\n");
}
