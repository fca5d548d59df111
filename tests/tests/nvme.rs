//! NVMe collector: byte-exact SMART pages, nvme-cli JSON of each version's shape, and the real
//! ioctl and nvme-cli paths against an LD_PRELOAD shim standing in for a controller.

use std::path::{Path, PathBuf};
use std::process::Command;

use dcmon_agent::batch::Sample;
use dcmon_agent::collector::Collector as _;
use dcmon_agent::collector::nvme::NvmeConfig;
use dcmon_agent::collector::nvme::{NvmeCollector, SMART_LOG_BYTES, SmartLog, parse_smart_log, parse_smart_log_json};
use dcmon_agent::host::Host;

const SHIM: &str = env!("DCMON_NVME_SHIM_SO");

/// 2^64 + 5: a 128-bit counter that does not fit in u64.
const ABOVE_U64: u128 = (1u128 << 64) + 5;

/// A SMART / Health page written field by field at the NVMe spec's offsets.
fn smart_page() -> [u8; SMART_LOG_BYTES] {
    let mut p = [0u8; SMART_LOG_BYTES];
    p[0] = 0b0000_0010; // critical warning: bit 1, temperature above threshold
    p[1..3].copy_from_slice(&358u16.to_le_bytes()); // 358 K = 84.85 °C
    p[3] = 97; // available spare %
    p[4] = 10; // spare threshold %
    p[5] = 3; // percentage used
    let mut put = |off: usize, v: u128| p[off..off + 16].copy_from_slice(&v.to_le_bytes());
    put(32, ABOVE_U64); // data units read
    put(48, 123_456_789); // data units written
    put(64, 1000); // host read commands
    put(80, 2000); // host write commands
    put(96, 30); // controller busy time
    put(112, 44); // power cycles
    put(128, 12_345); // power on hours
    put(144, 17); // unsafe shutdowns
    put(160, 2); // media errors
    put(176, 9); // error log entries
    p[192..196].copy_from_slice(&75u32.to_le_bytes()); // warning composite temperature time, minutes
    p[196..200].copy_from_slice(&3u32.to_le_bytes()); // critical composite temperature time, minutes
    p
}

fn expected() -> SmartLog {
    SmartLog {
        critical_warning: 2,
        temperature_kelvin: 358,
        available_spare_pct: 97,
        percentage_used_pct: 3,
        data_units_read: ABOVE_U64,
        data_units_written: 123_456_789,
        power_on_hours: 12_345,
        unsafe_shutdowns: 17,
        media_errors: 2,
        error_log_entries: 9,
        warning_temp_minutes: 75,
        critical_temp_minutes: 3,
    }
}

#[test]
fn byte_exact_page_parses_at_spec_offsets() {
    assert_eq!(parse_smart_log(&smart_page()), Ok(expected()));
    // Every other byte changed must not move the reported fields.
    let mut noisy = smart_page();
    for (i, b) in noisy.iter_mut().enumerate() {
        let reported = matches!(i, 0..=3 | 5 | 32..=63 | 128..=199);
        if !reported {
            *b = 0xA5;
        }
    }
    assert_eq!(parse_smart_log(&noisy), Ok(expected()));
}

