//! The durable outbox: every batch is written to disk before it is sent, and leaves only when the
//! server answered 2xx (or refused it for good, or a bound dropped it).
//!
//! # Layout
//! Append-only segment files `<segment number as 16 hex digits>.seg`, numbered in creation order. A record is a header line and,
//! for a batch, its JSON body on the next line:
//!
//! ```text
//! DCMB2 B <seq:016x> <timestamp> <body length> <crc32:08x>\n<body>\n   a batch
//! DCMB2 D <seq:016x> <crc32:08x>\n                                      batch <seq> is done
//! ```
//!
//! The CRC covers the header fields and the body, so a torn or damaged record is detected. A
//! body is compact JSON, which never holds a raw newline, so records are lines: after damage
//! the reader resumes at the next header line. Damaged records are copied to `corrupt/`, logged
//! and counted, and the rest is delivered.
//!
//! Each run appends to segments of its own; segments of earlier runs are only read (a torn tail
//! is cut off). Segments are deleted oldest first once all their batches are done; in that
//! order a `D` record is never deleted before the batch it marks.
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
//! # Bounds
//! Total size and age; beyond them the oldest batches are dropped, logged and counted. When
//! the directory cannot be written (disk full, read-only, permissions) batches are kept in
//! memory, under the same bounds, and the reason is logged.

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::batch::Sample;

const MAGIC: &[u8] = b"DCMB2 ";
const SEGMENT_SUFFIX: &str = ".seg";
/// A segment takes new records until it is this large; then the next record starts a new one.
const SEGMENT_BYTES: u64 = 1 << 20;
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
    /// Torn or corrupt records set aside since start.
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

/// Why a stored record cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corrupt {
    /// No valid header line.
    #[error("no valid header line")]
    Header,
    /// The segment ends inside the record: its write never completed.
    #[error("incomplete record at the end of the segment (torn write)")]
    Torn,
    /// The body line is not as long as the header says.
    #[error("body is {actual} bytes but the header says {expected}")]
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

/// One record of a segment, as [`parse_segment`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    /// A batch.
    Batch {
        /// Its sequence number.
        seq: u64,
        /// Its collection timestamp.
        timestamp: i64,
        /// Offset of the body in the segment.
        body_offset: usize,
        /// The body.
        body: &'a [u8],
        /// The record's CRC.
        crc: u32,
    },
    /// Batch `seq` is done (delivered, rejected or dropped).
    Done {
        /// Its sequence number.
        seq: u64,
    },
    /// Bytes that are not a valid record.
    Damaged {
        /// Where they start in the segment.
        offset: usize,
        /// How many.
        len: usize,
        /// What is wrong.
        why: Corrupt,
    },
}

/// `N` lowercase hex digits of `v`, zero-padded: `{v:0N$x}` without the formatter, which cost
/// more than the rest of a record's encoding (every record has two such fields).
fn hex<const N: usize>(v: u64) -> [u8; N] {
    let mut digits = [0u8; N];
    for (i, d) in digits.iter_mut().enumerate() {
        let nibble = (v >> (4 * (N - 1 - i))) & 0xf;
        *d = b"0123456789abcdef"[nibble as usize];
    }
    digits
}

/// `B {seq:016x} {timestamp} {len}`: a batch record's header fields, which its CRC also covers.
/// At most 2 + 16 + 1 + 20 + 1 + 20 = 60 bytes.
fn batch_fields(seq: u64, timestamp: i64, len: usize) -> ([u8; 64], usize) {
    let mut buf = [0u8; 64];
    let mut rest = &mut buf[..];
    // 60 bytes at most fit in 64: these writes cannot fail.
    let _ = rest.write_all(b"B ");
    let _ = rest.write_all(&hex::<16>(seq));
    let _ = write!(rest, " {timestamp} {len}");
    let used = 64 - rest.len();
    (buf, used)
}

fn batch_crc(seq: u64, timestamp: i64, body: &[u8]) -> u32 {
    let (fields, len) = batch_fields(seq, timestamp, body.len());
    crc_of_batch(&fields[..len], body)
}

/// The CRC of a batch record: over its header fields, a newline, and its body.
fn crc_of_batch(fields: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(fields);
    h.update(b"\n");
    h.update(body);
    h.finalize()
}

/// `D {seq:016x}`: a done record's fields, which its CRC covers.
fn done_fields(seq: u64) -> [u8; 18] {
    let mut fields = [b'D'; 18];
    fields[1] = b' ';
    fields[2..].copy_from_slice(&hex::<16>(seq));
    fields
}

