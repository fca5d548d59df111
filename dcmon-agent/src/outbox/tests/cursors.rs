//! Outbox tests of several outputs (issue 16): a cursor per output, persisted in `C` records,
//! and a batch leaving only once every configured output is done with it.

use super::*;

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// What `output` still has to deliver, in order, without advancing it.
fn waiting_for(o: &mut Outbox, output: &str) -> Option<u64> {
    o.oldest_for(output).map(|(seq, _)| seq)
}

#[test]
fn a_batch_stays_until_every_output_has_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = Outbox::open(dir.path(), LIMITS, 100);
    o.set_outputs(&names(&["dcmon", "prom"]));
    for i in 0..3 {
        o.push(100 + i64::from(i), body(i));
    }
    // dcmon delivers all three; prom none yet.
    for expected in 0..3 {
        let (seq, b) = o.oldest_for("dcmon").expect("dcmon has a batch");
        assert_eq!((seq, b), (expected, body(u32::try_from(expected).expect("small"))));
        o.delivered("dcmon", seq);
    }
    assert_eq!(o.oldest_for("dcmon"), None, "dcmon is caught up");
    assert_eq!(o.stats().batches, 3, "prom still needs all three");
    assert_eq!(o.backlog_for("prom"), 3);
    assert_eq!(o.backlog_for("dcmon"), 0);
    assert_eq!(o.lag_secs("prom", 110), 10, "its oldest batch is from 100");
    assert_eq!(o.lag_secs("dcmon", 110), 0);
    assert_eq!(waiting_for(&mut o, "prom"), Some(0));
    o.delivered("prom", 0);
    assert_eq!(o.stats().batches, 2, "batch 0 is done for both and leaves");
    o.gave_up("prom", 1, "400 bad sample");
    assert_eq!(o.stats().batches, 1);
    assert_eq!(o.stats().rejected_total, 0, "only the dcmon server's refusals go to rejected/");
    assert!(!dir.path().join("rejected").exists());
    assert_eq!(o.output_stats("prom"), OutputStats { sent: 1, failed: 0, dropped: 1 });
    assert_eq!(o.output_stats("dcmon"), OutputStats { sent: 3, failed: 0, dropped: 0 });
    o.delivered("prom", 2);
    assert_eq!(o.stats().batches, 0);
    assert_eq!(o.oldest_for("unknown"), None, "an output not configured has nothing to send");

    // The self-metrics name each output.
    let samples = o.output_samples(200);
    let find = |name: &str, output: &str| {
        samples
            .iter()
            .find(|s| s.name == name && s.labels == [("output", output.into())])
            .map(|s| s.value)
            .expect("sample")
    };
    assert_eq!(find("dcmon_output_batches_sent_total", "dcmon"), crate::batch::Value::Count(3));
    assert_eq!(find("dcmon_output_batches_dropped_total", "prom"), crate::batch::Value::Count(1));
    assert_eq!(find("dcmon_output_lag_seconds", "prom"), crate::batch::Value::Gauge(0.0));
    assert_eq!(samples.len(), 8);
}

#[test]
fn the_dcmon_outputs_refusal_still_goes_to_rejected_and_waits_for_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = Outbox::open(dir.path(), LIMITS, 100);
    o.set_outputs(&names(&["dcmon", "prom"]));
    o.push(100, body(0));
    o.gave_up("dcmon", 0, "HTTP 422: bad");
    assert_eq!(o.stats().rejected_total, 1);
    assert_eq!(std::fs::read_dir(dir.path().join("rejected")).expect("rejected/").count(), 2, "batch + answer");
    assert_eq!(waiting_for(&mut o, "prom"), Some(0), "prom still delivers what the server refused");
    o.delivered("prom", 0);
    assert_eq!(o.stats().batches, 0);
}

