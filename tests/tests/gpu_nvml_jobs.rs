//! Per GPU and job use: the fake libnvidia-ml.so lists compute processes whose /proc entries
//! are a fixture tree (the collector's host root): a Slurm job (cgroup v2) with a process on
//! each GPU, a Kubernetes pod, a Docker container, a process in no job, one that has exited.
//!
//! One test per binary: the fake library reads its switches from the environment.

mod common;

use std::path::Path;

use common::gpu::{A100, H100, gpu_rows};
use dcmon_agent::collector::Collector as _;
use dcmon_agent::collector::nvsmi::{NvsmiCollector, NvsmiConfig};
use dcmon_agent::host::Host;

const CONTAINER: &str = "4f6c9a2b7d8e1f3a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a";
const POD_CONTAINER: &str = "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b1a0f9e8d";

/// /proc/PID/stat and /proc/PID/cgroup of a process under `root`.
fn process(root: &Path, pid: u32, cgroup: &str) {
    let dir = root.join(format!("proc/{pid}"));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let stat = format!(
        "{pid} (python3) S 1 {pid} {pid} 0 -1 4194560 100 0 0 0 50 10 0 0 20 0 4 0 98765{pid} 123456789 1000\n"
    );
    std::fs::write(dir.join("stat"), stat).expect("stat");
    std::fs::write(dir.join("cgroup"), format!("{cgroup}\n")).expect("cgroup");
}

#[test]
fn gpu_memory_and_processes_per_job() {
    let root = tempfile::tempdir().expect("tempdir");
    let slurm = "0::/system.slice/slurmstepd.scope/job_4242/step_0/user/task_0";
    process(root.path(), 1001, slurm);
    process(root.path(), 1002, slurm);
    let pod = format!(
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b2c3d_1111_2222_3333_444455556666.slice/cri-containerd-{POD_CONTAINER}.scope"
    );
    process(root.path(), 1003, &pod);
    process(root.path(), 1005, &format!("0::/system.slice/docker-{CONTAINER}.scope"));
    process(root.path(), 1006, "0::/");
    // SAFETY: the only test in this binary, set before anything reads the environment.
    unsafe {
        // 1004 has exited: no /proc/1004. 1001's memory on GPU 1 is not available.
        std::env::set_var(
            "FAKE_NVML_PROCS",
            "0:1001:1073741824;0:1002:2147483648;0:1003:536870912;0:1004:4096;1:1001:na;1:1005:100;1:1006:7",
        );
    }
    let config = NvsmiConfig { nvml_library: Some(env!("DCMON_FAKE_NVML_SO").into()), ..NvsmiConfig::default() };
    let mut collector = NvsmiCollector::new(Host::new(root.path()), &config);
    let mut want = gpu_rows(
        &H100,
        &[
            ("gpu_job_processes", &["job=slurm:4242"], "2"),
            ("gpu_job_memory_used_bytes", &["job=slurm:4242"], "3221225472"),
            ("gpu_job_processes", &["job=pod:0a1b2c3d-1111-2222-3333-444455556666"], "1"),
            ("gpu_job_memory_used_bytes", &["job=pod:0a1b2c3d-1111-2222-3333-444455556666"], "536870912"),
        ],
    );
    want.extend(gpu_rows(
        &A100,
        &[
            // NVML did not say how much 1001 uses there: a count and no memory, not 0 bytes.
            ("gpu_job_processes", &["job=slurm:4242"], "1"),
            ("gpu_job_processes", &["job=container:4f6c9a2b7d8e"], "1"),
            ("gpu_job_memory_used_bytes", &["job=container:4f6c9a2b7d8e"], "100"),
            ("gpu_job_processes", &["job=none"], "1"),
            ("gpu_job_memory_used_bytes", &["job=none"], "7"),
        ],
    ));
    for round in 0..2 {
        let mut out = Vec::new();
        collector.collect(&mut out).expect("collect");
        let jobs: Vec<_> = out.into_iter().filter(|s| s.name.starts_with("gpu_job_")).collect();
        let got = common::gpu::rows(&jobs);
        assert_eq!(
            got,
            want,
            "round {round}\nmissing: {:?}\nextra: {:?}",
            want.difference(&got),
            got.difference(&want)
        );
    }
}
