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
