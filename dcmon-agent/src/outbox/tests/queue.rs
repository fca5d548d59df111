//! Outbox tests of the queue itself: push, deliver, reject, fsync, segment rotation, the size and age bounds and their accounting, and the drop logs.

use super::*;

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

// Issue 22: a segment takes records until it holds an eighth of the size bound, exactly: a
// record that would start at that length goes to a new segment.
#[test]
fn a_segment_takes_records_until_it_holds_an_eighth_of_the_size_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = batch_record_len(0, 7, &fixed(0));
    let limits = OutboxLimits { max_bytes: 8 * 2 * one, max_age: Duration::from_secs(3600) };
    let mut o = Outbox::open(dir.path(), limits, 0);
    for i in 0..5 {
        o.push(7, fixed(i));
    }
    let sizes: Vec<u64> = segments(dir.path()).iter().map(|p| std::fs::metadata(p).expect("segment").len()).collect();
    assert_eq!(sizes, [2 * one, 2 * one, one]);
    assert_eq!(drain(&mut o), (0..5).map(fixed).collect::<Vec<_>>());
    drop(o);

    // A segment this run still appends to goes as soon as it is full and delivered, with no
    // `D` record (which would have started a new segment): here one record fills it.
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = OutboxLimits { max_bytes: 8 * one, ..limits };
    let mut o = Outbox::open(dir.path(), limits, 0);
    o.push(7, fixed(0));
    assert_eq!(segment_bytes_on_disk(dir.path()), one);
    assert_eq!(drain(&mut o), [fixed(0)]);
    assert!(segments(dir.path()).is_empty(), "{:?}", segments(dir.path()));
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

// Issue 22: a config reload's new bounds (`set_limits`) apply from the next push, and the
// directory the shutdown line names is the outbox's.
#[test]
fn new_bounds_apply_from_the_next_push() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = Outbox::open(dir.path(), LIMITS, 0);
    assert_eq!(o.dir(), dir.path());
    for i in 0..3 {
        o.push(0, body(i));
    }
    o.set_limits(OutboxLimits { max_bytes: 1, max_age: LIMITS.max_age });
    assert_eq!((o.stats().batches, o.stats().dropped_total), (3, 0), "nothing dropped until the next push");
    o.push(0, body(3));
    assert_eq!((o.stats().batches, o.stats().dropped_total), (1, 3), "all but the newest over a 1-byte bound");
    assert_eq!(drain(&mut o), [body(3)]);
}

// Issue 22: a "done" record that cannot be written is logged once per distinct error, and
// when writing works again that is said once.
#[test]
fn a_done_record_that_cannot_be_written_is_logged_once_and_its_recovery_once() {
    dcmon_tests::require_root("mounting a small tmpfs");
    let fs = SmallFs::mount("64k");
    let outbox = fs.0.path().join("outbox");
    let mut o = Outbox::open(&outbox, LIMITS, 0);
    // Records of exactly one page: tmpfs then needs a new page for the next byte.
    // (Bodies of 1000 to 9999 bytes have headers of one length.)
    let header = usize::try_from(batch_record_len(0, 0, &[b'x'; 4000])).expect("small") - 4000;
    let page = Bytes::from(format!("\"{}\"", "x".repeat(4096 - header - 2)));
    for _ in 0..2 {
        o.push(0, page.clone());
    }
    assert_eq!(segment_bytes_on_disk(&outbox), 8192);
    // Fill the rest of the file system.
    let filler_path = fs.0.path().join("filler");
    let mut filler = File::create(&filler_path).expect("filler");
    while std::io::Write::write_all(&mut filler, &[0; 4096]).is_ok() {}
    drop(filler);

    let ((), log) = logged(|| {
        o.remove(0);
        o.remove(1);
    });
    assert_eq!(log.matches("cannot record delivered batches").count(), 1, "{log}");
    assert!(log.contains("No space left"), "{log}");
    std::fs::remove_file(&filler_path).expect("free the space");
    let ((), log) = logged(|| {
        o.push(0, body(2));
        o.remove(2);
        o.push(0, body(3));
        o.remove(3);
    });
    assert_eq!(log.matches("delivered batches are recorded again").count(), 1, "{log}");
    assert!(!log.contains("cannot record delivered batches"), "{log}");
    drop(o);
    let left: Vec<u64> = inspect(&outbox).expect("inspect").iter().map(|b| b.seq).collect();
    assert_eq!(left, [0, 1], "2 and 3 are marked done; 0 and 1 will be sent again");
}

// Issue 22: an fsync that fails (here the directory's: it was moved away) is logged once however
// often it fails, leaves the data due, and its recovery is logged once it works again.
#[test]
fn a_failed_fsync_is_logged_once_leaves_the_data_due_and_its_recovery_is_logged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = dir.path().join("outbox");
    let moved = dir.path().join("moved");
    let mut o = Outbox::open(&outbox, LIMITS, 0);
    o.push(1, body(1));
    o.push(2, body(2));
    let job = o.sync_job().expect("a new segment to sync");
    assert!(job.dir_needed);
    std::fs::rename(&outbox, &moved).expect("mv");
    let ((), log) = logged(|| {
        for _ in 0..2 {
            let result = job.run();
            assert!(result.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound), "{result:?}");
            o.sync_finished(&job, result);
        }
    });
    let line = format!("fsync of {} failed: No such file or directory", outbox.display());
    assert_eq!(log.matches(&line).count(), 1, "{log}");
    assert!(o.backlog_needs_sync(), "the data stays due");
    std::fs::rename(&moved, &outbox).expect("mv back");
    let ((), log) = logged(|| {
        let job = o.sync_job().expect("still due");
        let result = job.run();
        assert!(result.is_ok(), "{result:?}");
        o.sync_finished(&job, result);
    });
    assert_eq!(log.matches(&format!("fsync works again (was: {line}")).count(), 1, "{log}");
    assert!(!o.backlog_needs_sync());
    assert!(o.sync_job().is_none());
}

// Issue 22: the size bound counts the segment files too, which can hold more than the batches
// queued: here a delivered batch that shares its segment with one still queued, and the `D`
// record of its delivery. Counting the queued batches alone would leave the files over the bound.
#[test]
fn the_size_bound_counts_delivered_records_still_on_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = batch_record_len(0, 7, &fixed(0));
    // Segments of two records; the bound holds sixteen.
    let limits = OutboxLimits { max_bytes: 16 * one, max_age: Duration::from_secs(3600) };
    let mut o = Outbox::open(dir.path(), limits, 0);
    for i in 0..16 {
        o.push(7, fixed(i));
    }
    assert_eq!((o.stats().batches, o.stats().dropped_total), (16, 0));
    let (seq, _) = o.oldest().expect("batch 0");
    o.remove(seq);
    assert_eq!(o.stats().bytes, 15 * one);
    o.push(7, fixed(16));
    let on_disk = segment_bytes_on_disk(dir.path());
    assert!(on_disk <= 16 * one, "{on_disk} bytes on disk, bound {}", 16 * one);
    assert_eq!(o.stats().dropped_total, 1, "batch 1, and its segment with batch 0 went");
}
