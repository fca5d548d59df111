//! What the two fake GPUs (tests/csrc/fake_nvml.c and tests/fixtures/gpu/nvidia-smi) must
//! produce: the spec's 14 gauges whichever source the collector reads, and the health
//! families NVML adds.

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

pub const H100: [&str; 4] = [
    "gpu=0",
    "model=NVIDIA H100 80GB HBM3",
    "bus_id=00000000:18:00.0",
    "uuid=GPU-11111111-2222-3333-4444-555555555555",
];
pub const A100: [&str; 4] = [
    "gpu=1",
    "model=NVIDIA A100-SXM4-40GB",
    "bus_id=00000000:3B:00.0",
    "uuid=GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
];

/// The rows of `metrics` (name, extra labels after the GPU's, value) of the GPU labelled `gpu`.
pub fn gpu_rows(gpu: &[&str], metrics: &[(&str, &[&str], &str)]) -> BTreeSet<Row> {
    metrics
        .iter()
        .map(|(name, extra, value)| {
            let labels = gpu.iter().chain(extra.iter()).map(|l| (*l).to_owned()).collect();
            ((*name).to_owned(), labels, (*value).to_owned())
        })
        .collect()
}

/// A row without labels.
pub fn row(name: &str, value: &str) -> Row {
    (name.to_owned(), Vec::new(), value.to_owned())
}

/// The health families NVML reads from GPU 0 (row remapping, four NVLinks, link 3 down).
pub fn h100_health() -> BTreeSet<Row> {
    gpu_rows(
        &H100,
        &[
            ("gpu_ecc_errors_total", &["counter=aggregate", "type=corrected"], "0"),
            ("gpu_ecc_errors_total", &["counter=aggregate", "type=uncorrected"], "0"),
            ("gpu_ecc_errors_total", &["counter=volatile", "type=corrected"], "0"),
            ("gpu_ecc_errors_total", &["counter=volatile", "type=uncorrected"], "0"),
            ("gpu_remapped_rows_total", &["type=correctable"], "2"),
            ("gpu_remapped_rows_total", &["type=uncorrectable"], "1"),
            ("gpu_remapped_rows_pending", &[], "1"),
            ("gpu_remapped_rows_failure", &[], "0"),
            // No page retirement on this board: no gpu_retired_pages_* at all. No sync boost
            // counter either.
            ("gpu_throttle_seconds_total", &["reason=power"], "1.5"),
            ("gpu_throttle_seconds_total", &["reason=thermal"], "0.25"),
            ("gpu_throttle_seconds_total", &["reason=board_limit"], "0"),
            ("gpu_throttle_seconds_total", &["reason=low_utilization"], "42"),
            ("gpu_throttle_seconds_total", &["reason=reliability"], "0"),
            ("gpu_throttle_seconds_total", &["reason=sw_thermal"], "0.5"),
            ("gpu_throttle_seconds_total", &["reason=hw_thermal"], "0"),
            ("gpu_throttle_seconds_total", &["reason=hw_power_brake"], "2"),
            ("gpu_clocks_event_reasons", &[], "4"),
            ("gpu_pcie_replays_total", &[], "0"),
            ("gpu_pcie_max_gen", &[], "5"),
            ("gpu_pcie_max_width", &[], "16"),
            ("gpu_pcie_throughput_bytes_per_second", &["direction=tx"], "1024000"),
            ("gpu_pcie_throughput_bytes_per_second", &["direction=rx"], "2048000"),
            ("gpu_nvlink_active", &["link=0"], "1"),
            ("gpu_nvlink_active", &["link=1"], "1"),
            ("gpu_nvlink_active", &["link=2"], "1"),
            ("gpu_nvlink_active", &["link=3"], "0"),
            ("gpu_nvlink_errors_total", &["link=0", "error=replay"], "1"),
            ("gpu_nvlink_errors_total", &["link=0", "error=recovery"], "0"),
            ("gpu_nvlink_errors_total", &["link=0", "error=crc_flit"], "5"),
            ("gpu_nvlink_errors_total", &["link=0", "error=crc_data"], "0"),
            ("gpu_nvlink_errors_total", &["link=1", "error=replay"], "0"),
            ("gpu_nvlink_errors_total", &["link=1", "error=recovery"], "0"),
            ("gpu_nvlink_errors_total", &["link=1", "error=crc_flit"], "0"),
            ("gpu_nvlink_errors_total", &["link=1", "error=crc_data"], "0"),
            ("gpu_nvlink_errors_total", &["link=2", "error=replay"], "0"),
            ("gpu_nvlink_errors_total", &["link=2", "error=recovery"], "2"),
            ("gpu_nvlink_errors_total", &["link=2", "error=crc_flit"], "0"),
            ("gpu_nvlink_errors_total", &["link=2", "error=crc_data"], "7"),
            ("gpu_nvlink_errors_total", &["link=3", "error=replay"], "0"),
            ("gpu_nvlink_errors_total", &["link=3", "error=recovery"], "0"),
            ("gpu_nvlink_errors_total", &["link=3", "error=crc_flit"], "0"),
            ("gpu_nvlink_errors_total", &["link=3", "error=crc_data"], "0"),
            // KiB × 1024
            ("gpu_nvlink_transmit_bytes_total", &["link=0"], "1024000"),
            ("gpu_nvlink_transmit_bytes_total", &["link=1"], "2048000"),
            ("gpu_nvlink_transmit_bytes_total", &["link=2"], "3072000"),
            ("gpu_nvlink_transmit_bytes_total", &["link=3"], "0"),
            ("gpu_nvlink_receive_bytes_total", &["link=0"], "4096000"),
            ("gpu_nvlink_receive_bytes_total", &["link=1"], "5120000"),
            ("gpu_nvlink_receive_bytes_total", &["link=2"], "6144000"),
            ("gpu_nvlink_receive_bytes_total", &["link=3"], "0"),
            ("gpu_energy_joules_total", &[], "123456.789"),
            // Samples 50, 100, 70, 80 and 10, 20, 30, 40.
            ("gpu_utilization_interval_average", &["engine=gpu"], "75"),
            ("gpu_utilization_interval_peak", &["engine=gpu"], "100"),
            ("gpu_utilization_interval_average", &["engine=memory"], "25"),
            ("gpu_utilization_interval_peak", &["engine=memory"], "40"),
            ("gpu_lost", &[], "0"),
            ("gpu_unresponsive", &[], "0"),
        ],
    )
}

