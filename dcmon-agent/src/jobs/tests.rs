//! The job mapping on `/proc/PID/cgroup` contents as Slurm, Kubernetes, the container
//! runtimes and systemd write them, the cache on a fixture /proc and on this process, and
//! the label bound.

use std::path::Path;

use super::*;

const CONTAINER_ID: &str = "4e2b1f0c9d8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c";

fn job(kind: JobKind, id: &str) -> Option<Job> {
    Some(Job::new(kind, id))
}

fn of(text: &str) -> Option<Job> {
    job_of_cgroup_file(text).expect("well-formed cgroup file")
}

/// Slurm's proctrack/task cgroup v1 plugins: the job's processes sit in `slurmd.service` in the
/// systemd hierarchy, and the job's directories in the controllers Slurm constrains.
const SLURM_V1: &str = "\
12:rdma:/
11:devices:/slurm/uid_1000/job_4711/step_0/task_0
10:freezer:/slurm/uid_1000/job_4711/step_0
9:memory:/slurm/uid_1000/job_4711/step_0/task_0
8:cpuset:/slurm/uid_1000/job_4711/step_0
7:cpu,cpuacct:/system.slice/slurmd.service
6:blkio:/system.slice/slurmd.service
5:net_cls,net_prio:/
4:perf_event:/
3:pids:/system.slice/slurmd.service
2:hugetlb:/
1:name=systemd:/system.slice/slurmd.service
0::/system.slice/slurmd.service
";

#[test]
fn slurm_v1_job_wins_over_slurmd_service() {
    assert_eq!(of(SLURM_V1), job(JobKind::Slurm, "4711"));
    assert_eq!(of(SLURM_V1).expect("job").label(), "slurm:4711");
}

#[test]
fn slurm_v1_with_several_slurmd_per_node() {
    // `CgroupMountpoint` per node with NodeName=%n gives `slurm_<node>`.
    assert_eq!(of("4:memory:/slurm_node07/uid_0/job_88/step_batch/task_0\n"), job(JobKind::Slurm, "88"));
}

#[test]
fn slurm_v2_steps_and_stepd() {
    // cgroup/v2: every step under the slurmstepd scope slurmd delegates.
    for step in ["step_0/user/task_0", "step_batch/user/task_0", "step_extern/user/task_special", "step_0/slurm"] {
        let text = format!("0::/system.slice/slurmstepd.scope/job_123456/{step}\n");
        assert_eq!(of(&text), job(JobKind::Slurm, "123456"), "{step}");
    }
    // Several slurmd per node: `<node>_slurmstepd.scope`.
    assert_eq!(of("0::/system.slice/n01_slurmstepd.scope/job_9/step_0/user/task_1\n"), job(JobKind::Slurm, "9"));
    // slurmstepd's own infrastructure is no job: the scope is the unit.
    assert_eq!(of("0::/system.slice/slurmstepd.scope/system\n"), job(JobKind::Unit, "slurmstepd.scope"));
    // A `job_` directory elsewhere is not Slurm's.
    assert_eq!(of("0::/system.slice/cron.service/job_12\n"), job(JobKind::Unit, "cron.service"));
    assert_eq!(of("0::/system.slice/slurmstepd.scope/job_x1/step_0\n"), job(JobKind::Unit, "slurmstepd.scope"));
}

const POD_UID: &str = "0c1f4b5e-2d3a-4b5c-8d9e-0f1a2b3c4d5e";

