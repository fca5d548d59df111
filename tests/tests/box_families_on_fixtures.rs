//! The families of the rest of the box (issue 18: PSI, TCP/UDP, NIC health, InfiniBand, PCIe,
//! EDAC, temperatures) on the GPU-server fixture (mlx5 InfiniBand and RoCE ports, a GPU whose
//! link trained at x8, DIMMs logging correctable errors, coretemp and NVMe sensors) and on the
//! virtio VM fixture, whose PSI, SNMP and /sys/class/net files were copied from a real VM.
//! Exact values, labels and series sets.

use std::path::Path;

use dcmon_agent::batch::{Sample, Value};
use dcmon_agent::collector::{self, CollectError};
use dcmon_agent::config::Config;
use dcmon_agent::host::Host;
use dcmon_tests::fixture_host;

/// The samples of the collector `name` on the host at `root`; `None` when it reports the
/// source not present.
fn collect(root: &Path, name: &str) -> Option<Vec<Sample>> {
    let config = Config { host_root: root.to_owned(), ..Config::default() };
    let source = collector::SOURCES.iter().find(|s| s.name == name).expect("a row of the collector table");
    let mut c = (source.build.expect("built from the config"))(&Host::new(root), &config);
    let mut out = Vec::new();
    match c.collect(&mut out) {
        Ok(()) => Some(out),
        Err(CollectError::NotPresent(_)) => None,
        Err(e) => panic!("{name} on {}: {e:#}", root.display()),
    }
}

/// The value of the one sample of `name` with exactly these label values (in order).
fn get(samples: &[Sample], name: &str, labels: &[&str]) -> Option<Value> {
    let found: Vec<Value> = samples
        .iter()
        .filter(|s| s.name == name && s.labels.iter().map(|(_, v)| v.as_str()).eq(labels.iter().copied()))
        .map(|s| s.value)
        .collect();
    assert!(found.len() <= 1, "{name}{labels:?} is reported {} times", found.len());
    found.first().copied()
}

fn count(samples: &[Sample], name: &str) -> usize {
    samples.iter().filter(|s| s.name == name).count()
}

fn gpu_server() -> std::path::PathBuf {
    fixture_host("gpu-server")
}

#[test]
fn pressure_on_the_gpu_server_and_the_vm() {
    let s = collect(&gpu_server(), "pressure").expect("PSI");
    let some = |r| get(&s, "pressure_some_seconds_total", &[r]);
    let full = |r| get(&s, "pressure_full_seconds_total", &[r]);
    assert_eq!(some("cpu"), Some(Value::Gauge(918.273645)));
    assert_eq!(full("cpu"), Some(Value::Gauge(0.0)));
    assert_eq!(some("memory"), Some(Value::Gauge(4.41289)));
    assert_eq!(full("memory"), Some(Value::Gauge(2.203117)));
    assert_eq!(some("io"), Some(Value::Gauge(77.120334)));
    assert_eq!(full("io"), Some(Value::Gauge(51.002881)));
    assert_eq!(s.len(), 6);
    let vm = collect(&fixture_host("debian12-virtio"), "pressure").expect("PSI");
    assert_eq!(get(&vm, "pressure_some_seconds_total", &["cpu"]), Some(Value::Gauge(1926.771213)));
    assert_eq!(get(&vm, "pressure_full_seconds_total", &["io"]), Some(Value::Gauge(4.078498)));
    assert_eq!(collect(&fixture_host("container-no-sysfs"), "pressure"), None, "no /proc/pressure there");
}

