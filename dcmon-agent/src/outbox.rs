//! The durable outbox: every batch is on disk before it is sent, and leaves only when the server
//! answered 2xx.
//!
//! One file per batch, `<seq as 16 hex digits>-<timestamp>.batch`, holding a header line
//! `DCMB1 <crc32 as 8 hex digits> <body length>\n` and the JSON body. A file is written under a
//! temporary name, fsynced, renamed into place and the directory fsynced, so a crash or power
//! loss at any moment leaves either the whole batch or no batch. A file that is torn or
//! corrupt anyway (disk errors, a person's editor) fails its length or checksum: it is moved to
//! `corrupt/`, logged and counted, and the rest is delivered.
//!
//! Bounded by total size and age; beyond them the oldest batches are dropped, logged and
//! counted. When the directory cannot be written (disk full, read-only, permissions) batches are
//! kept in memory, under the same bounds, and the reason is logged.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;

use crate::batch::Sample;

const MAGIC: &str = "DCMB1";
const BATCH_SUFFIX: &str = ".batch";
const TMP_SUFFIX: &str = ".tmp";
/// Files kept in `rejected/` and in `corrupt/` each, for an operator to inspect.
const SET_ASIDE_KEEP: usize = 100;

/// Size and age bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    /// Total bytes of queued batches.
    pub max_bytes: u64,
    /// Oldest batch kept, by its collection timestamp.
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
    /// Files found torn or corrupt since start.
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

#[derive(Debug)]
enum Stored {
    /// On disk; `cached` holds the body while the queue is short, so the common case (send
    /// right after the write) does not read the file back.
    File { path: PathBuf, cached: Option<Bytes> },
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
    bytes: u64,
    stored: Stored,
}

/// The queue of unsent batches, oldest first.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    limits: OutboxLimits,
    entries: VecDeque<Entry>,
    next_seq: u64,
    stats: OutboxStats,
    /// Why the directory cannot be written, while it cannot.
    persist_error: Option<String>,
}

/// Why a stored batch cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corrupt {
    /// No valid header line.
    #[error("no valid header line")]
    Header,
    /// Fewer or more bytes than the header says (a torn write).
    #[error("length {actual} but the header says {expected} (torn write)")]
    Length {
        /// From the header.
        expected: usize,
        /// On disk.
        actual: usize,
    },
    /// The checksum does not match.
    #[error("checksum mismatch")]
    Checksum,
}

/// The bytes of a stored batch file.
pub fn encode(body: &[u8]) -> Vec<u8> {
    let mut out = format!("{MAGIC} {:08x} {}\n", crc32fast::hash(body), body.len()).into_bytes();
    out.extend_from_slice(body);
    out
}

/// The body of a stored batch file, checked.
pub fn decode(data: &[u8]) -> Result<&[u8], Corrupt> {
    let nl = data.iter().position(|&b| b == b'\n').ok_or(Corrupt::Header)?;
    let header = std::str::from_utf8(&data[..nl]).map_err(|_| Corrupt::Header)?;
    let mut parts = header.split(' ');
    let (Some(MAGIC), Some(crc), Some(len), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(Corrupt::Header);
    };
    let crc = u32::from_str_radix(crc, 16).map_err(|_| Corrupt::Header)?;
    let expected: usize = len.parse().map_err(|_| Corrupt::Header)?;
    let body = &data[nl + 1..];
    if body.len() != expected {
        return Err(Corrupt::Length { expected, actual: body.len() });
    }
    if crc32fast::hash(body) != crc {
        return Err(Corrupt::Checksum);
    }
    Ok(body)
}

