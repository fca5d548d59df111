//! Outbox tests of recovery: opening after a crash, torn, corrupt, oversized and flipped records, and what is set aside in `corrupt/`.

use super::*;

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
