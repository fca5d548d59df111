//! `cargo xtask gpu-check`'s comparison on a recorded-shape `nvidia-smi -q -x` of the fake
//! library's two GPUs (tests/fixtures/gpu/nvidia-smi-q.xml) against what the collector reads
//! from the fake libnvidia-ml.so: every metric nvidia-smi shows matches; a changed counter and a
//! metric the agent lacks fail.
//!
//! One test per binary: the fake library reads its switches from the environment.

use dcmon_agent::batch::Batch;
use dcmon_agent::collector::Collector as _;
use dcmon_agent::collector::nvsmi::{NvsmiCollector, NvsmiConfig};
use dcmon_agent::host::Host;
use dcmon_tests::fixtures_dir;
use dcmon_tests::gpu_check::{Row, Verdict, compare, parse_smi_xml, table};

fn rows_of(batch: &serde_json::Value, xml: &str) -> Vec<Row> {
    let (attached, gpus) = parse_smi_xml(xml).expect("parse the XML");
    compare(batch, attached, &gpus)
}

fn row<'a>(rows: &'a [Row], bus_id: &str, metric: &str, labels: &str) -> &'a Row {
    rows.iter()
        .find(|r| r.bus_id == bus_id && r.metric == metric && r.labels == labels)
        .unwrap_or_else(|| panic!("no row {bus_id} {metric} {labels}"))
}

#[test]
fn the_fake_gpus_match_their_nvidia_smi_xml() {
    let config = NvsmiConfig { nvml_library: Some(env!("DCMON_FAKE_NVML_SO").into()), ..NvsmiConfig::default() };
    let mut collector = NvsmiCollector::new(Host::new(dcmon_tests::fixture_host("gpu-server")), &config);
    let mut samples = Vec::new();
    collector.collect(&mut samples).expect("collect");
    let mut batch = Batch::new("m", 0);
    batch.extend(samples);
    let batch: serde_json::Value = serde_json::from_slice(&batch.to_json()).expect("batch JSON");
    let xml = std::fs::read_to_string(fixtures_dir().join("gpu/nvidia-smi-q.xml")).expect("fixture");

    let rows = rows_of(&batch, &xml);
    eprintln!("{}", table(&rows));
    let failing: Vec<&Row> = rows.iter().filter(|r| r.verdict.fails()).collect();
    assert!(failing.is_empty(), "{failing:#?}");
    let h100 = "00000000:18:00.0";
    let a100 = "00000000:3B:00.0";
    // Live readings a moment apart: within tolerance.
    assert_eq!(row(&rows, h100, "gpu_power_draw", "").verdict, Verdict::Close);
    assert_eq!(row(&rows, h100, "gpu_temperature", "").verdict, Verdict::Close);
    // Counters and settings: equal, from nvidia-smi's own units and shapes (Yes/No, 16x, KB/s,
    // per-memory ECC counts summed, reason elements as NVML's bitmask).
    for (bus, metric, labels, value) in [
        ("", "gpu_visible", "", 2.0),
        (h100, "gpu_remapped_rows_total", "type=correctable", 2.0),
        (h100, "gpu_remapped_rows_pending", "", 1.0),
        (h100, "gpu_pcie_max_width", "", 16.0),
        (h100, "gpu_clocks_event_reasons", "", 4.0),
        (h100, "gpu_pcie_throughput_bytes_per_second", "direction=rx", 2_048_000.0),
        (a100, "gpu_ecc_errors_total", "counter=aggregate,type=corrected", 12.0),
        (a100, "gpu_ecc_errors_total", "counter=volatile,type=uncorrected", 1.0),
        (a100, "gpu_ecc_errors_uncorrected", "", 3.0),
        (a100, "gpu_retired_pages_total", "cause=single_bit", 2.0),
        (a100, "gpu_retired_pages_pending", "", 1.0),
        (a100, "gpu_clocks_event_reasons", "", 96.0),
        (a100, "gpu_pcie_width", "", 8.0),
        (a100, "gpu_lost", "", 0.0),
    ] {
        let r = row(&rows, bus, metric, labels);
        assert_eq!((r.agent, r.smi, r.verdict), (Some(value), Some(value), Verdict::Same), "{r:?}");
    }
    // What the XML does not carry is the agent's alone, not a failure.
    let r = row(&rows, h100, "gpu_energy_joules_total", "");
    assert_eq!((r.agent, r.smi, r.verdict), (Some(123_456.789), None, Verdict::AgentOnly));
    assert_eq!(row(&rows, h100, "gpu_nvlink_errors_total", "error=crc_data,link=2").verdict, Verdict::AgentOnly);
    // The A100 has no fan and no remapping in either source: no row.
    assert!(
        !rows.iter().any(|r| r.bus_id == a100 && (r.metric == "gpu_fan_speed" || r.metric.starts_with("gpu_remapped")))
    );

    // A counter that differs, and a reading nvidia-smi has and the agent does not, fail.
    let changed = xml
        .replacen("<remapped_row_corr>2</remapped_row_corr>", "<remapped_row_corr>3</remapped_row_corr>", 1)
        .replacen("<fan_speed>N/A</fan_speed>", "<fan_speed>30 %</fan_speed>", 1);
    let rows = rows_of(&batch, &changed);
    let failing: Vec<(&str, &str, Verdict)> =
        rows.iter().filter(|r| r.verdict.fails()).map(|r| (r.bus_id.as_str(), r.metric.as_str(), r.verdict)).collect();
    assert_eq!(
        failing,
        [(h100, "gpu_remapped_rows_total", Verdict::Differs), (a100, "gpu_fan_speed", Verdict::Missing)]
    );
    assert!(table(&rows).ends_with("1 differ, 1 missing, 58 agent only\n"), "{}", table(&rows));

    let e =
        parse_smi_xml("<nvidia_smi_log><gpu><product_name>x</product_name></gpu></nvidia_smi_log>").expect_err("no id");
    assert!(format!("{e:#}").contains("without an id"), "{e:#}");
    let e = parse_smi_xml("<log/>").expect_err("root");
    assert!(format!("{e:#}").contains("expected <nvidia_smi_log>"), "{e:#}");
}
