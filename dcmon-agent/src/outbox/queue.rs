//! The queue: the oldest batch to send, a batch leaving it (delivered, rejected or dropped),
//! and the size and age bounds.

use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::record::{Corrupt, MAX_BODY_BYTES, batch_crc, encode_done};
use super::{Outbox, OutboxLimits, OutboxStats, Stored};

/// After a drop is logged, further drops are summarised in one line at most this often.
pub(super) const DROP_LOG_EVERY: Duration = Duration::from_secs(600);

/// Drops are logged at once, then summarised at most every [`DROP_LOG_EVERY`].
#[derive(Debug, Default)]
pub(super) struct DropLog {
    last_line: Option<Instant>,
    unlogged: u64,
}

impl Outbox {
    /// The oldest batch that can be sent, as `(seq, body)`. A body found damaged on the way is
    /// set aside in `corrupt/` (logged, counted) and skipped; it is never marked done, so it
    /// cannot hide another batch.
    pub fn oldest(&mut self) -> Option<(u64, Bytes)> {
        self.oldest_from(0)
    }

    /// [`Outbox::oldest`] among the batches numbered `from` and up (an output's cursor).
    pub(super) fn oldest_from(&mut self, from: u64) -> Option<(u64, Bytes)> {
        loop {
            // Entries are in seq order: pushed in order, sorted at open.
            let front = self.entries.get(self.entries.partition_point(|e| e.seq < from))?;
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

    /// Batch `seq` is delivered to every output: forget it. (Outputs with cursors use
    /// [`Outbox::delivered`].)
    pub fn remove(&mut self, seq: u64) {
        self.finish(seq, true);
    }

    /// The server will never accept batch `seq` (400, 413, 422): copy it to `rejected/` with the
    /// server's answer beside it, and go on with the next, for every output. (Outputs with
    /// cursors use [`Outbox::gave_up`].)
    pub fn reject(&mut self, seq: u64, answer: &str) {
        if self.copy_rejected(seq, answer) {
            self.finish(seq, true);
        }
    }

    /// Copy batch `seq` to `rejected/` with the server's answer beside it, and count it;
    /// false when it is no longer queued.
    pub(super) fn copy_rejected(&mut self, seq: u64, answer: &str) -> bool {
        let Some(e) = self.entries.iter().find(|e| e.seq == seq) else { return false };
        self.stats.rejected_total += 1;
        let (timestamp, len) = (e.timestamp, e.len);
        let body = match &e.stored {
            Stored::Memory(b) | Stored::Disk { cached: Some(b), .. } => Ok(b.to_vec()),
            Stored::Disk { segment, body_offset, cached: None, .. } => {
                let (segment, offset) = (*segment, *body_offset);
                self.read_body(segment, offset, len)
            }
        };
        self.set_aside_rejected(seq, timestamp, body, answer);
        true
    }

    /// Batch `seq` leaves the queue, for every output: record that on disk (when `mark_done`)
    /// and delete segments left with nothing to deliver.
    pub(super) fn finish(&mut self, seq: u64, mark_done: bool) {
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
                    self.append_progress();
                }
                self.delete_done_segments();
            }
        }
    }

    /// Append `self.scratch`, a `D` or `C` record: progress that, if lost, only means sending
    /// a batch again after a restart. A failure is logged once per distinct error.
    pub(super) fn append_progress(&mut self) {
        match self.append_scratch() {
            Ok(_) => {
                if let Some(was) = self.done_error.take() {
                    tracing::info!("outbox {}: delivered batches are recorded again (was: {was})", self.dir.display());
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

    pub(super) fn enforce_limits(&mut self, now: Instant) {
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
