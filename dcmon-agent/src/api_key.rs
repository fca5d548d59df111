//! The server API key: a secret that is read from a file, checked, and never printed.

use std::fmt;
use std::path::{Path, PathBuf};

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
    /// Exists but unreadable.
    #[error("cannot read API key file {}: {source}", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
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

/// Read and check the key at `path`. Surrounding whitespace (the trailing newline `tee` writes)
/// is removed.
pub fn load(path: &Path) -> Result<(ApiKey, Option<PermissionWarning>), ApiKeyError> {
    use std::os::unix::fs::PermissionsExt;
    let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ApiKeyError::Missing { path: path.to_owned() },
        _ => ApiKeyError::Read { path: path.to_owned(), source },
    })?;
    let key = text.trim();
    let malformed = |problem| ApiKeyError::Malformed { path: path.to_owned(), problem };
    if key.is_empty() {
        return Err(malformed("is empty"));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(malformed("must hold one key of printable ASCII without spaces (as the server issues)"));
    }
    let mode = std::fs::metadata(path).map(|m| m.permissions().mode()).unwrap_or(0);
    let warning = (mode & 0o077 != 0).then(|| PermissionWarning { path: path.to_owned(), mode });
    Ok((ApiKey(key.to_owned()), warning))
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
}
