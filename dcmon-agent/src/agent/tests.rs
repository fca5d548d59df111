//! Unit tests of the daemon loop: the tick phase and batch timestamps across wall-clock steps.

use std::sync::Arc;

use super::*;
use crate::batch::Sample;
use crate::collector::{CollectError, Collector};

#[test]
fn phase_is_stable_and_within_the_interval() {
    let i = Duration::from_secs(30);
    assert_eq!(phase_offset("abc", i), phase_offset("abc", i));
    assert_ne!(phase_offset("abc", i), phase_offset("abd", i));
    assert!(phase_offset("abc", i) < i);
    let spread: std::collections::HashSet<_> =
        (0..100).map(|n| phase_offset(&format!("host-{n}"), i).as_secs()).collect();
    assert!(spread.len() > 20, "phases bunch up: {spread:?}");
}

#[test]
fn first_tick_lands_on_the_phase_at_least_min_gap_away() {
    let (i, gap) = (Duration::from_secs(30), Duration::from_secs(1));
    // now = 100.000 s, phase 5 s: next instant = 5 s into the 90..120 window -> 95 is past, so 125.
    assert_eq!(first_tick_delay(100_000, Duration::from_secs(5), i, gap), Duration::from_secs(25));
    // phase 10.5 s -> 100.5 s is under the 1 s gap; next is 130.5 s.
    assert_eq!(first_tick_delay(100_000, Duration::from_millis(10_500), i, gap), Duration::from_millis(30_500));
    assert_eq!(first_tick_delay(100_000, Duration::from_secs(11), i, gap), Duration::from_secs(1));
    // interval 1 s: always within [gap, gap + interval).
    for now in [0_u64, 999, 1000, 123_456] {
        let d = first_tick_delay(now, Duration::from_millis(250), Duration::from_secs(1), gap);
        assert!(d >= gap && d < gap + Duration::from_secs(1), "{now}: {d:?}");
        assert_eq!((now + u64::try_from(d.as_millis()).expect("ms")) % 1000, 250);
    }
}

/// A wall clock the test sets.
struct SetClock(std::sync::Mutex<SystemTime>);

impl WallClock for SetClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().expect("clock")
    }
}

/// Counts its rounds in `round`; round 5 alone also reports `only_in_round_5`.
struct Rounds(u64);

impl Collector for Rounds {
    fn name(&self) -> &'static str {
        "rounds"
    }
    fn may_block(&self) -> bool {
        false
    }
    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        self.0 += 1;
        out.push(Sample::count("round", self.0));
        if self.0 == 5 {
            out.push(Sample::count("only_in_round_5", 1));
        }
        Ok(())
    }
}