/// The health families NVML reads from GPU 1 (page retirement, no NVLink: no gpu_nvlink_*).
pub fn a100_health() -> BTreeSet<Row> {
    gpu_rows(
        &A100,
        &[
            ("gpu_ecc_errors_total", &["counter=aggregate", "type=corrected"], "12"),
            ("gpu_ecc_errors_total", &["counter=aggregate", "type=uncorrected"], "3"),
            ("gpu_ecc_errors_total", &["counter=volatile", "type=corrected"], "2"),
            ("gpu_ecc_errors_total", &["counter=volatile", "type=uncorrected"], "1"),
            ("gpu_retired_pages_total", &["cause=single_bit"], "2"),
            ("gpu_retired_pages_total", &["cause=double_bit"], "1"),
            ("gpu_retired_pages_pending", &[], "1"),
            ("gpu_throttle_seconds_total", &["reason=power"], "0"),
            ("gpu_throttle_seconds_total", &["reason=thermal"], "3"),
            ("gpu_throttle_seconds_total", &["reason=sync_boost"], "0"),
            ("gpu_throttle_seconds_total", &["reason=board_limit"], "0"),
            ("gpu_throttle_seconds_total", &["reason=low_utilization"], "0"),
            ("gpu_throttle_seconds_total", &["reason=reliability"], "0"),
            ("gpu_throttle_seconds_total", &["reason=sw_thermal"], "3"),
            ("gpu_throttle_seconds_total", &["reason=hw_thermal"], "1"),
            ("gpu_throttle_seconds_total", &["reason=hw_power_brake"], "0"),
            ("gpu_clocks_event_reasons", &[], "96"),
            ("gpu_pcie_replays_total", &[], "7"),
            ("gpu_pcie_max_gen", &[], "4"),
            ("gpu_pcie_max_width", &[], "16"),
            ("gpu_pcie_throughput_bytes_per_second", &["direction=tx"], "512000"),
            ("gpu_pcie_throughput_bytes_per_second", &["direction=rx"], "256000"),
            ("gpu_energy_joules_total", &[], "5000"),
            ("gpu_utilization_interval_average", &["engine=gpu"], "100"),
            ("gpu_utilization_interval_peak", &["engine=gpu"], "100"),
            ("gpu_utilization_interval_average", &["engine=memory"], "75"),
            ("gpu_utilization_interval_peak", &["engine=memory"], "75"),
            ("gpu_lost", &[], "0"),
            ("gpu_unresponsive", &[], "0"),
        ],
    )
}

/// The spec's 14 gauges of both GPUs.
pub fn expected() -> BTreeSet<Row> {
    let (h100, a100) = (H100, A100);
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
