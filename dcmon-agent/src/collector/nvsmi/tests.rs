use super::*;

/// The documented `--format=csv,noheader,nounits` shape: a passively cooled GPU prints
/// `[N/A]` for the fan, a GPU with ECC off `[N/A]` for its counters, and older drivers
/// `[Not Supported]`.
const SMI: &str = "\
0, NVIDIA H100 80GB HBM3, 00000000:18:00.0, GPU-11111111-2222-3333-4444-555555555555, 45, 123.45, 700.00, 87, 33, 40, 1980, 2619, 20480, 81920, 0, 0, 5, 16, P0
1, NVIDIA A100-SXM4-40GB, 00000000:3B:00.0, GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee, 61, 250.00, 400.00, 100, 75, [N/A], 1410, 1215, 10240, 40960, 12, 3, 4, 8, P2
2, Tesla T4, 00000000:5E:00.0, GPU-t4, 38, [Not Supported], 70.00, 0, 0, [N/A], 300, 405, 0, 15360, [N/A], [N/A], 3, 16, P8
";

#[test]
fn csv_with_absent_fields() {
    let gpus = parse_query_gpu(SMI).expect("parse");
    assert_eq!(gpus.len(), 3);
    assert_eq!(gpus[0].values.len(), 14);
    assert_eq!(gpus[0].bus_id, "00000000:18:00.0");
    let a100: Vec<&str> = gpus[1].values.iter().map(|s| s.name).collect();
    assert!(!a100.contains(&"gpu_fan_speed"));
    assert_eq!(a100.len(), 13);
    let t4 = &gpus[2].values;
    let get = |n: &str| t4.iter().find(|s| s.name == n).map(|s| s.value.as_f64());
    assert_eq!(get("gpu_power_draw"), None);
    assert_eq!(get("gpu_ecc_errors_corrected"), None);
    assert_eq!(get("gpu_memory_usage"), Some(0.0));
    assert_eq!(get("gpu_pstate"), Some(8.0));
    assert_eq!(get("gpu_power_limit"), Some(70.0));
}

#[test]
fn malformed_lines_are_errors() {
    let e = parse_query_gpu("0, x, y\n").expect_err("short");
    assert!(e.contains("expected 19 or 27 comma-separated fields, got 3"), "{e}");
    let e = parse_remapped_rows("00000000:18:00.0, 2\n").expect_err("short");
    assert!(e.contains("expected 5 comma-separated fields, got 2"), "{e}");
    let line = SMI.lines().next().unwrap_or_default().replacen('0', "z", 1);
    let e = parse_query_gpu(&line).expect_err("index");
    assert!(e.contains("index"), "{e}");
}

#[test]
fn no_library_and_no_tool_is_not_present() {
    let config = NvsmiConfig {
        nvml_library: Some("/nonexistent/libnvidia-ml.so.1".into()),
        nvidia_smi: "/nonexistent/nvidia-smi".into(),
        timeout: 5,
        gpu_timeout: 5,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = NvsmiCollector::new(Host::new(dir.path()), &config);
    let err = c.collect(&mut Vec::new()).expect_err("absent");
    assert!(
        matches!(&err, CollectError::NotPresent(w)
            if w.contains("libnvidia-ml") && w.contains("nvidia-smi")),
        "{err}"
    );
}

/// A PCI device directory with `vendor` and `class`.
fn pci_device(root: &std::path::Path, addr: &str, vendor: &str, class: &str) {
    let dir = root.join("sys/bus/pci/devices").join(addr);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("vendor"), format!("{vendor}\n")).expect("vendor");
    std::fs::write(dir.join("class"), format!("{class}\n")).expect("class");
}

#[test]
fn nvidia_display_and_3d_controllers_are_expected_gpus() {
    let dir = tempfile::tempdir().expect("tempdir");
    pci_device(dir.path(), "0000:18:00.0", "0x10de", "0x030200"); // H100: 3D controller
    pci_device(dir.path(), "0000:3b:00.0", "0x10de", "0x030000"); // VGA
    pci_device(dir.path(), "0000:3c:00.0", "0x10de", "0x068000"); // NVSwitch bridge: not a GPU
    pci_device(dir.path(), "0000:3d:00.0", "0x10de", "0x040300"); // the GPU's HD audio function
    pci_device(dir.path(), "0000:5e:00.0", "0x1002", "0x030200"); // AMD
    pci_device(dir.path(), "0000:00:02.0", "0x8086", "0x030000"); // Intel VGA
    assert_eq!(presence::expected_gpus(&Host::new(dir.path())).expect("count"), Some(2));

    let none = tempfile::tempdir().expect("tempdir");
    assert_eq!(presence::expected_gpus(&Host::new(none.path())).expect("no sysfs"), None);

    pci_device(dir.path(), "0000:5f:00.0", "0x10de", "VGA");
    let e = presence::expected_gpus(&Host::new(dir.path())).expect_err("bad class");
    assert!(format!("{e:#}").contains("0000:5f:00.0/class"), "{e:#}");
}

