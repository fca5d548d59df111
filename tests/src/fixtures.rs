//! Where the workspace and its fixture trees are.

use std::path::{Path, PathBuf};

/// The workspace root (the directory above this crate's).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from(".."), Path::to_path_buf)
}

/// The `tests/fixtures` directory.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A fixture host root under `tests/fixtures/hosts`: a host's /proc, /sys and /etc files, for
/// the agent's `host_root`.
pub fn fixture_host(name: &str) -> PathBuf {
    fixtures_dir().join("hosts").join(name)
}

/// The names of every fixture host under `tests/fixtures/hosts`, sorted.
pub fn fixture_hosts() -> Vec<String> {
    let dir = fixtures_dir().join("hosts");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
    let mut names: Vec<String> = entries
        .map(|e| e.unwrap_or_else(|e| panic!("listing {}: {e}", dir.display())))
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
