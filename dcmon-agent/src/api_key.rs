//! The server API key: a secret that is read from a file, checked, and never printed.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::secure_file::{self, SmallFileError};

/// An API key. `Debug` and `Display` are redacted so the key cannot leak through logs.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl ApiKey {
    /// The key for the `Authorization` header. The only way to see it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// The most bytes a key file may hold. The server's keys are about 50 characters; the key is
/// sent in a header with every batch, so a runaway file must not become a huge header.
pub const MAX_KEY_FILE_BYTES: u64 = 4096;

/// Why the key could not be used. Messages never include the key's contents.
#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    /// No key file.
    #[error(
        "API key file {p} does not exist; uploading needs one. Create it with:\n  echo 'YOUR_API_KEY' | sudo tee {p} > /dev/null\n  sudo chmod 600 {p}",
        p = .path.display()
    )]
    Missing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// Exists but cannot be used as a file: unreadable, not a regular file, or too large.
    // The field is not called `source`: the message already includes it, and a `source` would
    // be printed a second time by `{:#}`.
    #[error("API key file {}: {error}", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// Why.
        error: SmallFileError,
    },
    /// Empty, or characters that cannot go in an HTTP header.
    #[error("API key file {} {problem}", path.display())]
    Malformed {
        /// The key file.
        path: PathBuf,
        /// What is wrong, without the key.
        problem: &'static str,
    },
}

/// A non-fatal finding about the key file, to be logged as a warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermissionWarning {
    /// The key file.
    pub path: PathBuf,
    /// Its mode bits (e.g. 0o644).
    pub mode: u32,
}

impl fmt::Display for PermissionWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "API key file {} has mode {:04o}, readable by group or others; run: sudo chmod 600 {}",
            self.path.display(),
            self.mode & 0o7777,
            self.path.display()
        )
    }
}

/// Read and check the key at `path`: a regular file of at most [`MAX_KEY_FILE_BYTES`].
/// Surrounding whitespace (the trailing newline `tee` writes) is removed. A FIFO or device is
/// refused at once; a file on a hung filesystem can still block, so async callers run this on
/// a blocking thread under a timeout.
pub fn load(path: &Path) -> Result<(ApiKey, Option<PermissionWarning>), ApiKeyError> {
    use std::os::unix::fs::PermissionsExt;
    let (bytes, metadata) = secure_file::read(path, MAX_KEY_FILE_BYTES).map_err(|error| {
        if error.is_not_found() {
            ApiKeyError::Missing { path: path.to_owned() }
        } else {
            ApiKeyError::Read { path: path.to_owned(), error }
        }
    })?;
    let key = parse(path, &bytes)?;
    let mode = metadata.permissions().mode();
    let warning = (mode & 0o077 != 0).then(|| PermissionWarning { path: path.to_owned(), mode });
    Ok((key, warning))
}

/// Check the contents of a key file; `path` is only used in error messages.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<ApiKey, ApiKeyError> {
    let key = bytes.trim_ascii();
    let malformed = |problem| ApiKeyError::Malformed { path: path.to_owned(), problem };
    if key.is_empty() {
        return Err(malformed("is empty"));
    }
    if !key.iter().all(u8::is_ascii_graphic) {
        return Err(malformed("must hold one key of printable ASCII without spaces (as the server issues)"));
    }
    // Printable ASCII is valid UTF-8.
    Ok(ApiKey(String::from_utf8_lossy(key).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const KEY: &str = "dcmon_s3cr3tS3cr3tS3cr3tS3cr3tS3cr3tS3cr3tS3cr3";

    fn write(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let p = dir.join("api_key");
        std::fs::write(&p, text).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    }

    #[test]
    fn loads_trimmed_key_and_warns_on_loose_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(dir.path(), &format!("{KEY}\n"), 0o600);
        let (key, warning) = load(&p).expect("key");
        assert_eq!(key.expose(), KEY);
        assert_eq!(warning, None);
        let p = write(dir.path(), KEY, 0o644);
        let (_, warning) = load(&p).expect("key");
        let w = warning.expect("warning for 0644");
        assert!(w.to_string().contains("0644") && w.to_string().contains("chmod 600"), "{w}");
        assert!(!w.to_string().contains(KEY));
    }

    #[test]
    fn never_shows_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(dir.path(), KEY, 0o600);
        let (key, _) = load(&p).expect("key");
        assert!(!format!("{key:?}").contains(KEY));
        let p = write(dir.path(), &format!("{KEY} second-word"), 0o600);
        let err = load(&p).expect_err("space inside");
        assert!(!err.to_string().contains(KEY), "{err}");
    }

    #[test]
    fn missing_key_says_how_to_create_it() {
        let err = load(Path::new("/nonexistent/dcmon/api_key")).expect_err("missing");
        let msg = err.to_string();
        assert!(msg.contains("echo 'YOUR_API_KEY' | sudo tee /nonexistent/dcmon/api_key"), "{msg}");
        assert!(msg.contains("chmod 600"), "{msg}");
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(dir.path(), "\n", 0o600);
        assert!(load(&p).expect_err("empty").to_string().contains("is empty"));
    }

    #[test]
    fn a_fifo_is_refused_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = crate::secure_file::test_support::mkfifo(dir.path(), "api_key");
        let path = fifo.clone();
        let err = crate::secure_file::test_support::read_without_blocking(&fifo, move || load(&path))
            .expect_err("a FIFO is not a key file");
        assert_eq!(err.to_string(), format!("API key file {}: is a FIFO, expected a regular file", fifo.display()));
    }

    #[test]
    fn a_device_or_directory_is_refused_by_what_it_is() {
        let err = load(Path::new("/dev/zero")).expect_err("/dev/zero");
        assert_eq!(err.to_string(), "API key file /dev/zero: is a character device, expected a regular file");
        let dir = tempfile::tempdir().expect("tempdir");
        let err = load(dir.path()).expect_err("a directory");
        let msg = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(msg, format!("API key file {}: is a directory, expected a regular file", dir.path().display()));
    }

    #[test]
    fn an_oversized_key_file_is_refused_naming_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(dir.path(), &"k".repeat(10 << 20), 0o600);
        let err = load(&p).expect_err("a 10 MiB key");
        assert_eq!(err.to_string(), format!("API key file {}: is larger than the limit of 4096 bytes", p.display()));
        let p = write(dir.path(), &"k".repeat(4096), 0o600);
        assert_eq!(load(&p).expect("exactly the limit").0.expose().len(), 4096);
    }

    #[test]
    fn an_unreadable_file_says_why_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(dir.path(), KEY, 0o600);
        let link = dir.path().join("loop");
        std::os::unix::fs::symlink(&link, &link).expect("symlink");
        let err = load(&link).expect_err("a symlink loop");
        let msg = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(msg.matches("os error").count(), 1, "{msg}");
        assert!(msg.starts_with(&format!("API key file {}: cannot read: ", link.display())), "{msg}");
        assert!(load(&p).is_ok());
    }
}
