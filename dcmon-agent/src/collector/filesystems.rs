//! Space and inodes of every real mounted filesystem: the mounts from `/proc/self/mountinfo`
//! (`/proc/1/mountinfo` under another `host_root`), the numbers from `statvfs(3)` of each
//! mount point.
//!
//! `statfs` of a network or FUSE filesystem whose server is gone can block for minutes (a hard
//! NFS mount: for ever), and a thread blocked there cannot be taken back. So no statfs runs on
//! the collector's thread: one worker thread calls them in turn, and the collector waits for
//! each at most `timeout` seconds. A mount whose call overran is reported as failed
//! (`filesystem_statfs_ok 0`), its worker is left with it and a new worker takes the rest; and
//! while that call has not returned the mount is reported as failed at once each round,
//! without another statfs: one stuck thread per hung mount, however many rounds it hangs.

use std::collections::HashSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::PathBuf;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::{CollectError, Collector};
use crate::batch::Sample;
use crate::config::{DeviceFilter, Limit, Section, SectionSpec, UP_TO_AN_HOUR};
use crate::filter::PatternList;
use crate::host::Host;

/// This collector's row in the table ([`super::SOURCES`]).
pub const SOURCE: super::Source = super::Source {
    name: "filesystems",
    switch: super::Switch::Exporter { default: true },
    caps: &[],
    section: Some(SectionSpec::of::<FilesystemsConfig>()),
    build: Some(|host, config| {
        Box::new(FilesystemsCollector::new(host.clone(), &config.section::<FilesystemsConfig>()))
    }),
};

/// Where the mounts are listed on the agent's own host (`host_root` `/`).
pub const MOUNTINFO: &str = "/proc/self/mountinfo";
/// Where they are listed under another `host_root` (a container with the host's `/` at
/// `/host`): the host's init process's mount namespace (needs the host's PID namespace), whose
/// mount points are host paths, found under the root. The agent's own list would name the
/// container's mounts, with the host's under `/host` again.
pub const HOST_MOUNTINFO: &str = "/proc/1/mountinfo";

/// Filesystem types that hold no data of their own (kernel interfaces, memory, overlays of
/// other filesystems, read-only images) or that statfs would disturb (autofs mounts on access).
pub const DEFAULT_FSTYPE_EXCLUDE: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "efivarfs",
    "fusectl",
    "fuse.gvfsd-fuse",
    "fuse.lxcfs",
    "fuse.portal",
    "fuse.snapfuse",
    "hugetlbfs",
    "iso9660",
    "mqueue",
    "nsfs",
    "nfsd",
    "overlay",
    "proc",
    "pstore",
    "ramfs",
    "rootfs",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "squashfs",
    "sysfs",
    "tmpfs",
    "tracefs",
];

/// Mount points under the kernel's own trees and container runtimes' private mounts (each
/// container's layers and volumes would be reported once per container).
pub const DEFAULT_MOUNT_POINT_EXCLUDE: &[&str] = &[
    "/dev/*",
    "/proc/*",
    "/sys/*",
    "/run/credentials/*",
    "/run/containerd/*",
    "/run/docker/*",
    "/var/lib/docker/*",
    "/var/lib/containers/storage/*",
    "/var/lib/kubelet/pods/*",
    "/snap/*",
];

/// The `filesystems` section: which mounts to report and how long one statfs may take.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct FilesystemsConfig {
    /// Filesystem types (mountinfo's type field: `ext4`, `nfs4`, `fuse.sshfs`) to report.
    pub fstypes: DeviceFilter,
    /// Mount points to report (`*` matches `/` too: `/mnt/*` is everything below /mnt).
    pub mount_points: DeviceFilter,
    /// Seconds one statfs may take before its mount is reported as failed.
    pub timeout: u64,
}

