//! Outbox tests of a hostile host: FIFOs and devices, unwritable, deleted and truncated files, a full disk, a second agent, clock steps.

use super::*;

#[test]
fn unwritable_directory_keeps_batches_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, "x").expect("write");
    let mut o = Outbox::open(not_a_dir.join("outbox"), LIMITS, 0);
    assert!(o.persist_error().is_some());
    o.push(1, body(1));
    o.push(2, body(2));
    assert_eq!(o.stats().in_memory, 2);
    assert!(o.sync_job().is_none());
    let (seq, b) = o.oldest().expect("in memory");
    assert_eq!(b, body(1));
    o.remove(seq);
    assert_eq!(o.stats().batches, 1);
    assert_eq!(o.stats().in_memory, 1);
}

#[test]
fn a_second_outbox_on_the_same_directory_stays_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut first = Outbox::open(dir.path(), LIMITS, 0);
    first.push(1, body(1));
    let mut second = Outbox::open(dir.path(), LIMITS, 0);
    let why = second.persist_error().expect("locked out").to_owned();
    assert!(why.contains(&format!("pid {}", std::process::id())), "{why}");
    second.push(2, body(2));
    assert_eq!(second.stats().in_memory, 1);
    assert_eq!(inspect(dir.path()).expect("inspect").len(), 1, "the second one wrote nothing");
    drop(first);
    drop(second);
    let third = Outbox::open(dir.path(), LIMITS, 0);
    assert!(third.persist_error().is_none(), "the lock goes with its holder");
    assert_eq!(third.stats().batches, 1);
}

// Issue 14 (a): a FIFO named like a segment blocked `open` forever.
#[test]
fn a_fifo_or_a_device_named_like_a_segment_is_ignored_and_blocks_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = Outbox::open(dir.path(), LIMITS, 0);
    o.push(1, body(1));
    drop(o);
    let fifo = dir.path().join("00000000000000f0.seg");
    mkfifo(&fifo);
    let zero = dir.path().join("00000000000000f1.seg");
    std::os::unix::fs::symlink("/dev/zero", &zero).expect("symlink");
    let path = dir.path().to_owned();
    let (mut o, log) = within_20s(move || logged(|| Outbox::open(path, LIMITS, 0))).expect("open hung");
    assert!(log.contains(&format!("{} is a FIFO, expected a regular file", fifo.display())), "{log}");
    assert!(log.contains(&format!("{} is a character device", zero.display())), "{log}");
    assert_eq!(drain(&mut o), [body(1)]);
    assert_eq!(o.stats().corrupt_total, 0, "not a segment, so no batch of it is lost");
    let path = dir.path().to_owned();
    assert_eq!(within_20s(move || inspect(&path).map(|b| b.len())).expect("inspect hung").expect("inspect"), 0);
    assert!(fifo.exists() && zero.exists(), "left for an operator");
}

// Issue 14 (c): deleting the directory lost every batch and the exit log said otherwise.
#[test]
fn a_deleted_directory_is_recreated_and_its_batches_rewritten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = dir.path().join("outbox");
    let mut o = Outbox::open(&outbox, LIMITS, 0);
    for i in 0..6 {
        o.push(i, body(u32::try_from(i).expect("small"))); // the last two are not cached
    }
    std::fs::remove_dir_all(&outbox).expect("rm -r");
    let ((), log) = logged(|| o.push(6, body(6)));
    assert_eq!(log.matches("deleted while the agent ran").count(), 1, "{log}");
    assert!(log.contains("recreated it and rewrote the 6 batches still readable, 0 could not"), "{log}");
    let stored: Vec<i64> = inspect(&outbox).expect("recreated").iter().map(|b| b.timestamp).collect();
    assert_eq!(stored, [0, 1, 2, 3, 4, 5, 6]);
    assert_eq!(o.stats().in_memory, 0);

    // Deleted after the last push: noticed at shutdown (sync_now), before the exit report.
    std::fs::remove_dir_all(&outbox).expect("rm -r");
    o.sync_now();
    assert_eq!(inspect(&outbox).expect("recreated").len(), 7);
    drop(o);
    let mut o = Outbox::open(&outbox, LIMITS, 0);
    assert!(o.persist_error().is_none(), "the lock was taken again in the new directory: {:?}", o.persist_error());
    assert_eq!(drain(&mut o), (0..7).map(body).collect::<Vec<_>>());
}

