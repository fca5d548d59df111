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

mod record;

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::io::{BufReader, Read as _, Seek as _, Write as _};
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

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

#[derive(Debug)]
enum LockError {
    /// Another process holds it; its pid, if the lock file says.
    InUse(Option<u32>),
    Io(std::io::Error),
}

/// Take the directory's `.lock` (an exclusive `flock`, released when the file is closed) and
/// write this process id into it, so that two agents never append to the same segments.
fn lock_dir(dir: &Path) -> Result<File, LockError> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join(".lock");
    let mut f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .map_err(LockError::Io)?;
    if !f.metadata().map_err(LockError::Io)?.is_file() {
        return Err(LockError::Io(std::io::Error::other("not a regular file")));
    }
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::WouldBlock {
            return Err(LockError::Io(e));
        }
        let mut holder = String::new();
        let _ = (&f).take(32).read_to_string(&mut holder);
        return Err(LockError::InUse(holder.trim().parse().ok()));
    }
    f.set_len(0).map_err(LockError::Io)?;
    writeln!(f, "{}", std::process::id()).map_err(LockError::Io)?;
    Ok(f)
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
mod tests {
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
    fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
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

    /// The open descriptors of this process whose file is under `dir`.
    fn fds_under(dir: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .expect("/proc/self/fd")
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.starts_with(dir))
            .count()
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
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

