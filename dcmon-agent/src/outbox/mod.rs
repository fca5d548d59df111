//! The durable outbox: every batch is written to disk before it is sent, and leaves only when the
//! server answered 2xx (or refused it for good, or a bound dropped it).
//!
//! # Layout
//! Append-only segment files `<segment number as 16 hex digits>.seg`, numbered in creation
//! order, each a sequence of records ([`record`] has the format): a batch, or a "done" mark for
//! an earlier batch. Damaged records are copied to `corrupt/`, logged (one line per segment)
//! and counted, and the rest is delivered. A `*.seg` that is not a regular file (a FIFO, a
//! device) is logged and left alone; files are opened non-blocking and read record by record,
//! so no file can block the agent or make it read without bound.
//!
//! Each run appends to segments of its own; segments of earlier runs are only read (a torn tail
//! is cut off). Segments are deleted oldest first once all their batches are done; in that
//! order a `D` record is never deleted before the batch it marks. A segment takes records until
//! it holds an eighth of `outbox_max_bytes` (at most 1 MiB), so that delivered and dropped
//! batches stop occupying the disk soon.
//!
//! # Durability
//! A batch record is written with one `write(2)` before the batch is sent: an agent crash or
//! kill -9 never loses it, the kernel holds it. It is fsynced (`fdatasync`, and the directory
//! for a new segment) as soon as it has to wait: when it is queued behind another batch, when a
//! send failed, and at shutdown. A batch delivered at its first attempt is never fsynced: a
//! power loss can lose only a batch whose first send is in flight at that instant, and may
//! resend batches whose `D` record had not reached the disk (at-least-once). Fsyncing every
//! batch cost more CPU than collecting it (`cargo bench -p dcmon-agent --bench outbox`).
//!
//! Before each append the segment is checked (`fstat`), and after it the offset it landed at:
//! a segment deleted (its directory too) or truncated underneath the agent is noticed, the
//! batches still in memory or readable from the open file are rewritten into a new segment
//! (the directory recreated), and what cannot be read back is logged and counted as corrupt.
//!
//! # Bounds
//! Total size (the queued batches, and the segment files on disk) and age; beyond them the
//! oldest batches are dropped, counted, and logged (the first drop at once, then a summary at
//! most every 10 minutes). Age is measured on the monotonic clock from when the batch was
//! queued (from the wall clock once, at open, for batches an earlier run left), so a clock
//! step never drops batches. When the directory cannot be written (disk full, read-only,
//! permissions) batches are kept in memory, under the same bounds, and the reason is logged;
//! a write that failed is retried into the same segment, so a full disk costs no files.

mod lock;
mod record;

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::io::{BufReader, Read as _, Seek as _, Write as _};
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use self::lock::{LockError, lock_dir};
pub use self::record::{Corrupt, MAX_BODY_BYTES, Record, batch_record_len, encode_batch, encode_done, parse_segment};
use self::record::{Found, RecordReader, batch_crc, parse_hex_seq};
use crate::batch::Sample;

const SEGMENT_SUFFIX: &str = ".seg";
/// The most a segment takes before the next record starts a new one.
const SEGMENT_BYTES: u64 = 1 << 20;
/// No segment this agent writes is longer: records start below [`SEGMENT_BYTES`] and a body
/// is at most [`MAX_BODY_BYTES`]. A longer file is not read.
const SEGMENT_READ_MAX: u64 = SEGMENT_BYTES + MAX_BODY_BYTES + 128;
/// Files kept in `rejected/` and in `corrupt/` each, for an operator to inspect.
const SET_ASIDE_KEEP: usize = 100;
/// The most of one damaged stretch copied to `corrupt/`.
const DAMAGE_COPY_MAX: u64 = 1 << 20;
/// Segment files held open at once (the one appended to, the oldest being read); others are
/// opened again when their turn comes.
const OPEN_SEGMENTS_MAX: usize = 8;
/// After a drop is logged, further drops are summarised in one line at most this often.
const DROP_LOG_EVERY: Duration = Duration::from_secs(600);

/// Size and age bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    /// Total bytes of queued batches, and of the segment files on disk.
    pub max_bytes: u64,
    /// Oldest batch kept, by the time it has waited (monotonic clock).
    pub max_age: Duration,
}

/// Depth and loss counters, reported as self-metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OutboxStats {
    /// Batches waiting.
    pub batches: u64,
    /// Bytes waiting.
    pub bytes: u64,
    /// Batches dropped by the size or age bound since start.
    pub dropped_total: u64,
    /// Torn or corrupt records set aside, and batches lost from files changed underneath the
    /// agent, since start.
    pub corrupt_total: u64,
    /// Batches the server refused for good (400, 413, 422) since start.
    pub rejected_total: u64,
    /// Batches held in memory because the directory cannot be written.
    pub in_memory: u64,
}

impl OutboxStats {
    /// The outbox self-metrics.
    pub fn samples(&self) -> [Sample; 5] {
        [
            Sample::count("dcmon_outbox_batches", self.batches),
            Sample::count("dcmon_outbox_bytes", self.bytes),
            Sample::count("dcmon_outbox_dropped_batches_total", self.dropped_total),
            Sample::count("dcmon_outbox_corrupt_batches_total", self.corrupt_total),
            Sample::count("dcmon_outbox_rejected_batches_total", self.rejected_total),
        ]
    }
}

