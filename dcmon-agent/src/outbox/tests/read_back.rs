//! Outbox tests of reading a batch back from its segment for sending.

use super::*;

// Issue 22: a batch that cannot be read back when its turn comes (its segment cut short
// underneath after the batches before it were delivered) is skipped, logged and counted,
// never sent, and the queue goes on.
#[test]
fn a_batch_that_cannot_be_read_back_is_skipped_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = Outbox::open(dir.path(), LIMITS, 0);
    for i in 0..6 {
        o.push(i, body(u32::try_from(i).expect("small"))); // 0..3 cached, 4 and 5 not
    }
    for i in 0..4 {
        let (seq, b) = o.oldest().expect("queued");
        assert_eq!(b, body(i));
        o.remove(seq);
    }
    let seg = &segments(dir.path())[0];
    let one = batch_record_len(0, 0, &body(0));
    File::options().write(true).open(seg).and_then(|f| f.set_len(4 * one + 5)).expect("truncate");
    let (got, log) = logged(|| o.oldest());
    assert_eq!(got, None, "{log}");
    assert_eq!(o.stats().corrupt_total, 2, "batches 4 and 5 could not be read: {log}");
    assert_eq!(o.stats().batches, 0);
    assert_eq!(log.matches("cannot read batch").count(), 2, "{log}");
}
