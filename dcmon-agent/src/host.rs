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
#[error("cannot read {}: {source}", path.display())]
pub struct ReadError {
    /// The full path that was read.
    pub path: PathBuf,
    /// The underlying I/O error.
    #[source]
    pub source: io::Error,
}

impl ReadError {
    /// True when the file does not exist (the feature is absent on this host).
    pub fn is_not_found(&self) -> bool {
        self.source.kind() == io::ErrorKind::NotFound
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
        std::fs::File::open(&path)
            .and_then(|mut f| f.read_to_string(buf))
            .map(|_| ())
            .map_err(|source| ReadError { path, source })
    }

    /// Read a whole host file into a new string.
    pub fn read_to_string(&self, rel: impl AsRef<Path>) -> Result<String, ReadError> {
        let mut buf = String::new();
        self.read_into(rel, &mut buf)?;
        Ok(buf)
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

/// A host file kept open and re-read from offset 0 each time: procfs and sysfs regenerate their
/// contents on every read from the start, so this sees fresh values without paying for a path
/// walk, an open and a close every cycle. Reopened after any error (a device that went away).
#[derive(Debug)]
pub struct OpenFile {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl OpenFile {
    /// `rel` under `host`; nothing is opened until the first read.
    pub fn new(host: &Host, rel: impl AsRef<Path>) -> Self {
        Self { path: host.path(rel), file: None }
    }

    /// The full path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read the whole file into `buf` (cleared first).
    pub fn read_into(&mut self, buf: &mut String) -> Result<(), ReadError> {
        buf.clear();
        let result = self.read_at_start(buf);
        if result.is_err() {
            // Next time, start from a fresh open.
            self.file = None;
        }
        result.map_err(|source| ReadError { path: self.path.clone(), source })
    }

    fn read_at_start(&mut self, buf: &mut String) -> io::Result<()> {
        use std::io::{Read as _, Seek as _};
        let file = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(std::fs::File::open(&self.path)?),
        };
        file.rewind()?;
        file.read_to_string(buf).map(|_| ())
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
