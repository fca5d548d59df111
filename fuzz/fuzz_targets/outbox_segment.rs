//! An outbox segment file as found on disk after a crash, a torn write or bit rot; and the
//! records the agent writes, read back.
#![no_main]
use dcmon_agent::outbox::{Record, encode_batch, encode_cursor, encode_done, parse_segment};
use libfuzzer_sys::fuzz_target;

/// The bytes of the segment each record covers (done and cursor records carry no offset).
fn span(record: &Record<'_>) -> Option<(usize, usize)> {
    match record {
        Record::Batch { body_offset, body, .. } => Some((*body_offset, body_offset + body.len() + 1)),
        Record::Damaged { offset, len, .. } => Some((*offset, offset + len)),
        Record::Done { .. } | Record::Cursor { .. } => None,
    }
}

fn check(data: &[u8]) -> Vec<Record<'_>> {
    let records = parse_segment(data);
    let mut end_of_last = 0;
    for r in &records {
        if let Record::Batch { body_offset, body, .. } = r {
            assert_eq!(&data[*body_offset..body_offset + body.len()], *body, "body is where it says");
            assert_eq!(data.get(body_offset + body.len()), Some(&b'\n'), "body ends its line");
        }
        if let Some((start, end)) = span(r) {
            assert!(start < end && end <= data.len(), "{r:?} within the {} input bytes", data.len());
            assert!(start >= end_of_last, "{r:?} overlaps or precedes the record before it");
            end_of_last = end;
        }
    }
    records
}

fuzz_target!(|data: &[u8]| {
    check(data);
    // What the agent writes (a body is one line of JSON) parses back as written. Each run
    // writes segments of its own, so a record never follows another run's torn tail.
    let body: Vec<u8> = data.iter().copied().filter(|&b| b != b'\n').take(256).collect();
    let seq = u64::from(data.first().copied().unwrap_or(0)) << 56 | data.len() as u64;
    let timestamp = i64::from_le_bytes(data.get(..8).and_then(|b| b.try_into().ok()).unwrap_or_default());
    let mut segment = Vec::new();
    let crc = encode_batch(&mut segment, seq, timestamp, &body);
    let body_offset = segment.len() - body.len() - 1;
    // An output name from the input where a record can carry it (printable, no space), else
    // a fixed one: either way the cursor record reads back as written.
    let name: String = data.iter().rev().map(|&b| b as char).filter(char::is_ascii_graphic).take(64).collect();
    let output = if name.is_empty() { "dcmon".to_owned() } else { name };
    assert!(encode_cursor(&mut segment, &output, seq), "{output:?} fits a cursor record");
    encode_done(&mut segment, seq);
    assert_eq!(
        check(&segment),
        [
            Record::Batch { seq, timestamp, body_offset, body: &body, crc },
            Record::Cursor { output, seq },
            Record::Done { seq }
        ],
        "{:?}",
        String::from_utf8_lossy(&segment)
    );
});
