//! Outbox tests at the bounds the reader and the writer enforce: the longest body a record may
//! declare or hold, and the size and age bounds.

use super::*;

// Issue 22: a record may declare a body of exactly MAX_BODY_BYTES; only a longer one is
// oversize (set aside without reading its body). A segment whose header declares exactly the
// maximum but holds a short body is read as a batch of the wrong length, one byte more is
// oversize; either way the records around it are intact.
#[test]
fn a_declared_length_of_exactly_the_maximum_is_not_oversize() {
    let max = usize::try_from(MAX_BODY_BYTES).expect("256 MiB fits");
    for (declared, want) in [
        (MAX_BODY_BYTES, Corrupt::Length { expected: max, actual: 2 }),
        (MAX_BODY_BYTES + 1, Corrupt::Oversize { declared: MAX_BODY_BYTES + 1, max: MAX_BODY_BYTES }),
    ] {
        let mut seg = Vec::new();
        encode_batch(&mut seg, 0, 1, b"{}");
        let at = seg.len();
        let damaged = format!("DCMB2 B 0000000000000001 1 {declared} 00000000\n{{}}\n");
        seg.extend_from_slice(damaged.as_bytes());
        encode_batch(&mut seg, 2, 1, b"{}");
        let records = parse_segment(&seg);
        assert!(
            matches!(
                &records[..],
                [
                    Record::Batch { seq: 0, .. },
                    Record::Damaged { offset, len, why },
                    Record::Batch { seq: 2, .. },
                ] if *offset == at && *len == damaged.len() && *why == want
            ),
            "declared {declared}: {records:?}"
        );
    }
}

// Issue 22: the age bound drops batches older than `outbox_max_age`; one exactly that old
// stays until the next push after it.
#[test]
fn a_batch_exactly_max_age_old_is_kept_and_dropped_just_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t0 = Instant::now();
    let max_age = Duration::from_secs(60);
    let mut o = Outbox::open_at(dir.path().into(), OutboxLimits { max_bytes: 1 << 30, max_age }, 1000, t0);
    o.push_at(1000, body(0), t0);
    o.push_at(1060, body(1), t0 + max_age);
    assert_eq!((o.stats().batches, o.stats().dropped_total), (2, 0), "exactly max_age old: kept");
    o.push_at(1060, body(2), t0 + max_age + Duration::from_nanos(1));
    assert_eq!((o.stats().batches, o.stats().dropped_total), (2, 1), "older than max_age: dropped");
    assert_eq!(drain(&mut o), [body(1), body(2)]);
}

// Issue 22: the writer's bound is the reader's (above): a body of exactly MAX_BODY_BYTES is
// stored; one byte more is kept in memory, with the reason, since no reader would take its
// record. A repair (its segment deleted) writes the one again and leaves the other in memory.
#[test]
fn a_body_of_exactly_the_maximum_is_stored_and_one_byte_more_kept_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let max = usize::try_from(MAX_BODY_BYTES).expect("256 MiB fits");
    let record = batch_record_len(0, 1, &vec![0; max]);
    let mut o = Outbox::open(dir.path(), LIMITS, 0);
    o.push(1, Bytes::from(vec![b'x'; max]));
    assert_eq!(o.stats().in_memory, 0, "{:?}", o.persist_error());
    assert_eq!(segment_bytes_on_disk(dir.path()), record);
    o.push(2, Bytes::from(vec![b'y'; max + 1]));
    assert_eq!(o.stats().in_memory, 1);
    let why = o.persist_error().expect("the longer body is in memory");
    assert!(why.contains(&format!("over the {MAX_BODY_BYTES} bytes a record may hold")), "{why}");

    std::fs::remove_file(&segments(dir.path())[0]).expect("rm segment");
    o.sync_now();
    assert_eq!(o.stats().in_memory, 1, "only the longer body is still in memory");
    assert_eq!(segment_bytes_on_disk(dir.path()), record);
    assert_eq!(o.stats().batches, 2);
}
