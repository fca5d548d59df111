//! Reading a small file that must be a regular file (the config, the API key) without ever
//! blocking on it or reading without end.
//!
//! The file is opened with `O_NONBLOCK`, so a FIFO put where the file should be opens at once
//! instead of waiting for a writer, and is then checked with `fstat` on the open descriptor (no
//! race with a rename): anything but a regular file is refused by what it is. Reads stop one
//! byte past the limit, so `/dev/zero` or a runaway file cannot fill memory.
//!
//! A regular file on a FUSE or lxcfs mount can still block in `read(2)`; callers on the async
//! runtime run these reads on a blocking thread under a timeout.

use std::fs::Metadata;
use std::io::{self, Read as _};
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::Path;

/// Why a small regular file could not be read. The message leaves out the path: callers
/// say which file it is ("config /etc/dcmon/config.json: ...").
#[derive(Debug, thiserror::Error)]
pub enum SmallFileError {
    /// `open(2)`, `fstat(2)` or `read(2)` failed (a missing file included).
    #[error("cannot read: {0}")]
    Io(io::Error),
    /// A FIFO, device, directory or socket where a regular file belongs.
    #[error("is {0}, expected a regular file")]
    NotRegular(&'static str),
    /// More bytes than the caller allows for this file.
    #[error("is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The most bytes allowed.
        limit: u64,
    },
}

impl SmallFileError {
    /// True when the file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, SmallFileError::Io(e) if e.kind() == io::ErrorKind::NotFound)
    }
}

/// Read all of the regular file at `path` (symlinks followed), at most `limit` bytes, and
/// return its contents with its metadata (from the open descriptor).
pub fn read(path: &Path, limit: u64) -> Result<(Vec<u8>, Metadata), SmallFileError> {
    let (mut file, metadata) = open_regular(path)?;
    if metadata.len() > limit {
        return Err(SmallFileError::TooLarge { limit });
    }
    // The size from fstat is a hint: the file may grow while it is read, so the read itself is
    // capped too, one byte past the limit to tell "exactly the limit" from "more".
    let mut bytes = Vec::with_capacity(usize::try_from(metadata.len()).unwrap_or(0).saturating_add(1));
    (&mut file).take(limit.saturating_add(1)).read_to_end(&mut bytes).map_err(SmallFileError::Io)?;
    if bytes.len() as u64 > limit {
        return Err(SmallFileError::TooLarge { limit });
    }
    Ok((bytes, metadata))
}

/// `path` opened for reading without waiting for a writer, with its metadata from the open
/// descriptor; anything but a regular file is refused by what it is.
pub fn open_regular(path: &Path) -> Result<(std::fs::File, Metadata), SmallFileError> {
    let file = std::fs::File::options()
        .read(true)
        // Opening a FIFO for reading blocks until a writer comes, unless O_NONBLOCK; O_NOCTTY
        // keeps a terminal named here from becoming the agent's controlling terminal.
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(SmallFileError::Io)?;
    let metadata = file.metadata().map_err(SmallFileError::Io)?;
    if !metadata.is_file() {
        return Err(SmallFileError::NotRegular(describe(&metadata)));
    }
    Ok((file, metadata))
}

/// What a file that is not a regular file is, for the error message.
fn describe(metadata: &Metadata) -> &'static str {
    let t = metadata.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Replace the file at `path` with `bytes` whole: written to `path.tmp` and renamed over it, so
/// a crash leaves the old contents or the new, never a torn file. The directory is created
/// when missing. The error names the file and the step that failed.
pub fn write_replacing(path: &Path, bytes: &[u8]) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot move {} to {}: {e}", tmp.display(), path.display()))
}

/// Helpers for tests of the readers built on [`read`].
#[cfg(test)]
pub(crate) mod test_support {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    /// A new FIFO at `dir/name`.
    pub fn mkfifo(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        let made = std::process::Command::new("mkfifo").arg(&p).status().expect("run mkfifo");
        assert!(made.success(), "mkfifo {}", p.display());
        p
    }

    /// Run `read` (which reads `fifo`) on its own thread and return its result. A reader that
    /// blocks on the FIFO is released by opening it for writing, and the test fails.
    pub fn read_without_blocking<T: Send + 'static>(fifo: &Path, read: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let _ = tx.send(read());
        });
        // The read should return in microseconds; the bound only stops a blocked one.
        let result = rx.recv_timeout(Duration::from_secs(10));
        if result.is_err() {
            // Opening for writing lets the blocked open return; closing gives it end of file.
            drop(std::fs::OpenOptions::new().write(true).open(fifo));
            let _ = reader.join();
        }
        result.unwrap_or_else(|_| panic!("reading {} blocked (waited 10 s for a writer)", fifo.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_regular_file_up_to_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        std::fs::write(&p, "1234").expect("write");
        let (bytes, metadata) = read(&p, 4).expect("exactly the limit");
        assert_eq!(bytes, b"1234");
        assert_eq!(metadata.len(), 4);
        let err = read(&p, 3).expect_err("over the limit");
        assert!(matches!(err, SmallFileError::TooLarge { limit: 3 }), "{err}");
        assert_eq!(err.to_string(), "is larger than the limit of 3 bytes");
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = test_support::mkfifo(dir.path(), "fifo");
        let path = p.clone();
        let err = test_support::read_without_blocking(&p, move || read(&path, 4096)).expect_err("a FIFO");
        assert_eq!(err.to_string(), "is a FIFO, expected a regular file");
    }

    #[test]
    fn devices_and_directories_are_refused_by_what_they_are() {
        let err = read(Path::new("/dev/zero"), 4096).expect_err("/dev/zero");
        assert_eq!(err.to_string(), "is a character device, expected a regular file");
        let dir = tempfile::tempdir().expect("tempdir");
        let err = read(dir.path(), 4096).expect_err("a directory");
        assert_eq!(err.to_string(), "is a directory, expected a regular file");
        let err = read(&dir.path().join("missing"), 4096).expect_err("missing");
        assert!(err.is_not_found(), "{err}");
    }
}