#[test]
fn tcp_and_udp_counters_on_the_gpu_server_and_the_vm() {
    let s = collect(&gpu_server(), "netstat").expect("snmp");
    let want = [
        ("tcp_received_segments_total", 97_120_334_012),
        ("tcp_sent_segments_total", 86_120_334_551),
        ("tcp_retransmitted_segments_total", 1_203_344),
        ("udp_received_datagrams_total", 1_000_334_412),
        ("udp_sent_datagrams_total", 998_120_334),
        ("udp_receive_errors_total", 4412),
        ("udp_receive_buffer_errors_total", 4409),
        ("tcp_timeouts_total", 88213),
        ("tcp_listen_overflows_total", 3301),
        ("tcp_listen_drops_total", 3317),
    ];
    let got: Vec<(&str, Value)> = s.iter().map(|s| (s.name, s.value)).collect();
    assert_eq!(got, want.map(|(n, v)| (n, Value::Count(v))));
    let vm = collect(&fixture_host("debian12-virtio"), "netstat").expect("snmp");
    assert_eq!(get(&vm, "tcp_received_segments_total", &[]), Some(Value::Count(190_450)));
    assert_eq!(get(&vm, "tcp_retransmitted_segments_total", &[]), Some(Value::Count(4)));
    assert_eq!(vm.len(), 10);
}

#[test]
fn nic_health_on_the_gpu_server_and_the_vm() {
    let s = collect(&gpu_server(), "nic").expect("/sys/class/net");
    let mut ifaces: Vec<&str> =
        s.iter().filter(|s| s.name == "network_mtu_bytes").map(|s| s.labels[0].1.as_str()).collect();
    ifaces.dedup();
    assert_eq!(ifaces, ["bond0", "bond0.100", "eno1", "eno2", "ib0"], "lo and docker0 are filtered out");
    let eno1 = |name| get(&s, name, &["eno1"]);
    assert_eq!(eno1("network_receive_errors_total"), Some(Value::Count(3)));
    assert_eq!(eno1("network_receive_drops_total"), Some(Value::Count(12)));
    assert_eq!(eno1("network_receive_missed_errors_total"), Some(Value::Count(41)));
    assert_eq!(eno1("network_carrier_changes_total"), Some(Value::Count(4)));
    assert_eq!(eno1("network_speed_bytes_per_second"), Some(Value::Count(3_125_000_000)));
    assert_eq!(eno1("network_oper_state"), Some(Value::Count(6)));
    assert_eq!(eno1("network_up"), Some(Value::Count(1)));
    assert_eq!(eno1("network_mtu_bytes"), Some(Value::Count(9000)));
    assert_eq!(get(&s, "network_speed_bytes_per_second", &["eno2"]), None, "a link that is down has no speed");
    assert_eq!(get(&s, "network_oper_state", &["eno2"]), Some(Value::Count(2)));
    assert_eq!(get(&s, "network_up", &["eno2"]), Some(Value::Count(0)));
    assert_eq!(get(&s, "network_speed_bytes_per_second", &["ib0"]), Some(Value::Count(50_000_000_000)));
    assert_eq!(get(&s, "network_transmit_drops_total", &["ib0"]), Some(Value::Count(4)));
    assert_eq!(s.len(), 5 * 12 - 1);
    let vm = collect(&fixture_host("debian12-virtio"), "nic").expect("/sys/class/net");
    assert_eq!(get(&vm, "network_mtu_bytes", &["eth0"]), Some(Value::Count(1400)));
    assert_eq!(get(&vm, "network_carrier_changes_total", &["eth0"]), Some(Value::Count(2)));
    assert_eq!(get(&vm, "network_speed_bytes_per_second", &["eth0"]), None, "virtio-net reports speed -1");
    assert_eq!(vm.len(), 11);
    assert_eq!(collect(&fixture_host("container-no-sysfs"), "nic"), None);
}

