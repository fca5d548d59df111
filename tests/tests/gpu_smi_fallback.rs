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
    // What nvidia-smi offers of the health families, with the values NVML gives.
    let from_smi = [
        "gpu_ecc_errors_total",
        "gpu_retired_pages_total",
        "gpu_retired_pages_pending",
        "gpu_remapped_rows_total",
        "gpu_remapped_rows_pending",
        "gpu_remapped_rows_failure",
        "gpu_clocks_event_reasons",
        "gpu_pcie_max_gen",
        "gpu_pcie_max_width",
    ];
    let mut want = common::gpu::expected();
    want.extend(
        common::gpu::h100_health()
            .into_iter()
            .chain(common::gpu::a100_health())
            .filter(|(name, _, _)| from_smi.contains(&name.as_str())),
    );
    want.insert(common::gpu::row("gpu_expected", "2"));
    for _ in 0..2 {
        let mut out = Vec::new();
        collector.collect(&mut out).expect("collect through nvidia-smi");
        let got = common::gpu::rows(&out);
        assert_eq!(got, want, "missing: {:?}\nextra: {:?}", want.difference(&got), got.difference(&want));
    }

    // A driver that refuses the health fields and remapped rows: the spec's 14, every round.
    let old = NvsmiConfig {
        nvidia_smi: Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/gpu/nvidia-smi-r418"),
        ..config.clone()
    };
    let mut collector = NvsmiCollector::new(Host::new(dcmon_tests::fixture_host("gpu-server")), &old);
    let mut want = common::gpu::expected();
    want.insert(common::gpu::row("gpu_expected", "2"));
    for _ in 0..2 {
        let mut out = Vec::new();
        collector.collect(&mut out).expect("collect through an old nvidia-smi");
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
