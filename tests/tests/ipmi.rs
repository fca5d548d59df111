//! IPMI collector against a real software BMC: OpenIPMI's `ipmi_sim` on 127.0.0.1, reached by
//! the real ipmitool over lanplus (Debian packages `openipmi` and `ipmitool`).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dcmon_agent::agent::Scheduler;
use dcmon_agent::collector::Collector;
use dcmon_agent::collector::ipmi::IpmiCollector;
use dcmon_agent::collector::ipmi::IpmiConfig;
use dcmon_agent::host::Host;

const PASSWORD: &str = "sim-secret";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/ipmi").join(name)
}

/// A running ipmi_sim with the fixture's sensors; killed on drop.
struct Sim {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Sim {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        // A port the kernel just handed out is free, give or take a race with other tests.
        let port = std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("free UDP port").port();
        let lan = std::fs::read_to_string(fixture("lan.conf.in")).expect("lan.conf.in");
        std::fs::write(d.join("lan.conf"), lan.replace("@PORT@", &port.to_string())).expect("write lan.conf");
        let emu = std::fs::read_to_string(fixture("sim.emu.in")).expect("sim.emu.in");
        std::fs::write(d.join("sim.emu"), emu.replace("@DIR@", &d.display().to_string())).expect("write sim.emu");
        // ipmi_sim keeps its SDR repository at STATE/ipmi_sim/NAME/sdr.20.main.
        let sdr_dir = d.join("state/ipmi_sim/dcmonsim");
        std::fs::create_dir_all(&sdr_dir).expect("mkdir");
        let status = Command::new("sdrcomp")
            .arg("-8")
            .arg("-o")
            .arg(sdr_dir.join("sdr.20.main"))
            .arg(fixture("sim.sdrs"))
            .status()
            .expect("run sdrcomp (package openipmi)");
        assert!(status.success(), "sdrcomp failed");
        // Raw bytes: 48 °C, 54 (x100 RPM), 90 (x4 W), 200 (x0.06 V), 25 (x0.1 A), 41 °C, 43 °C,
        // 0xF6 (-10 °C, signed).
        for (n, raw) in [(1, 48), (2, 54), (3, 90), (4, 200), (5, 25), (7, 41), (8, 43), (9, 246)] {
            std::fs::write(d.join(format!("sensor-{n}")), format!("{raw}\n")).expect("write");
        }
        std::fs::write(d.join("bmc-password"), PASSWORD).expect("write password");
        let log = std::fs::File::create(d.join("sim.log")).expect("log");
        let child = Command::new("ipmi_sim")
            .arg("-c")
            .arg(d.join("lan.conf"))
            .arg("-f")
            .arg(d.join("sim.emu"))
            .arg("-s")
            .arg(d.join("state"))
            .arg("-n")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start ipmi_sim (package openipmi)");
        let sim = Self { child, dir, port };
        sim.wait_ready();
        sim
    }

