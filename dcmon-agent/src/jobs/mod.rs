//! Which job a process belongs to, from its cgroup membership (`/proc/PID/cgroup`): a Slurm
//! job, a Kubernetes pod, a container or a systemd unit, cgroup v1 and v2.
//!
//! Consumers (per-job GPU use, OOM kills per job) turn a pid into a [`Job`] through a
//! [`JobCache`], print it with [`Job::label`] (format in README, Jobs), and keep the label set
//! of a round bounded with [`JobLabels`].
//!
//! The layouts recognised, outermost first in a path's precedence ([`JobKind`] order):
//! - Slurm: a `job_N` directory below a `slurm…` directory (v1:
//!   `/slurm/uid_1000/job_123/step_0/task_0`, also `slurm_<node>` with several slurmd) or
//!   below a `…slurmstepd.scope` (v2: `/system.slice/slurmstepd.scope/job_123/step_batch/…`).
//! - Kubernetes: `pod<uid>` below `kubepods` (cgroupfs driver:
//!   `/kubepods/burstable/pod<uid>/<container>`), or `kubepods-…-pod<uid_with_underscores>.slice`
//!   (systemd driver). A static pod's uid is 32 hex digits without dashes.
//! - Containers: a 64-hex-digit id as a whole directory (`/docker/<id>`, cgroupfs) or as
//!   `<runtime>-<id>.scope` (`docker-`, `cri-containerd-`, `crio-`, `libpod-`, `nerdctl-`);
//!   the outermost one is taken (the one the host sees). A container in a pod is its pod's.
//! - systemd: the outermost `*.service` or `*.scope` unit; anything below `user-UID.slice`
//!   is that user's slice (sessions and user units come and go, the user stays).

use std::collections::HashMap;
use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;

use crate::host::{Host, ReadError};

/// What kind of job a process is in. The order is the precedence when a process's cgroup
/// lines (v1 has one per hierarchy) name several: a Slurm job's processes also sit in
/// `slurmd.service` in the `name=systemd` hierarchy, and the job is what they belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum JobKind {
    /// A Slurm job; the id is the numeric job id.
    Slurm,
    /// A Kubernetes pod; the id is the pod UID with dashes (`6f1b8e4e-5c1d-…`).
    Pod,
    /// A container outside Kubernetes; the id is the runtime's 64-hex-digit container id.
    Container,
    /// A systemd unit (`foo.service`, `session-3.scope`, `user-1000.slice`).
    Unit,
}

impl JobKind {
    /// The label prefix: `slurm`, `pod`, `container`, `unit`.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Slurm => "slurm",
            Self::Pod => "pod",
            Self::Container => "container",
            Self::Unit => "unit",
        }
    }
}

/// A job a process belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Job {
    /// Slurm job, pod, container or unit.
    pub kind: JobKind,
    /// The full id (see [`JobKind`]).
    pub id: String,
}

/// Characters of a container id kept in its label, as `docker ps` shows them.
pub const CONTAINER_LABEL_CHARS: usize = 12;

/// The label of a process in no job this module recognises (the root cgroup, a bare slice).
pub const NO_JOB_LABEL: &str = "none";

/// The label the jobs over a round's cap are folded into ([`JobLabels`]).
pub const OTHER_LABEL: &str = "other";

impl Job {
    /// The stable short label: `slurm:12345`, `pod:<uid>`, `container:<first 12 hex digits>`,
    /// `unit:foo.service`.
    pub fn label(&self) -> String {
        let id = match self.kind {
            JobKind::Container => &self.id[..self.id.len().min(CONTAINER_LABEL_CHARS)],
            _ => &self.id,
        };
        format!("{}:{id}", self.kind.prefix())
    }

    /// [`Job::label`] of `job`, [`NO_JOB_LABEL`] for none.
    pub fn label_of(job: Option<&Job>) -> String {
        job.map_or_else(|| NO_JOB_LABEL.to_owned(), Job::label)
    }

    fn new(kind: JobKind, id: impl Into<String>) -> Self {
        Self { kind, id: id.into() }
    }
}

impl fmt::Display for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

/// Why a process's job could not be found.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The process exited (its /proc directory is gone).
    #[error("process {pid} has exited")]
    Gone {
        /// The process id asked for.
        pid: u32,
    },
    /// A /proc file could not be read.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// A /proc file did not have the expected form.
    #[error("{}: expected {expected}, got {got:?}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What the line or field should have been.
        expected: &'static str,
        /// The offending text (cut to 80 characters).
        got: String,
    },
}

/// One line of `/proc/PID/cgroup`: `hierarchy-id:controller-list:path`. cgroup v2 (and the
/// v2 line of a hybrid host) has id 0 and an empty controller list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLine<'a> {
    /// The hierarchy id.
    pub hierarchy: u32,
    /// The controllers, comma-separated (`cpu,cpuacct`, `name=systemd`), empty for v2.
    pub controllers: &'a str,
    /// The cgroup path, from the hierarchy's root.
    pub path: &'a str,
}

