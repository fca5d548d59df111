//! Where the host's /proc, /sys, /etc and /run live.
//!
//! Every collector reads through a [`Host`] instead of hard-coding `/proc`: tests point it at a
//! fixture tree, and an agent in a container points it at the host's filesystem mounted at,
//! say, `/host`.

use std::io;
use std::path::{Path, PathBuf};

/// A host filesystem root. `Host::new("/")` is the machine the agent runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    root: PathBuf,
}

/// A file under the host root that could not be read, with the path in the message.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {}: {error}", path.display())]
pub struct ReadError {
    /// The full path that was read.
    pub path: PathBuf,
    /// The underlying I/O error. Not a `source`: the message includes it, and `{:#}` would
    /// print it a second time.
    pub error: io::Error,
}

impl ReadError {
    /// True when the file does not exist (the feature is absent on this host).
    pub fn is_not_found(&self) -> bool {
        self.error.kind() == io::ErrorKind::NotFound
    }
}

impl Default for Host {
    fn default() -> Self {
        Self::new("/")
    }
}

impl Host {
    /// A host rooted at `root` (`/` for the local machine).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `rel` (written as an absolute host path such as `/proc/stat`) under this root.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        let rel = rel.as_ref();
        self.root.join(rel.strip_prefix("/").unwrap_or(rel))
    }

    /// Read a whole host file into `buf` (cleared first), reusing its allocation: collectors
    /// read the same files every cycle and keep one buffer each.
    pub fn read_into(&self, rel: impl AsRef<Path>, buf: &mut String) -> Result<(), ReadError> {
        use std::io::Read;
        let path = self.path(rel);
        buf.clear();
        open_regular(&path)
            .and_then(|mut f| f.read_to_string(buf))
            .map(|_| ())
            .map_err(|error| ReadError { path, error })
    }

    /// Read a whole host file into a new string.
    pub fn read_to_string(&self, rel: impl AsRef<Path>) -> Result<String, ReadError> {
        let mut buf = String::new();
        self.read_into(rel, &mut buf)?;
        Ok(buf)
    }

    /// The names in host directory `rel` (those that are UTF-8), in no particular order.
    pub fn dir_names(&self, rel: impl AsRef<Path>) -> Result<Vec<String>, ReadError> {
        let path = self.path(rel);
        match std::fs::read_dir(&path) {
            Ok(dir) => Ok(dir.filter_map(Result::ok).filter_map(|e| e.file_name().into_string().ok()).collect()),
            Err(error) => Err(ReadError { path, error }),
        }
    }

    /// This host's machine id: `/etc/machine-id`, then `/var/lib/dbus/machine-id` (the
    /// order systemd documents). `None` when neither holds a non-empty id.
    pub fn machine_id(&self) -> Option<String> {
        ["/etc/machine-id", "/var/lib/dbus/machine-id"]
            .iter()
            .filter_map(|p| self.read_to_string(p).ok())
            .map(|s| s.trim().to_owned())
            .find(|s| !s.is_empty())
    }
}

/// `path` opened for reading without waiting for a writer (O_NONBLOCK), refused unless it is
/// a regular file. procfs and sysfs files are regular (of size 0); a FIFO or a device where one
/// is expected would block the read, and inline collectors must never block.
fn open_regular(path: &Path) -> io::Result<std::fs::File> {
    use crate::secure_file::{SmallFileError, open_regular};
    match open_regular(path) {
        Ok((file, _)) => Ok(file),
        Err(SmallFileError::Io(e)) => Err(e),
        Err(e) => Err(io::Error::new(io::ErrorKind::InvalidInput, e.to_string())),
    }
}

/// procfs (`PROC_SUPER_MAGIC` in linux/magic.h).
pub const PROC_SUPER_MAGIC: u32 = 0x9fa0;
/// sysfs (`SYSFS_MAGIC`).
const SYSFS_MAGIC: u32 = 0x6265_6572;

