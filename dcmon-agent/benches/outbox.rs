//! What the outbox costs per batch, in CPU time (the agent's budget) and wall time:
//! - push: one write of the record into the current segment (every batch);
//! - push + fsync: when a batch has to wait (an outage), its record is also fdatasynced;
//! - ack: reading the batch back when it is not cached, and writing its `D` record.
//!
//! For comparison it also times the previous layout, a file per batch (create, write, fsync,
//! rename, directory fsync, later unlink). Prints numbers; asserts nothing about speed.
//!
//! `cargo bench -p dcmon-agent --bench outbox [-- DIR]` (DIR defaults to /var/tmp, which is
//! disk-backed where /tmp may be tmpfs).
#![allow(clippy::print_stdout, reason = "a benchmark prints its numbers")]

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dcmon_agent::outbox::{Outbox, OutboxLimits};

const ROUNDS: usize = 200;
/// Between operations, like the agent's 1 s cycle leaves the caches cold (shortened).
const PAUSE: Duration = Duration::from_millis(5);

/// CPU time of this thread (user + system), precise to the nanosecond.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer for clock_gettime.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    Duration::new(u64::try_from(ts.tv_sec).unwrap_or(0), u32::try_from(ts.tv_nsec).unwrap_or(0))
}

/// Median CPU and wall time of `op` over ROUNDS runs.
fn measure(mut op: impl FnMut(usize)) -> (Duration, Duration) {
    let (mut cpu, mut wall) = (Vec::with_capacity(ROUNDS), Vec::with_capacity(ROUNDS));
    for i in 0..ROUNDS {
        std::thread::sleep(PAUSE);
        let (c, w) = (thread_cpu(), Instant::now());
        op(i);
        cpu.push(thread_cpu() - c);
        wall.push(w.elapsed());
    }
    cpu.sort();
    wall.sort();
    (cpu[ROUNDS / 2], wall[ROUNDS / 2])
}

fn file_per_batch(dir: &Path, i: usize, body: &[u8]) {
    let (tmp, path) = (dir.join(format!(".{i}.tmp")), dir.join(format!("{i}.batch")));
    let mut f = std::fs::File::create(&tmp).expect("create");
    f.write_all(body).expect("write");
    f.sync_all().expect("fsync");
    std::fs::rename(&tmp, &path).expect("rename");
    std::fs::File::open(dir).and_then(|d| d.sync_all()).expect("dir fsync");
    std::fs::remove_file(&path).expect("unlink");
}

fn main() {
    let base = std::env::args().nth(1).filter(|a| !a.starts_with('-')).unwrap_or_else(|| "/var/tmp".to_owned());
    let limits = OutboxLimits { max_bytes: 1 << 30, max_age: Duration::from_secs(3600) };
    println!("outbox on {base}: median per batch over {ROUNDS} batches, CPU time (wall time)");
    // A typical OS-collector batch is about 3 KB; GPU servers with many devices send ~16 KB.
    for size in [3_000usize, 16_384] {
        let body = Bytes::from(format!("\"{}\"", "x".repeat(size - 2)));
        let report = |what: &str, (cpu, wall): (Duration, Duration)| {
            println!("  {size:>6} B  {what:<44} {cpu:>10.1?} ({wall:.1?})");
        };

        let dir = tempfile::tempdir_in(&base).expect("temp dir");
        let mut o = Outbox::open(dir.path(), limits, 0);
        report(
            "push, delivered at once (write + ack)",
            measure(|i| {
                o.push(i64::try_from(i).unwrap_or(0), body.clone());
                let (seq, _) = o.oldest().expect("just pushed");
                o.remove(seq);
            }),
        );
        report(
            "push during an outage (write + fdatasync)",
            measure(|i| {
                o.push(i64::try_from(i).unwrap_or(0), body.clone());
                o.sync_now();
            }),
        );
        report(
            "backlog: read back, verify, ack",
            measure(|_| {
                let (seq, _) = o.oldest().expect("backlog");
                o.remove(seq);
            }),
        );
        drop(o);

        let dir = tempfile::tempdir_in(&base).expect("temp dir");
        report("previous layout: a file per batch, fsynced", measure(|i| file_per_batch(dir.path(), i, &body)));
    }
}
