//! Segment files: naming and listing them, opening them safely, which are kept open, when
//! one is deleted, and fsyncing what was written to them.

use std::fs::File;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Outbox;
use super::record::{MAX_BODY_BYTES, parse_hex_seq};

const SEGMENT_SUFFIX: &str = ".seg";
/// The most a segment takes before the next record starts a new one.
const SEGMENT_BYTES: u64 = 1 << 20;
/// No segment this agent writes is longer: records start below [`SEGMENT_BYTES`] and a body
/// is at most [`MAX_BODY_BYTES`]. A longer file is not read.
pub(super) const SEGMENT_READ_MAX: u64 = SEGMENT_BYTES + MAX_BODY_BYTES + 128;
/// Segment files held open at once (the one appended to, the oldest being read); others are
/// opened again when their turn comes.
pub(super) const OPEN_SEGMENTS_MAX: usize = 8;

/// The segment files in `dir` as `(number, path)`, oldest first.
pub(super) fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            Some((parse_hex_seq(name.strip_suffix(SEGMENT_SUFFIX)?)?, e.path()))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Open `path` for reading without blocking (a FIFO or a device must not hang the agent), and
/// only if it is a regular file: anything else is an `InvalidData` error naming what it is.
pub(super) fn open_regular(path: &Path) -> std::io::Result<File> {
    use crate::secure_file::SmallFileError;
    match crate::secure_file::open_regular(path) {
        Ok((file, _)) => Ok(file),
        Err(SmallFileError::Io(e)) => Err(e),
        Err(e) => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{} {e}", path.display()))),
    }
}

/// The device and inode of `path`, to notice it being deleted or replaced.
pub(super) fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The segment at `path` opened to cut its torn tail (it was just read as a regular file).
pub(super) fn file_for_cut(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    File::options().write(true).custom_flags(libc::O_NONBLOCK).open(path)
}

#[derive(Debug)]
pub(super) struct Segment {
    /// Its number, in creation order (the file name).
    pub(super) id: u64,
    pub(super) path: PathBuf,
    /// Open for reading, and for appending when `writable`.
    pub(super) file: Option<Arc<File>>,
    /// Bytes in the file.
    pub(super) len: u64,
    /// Bytes known to be on stable storage.
    pub(super) synced_len: u64,
    /// Whether the directory entry is known to be on stable storage.
    pub(super) dir_synced: bool,
    /// Whether this run appends to it (false for earlier runs' segments and once it changed
    /// underneath the agent).
    pub(super) writable: bool,
    /// Its batches not yet done.
    pub(super) pending: usize,
}

impl Segment {
    /// Nothing in it is still to deliver and this run is done appending to it.
    pub(super) fn deletable(&self, segment_bytes: u64) -> bool {
        self.pending == 0 && !(self.writable && self.len < segment_bytes)
    }

    pub(super) fn reader(&mut self) -> std::io::Result<Arc<File>> {
        if let Some(f) = &self.file {
            return Ok(Arc::clone(f));
        }
        let f = Arc::new(open_regular(&self.path)?);
        self.file = Some(Arc::clone(&f));
        Ok(f)
    }

    /// Whether its file was deleted (or, not open, is no longer there).
    pub(super) fn is_gone(&self) -> bool {
        match &self.file {
            Some(f) => f.metadata().is_ok_and(|m| m.nlink() == 0),
            None => std::fs::symlink_metadata(&self.path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound),
        }
    }
}

/// Files to fsync so that everything written so far survives a power loss; run it off the
/// async thread ([`SyncJob::run`]), then hand it back to [`Outbox::sync_finished`].
#[derive(Debug)]
pub struct SyncJob {
    dir: PathBuf,
    files: Vec<(u64, Arc<File>, u64)>,
    pub(super) dir_needed: bool,
}

