//! One GPU lost, one whose NVML calls never return, one without ECC: the healthy GPU still
//! reports all it has, on time, every round (the fake libnvidia-ml.so scripted through its
//! environment switches, tests/csrc/fake_nvml.c).
//!
//! One test per binary: the fake library reads its switches from the environment.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::gpu::{Row, gpu_rows, row};
use dcmon_agent::collector::Collector as _;
use dcmon_agent::collector::nvsmi::{NvsmiCollector, NvsmiConfig};
use dcmon_agent::host::Host;

/// Threads of this process named `name`.
fn threads_named(name: &str) -> usize {
    let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task");
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

/// GPU 0 without ECC: everything but the ECC counts and row remapping.
fn gpu0_without_ecc() -> BTreeSet<Row> {
    let ecc = ["gpu_ecc_errors_corrected", "gpu_ecc_errors_uncorrected", "gpu_ecc_errors_total"];
    let mut want: BTreeSet<Row> = common::gpu::expected()
        .into_iter()
        .chain(common::gpu::h100_health())
        .filter(|(name, labels, _)| labels[0] == "gpu=0" && !ecc.contains(&name.as_str()))
        .filter(|(name, _, _)| !name.starts_with("gpu_remapped_rows"))
        .collect();
    want.insert(row("gpu_expected", "2"));
    want.insert(row("gpu_visible", "3"));
    want
}

#[test]
fn a_lost_and_a_hung_gpu_leave_the_others_reporting_on_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let calls = dir.path().join("calls");
    // SAFETY: the only test in this binary, set before anything reads the environment.
    unsafe {
        std::env::set_var("FAKE_NVML_GPUS", "3");
        std::env::set_var("FAKE_NVML_LOST", "1");
        std::env::set_var("FAKE_NVML_HANG", "2");
        std::env::set_var("FAKE_NVML_NO_ECC", "0");
        std::env::set_var("FAKE_NVML_CALLS", &calls);
    }
    let gpu_timeout = Duration::from_secs(1);
    let config = NvsmiConfig {
        nvml_library: Some(env!("DCMON_FAKE_NVML_SO").into()),
        nvidia_smi: "/nonexistent/nvidia-smi".into(),
        gpu_timeout: gpu_timeout.as_secs(),
        ..NvsmiConfig::default()
    };
    let mut collector = NvsmiCollector::new(Host::new(dcmon_tests::fixture_host("gpu-server")), &config);
    let mut want = gpu0_without_ecc();
    // NVML never named the lost or the hung GPU: their index is all there is.
    want.extend(gpu_rows(
        &["gpu=1", "model=", "bus_id=", "uuid="],
        &[("gpu_lost", &[], "1"), ("gpu_unresponsive", &[], "0")],
    ));
    want.extend(gpu_rows(&["gpu=2", "model=", "bus_id=", "uuid="], &[("gpu_unresponsive", &[], "1")]));
    for round in 0..3 {
        let mut out = Vec::new();
        let started = Instant::now();
        let err = collector.collect(&mut out).expect_err("the hung GPU fails the round");
        let took = started.elapsed();
        // The first round waits for the hung GPU until the deadline, not longer; later rounds
        // do not wait for a GPU still in the first round's call. Far below collector_timeout (10 s).
        let limit = if round == 0 { gpu_timeout + Duration::from_millis(500) } else { Duration::from_millis(500) };
        assert!(took < limit && (round > 0 || took >= gpu_timeout), "round {round} took {took:?}");
        assert_eq!(err.to_string(), "GPU 2: NVML did not answer within 1 s", "round {round}");
        let got = common::gpu::rows(&out);
        assert_eq!(
            got,
            want,
            "round {round}\nmissing: {:?}\nextra: {:?}",
            want.difference(&got),
            got.difference(&want)
        );
        eprintln!("round {round}: {took:?}");
    }
    // The hung GPU's thread was started once and asked once: it is still in its first call.
    assert_eq!(threads_named("dcmon-gpu2"), 1);
    let log = std::fs::read_to_string(&calls).expect("call log");
    let hung: Vec<&str> = log.lines().filter(|l| l.starts_with("2 ")).collect();
    assert_eq!(hung, ["2 nvmlDeviceGetName"]);
    // The lost GPU is asked one call a round (the first answers GPU_IS_LOST): three rounds.
    assert_eq!(log.lines().filter(|l| l.starts_with("1 ")).count(), 3, "{log}");

    // Dropping the collector does not wait for the hung call.
    let started = Instant::now();
    drop(collector);
    assert!(started.elapsed() < Duration::from_millis(200), "drop took {:?}", started.elapsed());
}