#[test]
fn infiniband_ports_on_the_gpu_server() {
    let s = collect(&gpu_server(), "infiniband").expect("/sys/class/infiniband");
    let ib = |name| get(&s, name, &["mlx5_0", "1"]);
    assert_eq!(get(&s, "infiniband_port_state", &["mlx5_0", "1", "InfiniBand"]), Some(Value::Count(4)));
    assert_eq!(get(&s, "infiniband_port_state", &["mlx5_1", "1", "Ethernet"]), Some(Value::Count(4)));
    assert_eq!(ib("infiniband_port_physical_state"), Some(Value::Count(5)));
    assert_eq!(ib("infiniband_port_rate_bytes_per_second"), Some(Value::Count(50_000_000_000)));
    // port_rcv_data and port_xmit_data count 4-byte words.
    assert_eq!(ib("infiniband_port_receive_bytes_total"), Some(Value::Count(2_203_344_120_334_455 * 4)));
    assert_eq!(ib("infiniband_port_transmit_bytes_total"), Some(Value::Count(2_201_233_441_203_344 * 4)));
    assert_eq!(ib("infiniband_port_receive_packets_total"), Some(Value::Count(9_912_003_341)));
    assert_eq!(ib("infiniband_symbol_errors_total"), Some(Value::Count(12)));
    assert_eq!(ib("infiniband_link_downed_total"), Some(Value::Count(1)));
    assert_eq!(ib("infiniband_link_error_recovery_total"), Some(Value::Count(3)));
    assert_eq!(ib("infiniband_port_transmit_wait_total"), Some(Value::Count(44_120_334)));
    assert_eq!(ib("infiniband_vl15_dropped_total"), Some(Value::Count(0)));
    let hw = |dev, counter| get(&s, "infiniband_hw_counter_total", &[dev, "1", counter]);
    assert_eq!(hw("mlx5_0", "out_of_buffer"), Some(Value::Count(4412)));
    assert_eq!(hw("mlx5_0", "local_ack_timeout_err"), Some(Value::Count(7)));
    assert_eq!(hw("mlx5_0", "lifespan"), None, "a setting, not a counter");
    assert_eq!(hw("mlx5_1", "np_cnp_sent"), Some(Value::Count(120_301)));
    assert_eq!(hw("mlx5_1", "np_ecn_marked_roce_packets"), Some(Value::Count(120_334)));
    assert_eq!(hw("mlx5_1", "rp_cnp_handled"), Some(Value::Count(88_213)));
    assert_eq!(hw("mlx5_1", "roce_adp_retrans"), Some(Value::Count(17)));
    assert_eq!(get(&s, "infiniband_port_rate_bytes_per_second", &["mlx5_1", "1"]), Some(Value::Count(25_000_000_000)));
    assert_eq!(get(&s, "infiniband_vl15_dropped_total", &["mlx5_1", "1"]), None, "N/A (no PMA)");
    // Every hw_counters file but lifespan: 18 on the InfiniBand port, 28 on the RoCE port.
    assert_eq!(count(&s, "infiniband_hw_counter_total"), 18 + 28);
    assert_eq!(count(&s, "infiniband_port_receive_bytes_total"), 2);
    assert_eq!(collect(&fixture_host("debian12-virtio"), "infiniband"), None);
}