/// `run` refuses to start on an outbox another agent holds: both would send the same batches.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "another dcmon-agent (pid {}) is using the outbox directory {}; stop it, or give this agent its own outbox_dir",
    .pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
    .dir.display()
)]
pub struct OutboxInUse {
    /// The outbox directory.
    pub dir: PathBuf,
    /// The other agent's pid, from the lock file.
    pub pid: Option<u32>,
}

/// A batch waiting in an outbox, as [`inspect`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredBatch {
    /// Sequence number (delivery order).
    pub seq: u64,
    /// Collection timestamp.
    pub timestamp: i64,
    /// Body length.
    pub bytes: u64,
}

/// The batches waiting in the outbox at `dir`, oldest first, without changing anything (for
/// operators and tests; the agent may be running). Files that are not regular are skipped.
pub fn inspect(dir: &Path) -> std::io::Result<Vec<StoredBatch>> {
    let mut batches = Vec::new();
    let mut done = HashSet::new();
    for (_, path) in list_segments(dir)? {
        let file = match open_regular(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => continue,
            Err(e) => return Err(e),
        };
        let mut reader = RecordReader::new(BufReader::new(file.take(SEGMENT_READ_MAX)));
        while let Some(found) = reader.next_record()? {
            match found {
                Found::Batch { seq, timestamp, body_len, .. } => {
                    batches.push(StoredBatch { seq, timestamp, bytes: body_len });
                }
                Found::Done { seq } => {
                    done.insert(seq);
                }
                Found::Damaged { .. } => {}
            }
        }
    }
    batches.retain(|b| !done.contains(&b.seq));
    batches.sort_by_key(|b| b.seq);
    Ok(batches)
}

/// The segment files in `dir` as `(number, path)`, oldest first.
fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
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
fn open_regular(path: &Path) -> std::io::Result<File> {
    use crate::secure_file::SmallFileError;
    match crate::secure_file::open_regular(path) {
        Ok((file, _)) => Ok(file),
        Err(SmallFileError::Io(e)) => Err(e),
        Err(e) => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{} {e}", path.display()))),
    }
}

/// The device and inode of `path`, to notice it being deleted or replaced.
fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[derive(Debug)]
struct Segment {
    /// Its number, in creation order (the file name).
    id: u64,
    path: PathBuf,
    /// Open for reading, and for appending when `writable`.
    file: Option<Arc<File>>,
    /// Bytes in the file.
    len: u64,
    /// Bytes known to be on stable storage.
    synced_len: u64,
    /// Whether the directory entry is known to be on stable storage.
    dir_synced: bool,
    /// Whether this run appends to it (false for earlier runs' segments and once it changed
    /// underneath the agent).
    writable: bool,
    /// Its batches not yet done.
    pending: usize,
}

impl Segment {
    /// Nothing in it is still to deliver and this run is done appending to it.
    fn deletable(&self, segment_bytes: u64) -> bool {
        self.pending == 0 && !(self.writable && self.len < segment_bytes)
    }

    fn reader(&mut self) -> std::io::Result<Arc<File>> {
        if let Some(f) = &self.file {
            return Ok(Arc::clone(f));
        }
        let f = Arc::new(open_regular(&self.path)?);
        self.file = Some(Arc::clone(&f));
        Ok(f)
    }

    /// Whether its file was deleted (or, not open, is no longer there).
    fn is_gone(&self) -> bool {
        match &self.file {
            Some(f) => f.metadata().is_ok_and(|m| m.nlink() == 0),
            None => std::fs::symlink_metadata(&self.path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound),
        }
    }
}

#[derive(Debug)]
enum Stored {
    /// In a segment. `cached` holds the body while the queue is short, so the common case (send
    /// right after the write) does not read it back.
    Disk { segment: u64, body_offset: u64, crc: u32, cached: Option<Bytes> },
    /// The directory could not be written.
    Memory(Bytes),
}

/// Bodies of on-disk batches are kept in memory only while the queue is at most this long;
/// a backlog after an outage is read back from disk.
const CACHED_BATCHES: usize = 4;

#[derive(Debug)]
struct Entry {
    seq: u64,
    timestamp: i64,
    /// Body length.
    len: u64,
    /// What it counts against the size bound: its record on disk, its body in memory.
    bytes: u64,
    stored: Stored,
    /// When this run queued it (or found it, at open), and how old it was then.
    queued_at: Instant,
    age_when_queued: Duration,
}

impl Entry {
    fn age(&self, now: Instant) -> Duration {
        self.age_when_queued + now.saturating_duration_since(self.queued_at)
    }

    /// Where its record ends in its segment, for one stored on disk.
    fn record_end(&self) -> Option<u64> {
        match self.stored {
            Stored::Disk { body_offset, .. } => Some(body_offset + self.len + 1),
            Stored::Memory(_) => None,
        }
    }
}

