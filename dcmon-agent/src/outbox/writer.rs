//! Appending: a batch record in one `write(2)` to the current segment (a new one when it is
//! full), checked against changes underneath the agent; memory when the directory cannot be
//! written.

use std::fs::File;
use std::io::{Seek as _, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::record::{MAX_BODY_BYTES, encode_batch};
use super::segment::Segment;
use super::{CACHED_BATCHES, Entry, Outbox, Stored};

/// Why an append did not happen.
#[derive(Debug)]
pub(super) enum AppendFailure {
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

impl Outbox {
    /// Store a batch collected at `timestamp`: one write to the current segment (see the module
    /// docs for when it is fsynced). If the directory cannot be written it is kept in memory,
    /// and the reason logged. With no output configured (only the scrape endpoint), nothing
    /// would ever deliver it: it is not stored.
    pub fn push(&mut self, timestamp: i64, body: Bytes) {
        if self.outputs.is_empty() {
            return;
        }
        self.push_at(timestamp, body, Instant::now());
    }

    pub(super) fn push_at(&mut self, timestamp: i64, body: Bytes, now: Instant) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.scratch.clear();
        let crc = encode_batch(&mut self.scratch, seq, timestamp, &body);
        let header_len = self.scratch.len() - body.len() - 1;
        let written = if memchr::memchr(b'\n', &body).is_some() {
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

    /// Append `data` as one write to the writable segment, checking first that the file is
    /// still there and as long as this run left it, and after that the write landed where
    /// expected. Returns the segment's number and the offset the record starts at.
    pub(super) fn try_append(&mut self, data: &[u8]) -> Result<(u64, u64), AppendFailure> {
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
    pub(super) fn append_scratch(&mut self) -> std::io::Result<(u64, u64)> {
        let scratch = std::mem::take(&mut self.scratch);
        let result = self.append(&scratch);
        self.scratch = scratch;
        result
    }

    pub(super) fn persist_failed(&mut self, why: String) {
        if self.persist_error.as_deref() != Some(why.as_str()) {
            tracing::error!("outbox: {why}; keeping batches in memory until they are sent (lost if the agent stops)");
            self.persist_error = Some(why);
        }
    }
}