// Issue 14 (d): a full disk cost an empty segment file and a descriptor per batch.
#[test]
fn a_full_disk_costs_no_file_or_descriptor_per_batch() {
    dcmon_tests::require_root("mounting a small tmpfs");
    let fs = SmallFs::mount("64k");
    let outbox = fs.0.path().join("outbox");
    let mut o = Outbox::open(&outbox, LIMITS, 0);
    let big = Bytes::from(format!("\"{}\"", "x".repeat(3000)));
    for i in 0..60 {
        o.push(i, big.clone());
    }
    assert!(o.stats().in_memory > 30, "the disk filled up: {:?}", o.stats());
    assert!(o.persist_error().is_some_and(|e| e.contains("No space left")), "{:?}", o.persist_error());
    assert_eq!(segments(&outbox).len(), 1, "{:?}", segments(&outbox));
    assert!(fds_under(fs.0.path()) <= 2, "segment + lock, got {}", fds_under(fs.0.path()));
    let got = drain(&mut o);
    assert_eq!(got.len(), 60);
    assert_eq!(o.stats(), OutboxStats { corrupt_total: 0, ..OutboxStats::default() });
}

// Issue 14 (e): records written after a truncation landed elsewhere and were lost.
#[test]
fn a_segment_truncated_underneath_is_noticed_and_later_batches_are_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = Outbox::open(dir.path(), LIMITS, 0);
    for i in 0..6 {
        o.push(i, body(u32::try_from(i).expect("small"))); // 0..3 cached, 4 and 5 not
    }
    let seg = &segments(dir.path())[0];
    let one = batch_record_len(0, 0, &body(0));
    File::options().write(true).open(seg).and_then(|f| f.set_len(3 * one + 5)).expect("truncate");
    let ((), log) = logged(|| {
        for i in 6..13 {
            o.push(i, body(u32::try_from(i).expect("small")));
        }
    });
    assert!(log.contains("changed underneath the agent"), "{log}");
    assert!(log.contains("rewrote 1 batches into a new segment, 2 could not be read back"), "{log}");
    assert_eq!(o.stats().corrupt_total, 2, "batches 4 and 5 were only on disk, and are counted");
    let want: Vec<Bytes> = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12].into_iter().map(body).collect();
    let stored: Vec<i64> = inspect(dir.path()).expect("inspect").iter().map(|b| b.timestamp).collect();
    assert_eq!(stored, [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12]);
    assert_eq!(drain(&mut o), want);
    assert_eq!(o.stats().corrupt_total, 2, "nothing written after the truncation was damaged");
}

/// A record ends with its newline (`Entry::record_end`): a segment cut by that one byte has
/// lost the record, since the next append would run on from its line, so its batch is rewritten.
#[test]
fn a_segment_cut_by_its_last_newline_has_that_batch_rewritten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = Outbox::open(dir.path(), LIMITS, 0);
    for i in 0..3 {
        o.push(i, body(u32::try_from(i).expect("small")));
    }
    let seg = &segments(dir.path())[0];
    let len = std::fs::metadata(seg).expect("segment").len();
    File::options().write(true).open(seg).and_then(|f| f.set_len(len - 1)).expect("truncate");
    let ((), log) = logged(|| o.push(3, body(3)));
    let line = format!(
        "(only its first {} bytes are as written); rewrote 1 batches into a new segment, 0 could not be read back",
        len - 1
    );
    assert!(log.contains(&line), "{log}");
    assert_eq!(o.stats().corrupt_total, 0);
    let want: Vec<Bytes> = (0..4).map(body).collect();
    assert_eq!(drain(&mut o), want);
}

