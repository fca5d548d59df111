//! GPU XID errors end to end: scripted NVML XID events from the fake libnvidia-ml.so
//! (tests/csrc/fake_nvml.c) and a kernel log file standing in for /dev/kmsg, through the agent's
//! `once` and through the collector across restarts and a new boot.
//!
//! One test per binary: the fake library reads FAKE_NVML_XID_EVENTS from the environment.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use dcmon_agent::collector::Collector as _;
use dcmon_agent::collector::gpu_xid::{GpuXidCollector, GpuXidConfig};
use dcmon_agent::host::Host;
use dcmon_tests::agent::{AgentConfig, run_once};
use dcmon_tests::wait_until;
use serde_json::json;

const H100: &str =
    "gpu=0,model=NVIDIA H100 80GB HBM3,bus_id=00000000:18:00.0,uuid=GPU-11111111-2222-3333-4444-555555555555";
const A100: &str =
    "gpu=1,model=NVIDIA A100-SXM4-40GB,bus_id=00000000:3B:00.0,uuid=GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";

/// The ring as /dev/kmsg hands it out: an XID on each GPU (bus 18 and 3b, the fake's), the
/// fallen-off-the-bus line without `Xid`, an NVSwitch SXid and continuation lines.
const RING: &str = "\
6,1,0,-;Linux version 6.18.0 (builder@debian) #1 SMP PREEMPT_DYNAMIC
4,100,5123456,-;NVRM: Xid (PCI:0000:18:00): 79, pid=1234, name=python, GPU has fallen off the bus.
 SUBSYSTEM=pci
 DEVICE=+pci:0000:18:00.0
4,101,5123999,-;NVRM: GPU 0000:18:00.0: GPU has fallen off the bus.
4,102,6000000,-;NVRM: Xid (PCI:0000:3b:00): 13, pid='<unknown>', name=<unknown>, Graphics Exception: ESR 0x405840=0x0
4,103,6000100,-;NVRM: SXid (PCI:0000:88:00.0): 12028, Non-fatal, Link 32 egress non-posted PRIV error
4,104,6000200,-;NVRM: Xid (PCI:0000:3b:00): 13, pid='<unknown>', name=<unknown>, Graphics Exception: ESR 0x405840=0x1
";

fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open for append");
    f.write_all(text.as_bytes()).expect("append");
}

/// `gpu_xid_errors_total` series of `samples`: "labels,xid=N" -> count.
fn counts(samples: &[dcmon_agent::batch::Sample]) -> BTreeMap<String, f64> {
    samples
        .iter()
        .filter(|s| s.name == "gpu_xid_errors_total")
        .map(|s| {
            let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            (labels.join(","), s.value.as_f64())
        })
        .collect()
}

fn expect(rows: &[(&str, u32, f64)]) -> BTreeMap<String, f64> {
    rows.iter().map(|(gpu, xid, n)| (format!("{gpu},xid={xid}"), *n)).collect()
}

fn collect(c: &mut GpuXidCollector) -> BTreeMap<String, f64> {
    let mut out = Vec::new();
    c.collect(&mut out).expect("collect");
    counts(&out)
}

/// Collect until `done` holds (the source threads deliver between rounds).
fn collect_until(c: &mut GpuXidCollector, what: &str, done: impl Fn(&BTreeMap<String, f64>) -> bool) {
    let got = wait_until(Duration::from_secs(10), || Some(collect(c)).filter(&done));
    assert!(got.is_some(), "timed out waiting for {what}: {:?}", collect(c));
}