#[test]
fn kubernetes_cgroupfs_driver_v1() {
    let text = format!(
        "\
12:hugetlb:/kubepods/burstable/pod{POD_UID}/{CONTAINER_ID}
11:memory:/kubepods/burstable/pod{POD_UID}/{CONTAINER_ID}
10:cpu,cpuacct:/kubepods/burstable/pod{POD_UID}/{CONTAINER_ID}
9:pids:/kubepods/burstable/pod{POD_UID}/{CONTAINER_ID}
1:name=systemd:/kubepods/burstable/pod{POD_UID}/{CONTAINER_ID}
"
    );
    assert_eq!(of(&text), job(JobKind::Pod, POD_UID));
    assert_eq!(of(&text).expect("job").label(), format!("pod:{POD_UID}"));
    // Guaranteed pods have no QoS directory.
    assert_eq!(of(&format!("0::/kubepods/pod{POD_UID}/{CONTAINER_ID}\n")), job(JobKind::Pod, POD_UID));
}

#[test]
fn kubernetes_systemd_driver_v2() {
    let uid_ = POD_UID.replace('-', "_");
    for (qos, runtime) in [("burstable", "cri-containerd"), ("besteffort", "crio")] {
        let text = format!(
            "0::/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{uid_}.slice/{runtime}-{CONTAINER_ID}.scope\n"
        );
        assert_eq!(of(&text), job(JobKind::Pod, POD_UID), "{qos}");
    }
    let guaranteed = format!("0::/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{CONTAINER_ID}.scope\n");
    assert_eq!(of(&guaranteed), job(JobKind::Pod, POD_UID));
    // kind and k3s: the kubelet's pods below containerd's own unit, `slice:prefix:id`.
    let nested = format!(
        "0::/system.slice/containerd.service/kubepods-besteffort-pod{uid_}.slice:cri-containerd:{CONTAINER_ID}\n"
    );
    assert_eq!(of(&nested), job(JobKind::Pod, POD_UID));
    // A static (mirror) pod's uid is a hash without dashes.
    let hash = "5ac6b3bb0b0f1e2f5b3c9ed1d0e8c9a2";
    assert_eq!(of(&format!("0::/kubepods/burstable/pod{hash}/{CONTAINER_ID}\n")), job(JobKind::Pod, hash));
    // The pod's QoS slices alone (a pod's sandbox being set up) are no pod.
    assert_eq!(of("0::/kubepods.slice/kubepods-burstable.slice\n"), None);
}

#[test]
fn docker_cgroupfs_v1_and_systemd_v2() {
    let v1 = format!(
        "\
13:misc:/
12:pids:/docker/{CONTAINER_ID}
11:memory:/docker/{CONTAINER_ID}
5:cpu,cpuacct:/docker/{CONTAINER_ID}
1:name=systemd:/docker/{CONTAINER_ID}
0::/system.slice/containerd.service
"
    );
    assert_eq!(of(&v1), job(JobKind::Container, CONTAINER_ID));
    assert_eq!(of(&v1).expect("job").label(), "container:4e2b1f0c9d8a");
    assert_eq!(of(&format!("0::/system.slice/docker-{CONTAINER_ID}.scope\n")), job(JobKind::Container, CONTAINER_ID));
    // Docker in Docker: the outer container is the one the host sees.
    let inner = "aa".repeat(32);
    assert_eq!(of(&format!("0::/docker/{CONTAINER_ID}/docker/{inner}\n")), job(JobKind::Container, CONTAINER_ID));
}

#[test]
fn containerd_crio_and_podman() {
    // containerd through nerdctl (systemd driver) and ctr (cgroupfs, `/<namespace>/<id>`).
    for path in [
        format!("/system.slice/nerdctl-{CONTAINER_ID}.scope"),
        format!("/default/{CONTAINER_ID}"),
        format!("/machine.slice/libpod-{CONTAINER_ID}.scope/container"),
        format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CONTAINER_ID}.scope"),
        format!("/libpod_parent/libpod-{CONTAINER_ID}"),
        format!("/system.slice/crio-{CONTAINER_ID}.scope"),
    ] {
        assert_eq!(job_of_cgroup_path(&path), job(JobKind::Container, CONTAINER_ID), "{path}");
    }
    // conmon, podman's monitor, is not the container.
    let conmon = format!("0::/machine.slice/libpod-conmon-{CONTAINER_ID}.scope\n");
    assert_eq!(of(&conmon), job(JobKind::Unit, &format!("libpod-conmon-{CONTAINER_ID}.scope")));
    // Not 64 hex digits: no container.
    assert_eq!(job_of_cgroup_path(&format!("/docker/{}", &CONTAINER_ID[..63])), None);
}