impl Default for FilesystemsConfig {
    fn default() -> Self {
        Self {
            fstypes: DeviceFilter {
                include: PatternList::match_all(),
                exclude: PatternList::new(DEFAULT_FSTYPE_EXCLUDE.iter().copied()),
            },
            mount_points: DeviceFilter {
                include: PatternList::match_all(),
                exclude: PatternList::new(DEFAULT_MOUNT_POINT_EXCLUDE.iter().copied()),
            },
            timeout: 2,
        }
    }
}

impl Section for FilesystemsConfig {
    fn durations(&self) -> Vec<(&'static str, u64, Limit)> {
        vec![("filesystems.timeout", self.timeout, UP_TO_AN_HOUR)]
    }

    fn round_timeouts(&self) -> Vec<(&'static str, u64)> {
        vec![("filesystems.timeout", self.timeout)]
    }
}

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted, unescaped (`\040` is a space).
    pub mount_point: String,
    /// The mount source: `/dev/nvme0n1p2`, `server:/export`, `tank/data`.
    pub device: String,
    /// The filesystem type, with its subtype for FUSE (`fuse.sshfs`).
    pub fstype: String,
    /// The filesystem itself is read-only (the superblock's `ro`: an ext4 remounted read-only
    /// after errors). A read-only view of a writable filesystem (a bind mount remounted `ro`,
    /// systemd's `ProtectSystem=` in the agent's own namespace) is not.
    pub read_only: bool,
}

/// Undo mountinfo's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// ```text
/// 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
/// (1)(2)(3)   (4)   (5)      (6)      (7)   (8) (9)   (10)         (11)
/// ```
/// (proc(5): mount id, parent id, major:minor, root, mount point, mount options, optional
/// fields up to `-`, type, source, superblock options). Mounts stacked on one mount point are
/// listed bottom first; only the top one is visible there, so the last wins. Lines that are
/// not in this shape are returned as errors, with their line number, beside the mounts.
pub fn parse_mountinfo(text: &str) -> (Vec<Mount>, Vec<String>) {
    let mut mounts: Vec<Mount> = Vec::new();
    let mut errors = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(' ').collect();
        let dash = fields.iter().skip(6).position(|f| *f == "-").map(|p| p + 6);
        let parsed = dash.and_then(|d| {
            let mount_point = fields.get(4)?;
            let (fstype, device, super_options) = (fields.get(d + 1)?, fields.get(d + 2)?, fields.get(d + 3)?);
            (mount_point.starts_with('/') && !fstype.is_empty()).then(|| Mount {
                mount_point: unescape(mount_point),
                device: unescape(device),
                fstype: unescape(fstype),
                read_only: super_options.split(',').any(|o| o == "ro"),
            })
        });
        match parsed {
            Some(m) => {
                mounts.retain(|old| old.mount_point != m.mount_point);
                mounts.push(m);
            }
            None => errors.push(format!(
                "line {}: expected \"ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [FIELDS] - TYPE SOURCE SUPEROPTIONS\", \
                 got {line:?}",
                n + 1
            )),
        }
    }
    (mounts, errors)
}

/// What statvfs says of one filesystem, in bytes and inodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Total data blocks × fragment size.
    pub size_bytes: u64,
    /// Free blocks × fragment size (root's reserve included).
    pub free_bytes: u64,
    /// Blocks free to unprivileged users × fragment size.
    pub available_bytes: u64,
    /// Inodes in all (0 on filesystems without a fixed count, such as btrfs).
    pub files: u64,
    /// Free inodes.
    pub files_free: u64,
}

/// statvfs(3) of `path`.
pub fn statvfs(path: &std::path::Path) -> std::io::Result<Usage> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: all-zero is a valid `struct statvfs` (plain integers).
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is a valid out-pointer for the call.
    if unsafe { libc::statvfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // fsblkcnt_t and friends are u64 on 64-bit Linux and u32 or u64 elsewhere.
    #[allow(clippy::useless_conversion, clippy::unnecessary_cast, reason = "the width differs between targets")]
    let (frsize, blocks, bfree, bavail, files, ffree) = (
        u64::from(st.f_frsize as u64),
        st.f_blocks as u64,
        st.f_bfree as u64,
        st.f_bavail as u64,
        st.f_files as u64,
        st.f_ffree as u64,
    );
    // Some FUSE filesystems leave f_frsize 0 (then the kernel takes f_bsize).
    let frsize = if frsize == 0 { st.f_bsize as u64 } else { frsize };
    Ok(Usage {
        size_bytes: blocks.saturating_mul(frsize),
        free_bytes: bfree.saturating_mul(frsize),
        available_bytes: bavail.saturating_mul(frsize),
        files,
        files_free: ffree,
    })
}