    #[test]
    fn survives_reopen_in_order_and_forgets_delivered_batches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut o = Outbox::open(dir.path(), LIMITS, 100);
        for i in 0..3 {
            o.push(100 + i64::from(i), body(i));
        }
        assert_eq!(o.stats().batches, 3);
        drop(o);
        let mut o = Outbox::open(dir.path(), LIMITS, 103);
        assert_eq!(o.stats().batches, 3);
        let (seq, b) = o.oldest().expect("oldest");
        assert_eq!(b, body(0));
        o.remove(seq);
        assert_eq!(o.oldest().map(|(_, b)| b), Some(body(1)));
        o.push(104, body(9));
        let pending: Vec<i64> = inspect(dir.path()).expect("inspect").iter().map(|b| b.timestamp).collect();
        assert_eq!(pending, [101, 102, 104]);
        drop(o);
        let mut o = Outbox::open(dir.path(), LIMITS, 105);
        assert_eq!(drain(&mut o), [body(1), body(2), body(9)]);
        assert_eq!(o.stats(), OutboxStats::default());
        drop(o);
        // Everything delivered: at most the last run's segment is left, holding nothing.
        let o = Outbox::open(dir.path(), LIMITS, 106);
        assert_eq!(o.stats(), OutboxStats::default());
        assert!(segments(dir.path()).is_empty(), "{:?}", segments(dir.path()));
    }

    #[test]
    fn the_happy_path_is_one_write_per_batch_and_one_per_ack() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut o = Outbox::open(dir.path(), LIMITS, 0);
        for i in 0..10 {
            o.push(i64::from(i), body(i));
            assert!(!o.backlog_needs_sync(), "a lone batch waits for no fsync");
            let (seq, _) = o.oldest().expect("batch");
            o.remove(seq);
        }
        let segs = segments(dir.path());
        assert_eq!(segs.len(), 1);
        let data = std::fs::read(&segs[0]).expect("read");
        let records = parse_segment(&data);
        assert_eq!(records.len(), 20);
        assert!(records.iter().all(|r| !matches!(r, Record::Damaged { .. })));
    }

    #[test]
    fn a_waiting_batch_asks_for_fsync_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut o = Outbox::open(dir.path(), LIMITS, 0);
        o.push(1, body(1));
        let job = o.sync_job().expect("unsynced");
        assert!(job.dir_needed, "a new segment needs its directory entry synced");
        o.push(2, body(2));
        assert!(o.backlog_needs_sync());
        let result = job.run();
        o.sync_finished(&job, result);
        assert!(o.backlog_needs_sync(), "batch 2 was written after the job was made");
        let job = o.sync_job().expect("unsynced");
        assert!(!job.dir_needed);
        o.sync_finished(&job, Err(std::io::Error::other("EIO")));
        assert!(o.backlog_needs_sync(), "a failed fsync leaves the data due");
        let result = job.run();
        o.sync_finished(&job, result);
        assert!(!o.backlog_needs_sync());
        assert!(o.sync_job().is_none());
    }

    #[test]
    fn torn_tail_and_corrupt_record_are_set_aside_once_and_the_rest_delivered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut o = Outbox::open(dir.path(), LIMITS, 100);
        for i in 0..4 {
            o.push(100, body(i));
        }
        drop(o);
        let seg = &segments(dir.path())[0];
        let mut data = std::fs::read(seg).expect("read");
        let lines: Vec<usize> = data.iter().enumerate().filter(|(_, b)| **b == b'\n').map(|(i, _)| i).collect();
        // Record 1's body is lines 2..3; flip a byte in it. Cut record 3 in half.
        data[lines[2] + 3] ^= 0x20;
        data.truncate(lines[5] + 10);
        std::fs::write(seg, &data).expect("write");

        let o = Outbox::open(dir.path(), LIMITS, 100);
        assert_eq!(o.stats().corrupt_total, 2);
        assert_eq!(std::fs::metadata(seg).expect("segment").len(), (lines[5] + 1) as u64, "torn tail cut off");
        drop(o);
        let mut o = Outbox::open(dir.path(), LIMITS, 100);
        assert_eq!(o.stats().corrupt_total, 0, "damage already reported is not counted again");
        assert_eq!(drain(&mut o), [body(0), body(2)]);
        assert_eq!(std::fs::read_dir(dir.path().join("corrupt")).expect("corrupt/").count(), 4, "2 copies + 2 reasons");
        assert!(!seg.exists(), "a delivered segment of an earlier run is deleted");
    }

    #[test]
    fn segments_rotate_and_are_deleted_oldest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut o = Outbox::open(dir.path(), LIMITS, 0);
        let big = Bytes::from(format!("\"{}\"", "x".repeat(300_000)));
        for i in 0..10 {
            o.push(i, big.clone());
        }
        let before = segments(dir.path()).len();
        assert!(before >= 3, "{before} segments for 3 MB");
        // Deliver half: the fully delivered segments go, in order.
        for _ in 0..5 {
            let (seq, _) = o.oldest().expect("batch");
            o.remove(seq);
        }
        let after = segments(dir.path()).len();
        assert!(after < before && after >= 2, "{before} -> {after}");
        drop(o);
        let mut o = Outbox::open(dir.path(), LIMITS, 0);
        assert_eq!(o.stats().batches, 5);
        assert_eq!(drain(&mut o).len(), 5);
        drop(o);
        drop(Outbox::open(dir.path(), LIMITS, 0));
        assert!(segments(dir.path()).is_empty());
    }

    #[test]
    fn size_and_age_limits_drop_the_oldest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = batch_record_len(0, 1000, &body(0));
        let t0 = Instant::now();
        let limits = OutboxLimits { max_bytes: one * 2, max_age: Duration::from_secs(60) };
        let mut o = Outbox::open_at(dir.path().into(), limits, 1000, t0);
        for i in 0..3 {
            o.push_at(1000, body(i), t0);
        }
        assert_eq!(o.stats().batches, 2);
        assert_eq!(o.stats().dropped_total, 1);
        assert_eq!(o.oldest().map(|(_, b)| b), Some(body(1)));
        o.push_at(1061, body(7), t0 + Duration::from_secs(61)); // the two at t0 have waited 61 s
        assert_eq!(o.stats().batches, 1);
        assert_eq!(o.stats().dropped_total, 3);
        drop(o);
        let pending: Vec<i64> = inspect(dir.path()).expect("inspect").iter().map(|b| b.timestamp).collect();
        assert_eq!(pending, [1061], "dropped batches stay dropped after a restart");
        let mut o = Outbox::open(dir.path(), OutboxLimits { max_bytes: 10, max_age: Duration::from_secs(60) }, 1061);
        o.push(1062, body(8));
        assert_eq!(o.oldest().map(|(_, b)| b), Some(body(8)), "a batch over the bound on its own is still kept");
    }

    #[test]
    fn unwritable_directory_keeps_batches_in_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let not_a_dir = dir.path().join("file");
        std::fs::write(&not_a_dir, "x").expect("write");
        let mut o = Outbox::open(not_a_dir.join("outbox"), LIMITS, 0);
        assert!(o.persist_error().is_some());
        o.push(1, body(1));
        o.push(2, body(2));
        assert_eq!(o.stats().in_memory, 2);
        assert!(o.sync_job().is_none());
        let (seq, b) = o.oldest().expect("in memory");
        assert_eq!(b, body(1));
        o.remove(seq);
        assert_eq!(o.stats().batches, 1);
        assert_eq!(o.stats().in_memory, 1);
    }

    #[test]
    fn a_second_outbox_on_the_same_directory_stays_in_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut first = Outbox::open(dir.path(), LIMITS, 0);
        first.push(1, body(1));
        let mut second = Outbox::open(dir.path(), LIMITS, 0);
        let why = second.persist_error().expect("locked out").to_owned();
        assert!(why.contains(&format!("pid {}", std::process::id())), "{why}");
        second.push(2, body(2));
        assert_eq!(second.stats().in_memory, 1);
        assert_eq!(inspect(dir.path()).expect("inspect").len(), 1, "the second one wrote nothing");
        drop(first);
        drop(second);
        let third = Outbox::open(dir.path(), LIMITS, 0);
        assert!(third.persist_error().is_none(), "the lock goes with its holder");
        assert_eq!(third.stats().batches, 1);
    }

    #[test]
    fn a_body_with_a_raw_newline_is_kept_in_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut o = Outbox::open(dir.path(), LIMITS, 0);
        o.push(1, Bytes::from_static(b"{\n}"));
        assert_eq!(o.stats().in_memory, 1);
        assert!(o.persist_error().is_some_and(|e| e.contains("newline")), "{:?}", o.persist_error());
        o.push(2, body(2));
        assert!(o.persist_error().is_none());
        assert_eq!(drain(&mut o), [Bytes::from_static(b"{\n}"), body(2)]);
    }

    #[test]
    fn rejected_batches_are_kept_aside_with_the_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut o = Outbox::open(dir.path(), LIMITS, 0);
        for i in 0..6 {
            o.push(i, body(u32::try_from(i).expect("small")));
        }
        // The 6th is read back from disk (not cached): reject the first five, then it.
        for _ in 0..6 {
            let (seq, _) = o.oldest().expect("oldest");
            o.reject(seq, "422: metrics.0.labels.x: expected a string");
        }
        assert_eq!(o.stats().rejected_total, 6);
        assert_eq!(o.stats().batches, 0);
        let reason =
            std::fs::read_to_string(dir.path().join("rejected/0000000000000005-5.batch.reason")).expect("reason");
        assert!(reason.contains("expected a string"));
        let kept = std::fs::read(dir.path().join("rejected/0000000000000005-5.batch")).expect("body");
        assert_eq!(kept, body(5));
    }

    // Issue 14 (a): a FIFO named like a segment blocked `open` forever.
    #[test]
    fn a_fifo_or_a_device_named_like_a_segment_is_ignored_and_blocks_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut o = Outbox::open(dir.path(), LIMITS, 0);
        o.push(1, body(1));
        drop(o);
        let fifo = dir.path().join("00000000000000f0.seg");
        mkfifo(&fifo);
        let zero = dir.path().join("00000000000000f1.seg");
        std::os::unix::fs::symlink("/dev/zero", &zero).expect("symlink");
        let path = dir.path().to_owned();
        let (mut o, log) = within_20s(move || logged(|| Outbox::open(path, LIMITS, 0))).expect("open hung");
        assert!(log.contains(&format!("{} is a FIFO, expected a regular file", fifo.display())), "{log}");
        assert!(log.contains(&format!("{} is a character device", zero.display())), "{log}");
        assert_eq!(drain(&mut o), [body(1)]);
        assert_eq!(o.stats().corrupt_total, 0, "not a segment, so no batch of it is lost");
        let path = dir.path().to_owned();
        assert_eq!(within_20s(move || inspect(&path).map(|b| b.len())).expect("inspect hung").expect("inspect"), 0);
        assert!(fifo.exists() && zero.exists(), "left for an operator");
    }

    // Issue 14 (b): a huge file, or a huge declared length, was read until out of memory.
    #[test]
    fn a_huge_segment_or_declared_length_is_not_read_into_memory() {
        let mut seg = Vec::new();
        encode_batch(&mut seg, 0, 1, b"{}");
        let huge = format!("DCMB2 B 0000000000000001 1 {} 0badf00d\n{{}}\n", u64::MAX / 2);
        seg.extend_from_slice(huge.as_bytes());
        encode_batch(&mut seg, 2, 1, b"{}");
        let records = parse_segment(&seg);
        assert!(
            matches!(
                records[..],
                [
                    Record::Batch { seq: 0, .. },
                    Record::Damaged { why: Corrupt::Oversize { declared, max: MAX_BODY_BYTES }, len, .. },
                    Record::Batch { seq: 2, .. }
                ] if declared == u64::MAX / 2 && len == huge.len()
            ),
            "{records:?}"
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let mut o = Outbox::open(dir.path(), LIMITS, 0);
        o.push(1, body(1));
        drop(o);
        // Sparse: no disk space, and no time to read.
        let big = dir.path().join("00000000000000f0.seg");
        File::create(&big).and_then(|f| f.set_len(SEGMENT_READ_MAX + 1)).expect("sparse file");
        let (mut o, log) = logged(|| Outbox::open(dir.path(), LIMITS, 0));
        assert!(log.contains("more than a segment can be") && log.contains(&big.display().to_string()), "{log}");
        assert!(!big.exists() && dir.path().join("corrupt/00000000000000f0.seg.oversized").exists());
        assert_eq!(o.stats().corrupt_total, 1);
        assert_eq!(drain(&mut o), [body(1)]);
    }

    // Issue 14 (c): deleting the directory lost every batch and the exit log said otherwise.
    #[test]
    fn a_deleted_directory_is_recreated_and_its_batches_rewritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = dir.path().join("outbox");
        let mut o = Outbox::open(&outbox, LIMITS, 0);
        for i in 0..6 {
            o.push(i, body(u32::try_from(i).expect("small"))); // the last two are not cached
        }
        std::fs::remove_dir_all(&outbox).expect("rm -r");
        let ((), log) = logged(|| o.push(6, body(6)));
        assert_eq!(log.matches("deleted while the agent ran").count(), 1, "{log}");
        assert!(log.contains("recreated it and rewrote the 6 batches still readable, 0 could not"), "{log}");
        let stored: Vec<i64> = inspect(&outbox).expect("recreated").iter().map(|b| b.timestamp).collect();
        assert_eq!(stored, [0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(o.stats().in_memory, 0);

        // Deleted after the last push: noticed at shutdown (sync_now), before the exit report.
        std::fs::remove_dir_all(&outbox).expect("rm -r");
        o.sync_now();
        assert_eq!(inspect(&outbox).expect("recreated").len(), 7);
        drop(o);
        let mut o = Outbox::open(&outbox, LIMITS, 0);
        assert!(o.persist_error().is_none(), "the lock was taken again in the new directory: {:?}", o.persist_error());
        assert_eq!(drain(&mut o), (0..7).map(body).collect::<Vec<_>>());
    }

    // Issue 14 (d): a full disk cost an empty segment file and a descriptor per batch.
    #[test]
    fn a_full_disk_costs_no_file_or_descriptor_per_batch() {
        if !is_root() {
            eprintln!("skipped: mounting a small tmpfs needs root");
            return;
        }
        let fs = SmallFs::mount("64k");
        let outbox = fs.0.path().join("outbox");
        let mut o = Outbox::open(&outbox, LIMITS, 0);
        let big = Bytes::from(format!("\"{}\"", "x".repeat(3000)));
        for i in 0..60 {
            o.push(i, big.clone());
        }
        assert!(o.stats().in_memory > 30, "the disk filled up: {:?}", o.stats());
        assert!(o.persist_error().is_some_and(|e| e.contains("No space left")), "{:?}", o.persist_error());
        assert_eq!(segments(&outbox).len(), 1, "{:?}", segments(&outbox));
        assert!(fds_under(fs.0.path()) <= 2, "segment + lock, got {}", fds_under(fs.0.path()));
        let got = drain(&mut o);
        assert_eq!(got.len(), 60);
        assert_eq!(o.stats(), OutboxStats { corrupt_total: 0, ..OutboxStats::default() });
    }

    // Issue 14 (e): records written after a truncation landed elsewhere and were lost.
    #[test]
    fn a_segment_truncated_underneath_is_noticed_and_later_batches_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut o = Outbox::open(dir.path(), LIMITS, 0);
        for i in 0..6 {
            o.push(i, body(u32::try_from(i).expect("small"))); // 0..3 cached, 4 and 5 not
        }
        let seg = &segments(dir.path())[0];
        let one = batch_record_len(0, 0, &body(0));
        File::options().write(true).open(seg).and_then(|f| f.set_len(3 * one + 5)).expect("truncate");
        let ((), log) = logged(|| {
            for i in 6..13 {
                o.push(i, body(u32::try_from(i).expect("small")));
            }
        });
        assert!(log.contains("changed underneath the agent"), "{log}");
        assert!(log.contains("rewrote 1 batches into a new segment, 2 could not be read back"), "{log}");
        assert_eq!(o.stats().corrupt_total, 2, "batches 4 and 5 were only on disk, and are counted");
        let want: Vec<Bytes> = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12].into_iter().map(body).collect();
        let stored: Vec<i64> = inspect(dir.path()).expect("inspect").iter().map(|b| b.timestamp).collect();
        assert_eq!(stored, [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(drain(&mut o), want);
        assert_eq!(o.stats().corrupt_total, 2, "nothing written after the truncation was damaged");
    }

    // Issue 14 (f): a second agent ran anyway, in memory, and sent every batch twice.
    #[test]
    fn open_exclusive_refuses_an_outbox_in_use_naming_the_directory_and_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Outbox::open_exclusive(dir.path(), LIMITS, 0).expect("free");
        let lock = std::fs::read_to_string(dir.path().join(".lock")).expect("lock file");
        assert_eq!(lock.trim(), std::process::id().to_string());
        let err = Outbox::open_exclusive(dir.path(), LIMITS, 0).expect_err("in use");
        assert_eq!(err, OutboxInUse { dir: dir.path().to_owned(), pid: Some(std::process::id()) });
        let msg = err.to_string();
        assert!(
            msg.contains(&dir.path().display().to_string()) && msg.contains(&format!("pid {}", std::process::id()))
        );
        drop(first);
        assert!(Outbox::open_exclusive(dir.path(), LIMITS, 0).is_ok());
    }

    // Issue 14 (g): stepping the wall clock 8 days forward dropped the whole backlog.
    #[test]
    fn a_wall_clock_step_never_drops_batches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let week = Duration::from_secs(7 * 24 * 3600);
        let limits = OutboxLimits { max_bytes: 1 << 30, max_age: week };
        let (t0, eight_days) = (Instant::now(), 8 * 24 * 3600);
        let mut o = Outbox::open_at(dir.path().into(), limits, 1000, t0);
        for i in 0..5 {
            o.push_at(1000 + i, body(u32::try_from(i).expect("small")), t0 + Duration::from_secs(i as u64));
        }
        o.push_at(1000 + eight_days, body(9), t0 + Duration::from_secs(5));
        assert_eq!(o.stats().batches, 6, "a clock step drops nothing");
        assert_eq!(o.stats().dropped_total, 0);
        // Waiting does: the first batch was queued at t0.
        o.push_at(1000 + eight_days + 1, body(10), t0 + week + Duration::from_secs(1));
        assert_eq!(o.stats().dropped_total, 1);
        drop(o);
        // At open, age comes from the wall clock, once.
        let later = Instant::now();
        let mut o =
            Outbox::open_at(dir.path().into(), limits, 1000 + i64::try_from(week.as_secs()).expect("week") + 2, later);
        assert_eq!(o.stats().dropped_total, 1, "batch 1 (1001) was over a week old at open");
        assert_eq!(o.stats().batches, 5);
        o.push_at(5, body(11), later + Duration::from_secs(1));
        assert_eq!(o.stats().dropped_total, 2, "batch 2 (1002) is now over a week old");
    }

    // Issue 14 (h) and issue 22: the files on disk outgrew outbox_max_bytes; the byte count
    // after a delivery and the bound at exactly max_bytes were never checked.
    #[test]
    fn the_files_on_disk_stay_within_the_size_bound() {
        let one = batch_record_len(0, 1000, &fixed(0));
        for (max_bytes, fits) in [(8 * one, 8), (8 * one - 1, 7)] {
            let dir = tempfile::tempdir().expect("tempdir");
            let limits = OutboxLimits { max_bytes, max_age: Duration::from_secs(3600) };
            let mut o = Outbox::open(dir.path(), limits, 1000);
            for i in 0..8 {
                o.push(1000, fixed(i));
                assert!(segment_bytes_on_disk(dir.path()) <= max_bytes);
            }
            assert_eq!(o.stats().batches, fits, "bound {max_bytes}, records of {one}");
            assert_eq!(o.stats().bytes, fits * one);
            assert_eq!(o.stats().dropped_total, 8 - fits);
            // An outage with deliveries now and then: the bound holds for the files too.
            for i in 8..200 {
                o.push(1000, fixed(i));
                if i % 3 == 0 {
                    let (seq, _) = o.oldest().expect("queued");
                    o.remove(seq);
                }
                let on_disk = segment_bytes_on_disk(dir.path());
                assert!(on_disk <= max_bytes, "{on_disk} bytes on disk, bound {max_bytes}");
                assert_eq!(o.stats().bytes, o.stats().batches * one, "after push {i}");
            }
            let left = o.stats().batches;
            let (seq, _) = o.oldest().expect("queued");
            o.remove(seq);
            assert_eq!(o.stats().bytes, (left - 1) * one, "a delivery subtracts its record");
        }
    }

    // Issue 14 (i): one WARN line per dropped batch.
    #[test]
    fn drops_are_logged_once_then_summarised() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = batch_record_len(0, 1000, &fixed(0));
        let t0 = Instant::now();
        let limits = OutboxLimits { max_bytes: 4 * one, max_age: Duration::from_secs(3600) };
        let mut o = Outbox::open_at(dir.path().into(), limits, 1000, t0);
        let ((), log) = logged(|| {
            for i in 0..120 {
                o.push_at(1000, fixed(i), t0 + Duration::from_secs(u64::from(i)));
            }
        });
        assert_eq!(o.stats().dropped_total, 116);
        assert_eq!(log.lines().filter(|l| l.contains("dropped")).count(), 1, "{log}");
        // The first drop (the 5th push, at t0 + 4 s) was logged; the next 116 are summarised.
        let ((), log) = logged(|| o.push_at(1000, fixed(999), t0 + Duration::from_secs(4) + DROP_LOG_EVERY));
        assert!(log.contains("dropped the 116 oldest batches since the last report"), "{log}");
    }

    // Issue 14 (i): 1,004 damaged records were 1,004 WARN lines.
    #[test]
    fn the_damage_in_a_segment_is_logged_in_one_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seg = Vec::new();
        encode_batch(&mut seg, 0, 1, b"{}");
        for i in 0..1000u64 {
            let mut done = Vec::new();
            encode_done(&mut done, i);
            done[10] ^= 1; // in the seq: the checksum no longer matches
            seg.extend_from_slice(&done);
        }
        seg.extend_from_slice(b"garbage\n");
        seg.extend_from_slice(b"DCMB2 B 00000000000003e9 1 two 00000000\n{}\n");
        encode_batch(&mut seg, 2, 1, b"{}");
        seg.extend_from_slice(b"DCMB2 B 00000000000003ea 1 2 00000000\n{}\n");
        seg.extend_from_slice(b"DCMB2 B 00000000000003eb 1 2 0000");
        std::fs::write(dir.path().join("0000000000000000.seg"), &seg).expect("segment");
        let (mut o, log) = logged(|| Outbox::open(dir.path(), LIMITS, 0));
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
        assert_eq!(lines.len(), 1, "{log}");
        assert!(
            lines[0].contains("1004 damaged record(s)")
                && lines[0].contains("1001 checksum mismatch")
                && lines[0].contains("2 without a valid header line")
                && lines[0].contains("1 torn write"),
            "{log}"
        );
        assert_eq!(o.stats().corrupt_total, 1004);
        assert_eq!(drain(&mut o), [Bytes::from_static(b"{}"), Bytes::from_static(b"{}")]);
        assert_eq!(std::fs::read_dir(dir.path().join("corrupt")).expect("corrupt/").count(), 2 * SET_ASIDE_KEEP);
    }

    // Issue 14 (i): memory mode said "not locked for this agent" instead of the real cause.
    #[test]
    fn memory_mode_reports_the_real_cause() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = Outbox::open(dir.path(), LIMITS, 0);
        let mut second = Outbox::open(dir.path(), LIMITS, 0);
        second.push(1, body(1));
        let why = second.persist_error().expect("memory mode");
        assert!(why.contains(&format!("another dcmon-agent (pid {})", std::process::id())), "{why}");
    }

    /// Segment 0 holding `seg`, opened: what it delivers, and the one file in `corrupt/`.
    fn open_damaged(seg: &[u8]) -> (Vec<Bytes>, Vec<u8>, OutboxStats) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("0000000000000000.seg"), seg).expect("segment");
        let mut o = Outbox::open(dir.path(), LIMITS, 0);
        let stats = o.stats();
        let got = drain(&mut o);
        let copies: Vec<PathBuf> = std::fs::read_dir(dir.path().join("corrupt"))
            .expect("corrupt/")
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "batch"))
            .collect();
        assert_eq!(copies.len(), 1, "{copies:?}");
        (got, std::fs::read(&copies[0]).expect("copy"), stats)
    }

    // Issue 22: the length of a damaged record was never checked (a too-long one would panic
    // in the copy to corrupt/).
    #[test]
    fn each_kind_of_damage_is_copied_exactly_and_the_rest_delivered() {
        let done_of = |seq: u64, flip: Option<usize>| {
            let mut d = Vec::new();
            encode_done(&mut d, seq);
            if let Some(i) = flip {
                d[i] ^= 1;
            }
            d
        };
        let mut body_cut = Vec::new();
        encode_batch(&mut body_cut, 7, 1, b"{\"cut\":1}");
        body_cut.truncate(body_cut.len() - 4);
        let mut bad_body = Vec::new();
        encode_batch(&mut bad_body, 7, 1, b"{\"b\":1}");
        let n = bad_body.len();
        bad_body[n - 3] ^= 1;
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            ("batch header fields that do not parse", b"DCMB2 B 0000000000000007 one 2 00000000\n{}\n".to_vec(), true),
            ("garbage line", b"not a record\nnor this\n".to_vec(), true),
            ("body length differs", b"DCMB2 B 0000000000000007 1 5 00000000\n{}\n".to_vec(), true),
            ("body checksum", bad_body, true),
            ("done checksum", done_of(0, Some(20)), true),
            ("done seq not hex", b"DCMB2 D 000000000000000g 00000000\n".to_vec(), true),
            ("done crc not hex", b"DCMB2 D 0000000000000000 0000000z\n".to_vec(), true),
            ("done with a field missing", b"DCMB2 D 0000000000000000\n".to_vec(), true),
            ("body cut after a complete header", body_cut, false),
        ];
        for (what, damage, then_intact) in cases {
            let mut seg = Vec::new();
            encode_batch(&mut seg, 0, 1, b"{\"a\":0}");
            seg.extend_from_slice(&damage);
            if then_intact {
                encode_batch(&mut seg, 2, 1, b"{\"c\":2}");
            }
            let (got, copy, stats) = open_damaged(&seg);
            assert_eq!(copy, damage, "{what}: the copy holds exactly the damaged bytes");
            assert_eq!(stats.corrupt_total, 1, "{what}");
            let mut want = vec![Bytes::from_static(b"{\"a\":0}")];
            if then_intact {
                want.push(Bytes::from_static(b"{\"c\":2}"));
            }
            assert_eq!(got, want, "{what}");
        }
    }

    // Issue 22: a bit flip in a done record could mark another, undelivered batch done.
    #[test]
    fn a_flipped_done_record_never_drops_another_batch() {
        let mut seg = Vec::new();
        encode_batch(&mut seg, 0, 1, b"{\"a\":0}");
        encode_batch(&mut seg, 1, 1, b"{\"a\":1}");
        let mut done = Vec::new();
        encode_done(&mut done, 0);
        done[23] ^= 1; // seq ...0000 -> ...0001, checksum still of seq 0
        assert_eq!(&done[8..24], b"0000000000000001");
        seg.extend_from_slice(&done);
        let (got, copy, _) = open_damaged(&seg);
        assert_eq!(copy, done);
        assert_eq!(got, [Bytes::from_static(b"{\"a\":0}"), Bytes::from_static(b"{\"a\":1}")], "1 kept; 0 sent again");
    }

    // Issue 22: the checksum of a batch read back for sending was never exercised.
    #[test]
    fn a_body_damaged_on_disk_after_open_is_set_aside_never_sent_never_marked_done() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut o = Outbox::open(dir.path(), LIMITS, 0);
        for i in 0..6 {
            o.push(i, body(u32::try_from(i).expect("small"))); // 4 and 5 are read back from disk
        }
        let seg = segments(dir.path())[0].clone();
        let one = batch_record_len(0, 0, &body(0));
        let mut data = std::fs::read(&seg).expect("read");
        let at = usize::try_from(5 * one - 3).expect("small"); // in batch 4's body
        data[at] ^= 0x01;
        std::fs::File::options()
            .write(true)
            .open(&seg)
            .and_then(|f| f.write_all_at(&data[at..=at], at as u64))
            .expect("flip");
        let got = drain(&mut o);
        assert_eq!(got, [0, 1, 2, 3, 5].into_iter().map(body).collect::<Vec<_>>());
        assert_eq!(o.stats().corrupt_total, 1);
        let copy =
            std::fs::read(dir.path().join(format!("corrupt/0000000000000000-at{:010}.batch", 4 * one))).expect("copy");
        assert_eq!(copy, data[usize::try_from(4 * one).expect("small")..usize::try_from(5 * one).expect("small")]);
        let after = std::fs::read(&seg).expect("read");
        let records = parse_segment(&after);
        assert!(!records.iter().any(|r| matches!(r, Record::Done { seq: 4 })), "{records:?}");
        drop(o);
        let mut o = Outbox::open(dir.path(), LIMITS, 0);
        assert_eq!(o.stats().corrupt_total, 0, "the same damage found at open is already reported");
        assert!(drain(&mut o).is_empty());
    }

    /// Issue 14's fuzzing: any sequence of pushes, deliveries, rejections, crashes and cut
    /// files loses nothing inside the bounds, and reports every loss outside them.
    mod property {
        use std::collections::HashMap;

        use proptest::prelude::*;

        use super::*;

        #[derive(Debug, Clone)]
        enum Op {
            /// A batch with this much padding.
            Push(usize),
            Deliver,
            Reject,
            /// Drop the outbox without a shutdown (kill -9) and open it again.
            Crash,
            /// Truncate a segment (picked by the number) at this many thousandths of its length.
            Cut(usize, u64),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => (0usize..600).prop_map(Op::Push),
                3 => Just(Op::Deliver),
                1 => Just(Op::Reject),
                1 => Just(Op::Crash),
                1 => (any::<usize>(), 0u64..1000).prop_map(|(s, at)| Op::Cut(s, at)),
            ]
        }

        /// What an outbox instance counted as lost.
        fn counted(o: &Outbox) -> u64 {
            o.stats().dropped_total + o.stats().corrupt_total
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]
            #[test]
            fn every_batch_pushed_is_delivered_queued_or_counted(
                ops in prop::collection::vec(op(), 1..48),
                small_bound in any::<bool>(),
            ) {
                let dir = tempfile::tempdir().expect("tempdir");
                let max_bytes = if small_bound { 4096 } else { 1 << 30 };
                let limits = OutboxLimits { max_bytes, max_age: Duration::from_secs(86_400) };
                let mut o = Outbox::open(dir.path(), limits, 0);
                let mut pushed: HashMap<Bytes, usize> = HashMap::new();
                let mut delivered: Vec<usize> = Vec::new();
                let mut reported = 0u64;
                let mut at_risk: HashSet<usize> = HashSet::new();
                let mut cuts = 0;
                for op in ops {
                    match op {
                        Op::Push(pad) => {
                            let n = pushed.len();
                            let b = Bytes::from(format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(pad)));
                            pushed.insert(b.clone(), n);
                            o.push(0, b);
                        }
                        Op::Deliver | Op::Reject => {
                            if let Some((seq, b)) = o.oldest() {
                                let n = pushed.get(&b).copied();
                                prop_assert!(n.is_some(), "delivered a body never pushed: {b:?}");
                                delivered.push(n.unwrap_or_default());
                                if matches!(op, Op::Reject) { o.reject(seq, "422: no") } else { o.remove(seq) }
                            }
                        }
                        Op::Crash => {
                            reported += counted(&o);
                            drop(o);
                            o = Outbox::open(dir.path(), limits, 0);
                        }
                        Op::Cut(pick, thousandths) => {
                            let segs = segments(dir.path());
                            if segs.is_empty() { continue; }
                            let seg = &segs[pick % segs.len()];
                            let data = std::fs::read(seg).expect("read segment");
                            let cut = data.len() as u64 * thousandths / 1000;
                            for r in parse_segment(&data) {
                                if let Record::Batch { body_offset, body, .. } = r
                                    && (body_offset + body.len() + 1) as u64 > cut
                                    && let Some(n) = pushed.get(body)
                                {
                                    at_risk.insert(*n);
                                }
                            }
                            File::options().write(true).open(seg).and_then(|f| f.set_len(cut)).expect("cut");
                            cuts += 1;
                        }
                    }
                }
                reported += counted(&o);
                drop(o);
                let mut o = Outbox::open(dir.path(), limits, 0);
                while let Some((seq, b)) = o.oldest() {
                    let n = pushed.get(&b).copied();
                    prop_assert!(n.is_some(), "delivered a body never pushed: {b:?}");
                    delivered.push(n.unwrap_or_default());
                    o.remove(seq);
                }
                reported += counted(&o);

                let seen: HashSet<usize> = delivered.iter().copied().collect();
                let lost: Vec<usize> = (0..pushed.len()).filter(|n| !seen.contains(n)).collect();
                if cuts == 0 {
                    prop_assert_eq!(seen.len(), delivered.len(), "nothing delivered twice: {:?}", delivered);
                    prop_assert!(delivered.windows(2).all(|w| w[0] < w[1]), "in order: {:?}", delivered);
                    prop_assert_eq!(lost.len() as u64, reported, "every loss is a counted drop: lost {:?}", lost);
                    if !small_bound {
                        prop_assert!(lost.is_empty(), "nothing lost inside the bounds: {:?}", lost);
                    }
                } else {
                    // A cut can destroy batches before the outbox looks (a crash right after it);
                    // every other loss is counted.
                    let unexplained = lost.iter().filter(|n| !at_risk.contains(n)).count() as u64;
                    prop_assert!(unexplained <= reported, "lost {:?}, at risk of a cut {:?}, counted {}", lost, at_risk, reported);
                }
            }
        }
    }
}
