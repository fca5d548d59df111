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