#[test]
fn samples_have_units_labels_and_big_counters() {
    let samples = expected().samples("nvme0", "Samsung SSD 990 PRO 2TB");
    let get = |name: &str| samples.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("{name} missing"));
    assert!((get("nvme_temperature_celsius").value.as_f64() - 84.85).abs() < 1e-9);
    assert!((get("nvme_available_spare_ratio").value.as_f64() - 0.97).abs() < 1e-9);
    assert!((get("nvme_percentage_used_ratio").value.as_f64() - 0.03).abs() < 1e-9);
    assert_eq!(get("nvme_critical_warning_total").value.as_f64(), 2.0);
    assert_eq!(get("nvme_power_on_hours_total").value.as_f64(), 12_345.0);
    assert_eq!(get("nvme_media_errors_total").value.as_f64(), 2.0);
    assert_eq!(get("nvme_unsafe_shutdowns_total").value.as_f64(), 17.0);
    assert_eq!(get("nvme_data_units_written_total").value.as_f64(), 123_456_789.0);
    #[allow(clippy::cast_precision_loss, reason = "the comparison is in f64")]
    let big = ABOVE_U64 as f64;
    assert_eq!(get("nvme_data_units_read_total").value.as_f64(), big);
    assert_eq!(get("nvme_error_log_entries_total").value.as_f64(), 9.0);
    assert_eq!(get("nvme_warning_temperature_seconds_total").value.as_f64(), 75.0 * 60.0);
    assert_eq!(get("nvme_critical_temperature_seconds_total").value.as_f64(), 3.0 * 60.0);
    assert_eq!(samples.len(), 12);
    for s in &samples {
        assert_eq!(s.labels, [("device", "nvme0".into()), ("model", "Samsung SSD 990 PRO 2TB".into())]);
    }
}

fn fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/nvme").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn nvme_cli_json_of_every_version_parses() {
    // 2.3 (Debian 12, captured from nvme-cli against the shim): counters as strings, exact.
    assert_eq!(parse_smart_log_json(&fixture("smart-log-2.3.json")), Ok(expected()));
    // -H: critical_warning as an object with "value".
    assert_eq!(parse_smart_log_json(&fixture("smart-log-2.3-H.json")), Ok(expected()));
    // 2.4+ numbers and 1.x floats: exact below 2^53; beyond, serde_json reads an f64.
    for name in ["smart-log-2.4-numbers.json", "smart-log-1.x-floats.json"] {
        let got = parse_smart_log_json(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let approx = SmartLog { data_units_read: got.data_units_read, ..expected() };
        assert_eq!(got, approx, "{name}");
        let diff = got.data_units_read.abs_diff(ABOVE_U64);
        assert!(diff < 1 << 12, "{name}: {} vs {ABOVE_U64}", got.data_units_read);
    }
}

#[test]
fn nvme_cli_json_errors_name_the_field() {
    let e = parse_smart_log_json("{\"temperature\": 300}").expect_err("missing");
    assert!(e.contains("critical_warning"), "{e}");
    let text = fixture("smart-log-2.3.json").replace("\"percent_used\":3", "\"percent_used\":-1");
    let e = parse_smart_log_json(&text).expect_err("negative");
    assert!(e.contains("percent_used"), "{e}");
    let text = fixture("smart-log-2.3.json").replace("\"temperature\":358", "\"temperature\":70000");
    let e = parse_smart_log_json(&text).expect_err("too big");
    assert!(e.contains("temperature"), "{e}");
    let text = fixture("smart-log-2.3.json").replace("\"warning_temp_time\":75", "\"warning_temp_time\":4294967296");
    let e = parse_smart_log_json(&text).expect_err("above u32");
    assert!(e.contains("warning_temp_time") && e.contains("4294967295"), "{e}");
    let text = fixture("smart-log-2.3.json").replace("\"num_err_log_entries\":\"9\",", "");
    let e = parse_smart_log_json(&text).expect_err("missing");
    assert!(e.contains("num_err_log_entries"), "{e}");
    assert!(parse_smart_log_json("Smart Log for NVME device").is_err());
}

/// The stand-in controller: a character device node (nvme-cli refuses regular files) under a
/// temporary host root with the sysfs entries discovery reads.
struct StandIn {
    root: tempfile::TempDir,
}

