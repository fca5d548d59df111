//! Opening an outbox: its lock, and the index of what earlier runs left (their segments read
//! record by record, damage set aside, torn tails cut off).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::{BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::lock::{LockError, lock_dir};
use super::queue::DropLog;
use super::record::{Corrupt, Found, RecordReader, record_len};
use super::segment::{
    OPEN_SEGMENTS_MAX, SEGMENT_READ_MAX, Segment, file_for_cut, identity, list_segments, open_regular,
};
use super::{DCMON_OUTPUT, Entry, Outbox, OutboxInUse, OutboxLimits, OutboxStats, Stored};

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
    for (_, path) in list_segments(dir).map_err(naming(dir))? {
        let file = match open_regular(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => continue,
            Err(e) => return Err(naming(&path)(e)),
        };
        let mut reader = RecordReader::new(BufReader::new(file.take(SEGMENT_READ_MAX)));
        while let Some(found) = reader.next_record().map_err(naming(&path))? {
            match found {
                Found::Batch { seq, timestamp, body_len, .. } => {
                    batches.push(StoredBatch { seq, timestamp, bytes: body_len });
                }
                Found::Done { seq } => {
                    done.insert(seq);
                }
                // Cursors say which outputs still have a batch to send; it waits until all do.
                Found::Cursor { .. } | Found::Damaged { .. } => {}
            }
        }
    }
    batches.retain(|b| !done.contains(&b.seq));
    batches.sort_by_key(|b| b.seq);
    Ok(batches)
}

/// The error `e` with the file or directory it is about in front, its kind kept.
fn naming(path: &Path) -> impl FnOnce(std::io::Error) -> std::io::Error + '_ {
    move |e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
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

    pub(super) fn open_at(dir: PathBuf, limits: OutboxLimits, now_unix: i64, now: Instant) -> Self {
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
            outputs: vec![DCMON_OUTPUT.to_owned()],
            cursors: BTreeMap::new(),
            output_stats: BTreeMap::new(),
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
    pub(super) fn take_lock(&mut self) -> bool {
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
            // The agent numbers segments from 0; the last number there is can only be a name
            // someone else gave a file. Its batches are read; new segments are not numbered past it.
            match id.checked_add(1) {
                Some(next) => self.next_segment = self.next_segment.max(next),
                None => tracing::warn!(
                    "outbox: {} has the last segment number there is; new segments are numbered after the others",
                    path.display()
                ),
            }
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
                    Ok(Some(Found::Cursor { output, seq })) => {
                        // Cursors only move forward; the highest one found is where it got.
                        let next = seq.saturating_add(1);
                        let cursor = self.cursors.entry(output).or_insert(next);
                        *cursor = (*cursor).max(next);
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
        // New batches must be numbered past every cursor, or an output would take them for
        // done: a cursor record can outlive the batch records it covers (their segment deleted).
        if let Some(&cursor) = self.cursors.values().max() {
            self.next_seq = self.next_seq.max(cursor);
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
}