// Issue 14 (f): a second agent ran anyway, in memory, and sent every batch twice.
#[test]
fn open_exclusive_refuses_an_outbox_in_use_naming_the_directory_and_pid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Outbox::open_exclusive(dir.path(), LIMITS, 0).expect("free");
    let lock = std::fs::read_to_string(dir.path().join(".lock")).expect("lock file");
    assert_eq!(lock.trim(), std::process::id().to_string());
    let err = Outbox::open_exclusive(dir.path(), LIMITS, 0).expect_err("in use");
    assert_eq!(err, OutboxInUse { dir: dir.path().to_owned(), pid: Some(std::process::id()) });
    let msg = err.to_string();
    assert!(msg.contains(&dir.path().display().to_string()) && msg.contains(&format!("pid {}", std::process::id())));
    drop(first);
    assert!(Outbox::open_exclusive(dir.path(), LIMITS, 0).is_ok());
}

// Issue 14 (g): stepping the wall clock 8 days forward dropped the whole backlog.
#[test]
fn a_wall_clock_step_never_drops_batches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let week = Duration::from_secs(7 * 24 * 3600);
    let limits = OutboxLimits { max_bytes: 1 << 30, max_age: week };
    let (t0, eight_days) = (Instant::now(), 8 * 24 * 3600);
    let mut o = Outbox::open_at(dir.path().into(), limits, 1000, t0);
    for i in 0..5 {
        o.push_at(1000 + i, body(u32::try_from(i).expect("small")), t0 + Duration::from_secs(i as u64));
    }
    o.push_at(1000 + eight_days, body(9), t0 + Duration::from_secs(5));
    assert_eq!(o.stats().batches, 6, "a clock step drops nothing");
    assert_eq!(o.stats().dropped_total, 0);
    // Waiting does: the first batch was queued at t0.
    o.push_at(1000 + eight_days + 1, body(10), t0 + week + Duration::from_secs(1));
    assert_eq!(o.stats().dropped_total, 1);
    drop(o);
    // At open, age comes from the wall clock, once.
    let later = Instant::now();
    let mut o =
        Outbox::open_at(dir.path().into(), limits, 1000 + i64::try_from(week.as_secs()).expect("week") + 2, later);
    assert_eq!(o.stats().dropped_total, 1, "batch 1 (1001) was over a week old at open");
    assert_eq!(o.stats().batches, 5);
    o.push_at(5, body(11), later + Duration::from_secs(1));
    assert_eq!(o.stats().dropped_total, 2, "batch 2 (1002) is now over a week old");
}

// A child process being started holds a copy of the lock's descriptor until it execs, so an
// outbox closed and opened again in one process found it "in use by" its own pid (memory
// mode, batches lost at the next restart) when another thread was starting a child then.
#[test]
fn a_lock_held_for_a_moment_is_waited_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(Outbox::open(dir.path(), LIMITS, 0));
    // The moment's holder: the same lock file, another open file description.
    let holder = std::fs::File::options().read(true).write(true).open(dir.path().join(".lock")).expect("open");
    holder.lock().expect("lock");
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        drop(holder);
    });
    let mut o = Outbox::open(dir.path(), LIMITS, 0);
    release.join().expect("holder");
    assert!(o.persist_error().is_none(), "{:?}", o.persist_error());
    o.push(1, body(1));
    drop(o);
    assert_eq!(inspect(dir.path()).expect("inspect").len(), 1, "persisted, not kept in memory");
}

// Issue 14 (i): memory mode said "not locked for this agent" instead of the real cause.
#[test]
fn memory_mode_reports_the_real_cause() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = Outbox::open(dir.path(), LIMITS, 0);
    let mut second = Outbox::open(dir.path(), LIMITS, 0);
    second.push(1, body(1));
    let why = second.persist_error().expect("memory mode");
    assert!(why.contains(&format!("another dcmon-agent (pid {})", std::process::id())), "{why}");
}

