//! Outbox tests at the bounds the reader enforces: the longest body a record may declare.

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
