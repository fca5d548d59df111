//! Outbox tests of opening: segments that cannot be opened or read, the log line that says
//! delivery resumes, how new segments are numbered, the size a segment is read up to, and which
//! segments are held open.

use super::*;
use crate::outbox::segment::OPEN_SEGMENTS_MAX;

/// Write segment `id` into `dir`: batch `seq` (body [`body`]), and its done record when `done`.
pub(super) fn write_segment(dir: &Path, id: u64, seq: u64, done: bool) -> PathBuf {
    let mut seg = Vec::new();
    encode_batch(&mut seg, seq, 1, &body(u32::try_from(seq).expect("small")));
    if done {
        encode_done(&mut seg, seq);
    }
    let path = dir.join(format!("{id:016x}.seg"));
    std::fs::write(&path, seg).expect("segment");
    path
}

#[test]
fn a_segment_that_cannot_be_opened_is_counted_and_named_and_the_others_delivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_segment(dir.path(), 0, 0, false);
    // Not `InvalidData` (what is not a regular file): that one holds nothing an agent wrote.
    let dangling = dir.path().join("0000000000000001.seg");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).expect("symlink");
    write_segment(dir.path(), 2, 1, false);

    let err = inspect(dir.path()).expect_err("inspect cannot read segment 1");
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
    assert!(err.to_string().starts_with(&format!("{}: ", dangling.display())), "names the file: {err}");
    let (mut o, log) = logged(|| Outbox::open(dir.path(), LIMITS, 0));
    assert!(
        log.contains(&format!("cannot read {}", dangling.display())) && log.contains("skipping its batches"),
        "{log}"
    );
    assert_eq!(o.stats().corrupt_total, 1);
    assert_eq!(drain(&mut o), [body(0), body(1)]);
}

#[test]
fn a_segment_whose_reading_fails_is_counted_and_named_and_the_others_delivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_segment(dir.path(), 0, 0, false);
    // A regular file that opens but cannot be read: nothing is mapped at address 0.
    let unreadable = dir.path().join("0000000000000001.seg");
    std::os::unix::fs::symlink("/proc/self/mem", &unreadable).expect("symlink");
    write_segment(dir.path(), 2, 1, false);

    let (mut o, log) = logged(|| Outbox::open(dir.path(), LIMITS, 0));
    assert!(
        log.contains(&format!("cannot read {} (", unreadable.display())) && log.contains("skipping the rest of it"),
        "{log}"
    );
    assert_eq!(o.stats().corrupt_total, 1);
    assert_eq!(drain(&mut o), [body(0), body(1)]);
}

#[test]
fn resuming_delivery_is_logged_only_when_an_earlier_run_left_batches() {
    const RESUMING: &str = "resuming delivery of batches left by an earlier run";
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut o, log) = logged(|| Outbox::open(dir.path(), LIMITS, 0));
    assert!(!log.contains(RESUMING), "{log}");
    o.push(0, body(0));
    o.push(0, body(1));
    drop(o);
    let (mut o, log) = logged(|| Outbox::open(dir.path(), LIMITS, 0));
    assert!(log.contains(RESUMING) && log.contains("batches=2"), "{log}");
    assert_eq!(drain(&mut o), [body(0), body(1)]);
    drop(o);
    let (_o, log) = logged(|| Outbox::open(dir.path(), LIMITS, 0));
    assert!(!log.contains(RESUMING), "{log}");
}

#[test]
fn new_segments_are_numbered_past_every_segment_found_even_one_deleted_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_segment(dir.path(), 5, 0, true);
    let mut o = Outbox::open(dir.path(), LIMITS, 0);
    assert!(segments(dir.path()).is_empty(), "a segment with nothing left to deliver is deleted");
    o.push(0, body(1));
    assert_eq!(segments(dir.path()), [dir.path().join("0000000000000006.seg")]);
}

/// A segment named with the largest number there is (no agent writes one): `id + 1` overflowed
/// at open, a panic in a debug build.
#[test]
fn a_segment_with_the_last_number_there_is_is_read_and_not_numbered_past() {
    let dir = tempfile::tempdir().expect("tempdir");
    let last = write_segment(dir.path(), u64::MAX, 0, false);
    write_segment(dir.path(), 3, 1, false);
    let (mut o, log) = logged(|| Outbox::open(dir.path(), LIMITS, 0));
    assert!(log.contains(&format!("{} has the last segment number there is", last.display())), "{log}");
    o.push(0, body(2));
    assert!(dir.path().join("0000000000000004.seg").exists(), "{:?}", segments(dir.path()));
    let mut got = drain(&mut o);
    got.sort();
    assert_eq!(got, [body(0), body(1), body(2)]);
}