#[test]
fn systemd_services_sessions_and_the_root() {
    let hybrid = "\
12:cpuset:/
11:memory:/system.slice/nginx.service
4:pids:/system.slice/nginx.service
1:name=systemd:/system.slice/nginx.service
0::/system.slice/nginx.service
";
    assert_eq!(of(hybrid), job(JobKind::Unit, "nginx.service"));
    assert_eq!(of(hybrid).expect("job").label(), "unit:nginx.service");
    assert_eq!(of("0::/system.slice/nvidia-persistenced.service\n"), job(JobKind::Unit, "nvidia-persistenced.service"));
    assert_eq!(
        of("0::/system.slice/system-getty.slice/getty@tty1.service\n"),
        job(JobKind::Unit, "getty@tty1.service")
    );
    assert_eq!(of("0::/init.scope\n"), job(JobKind::Unit, "init.scope"));
    // A user's sessions and user units are that user's slice.
    for path in [
        "/user.slice/user-1000.slice/session-4.scope",
        "/user.slice/user-1000.slice/user@1000.service/app.slice/x.service",
    ] {
        assert_eq!(job_of_cgroup_path(path), job(JobKind::Unit, "user-1000.slice"), "{path}");
    }
    assert_eq!(of("0::/\n"), None);
    assert_eq!(of("0::/system.slice\n"), None);
    assert_eq!(Job::label_of(None), NO_JOB_LABEL);
}

#[test]
fn malformed_lines_are_errors_naming_what_was_expected() {
    for (text, expected) in [
        ("garbage\n", "hierarchy-id:controllers:path"),
        ("x:cpu:/\n", "numeric hierarchy id"),
        ("0::system.slice\n", "starting with '/'"),
    ] {
        let err = job_of_cgroup_file(text).expect_err(text).to_string();
        assert!(err.contains("/proc/PID/cgroup") && err.contains(expected), "{err}");
    }
    // A ':' inside the path is the path's.
    let lines = parse_cgroup_file("0::/a:b\n", Path::new("x")).expect("parse");
    assert_eq!(lines, [CgroupLine { hierarchy: 0, controllers: "", path: "/a:b" }]);
}

#[test]
fn start_time_is_field_22_even_when_the_name_holds_parentheses() {
    let stat = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 987654 1000 50 \
                18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
    assert_eq!(start_time_of_stat(stat), Some(987_654));
    assert_eq!(start_time_of_stat("4242 (short) S 1 2 3\n"), None);
}

#[test]
fn start_time_matches_procfs_core_on_this_process() {
    use procfs_core::FromRead as _;
    let text = std::fs::read_to_string("/proc/self/stat").expect("own stat");
    let reference = procfs_core::process::Stat::from_read(text.as_bytes()).expect("procfs-core");
    assert_eq!(start_time_of_stat(&text), Some(reference.starttime));
}

/// A fixture /proc with one process.
fn write_process(root: &Path, pid: u32, start_time: u64, cgroup: &str) {
    let dir = root.join(format!("proc/{pid}"));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let stat = format!("{pid} (python3) S 1 {pid} {pid} 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 {start_time} 1 1\n");
    std::fs::write(dir.join("stat"), stat).expect("stat");
    std::fs::write(dir.join("cgroup"), cgroup).expect("cgroup");
}