/// How one mount's statfs went this round.
#[derive(Debug)]
pub enum StatOutcome {
    /// It answered.
    Ok(Usage),
    /// It failed at once (the mount point vanished, permission denied).
    Error(std::io::Error),
    /// It did not answer within the timeout this round.
    TimedOut,
    /// An earlier round's call has not returned yet: no new call was made.
    StillStuck,
}

/// One batch of statfs calls handed to a worker.
struct Job {
    paths: Vec<PathBuf>,
    state: Mutex<JobState>,
    done: Condvar,
}

struct JobState {
    results: Vec<std::io::Result<Usage>>,
    /// When the call now running (index `results.len()`) started.
    current_started: Instant,
    /// The collector gave up on this job: the worker's call in progress overran.
    abandoned: bool,
}

/// The worker threads that run statfs, and the mount points whose call is still out.
#[derive(Debug)]
pub struct StatfsRunner {
    timeout: Duration,
    worker: Option<Sender<Arc<Job>>>,
    /// Mount point paths whose call overran and has not returned; shared with the workers,
    /// each of which takes its path out when its call returns.
    stuck: Arc<Mutex<HashSet<PathBuf>>>,
}

impl StatfsRunner {
    /// A runner whose calls may take up to `timeout` each.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout, worker: None, stuck: Arc::default() }
    }

    /// How many calls are out past their timeout (each holds one thread).
    pub fn stuck(&self) -> usize {
        self.stuck.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    fn spawn_worker(&self) -> std::io::Result<Sender<Arc<Job>>> {
        let (tx, rx) = mpsc::channel::<Arc<Job>>();
        let stuck = Arc::clone(&self.stuck);
        std::thread::Builder::new().name("dcmon-statfs".to_owned()).spawn(move || {
            while let Ok(job) = rx.recv() {
                for path in &job.paths {
                    job.state.lock().unwrap_or_else(PoisonError::into_inner).current_started = Instant::now();
                    let r = statvfs(path);
                    let mut s = job.state.lock().unwrap_or_else(PoisonError::into_inner);
                    if s.abandoned {
                        // This call overran: the mount is free to be asked again, and this
                        // thread, replaced meanwhile, ends.
                        stuck.lock().unwrap_or_else(PoisonError::into_inner).remove(path);
                        tracing::info!(mount = %path.display(), "a statfs that overran has returned");
                        return;
                    }
                    s.results.push(r);
                }
                job.done.notify_all();
            }
        })?;
        Ok(tx)
    }

    /// statfs of each path, in order: each call waited for at most the timeout, paths whose
    /// earlier call is still out skipped.
    pub fn run(&mut self, paths: &[PathBuf]) -> Result<Vec<StatOutcome>, std::io::Error> {
        let mut outcomes: Vec<Option<StatOutcome>> = {
            let stuck = self.stuck.lock().unwrap_or_else(PoisonError::into_inner);
            paths.iter().map(|p| stuck.contains(p).then_some(StatOutcome::StillStuck)).collect()
        };
        let mut todo: Vec<usize> = (0..paths.len()).filter(|&i| outcomes[i].is_none()).collect();
        while !todo.is_empty() {
            let job = Arc::new(Job {
                paths: todo.iter().map(|&i| paths[i].clone()).collect(),
                state: Mutex::new(JobState {
                    results: Vec::with_capacity(todo.len()),
                    current_started: Instant::now(),
                    abandoned: false,
                }),
                done: Condvar::new(),
            });
            let sent = match &self.worker {
                Some(w) => w.send(Arc::clone(&job)).is_ok(),
                None => false,
            };
            if !sent {
                let w = self.spawn_worker()?;
                // A worker that has just started is waiting on its channel.
                let _ = w.send(Arc::clone(&job));
                self.worker = Some(w);
            }
            let mut s = job.state.lock().unwrap_or_else(PoisonError::into_inner);
            let overran = loop {
                if s.results.len() == job.paths.len() {
                    break None;
                }
                let deadline = s.current_started + self.timeout;
                let now = Instant::now();
                if now >= deadline {
                    break Some(s.results.len());
                }
                s = job.done.wait_timeout(s, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
            };
            let answered = s.results.len();
            for (k, r) in s.results.drain(..).enumerate() {
                outcomes[todo[k]] = Some(match r {
                    Ok(u) => StatOutcome::Ok(u),
                    Err(e) => StatOutcome::Error(e),
                });
            }
            match overran {
                None => todo.clear(),
                Some(k) => {
                    // Under the job's lock, so the worker sees `abandoned` when its call
                    // returns, whenever that is, and takes the path out again.
                    let path = &job.paths[k];
                    self.stuck.lock().unwrap_or_else(PoisonError::into_inner).insert(path.clone());
                    s.abandoned = true;
                    self.worker = None;
                    outcomes[todo[k]] = Some(StatOutcome::TimedOut);
                    todo.drain(..=answered);
                }
            }
        }
        Ok(outcomes.into_iter().map(|o| o.unwrap_or(StatOutcome::StillStuck)).collect())
    }
}

/// The mount list, kept open: procfs marks it with `POLLPRI` when a mount or unmount changes
/// it (proc(5)), so it is read again only then. Generating it costs the kernel about 160 µs
/// for 20 mounts on the development VM, against 1-2 µs for the poll.
#[derive(Debug)]
struct MountList {
    file: std::fs::File,
    /// On procfs: a change is signalled. Elsewhere (a fixture tree) it is read every round.
    pollable: bool,
    /// The mounts selected at the last read, and that read's errors.
    mounts: Vec<Mount>,
    errors: Vec<String>,
}

fn on_procfs(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd as _;
    // SAFETY: all-zero is a valid `struct statfs` (plain integers).
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and out-pointer.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &raw mut st) };
    // f_type is signed with glibc and unsigned with musl (the static build).
    #[allow(clippy::useless_conversion, reason = "f_type's type differs between targets")]
    let magic = u64::try_from(st.f_type).ok();
    rc == 0 && magic == Some(u64::from(crate::host::PROC_SUPER_MAGIC))
}