/// `(seq, timestamp)` from `<seq hex>-<timestamp>.batch`.
fn parse_name(name: &str) -> Option<(u64, i64)> {
    let stem = name.strip_suffix(BATCH_SUFFIX)?;
    let (seq, ts) = stem.split_once('-')?;
    Some((u64::from_str_radix(seq, 16).ok()?, ts.parse().ok()?))
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl Outbox {
    /// Open (creating if needed) the outbox in `dir` and index what a previous run left.
    /// Never fails: an unusable directory means batches are kept in memory, and says why.
    pub fn open(dir: impl Into<PathBuf>, limits: OutboxLimits, now_unix: i64) -> Self {
        let dir = dir.into();
        let mut outbox = Self {
            dir,
            limits,
            entries: VecDeque::new(),
            next_seq: 0,
            stats: OutboxStats::default(),
            persist_error: None,
        };
        if let Err(e) = std::fs::create_dir_all(&outbox.dir) {
            outbox.persist_failed(format!("cannot create {}: {e}", outbox.dir.display()));
            return outbox;
        }
        outbox.index_existing();
        if !outbox.entries.is_empty() {
            tracing::info!(
                batches = outbox.entries.len(),
                bytes = outbox.stats.bytes,
                "outbox {}: resuming delivery of batches left by an earlier run",
                outbox.dir.display()
            );
        }
        outbox.enforce_limits(now_unix);
        outbox
    }

    fn index_existing(&mut self) {
        let read = match std::fs::read_dir(&self.dir) {
            Ok(r) => r,
            Err(e) => {
                self.persist_failed(format!("cannot list {}: {e}", self.dir.display()));
                return;
            }
        };
        let mut found = Vec::new();
        for entry in read.filter_map(Result::ok) {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let path = entry.path();
            if name.ends_with(TMP_SUFFIX) {
                // A write that never reached its rename: the batch was not committed.
                let _ = std::fs::remove_file(&path);
            } else if let Some((seq, timestamp)) = parse_name(&name) {
                let bytes = entry.metadata().map_or(0, |m| m.len());
                found.push(Entry { seq, timestamp, bytes, stored: Stored::File { path, cached: None } });
            }
        }
        found.sort_by_key(|e| e.seq);
        self.next_seq = found.last().map_or(0, |e| e.seq + 1);
        self.stats.bytes = found.iter().map(|e| e.bytes).sum();
        self.entries = found.into();
        self.stats.batches = self.entries.len() as u64;
    }

    fn persist_failed(&mut self, why: String) {
        if self.persist_error.as_deref() != Some(why.as_str()) {
            tracing::error!("outbox: {why}; keeping batches in memory until they are sent (lost if the agent stops)");
            self.persist_error = Some(why);
        }
    }

    /// Store a batch collected at `timestamp`. Durable when this returns, unless the directory
    /// cannot be written (then it is in memory, and the reason was logged).
    pub fn push(&mut self, timestamp: i64, body: Bytes) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let stored = match self.write_file(seq, timestamp, &body) {
            Ok(path) => {
                if let Some(was) = self.persist_error.take() {
                    tracing::info!("outbox {}: writable again (was: {was})", self.dir.display());
                }
                let cached = (self.entries.len() < CACHED_BATCHES).then(|| body.clone());
                Stored::File { path, cached }
            }
            Err(e) => {
                self.persist_failed(format!("cannot write a batch to {}: {e}", self.dir.display()));
                self.stats.in_memory += 1;
                Stored::Memory(body.clone())
            }
        };
        let bytes = match &stored {
            Stored::File { .. } => (encode_len(&body)) as u64,
            Stored::Memory(b) => b.len() as u64,
        };
        self.entries.push_back(Entry { seq, timestamp, bytes, stored });
        self.stats.batches += 1;
        self.stats.bytes += bytes;
        self.enforce_limits(timestamp);
    }

    fn write_file(&self, seq: u64, timestamp: i64, body: &[u8]) -> std::io::Result<PathBuf> {
        let name = format!("{seq:016x}-{timestamp}{BATCH_SUFFIX}");
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}{TMP_SUFFIX}"));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&encode(body))?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            fsync_dir(&self.dir)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map(|()| path)
    }

    /// The oldest batch that can be sent, as `(seq, body)`. Torn or corrupt files met on the
    /// way are set aside in `corrupt/` (logged, counted) and skipped.
    pub fn oldest(&mut self) -> Option<(u64, Bytes)> {
        loop {
            let front = self.entries.front()?;
            let path = match &front.stored {
                Stored::Memory(b) | Stored::File { cached: Some(b), .. } => return Some((front.seq, b.clone())),
                Stored::File { path, cached: None } => path.clone(),
            };
            match std::fs::read(&path) {
                Ok(data) => match decode(&data) {
                    Ok(body) => return Some((front.seq, Bytes::copy_from_slice(body))),
                    Err(why) => {
                        let seq = front.seq;
                        tracing::warn!("outbox: {} is unusable ({why}); moved to corrupt/", path.display());
                        self.stats.corrupt_total += 1;
                        self.set_aside(seq, "corrupt", &why.to_string());
                    }
                },
                Err(e) => {
                    let seq = front.seq;
                    tracing::warn!("outbox: cannot read {} ({e}); skipping it", path.display());
                    self.stats.corrupt_total += 1;
                    self.set_aside(seq, "corrupt", &e.to_string());
                }
            }
        }
    }

    /// The server accepted batch `seq`: forget it.
    pub fn remove(&mut self, seq: u64) {
        if let Some(Entry { stored: Stored::File { path, .. }, .. }) = self.take(seq) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// The server will never accept batch `seq` (400, 413, 422): move it to `rejected/` with the
    /// server's answer beside it, and go on with the next.
    pub fn reject(&mut self, seq: u64, answer: &str) {
        self.stats.rejected_total += 1;
        self.set_aside(seq, "rejected", answer);
    }

    fn take(&mut self, seq: u64) -> Option<Entry> {
        let pos = self.entries.iter().position(|e| e.seq == seq)?;
        let e = self.entries.remove(pos)?;
        self.stats.batches -= 1;
        self.stats.bytes -= e.bytes;
        if matches!(e.stored, Stored::Memory(_)) {
            self.stats.in_memory = self.stats.in_memory.saturating_sub(1);
        }
        Some(e)
    }

    /// Move batch `seq` into the subfolder `kind`, with `why` in a `.reason` file beside it.
    fn set_aside(&mut self, seq: u64, kind: &str, why: &str) {
        let Some(e) = self.take(seq) else { return };
        let folder = self.dir.join(kind);
        let name = format!("{:016x}-{}{BATCH_SUFFIX}", e.seq, e.timestamp);
        let moved = std::fs::create_dir_all(&folder).and_then(|()| match &e.stored {
            Stored::File { path, .. } => std::fs::rename(path, folder.join(&name)),
            Stored::Memory(b) => std::fs::write(folder.join(&name), encode(b)),
        });
        if moved.is_ok() {
            let _ = std::fs::write(folder.join(format!("{name}.reason")), why);
            prune(&folder, SET_ASIDE_KEEP);
        } else if let Stored::File { path, .. } = &e.stored {
            let _ = std::fs::remove_file(path);
        }
    }

    fn enforce_limits(&mut self, now_unix: i64) {
        let max_age = i64::try_from(self.limits.max_age.as_secs()).unwrap_or(i64::MAX);
        while let Some(front) = self.entries.front() {
            let too_big = self.stats.bytes > self.limits.max_bytes;
            let too_old = now_unix.saturating_sub(front.timestamp) > max_age;
            if !too_big && !too_old {
                break;
            }
            let seq = front.seq;
            let why = if too_big { "size limit" } else { "age limit" };
            if let Some(e) = self.take(seq) {
                if let Stored::File { path, .. } = &e.stored {
                    let _ = std::fs::remove_file(path);
                }
                self.stats.dropped_total += 1;
                tracing::warn!(
                    batch_timestamp = e.timestamp,
                    dropped_total = self.stats.dropped_total,
                    "outbox over its {why} ({} bytes, {} s): dropped the oldest batch",
                    self.limits.max_bytes,
                    self.limits.max_age.as_secs()
                );
            }
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

fn encode_len(body: &[u8]) -> usize {
    format!("{MAGIC} {:08x} {}\n", 0, body.len()).len() + body.len()
}

/// Keep the newest `keep` batches (and their reasons) in `folder`.
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

    const LIMITS: OutboxLimits = OutboxLimits { max_bytes: 1 << 20, max_age: Duration::from_secs(3600) };

    fn body(i: u32) -> Bytes {
        Bytes::from(format!("{{\"batch\": {i}}}"))
    }

    #[test]
    fn encode_decode_round_trip_and_detects_damage() {
        let data = encode(b"{\"a\":1}");
        assert_eq!(decode(&data), Ok(&b"{\"a\":1}"[..]));
        assert_eq!(decode(&data[..data.len() - 1]), Err(Corrupt::Length { expected: 7, actual: 6 }));
        let mut flipped = data.clone();
        *flipped.last_mut().expect("byte") ^= 1;
        assert_eq!(decode(&flipped), Err(Corrupt::Checksum));
        assert_eq!(decode(b""), Err(Corrupt::Header));
        assert_eq!(decode(b"garbage\n{}"), Err(Corrupt::Header));
        assert_eq!(encode_len(b"{\"a\":1}"), data.len());
    }

    #[test]
    fn survives_reopen_in_order_and_removes_on_ack() {
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
        drop(o);
        let mut o = Outbox::open(dir.path(), LIMITS, 105);
        let mut got = Vec::new();
        while let Some((seq, b)) = o.oldest() {
            got.push(b);
            o.remove(seq);
        }
        assert_eq!(got, [body(1), body(2), body(9)]);
        assert_eq!(o.stats(), OutboxStats::default());
    }

    #[test]
    fn corrupt_and_torn_files_are_set_aside_and_the_rest_delivered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut o = Outbox::open(dir.path(), LIMITS, 100);
        for i in 0..4 {
            o.push(100, body(i));
        }
        drop(o);
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "batch"))
            .collect();
        files.sort();
        let data = std::fs::read(&files[0]).expect("read");
        std::fs::write(&files[0], &data[..data.len() / 2]).expect("truncate");
        let mut data = std::fs::read(&files[2]).expect("read");
        let last = data.len() - 2;
        data[last] ^= 0x20;
        std::fs::write(&files[2], data).expect("corrupt");
        std::fs::write(dir.path().join(".0000000000000009-100.batch.tmp"), "half").expect("tmp");

        let mut o = Outbox::open(dir.path(), LIMITS, 100);
        let mut got = Vec::new();
        while let Some((seq, b)) = o.oldest() {
            got.push(b);
            o.remove(seq);
        }
        assert_eq!(got, [body(1), body(3)]);
        assert_eq!(o.stats().corrupt_total, 2);
        assert_eq!(
            std::fs::read_dir(dir.path().join("corrupt")).expect("corrupt/").count(),
            4,
            "2 batches + 2 reasons"
        );
        assert!(!dir.path().join(".0000000000000009-100.batch.tmp").exists(), "leftover temp file removed");
    }

    #[test]
    fn size_and_age_limits_drop_the_oldest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let one = encode_len(&body(0)) as u64;
        let mut o = Outbox::open(dir.path(), OutboxLimits { max_bytes: one * 2, max_age: Duration::from_secs(60) }, 0);
        for i in 0..3 {
            o.push(1000, body(i));
        }
        assert_eq!(o.stats().batches, 2);
        assert_eq!(o.stats().dropped_total, 1);
        assert_eq!(o.oldest().map(|(_, b)| b), Some(body(1)));
        o.push(1061, body(7)); // the two at t=1000 are now 61 s old
        assert_eq!(o.stats().batches, 1);
        assert_eq!(o.stats().dropped_total, 3);
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1, "dropped files deleted");
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
        let (seq, b) = o.oldest().expect("in memory");
        assert_eq!(b, body(1));
        o.remove(seq);
        assert_eq!(o.stats().batches, 1);
    }

    #[test]
    fn rejected_batches_are_kept_aside_with_the_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut o = Outbox::open(dir.path(), LIMITS, 0);
        o.push(5, body(5));
        o.push(6, body(6));
        let (seq, _) = o.oldest().expect("oldest");
        o.reject(seq, "422: metrics.0.labels.x: expected a string");
        assert_eq!(o.oldest().map(|(_, b)| b), Some(body(6)));
        assert_eq!(o.stats().rejected_total, 1);
        let reason =
            std::fs::read_to_string(dir.path().join("rejected/0000000000000000-5.batch.reason")).expect("reason");
        assert!(reason.contains("expected a string"));
    }
}