/// Whether reads of `paths` can be done on the runtime thread: true only when each one is on
/// procfs or sysfs, which the kernel serves from memory. Anything else can block a read for
/// good: a FUSE file (lxcfs mounts over /proc/loadavg, /proc/meminfo, /proc/stat and
/// /proc/diskstats in containers) whose daemon hangs, a network or disk filesystem under a
/// `host_root`. For a path that does not exist, the directory that would hold it decides (it
/// answers the lookup). Files read under a listed directory (/sys/block/DEV/stat) are taken to
/// be on the directory's filesystem. Collectors ask once, when they are built; the first path
/// found elsewhere is logged with `collector`.
pub fn served_from_kernel_memory<'a>(collector: &str, paths: impl IntoIterator<Item = &'a Path>) -> bool {
    for path in paths {
        let found = path.ancestors().find_map(|p| match filesystem_magic(p) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            other => Some(other),
        });
        let why = match found {
            Some(Ok(PROC_SUPER_MAGIC | SYSFS_MAGIC)) => continue,
            Some(Ok(magic)) => filesystem_name(magic),
            Some(Err(e)) => format!("a filesystem that cannot be told ({e})"),
            None => "no filesystem".to_owned(),
        };
        tracing::info!(
            collector,
            "{} is on {why}, not procfs or sysfs: a read can block, so this collector runs on its own thread \
             under the collector timeout",
            path.display()
        );
        return false;
    }
    true
}

/// The filesystem type of `path` (`f_type` of statfs(2)).
fn filesystem_magic(path: &Path) -> io::Result<u32> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))?;
    // SAFETY: statfs only writes into `st`; all-zero bytes are a valid `statfs`.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a valid out pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &raw mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // The field's C type differs between libcs; filesystem magic numbers are 32-bit.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "magic numbers are 32-bit")]
    Ok(st.f_type as u32)
}

/// A name for a filesystem magic number, for the log.
fn filesystem_name(magic: u32) -> String {
    match magic {
        0x6573_5546 => "FUSE".to_owned(),
        0x0102_1994 => "tmpfs".to_owned(),
        0xef53 => "ext2/3/4".to_owned(),
        0x5846_5342 => "XFS".to_owned(),
        0x9123_683e => "Btrfs".to_owned(),
        0x794c_7630 => "overlayfs".to_owned(),
        0x6969 => "NFS".to_owned(),
        0x0102_1997 => "9p".to_owned(),
        other => format!("filesystem type {other:#x}"),
    }
}

/// A host file kept open and re-read from offset 0 each time: procfs and sysfs regenerate their
/// contents on every read from the start, so this sees fresh values without paying for a path
/// walk, an open and a close every cycle. Reads are positional (`pread`) from offset 0, so a
/// cycle costs the reads alone (for a small file, one: see [`SHORT_READ_IS_EOF`]), with no seek
/// or stat. Reopened after any error (a device that went away).
#[derive(Debug)]
pub struct OpenFile {
    path: PathBuf,
    file: Option<std::fs::File>,
}

/// Room for the first read of a file when the caller's buffer has none yet; procfs and sysfs
/// files the agent reads are mostly smaller.
const FIRST_READ: usize = 1024;

/// A read that returns fewer bytes than asked for, and at most this many, is the end of the
/// file, so no second read is needed to see 0. Regular files return short only at the end.
/// seq_file (most of /proc) fills the reader's buffer with whole records and returns short only
/// at the end or when its own buffer (a page, 4 KiB at least) cannot take the next record, so a
/// short read of at most 2 KiB is the end for any file whose records are under 2 KiB. The
/// agent's files have lines under 400 bytes (a /proc/net/dev line: a name and 16 counters), and
/// sysfs attributes are generated whole, at most a page, and returned in one read.
pub const SHORT_READ_IS_EOF: usize = 2 * 1024;

impl OpenFile {
    /// `rel` under `host`; nothing is opened until the first read.
    pub fn new(host: &Host, rel: impl AsRef<Path>) -> Self {
        Self { path: host.path(rel), file: None }
    }

    /// The full path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read the whole file into `buf` (replacing its contents), reusing its allocation. On
    /// error `buf` is left empty and the error names the path.
    pub fn read_into(&mut self, buf: &mut String) -> Result<(), ReadError> {
        let result = self.read_from_start(buf);
        if result.is_err() {
            buf.clear();
            // Next time, start from a fresh open.
            self.file = None;
        }
        result.map_err(|error| ReadError { path: self.path.clone(), error })
    }