impl SyncJob {
    /// `fdatasync` each segment written since the last sync, and the directory when a segment
    /// is new.
    pub fn run(&self) -> std::io::Result<()> {
        for (_, f, _) in &self.files {
            f.sync_data()?;
        }
        if self.dir_needed {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }
}

impl Outbox {
    pub(super) fn segment_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}{SEGMENT_SUFFIX}"))
    }

    /// Records go to a new segment once the current one holds this much.
    pub(super) fn segment_bytes(&self) -> u64 {
        (self.limits.max_bytes / 8).clamp(1, SEGMENT_BYTES)
    }

    /// Close segment files beyond [`OPEN_SEGMENTS_MAX`], newest read-only ones first (the
    /// oldest are read next, the newest is appended to).
    pub(super) fn close_extra_files(&mut self) {
        let mut open = self.segments.iter().filter(|s| s.file.is_some()).count();
        for s in self.segments.iter_mut().rev() {
            if open <= OPEN_SEGMENTS_MAX {
                break;
            }
            if !s.writable && s.file.take().is_some() {
                open -= 1;
            }
        }
    }

    /// Delete segments, oldest first, that hold no batch still to deliver and that this run is
    /// not appending to; and, anywhere, empty ones this run no longer appends to.
    pub(super) fn delete_done_segments(&mut self) {
        let segment_bytes = self.segment_bytes();
        let mut i = 0;
        let mut front = true;
        while i < self.segments.len() {
            let s = &self.segments[i];
            let empty = s.len == 0 && s.pending == 0 && !s.writable;
            if (front && s.deletable(segment_bytes)) || empty {
                if let Some(s) = self.segments.remove(i)
                    && let Err(e) = std::fs::remove_file(&s.path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!("outbox: cannot delete the delivered segment {}: {e}", s.path.display());
                }
            } else {
                front = false;
                i += 1;
            }
        }
    }

    /// Bytes of the segment files.
    pub(super) fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// What to fsync so that every stored batch survives a power loss, or `None` when nothing
    /// is waiting for it.
    pub fn sync_job(&self) -> Option<SyncJob> {
        let files: Vec<(u64, Arc<File>, u64)> = self
            .segments
            .iter()
            .filter(|s| s.len > s.synced_len || !s.dir_synced)
            .filter_map(|s| Some((s.id, Arc::clone(s.file.as_ref()?), s.len)))
            .collect();
        if files.is_empty() {
            return None;
        }
        let dir_needed = self.segments.iter().any(|s| !s.dir_synced);
        Some(SyncJob { dir: self.dir.clone(), files, dir_needed })
    }

    /// Record how `job` went. A failure is logged (once per distinct error) and the data stays
    /// due for the next sync.
    pub fn sync_finished(&mut self, job: &SyncJob, result: std::io::Result<()>) {
        if let Err(e) = result {
            let why = format!("fsync of {} failed: {e}", self.dir.display());
            if self.sync_error.as_deref() != Some(why.as_str()) {
                tracing::error!("outbox: {why}; batches are written but may not survive a power loss");
                self.sync_error = Some(why);
            }
            return;
        }
        if let Some(was) = self.sync_error.take() {
            tracing::info!("outbox: fsync works again (was: {was})");
        }
        for (id, _, len) in &job.files {
            if let Some(s) = self.segments.iter_mut().find(|s| s.id == *id) {
                s.synced_len = s.synced_len.max(*len);
                s.dir_synced |= job.dir_needed;
            }
        }
    }

    /// Whether a stored batch now has to wait for delivery (it is queued behind another) and
    /// so should be fsynced now rather than at the next failure or at shutdown.
    pub fn backlog_needs_sync(&self) -> bool {
        self.entries.len() > 1 && self.segments.iter().any(|s| s.len > s.synced_len || !s.dir_synced)
    }

    /// Check that the files are still there (rewriting what was deleted underneath the agent),
    /// then fsync everything stored, here and now (at shutdown). Errors are logged.
    pub fn sync_now(&mut self) {
        self.check_files();
        if let Some(job) = self.sync_job() {
            let result = job.run();
            self.sync_finished(&job, result);
        }
    }
}
