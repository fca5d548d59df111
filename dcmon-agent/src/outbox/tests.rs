//! The outbox's unit tests: the queue, its files and their damage, on real directories.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::queue::DROP_LOG_EVERY;
use super::segment::{SEGMENT_READ_MAX, list_segments};
use super::set_aside::SET_ASIDE_KEEP;
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
    let reason = std::fs::read_to_string(dir.path().join("rejected/0000000000000005-5.batch.reason")).expect("reason");
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
    dcmon_tests::require_root("mounting a small tmpfs");
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
    assert!(msg.contains(&dir.path().display().to_string()) && msg.contains(&format!("pid {}", std::process::id())));
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