#[test]
fn gpus_on_the_bus_without_a_driver_fail_each_round_with_the_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    pci_device(dir.path(), "0000:18:00.0", "0x10de", "0x030200");
    let config = NvsmiConfig {
        nvml_library: Some("/nonexistent/libnvidia-ml.so.1".into()),
        nvidia_smi: "/nonexistent/nvidia-smi".into(),
        ..NvsmiConfig::default()
    };
    let mut c = NvsmiCollector::new(Host::new(dir.path()), &config);
    for _ in 0..2 {
        let mut out = Vec::new();
        let err = c.collect(&mut out).expect_err("failed");
        assert!(
            matches!(&err, CollectError::Failed(e) if e.to_string().starts_with("1 NVIDIA GPUs on the PCI bus but no driver")),
            "{err}"
        );
        assert_eq!(out, vec![Sample::count("gpu_expected", 1), Sample::count("gpu_visible", 0)]);
    }
}

#[test]
fn memory_usage_that_overflows_is_left_out() {
    let line = "0, GPU, 00000000:18:00.0, GPU-1, 45, 1, 2, 3, 4, 5, 6, 7, 1e308, 1e-300, 0, 0, 5, 16, P0\n";
    let gpus = parse_query_gpu(line).expect("parse");
    assert!(gpus[0].values.iter().all(|s| s.value.is_finite() && s.name != "gpu_memory_usage"), "{gpus:?}");
}

/// The health cells after the spec's: a bitmask in hex, `[N/A]` where the board lacks the
/// feature, `Yes`/`No` flags.
#[test]
fn health_fields_and_remapped_rows() {
    let spec = SMI.lines().next().unwrap_or_default();
    let line = format!("{spec}, 0x00000000000000A4, 3, [N/A], No, 5, 16, 7, [Not Supported]\n");
    let gpus = parse_query_gpu(&line).expect("parse");
    type Health = Vec<(String, crate::batch::Labels, f64)>;
    let health: Health =
        gpus[0].values[14..].iter().map(|s| (s.name.to_owned(), s.labels.clone(), s.value.as_f64())).collect();
    let l =
        |pairs: &[(&'static str, &str)]| pairs.iter().map(|&(k, v)| (k, v.into())).collect::<crate::batch::Labels>();
    assert_eq!(
        health,
        vec![
            ("gpu_ecc_errors_total".to_owned(), l(&[("counter", "aggregate"), ("type", "corrected")]), 0.0),
            ("gpu_ecc_errors_total".to_owned(), l(&[("counter", "aggregate"), ("type", "uncorrected")]), 0.0),
            ("gpu_ecc_errors_total".to_owned(), l(&[("counter", "volatile"), ("type", "corrected")]), 7.0),
            ("gpu_retired_pages_total".to_owned(), l(&[("cause", "single_bit")]), 3.0),
            ("gpu_retired_pages_pending".to_owned(), l(&[]), 0.0),
            ("gpu_clocks_event_reasons".to_owned(), l(&[]), 164.0),
            ("gpu_pcie_max_gen".to_owned(), l(&[]), 5.0),
            ("gpu_pcie_max_width".to_owned(), l(&[]), 16.0),
        ]
    );
    let rows = parse_remapped_rows("00000000:18:00.0, 2, 0, Yes, No\n00000000:3B:00.0, [N/A], [N/A], [N/A], [N/A]\n")
        .expect("parse");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].0, "00000000:18:00.0");
    let values: Vec<(&str, f64)> = rows[0].1.iter().map(|s| (s.name, s.value.as_f64())).collect();
    assert_eq!(
        values,
        [
            ("gpu_remapped_rows_total", 2.0),
            ("gpu_remapped_rows_total", 0.0),
            ("gpu_remapped_rows_pending", 1.0),
            ("gpu_remapped_rows_failure", 0.0)
        ]
    );
    assert!(rows[1].1.is_empty(), "{rows:?}");
}