/// The batches in the outbox at `dir`, oldest first, parsed.
fn stored_batches(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let mut segments: Vec<_> = std::fs::read_dir(dir)
        .expect("outbox dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    let mut batches = Vec::new();
    for path in segments {
        let data = std::fs::read(&path).expect("segment");
        for record in crate::outbox::parse_segment(&data) {
            if let crate::outbox::Record::Batch { timestamp, body, .. } = record {
                let json: serde_json::Value = serde_json::from_slice(body).expect("batch json");
                assert_eq!(json["timestamp"], timestamp, "record header and body agree");
                batches.push(json);
            }
        }
    }
    batches
}

fn value_of(batch: &serde_json::Value, name: &str) -> Option<u64> {
    batch["metrics"].as_array()?.iter().find(|m| m["name"] == name)?["value"].as_u64()
}

/// The wall clock steps back 10 s after the third of 1 s rounds, then forward 100 s: the
/// outbox gets strictly increasing timestamps, the rounds the step made repeat a timestamp
/// are held and go out merged into the first round past it, and nothing is lost.
#[tokio::test(flavor = "current_thread")]
async fn batch_timestamps_keep_increasing_when_the_wall_clock_steps() {
    const T0: i64 = 1_700_000_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = crate::outbox::OutboxLimits { max_bytes: 1 << 20, max_age: Duration::from_secs(86_400) };
    let outbox = SharedOutbox::new(crate::outbox::Outbox::open(dir.path(), limits, T0));
    let wall = Arc::new(SetClock(std::sync::Mutex::new(UNIX_EPOCH)));
    let mut clock = BatchClock::new(wall.clone());
    let mut scheduler = Scheduler::new(vec![Box::new(Rounds(0))], "m".into(), Duration::from_secs(1));
    let latest = LatestRound::new();
    // Scheduled instants ahead of now: every round starts on time, whatever the host's load.
    let start = tokio::time::Instant::now() + Duration::from_secs(3600);
    for k in 1..=16_u64 {
        let stepped: i64 = match k {
            1..=3 => 0,
            4..=15 => -10,
            _ => 90,
        };
        let unix = u64::try_from(T0 + i64::try_from(k).expect("k") + stepped).expect("after 1970");
        *wall.0.lock().expect("clock") = UNIX_EPOCH + Duration::from_millis(unix * 1000 + 300);
        round(&mut scheduler, &mut clock, &outbox, &latest, start + Duration::from_secs(k), None).await;
        // Scrapes show every round, held ones included.
        let shown = latest.get().expect("published");
        let count = shown.batch().samples().iter().find(|s| s.name == "round").map(|s| s.value);
        assert_eq!(count, Some(crate::batch::Value::Count(k)), "round {k} shown");
        assert!(shown.batch().samples().iter().any(|s| s.name == "dcmon_outbox_batches"), "self-metrics shown");
    }
    let batches = stored_batches(dir.path());
    let stamps: Vec<i64> = batches.iter().map(|b| b["timestamp"].as_i64().expect("timestamp") - T0).collect();
    // Rounds 4 to 13 read 1699999994 to 1700000003, none after round 3's: held.
    assert_eq!(stamps, [1, 2, 3, 4, 5, 106], "batch timestamps (minus {T0})");
    let rounds: Vec<Option<u64>> = batches.iter().map(|b| value_of(b, "round")).collect();
    assert_eq!(rounds, [Some(1), Some(2), Some(3), Some(14), Some(15), Some(16)], "the newest reading wins");
    assert_eq!(value_of(&batches[3], "only_in_round_5"), Some(1), "a series only a held round had is kept");
    assert_eq!(value_of(&batches[4], "only_in_round_5"), None, "and sent once");
    assert_eq!(clock.held_rounds, 0);
}

/// Counts its runs in a counter the test reads.
struct Counted(Arc<std::sync::atomic::AtomicU64>);

impl Collector for Counted {
    fn name(&self) -> &'static str {
        "counted"
    }
    fn may_block(&self) -> bool {
        false
    }
    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        out.push(Sample::count("collections_total", n));
        Ok(())
    }
}

/// Scrapes read the round the loop published; they never run a collector.
#[tokio::test(flavor = "current_thread")]
async fn a_scrape_never_runs_the_collectors() {
    use crate::output::metrics_endpoint::{Limits, MetricsEndpoint};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let dir = tempfile::tempdir().expect("tempdir");
    let limits = crate::outbox::OutboxLimits { max_bytes: 1 << 20, max_age: Duration::from_secs(86_400) };
    let outbox = SharedOutbox::new(crate::outbox::Outbox::open(dir.path(), limits, 1));
    let mut clock = BatchClock::new(Arc::new(SystemClock));
    let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut scheduler = Scheduler::new(vec![Box::new(Counted(runs.clone()))], "m".into(), Duration::from_secs(1));
    let latest = LatestRound::new();
    let endpoint =
        MetricsEndpoint::bind(([127, 0, 0, 1], 0).into(), latest.clone(), Limits::default()).expect("bind loopback");
    let scrape = || async {
        let mut s = tokio::net::TcpStream::connect(endpoint.local_addr()).await.expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("write");
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.expect("read");
        raw
    };
    assert!(scrape().await.starts_with("HTTP/1.1 503"), "before the first round");
    let start = tokio::time::Instant::now() + Duration::from_secs(3600);
    for k in 1..=2_u64 {
        // One second apart, so the clock admits each round.
        tokio::time::sleep(Duration::from_millis(1001)).await;
        round(&mut scheduler, &mut clock, &outbox, &latest, start + Duration::from_secs(k), None).await;
        for _ in 0..10 {
            let text = scrape().await;
            assert!(text.contains(&format!("collections_total{{machine_id=\"m\"}} {k}\n")), "{text}");
        }
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), k, "collections after round {k} and 10 scrapes");
    }
}