#[test]
fn pcie_links_and_aer_on_the_gpu_server() {
    let s = collect(&gpu_server(), "pcie").expect("/sys/bus/pci/devices");
    let gpu1 = ["0000:3b:00.0", "nvidia", "gpu"];
    assert_eq!(get(&s, "pcie_link_width_lanes", &gpu1), Some(Value::Gauge(8.0)));
    assert_eq!(get(&s, "pcie_link_max_width_lanes", &gpu1), Some(Value::Gauge(16.0)));
    assert_eq!(get(&s, "pcie_link_speed_gt_per_second", &gpu1), Some(Value::Gauge(32.0)));
    assert_eq!(get(&s, "pcie_link_degraded", &gpu1), Some(Value::Count(1)));
    let severity = |sev: &'static str| [gpu1[0], gpu1[1], gpu1[2], sev];
    assert_eq!(get(&s, "pcie_aer_errors_total", &severity("correctable")), Some(Value::Count(122)));
    assert_eq!(get(&s, "pcie_aer_errors_total", &severity("nonfatal")), Some(Value::Count(1)));
    assert_eq!(get(&s, "pcie_aer_errors_total", &severity("fatal")), Some(Value::Count(0)));
    let by_type = |sev: &str, t: &str| get(&s, "pcie_aer_errors_by_type_total", &[gpu1[0], gpu1[1], gpu1[2], sev, t]);
    assert_eq!(by_type("correctable", "RxErr"), Some(Value::Count(118)));
    assert_eq!(by_type("correctable", "BadDLLP"), Some(Value::Count(4)));
    assert_eq!(by_type("nonfatal", "CmpltTO"), Some(Value::Count(1)));
    assert_eq!(by_type("fatal", "PoisonTLPBlocked"), None, "a type is reported once it has counted an error");
    assert_eq!(get(&s, "pcie_link_degraded", &["0000:17:00.0", "nvidia", "gpu"]), Some(Value::Count(0)));
    assert_eq!(get(&s, "pcie_link_degraded", &["0000:16:01.0", "pcieport", "bridge"]), Some(Value::Count(0)));
    assert_eq!(get(&s, "pcie_link_degraded", &["0000:1a:00.0", "mlx5_core", "network"]), Some(Value::Count(0)));
    assert_eq!(get(&s, "pcie_link_width_lanes", &["0000:5e:00.0", "nvme", "nvme"]), Some(Value::Gauge(4.0)));
    assert_eq!(
        get(&s, "pcie_aer_errors_total", &["0000:16:01.0", "pcieport", "bridge", "correctable"]),
        Some(Value::Count(2))
    );
    // The USB controller is not reported; per device 3 totals and 5 link series, and the 4
    // error types that counted (the bridge's BadTLP, the x8 GPU's RxErr, BadDLLP and CmpltTO).
    assert!(!s.iter().any(|s| s.labels[0].1 == "0000:00:14.0"));
    assert_eq!(count(&s, "pcie_aer_errors_by_type_total"), 4);
    assert_eq!(s.len(), 5 * (3 + 5) + 4);
    assert_eq!(collect(&fixture_host("debian12-virtio"), "pcie"), None);
}

#[test]
fn edac_controllers_and_dimms_on_the_gpu_server() {
    let s = collect(&gpu_server(), "edac").expect("EDAC");
    assert_eq!(get(&s, "edac_correctable_errors_total", &["0"]), Some(Value::Count(1414)));
    assert_eq!(get(&s, "edac_correctable_noinfo_errors_total", &["0"]), Some(Value::Count(2)));
    assert_eq!(get(&s, "edac_uncorrectable_errors_total", &["1"]), Some(Value::Count(0)));
    assert_eq!(get(&s, "edac_correctable_errors_total", &["1"]), Some(Value::Count(3)));
    let dimm = |mc, d, label| get(&s, "edac_dimm_correctable_errors_total", &[mc, d, label]);
    assert_eq!(dimm("0", "0", "CPU_SrcID#0_MC#0_Chan#0_DIMM#0"), Some(Value::Count(1412)));
    assert_eq!(dimm("0", "1", "CPU_SrcID#0_MC#0_Chan#1_DIMM#0"), Some(Value::Count(0)));
    assert_eq!(dimm("1", "1", "CPU_SrcID#1_MC#0_Chan#1_DIMM#0"), Some(Value::Count(3)));
    assert_eq!(count(&s, "edac_dimm_uncorrectable_errors_total"), 4);
    assert_eq!(s.len(), 2 * 4 + 4 * 2);
    assert_eq!(collect(&fixture_host("debian12-virtio"), "edac"), None);
}

