//! NVIDIA collector falling back to nvidia-smi: the fake libnvidia-ml.so loads but its
//! nvmlInit fails (driver not loaded), and a stand-in nvidia-smi script answers instead.
//!
//! One test per binary: the fake library reads its switches from the environment.

mod common;

use std::path::Path;

use dcmon_agent::collector::Collector as _;
use dcmon_agent::collector::nvsmi::NvsmiCollector;
use dcmon_agent::collector::nvsmi::NvsmiConfig;
use dcmon_agent::host::Host;

#[test]
fn failed_nvml_init_falls_back_to_nvidia_smi_with_the_same_metrics() {
    // SAFETY: the only test in this binary, set before anything reads the environment.
    unsafe { std::env::set_var("FAKE_NVML_INIT_FAIL", "1") };
    let config = NvsmiConfig {
        nvml_library: Some(env!("DCMON_FAKE_NVML_SO").into()),
        nvidia_smi: Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/gpu/nvidia-smi"),
        ..NvsmiConfig::default()
    };
    let mut collector = NvsmiCollector::new(Host::new(dcmon_tests::fixture_host("gpu-server")), &config);
    for _ in 0..2 {
        let mut out = Vec::new();
        collector.collect(&mut out).expect("collect through nvidia-smi");
        let mut want = common::gpu::expected();
        want.insert(common::gpu::row("gpu_expected", "2"));
        assert_eq!(common::gpu::rows(&out), want);
    }

    // Neither NVML nor nvidia-smi: the collector is absent, not failing.
    let config = NvsmiConfig { nvidia_smi: "/nonexistent/nvidia-smi".into(), ..config };
    let no_pci_bus = tempfile::tempdir().expect("tempdir");
    let err = NvsmiCollector::new(Host::new(no_pci_bus.path()), &config).collect(&mut Vec::new()).expect_err("absent");
    assert!(
        matches!(&err, dcmon_agent::collector::CollectError::NotPresent(w) if w.contains("NVIDIA driver is not loaded") && w.contains("/nonexistent/nvidia-smi: not found")),
        "{err}"
    );
}