// A directory deleted just as the segment filled up: the next batch needs a new segment file,
// and creating it fails with NotFound. That is the deletion to repair (the directory recreated,
// the batches rewritten), not an error to keep batches in memory for, nor a number to skip
// (which would try the next number for ever).
#[test]
fn a_directory_deleted_when_its_segment_is_full_is_recreated_for_the_next_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = dir.path().join("outbox");
    // Segments of 60 bytes: every record fills one.
    let limits = OutboxLimits { max_bytes: 8 * 60, max_age: Duration::from_secs(3600) };
    let long = |i: u32| Bytes::from(format!("{{\"batch\": {i}, \"pad\": \"{}\"}}", "x".repeat(80)));
    let path = outbox.clone();
    let (mut o, stored, persist_error) = within_20s(move || {
        let mut o = Outbox::open(&path, limits, 0);
        o.push(0, long(0));
        std::fs::remove_dir_all(&path).expect("rm -r");
        o.push(1, long(1));
        let stored: Vec<i64> = inspect(&path).expect("recreated").iter().map(|b| b.timestamp).collect();
        let persist_error = o.persist_error().map(str::to_owned);
        (o, stored, persist_error)
    })
    .expect("the push after the deletion hung");
    assert_eq!(stored, [0, 1]);
    assert_eq!(persist_error, None);
    assert_eq!(o.stats().in_memory, 0);
    assert_eq!(drain(&mut o), [long(0), long(1)]);
}

// Issue 22: a file someone put where the next segment goes (the directory is locked only
// against other agents) is never appended to: the segment takes the next number.
#[test]
fn a_file_put_where_the_next_segment_goes_is_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = Outbox::open(dir.path(), LIMITS, 0);
    let foreign = dir.path().join("0000000000000000.seg");
    std::fs::write(&foreign, "not a segment\n").expect("write");
    o.push(1, body(1));
    assert_eq!(o.persist_error(), None);
    assert_eq!(o.stats().in_memory, 0);
    assert_eq!(std::fs::read(&foreign).expect("foreign file"), b"not a segment\n");
    let data = std::fs::read(dir.path().join("0000000000000001.seg")).expect("the next number");
    assert!(matches!(parse_segment(&data)[..], [Record::Batch { seq: 0, timestamp: 1, .. }]), "{data:?}");
    assert_eq!(drain(&mut o), [body(1)]);
}

// A directory that stays deleted through the repair: the outbox path is a link to the working
// directory of a process that sits in the directory, so after the directory is removed the path
// still names it (deleted, nothing can be created in it), and its lock file lives on under a
// second name, so the repair finds no lock to take again. The first append finds its segment
// gone, the repair changes nothing, the second append fails the same way: the batch must be kept
// in memory with the reason, after one repair, not repaired for ever.
#[test]
fn files_that_stay_gone_after_one_repair_are_given_up_on_not_repaired_for_ever() {
    let dir = tempfile::tempdir().expect("tempdir");
    let real = dir.path().join("real");
    std::fs::create_dir(&real).expect("mkdir");
    let mut sitter = std::process::Command::new("sleep").arg("60").current_dir(&real).spawn().expect("sleep");
    let link = dir.path().join("outbox");
    std::os::unix::fs::symlink(format!("/proc/{}/cwd", sitter.id()), &link).expect("symlink");
    let kept_lock = dir.path().join("lock-kept");
    let result = within_20s(move || {
        let mut o = Outbox::open(&link, LIMITS, 0);
        o.push(0, body(0));
        std::fs::hard_link(real.join(".lock"), &kept_lock).expect("a second name for the lock");
        for entry in std::fs::read_dir(&real).expect("list") {
            std::fs::remove_file(entry.expect("entry").path()).expect("rm");
        }
        std::fs::remove_dir(&real).expect("rmdir");
        o.push(1, body(1));
        (o.persist_error().map(str::to_owned), o.stats().in_memory, drain(&mut o))
    });
    let _ = sitter.kill();
    let _ = sitter.wait();
    let (why, in_memory, drained) = result.expect("the push after the deletion did not return: repaired for ever?");
    let why = why.expect("a persist error");
    assert!(why.contains("its files keep changing underneath the agent"), "{why}");
    assert_eq!(in_memory, 2, "the batch read back from the deleted segment and the new one");
    assert_eq!(drained, [body(0), body(1)]);
}