/// Append the record of a batch to `out`; returns its CRC.
pub fn encode_batch(out: &mut Vec<u8>, seq: u64, timestamp: i64, body: &[u8]) -> u32 {
    let (fields, len) = batch_fields(seq, timestamp, body.len());
    let crc = crc_of_batch(&fields[..len], body);
    out.reserve(MAGIC.len() + len + 10 + body.len() + 1);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&fields[..len]);
    out.push(b' ');
    out.extend_from_slice(&hex::<8>(u64::from(crc)));
    out.push(b'\n');
    out.extend_from_slice(body);
    out.push(b'\n');
    crc
}

/// Append the record saying batch `seq` is done to `out`.
pub fn encode_done(out: &mut Vec<u8>, seq: u64) {
    let fields = done_fields(seq);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&fields);
    out.push(b' ');
    out.extend_from_slice(&hex::<8>(u64::from(crc32fast::hash(&fields))));
    out.push(b'\n');
}

/// The length of a batch's record.
pub fn batch_record_len(seq: u64, timestamp: i64, body: &[u8]) -> u64 {
    let (_, len) = batch_fields(seq, timestamp, body.len());
    // magic, fields, " crc8\n", body, "\n"
    (MAGIC.len() + len + 10 + body.len() + 1) as u64
}

fn parse_hex_seq(s: &str) -> Option<u64> {
    (s.len() == 16).then(|| u64::from_str_radix(s, 16).ok()).flatten()
}

fn parse_crc(s: &str) -> Option<u32> {
    (s.len() == 8).then(|| u32::from_str_radix(s, 16).ok()).flatten()
}

/// Every record of a segment, in order, damaged stretches included. Never fails.
pub fn parse_segment(data: &[u8]) -> Vec<Record<'_>> {
    let mut records = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let Some(nl) = memchr(b'\n', &data[pos..]).map(|i| pos + i) else {
            records.push(Record::Damaged { offset: pos, len: data.len() - pos, why: Corrupt::Torn });
            break;
        };
        let header = std::str::from_utf8(&data[pos..nl]).ok().and_then(|h| h.strip_prefix("DCMB2 "));
        let fields: Vec<&str> = header.map(|h| h.split(' ').collect()).unwrap_or_default();
        match fields.as_slice() {
            ["B", seq, ts, len, crc] => {
                let parsed = (parse_hex_seq(seq), ts.parse::<i64>().ok(), len.parse::<usize>().ok(), parse_crc(crc));
                let (Some(seq), Some(timestamp), Some(expected), Some(crc)) = parsed else {
                    let end = next_header(data, nl + 1);
                    records.push(Record::Damaged { offset: pos, len: end - pos, why: Corrupt::Header });
                    pos = end;
                    continue;
                };
                let body_offset = nl + 1;
                let Some(body_end) = memchr(b'\n', &data[body_offset..]).map(|i| body_offset + i) else {
                    records.push(Record::Damaged { offset: pos, len: data.len() - pos, why: Corrupt::Torn });
                    break;
                };
                let body = &data[body_offset..body_end];
                let why = if body.len() != expected {
                    Some(Corrupt::Length { expected, actual: body.len() })
                } else if batch_crc(seq, timestamp, body) != crc {
                    Some(Corrupt::Checksum)
                } else {
                    None
                };
                records.push(match why {
                    Some(why) => Record::Damaged { offset: pos, len: body_end + 1 - pos, why },
                    None => Record::Batch { seq, timestamp, body_offset, body, crc },
                });
                pos = body_end + 1;
            }
            ["D", seq, crc] => {
                match (parse_hex_seq(seq), parse_crc(crc)) {
                    (Some(seq), Some(crc)) if crc32fast::hash(&done_fields(seq)) == crc => {
                        records.push(Record::Done { seq })
                    }
                    (Some(_), Some(_)) => {
                        records.push(Record::Damaged { offset: pos, len: nl + 1 - pos, why: Corrupt::Checksum });
                    }
                    _ => records.push(Record::Damaged { offset: pos, len: nl + 1 - pos, why: Corrupt::Header }),
                }
                pos = nl + 1;
            }
            _ => {
                let end = next_header(data, nl + 1);
                records.push(Record::Damaged { offset: pos, len: end - pos, why: Corrupt::Header });
                pos = end;
            }
        }
    }
    records
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