#[test]
fn cache_reads_the_cgroup_once_per_process_and_tells_a_reused_pid() {
    let root = tempfile::tempdir().expect("tempdir");
    write_process(root.path(), 700, 1000, SLURM_V1);
    let mut cache = JobCache::new(Host::new(root.path()));
    assert_eq!(cache.job_of_pid(700).expect("lookup"), job(JobKind::Slurm, "4711"));
    // Same process (same start time): the cached job, the cgroup file is not read again.
    std::fs::write(root.path().join("proc/700/cgroup"), "0::/system.slice/other.service\n").expect("cgroup");
    assert_eq!(cache.job_of_pid(700).expect("lookup"), job(JobKind::Slurm, "4711"));
    // The pid reused by a new process: read afresh.
    write_process(root.path(), 700, 2000, "0::/system.slice/other.service\n");
    assert_eq!(cache.job_of_pid(700).expect("lookup"), job(JobKind::Unit, "other.service"));
    assert_eq!(cache.len(), 1);
    // Gone.
    std::fs::remove_dir_all(root.path().join("proc/700")).expect("rm");
    assert!(matches!(cache.job_of_pid(700), Err(JobError::Gone { pid: 700 })));
    // Malformed files name the file.
    write_process(root.path(), 701, 5, "nonsense\n");
    let err = cache.job_of_pid(701).expect_err("malformed").to_string();
    assert!(err.contains("proc/701/cgroup") && err.contains("hierarchy-id"), "{err}");
    std::fs::write(root.path().join("proc/701/stat"), "701 (x) S 1\n").expect("stat");
    let err = cache.job_of_pid(701).expect_err("malformed").to_string();
    assert!(err.contains("proc/701/stat") && err.contains("field 22"), "{err}");
}

#[test]
fn sweep_forgets_the_processes_not_looked_up_since() {
    let root = tempfile::tempdir().expect("tempdir");
    write_process(root.path(), 1, 1, "0::/init.scope\n");
    write_process(root.path(), 2, 1, "0::/system.slice/a.service\n");
    let mut cache = JobCache::new(Host::new(root.path()));
    cache.job_of_pid(1).expect("lookup");
    cache.job_of_pid(2).expect("lookup");
    cache.sweep();
    assert_eq!(cache.len(), 2);
    cache.job_of_pid(2).expect("lookup");
    cache.sweep();
    assert_eq!(cache.len(), 1);
    cache.sweep();
    assert!(cache.is_empty());
}

#[test]
fn this_process_through_the_cache_and_the_file_agree() {
    let text = std::fs::read_to_string("/proc/self/cgroup").expect("own cgroup");
    let lines = parse_cgroup_file(&text, Path::new("/proc/self/cgroup")).expect("this host's cgroup file parses");
    assert!(!lines.is_empty());
    // Every line's job, if any, is one of the kinds; the file's is the first in order.
    let expected = lines.iter().filter_map(|l| job_of_cgroup_path(l.path)).min_by_key(|j| j.kind);
    let from_file = job_of_cgroup_file(&text).expect("parse");
    assert_eq!(from_file.as_ref().map(|j| j.kind), expected.as_ref().map(|j| j.kind));
    let mut cache = JobCache::new(Host::default());
    assert_eq!(cache.job_of_pid(std::process::id()).expect("own pid"), from_file);
}

#[test]
fn labels_over_the_cap_fold_into_other_and_are_counted() {
    let jobs: Vec<Job> = ["1", "2", "3", "4"].iter().map(|id| Job::new(JobKind::Slurm, *id)).collect();
    let mut labels = JobLabels::new(2);
    let got: Vec<String> = [Some(&jobs[0]), Some(&jobs[1]), Some(&jobs[2]), Some(&jobs[0]), None, Some(&jobs[3])]
        .into_iter()
        .map(|j| labels.admit(j))
        .collect();
    assert_eq!(got, ["slurm:1", "slurm:2", OTHER_LABEL, "slurm:1", NO_JOB_LABEL, OTHER_LABEL]);
    assert_eq!(labels.folded(), 2);
    labels.clear();
    assert_eq!(labels.admit(Some(&jobs[3])), "slurm:4");
    assert_eq!(labels.folded(), 0);
}
