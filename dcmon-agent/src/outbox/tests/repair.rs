//! Outbox tests of putting right files deleted underneath the agent: what is noticed when,
//! what is rewritten, what is counted lost, and the lock taken again.

use super::opening::write_segment;
use super::*;

// Issue 22: a segment file deleted (the directory left alone) after the last push is noticed
// at shutdown, and its batches, still readable from the open file, are rewritten.
#[test]
fn a_segment_file_deleted_after_the_last_push_is_rewritten_at_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = Outbox::open(dir.path(), LIMITS, 0);
    for i in 0..6 {
        o.push(i, body(u32::try_from(i).expect("small"))); // 4 and 5 are not cached
    }
    std::fs::remove_file(&segments(dir.path())[0]).expect("rm segment");
    let ((), log) = logged(|| o.sync_now());
    assert!(
        log.contains(
            "1 segment file(s) were deleted while the agent ran; rewrote the 6 batches still readable, 0 could not be read back"
        ),
        "{log}"
    );
    let stored: Vec<i64> = inspect(dir.path()).expect("inspect").iter().map(|b| b.timestamp).collect();
    assert_eq!(stored, [0, 1, 2, 3, 4, 5]);
    assert_eq!(o.stats().bytes, segment_bytes_on_disk(dir.path()), "the rewritten records, counted once");
    assert_eq!(o.stats().in_memory, 0);
    drop(o);
    let mut o = Outbox::open(dir.path(), LIMITS, 0);
    assert_eq!(drain(&mut o), (0..6).map(body).collect::<Vec<_>>());
}

// Issue 22: the check at shutdown finds nothing to put right in an outbox left alone, nor in
// one kept in memory because another agent holds the directory.
#[test]
fn shutdown_rewrites_nothing_when_nothing_was_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut first = Outbox::open(dir.path(), LIMITS, 0);
    first.push(0, body(0));
    let mut second = Outbox::open(dir.path(), LIMITS, 0);
    second.push(1, body(1));
    let ((), log) = logged(|| {
        first.sync_now();
        second.sync_now();
    });
    assert!(!log.contains("deleted while the agent ran"), "{log}");
    assert_eq!(second.stats().in_memory, 1);
    let stored: Vec<i64> = inspect(dir.path()).expect("inspect").iter().map(|b| b.timestamp).collect();
    assert_eq!(stored, [0], "only the lock holder writes");
}

// Issue 22: at open, the oldest segments with batches left are held open (7 of them) and the
// others are opened when their turn comes. When the directory is deleted, what is held open is
// read back and rewritten; the batches only in the files not open are lost, counted and said
// so; and the recreated directory is locked again, against a second agent.
#[test]
fn a_deleted_directory_loses_only_the_batches_of_segments_not_held_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = dir.path().join("outbox");
    std::fs::create_dir(&outbox).expect("mkdir");
    for id in 0..10 {
        write_segment(&outbox, id, id, false);
    }
    let mut o = Outbox::open(&outbox, LIMITS, 0);
    std::fs::remove_dir_all(&outbox).expect("rm -r");
    let ((), log) = logged(|| o.push(1, body(10)));
    assert!(
        log.contains(
            "the directory was deleted while the agent ran; recreated it and rewrote the 7 batches still readable, 3 could not be read back and are lost"
        ),
        "{log}"
    );
    assert_eq!(o.stats().corrupt_total, 3);
    assert_eq!(o.stats().batches, 8);
    assert_eq!(o.stats().in_memory, 0);
    assert_eq!(o.stats().bytes, segment_bytes_on_disk(&outbox));
    let stored: Vec<u64> = inspect(&outbox).expect("recreated").iter().map(|b| b.seq).collect();
    assert_eq!(stored, [0, 1, 2, 3, 4, 5, 6, 10]);
    let lock = std::fs::read_to_string(outbox.join(".lock")).expect("lock file in the new directory");
    assert_eq!(lock.trim(), std::process::id().to_string());
    assert!(Outbox::open_exclusive(&outbox, LIMITS, 0).is_err(), "the new directory is locked");
    let want: Vec<Bytes> = (0..7).chain([10]).map(body).collect();
    assert_eq!(drain(&mut o), want);
}

