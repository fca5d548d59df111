//! The outbox's unit tests: the queue, its files and their damage, on real directories.
//!
//! This file holds the shared helpers; the tests are in one file per role: `queue`, `recovery`,
//! `hostile`, `opening`, `property`, `cursors`, `bounds`, `read_back` and `repair`.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::queue::DROP_LOG_EVERY;
use super::segment::{SEGMENT_READ_MAX, list_segments};
use super::set_aside::SET_ASIDE_KEEP;
use super::*;

const LIMITS: OutboxLimits = OutboxLimits { max_bytes: 1 << 30, max_age: Duration::from_secs(3600) };

fn body(i: u32) -> Bytes {
    Bytes::from(format!("{{\"batch\": {i}}}"))
}

/// Bodies of one length, for tests that count records.
fn fixed(i: u32) -> Bytes {
    Bytes::from(format!("{{\"batch\": {i:04}}}"))
}

fn drain(o: &mut Outbox) -> Vec<Bytes> {
    let mut got = Vec::new();
    while let Some((seq, b)) = o.oldest() {
        got.push(b);
        o.remove(seq);
    }
    got
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    list_segments(dir).expect("list").into_iter().map(|(_, p)| p).collect()
}

/// A log sink for [`logged`].
#[derive(Clone, Default)]
struct LogBuffer(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = Self;
    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

/// Run `f` and return what it logged (this thread only).
pub(super) fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
    crate::test_log::anchor();
    let buffer = LogBuffer::default();
    let subscriber = tracing_subscriber::fmt().with_writer(buffer.clone()).with_ansi(false).finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text =
        String::from_utf8_lossy(&buffer.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).into_owned();
    (out, text)
}

/// Run `f` on its own thread; `None` if it has not returned after 20 s (it hangs).
fn within_20s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20)).ok()
}

fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
}

/// Bytes of the segment files in `dir`.
fn segment_bytes_on_disk(dir: &Path) -> u64 {
    segments(dir).iter().map(|p| std::fs::metadata(p).map_or(0, |m| m.len())).sum()
}

/// The files under `dir` that this process holds open, once per descriptor.
fn files_open_under(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir))
        .collect()
}

/// The open descriptors of this process whose file is under `dir`.
fn fds_under(dir: &Path) -> usize {
    files_open_under(dir).len()
}

/// A small tmpfs at a fresh directory, unmounted on drop.
struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount");
        assert!(status.success(), "mount tmpfs");
        Self(dir)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0.path()).status();
    }
}

/// Issue 22: the bounds the record reader and the queue enforce.
mod bounds;
mod cursors;
mod hostile;
/// Issue 22: what opening an outbox makes of what it finds.
mod opening;
/// Issue 14's fuzzing: any sequence of pushes, deliveries, rejections, crashes and cut
/// files loses nothing inside the bounds, and reports every loss outside them.
mod property;
mod queue;
/// Issue 22: reading a batch back for sending.
mod read_back;
mod recovery;
/// Issue 22: files deleted underneath the agent.
mod repair;