impl StandIn {
    fn new() -> Self {
        // Under the target dir, not /tmp: a tmpfs mounted nodev would refuse the node.
        let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
        std::fs::create_dir_all(root.path().join("sys/class/nvme/nvme0")).expect("mkdir");
        std::fs::write(root.path().join("sys/class/nvme/nvme0/model"), "Stand-in NVMe Controller                \n")
            .expect("write model");
        std::fs::create_dir_all(root.path().join("dev")).expect("mkdir");
        // Major 1, minor 3 is /dev/null: opening it is harmless, and every NVMe ioctl on it is
        // answered by the shim before it reaches the kernel.
        dcmon_tests::require_root("mknod of a stand-in NVMe device node");
        let status =
            Command::new("mknod").arg(root.path().join("dev/nvme0")).args(["c", "1", "3"]).status().expect("run mknod");
        assert!(status.success(), "mknod failed");
        std::fs::write(root.path().join("smart.bin"), smart_page()).expect("write page");
        Self { root }
    }

    fn dev(&self) -> PathBuf {
        self.root.path().join("dev/nvme0")
    }

    /// Re-run this test binary on one test with the shim preloaded; returns the child's
    /// "SAMPLE " lines and the shim's command log.
    fn run_child(&self, test: &str, deny_ioctl: bool) -> (Vec<String>, String) {
        let log = self.root.path().join(format!("shim-{test}.log"));
        let out = Command::new(std::env::current_exe().expect("current exe"))
            .args([test, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env("LD_PRELOAD", SHIM)
            .env("DCMON_SHIM_DEVICE", self.dev())
            .env("DCMON_SHIM_SMART_LOG", self.root.path().join("smart.bin"))
            .env("DCMON_SHIM_LOG", &log)
            .env("DCMON_SHIM_DENY", if deny_ioctl { "1" } else { "0" })
            .env("DCMON_TEST_HOST_ROOT", self.root.path())
            .output()
            .expect("re-run test binary");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let samples: Vec<String> = stdout
            .lines()
            // The harness prints "test NAME ... " without a newline before the test's own output.
            .filter_map(|l| l.split_once("SAMPLE ").map(|(_, s)| s.to_owned()))
            .collect();
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        (samples, log)
    }
}

fn describe(s: &Sample) -> String {
    format!("{} {:?} {:?}", s.name, s.value, s.labels)
}

/// In the child (shim preloaded): run the real collector once and print its samples.
fn child_collect() {
    let Some(root) = std::env::var_os("DCMON_TEST_HOST_ROOT") else {
        return; // run by hand without the parent: nothing to read
    };
    let mut collector = NvmeCollector::new(Host::new(root), &NvmeConfig::default());
    let mut out = Vec::new();
    collector.collect(&mut out).expect("collect through the shim");
    #[allow(clippy::print_stdout, reason = "the parent reads these lines")]
    for s in &out {
        println!("SAMPLE {}", describe(s));
    }
}

#[test]
#[ignore = "child of ioctl_and_nvme_cli_through_the_shim_agree, run with the shim preloaded"]
fn shim_child_ioctl() {
    child_collect();
}

#[test]
#[ignore = "child of ioctl_and_nvme_cli_through_the_shim_agree, run with the shim preloaded"]
fn shim_child_cli() {
    child_collect();
}

#[test]
fn ioctl_and_nvme_cli_through_the_shim_agree() {
    let standin = StandIn::new();
    let want: Vec<String> = expected().samples("nvme0", "Stand-in NVMe Controller").iter().map(describe).collect();

    let (ioctl, log) = standin.run_child("shim_child_ioctl", false);
    assert_eq!(ioctl, want, "ioctl path");
    // The agent itself issued Get Log Page 0x02 for 128 dwords of the SMART log, all namespaces.
    assert!(log.lines().any(|l| l.contains("opcode=0x02 nsid=0xffffffff cdw10=0x007f0002 len=512 ok")), "{log}");
    assert!(!log.contains("nvme opcode"), "nvme-cli must not run: {log}");

    let (cli, log) = standin.run_child("shim_child_cli", true);
    assert_eq!(cli, want, "nvme-cli fallback path");
    assert!(log.contains("EPERM"), "the agent's ioctl was denied: {log}");
    assert!(log.lines().any(|l| l.starts_with("nvme ") && l.ends_with(" ok")), "nvme-cli answered: {log}");
}