#[test]
fn each_cursor_survives_a_restart_and_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outputs = names(&["dcmon", "prom", "slow"]);
    let mut o = Outbox::open(dir.path(), LIMITS, 100);
    o.set_outputs(&outputs);
    for i in 0..6 {
        o.push(100, fixed(i));
    }
    for seq in 0..5 {
        o.delivered("dcmon", seq);
    }
    for seq in 0..2 {
        o.delivered("prom", seq);
    }
    // A clean shutdown: fsync, then close.
    o.sync_now();
    drop(o);

    let mut o = Outbox::open(dir.path(), LIMITS, 100);
    o.set_outputs(&outputs);
    assert_eq!(o.stats().batches, 6, "slow has delivered nothing");
    assert_eq!(waiting_for(&mut o, "dcmon"), Some(5));
    assert_eq!(waiting_for(&mut o, "prom"), Some(2));
    assert_eq!(waiting_for(&mut o, "slow"), Some(0));
    o.delivered("slow", 0);
    o.delivered("slow", 1);
    o.delivered("prom", 2);
    // A crash: no sync, no clean close; the kernel has every write(2).
    drop(o);

    let mut o = Outbox::open(dir.path(), LIMITS, 100);
    o.set_outputs(&outputs);
    assert_eq!(o.stats().batches, 4, "batches 0 and 1 are done for all three");
    assert_eq!(waiting_for(&mut o, "dcmon"), Some(5));
    assert_eq!(waiting_for(&mut o, "prom"), Some(3));
    assert_eq!(waiting_for(&mut o, "slow"), Some(2));
    // A name seen for the first time starts at the oldest batch waiting.
    o.set_outputs(&names(&["dcmon", "prom", "slow", "new"]));
    assert_eq!(waiting_for(&mut o, "new"), Some(2));
}

#[test]
fn an_output_taken_out_of_the_config_no_longer_holds_batches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = Outbox::open(dir.path(), LIMITS, 100);
    o.set_outputs(&names(&["dcmon", "dead"]));
    for i in 0..4 {
        o.push(100, body(i));
    }
    for seq in 0..3 {
        o.delivered("dcmon", seq);
    }
    assert_eq!(o.stats().batches, 4, "dead holds all four");
    o.set_outputs(&names(&["dcmon"]));
    assert_eq!(o.stats().batches, 1, "only the one dcmon has not delivered is left");
    assert_eq!(o.oldest_for("dead"), None);
    assert_eq!(o.output_samples(100).len(), 4, "metrics only for configured outputs");
    drop(o);
    // Restarted with dead gone from the config: its old cursor records hold nothing either.
    let mut o = Outbox::open(dir.path(), LIMITS, 100);
    o.set_outputs(&names(&["dcmon"]));
    assert_eq!(drain_for(&mut o, "dcmon"), [3]);
    assert_eq!(o.stats().batches, 0);
}

fn drain_for(o: &mut Outbox, output: &str) -> Vec<u64> {
    let mut got = Vec::new();
    while let Some((seq, _)) = o.oldest_for(output) {
        got.push(seq);
        o.delivered(output, seq);
    }
    got
}

#[test]
fn the_bounds_drop_batches_for_every_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = OutboxLimits { max_bytes: 1 << 30, max_age: Duration::from_secs(60) };
    let start = Instant::now();
    let mut o = Outbox::open_at(dir.path().to_owned(), limits, 100, start);
    o.set_outputs(&names(&["dcmon", "prom"]));
    o.push_at(100, body(0), start);
    o.delivered("dcmon", 0);
    o.push_at(170, body(1), start + Duration::from_secs(70));
    assert_eq!(o.stats().dropped_total, 1, "batch 0 was too old for prom too");
    assert_eq!(waiting_for(&mut o, "prom"), Some(1));
    assert_eq!(waiting_for(&mut o, "dcmon"), Some(1));
}

#[test]
fn segments_are_deleted_once_every_output_is_done_and_cursors_are_never_needed_after() {
    // Small segments: a few records each, so several are deleted along the way.
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = OutboxLimits { max_bytes: 8 * 120, max_age: Duration::from_secs(3600) };
    let outputs = names(&["dcmon", "prom"]);
    let mut o = Outbox::open(dir.path(), limits, 100);
    o.set_outputs(&outputs);
    let mut prom_next = 0;
    for i in 0..40u32 {
        o.push(100, fixed(i));
        // dcmon keeps up; prom lags by 3 batches and then restarts mid-way.
        drain_for(&mut o, "dcmon");
        while u64::from(i) >= prom_next + 3 {
            o.delivered("prom", prom_next);
            prom_next += 1;
        }
        if i % 7 == 6 {
            drop(o);
            o = Outbox::open(dir.path(), limits, 100);
            o.set_outputs(&outputs);
            assert_eq!(waiting_for(&mut o, "prom"), Some(prom_next), "prom's cursor after batch {i}");
            assert_eq!(waiting_for(&mut o, "dcmon"), None, "dcmon's cursor after batch {i}");
        }
    }
    assert_eq!(o.stats().batches, 3);
    assert!(segments(dir.path()).len() <= 4, "done segments went: {:?}", segments(dir.path()));
}