/// Whether the mount table changed since the last poll (a poll that fails counts as a change).
fn mount_table_changed(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd as _;
    let mut pfd = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLPRI, revents: 0 };
    // SAFETY: one valid pollfd; a zero timeout never blocks.
    let rc = unsafe { libc::poll(&raw mut pfd, 1, 0) };
    rc != 0 && (rc < 0 || pfd.revents & (libc::POLLPRI | libc::POLLERR) != 0)
}

/// The filesystems collector.
#[derive(Debug)]
pub struct FilesystemsCollector {
    host: Host,
    config: FilesystemsConfig,
    runner: StatfsRunner,
    list: Option<MountList>,
    buf: String,
    /// Mount points reported as hung, so it is logged once per episode.
    hung_logged: HashSet<String>,
}

impl FilesystemsCollector {
    /// A collector of `host`'s mounts with the `filesystems` config section.
    pub fn new(host: Host, config: &FilesystemsConfig) -> Self {
        Self {
            host,
            config: config.clone(),
            runner: StatfsRunner::new(Duration::from_secs(config.timeout)),
            list: None,
            buf: String::new(),
            hung_logged: HashSet::new(),
        }
    }

    /// Whether `m` is reported under this config.
    pub fn selects(config: &FilesystemsConfig, m: &Mount) -> bool {
        config.fstypes.allows(&m.fstype) && config.mount_points.allows(&m.mount_point)
    }