#[test]
fn a_segment_of_exactly_the_read_maximum_is_read() {
    // One byte more is moved aside unread: `a_huge_segment_or_declared_length_is_not_read_into_memory`.
    let dir = tempfile::tempdir().expect("tempdir");
    let seg = dir.path().join("0000000000000000.seg");
    File::create(&seg).and_then(|f| f.set_len(SEGMENT_READ_MAX)).expect("sparse file");
    let o = Outbox::open(dir.path(), LIMITS, 0);
    assert!(!dir.path().join("corrupt/0000000000000000.seg.oversized").exists(), "set aside unread");
    // Read: zeros are one record cut short, copied aside; the segment is cut to nothing.
    assert_eq!(o.stats().corrupt_total, 1);
    assert!(dir.path().join("corrupt/0000000000000000-at0000000000.batch").exists());
    assert!(!seg.exists());
}

#[test]
fn the_oldest_segments_with_batches_left_are_held_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths: Vec<PathBuf> = (0..10).map(|id| write_segment(dir.path(), id, id, id == 2)).collect();
    let o = Outbox::open(dir.path(), LIMITS, 0);
    let mut held = files_open_under(dir.path());
    held.retain(|p| p.extension().is_some_and(|x| x == "seg"));
    held.sort();
    // Segment 2 has nothing left; one place is kept for the segment appended to.
    let want: Vec<PathBuf> = [0, 1, 3, 4, 5, 6, 7].into_iter().map(|i: usize| paths[i].clone()).collect();
    assert_eq!(want.len(), OPEN_SEGMENTS_MAX - 1);
    assert_eq!(held, want);
    drop(o);
}

// Issue 22: once this run's segments push the files held open past OPEN_SEGMENTS_MAX, the
// newest of the read-only ones is closed (it is read last, and opened again then), never the
// one appended to nor the oldest ones, which are read next.
#[test]
fn past_the_limit_the_newest_read_only_segment_is_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths: Vec<PathBuf> = (0..10).map(|id| write_segment(dir.path(), id, id, false)).collect();
    // Two records to a segment of this run's.
    let one = batch_record_len(10, 1, &body(10));
    let limits = OutboxLimits { max_bytes: 8 * 2 * one, max_age: Duration::from_secs(3600) };
    let mut o = Outbox::open(dir.path(), limits, 0);
    for i in 10..13 {
        o.push(1, body(i));
    }
    assert_eq!(o.stats().in_memory, 0, "{:?}", o.persist_error());
    let ours = segments(dir.path());
    assert_eq!(ours.len(), 12, "{ours:?}");
    let mut held = files_open_under(dir.path());
    held.retain(|p| p.extension().is_some_and(|x| x == "seg"));
    held.sort();
    // 0..=6 held since open; this run's first segment (full, read-only now) closed; its second
    // (appended to) open.
    let mut want: Vec<PathBuf> = paths[..7].to_vec();
    want.push(ours[11].clone());
    assert_eq!(held, want);
    assert_eq!(drain(&mut o), (0..13).map(body).collect::<Vec<_>>());
}

// Issue 22: a delivered segment that cannot be deleted is logged, naming it and why; one that is
// already gone (deleted by someone else) is nothing to report.
#[test]
fn a_delivered_segment_that_cannot_be_deleted_is_logged_and_one_already_gone_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gone = write_segment(dir.path(), 0, 0, false);
    let stuck = write_segment(dir.path(), 1, 1, false);
    let mut o = Outbox::open(dir.path(), LIMITS, 0);
    let (seq, b) = o.oldest().expect("batch 0");
    assert_eq!(b, body(0));
    std::fs::remove_file(&gone).expect("rm");
    let ((), log) = logged(|| o.remove(seq));
    assert!(!log.contains("cannot delete"), "{log}");
    let (seq, b) = o.oldest().expect("batch 1");
    assert_eq!(b, body(1));
    // A directory where the segment was: unlink(2) fails with EISDIR.
    std::fs::remove_file(&stuck).expect("rm");
    std::fs::create_dir(&stuck).expect("mkdir");
    std::fs::write(stuck.join("x"), "x").expect("write");
    let ((), log) = logged(|| o.remove(seq));
    let line = format!("cannot delete the delivered segment {}: Is a directory", stuck.display());
    assert_eq!(log.matches(&line).count(), 1, "{log}");
    assert_eq!(o.stats().batches, 0);
}

// Issue 22: the bound on what is read of a segment leaves room for the longest segment a writer
// makes: records start below the largest segment size, and the last may be the longest record
// there is (the longest header, a body of MAX_BODY_BYTES).
#[test]
fn the_read_maximum_holds_the_longest_segment_a_writer_makes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = Outbox::open(dir.path(), OutboxLimits { max_bytes: u64::MAX, ..LIMITS }, 0);
    let largest_segment = o.segment_bytes();
    // Zeroed pages are not touched: this costs no 256 MiB of memory.
    let max_body = vec![0u8; usize::try_from(MAX_BODY_BYTES).expect("256 MiB fits")];
    let longest_record = batch_record_len(u64::MAX, i64::MIN, &max_body);
    let longest_segment = largest_segment - 1 + longest_record;
    assert!(longest_segment <= SEGMENT_READ_MAX, "{longest_segment} > {SEGMENT_READ_MAX}");
}