/// The lines of a `/proc/PID/cgroup` text. A malformed line is an error naming what was
/// expected (`path` is the file, for the message).
pub fn parse_cgroup_file<'a>(text: &'a str, path: &std::path::Path) -> Result<Vec<CgroupLine<'a>>, JobError> {
    let malformed = |expected, line: &str| JobError::Malformed {
        path: path.to_owned(),
        expected,
        got: line.chars().take(80).collect(),
    };
    text.lines()
        .filter(|line| !line.is_empty())
        .map(|line| {
            // The path itself may hold ':' (a cgroup name may), so split twice only.
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(cgroup)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(malformed("\"hierarchy-id:controllers:path\"", line));
            };
            let hierarchy = id.parse().map_err(|_| malformed("a numeric hierarchy id before the first ':'", line))?;
            if !cgroup.starts_with('/') {
                return Err(malformed("a cgroup path starting with '/'", line));
            }
            Ok(CgroupLine { hierarchy, controllers, path: cgroup })
        })
        .collect()
}

/// The job of a process whose `/proc/PID/cgroup` is `text`: the job of each line's path, the
/// first in [`JobKind`] order. `Ok(None)` when no line is in a recognised job.
pub fn job_of_cgroup_file(text: &str) -> Result<Option<Job>, JobError> {
    let lines = parse_cgroup_file(text, std::path::Path::new("/proc/PID/cgroup"))?;
    Ok(best_job(&lines))
}

/// The first job in [`JobKind`] order among `lines`' paths (the first line wins a tie).
pub fn best_job(lines: &[CgroupLine<'_>]) -> Option<Job> {
    lines.iter().filter_map(|line| job_of_cgroup_path(line.path)).min_by_key(|job| job.kind)
}

/// The job of a cgroup path (`/slurm/uid_0/job_42/step_0`, `/system.slice/foo.service`):
/// the first in [`JobKind`] order that the path names, `None` when it names none.
pub fn job_of_cgroup_path(path: &str) -> Option<Job> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    slurm_job(&parts).or_else(|| pod(&parts)).or_else(|| container(&parts)).or_else(|| unit(&parts))
}

/// `job_N` below a `slurm…` or `…slurmstepd.scope` directory.
fn slurm_job(parts: &[&str]) -> Option<Job> {
    let below = parts.iter().position(|p| p.starts_with("slurm") || p.ends_with("slurmstepd.scope"))?;
    parts[below + 1..].iter().find_map(|p| {
        let id = p.strip_prefix("job_")?;
        is_digits(id).then(|| Job::new(JobKind::Slurm, id))
    })
}

/// `pod<uid>` (cgroupfs) or `…-pod<uid_>.slice` (systemd), on a path through `kubepods`.
fn pod(parts: &[&str]) -> Option<Job> {
    if !parts.iter().any(|p| p.contains("kubepods")) {
        return None;
    }
    parts.iter().find_map(|p| {
        // containerd nested in a systemd unit names a pod's container `<slice>:<prefix>:<id>`.
        let name = p.split(':').next().unwrap_or(p);
        let name = name.strip_suffix(".slice").unwrap_or(name);
        // cgroupfs: the whole name, its uid dashed; systemd: after the last `-pod`, underscored.
        let uid = name.strip_prefix("pod").or_else(|| name.rsplit_once("-pod").map(|(_, uid)| uid))?;
        pod_uid(uid).map(|uid| Job::new(JobKind::Pod, uid))
    })
}

/// A pod UID written with dashes, underscores (systemd escapes '-' in unit names) or neither
/// (a static pod's hash), normalised to dashes; `None` unless it has 32 hex digits in UUID
/// groups or none.
fn pod_uid(raw: &str) -> Option<String> {
    let uid = raw.replace('_', "-");
    let hex = uid.chars().filter(|c| *c != '-').count();
    let groups: Vec<usize> = uid.split('-').map(str::len).collect();
    let shaped = groups == [8, 4, 4, 4, 12] || groups == [32];
    (hex == 32 && shaped && uid.chars().all(|c| c == '-' || c.is_ascii_hexdigit())).then_some(uid)
}

/// Prefixes of the container runtimes' systemd scopes, `<prefix>-<64 hex>.scope`.
const CONTAINER_SCOPES: [&str; 5] = ["docker-", "cri-containerd-", "crio-", "libpod-", "nerdctl-"];

/// The outermost container id: a whole 64-hex-digit directory, or a runtime's scope.
fn container(parts: &[&str]) -> Option<Job> {
    parts.iter().find_map(|p| {
        let name = p.strip_suffix(".scope").unwrap_or(p);
        let id = CONTAINER_SCOPES.iter().find_map(|prefix| name.strip_prefix(prefix)).unwrap_or(name);
        is_container_id(id).then(|| Job::new(JobKind::Container, id))
    })
}