#[test]
fn a_damaged_cursor_record_is_set_aside_and_costs_only_a_resend() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outputs = names(&["dcmon", "prom"]);
    let mut o = Outbox::open(dir.path(), LIMITS, 100);
    o.set_outputs(&outputs);
    for i in 0..3 {
        o.push(100, body(i));
    }
    o.delivered("prom", 0);
    o.delivered("prom", 1);
    drop(o);
    let seg = &segments(dir.path())[0];
    let mut data = std::fs::read(seg).expect("read");
    let text = String::from_utf8_lossy(&data).into_owned();
    let last_cursor = text.rfind("DCMB2 C ").expect("a cursor record");
    data[last_cursor + 10] ^= 0x01; // in its seq
    std::fs::write(seg, &data).expect("write");

    let mut o = Outbox::open(dir.path(), LIMITS, 100);
    o.set_outputs(&outputs);
    assert_eq!(o.stats().corrupt_total, 1);
    assert_eq!(std::fs::read_dir(dir.path().join("corrupt")).expect("corrupt/").count(), 2, "copy + reason");
    assert_eq!(waiting_for(&mut o, "prom"), Some(1), "the earlier cursor record still counts: batch 1 is resent");
    assert_eq!(waiting_for(&mut o, "dcmon"), Some(0));
}

#[test]
fn cursor_records_round_trip_and_old_readers_formats_still_read() {
    let mut seg = Vec::new();
    encode_batch(&mut seg, 7, 100, b"{}");
    assert!(encode_cursor(&mut seg, "prom-1.example:9090", 7));
    encode_done(&mut seg, 7);
    assert!(!encode_cursor(&mut seg, "has space", 7), "a name a record cannot carry is refused");
    assert!(!encode_cursor(&mut seg, "", 7));
    assert!(!encode_cursor(&mut seg, &"x".repeat(OUTPUT_NAME_MAX + 1), 7));
    assert!(encode_cursor(&mut seg, &"x".repeat(OUTPUT_NAME_MAX), u64::MAX));
    let records = parse_segment(&seg);
    assert_eq!(records.len(), 4, "{records:?}");
    assert_eq!(records[1], Record::Cursor { output: "prom-1.example:9090".to_owned(), seq: 7 });
    assert_eq!(records[2], Record::Done { seq: 7 });
    assert_eq!(records[3], Record::Cursor { output: "x".repeat(OUTPUT_NAME_MAX), seq: u64::MAX });
    let text = String::from_utf8_lossy(&seg).into_owned();
    assert!(text.contains("DCMB2 C 0000000000000007 prom-1.example:9090 "), "{text}");
}

#[test]
fn new_batches_are_numbered_past_every_saved_cursor() {
    // A segment holding only cursor records, its batches' segment gone: the next batch must
    // not take a number an output already counts as done.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut seg = Vec::new();
    assert!(encode_cursor(&mut seg, "prom", 41));
    std::fs::write(dir.path().join("0000000000000005.seg"), &seg).expect("write");
    let mut o = Outbox::open(dir.path(), LIMITS, 100);
    o.set_outputs(&names(&["dcmon", "prom"]));
    o.push(100, body(0));
    assert_eq!(waiting_for(&mut o, "prom"), Some(42));
    assert_eq!(waiting_for(&mut o, "dcmon"), Some(42));
}

/// Only the scrape endpoint (no push output): nothing would deliver a batch, so none is stored
/// and the disk is left alone.
#[test]
fn with_no_output_nothing_is_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let segment_bytes = || -> u64 {
        std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
            .map(|e| e.metadata().expect("metadata").len())
            .sum()
    };
    let mut o = Outbox::open(dir.path(), LIMITS, 100);
    o.set_outputs(&names(&["dcmon"]));
    o.push(100, body(0));
    o.set_outputs(&[]);
    assert_eq!(o.stats().batches, 0, "the batch only dcmon needed leaves");
    let before = segment_bytes();
    o.push(101, body(1));
    assert_eq!(o.stats().batches, 0);
    assert_eq!(segment_bytes(), before, "nothing was written");
    drop(o);
    assert_eq!(Outbox::open(dir.path(), LIMITS, 200).stats().batches, 0, "a restart finds nothing to send");
}