#[test]
fn temperatures_on_the_gpu_server() {
    let s = collect(&gpu_server(), "temperature").expect("hwmon");
    let t = |chip, sensor, device| get(&s, "hwmon_temperature_celsius", &[chip, sensor, device]);
    assert_eq!(t("coretemp", "Package id 0", "coretemp.0"), Some(Value::Gauge(51.0)));
    assert_eq!(t("coretemp", "Package id 1", "coretemp.1"), Some(Value::Gauge(53.0)));
    assert_eq!(t("coretemp", "Core 1", "coretemp.1"), Some(Value::Gauge(52.0)));
    assert_eq!(t("nvme", "Composite", "nvme0"), Some(Value::Gauge(38.85)));
    let crit = get(&s, "hwmon_temperature_critical_celsius", &["nvme", "Composite", "nvme0"]);
    assert_eq!(crit, Some(Value::Gauge(89.85)));
    assert_eq!(
        get(&s, "hwmon_temperature_max_celsius", &["coretemp", "Core 0", "coretemp.0"]),
        Some(Value::Gauge(90.0))
    );
    assert_eq!(get(&s, "thermal_zone_temperature_celsius", &["0", "x86_pkg_temp"]), Some(Value::Gauge(51.0)));
    assert_eq!(count(&s, "hwmon_temperature_celsius"), 7);
    assert_eq!(s.len(), 7 + 1 + 2 * 7);
    assert_eq!(collect(&fixture_host("debian12-virtio"), "temperature"), None);
}

/// `dcmon-agent once` on a copy of the GPU server with a bad file in three families (a counter
/// that is not a number, a FIFO where a PCIe attribute belongs, a temperature that is text):
/// each of those fails its round naming the file, keeps what it could read, and every other
/// collector reports as usual.
#[test]
fn bad_files_fail_only_their_family_naming_the_file() {
    use dcmon_tests::agent::run_once;
    use dcmon_tests::batch::find;
    use serde_json::json;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("host");
    let out = std::process::Command::new("cp").arg("-a").arg(gpu_server()).arg(&root).output().expect("cp");
    assert!(out.status.success(), "cp: {}", String::from_utf8_lossy(&out.stderr));
    let symbol_error = root.join("sys/class/infiniband/mlx5_0/ports/1/counters/symbol_error");
    std::fs::write(&symbol_error, "many\n").expect("write");
    let width = root.join("sys/bus/pci/devices/0000:3b:00.0/current_link_width");
    std::fs::remove_file(&width).expect("rm");
    let mkfifo = std::process::Command::new("mkfifo").arg(&width).output().expect("mkfifo");
    assert!(mkfifo.status.success());
    let temp = root.join("sys/class/hwmon/hwmon2/temp1_input");
    std::fs::write(&temp, "hot\n").expect("write");
    let config = dcmon_tests::AgentConfig::without_exporters()
        .set("host_root", json!(root))
        .set("ebpf", json!("off"))
        .write(dir.path());
    let (stdout, log) = run_once(dir.path(), &config);
    let batch: serde_json::Value = serde_json::from_str(&stdout).expect("a batch");
    for (collector, ok) in [
        ("os", 1),
        ("disk", 1),
        ("net", 1),
        ("pressure", 1),
        ("netstat", 1),
        ("nic", 1),
        ("edac", 1),
        ("pcie", 0),
        ("infiniband", 0),
        ("temperature", 0),
    ] {
        assert_eq!(find(&batch, "dcmon_collector_success", collector), Some(json!(ok)), "{collector}\n{log}");
    }
    let named = |path: &Path, what: &str| log.contains(&format!("parsing {}: {what}", path.display()));
    assert!(
        named(&symbol_error, "expected an unsigned integer, got \\\"many\\\"")
            || named(&symbol_error, "expected an unsigned integer, got \"many\""),
        "{log}"
    );
    assert!(log.contains(&format!("{}: is a FIFO, expected a regular file", width.display())), "{log}");
    assert!(named(&temp, "expected an integer"), "{log}");
    // What the failing families could read is still there.
    assert_eq!(
        find(&batch, "infiniband_port_receive_bytes_total", "mlx5_0"),
        Some(json!(2_203_344_120_334_455_u64 * 4))
    );
    assert_eq!(find(&batch, "pcie_link_max_width_lanes", "0000:3b:00.0"), Some(json!(16.0)));
    assert_eq!(find(&batch, "thermal_zone_temperature_celsius", "x86_pkg_temp"), Some(json!(51.0)));
    assert!(find(&batch, "edac_dimm_correctable_errors_total", "CPU_SrcID#0_MC#0_Chan#0_DIMM#0").is_some());
}