    fn read_from_start(&mut self, buf: &mut String) -> io::Result<()> {
        use std::os::unix::fs::FileExt as _;
        let file = match &self.file {
            Some(f) => f,
            None => self.file.insert(open_regular(&self.path)?),
        };
        // Read into the String's own bytes. Its old contents are overwritten, so only the part
        // of its capacity beyond them needs zeroing before it can be handed to `read_at`.
        let mut bytes = std::mem::take(buf).into_bytes();
        let capacity = bytes.capacity().max(FIRST_READ);
        bytes.resize(capacity, 0);
        let mut len = 0;
        let result = loop {
            if len == bytes.len() {
                // Never pass an empty slice: a read of 0 bytes returns 0 and would look like
                // the end of the file.
                bytes.resize(bytes.len() * 2, 0);
            }
            // A read that returns 0 is the end; so is a short one of at most a few KiB.
            let asked = bytes.len() - len;
            match file.read_at(&mut bytes[len..], len as u64) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    len += n;
                    if n < asked && n <= SHORT_READ_IS_EOF {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        bytes.truncate(len);
        match String::from_utf8(bytes) {
            Ok(text) => {
                *buf = text;
                result
            }
            Err(e) => {
                let mut bytes = e.into_bytes();
                bytes.clear();
                *buf = String::from_utf8(bytes).unwrap_or_default();
                result.and(Err(io::Error::new(io::ErrorKind::InvalidData, "the file is not valid UTF-8")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_joins_absolute_paths_under_root() {
        let host = Host::new("/fixture");
        assert_eq!(host.path("/proc/stat"), PathBuf::from("/fixture/proc/stat"));
        assert_eq!(host.path("proc/stat"), PathBuf::from("/fixture/proc/stat"));
        assert_eq!(Host::default().path("/proc/stat"), PathBuf::from("/proc/stat"));
    }

    #[test]
    fn read_error_names_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Host::new(dir.path()).read_to_string("/proc/nope").expect_err("missing file");
        assert!(err.is_not_found());
        assert!(err.to_string().contains("/proc/nope"), "{err}");
    }

    #[test]
    fn open_file_sees_rewritten_contents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = Host::new(dir.path());
        std::fs::create_dir_all(dir.path().join("proc")).expect("mkdir");
        let p = dir.path().join("proc/loadavg");
        let mut f = OpenFile::new(&host, "/proc/loadavg");
        let mut buf = String::new();
        assert!(f.read_into(&mut buf).expect_err("missing").is_not_found());
        std::fs::write(&p, "0.10 0.20 0.30 1/2 3\n").expect("write");
        f.read_into(&mut buf).expect("read");
        assert_eq!(buf, "0.10 0.20 0.30 1/2 3\n");
        std::fs::write(&p, "x".repeat(10_000)).expect("rewrite bigger");
        f.read_into(&mut buf).expect("read");
        assert_eq!(buf.len(), 10_000);
        std::fs::write(&p, "short\n").expect("rewrite shorter");
        f.read_into(&mut buf).expect("read");
        assert_eq!(buf, "short\n");
    }

    #[test]
    fn open_file_reads_live_proc_repeatedly() {
        let mut f = OpenFile::new(&Host::default(), "/proc/stat");
        let (mut a, mut b) = (String::new(), String::new());
        f.read_into(&mut a).expect("first");
        std::thread::sleep(std::time::Duration::from_millis(50));
        f.read_into(&mut b).expect("second");
        assert!(a.starts_with("cpu ") && b.starts_with("cpu "), "{a:.40}");
        assert_ne!(a, b, "procfs content is regenerated on each read from offset 0");
    }

    #[test]
    fn open_file_reads_seq_files_longer_than_a_page_whole() {
        // seq_file hands out at most a page of records per read, so a short read of more than
        // SHORT_READ_IS_EOF is not the end (smaps records are about 750 bytes, and a short read
        // holds the whole records that fit in a page). A sleeping child's smaps is a seq_file of
        // more than a page that holds still.
        let mut child = std::process::Command::new("sleep").arg("30").spawn().expect("spawn sleep");
        let rel = format!("/proc/{}/smaps", child.id());
        // Once the dynamic loader is done mapping, the file holds still.
        let mut whole = Err(io::Error::other("smaps kept changing"));
        let mut last = String::new();
        for _ in 0..50 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let now = std::fs::read_to_string(&rel).unwrap_or_default();
            if !now.is_empty() && now == last {
                whole = Ok(now);
                break;
            }
            last = now;
        }
        let mut f = OpenFile::new(&Host::default(), &rel);
        let (mut a, mut b) = (String::new(), String::new());
        let (ra, rb) = (f.read_into(&mut a), f.read_into(&mut b));
        let _ = child.kill();
        let _ = child.wait();
        let whole = whole.expect("read smaps");
        ra.expect("first read");
        rb.expect("second read");
        assert!(whole.len() > 4096, "smaps is {} bytes, not more than a page", whole.len());
        assert!(a == whole, "first read: {} bytes of {}", a.len(), whole.len());
        assert!(b == whole, "second read, from offset 0 again: {} bytes of {}", b.len(), whole.len());
    }

    #[test]
    fn open_file_errors_name_the_path_and_leave_the_buffer_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("proc")).expect("mkdir");
        std::fs::write(dir.path().join("proc/bad"), b"ok\n\xff\xfe\n").expect("write");
        let mut f = OpenFile::new(&Host::new(dir.path()), "/proc/bad");
        let mut buf = String::from("old contents");
        let err = f.read_into(&mut buf).expect_err("not UTF-8");
        assert!(err.to_string().contains("proc/bad") && err.to_string().contains("UTF-8"), "{err}");
        assert_eq!(err.error.kind(), io::ErrorKind::InvalidData);
        assert!(buf.is_empty(), "{buf:?}");
        std::fs::create_dir(dir.path().join("proc/dir")).expect("mkdir");
        let mut f = OpenFile::new(&Host::new(dir.path()), "/proc/dir");
        let err = f.read_into(&mut buf).expect_err("a directory");
        assert!(err.to_string().contains("proc/dir"), "{err}");
    }

    #[test]
    fn a_fifo_is_refused_at_once_instead_of_blocking_the_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("proc")).expect("mkdir");
        let fifo = dir.path().join("proc/loadavg");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
        let host = Host::new(dir.path());
        // No writer ever opens it: a blocking open or read would never return, so the reads
        // run on a thread the test gives up on.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = String::new();
            let _ = tx.send((
                OpenFile::new(&host, "/proc/loadavg").read_into(&mut buf).map_err(|e| e.to_string()),
                host.read_to_string("/proc/loadavg").map_err(|e| (e.to_string(), e.is_not_found())),
            ));
        });
        let (open_file, whole) = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("reading a FIFO blocked");
        let err = open_file.expect_err("a FIFO");
        assert_eq!(err, format!("cannot read {}: is a FIFO, expected a regular file", fifo.display()));
        let (err, not_found) = whole.expect_err("a FIFO");
        assert!(err.ends_with("is a FIFO, expected a regular file") && !not_found, "{err}");
    }

    #[test]
    fn only_procfs_and_sysfs_count_as_kernel_memory() {
        let real = Host::default();
        let kernel = ["/proc/stat", "/proc/net/dev", "/sys/block", "/proc/sys/kernel/no_such_sysctl"];
        for rel in kernel {
            assert!(served_from_kernel_memory("test", [real.path(rel).as_path()]), "{rel}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("proc")).expect("mkdir");
        std::fs::write(dir.path().join("proc/stat"), "cpu  1 2 3 4\n").expect("write");
        let fixture = Host::new(dir.path());
        for rel in ["/proc/stat", "/proc/missing", "/sys/block"] {
            assert!(!served_from_kernel_memory("test", [fixture.path(rel).as_path()]), "{rel} in a fixture tree");
        }
        let mixed = [real.path("/proc/stat"), fixture.path("/proc/stat")];
        assert!(!served_from_kernel_memory("test", mixed.iter().map(PathBuf::as_path)), "one file elsewhere");
    }

    #[test]
    fn machine_id_falls_back_to_dbus_and_skips_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = Host::new(dir.path());
        assert_eq!(host.machine_id(), None);
        std::fs::create_dir_all(dir.path().join("var/lib/dbus")).expect("mkdir");
        std::fs::write(dir.path().join("var/lib/dbus/machine-id"), "dbusid\n").expect("write");
        std::fs::create_dir_all(dir.path().join("etc")).expect("mkdir");
        std::fs::write(dir.path().join("etc/machine-id"), "\n").expect("write");
        assert_eq!(host.machine_id().as_deref(), Some("dbusid"));
        std::fs::write(dir.path().join("etc/machine-id"), "etcid\n").expect("write");
        assert_eq!(host.machine_id().as_deref(), Some("etcid"));
    }
}
