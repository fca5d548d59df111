//! `oom_kills_total{job}`: the kernel OOM killer's victims since the agent started, by the job
//! of the victim's memory cgroup (see [`crate::jobs`]). The `mark_victim` program counts them
//! per memory cgroup id, which is the inode number of the cgroup's directory in the memory
//! controller's hierarchy; the agent finds that directory and names its job.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::batch::Sample;
use crate::ebpf::Probes;
use crate::host::Host;
use crate::jobs::{JobLabels, job_of_cgroup_path};

/// Most distinct job labels sent; the rest are folded into `other`.
const MAX_JOBS: usize = 256;
/// How deep the search for a cgroup directory goes.
const MAX_DEPTH: usize = 12;
/// The label of kills whose cgroup was gone before the agent could name it.
pub const GONE_LABEL: &str = "unknown";

/// OOM kills by job.
#[derive(Debug)]
pub struct OomKills {
    probes: Arc<Probes>,
    /// The memory controller's hierarchy: cgroup v1 `memory`, else the v2 root.
    root: PathBuf,
    /// Kills per cgroup id at start.
    start: HashMap<u64, u64>,
    /// Kills per cgroup id as the last walk of the map found them, and their sum: the map is
    /// walked again only when the kill total differs from that sum.
    walked: Vec<(u64, u64)>,
    walked_sum: u64,
    /// Job label per cgroup id, once found.
    labels: HashMap<u64, String>,
    jobs: JobLabels,
}

impl OomKills {
    /// Reads the map's counts at start.
    pub fn new(host: &Host, probes: Arc<Probes>) -> anyhow::Result<Self> {
        let v1 = host.path("/sys/fs/cgroup/memory");
        let root = if v1.is_dir() { v1 } else { host.path("/sys/fs/cgroup") };
        let walked = probes.oom_kills()?;
        let walked_sum = kill_sum(&walked);
        let start = walked.iter().copied().collect();
        Ok(Self { probes, root, start, walked, walked_sum, labels: HashMap::new(), jobs: JobLabels::new(MAX_JOBS) })
    }

    /// Kills per cgroup id now: the last walk's while the kill total equals its sum, else a new
    /// walk. A walk that raced a kill (its total counted, its cgroup's count not yet seen) sums
    /// short and is walked again next time; so is a map too full to hold a kill's cgroup.
    fn kills(&mut self) -> anyhow::Result<&[(u64, u64)]> {
        if self.probes.oom_kill_total() != self.walked_sum {
            self.walked = self.probes.oom_kills()?;
            self.walked_sum = kill_sum(&self.walked);
        }
        Ok(&self.walked)
    }

    /// `oom_kills_total` of each job with a kill since start.
    pub fn samples(&mut self, out: &mut Vec<Sample>) -> anyhow::Result<()> {
        let mut by_job: HashMap<String, u64> = HashMap::new();
        // A copy: naming a job below borrows `self` (usually empty, so no allocation).
        let kills = self.kills()?.to_vec();
        for (id, count) in kills {
            let n = count.wrapping_sub(self.start.get(&id).copied().unwrap_or(0));
            if n == 0 {
                continue;
            }
            let label = match self.labels.get(&id) {
                Some(l) => l.clone(),
                None => {
                    let label = match find_cgroup(&self.root, id) {
                        Some(path) => self.jobs.admit(job_of_cgroup_path(&path).as_ref()),
                        None => GONE_LABEL.to_owned(),
                    };
                    self.labels.insert(id, label.clone());
                    label
                }
            };
            *by_job.entry(label).or_default() += n;
        }
        let mut by_job: Vec<(String, u64)> = by_job.into_iter().collect();
        by_job.sort();
        out.extend(by_job.into_iter().map(|(job, n)| Sample::count("oom_kills_total", n).label("job", job)));
        Ok(())
    }
}

/// The kills of a walk of the map, all cgroups together.
fn kill_sum(kills: &[(u64, u64)]) -> u64 {
    kills.iter().fold(0, |sum, &(_, n)| sum.wrapping_add(n))
}

/// The path below `root` (`/a/b`, `/` for the root) of the cgroup directory with inode `id`.
pub fn find_cgroup(root: &Path, id: u64) -> Option<String> {
    fn walk(dir: &Path, id: u64, depth: usize) -> Option<PathBuf> {
        if std::fs::metadata(dir).ok()?.ino() == id {
            return Some(dir.to_owned());
        }
        if depth == 0 {
            return None;
        }
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .find_map(|e| walk(&e.path(), id, depth - 1))
    }
    let found = walk(root, id, MAX_DEPTH)?;
    let rel = found.strip_prefix(root).ok()?;
    Some(format!("/{}", rel.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::Job;

    #[test]
    fn cgroup_directories_are_found_by_inode_and_named_by_job() {
        let dir = tempfile::tempdir().expect("tempdir");
        let job = dir.path().join("slurm/uid_0/job_42/step_0");
        std::fs::create_dir_all(&job).expect("mkdir");
        let ino = std::fs::metadata(&job).expect("stat").ino();
        let path = find_cgroup(dir.path(), ino).expect("found");
        assert_eq!(path, "/slurm/uid_0/job_42/step_0");
        assert_eq!(Job::label_of(job_of_cgroup_path(&path).as_ref()), "slurm:42");
        let root_ino = std::fs::metadata(dir.path()).expect("stat").ino();
        assert_eq!(find_cgroup(dir.path(), root_ino).as_deref(), Some("/"));
        assert_eq!(find_cgroup(dir.path(), u64::MAX), None);
    }
}