/// Files to fsync so that everything written so far survives a power loss; run it off the
/// async thread ([`SyncJob::run`]), then hand it back to [`Outbox::sync_finished`].
#[derive(Debug)]
pub struct SyncJob {
    dir: PathBuf,
    files: Vec<(u64, Arc<File>, u64)>,
    dir_needed: bool,
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

/// Why an append did not happen.
#[derive(Debug)]
enum AppendFailure {
    /// The segment file, or the directory, was deleted.
    Gone,
    /// Segment `segment` is not the length this run left it at: only its first `intact` bytes
    /// are known to be as written.
    Changed {
        segment: u64,
        intact: u64,
    },
    Io(std::io::Error),
}

/// Drops are logged at once, then summarised at most every [`DROP_LOG_EVERY`].
#[derive(Debug, Default)]
struct DropLog {
    last_line: Option<Instant>,
    unlogged: u64,
}

/// The queue of unsent batches, oldest first.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    limits: OutboxLimits,
    entries: VecDeque<Entry>,
    segments: VecDeque<Segment>,
    next_seq: u64,
    next_segment: u64,
    stats: OutboxStats,
    /// Why the directory cannot be written, while it cannot.
    persist_error: Option<String>,
    /// Why the last fsync failed, until one succeeds.
    sync_error: Option<String>,
    /// Why the last done record could not be written, until one is.
    done_error: Option<String>,
    /// The `flock`ed `.lock` file that keeps a second agent out of the directory.
    dir_lock: Option<File>,
    /// Why there is no `dir_lock`.
    lock_error: Option<String>,
    /// Another agent holds the lock.
    in_use: Option<OutboxInUse>,
    /// The directory's device and inode, to notice it being deleted or replaced.
    dir_identity: Option<(u64, u64)>,
    drops: DropLog,
    /// Record bytes being assembled (kept to reuse the allocation).
    scratch: Vec<u8>,
}

impl Outbox {
    /// Open (creating if needed) the outbox in `dir` and index what earlier runs left. Never
    /// fails: an unusable directory means batches are kept in memory, and says why.
    pub fn open(dir: impl Into<PathBuf>, limits: OutboxLimits, now_unix: i64) -> Self {
        Self::open_at(dir.into(), limits, now_unix, Instant::now())
    }

    /// [`Outbox::open`], but refuse an outbox another agent is using (naming its pid): two
    /// agents on one outbox would send the same batches twice.
    pub fn open_exclusive(dir: impl Into<PathBuf>, limits: OutboxLimits, now_unix: i64) -> Result<Self, OutboxInUse> {
        let outbox = Self::open(dir, limits, now_unix);
        match outbox.in_use.clone() {
            Some(in_use) => Err(in_use),
            None => Ok(outbox),
        }
    }

    fn open_at(dir: PathBuf, limits: OutboxLimits, now_unix: i64, now: Instant) -> Self {
        let mut outbox = Self {
            dir,
            limits,
            entries: VecDeque::new(),
            segments: VecDeque::new(),
            next_seq: 0,
            next_segment: 0,
            stats: OutboxStats::default(),
            persist_error: None,
            sync_error: None,
            done_error: None,
            dir_lock: None,
            lock_error: None,
            in_use: None,
            dir_identity: None,
            drops: DropLog::default(),
            scratch: Vec::new(),
        };
        if let Err(e) = std::fs::create_dir_all(&outbox.dir) {
            outbox.persist_failed(format!("cannot create {}: {e}", outbox.dir.display()));
            return outbox;
        }
        outbox.dir_identity = identity(&outbox.dir);
        if !outbox.take_lock() {
            return outbox;
        }
        outbox.index_existing(now_unix, now);
        if !outbox.entries.is_empty() {
            tracing::info!(
                batches = outbox.entries.len(),
                bytes = outbox.stats.bytes,
                "outbox {}: resuming delivery of batches left by an earlier run",
                outbox.dir.display()
            );
        }
        outbox.delete_done_segments();
        outbox.enforce_limits(now);
        outbox
    }

    /// Take the directory's lock; on failure say why (and who holds it) and return false.
    fn take_lock(&mut self) -> bool {
        match lock_dir(&self.dir) {
            Ok(lock) => {
                self.dir_lock = Some(lock);
                self.lock_error = None;
                true
            }
            Err(e) => {
                let why = match e {
                    LockError::InUse(pid) => {
                        let in_use = OutboxInUse { dir: self.dir.clone(), pid };
                        let why = in_use.to_string();
                        self.in_use = Some(in_use);
                        why
                    }
                    LockError::Io(e) => format!("cannot lock {}: {e}", self.dir.join(".lock").display()),
                };
                self.lock_error = Some(why.clone());
                self.persist_failed(why);
                false
            }
        }
    }

