//! What the two fake GPUs (tests/csrc/fake_nvml.c and tests/fixtures/gpu/nvidia-smi) must
//! produce, whichever source the collector reads.

use std::collections::BTreeSet;

use dcmon_agent::batch::Sample;

/// (metric, [gpu, model, bus_id, uuid], value as text) for exact comparison.
pub type Row = (String, Vec<String>, String);

pub fn rows(samples: &[Sample]) -> BTreeSet<Row> {
    samples
        .iter()
        .map(|s| {
            (
                s.name.to_owned(),
                s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                format!("{}", s.value.as_f64()),
            )
        })
        .collect()
}

pub fn expected() -> BTreeSet<Row> {
    let h100 = [
        "gpu=0",
        "model=NVIDIA H100 80GB HBM3",
        "bus_id=00000000:18:00.0",
        "uuid=GPU-11111111-2222-3333-4444-555555555555",
    ];
    let a100 = [
        "gpu=1",
        "model=NVIDIA A100-SXM4-40GB",
        "bus_id=00000000:3B:00.0",
        "uuid=GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
    ];
    let gpu0: &[(&str, &str)] = &[
        ("gpu_temperature", "45"),
        ("gpu_power_draw", "123.45"),
        ("gpu_power_limit", "700"),
        ("gpu_utilization_gpu", "87"),
        ("gpu_utilization_memory", "33"),
        ("gpu_fan_speed", "40"),
        ("gpu_clock_sm", "1980"),
        ("gpu_clock_mem", "2619"),
        ("gpu_memory_usage", "25"),
        ("gpu_ecc_errors_corrected", "0"),
        ("gpu_ecc_errors_uncorrected", "0"),
        ("gpu_pcie_gen", "5"),
        ("gpu_pcie_width", "16"),
        ("gpu_pstate", "0"),
    ];
    // Passively cooled: no gpu_fan_speed at all (not zero).
    let gpu1: &[(&str, &str)] = &[
        ("gpu_temperature", "61"),
        ("gpu_power_draw", "250"),
        ("gpu_power_limit", "400"),
        ("gpu_utilization_gpu", "100"),
        ("gpu_utilization_memory", "75"),
        ("gpu_clock_sm", "1410"),
        ("gpu_clock_mem", "1215"),
        ("gpu_memory_usage", "25"),
        ("gpu_ecc_errors_corrected", "12"),
        ("gpu_ecc_errors_uncorrected", "3"),
        ("gpu_pcie_gen", "4"),
        ("gpu_pcie_width", "8"),
        ("gpu_pstate", "2"),
    ];
    let mut set = BTreeSet::new();
    for (labels, metrics) in [(h100, gpu0), (a100, gpu1)] {
        for (name, value) in metrics {
            set.insert(((*name).to_owned(), labels.iter().map(|l| (*l).to_owned()).collect(), (*value).to_owned()));
        }
    }
    set
}
