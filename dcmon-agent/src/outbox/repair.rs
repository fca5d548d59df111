//! Putting right segment files (or the whole directory) deleted or changed underneath the
//! agent: what can still be read back is rewritten, what cannot is counted as corrupt.

use std::os::unix::fs::{FileExt as _, MetadataExt as _};

use bytes::Bytes;

use super::record::{MAX_BODY_BYTES, batch_crc, encode_batch};
use super::segment::{Segment, identity};
use super::{CACHED_BATCHES, Outbox, Stored};

impl Outbox {
    /// Check that the segment files and the directory are still there, and put it right if
    /// not (at shutdown, before saying what is left for the next start).
    pub(super) fn check_files(&mut self) {
        let deleted = identity(&self.dir) != self.dir_identity || self.segments.iter().any(Segment::is_gone);
        if self.dir_lock.is_some() && deleted {
            self.recover_deleted_files();
        }
    }

    /// Segment files (or the whole directory) were deleted: recreate the directory and its
    /// lock, and rewrite every batch that is still in memory or readable from an open file.
    pub(super) fn recover_deleted_files(&mut self) {
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
    pub(super) fn recover_changed_segment(&mut self, id: u64, intact: u64) {
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
            if memchr::memchr(b'\n', &body).is_some() || body.len() as u64 > MAX_BODY_BYTES {
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
}
