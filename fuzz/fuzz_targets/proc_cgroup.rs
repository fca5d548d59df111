//! `/proc/PID/cgroup` and `/proc/PID/stat` texts (cgroup names are chosen by whoever creates
//! the cgroup: a container runtime, a job scheduler, a user with a delegated subtree): the
//! job of the process and its start time.
#![no_main]
use dcmon_agent::jobs::{Job, best_job, job_of_cgroup_path, parse_cgroup_file, start_time_of_stat};
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(lines) = parse_cgroup_file(&text, std::path::Path::new("/proc/fuzz/cgroup")) {
        assert!(lines.len() <= text.lines().count(), "{lines:?}");
        let best = best_job(&lines);
        for line in &lines {
            assert!(line.path.starts_with('/'), "{line:?}");
            if let (Some(best), Some(job)) = (&best, job_of_cgroup_path(line.path)) {
                assert!(best.kind <= job.kind, "{best:?} chosen over {job:?}");
            }
        }
        let label = Job::label_of(best.as_ref());
        assert!(!label.is_empty() && !label.contains('\n'), "{label:?}");
    }
    let _ = start_time_of_stat(&text);
});
