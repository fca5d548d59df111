//! NVIDIA collector through the real nvml-wrapper path, loading a fake libnvidia-ml.so (built
//! from tests/csrc/fake_nvml.c by the build script) via `nvsmi.nvml_library`.
//!
//! One test per binary: the fake library reads its switches from the environment.

mod common;

use dcmon_agent::collector::Collector as _;
use dcmon_agent::collector::nvsmi::NvsmiCollector;
use dcmon_agent::collector::nvsmi::NvsmiConfig;
use dcmon_agent::host::Host;

#[test]
fn nvml_is_loaded_once_reads_both_gpus_and_shuts_down_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("nvml.log");
    let calls = dir.path().join("calls");
    // SAFETY: the only test in this binary, set before anything reads the environment.
    unsafe {
        std::env::set_var("FAKE_NVML_LOG", &log);
        std::env::set_var("FAKE_NVML_CALLS", &calls);
    }
    let config = NvsmiConfig {
        nvml_library: Some(env!("DCMON_FAKE_NVML_SO").into()),
        // Must not be needed: NVML works.
        nvidia_smi: "/nonexistent/nvidia-smi".into(),
        ..NvsmiConfig::default()
    };
    // Its PCI bus has the two NVIDIA GPUs (17:00.0, 3b:00.0) beside other vendors' devices.
    let mut collector = NvsmiCollector::new(Host::new(dcmon_tests::fixture_host("gpu-server")), &config);
    let mut want = common::gpu::expected();
    want.extend(common::gpu::h100_health());
    want.extend(common::gpu::a100_health());
    want.insert(common::gpu::row("gpu_expected", "2"));
    want.insert(common::gpu::row("gpu_visible", "2"));
    // Every round the same: the utilization interval covers the samples since the last round
    // (the fake's buffer gains four each round), the counters are steady.
    for _ in 0..3 {
        let mut out = Vec::new();
        collector.collect(&mut out).expect("collect through NVML");
        let got = common::gpu::rows(&out);
        assert_eq!(got, want, "missing: {:?}\nextra: {:?}", want.difference(&got), got.difference(&want));
        assert_eq!(out.len(), want.len(), "a series twice: {out:?}");
    }
    assert_eq!(std::fs::read_to_string(&log).expect("log"), "init\n");
    // NVML calls per GPU and round (README, Performance): name, PCI info and UUID in the first
    // round only; then 13 for the spec's gauges, 2 volatile ECC counts, 4 memory health, 8
    // throttling, 5 PCIe, NVLink (a state and 4 counters a link, one state call that ends
    // the links, one for every link's traffic), 1 energy, 4 for the two sample buffers (count, then read) and 1 for the
    // compute processes (the count, none here).
    let log_text = std::fs::read_to_string(&calls).expect("call log");
    let per_gpu = |gpu: &str| log_text.lines().filter(|l| l.split(' ').next() == Some(gpu)).count();
    let (h100, a100) = (per_gpu("0"), per_gpu("1"));
    eprintln!("NVML calls in 3 rounds: GPU 0 (4 NVLinks) {h100}, GPU 1 (no NVLink) {a100}");
    assert_eq!(h100, 3 + 3 * (13 + 2 + 4 + 8 + 5 + (4 * 5 + 1 + 1) + 1 + 4 + 1));
    assert_eq!(a100, 3 + 3 * (13 + 2 + 4 + 8 + 5 + 1 + 1 + 4 + 1));
    drop(collector);
    assert_eq!(std::fs::read_to_string(&log).expect("log"), "init\nshutdown\n");
}
