//! The durable outbox: every batch is written to disk before it is sent, and leaves only when
//! every output has delivered it (or refused it for good), or a bound dropped it.
//!
//! # Outputs and cursors
//! Several outputs (the dcmon server, remote_write receivers: [`crate::output`]) deliver the
//! same batches, each at its own pace: each has a cursor, the first batch it has not finished
//! ([`Outbox::oldest_for`], [`Outbox::delivered`], [`Outbox::gave_up`]). A batch leaves once
//! every configured output ([`Outbox::set_outputs`]) is past it; an output taken out of the
//! config no longer holds batches, and one with no saved cursor starts at the oldest batch
//! waiting. Cursor advances are persisted as `C` records (see [`record`]), so a restart or a
//! kill -9 resumes each output where it was; a lost `C` record means resending, never losing.
//! The size and age bounds drop batches for every output. Until `set_outputs` is called the
//! only output is [`DCMON_OUTPUT`], which is the single-output behaviour of earlier releases.
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
//!
//! # Files
//! [`record`] the record codec; `segment` the segment files and their fsync; `writer` appends;
//! `open` indexes what earlier runs left; `queue` hands out the oldest batch and applies the
//! bounds; `cursor` the outputs' cursors and counters; `repair` puts right files changed underneath the agent; `set_aside` the `corrupt/`
//! and `rejected/` folders; `lock` one agent per directory; `handle` the outbox shared by the
//! daemon loop and delivery.

mod cursor;
mod handle;
mod lock;
mod open;
mod queue;
mod record;
mod repair;
mod segment;
mod set_aside;
mod writer;

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;

pub use self::cursor::OutputStats;
pub use self::handle::{PushWatch, SharedOutbox};
pub use self::open::{StoredBatch, inspect};
use self::queue::DropLog;
pub use self::record::{
    Corrupt, MAX_BODY_BYTES, OUTPUT_NAME_MAX, Record, batch_record_len, encode_batch, encode_cursor, encode_done,
    parse_segment, valid_output_name,
};
use self::segment::Segment;
pub use self::segment::SyncJob;
use crate::batch::Sample;
pub use crate::output::DCMON_OUTPUT;

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
    /// Batches the dcmon server refused for good (400, 413, 422) since start.
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
    /// The outputs that deliver from this outbox, in config order.
    outputs: Vec<String>,
    /// Each output's cursor: the lowest seq it has not finished. Read back from `C` records at
    /// open; kept for an output taken out of the config, in case a reload brings it back.
    cursors: BTreeMap<String, u64>,
    /// Per-output counters since start, kept across reloads.
    output_stats: BTreeMap<String, OutputStats>,
    /// Record bytes being assembled (kept to reuse the allocation).
    scratch: Vec<u8>,
}

#[cfg(test)]
mod tests;