#[test]
fn xids_from_nvml_events_and_the_kernel_log_counted_once_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = dir.path().join("xid-events");
    std::fs::write(&events, "").expect("events");
    // SAFETY: the only test in this binary, set before any thread or child reads it.
    unsafe { std::env::set_var("FAKE_NVML_XID_EVENTS", &events) };

    // The agent's `once`: the ring read from its start, a pending NVML event.
    let once_dir = dir.path().join("once");
    std::fs::create_dir_all(&once_dir).expect("mkdir");
    let ring = once_dir.join("kmsg");
    std::fs::write(&ring, RING).expect("ring");
    append(&events, "1 48\n");
    let config = AgentConfig::without_exporters()
        .extend(json!({
            "machine_id": "xid-once",
            "ebpf": "off",
            "exporters": {"ipmi": false, "apt": false, "nvme": false, "nvsmi": true, "gpu_xid": true},
            "nvsmi": {"nvml_library": env!("DCMON_FAKE_NVML_SO"), "nvidia_smi": "/nonexistent/nvidia-smi"},
            "gpu_xid": {"kmsg": ring, "state_file": once_dir.join("gpu-xid.state")},
        }))
        .write(&once_dir);
    let (stdout, log) = run_once(&once_dir, &config);
    let batch: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is one JSON batch");
    let got: BTreeMap<String, f64> = dcmon_tests::batch::metrics(&batch)
        .iter()
        .filter(|m| m["name"] == "gpu_xid_errors_total")
        .map(|m| {
            let labels = m["labels"].as_object().expect("labels");
            let labels: Vec<String> = ["gpu", "model", "bus_id", "uuid", "xid"]
                .iter()
                .map(|k| format!("{k}={}", labels[*k].as_str().expect("string label")))
                .collect();
            assert_eq!(m["value"].as_u64().map(|v| v as f64), m["value"].as_f64(), "a counter is an integer: {m}");
            (labels.join(","), m["value"].as_f64().expect("value"))
        })
        .collect();
    assert_eq!(got, expect(&[(H100, 79, 1.0), (A100, 13, 2.0), (A100, 48, 1.0)]), "{log}");

    // The collector itself, across restarts. Its own host root: a boot id of its own.
    let host = dir.path().join("host");
    let boot_id = host.join("proc/sys/kernel/random/boot_id");
    std::fs::create_dir_all(boot_id.parent().expect("parent")).expect("mkdir");
    std::fs::write(&boot_id, "4f1a2b3c-0000-4000-8000-000000000001\n").expect("boot id");
    let kmsg = dir.path().join("kmsg");
    std::fs::write(&kmsg, RING).expect("ring");
    let config = GpuXidConfig { kmsg: kmsg.clone(), state_file: dir.path().join("state/gpu-xid.state") };
    let start = || {
        let mut c = GpuXidCollector::new(Host::new(&host), &config, Some(env!("DCMON_FAKE_NVML_SO").into()));
        c.wait_for_first_result();
        c
    };
    let mut c = start();
    assert_eq!(collect(&mut c), expect(&[(H100, 79, 1.0), (A100, 13, 2.0)]));

    // An XID only NVML sees.
    append(&events, "0 31\n");
    collect_until(&mut c, "the NVML-only XID", |got| got.contains_key(&format!("{H100},xid=31")));
    // One XID both see: counted once.
    append(
        &kmsg,
        "4,105,9000000,-;NVRM: Xid (PCI:0000:3b:00): 48, pid=77, name=x, An uncorrectable double bit error\n",
    );
    append(&events, "1 48\n");
    collect_until(&mut c, "the XID from both sources", |got| got.contains_key(&format!("{A100},xid=48")));
    std::thread::sleep(Duration::from_millis(500));
    // One XID only the kernel log sees (NVML hung, say).
    append(&kmsg, "4,106,9500000,-;NVRM: Xid (PCI:0000:18:00): 79, pid=78, name=y, GPU has fallen off the bus.\n");
    collect_until(&mut c, "the kernel-log-only XID", |got| got.get(&format!("{H100},xid=79")) == Some(&2.0));
    let before_restart = expect(&[(H100, 79, 2.0), (H100, 31, 1.0), (A100, 13, 2.0), (A100, 48, 1.0)]);
    assert_eq!(collect(&mut c), before_restart);
    drop(c);

    // A restart within the boot: the ring read again from its start counts nothing twice.
    let mut c = start();
    assert_eq!(collect(&mut c), before_restart);
    drop(c);

    // A new boot: from zero; what the ring holds counts again, the NVML-only XID is gone.
    std::fs::write(&boot_id, "4f1a2b3c-0000-4000-8000-000000000002\n").expect("boot id");
    let mut c = start();
    assert_eq!(collect(&mut c), expect(&[(H100, 79, 2.0), (A100, 13, 2.0), (A100, 48, 1.0)]));
}