    /// The statfs runner (tests count its stuck calls).
    pub fn runner(&self) -> &StatfsRunner {
        &self.runner
    }
}

impl Collector for FilesystemsCollector {
    fn name(&self) -> &'static str {
        SOURCE.name
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        use std::io::{Read as _, Seek as _};
        let mountinfo = if self.host.root() == std::path::Path::new("/") { MOUNTINFO } else { HOST_MOUNTINFO };
        let path = self.host.path(mountinfo);
        let fresh = match self.list.take() {
            Some(list) if list.pollable && !mount_table_changed(&list.file) => Some(list),
            Some(mut list) => {
                self.buf.clear();
                let read = list.file.rewind().and_then(|()| list.file.read_to_string(&mut self.buf));
                read.map_err(|error| crate::host::ReadError { path: path.clone(), error })?;
                let (mut mounts, errors) = parse_mountinfo(&self.buf);
                mounts.retain(|m| Self::selects(&self.config, m));
                Some(MountList { mounts, errors, ..list })
            }
            None => None,
        };
        let list = match fresh {
            Some(list) => list,
            None => {
                self.host.read_into(mountinfo, &mut self.buf)?;
                let file =
                    std::fs::File::open(&path).map_err(|error| crate::host::ReadError { path: path.clone(), error })?;
                let (mut mounts, errors) = parse_mountinfo(&self.buf);
                mounts.retain(|m| Self::selects(&self.config, m));
                MountList { pollable: on_procfs(&file), file, mounts, errors }
            }
        };
        let list = self.list.insert(list);
        let (mounts, errors) = (&list.mounts, &list.errors);
        let paths: Vec<PathBuf> = mounts.iter().map(|m| self.host.path(&m.mount_point)).collect();
        let outcomes = self.runner.run(&paths).map_err(|e| anyhow::anyhow!("cannot start a statfs thread: {e}"))?;
        for (m, outcome) in mounts.iter().zip(outcomes) {
            let labelled = |s: Sample| {
                s.label("mountpoint", m.mount_point.as_str())
                    .label("device", m.device.as_str())
                    .label("fstype", m.fstype.as_str())
            };
            let ok = match outcome {
                StatOutcome::Ok(u) => {
                    self.hung_logged.remove(&m.mount_point);
                    out.extend(
                        [
                            Sample::count("filesystem_size_bytes", u.size_bytes),
                            Sample::count("filesystem_free_bytes", u.free_bytes),
                            Sample::count("filesystem_available_bytes", u.available_bytes),
                            Sample::count("filesystem_files", u.files),
                            Sample::count("filesystem_files_free", u.files_free),
                        ]
                        .map(labelled),
                    );
                    true
                }
                StatOutcome::Error(e) => {
                    tracing::debug!(mount = m.mount_point, "statfs failed: {e}");
                    false
                }
                StatOutcome::TimedOut | StatOutcome::StillStuck => {
                    if self.hung_logged.insert(m.mount_point.clone()) {
                        tracing::warn!(
                            "statfs of {} ({} {}) did not return within {}s: reported as failed \
                             (filesystem_statfs_ok 0), and not asked again until that call returns",
                            m.mount_point,
                            m.fstype,
                            m.device,
                            self.config.timeout
                        );
                    }
                    false
                }
            };
            out.push(labelled(Sample::count("filesystem_readonly", u64::from(m.read_only))));
            out.push(labelled(Sample::count("filesystem_statfs_ok", u64::from(ok))));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(anyhow::anyhow!("{}: {}", path.display(), errors.join("; ")).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Debian host's mountinfo with NFS, FUSE, ZFS, btrfs subvolumes, XFS, a Lustre client,
    /// a ro-remounted ext4, escaped names and a stacked mount.
    const MOUNTINFO_TEXT: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
23 1 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
24 1 0:5 / /dev rw,nosuid,relatime shared:8 - devtmpfs udev rw,size=4017748k,nr_inodes=1004437,mode=755
27 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
28 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw
30 27 0:28 / /run rw,nosuid,nodev,noexec,relatime shared:5 - tmpfs tmpfs rw,size=806284k,mode=755
40 27 259:3 /@home /home rw,relatime shared:20 - btrfs /dev/nvme1n1 rw,ssd,space_cache=v2,subvolid=257,subvol=/@home
41 27 0:45 / /tank/data rw,noatime shared:21 - zfs tank/data rw,xattr,noacl
42 27 253:0 / /scratch rw,relatime shared:22 - xfs /dev/mapper/vg-scratch rw,attr2,inode64,noquota
43 27 0:50 / /mnt/nfs\\040share rw,relatime shared:23 - nfs4 fileserver:/export/home rw,vers=4.2,hard,proto=tcp
44 27 0:51 / /lustre rw,flock shared:24 - lustre 10.0.0.1@o2ib:/scratch rw,flock,lazystatfs
45 27 0:52 / /mnt/sshfs rw,nosuid,nodev,relatime shared:25 - fuse.sshfs user@host:/data rw,user_id=0,group_id=0
46 27 259:4 / /data rw,relatime shared:26 - ext4 /dev/sdb1 ro,errors=remount-ro
47 27 0:53 / /var/lib/docker/overlay2/abc/merged rw,relatime - overlay overlay rw,lowerdir=/x
48 27 7:0 / /snap/core/1 ro,nodev,relatime shared:27 - squashfs /dev/loop0 ro
49 27 0:54 / /data rw,relatime shared:28 - xfs /dev/sdc1 rw
50 27 259:2 /srv /srv ro,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
";

    fn selected(text: &str) -> Vec<Mount> {
        let config = FilesystemsConfig::default();
        let (mounts, errors) = parse_mountinfo(text);
        assert_eq!(errors, Vec::<String>::new());
        mounts.into_iter().filter(|m| FilesystemsCollector::selects(&config, m)).collect()
    }

    #[test]
    fn real_mounts_are_selected_pseudo_ones_left_out() {
        let got: Vec<(String, String, String, bool)> =
            selected(MOUNTINFO_TEXT).into_iter().map(|m| (m.mount_point, m.device, m.fstype, m.read_only)).collect();
        let want = [
            ("/", "/dev/nvme0n1p2", "ext4", false),
            ("/home", "/dev/nvme1n1", "btrfs", false),
            ("/tank/data", "tank/data", "zfs", false),
            ("/scratch", "/dev/mapper/vg-scratch", "xfs", false),
            ("/mnt/nfs share", "fileserver:/export/home", "nfs4", false),
            ("/lustre", "10.0.0.1@o2ib:/scratch", "lustre", false),
            ("/mnt/sshfs", "user@host:/data", "fuse.sshfs", false),
            // /data: the ro ext4 is hidden under the xfs mounted over it later.
            ("/data", "/dev/sdc1", "xfs", false),
            // A read-only bind mount of a writable filesystem is not a read-only filesystem.
            ("/srv", "/dev/nvme0n1p2", "ext4", false),
        ];
        let want: Vec<(String, String, String, bool)> =
            want.iter().map(|(a, b, c, d)| ((*a).into(), (*b).into(), (*c).into(), *d)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn superblock_ro_is_read_only() {
        let m = selected("46 27 259:4 / /data rw,relatime shared:26 - ext4 /dev/sdb1 ro,errors=remount-ro\n");
        assert_eq!(m.len(), 1);
        assert!(m[0].read_only);
    }

    #[test]
    fn config_filters_by_type_and_mount_point() {
        let (mounts, _) = parse_mountinfo(MOUNTINFO_TEXT);
        let config = FilesystemsConfig {
            fstypes: DeviceFilter { include: PatternList::new(["nfs*", "ext4"]), exclude: PatternList::default() },
            mount_points: DeviceFilter { include: PatternList::match_all(), exclude: PatternList::new(["/srv"]) },
            timeout: 1,
        };
        let got: Vec<&str> = mounts
            .iter()
            .filter(|m| FilesystemsCollector::selects(&config, m))
            .map(|m| m.mount_point.as_str())
            .collect();
        assert_eq!(got, ["/", "/mnt/nfs share"]);
    }

    #[test]
    fn bad_lines_are_errors_with_their_number_and_the_rest_is_kept() {
        let text = "27 1 259:2 / / rw - ext4 /dev/vda rw\ngarbage\n28 1 0:1 / /x rw shared:1\n";
        let (mounts, errors) = parse_mountinfo(text);
        assert_eq!(mounts.len(), 1);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("line 2: expected") && errors[0].contains("garbage"), "{errors:?}");
        assert!(errors[1].starts_with("line 3:"), "{errors:?}");
    }

    #[test]
    fn escapes() {
        assert_eq!(unescape("/a\\040b\\011c\\134d\\012"), "/a b\tc\\d\n");
        assert_eq!(unescape("/plain\\"), "/plain\\");
        assert_eq!(unescape("/x\\09"), "/x\\09");
    }

    #[test]
    fn no_mountinfo_is_not_present_and_a_bad_one_fails_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = FilesystemsCollector::new(Host::new(dir.path()), &FilesystemsConfig::default());
        assert!(matches!(c.collect(&mut Vec::new()), Err(CollectError::NotPresent(_))));
        std::fs::create_dir_all(dir.path().join("proc/1")).expect("mkdir");
        // The fixture's mount points exist nowhere under the root: statfs fails, reported as such.
        std::fs::write(dir.path().join("proc/1/mountinfo"), "27 1 259:2 / /gone rw - ext4 /dev/vda rw\nbad\n")
            .expect("write");
        let mut out = Vec::new();
        let err = c.collect(&mut out).expect_err("bad line");
        assert!(format!("{err:#}").contains("proc/1/mountinfo: line 2: expected"), "{err:#}");
        let names: Vec<(&str, f64)> = out.iter().map(|s| (s.name, s.value.as_f64())).collect();
        assert_eq!(names, [("filesystem_readonly", 0.0), ("filesystem_statfs_ok", 0.0)]);
    }

    /// The host's root filesystem, read by statvfs here and by `stat -f` (coreutils).
    #[test]
    fn statvfs_of_root_agrees_with_stat_f() {
        let u = statvfs(std::path::Path::new("/")).expect("statvfs /");
        let out = std::process::Command::new("stat").args(["-f", "-c", "%S %b %c", "/"]).output().expect("stat -f");
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Vec<u64> = text.split_whitespace().map(|f| f.parse().expect("number")).collect();
        assert_eq!(u.size_bytes, v[0] * v[1], "{text}");
        assert_eq!(u.files, v[2], "{text}");
        assert!(u.available_bytes <= u.free_bytes && u.free_bytes <= u.size_bytes, "{u:?}");
    }

    /// A mount list that is not on procfs (a fixture tree) signals no change: it is read again
    /// every round.
    #[test]
    fn a_mount_list_off_procfs_is_read_every_round() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("proc/1")).expect("mkdir");
        let file = dir.path().join("proc/1/mountinfo");
        std::fs::write(&file, "27 1 259:2 / /a rw - ext4 /dev/vda rw\n").expect("write");
        let mut c = FilesystemsCollector::new(Host::new(dir.path()), &FilesystemsConfig::default());
        let count = |c: &mut FilesystemsCollector| {
            let mut out = Vec::new();
            c.collect(&mut out).expect("collect");
            out.iter().filter(|s| s.name == "filesystem_statfs_ok").count()
        };
        assert_eq!(count(&mut c), 1);
        std::fs::write(&file, "27 1 259:2 / /a rw - ext4 /dev/vda rw\n28 1 259:3 / /b rw - xfs /dev/vdb rw\n")
            .expect("write");
        assert_eq!(count(&mut c), 2);
    }
}