    /// Wait until the BMC answers and has polled its sensor files once (until then the
    /// file-backed sensors read 0).
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ok = Command::new("ipmitool")
                .args(["-I", "lanplus", "-H", "127.0.0.1", "-C", "3", "-U", "dcmon"])
                .args(["-P", PASSWORD, "-p", &self.port.to_string(), "sdr", "list"])
                .stderr(Stdio::null())
                .output()
                .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("43 degrees C"));
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ipmi_sim did not answer: {}",
                std::fs::read_to_string(self.dir.path().join("sim.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Set the raw byte an analog sensor reads.
    fn set_raw(&self, sensor: u8, raw: u8) {
        std::fs::write(self.dir.path().join(format!("sensor-{sensor}")), format!("{raw}\n"))
            .expect("write sensor file");
    }

    fn config(&self) -> IpmiConfig {
        IpmiConfig {
            interface: "lanplus".into(),
            host: Some("127.0.0.1".into()),
            port: self.port,
            username: Some("dcmon".into()),
            password_file: Some(self.dir.path().join("bmc-password")),
            cipher_suite: Some(3),
            interval: 1,
            timeout: 10,
            sdr_cache: self.cache(),
            sel_state_file: self.dir.path().join("state/ipmi-sel.state"),
            ..IpmiConfig::default()
        }
    }

    /// Run the real ipmitool against the simulated BMC.
    fn ipmitool(&self, args: &[&str]) -> String {
        let out = Command::new("ipmitool")
            .args(["-I", "lanplus", "-H", "127.0.0.1", "-C", "3", "-U", "dcmon", "-P", PASSWORD, "-p"])
            .arg(self.port.to_string())
            .args(args)
            .output()
            .expect("run ipmitool");
        assert!(out.status.success(), "ipmitool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Add SEL entries (ipmitool `sel add`: event message rev, sensor type, number, event
    /// type, data 1-3 per line).
    fn sel_add(&self, lines: &[&str]) {
        let file = self.dir.path().join("events");
        std::fs::write(&file, lines.join("\n") + "\n").expect("write events");
        self.ipmitool(&["sel", "add", &file.display().to_string()]);
    }

    fn cache(&self) -> PathBuf {
        self.dir.path().join("cache/ipmi-sdr.cache")
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Values = BTreeMap<(String, String, String), f64>;

/// (metric, sensor, id) -> value of the sensor series (not the SEL's, see [`sel_values`]).
fn values(samples: &[dcmon_agent::batch::Sample]) -> Values {
    samples
        .iter()
        .filter(|s| !s.name.starts_with("ipmi_sel_") && !s.name.starts_with("ipmi_dcmi_"))
        .map(|s| {
            let label = |k: &str| {
                s.labels
                    .iter()
                    .find(|(key, _)| *key == k)
                    .map(|(_, v)| v.to_string())
                    .unwrap_or_else(|| panic!("{} has no {k} label", s.name))
            };
            ((s.name.to_owned(), label("sensor"), label("id")), s.value.as_f64())
        })
        .collect()
}

fn key(metric: &str, sensor: &str, id: &str) -> (String, String, String) {
    (metric.to_owned(), sensor.to_owned(), id.to_owned())
}

fn expected(cpu_temp: f64) -> Values {
    [
        (key("ipmi_temperature_celsius", "CPU Temp", "0"), cpu_temp),
        (key("ipmi_speed_rpm", "FAN1", "1"), 5400.0),
        (key("ipmi_power_watts", "PSU1 Power", "2"), 360.0),
        (key("ipmi_volts", "12V", "3"), 12.0),
        (key("ipmi_amps", "PSU1 Current", "4"), 2.5),
        (key("ipmi_sensor_state", "Intrusion", "5"), 1.0),
        (key("ipmi_temperature_celsius", "Temp", "6"), 41.0),
        (key("ipmi_temperature_celsius", "Temp", "7"), 43.0),
        (key("ipmi_temperature_celsius", "Inlet", "8"), -10.0),
        // id 9 is "Missing": no reading, so no sample.
        (key("ipmi_sensor_state", "PSU1 Status", "10"), 1.0),
    ]
    .into_iter()
    .collect()
}

fn ipmi_only(batch: &dcmon_agent::batch::Batch) -> Vec<dcmon_agent::batch::Sample> {
    batch.samples().iter().filter(|s| s.name.starts_with("ipmi_")).cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sensor_through_the_scheduler_and_a_runtime_change() {
    let sim = Sim::start();
    let collector = IpmiCollector::new(Host::default(), &sim.config());
    let mut scheduler =
        Scheduler::new(vec![Box::new(collector) as Box<dyn Collector>], "test-machine".into(), Duration::from_secs(10));
    let batch = scheduler.collect(1).await;
    assert_eq!(values(&ipmi_only(&batch)), expected(48.0));
    assert!(sim.cache().exists(), "SDR cache was not written");

    // The BMC's reading changes; a later batch (after the 1 s interval) follows it.
    sim.set_raw(1, 71);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let batch = scheduler.collect(2).await;
        let got = values(&ipmi_only(&batch));
        if got == expected(71.0) {
            break;
        }
        assert!(Instant::now() < deadline, "reading never followed the BMC: {got:?}");
    }
}

#[test]
fn a_corrupt_sdr_cache_is_rebuilt() {
    let sim = Sim::start();
    std::fs::create_dir_all(sim.cache().parent().expect("parent")).expect("mkdir");
    // Fresh (so not rebuilt for age) but unreadable: ipmitool exits 0 printing nothing.
    std::fs::write(sim.cache(), "garbage\n").expect("write");
    let mut c = IpmiCollector::new(Host::default(), &sim.config());
    let mut out = Vec::new();
    c.collect(&mut out).expect("collect");
    assert_eq!(values(&out), expected(48.0));
    let cache = std::fs::read(sim.cache()).expect("cache");
    assert_ne!(cache, b"garbage\n", "cache not rebuilt");
}

/// A fake ipmitool that logs each start and then hangs, as a wedged BMC does.
fn hanging_ipmitool(dir: &Path) -> PathBuf {
    let script = dir.join("ipmitool");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"start $(date +%s%N)\" >> {d}/starts\nsleep 30\necho finished >> {d}/starts\n",
            d = dir.display()
        ),
    )
    .expect("write");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    script
}

#[test]
fn a_hung_ipmitool_is_killed_and_never_overlaps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = IpmiConfig {
        interface: "lanplus".into(),
        host: Some("192.0.2.1".into()),
        ipmitool: hanging_ipmitool(dir.path()),
        interval: 1,
        timeout: 2,
        sdr_cache: dir.path().join("sdr.cache"),
        sel_state_file: dir.path().join("sel.state"),
        ..IpmiConfig::default()
    };
    let mut c = IpmiCollector::new(Host::default(), &config);
    let start = Instant::now();
    // Rounds every 300 ms, well past the 1 s interval, while runs hang: each round returns
    // promptly (the first waits a bounded time for the first read), and the 2 s timeout is
    // reported once a run has been killed.
    let mut err = None;
    let mut out = Vec::new();
    while start.elapsed() < Duration::from_secs(10) {
        let round = Instant::now();
        let result = c.collect(&mut out);
        assert!(round.elapsed() < Duration::from_secs(7), "{:?}", round.elapsed());
        assert!(out.is_empty());
        if let Err(e) = result {
            err = Some(e.to_string());
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let err = err.expect("the timeout was never reported");
    assert!(err.contains("killed"), "{err}");
    // A second run may start right after the first was killed, never before.
    std::thread::sleep(Duration::from_millis(500));
    let starts = std::fs::read_to_string(dir.path().join("starts")).expect("starts");
    let times: Vec<u128> =
        starts.lines().filter_map(|l| l.strip_prefix("start ")).map(|t| t.parse().expect("date +%s%N")).collect();
    assert!(!times.is_empty() && times.len() <= 2, "{starts}");
    for pair in times.windows(2) {
        let gap_ms = (pair[1] - pair[0]) / 1_000_000;
        assert!(gap_ms >= 1900, "runs overlapped: {gap_ms} ms apart\n{starts}");
    }
    assert!(!starts.contains("finished"), "the hung child was not killed");
}

const TEMPERATURE_HIGH: &str = "0x04 0x01 0x30 0x01 0x09 0x00 0x00";
const MEMORY_ECC: &str = "0x04 0x0c 0x53 0x6f 0x00 0x00 0x00";
const PSU_FAILURE: &str = "0x04 0x08 0x61 0x6f 0x01 0x00 0x00";

/// `ipmi_sel_events_total` by "sensor type/event/direction", and the other SEL and DCMI series.
fn sel_values(out: &[dcmon_agent::batch::Sample]) -> BTreeMap<String, f64> {
    out.iter()
        .filter(|s| s.name.starts_with("ipmi_sel_") || s.name.starts_with("ipmi_dcmi_"))
        .map(|s| {
            let labels: Vec<&str> = s.labels.iter().map(|(_, v)| v.as_str()).collect();
            let key = if labels.is_empty() { s.name.to_owned() } else { labels.join("/") };
            (key, s.value.as_f64())
        })
        .collect()
}

fn sel_expected(
    temperature: f64,
    memory: f64,
    psu: f64,
    entries: f64,
    free: f64,
    percent: f64,
) -> BTreeMap<String, f64> {
    let mut m: BTreeMap<String, f64> = [
        ("ipmi_sel_entries".to_owned(), entries),
        ("ipmi_sel_free_bytes".to_owned(), free),
        ("ipmi_sel_used_percent".to_owned(), percent),
        ("ipmi_sel_overflow".to_owned(), 0.0),
    ]
    .into_iter()
    .collect();
    for (key, n) in [
        ("Temperature/Upper Critical going high/Asserted", temperature),
        ("Memory/Correctable ECC/Asserted", memory),
        ("Power Supply/Failure detected/Asserted", psu),
    ] {
        if n > 0.0 {
            m.insert(key.to_owned(), n);
        }
    }
    m
}

/// Collect until the SEL series are `want` (the 1 s interval passes between reads).
fn collect_until(c: &mut IpmiCollector, want: &BTreeMap<String, f64>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut out = Vec::new();
        c.collect(&mut out).expect("collect");
        let got = sel_values(&out);
        if got == *want {
            return;
        }
        assert!(Instant::now() < deadline, "SEL series never became {want:?}: {got:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The SEL of ipmi_sim: entries counted once each, by sensor type and event, across a restart
/// of the collector (the state file) and a `sel clear`; its fill level as `sel info` says.
/// ipmi_sim has no DCMI: no `ipmi_dcmi_*` series (the parser is tested on captured output).
#[test]
fn sel_is_counted_incrementally_across_a_restart_and_a_clear() {
    let sim = Sim::start();
    sim.sel_add(&[TEMPERATURE_HIGH, MEMORY_ECC, PSU_FAILURE]);
    let mut c = IpmiCollector::new(Host::default(), &sim.config());
    // 16 bytes an entry of ipmi_sim's 800.
    collect_until(&mut c, &sel_expected(1.0, 1.0, 1.0, 3.0, 752.0, 6.0));
    sim.sel_add(&[MEMORY_ECC]);
    collect_until(&mut c, &sel_expected(1.0, 2.0, 1.0, 4.0, 736.0, 8.0));
    // A restart: nothing counted twice.
    drop(c);
    let mut c = IpmiCollector::new(Host::default(), &sim.config());
    let mut out = Vec::new();
    c.collect(&mut out).expect("collect");
    assert_eq!(sel_values(&out), sel_expected(1.0, 2.0, 1.0, 4.0, 736.0, 8.0));
    // Cleared, then one new entry (its record id restarts at 1): counted, the rest kept.
    sim.ipmitool(&["sel", "clear"]);
    sim.sel_add(&[TEMPERATURE_HIGH]);
    collect_until(&mut c, &sel_expected(2.0, 2.0, 1.0, 1.0, 784.0, 2.0));
}
