//! Per GPU and job: the GPU memory its compute processes use and how many there are. NVML
//! lists the processes on each GPU's thread; the pids are mapped to jobs here, through the
//! jobs module's cache (one /proc/PID/stat read a known process, its cgroup file once), with
//! at most [`MAX_JOB_LABELS`] job labels a round.

use std::collections::BTreeMap;

use super::{GpuProcess, GpuReading};
use crate::batch::Sample;
use crate::host::Host;
use crate::jobs::{Job, JobCache, JobError, JobLabels};

/// Distinct `job` labels a round; more are folded into `other`.
pub const MAX_JOB_LABELS: usize = 64;

/// The pid → job mapping kept between rounds.
#[derive(Debug)]
pub struct PerJob {
    cache: JobCache,
    labels: JobLabels,
}

impl PerJob {
    /// Mapping the processes of `host`'s /proc.
    pub fn new(host: Host) -> Self {
        Self { cache: JobCache::new(host), labels: JobLabels::new(MAX_JOB_LABELS) }
    }

    /// `gpu_job_processes` and `gpu_job_memory_used_bytes` of each GPU and job, from each GPU's
    /// process list. A process that exited since NVML listed it is left out.
    pub fn samples(&mut self, gpus: &[(&GpuReading, &[GpuProcess])], out: &mut Vec<Sample>, errors: &mut Vec<String>) {
        let mut found: Vec<(usize, Option<Job>, Option<u64>)> = Vec::new();
        for (slot, (_, processes)) in gpus.iter().enumerate() {
            for &(pid, bytes) in *processes {
                match self.cache.job_of_pid(pid) {
                    Ok(job) => found.push((slot, job, bytes)),
                    Err(JobError::Gone { .. }) => {}
                    Err(e) => errors.push(format!("job of GPU process {pid}: {e}")),
                }
            }
        }
        self.cache.sweep();
        // Admitted in label order, so which jobs get their own label under the cap is stable.
        found.sort_by_cached_key(|(_, job, _)| Job::label_of(job.as_ref()));
        self.labels.clear();
        // (GPU slot, job label) → (processes, bytes where NVML gave them)
        let mut per_job: BTreeMap<(usize, String), (u64, Option<u64>)> = BTreeMap::new();
        for (slot, job, bytes) in found {
            let entry = per_job.entry((slot, self.labels.admit(job.as_ref()))).or_default();
            entry.0 += 1;
            if let Some(b) = bytes {
                entry.1 = Some(entry.1.unwrap_or(0).saturating_add(b));
            }
        }
        for ((slot, job), (processes, bytes)) in per_job {
            let gpu = gpus[slot].0;
            out.push(gpu.labelled(Sample::count("gpu_job_processes", processes)).label("job", job.as_str()));
            if let Some(b) = bytes {
                out.push(gpu.labelled(Sample::count("gpu_job_memory_used_bytes", b)).label("job", job));
            }
        }
    }
}