/// The start of the first line at or after `from` that begins with the magic (or the end).
fn next_header(data: &[u8], from: usize) -> usize {
    let mut line = from;
    while line < data.len() {
        if data[line..].starts_with(MAGIC) {
            return line;
        }
        match memchr(b'\n', &data[line..]) {
            Some(i) => line += i + 1,
            None => return data.len(),
        }
    }
    data.len()
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
/// operators and tests; the agent may be running).
pub fn inspect(dir: &Path) -> std::io::Result<Vec<StoredBatch>> {
    let mut batches = Vec::new();
    let mut done = HashSet::new();
    for (_, path) in list_segments(dir)? {
        let data = std::fs::read(&path)?;
        for r in parse_segment(&data) {
            match r {
                Record::Batch { seq, timestamp, body, .. } => {
                    batches.push(StoredBatch { seq, timestamp, bytes: body.len() as u64 });
                }
                Record::Done { seq } => {
                    done.insert(seq);
                }
                Record::Damaged { .. } => {}
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
    /// Whether this run appends to it (false for earlier runs' segments and after a failed write).
    writable: bool,
    /// Its batches not yet done.
    pending: usize,
}

impl Segment {
    /// Nothing in it is still to deliver and this run is done appending to it.
    fn deletable(&self) -> bool {
        self.pending == 0 && !(self.writable && self.len < SEGMENT_BYTES)
    }

    fn reader(&mut self) -> std::io::Result<Arc<File>> {
        if let Some(f) = &self.file {
            return Ok(Arc::clone(f));
        }
        let f = Arc::new(File::open(&self.path)?);
        self.file = Some(Arc::clone(&f));
        Ok(f)
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
    /// The `flock`ed `.lock` file that keeps a second agent out of the directory.
    dir_lock: Option<File>,
    /// Record bytes being assembled (kept to reuse the allocation).
    scratch: Vec<u8>,
}

impl Outbox {
    /// Open (creating if needed) the outbox in `dir` and index what earlier runs left. Never
    /// fails: an unusable directory means batches are kept in memory, and says why.
    pub fn open(dir: impl Into<PathBuf>, limits: OutboxLimits, now_unix: i64) -> Self {
        let mut outbox = Self {
            dir: dir.into(),
            limits,
            entries: VecDeque::new(),
            segments: VecDeque::new(),
            next_seq: 0,
            next_segment: 0,
            stats: OutboxStats::default(),
            persist_error: None,
            sync_error: None,
            dir_lock: None,
            scratch: Vec::new(),
        };
        if let Err(e) = std::fs::create_dir_all(&outbox.dir) {
            outbox.persist_failed(format!("cannot create {}: {e}", outbox.dir.display()));
            return outbox;
        }
        match lock_dir(&outbox.dir) {
            Ok(lock) => outbox.dir_lock = Some(lock),
            Err(e) => {
                outbox.persist_failed(format!("cannot lock {}: {e}", outbox.dir.display()));
                return outbox;
            }
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
        outbox.delete_done_segments();
        outbox.enforce_limits(now_unix);
        outbox
    }

    fn index_existing(&mut self) {
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
            let data = match std::fs::read(&path) {
                Ok(d) => d,
                Err(e) => {
                    // Leave the file for an operator; its batches cannot be delivered.
                    tracing::error!("outbox: cannot read {} ({e}); skipping its batches", path.display());
                    self.stats.corrupt_total += 1;
                    continue;
                }
            };
            let mut intact_len = data.len();
            for record in parse_segment(&data) {
                match record {
                    Record::Batch { seq, timestamp, body_offset, body, crc } => {
                        self.next_seq = self.next_seq.max(seq + 1);
                        let len = body.len() as u64;
                        let stored = Stored::Disk { segment: id, body_offset: body_offset as u64, crc, cached: None };
                        found.push(Entry {
                            seq,
                            timestamp,
                            len,
                            bytes: batch_record_len(seq, timestamp, body),
                            stored,
                        });
                    }
                    Record::Done { seq } => {
                        done.insert(seq);
                    }
                    Record::Damaged { offset, len, why } => {
                        if why == Corrupt::Torn {
                            intact_len = offset;
                        }
                        self.set_aside_damage(&path, &data[offset..offset + len], offset, &why);
                    }
                }
            }
            if intact_len < data.len() {
                // Cut the torn tail off, so the next start does not find it again.
                let cut =
                    std::fs::OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(intact_len as u64));
                if let Err(e) = cut {
                    tracing::warn!("outbox: cannot cut the torn end off {}: {e}", path.display());
                }
            }
            let len = intact_len as u64;
            self.segments.push_back(Segment {
                id,
                path,
                file: None,
                len,
                synced_len: len,
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
    }

    /// Copy a damaged stretch of `segment` to `corrupt/`, log and count it, once: a copy
    /// already there means an earlier run reported it.
    fn set_aside_damage(&mut self, segment: &Path, bytes: &[u8], offset: usize, why: &Corrupt) {
        let stem = segment.file_stem().and_then(|s| s.to_str()).unwrap_or("segment");
        let folder = self.dir.join("corrupt");
        let name = format!("{stem}-at{offset:010}.batch");
        if folder.join(&name).exists() {
            return;
        }
        self.stats.corrupt_total += 1;
        tracing::warn!(
            "outbox: {} bytes at offset {offset} of {} are unusable ({why}); copied to {}",
            bytes.len(),
            segment.display(),
            folder.join(&name).display()
        );
        let copied = std::fs::create_dir_all(&folder)
            .and_then(|()| std::fs::write(folder.join(&name), bytes))
            .and_then(|()| std::fs::write(folder.join(format!("{name}.reason")), why.to_string()));
        match copied {
            Ok(()) => prune(&folder, SET_ASIDE_KEEP),
            Err(e) => tracing::warn!("outbox: cannot copy damaged bytes to {}: {e}", folder.display()),
        }
    }

    fn persist_failed(&mut self, why: String) {
        if self.persist_error.as_deref() != Some(why.as_str()) {
            tracing::error!("outbox: {why}; keeping batches in memory until they are sent (lost if the agent stops)");
            self.persist_error = Some(why);
        }
    }

    /// The segment this run appends to, created when there is none or the last is full.
    fn writable_segment(&mut self) -> std::io::Result<&mut Segment> {
        let reuse = self.segments.back().is_some_and(|s| s.writable && s.len < SEGMENT_BYTES);
        if !reuse {
            if self.dir_lock.is_none() {
                return Err(std::io::Error::other("the directory is not locked for this agent"));
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
        }
        self.segments.back_mut().ok_or_else(|| std::io::Error::other("no segment"))
    }

    /// Append `self.scratch` as one write to the writable segment; returns the segment's number
    /// and the offset the record starts at.
    fn append_scratch(&mut self) -> std::io::Result<(u64, u64)> {
        let scratch = std::mem::take(&mut self.scratch);
        let result = (|| {
            let segment = self.writable_segment()?;
            let file = segment.file.as_ref().ok_or_else(|| std::io::Error::other("segment not open"))?;
            let start = segment.len;
            if let Err(e) = (&**file).write_all(&scratch) {
                // Never leave half a record for later records to follow: cut it off, and
                // start a new segment next time.
                let _ = file.set_len(start);
                segment.writable = false;
                return Err(e);
            }
            segment.len += scratch.len() as u64;
            Ok((segment.id, start))
        })();
        self.scratch = scratch;
        result
    }

    /// Store a batch collected at `timestamp`: one write to the current segment (see the module
    /// docs for when it is fsynced). If the directory cannot be written it is kept in memory,
    /// and the reason logged.
    pub fn push(&mut self, timestamp: i64, body: Bytes) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.scratch.clear();
        let crc = encode_batch(&mut self.scratch, seq, timestamp, &body);
        let header_len = self.scratch.len() - body.len() - 1;
        let written = if memchr(b'\n', &body).is_some() {
            Err(std::io::Error::other("batch body holds a raw newline; only compact JSON can be stored"))
        } else {
            self.append_scratch()
        };
        let (stored, bytes) = match written {
            Ok((segment, start)) => {
                if let Some(was) = self.persist_error.take() {
                    tracing::info!("outbox {}: writable again (was: {was})", self.dir.display());
                }
                if let Some(s) = self.segments.back_mut() {
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
        self.entries.push_back(Entry { seq, timestamp, len: body.len() as u64, bytes, stored });
        self.stats.batches += 1;
        self.stats.bytes += bytes;
        self.enforce_limits(timestamp);
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

    /// Fsync everything stored, here and now (at shutdown). Errors are logged.
    pub fn sync_now(&mut self) {
        if let Some(job) = self.sync_job() {
            let result = job.run();
            self.sync_finished(&job, result);
        }
    }

    /// The oldest batch that can be sent, as `(seq, body)`. A body found damaged on the way is
    /// set aside in `corrupt/` (logged, counted) and skipped.
    pub fn oldest(&mut self) -> Option<(u64, Bytes)> {
        loop {
            let front = self.entries.front()?;
            let (seq, timestamp, len) = (front.seq, front.timestamp, front.len);
            let (segment, body_offset, crc) = match &front.stored {
                Stored::Memory(b) | Stored::Disk { cached: Some(b), .. } => return Some((seq, b.clone())),
                Stored::Disk { segment, body_offset, crc, cached: None } => (*segment, *body_offset, *crc),
            };
            let path = self.segment_path(segment);
            match self.read_body(segment, body_offset, len) {
                Ok(body) if batch_crc(seq, timestamp, &body) == crc => return Some((seq, Bytes::from(body))),
                Ok(body) => {
                    let offset = usize::try_from(body_offset).unwrap_or(usize::MAX);
                    self.set_aside_damage(&path, &body, offset, &Corrupt::Checksum);
                }
                Err(e) => {
                    tracing::warn!("outbox: cannot read batch {seq} from {} ({e}); skipping it", path.display());
                    self.stats.corrupt_total += 1;
                }
            }
            self.finish(seq);
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
        let mut body = vec![0; usize::try_from(len).map_err(std::io::Error::other)?];
        file.read_exact_at(&mut body, offset)?;
        Ok(body)
    }

    /// The server accepted batch `seq`: forget it.
    pub fn remove(&mut self, seq: u64) {
        self.finish(seq);
    }

    /// The server will never accept batch `seq` (400, 413, 422): copy it to `rejected/` with the
    /// server's answer beside it, and go on with the next.
    pub fn reject(&mut self, seq: u64, answer: &str) {
        self.stats.rejected_total += 1;
        let Some(e) = self.entries.iter().find(|e| e.seq == seq) else { return };
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
        self.finish(seq);
    }

    /// Batch `seq` leaves the queue: record that on disk and delete segments left with nothing
    /// to deliver.
    fn finish(&mut self, seq: u64) {
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
                let gone = self.segments.front().is_some_and(|s| s.id == segment && s.deletable());
                // The oldest segment is deleted right away, so its batch needs no `D` record.
                if !gone {
                    self.scratch.clear();
                    encode_done(&mut self.scratch, seq);
                    if let Err(e) = self.append_scratch() {
                        // The batch may be sent again after a restart; nothing is lost.
                        tracing::warn!("outbox {}: cannot record a delivered batch: {e}", self.dir.display());
                    }
                }
                self.delete_done_segments();
            }
        }
    }

    /// Delete segments, oldest first, that hold no batch still to deliver and that this run is
    /// not appending to.
    fn delete_done_segments(&mut self) {
        while self.segments.front().is_some_and(Segment::deletable) {
            if let Some(s) = self.segments.pop_front()
                && let Err(e) = std::fs::remove_file(&s.path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!("outbox: cannot delete the delivered segment {}: {e}", s.path.display());
            }
        }
    }

    fn enforce_limits(&mut self, now_unix: i64) {
        let max_age = i64::try_from(self.limits.max_age.as_secs()).unwrap_or(i64::MAX);
        while let Some(front) = self.entries.front() {
            // The newest batch always stays, even when it alone is over the size bound.
            let too_big = self.stats.bytes > self.limits.max_bytes && self.entries.len() > 1;
            let too_old = now_unix.saturating_sub(front.timestamp) > max_age;
            if !too_big && !too_old {
                break;
            }
            let (seq, timestamp) = (front.seq, front.timestamp);
            let why = if too_big { "size limit" } else { "age limit" };
            self.finish(seq);
            self.stats.dropped_total += 1;
            tracing::warn!(
                batch_timestamp = timestamp,
                dropped_total = self.stats.dropped_total,
                "outbox over its {why} ({} bytes, {} s): dropped the oldest batch",
                self.limits.max_bytes,
                self.limits.max_age.as_secs()
            );
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

/// Take the directory's `.lock` (an exclusive `flock`, released when the file is closed) and
/// write this process id into it, so that two agents never append to the same segments.
fn lock_dir(dir: &Path) -> std::io::Result<File> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join(".lock");
    let mut f = File::options().read(true).write(true).create(true).truncate(false).mode(0o600).open(&path)?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::WouldBlock {
            return Err(e);
        }
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        let holder: String = holder.chars().filter(char::is_ascii_digit).take(10).collect();
        return Err(std::io::Error::other(format!(
            "another dcmon-agent (pid {}) uses this outbox directory",
            if holder.is_empty() { "unknown" } else { &holder }
        )));
    }
    f.set_len(0)?;
    writeln!(f, "{}", std::process::id())?;
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

    #[test]
    fn the_record_format_is_stable() {
        // Segments outlive upgrades: these bytes were written by the format!-based encoder
        // that the first releases shipped, and must read (and be written) the same forever.
        let pinned = "DCMB2 B 000000000000001f -5 7 f154f0fe\n{\"a\":1}\n\
                      DCMB2 B ffffffffffffffff 9223372036854775807 0 5a4d36f1\n\n\
                      DCMB2 D 000000000000001f 2d35bf60\n";
        let mut seg = Vec::new();
        encode_batch(&mut seg, 0x1f, -5, b"{\"a\":1}");
        encode_batch(&mut seg, u64::MAX, i64::MAX, b"");
        encode_done(&mut seg, 0x1f);
        assert_eq!(String::from_utf8(seg).expect("utf8"), pinned);
        assert_eq!(batch_record_len(0x1f, -5, b"{\"a\":1}"), 47);
        assert_eq!(batch_record_len(u64::MAX, i64::MAX, b""), 57);
        let records = parse_segment(pinned.as_bytes());
        assert!(
            matches!(
                records[..],
                [
                    Record::Batch { seq: 0x1f, timestamp: -5, body: b"{\"a\":1}", crc: 0xf154_f0fe, .. },
                    Record::Batch { seq: u64::MAX, timestamp: i64::MAX, body: b"", .. },
                    Record::Done { seq: 0x1f }
                ]
            ),
            "{records:?}"
        );
    }

    #[test]
    fn records_round_trip_and_damage_is_named() {
        let mut seg = Vec::new();
        encode_batch(&mut seg, 7, 100, b"{\"a\":1}");
        encode_done(&mut seg, 7);
        assert_eq!(batch_record_len(7, 100, b"{\"a\":1}"), (seg.len() - 34) as u64, "a D record is 34 bytes");
        let records = parse_segment(&seg);
        assert!(
            matches!(
                records[..],
                [Record::Batch { seq: 7, timestamp: 100, body: b"{\"a\":1}", .. }, Record::Done { seq: 7 }]
            ),
            "{records:?}"
        );

        let mut flipped = seg.clone();
        flipped[45] ^= 1; // in the body
        assert!(matches!(parse_segment(&flipped)[0], Record::Damaged { offset: 0, why: Corrupt::Checksum, .. }));
        let mut flipped = seg.clone();
        flipped[12] ^= 1; // in the header's seq
        assert!(matches!(parse_segment(&flipped)[0], Record::Damaged { why: Corrupt::Checksum, .. }));
        let mut flipped = seg.clone();
        flipped[1] = b'x'; // the magic itself: resume at the next header line
        let records = parse_segment(&flipped);
        assert!(matches!(
            records[..],
            [Record::Damaged { offset: 0, why: Corrupt::Header, .. }, Record::Done { seq: 7 }]
        ));

        let mut longer = seg.clone();
        longer.splice(0..0, b"garbage\nmore garbage\n".iter().copied());
        let records = parse_segment(&longer);
        assert!(matches!(
            records[..],
            [Record::Damaged { offset: 0, len: 21, .. }, Record::Batch { .. }, Record::Done { .. }]
        ));
    }

    #[test]
    fn every_cut_of_a_segment_keeps_the_complete_records() {
        // A power cut can leave any prefix of a segment: each must read as the records wholly
        // inside it, plus at most a torn tail.
        let mut seg = Vec::new();
        let mut ends = Vec::new();
        for i in 0..3 {
            encode_batch(&mut seg, i, 1000 + i as i64, &body(i as u32));
            ends.push((seg.len(), 1u32));
        }
        encode_done(&mut seg, 0);
        ends.push((seg.len(), 0));
        for cut in 0..=seg.len() {
            let records = parse_segment(&seg[..cut]);
            let complete = ends.iter().filter(|(end, _)| *end <= cut).count();
            let whole: Vec<_> = records.iter().filter(|r| !matches!(r, Record::Damaged { .. })).collect();
            assert_eq!(whole.len(), complete, "cut at {cut}: {records:?}");
            let torn = records.iter().filter(|r| matches!(r, Record::Damaged { why: Corrupt::Torn, .. })).count();
            assert_eq!(torn, usize::from(!ends.iter().any(|(end, _)| *end == cut) && cut > 0), "cut at {cut}");
            assert!(
                records.iter().all(|r| !matches!(r, Record::Damaged { why: Corrupt::Checksum | Corrupt::Header, .. }))
            );
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
}