/// The outermost `.service` or `.scope` unit, or the `user-UID.slice` of a user's processes.
fn unit(parts: &[&str]) -> Option<Job> {
    if let Some(user) = parts.iter().find(|p| p.starts_with("user-") && p.ends_with(".slice")) {
        return Some(Job::new(JobKind::Unit, *user));
    }
    let unit = parts.iter().find(|p| p.ends_with(".service") || p.ends_with(".scope"))?;
    Some(Job::new(JobKind::Unit, *unit))
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The start time of a process, in clock ticks after boot, from its `/proc/PID/stat` text
/// (field 22, counted after the parenthesised command name, which may hold spaces and ')').
pub fn start_time_of_stat(text: &str) -> Option<u64> {
    let after_comm = &text[text.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name, so field 22 is the 20th.
    after_comm.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// What the cache knows of one process.
#[derive(Debug)]
struct Entry {
    start_time: u64,
    job: Option<Job>,
    used: bool,
}

/// pid → job, kept while the process lives: a process's cgroup is read and parsed once, and a
/// later lookup costs one read of `/proc/PID/stat`, whose start time tells a reused pid from
/// the process cached. A process moved to another cgroup after its first lookup keeps its
/// first job (Slurm, the kubelet and container runtimes place a process before it runs).
#[derive(Debug)]
pub struct JobCache {
    host: Host,
    entries: HashMap<u32, Entry>,
    buf: String,
}

impl JobCache {
    /// A cache reading `/proc` under `host`.
    pub fn new(host: Host) -> Self {
        Self { host, entries: HashMap::new(), buf: String::new() }
    }

    /// The job of process `pid` (`Ok(None)`: in no recognised job).
    pub fn job_of_pid(&mut self, pid: u32) -> Result<Option<Job>, JobError> {
        let start_time = self.start_time(pid)?;
        if let Some(entry) = self.entries.get_mut(&pid).filter(|e| e.start_time == start_time) {
            entry.used = true;
            return Ok(entry.job.clone());
        }
        let rel = format!("/proc/{pid}/cgroup");
        self.host.read_into(&rel, &mut self.buf).map_err(|e| gone_or(pid, e))?;
        let job = best_job(&parse_cgroup_file(&self.buf, &self.host.path(&rel))?);
        self.entries.insert(pid, Entry { start_time, job: job.clone(), used: true });
        Ok(job)
    }

    /// Forget the processes not looked up since the last sweep (call once a round, so the
    /// cache holds the processes of the last two rounds at most).
    pub fn sweep(&mut self) {
        self.entries.retain(|_, e| std::mem::take(&mut e.used));
    }

    /// How many processes are cached.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no process is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn start_time(&mut self, pid: u32) -> Result<u64, JobError> {
        let rel = format!("/proc/{pid}/stat");
        self.host.read_into(&rel, &mut self.buf).map_err(|e| gone_or(pid, e))?;
        start_time_of_stat(&self.buf).ok_or_else(|| JobError::Malformed {
            path: self.host.path(&rel),
            expected: "\"pid (comm) state …\" with the start time as field 22",
            got: self.buf.chars().take(80).collect(),
        })
    }
}

/// A read of /proc/PID/… that failed because the process is gone (ENOENT for the directory,
/// ESRCH for a file opened while the process was exiting) is [`JobError::Gone`].
fn gone_or(pid: u32, e: ReadError) -> JobError {
    if e.is_not_found() || e.error.raw_os_error() == Some(libc::ESRCH) {
        JobError::Gone { pid }
    } else {
        JobError::Read(e)
    }
}

/// The job labels of one round, at most `cap` distinct ones: the labels after the cap are
/// folded into [`OTHER_LABEL`] and counted, so a host running thousands of short jobs cannot
/// grow a series per job. [`NO_JOB_LABEL`] and [`OTHER_LABEL`] are always admitted and do not
/// count towards the cap.
#[derive(Debug)]
pub struct JobLabels {
    cap: usize,
    admitted: HashSet<String>,
    folded: HashSet<String>,
}

impl JobLabels {
    /// A round with room for `cap` job labels.
    pub fn new(cap: usize) -> Self {
        Self { cap, admitted: HashSet::new(), folded: HashSet::new() }
    }

    /// The label to report for `job`: its own, or [`OTHER_LABEL`] once `cap` others were
    /// admitted this round. Callers that want a stable choice offer jobs in a stable order.
    pub fn admit(&mut self, job: Option<&Job>) -> String {
        let label = Job::label_of(job);
        if job.is_none() || self.admitted.contains(&label) {
            return label;
        }
        if self.admitted.len() < self.cap {
            self.admitted.insert(label.clone());
            label
        } else {
            self.folded.insert(label);
            OTHER_LABEL.to_owned()
        }
    }

    /// How many distinct job labels were folded into [`OTHER_LABEL`] this round.
    pub fn folded(&self) -> usize {
        self.folded.len()
    }

    /// Start the next round: no label admitted, none folded.
    pub fn clear(&mut self) {
        self.admitted.clear();
        self.folded.clear();
    }
}

#[cfg(test)]
mod tests;