// Issue 22: a segment cut short underneath keeps the batches before the cut; once those are
// delivered it is deleted like any other (its count of batches left took off the ones
// rewritten and the ones lost).
#[test]
fn a_segment_cut_short_is_deleted_once_the_batches_left_in_it_are_delivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = Outbox::open(dir.path(), LIMITS, 0);
    for i in 0..6 {
        o.push(i, body(u32::try_from(i).expect("small"))); // 0..3 cached, 4 and 5 not
    }
    let cut = segments(dir.path())[0].clone();
    let one = batch_record_len(0, 0, &body(0));
    File::options().write(true).open(&cut).and_then(|f| f.set_len(3 * one + 5)).expect("truncate");
    o.push(6, body(6));
    assert_eq!(o.stats().corrupt_total, 2, "batches 4 and 5 were only on disk past the cut");
    for i in 0..3 {
        let (seq, b) = o.oldest().expect("queued");
        assert_eq!(b, body(i));
        o.remove(seq);
    }
    let left = segments(dir.path());
    assert!(!left.contains(&cut), "the cut segment went with its last batch: {left:?}");
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(drain(&mut o), [body(3), body(6)]);
}

// Issue 22: after a repair the first batches' bodies stay in memory (as after a push) and the
// others are read back from the new segment when their turn comes, checked: one damaged there
// is set aside and counted, never sent.
#[test]
fn after_a_repair_the_bodies_not_kept_in_memory_are_checked_when_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = Outbox::open(dir.path(), LIMITS, 0);
    for i in 0..6 {
        o.push(i, body(u32::try_from(i).expect("small")));
    }
    std::fs::remove_file(&segments(dir.path())[0]).expect("rm segment");
    o.sync_now();
    let seg = &segments(dir.path())[0];
    let data = std::fs::read(seg).expect("read");
    let bodies: Vec<usize> = parse_segment(&data)
        .iter()
        .filter_map(|r| match r {
            Record::Batch { body_offset, .. } => Some(*body_offset),
            _ => None,
        })
        .collect();
    assert_eq!(bodies.len(), 6);
    let file = File::options().write(true).open(seg).expect("open");
    for at in bodies {
        // `{"batch": N}`: its `b` becomes `c`.
        file.write_all_at(b"c", u64::try_from(at + 2).expect("offset")).expect("write");
    }
    let (got, log) = logged(|| drain(&mut o));
    assert_eq!(got, (0..4).map(body).collect::<Vec<_>>(), "{log}");
    assert_eq!(o.stats().corrupt_total, 2, "{log}");
}

// Issue 22: a body kept in memory because it holds a raw newline is not written by a repair
// either (its record would not read back as written).
#[test]
fn a_repair_leaves_in_memory_a_body_no_record_can_hold() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = Outbox::open(dir.path(), LIMITS, 0);
    o.push(0, body(0));
    o.push(1, Bytes::from_static(b"{\"a\":\n1}"));
    assert_eq!(o.stats().in_memory, 1);
    std::fs::remove_file(&segments(dir.path())[0]).expect("rm segment");
    o.sync_now();
    let stored: Vec<i64> = inspect(dir.path()).expect("inspect").iter().map(|b| b.timestamp).collect();
    assert_eq!(stored, [0]);
    assert_eq!(o.stats().in_memory, 1);
    assert_eq!(drain(&mut o), [body(0), Bytes::from_static(b"{\"a\":\n1}")]);
}

// Issue 22: a segment of this run emptied underneath (truncated to nothing) has its batches
// rewritten and is deleted at once, even behind an older segment that still has batches to send
// (deletion otherwise goes oldest first).
#[test]
fn a_segment_emptied_underneath_is_deleted_at_once_even_behind_one_still_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let older = write_segment(dir.path(), 0, 0, false);
    let mut o = Outbox::open(dir.path(), LIMITS, 0);
    o.push(1, body(1));
    o.push(2, body(2));
    let emptied = segments(dir.path())[1].clone();
    File::options().write(true).open(&emptied).and_then(|f| f.set_len(0)).expect("truncate");
    o.push(3, body(3));
    let left = segments(dir.path());
    assert_eq!(left.len(), 2, "{left:?}");
    assert_eq!(left[0], older);
    assert!(!left.contains(&emptied), "{left:?}");
    assert_eq!(o.stats().corrupt_total, 0, "batches 1 and 2 were in memory");
    assert_eq!(drain(&mut o), (0..4).map(body).collect::<Vec<_>>());
}