    fn index_existing(&mut self, now_unix: i64, now: Instant) {
        let listed = match list_segments(&self.dir) {
            Ok(l) => l,
            Err(e) => {
                self.persist_failed(format!("cannot list {}: {e}", self.dir.display()));
                return;
            }
        };
        let mut done = HashSet::new();
        let mut found = Vec::new();
        for (id, path) in listed {
            self.next_segment = self.next_segment.max(id + 1);
            let file = match open_regular(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    tracing::warn!("outbox: ignoring {e}; it holds no batches this agent wrote");
                    continue;
                }
                Err(e) => {
                    // Leave the file for an operator; its batches cannot be delivered.
                    tracing::error!("outbox: cannot read {} ({e}); skipping its batches", path.display());
                    self.stats.corrupt_total += 1;
                    continue;
                }
            };
            let size = file.metadata().map_or(0, |m| m.len());
            if size > SEGMENT_READ_MAX {
                self.set_aside_oversized(&path, size);
                continue;
            }
            let mut damage = Vec::new();
            let mut intact_len = size;
            let mut reader = RecordReader::new(BufReader::with_capacity(64 << 10, &file));
            loop {
                match reader.next_record() {
                    Ok(None) => break,
                    Ok(Some(Found::Batch { seq, timestamp, body_offset, body_len, crc })) => {
                        self.next_seq = self.next_seq.max(seq + 1);
                        let wall_age = u64::try_from(now_unix.saturating_sub(timestamp)).unwrap_or(0);
                        found.push(Entry {
                            seq,
                            timestamp,
                            len: body_len,
                            bytes: record_len(seq, timestamp, body_len),
                            stored: Stored::Disk { segment: id, body_offset, crc, cached: None },
                            queued_at: now,
                            age_when_queued: Duration::from_secs(wall_age),
                        });
                    }
                    Ok(Some(Found::Done { seq })) => {
                        done.insert(seq);
                    }
                    Ok(Some(Found::Damaged { offset, len, why })) => {
                        if why == Corrupt::Torn {
                            intact_len = offset;
                        }
                        damage.push((offset, len, why));
                    }
                    Err(e) => {
                        tracing::error!("outbox: cannot read {} ({e}); skipping the rest of it", path.display());
                        self.stats.corrupt_total += 1;
                        intact_len = size;
                        break;
                    }
                }
            }
            self.set_aside_damage(&path, &file, &damage);
            if intact_len < size {
                // Cut the torn tail off, so the next start does not find it again.
                if let Err(e) = file_for_cut(&path).and_then(|f| f.set_len(intact_len)) {
                    tracing::warn!("outbox: cannot cut the torn end off {}: {e}", path.display());
                }
            }
            self.segments.push_back(Segment {
                id,
                path,
                file: None,
                len: intact_len,
                synced_len: intact_len,
                dir_synced: true,
                writable: false,
                pending: 0,
            });
        }
        found.retain(|e| !done.contains(&e.seq));
        found.sort_by_key(|e| e.seq);
        found.dedup_by_key(|e| e.seq);
        for e in &found {
            if let Stored::Disk { segment, .. } = e.stored
                && let Some(s) = self.segments.iter_mut().find(|s| s.id == segment)
            {
                s.pending += 1;
            }
        }
        self.stats.bytes = found.iter().map(|e| e.bytes).sum();
        self.stats.batches = found.len() as u64;
        self.entries = found.into();
        // Hold the oldest segments open: if the directory is deleted, their batches can still
        // be read back and rewritten.
        for s in self.segments.iter_mut().filter(|s| s.pending > 0).take(OPEN_SEGMENTS_MAX - 1) {
            let _ = s.reader();
        }
    }

    /// A `*.seg` far longer than any segment: not read, moved to `corrupt/` for an operator.
    fn set_aside_oversized(&mut self, path: &Path, size: u64) {
        self.stats.corrupt_total += 1;
        let folder = self.dir.join("corrupt");
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let target = folder.join(format!("{name}.oversized"));
        let moved = std::fs::create_dir_all(&folder).and_then(|()| std::fs::rename(path, &target));
        match moved {
            Ok(()) => tracing::error!(
                "outbox: {} is {size} bytes, more than a segment can be ({SEGMENT_READ_MAX}); moved it unread to {}",
                path.display(),
                target.display()
            ),
            Err(e) => tracing::error!(
                "outbox: {} is {size} bytes, more than a segment can be ({SEGMENT_READ_MAX}); ignoring it (cannot move it to {}: {e})",
                path.display(),
                folder.display()
            ),
        }
    }

    /// Copy each damaged stretch of `segment` to `corrupt/` and count it, once: a copy already
    /// there means an earlier run reported it. One log line for the segment.
    fn set_aside_damage(&mut self, segment: &Path, file: &File, damage: &[(u64, u64, Corrupt)]) {
        let mut new = 0usize;
        let mut bytes = 0u64;
        let mut kinds: Vec<(&'static str, usize)> = Vec::new();
        for (offset, len, why) in damage {
            let copy_len = (*len).min(DAMAGE_COPY_MAX);
            let mut copy = vec![0; usize::try_from(copy_len).unwrap_or(0)];
            let copy = match file.read_exact_at(&mut copy, *offset) {
                Ok(()) => copy,
                Err(_) => Vec::new(),
            };
            let note = (copy_len < *len).then(|| format!("; only its first {copy_len} of {len} bytes are copied"));
            if self.copy_damage(segment, *offset, &copy, why, note.as_deref()) {
                new += 1;
                bytes += len;
                match kinds.iter_mut().find(|(k, _)| *k == kind_of(why)) {
                    Some((_, n)) => *n += 1,
                    None => kinds.push((kind_of(why), 1)),
                }
            }
        }
        if new > 0 {
            let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
            tracing::warn!(
                "outbox: {new} damaged record(s), {bytes} bytes, in {} are unusable ({}); copied to {}",
                segment.display(),
                kinds.join(", "),
                self.dir.join("corrupt").display()
            );
            prune(&self.dir.join("corrupt"), SET_ASIDE_KEEP);
        }
    }

    /// Copy one damaged stretch to `corrupt/` and count it, unless a copy is already there.
    /// Returns whether it is new.
    fn copy_damage(&mut self, segment: &Path, offset: u64, bytes: &[u8], why: &Corrupt, note: Option<&str>) -> bool {
        let stem = segment.file_stem().and_then(|s| s.to_str()).unwrap_or("segment");
        let folder = self.dir.join("corrupt");
        let name = format!("{stem}-at{offset:010}.batch");
        if folder.join(&name).exists() {
            return false;
        }
        self.stats.corrupt_total += 1;
        let reason = format!("{why}{}", note.unwrap_or(""));
        let copied = std::fs::create_dir_all(&folder)
            .and_then(|()| std::fs::write(folder.join(&name), bytes))
            .and_then(|()| std::fs::write(folder.join(format!("{name}.reason")), reason));
        if let Err(e) = copied {
            tracing::warn!("outbox: cannot copy damaged bytes of {} to {}: {e}", segment.display(), folder.display());
        }
        true
    }

    fn persist_failed(&mut self, why: String) {
        if self.persist_error.as_deref() != Some(why.as_str()) {
            tracing::error!("outbox: {why}; keeping batches in memory until they are sent (lost if the agent stops)");
            self.persist_error = Some(why);
        }
    }

    /// Records go to a new segment once the current one holds this much.
    fn segment_bytes(&self) -> u64 {
        (self.limits.max_bytes / 8).clamp(1, SEGMENT_BYTES)
    }

    /// The segment this run appends to, created when there is none or the last is full.
    fn writable_segment(&mut self) -> std::io::Result<&mut Segment> {
        let segment_bytes = self.segment_bytes();
        let reuse = self.segments.back().is_some_and(|s| s.writable && s.len < segment_bytes);
        if !reuse {
            if self.dir_lock.is_none() {
                let why = self.lock_error.clone().unwrap_or_else(|| "the directory is not locked".to_owned());
                return Err(std::io::Error::other(why));
            }
            let (id, path, file) = loop {
                let (id, path) = (self.next_segment, self.segment_path(self.next_segment));
                self.next_segment += 1;
                match File::options().read(true).append(true).create_new(true).open(&path) {
                    Ok(file) => break (id, path, file),
                    // Someone put a file there (the directory is locked against other agents):
                    // never append to it, take the next number.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
            };
            if let Some(prev) = self.segments.back_mut() {
                prev.writable = false;
            }
            self.segments.push_back(Segment {
                id,
                path,
                file: Some(Arc::new(file)),
                len: 0,
                synced_len: 0,
                dir_synced: false,
                writable: true,
                pending: 0,
            });
            self.delete_done_segments();
            self.close_extra_files();
        }
        self.segments.back_mut().ok_or_else(|| std::io::Error::other("no segment"))
    }

    /// Close segment files beyond [`OPEN_SEGMENTS_MAX`], newest read-only ones first (the
    /// oldest are read next, the newest is appended to).
    fn close_extra_files(&mut self) {
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

    /// Append `data` as one write to the writable segment, checking first that the file is
    /// still there and as long as this run left it, and after that the write landed where
    /// expected. Returns the segment's number and the offset the record starts at.
    fn try_append(&mut self, data: &[u8]) -> Result<(u64, u64), AppendFailure> {
        let segment = self.writable_segment().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => AppendFailure::Gone,
            _ => AppendFailure::Io(e),
        })?;
        let file = Arc::clone(
            segment.file.as_ref().ok_or_else(|| AppendFailure::Io(std::io::Error::other("segment not open")))?,
        );
        let meta = file.metadata().map_err(AppendFailure::Io)?;
        if meta.nlink() == 0 {
            return Err(AppendFailure::Gone);
        }
        let start = segment.len;
        if meta.len() != start {
            return Err(AppendFailure::Changed { segment: segment.id, intact: meta.len().min(start) });
        }
        if let Err(e) = (&*file).write_all(data) {
            // Never leave half a record for later records to follow: cut it off and retry
            // into this same segment next time (a full disk must not cost a file per batch).
            if file.set_len(start).is_err() {
                segment.writable = false;
            }
            return Err(AppendFailure::Io(e));
        }
        let end = (&*file).stream_position().map_err(AppendFailure::Io)?;
        let landed = end.saturating_sub(data.len() as u64);
        segment.len = end;
        if landed != start {
            // Changed between the check and the write: what this run wrote past the smaller
            // of the two is not where it thinks.
            return Err(AppendFailure::Changed { segment: segment.id, intact: landed.min(start) });
        }
        Ok((segment.id, start))
    }

    /// [`Outbox::try_append`], after putting right (once) a segment or directory that changed
    /// underneath the agent.
    fn append(&mut self, data: &[u8]) -> std::io::Result<(u64, u64)> {
        let mut repaired = false;
        loop {
            match self.try_append(data) {
                Ok(at) => return Ok(at),
                Err(AppendFailure::Io(e)) => return Err(e),
                Err(_) if repaired => {
                    return Err(std::io::Error::other("its files keep changing underneath the agent"));
                }
                Err(AppendFailure::Gone) => self.recover_deleted_files(),
                Err(AppendFailure::Changed { segment, intact }) => self.recover_changed_segment(segment, intact),
            }
            repaired = true;
        }
    }

    /// Append `self.scratch`; see [`Outbox::append`].
    fn append_scratch(&mut self) -> std::io::Result<(u64, u64)> {
        let scratch = std::mem::take(&mut self.scratch);
        let result = self.append(&scratch);
        self.scratch = scratch;
        result
    }

    /// Segment files (or the whole directory) were deleted: recreate the directory and its
    /// lock, and rewrite every batch that is still in memory or readable from an open file.
    fn recover_deleted_files(&mut self) {
        let gone: Vec<u64> = self.segments.iter().filter(|s| s.is_gone()).map(|s| s.id).collect();
        let dir_replaced = identity(&self.dir) != self.dir_identity;
        let (mut rewritten, mut lost) = (0, 0);
        for id in &gone {
            let (r, l) = self.salvage(*id, 0);
            rewritten += r;
            lost += l;
        }
        self.segments.retain(|s| !gone.contains(&s.id));
        if dir_replaced {
            if let Err(e) = std::fs::create_dir_all(&self.dir) {
                self.persist_failed(format!("cannot recreate {}: {e}", self.dir.display()));
            }
            self.dir_identity = identity(&self.dir);
        }
        let lock_gone = self.dir_lock.as_ref().is_none_or(|f| f.metadata().is_ok_and(|m| m.nlink() == 0));
        if lock_gone && self.in_use.is_none() {
            self.dir_lock = None;
            self.take_lock();
        }
        tracing::error!(
            "outbox {}: {} deleted while the agent ran; {}rewrote the {rewritten} batches still readable, {lost} could not be read back and are lost",
            self.dir.display(),
            if dir_replaced { "the directory was".to_owned() } else { format!("{} segment file(s) were", gone.len()) },
            if dir_replaced { "recreated it and " } else { "" },
        );
        self.rewrite_in_memory();
    }

    /// Segment `id` is not as this run wrote it (truncated, or written to by someone else):
    /// append no more to it, and rewrite the batches past its `intact` bytes.
    fn recover_changed_segment(&mut self, id: u64, intact: u64) {
        let (rewritten, lost) = self.salvage(id, intact);
        if let Some(s) = self.segments.iter_mut().find(|s| s.id == id) {
            s.writable = false;
            tracing::error!(
                "outbox: {} changed underneath the agent (only its first {intact} bytes are as written); rewrote {rewritten} batches into a new segment, {lost} could not be read back and are lost",
                s.path.display()
            );
        }
        self.rewrite_in_memory();
    }

    /// Take the batches of segment `id` whose records end past `intact` off it: those whose
    /// body is cached or can still be read back (and checks out) go to memory, to be
    /// rewritten; the others are lost and counted. Returns (kept, lost).
    fn salvage(&mut self, id: u64, intact: u64) -> (usize, usize) {
        let file = self.segments.iter().find(|s| s.id == id).and_then(|s| s.file.clone());
        let (mut kept, mut lost) = (Vec::new(), Vec::new());
        for e in &mut self.entries {
            let Stored::Disk { segment, body_offset, crc, cached } = &e.stored else { continue };
            if *segment != id || e.record_end().is_none_or(|end| end <= intact) {
                continue;
            }
            let body = cached.clone().or_else(|| {
                let file = file.as_ref()?;
                let mut body = vec![0; usize::try_from(e.len).ok()?];
                file.read_exact_at(&mut body, *body_offset).ok()?;
                (batch_crc(e.seq, e.timestamp, &body) == *crc).then(|| Bytes::from(body))
            });
            match body {
                Some(body) => {
                    self.stats.bytes = self.stats.bytes - e.bytes + body.len() as u64;
                    e.bytes = body.len() as u64;
                    e.stored = Stored::Memory(body);
                    self.stats.in_memory += 1;
                    kept.push(e.seq);
                }
                None => lost.push(e.seq),
            }
        }
        for seq in &lost {
            if let Some(pos) = self.entries.iter().position(|e| e.seq == *seq)
                && let Some(e) = self.entries.remove(pos)
            {
                self.stats.batches -= 1;
                self.stats.bytes -= e.bytes;
                self.stats.corrupt_total += 1;
            }
        }
        if let Some(s) = self.segments.iter_mut().find(|s| s.id == id) {
            s.pending = s.pending.saturating_sub(kept.len() + lost.len());
            // What the file holds now counts against the bound until it is deleted.
            s.len = s.file.as_ref().and_then(|f| f.metadata().ok()).map_or(intact, |m| m.len());
        }
        (kept.len(), lost.len())
    }

    /// Write the batches held in memory to the current segment (after a repair); those that
    /// cannot be written stay in memory.
    fn rewrite_in_memory(&mut self) {
        let mut record = Vec::new();
        for i in 0..self.entries.len() {
            let Stored::Memory(body) = &self.entries[i].stored else { continue };
            let (seq, timestamp, body) = (self.entries[i].seq, self.entries[i].timestamp, body.clone());
            if memchr(b'\n', &body).is_some() || body.len() as u64 > MAX_BODY_BYTES {
                continue;
            }
            record.clear();
            let crc = encode_batch(&mut record, seq, timestamp, &body);
            let header_len = record.len() - body.len() - 1;
            let Ok((segment, start)) = self.try_append(&record) else { break };
            if let Some(s) = self.segments.iter_mut().find(|s| s.id == segment) {
                s.pending += 1;
            }
            let e = &mut self.entries[i];
            self.stats.bytes = self.stats.bytes - e.bytes + record.len() as u64;
            self.stats.in_memory = self.stats.in_memory.saturating_sub(1);
            e.bytes = record.len() as u64;
            let cached = (i < CACHED_BATCHES).then_some(body);
            e.stored = Stored::Disk { segment, body_offset: start + header_len as u64, crc, cached };
        }
    }

    /// Check that the segment files and the directory are still there, and put it right if
    /// not (at shutdown, before saying what is left for the next start).
    fn check_files(&mut self) {
        let deleted = identity(&self.dir) != self.dir_identity || self.segments.iter().any(Segment::is_gone);
        if self.dir_lock.is_some() && deleted {
            self.recover_deleted_files();
        }
    }

    /// Store a batch collected at `timestamp`: one write to the current segment (see the module
    /// docs for when it is fsynced). If the directory cannot be written it is kept in memory,
    /// and the reason logged.
    pub fn push(&mut self, timestamp: i64, body: Bytes) {
        self.push_at(timestamp, body, Instant::now());
    }

    fn push_at(&mut self, timestamp: i64, body: Bytes, now: Instant) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.scratch.clear();
        let crc = encode_batch(&mut self.scratch, seq, timestamp, &body);
        let header_len = self.scratch.len() - body.len() - 1;
        let written = if memchr(b'\n', &body).is_some() {
            Err(std::io::Error::other("batch body holds a raw newline; only compact JSON can be stored"))
        } else if body.len() as u64 > MAX_BODY_BYTES {
            Err(std::io::Error::other(format!("batch body is over the {MAX_BODY_BYTES} bytes a record may hold")))
        } else {
            self.append_scratch()
        };
        let (stored, bytes) = match written {
            Ok((segment, start)) => {
                if let Some(was) = self.persist_error.take() {
                    tracing::info!("outbox {}: writable again (was: {was})", self.dir.display());
                }
                if let Some(s) = self.segments.iter_mut().find(|s| s.id == segment) {
                    s.pending += 1;
                }
                let cached = (self.entries.len() < CACHED_BATCHES).then(|| body.clone());
                let body_offset = start + header_len as u64;
                (Stored::Disk { segment, body_offset, crc, cached }, self.scratch.len() as u64)
            }
            Err(e) => {
                self.persist_failed(format!("cannot write a batch to {}: {e}", self.dir.display()));
                self.stats.in_memory += 1;
                (Stored::Memory(body.clone()), body.len() as u64)
            }
        };
        self.entries.push_back(Entry {
            seq,
            timestamp,
            len: body.len() as u64,
            bytes,
            stored,
            queued_at: now,
            age_when_queued: Duration::ZERO,
        });
        self.stats.batches += 1;
        self.stats.bytes += bytes;
        self.enforce_limits(now);
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

    /// The oldest batch that can be sent, as `(seq, body)`. A body found damaged on the way is
    /// set aside in `corrupt/` (logged, counted) and skipped; it is never marked done, so it
    /// cannot hide another batch.
    pub fn oldest(&mut self) -> Option<(u64, Bytes)> {
        loop {
            let front = self.entries.front()?;
            let (seq, timestamp, len, record_len) = (front.seq, front.timestamp, front.len, front.bytes);
            let (segment, body_offset, crc) = match &front.stored {
                Stored::Memory(b) | Stored::Disk { cached: Some(b), .. } => return Some((seq, b.clone())),
                Stored::Disk { segment, body_offset, crc, cached: None } => (*segment, *body_offset, *crc),
            };
            let path = self.segment_path(segment);
            match self.read_body(segment, body_offset, len) {
                Ok(body) if batch_crc(seq, timestamp, &body) == crc => return Some((seq, Bytes::from(body))),
                Ok(_) => {
                    // Copy the whole record, named by where it starts: the next start finds the
                    // same damage there and knows it is reported.
                    let record_offset = (body_offset + len + 1).saturating_sub(record_len);
                    let record = self.read_body(segment, record_offset, record_len).unwrap_or_default();
                    self.copy_damage(&path, record_offset, &record, &Corrupt::Checksum, None);
                    tracing::warn!(
                        "outbox: batch {seq} in {} was damaged on disk (checksum mismatch); copied to {}",
                        path.display(),
                        self.dir.join("corrupt").display()
                    );
                }
                Err(e) => {
                    tracing::warn!("outbox: cannot read batch {seq} from {} ({e}); skipping it", path.display());
                    self.stats.corrupt_total += 1;
                }
            }
            self.finish(seq, false);
        }
    }

    fn segment_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}{SEGMENT_SUFFIX}"))
    }

    fn read_body(&mut self, segment: u64, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        let seg = self
            .segments
            .iter_mut()
            .find(|s| s.id == segment)
            .ok_or_else(|| std::io::Error::other("its segment is gone"))?;
        let file = seg.reader()?;
        self.close_extra_files();
        let mut body = vec![0; usize::try_from(len.min(MAX_BODY_BYTES + 128)).map_err(std::io::Error::other)?];
        file.read_exact_at(&mut body, offset)?;
        Ok(body)
    }

    /// The server accepted batch `seq`: forget it.
    pub fn remove(&mut self, seq: u64) {
        self.finish(seq, true);
    }

    /// The server will never accept batch `seq` (400, 413, 422): copy it to `rejected/` with the
    /// server's answer beside it, and go on with the next.
    pub fn reject(&mut self, seq: u64, answer: &str) {
        let Some(e) = self.entries.iter().find(|e| e.seq == seq) else { return };
        self.stats.rejected_total += 1;
        let (timestamp, len) = (e.timestamp, e.len);
        let body = match &e.stored {
            Stored::Memory(b) | Stored::Disk { cached: Some(b), .. } => Ok(b.to_vec()),
            Stored::Disk { segment, body_offset, cached: None, .. } => {
                let (segment, offset) = (*segment, *body_offset);
                self.read_body(segment, offset, len)
            }
        };
        let folder = self.dir.join("rejected");
        let name = format!("{seq:016x}-{timestamp}.batch");
        let copied = body.and_then(|body| {
            std::fs::create_dir_all(&folder)?;
            std::fs::write(folder.join(&name), body)?;
            std::fs::write(folder.join(format!("{name}.reason")), answer)
        });
        match copied {
            Ok(()) => prune(&folder, SET_ASIDE_KEEP),
            Err(e) => tracing::warn!("outbox: cannot copy the rejected batch to {}: {e}", folder.display()),
        }
        self.finish(seq, true);
    }

    /// Batch `seq` leaves the queue: record that on disk (when `mark_done`) and delete segments
    /// left with nothing to deliver.
    fn finish(&mut self, seq: u64, mark_done: bool) {
        let Some(pos) = self.entries.iter().position(|e| e.seq == seq) else { return };
        let Some(e) = self.entries.remove(pos) else { return };
        self.stats.batches -= 1;
        self.stats.bytes -= e.bytes;
        match e.stored {
            Stored::Memory(_) => self.stats.in_memory = self.stats.in_memory.saturating_sub(1),
            Stored::Disk { segment, .. } => {
                if let Some(s) = self.segments.iter_mut().find(|s| s.id == segment) {
                    s.pending = s.pending.saturating_sub(1);
                }
                let segment_bytes = self.segment_bytes();
                let gone = self.segments.front().is_some_and(|s| s.id == segment && s.deletable(segment_bytes));
                // The oldest segment is deleted right away, so its batch needs no `D` record.
                if mark_done && !gone {
                    self.scratch.clear();
                    encode_done(&mut self.scratch, seq);
                    match self.append_scratch() {
                        Ok(_) => {
                            if let Some(was) = self.done_error.take() {
                                tracing::info!(
                                    "outbox {}: delivered batches are recorded again (was: {was})",
                                    self.dir.display()
                                );
                            }
                        }
                        Err(e) => {
                            let why = e.to_string();
                            if self.done_error.as_deref() != Some(why.as_str()) {
                                // The batch may be sent again after a restart; nothing is lost.
                                tracing::warn!(
                                    "outbox {}: cannot record delivered batches ({why}); they may be sent again after a restart",
                                    self.dir.display()
                                );
                                self.done_error = Some(why);
                            }
                        }
                    }
                }
                self.delete_done_segments();
            }
        }
    }

    /// Delete segments, oldest first, that hold no batch still to deliver and that this run is
    /// not appending to; and, anywhere, empty ones this run no longer appends to.
    fn delete_done_segments(&mut self) {
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
    fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    fn enforce_limits(&mut self, now: Instant) {
        let mut dropped = 0u64;
        let mut why = "size";
        while let Some(front) = self.entries.front() {
            // The newest batch always stays, even when it alone is over the size bound.
            let too_big = self.stats.bytes.max(self.disk_bytes()) > self.limits.max_bytes && self.entries.len() > 1;
            let too_old = front.age(now) > self.limits.max_age;
            if !too_big && !too_old {
                break;
            }
            why = if too_big { "size" } else { "age" };
            let seq = front.seq;
            self.finish(seq, true);
            self.stats.dropped_total += 1;
            dropped += 1;
        }
        if dropped == 0 {
            return;
        }
        self.drops.unlogged += dropped;
        let due = self.drops.last_line.is_none_or(|at| now.saturating_duration_since(at) >= DROP_LOG_EVERY);
        if due {
            tracing::warn!(
                dropped_total = self.stats.dropped_total,
                "outbox over its {why} bound ({} bytes, {} s): dropped the {} oldest batches{} (summarised every {} min)",
                self.limits.max_bytes,
                self.limits.max_age.as_secs(),
                self.drops.unlogged,
                if self.drops.last_line.is_some() { " since the last report" } else { "" },
                DROP_LOG_EVERY.as_secs() / 60
            );
            self.drops = DropLog { last_line: Some(now), unlogged: 0 };
        }
    }

    /// New bounds (a config reload); applied from the next push.
    pub fn set_limits(&mut self, limits: OutboxLimits) {
        self.limits = limits;
    }

    /// Depth and counters.
    pub fn stats(&self) -> OutboxStats {
        self.stats
    }

    /// Whether batches are being kept in memory because the directory cannot be written.
    pub fn persist_error(&self) -> Option<&str> {
        self.persist_error.as_deref()
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The length of a batch's record, from its header fields.
fn record_len(seq: u64, timestamp: i64, body_len: u64) -> u64 {
    // Only the body's length matters, not its bytes.
    let digits = body_len.checked_ilog10().map_or(1, |d| u64::from(d) + 1);
    batch_record_len(seq, timestamp, b"") - 1 + digits + body_len
}

/// A short name for a kind of damage, for the one log line per segment.
fn kind_of(why: &Corrupt) -> &'static str {
    match why {
        Corrupt::Header => "without a valid header line",
        Corrupt::Torn => "torn write",
        Corrupt::Length { .. } => "with the wrong body length",
        Corrupt::Oversize { .. } => "declaring an impossible length",
        Corrupt::Checksum => "checksum mismatch",
    }
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

/// The segment at `path` opened to cut its torn tail (it was just read as a regular file).
fn file_for_cut(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    File::options().write(true).custom_flags(libc::O_NONBLOCK).open(path)
}

/// Keep the newest `keep` set-aside batches (and their reasons) in `folder`.
fn prune(folder: &Path, keep: usize) {
    let Ok(read) = std::fs::read_dir(folder) else {
        return;
    };
    let mut batches: Vec<PathBuf> =
        read.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "batch")).collect();
    if batches.len() <= keep {
        return;
    }
    batches.sort();
    for p in &batches[..batches.len() - keep] {
        let _ = std::fs::remove_file(p);
        let mut reason = p.clone().into_os_string();
        reason.push(".reason");
        let _ = std::fs::remove_file(reason);
    }
}

#[cfg(test)]
mod tests;