#[test]
fn each_output_counts_its_failed_attempts_and_reports_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = Outbox::open(dir.path(), LIMITS, 100);
    o.set_outputs(&names(&["dcmon", "prom"]));
    o.push(100, body(0));
    o.send_failed("prom");
    o.send_failed("prom");
    o.send_failed("dcmon");
    assert_eq!(o.output_stats("prom"), OutputStats { sent: 0, failed: 2, dropped: 0 });
    assert_eq!(o.output_stats("dcmon"), OutputStats { sent: 0, failed: 1, dropped: 0 });
    let failed = |output: &str| {
        o.output_samples(100)
            .into_iter()
            .find(|s| s.name == "dcmon_output_batches_failed_total" && s.labels == [("output", output.into())])
            .map(|s| s.value)
    };
    assert_eq!(failed("prom"), Some(crate::batch::Value::Count(2)));
    assert_eq!(failed("dcmon"), Some(crate::batch::Value::Count(1)));
    assert_eq!(o.stats().batches, 1, "a failed attempt keeps the batch for a retry");
}

#[test]
fn the_outputs_are_listed_once_each_in_config_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = Outbox::open(dir.path(), LIMITS, 100);
    assert_eq!(o.outputs(), [DCMON_OUTPUT], "until set_outputs, the dcmon server is the only output");
    o.set_outputs(&names(&["prom", "dcmon", "prom"]));
    assert_eq!(o.outputs(), ["prom", "dcmon"]);
    o.set_outputs(&[]);
    assert!(o.outputs().is_empty());
}

#[test]
fn only_an_output_name_no_cursor_record_can_carry_is_warned_about() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = Outbox::open(dir.path(), LIMITS, 100);
    let ((), log) = logged(|| o.set_outputs(&names(&["dcmon", "http://a b/write"])));
    assert!(log.contains("output name \"http://a b/write\" cannot be stored in a cursor record"), "{log}");
    assert_eq!(log.matches("cannot be stored").count(), 1, "nothing about dcmon: {log}");
    let ((), log) = logged(|| o.set_outputs(&names(&["dcmon", "prom-1.example:9090"])));
    assert!(!log.contains("cannot be stored"), "{log}");
}

#[test]
fn an_output_past_the_only_batch_waiting_gets_a_cursor_record() {
    // One batch, delivered by dcmon and still waiting for prom: dcmon's cursor must reach the
    // disk, or a restart resends the batch to dcmon.
    let dir = tempfile::tempdir().expect("tempdir");
    let outputs = names(&["dcmon", "prom"]);
    let mut o = Outbox::open(dir.path(), LIMITS, 100);
    o.set_outputs(&outputs);
    o.push(100, body(0));
    o.delivered("dcmon", 0);
    let records = |dir: &Path| -> Vec<String> {
        let data = std::fs::read(&segments(dir)[0]).expect("read");
        parse_segment(&data)
            .iter()
            .map(|r| match r {
                Record::Batch { seq, .. } => format!("batch {seq}"),
                Record::Done { seq } => format!("done {seq}"),
                Record::Cursor { output, seq } => format!("cursor {output} {seq}"),
                Record::Damaged { .. } => "damaged".to_owned(),
            })
            .collect()
    };
    assert_eq!(records(dir.path()), ["batch 0", "cursor dcmon 0"]);
    drop(o);
    let mut o = Outbox::open(dir.path(), LIMITS, 100);
    o.set_outputs(&outputs);
    assert_eq!(waiting_for(&mut o, "dcmon"), None, "dcmon is not sent batch 0 again");
    assert_eq!(waiting_for(&mut o, "prom"), Some(0));
    // prom's delivery releases the batch, and the segment (an earlier run's) goes with it.
    o.delivered("prom", 0);
    assert_eq!(o.stats().batches, 0);
    assert!(segments(dir.path()).is_empty(), "{:?}", segments(dir.path()));
}
