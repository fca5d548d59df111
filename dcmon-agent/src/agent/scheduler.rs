//! The scheduler: runs every collector each round, on threads or inline, and builds the batch.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::batch::{Batch, Labels, Sample, Value};
use crate::collector::{CollectError, Collector};

type RunResult = (Box<dyn Collector>, Vec<Sample>, Result<(), CollectError>, Duration);

enum SlotState {
    Idle(Box<dyn Collector>),
    /// A run that overran its timeout; the collector comes back when the thread returns.
    Overrunning(JoinHandle<RunResult>),
    /// Reported "not present": never run again.
    Absent,
}

struct Slot {
    name: &'static str,
    /// Its `collector` label, made once and shared by every round's self-metrics.
    labels: Labels,
    state: SlotState,
    /// The last failure logged, so a failure repeating every round is logged once.
    last_error: Option<String>,
    /// How many samples the last run gave: the next run's buffer is sized to it once, rather
    /// than grown through reallocations every round.
    last_len: usize,
    /// An inline collector that was found slow: it runs on a thread under the timeout from now on.
    on_thread: bool,
    /// How its last round went ([`Scheduler::outcomes`]).
    last_outcome: Option<Outcome>,
}

/// How one collector's last round went, as `dcmon-agent check` reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// It worked.
    Collected {
        /// How many samples it gave.
        samples: usize,
        /// The first of them, as an example.
        first: Option<Sample>,
    },
    /// Its source is not on this host: it is not run again.
    NotPresent(String),
    /// The round failed: an error, a panic or the collector timeout.
    Failed(String),
}

/// An inline run that takes longer than this moves its collector onto a thread: reading
/// kernel memory takes far less, even with tens of thousands of interfaces, so the files are
/// served by something that can stall (a FUSE daemon).
const INLINE_RUN_LIMIT: Duration = Duration::from_millis(500);

/// What the scheduler itself reports in each batch.
#[derive(Debug, Default, Clone, Copy)]
struct SelfStats {
    nonfinite_dropped_total: u64,
}

/// Runs the collectors and builds batches.
pub struct Scheduler {
    slots: Vec<Slot>,
    machine_id: String,
    collector_timeout: Duration,
    stats: SelfStats,
    /// How many samples the last batch held (see [`Slot::last_len`]).
    last_len: usize,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("collectors", &self.slots.iter().map(|s| s.name).collect::<Vec<_>>())
            .field("machine_id", &self.machine_id)
            .finish_non_exhaustive()
    }
}

impl Scheduler {
    /// A scheduler over `collectors`, labelling batches with `machine_id`.
    pub fn new(collectors: Vec<Box<dyn Collector>>, machine_id: String, collector_timeout: Duration) -> Self {
        let slots = collectors
            .into_iter()
            .map(|c| Slot {
                name: c.name(),
                labels: Labels::shared([("collector", c.name().into())]),
                state: SlotState::Idle(c),
                last_error: None,
                last_len: 0,
                on_thread: false,
                last_outcome: None,
            })
            .collect();
        Self { slots, machine_id, collector_timeout, stats: SelfStats::default(), last_len: 0 }
    }

    /// Whether a collector holds loaded BPF programs ([`Collector::uses_bpf_programs`]).
    pub fn has_bpf_programs(&self) -> bool {
        self.slots.iter().any(|s| matches!(&s.state, SlotState::Idle(c) if c.uses_bpf_programs()))
    }

    /// Take out the collectors that hold loaded BPF programs, with their state, for a reload
    /// that keeps the eBPF settings: loading the programs again costs a BTF parse and can fail.
    pub fn take_bpf_collectors(&mut self) -> Vec<Box<dyn Collector>> {
        let mut taken = Vec::new();
        for slot in &mut self.slots {
            if matches!(&slot.state, SlotState::Idle(c) if c.uses_bpf_programs())
                && let SlotState::Idle(c) = std::mem::replace(&mut slot.state, SlotState::Absent)
            {
                taken.push(c);
            }
        }
        taken
    }

    /// Each collector's name and how its last round went, in the order they were given.
    pub fn outcomes(&self) -> impl Iterator<Item = (&'static str, &Outcome)> {
        self.slots.iter().filter_map(|s| s.last_outcome.as_ref().map(|o| (s.name, o)))
    }

    /// One round: run every collector concurrently and build the batch stamped `timestamp`.
    pub async fn collect(&mut self, timestamp: i64) -> Batch {
        let deadline = tokio::time::Instant::now() + self.collector_timeout;
        let mut batch = Batch::new(self.machine_id.clone(), timestamp);
        batch.reserve(self.last_len);
        let mut self_samples = Vec::with_capacity(2 * self.slots.len());

        // Start the collectors that may block on their own threads first, run the ones that
        // cannot block right here meanwhile, then wait for the rest.
        let mut running: Vec<(usize, JoinHandle<RunResult>)> = Vec::new();
        let mut inline: Vec<(usize, Box<dyn Collector>)> = Vec::new();
        let mut start = |i: usize, c: Box<dyn Collector>, slot: &Slot| {
            let capacity = slot.last_len;
            if c.may_block() || slot.on_thread {
                running.push((i, tokio::task::spawn_blocking(move || run_collector(c, capacity))));
            } else {
                inline.push((i, c));
            }
        };
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let state = std::mem::replace(&mut slot.state, SlotState::Absent);
            match state {
                SlotState::Absent => {}
                SlotState::Idle(c) => start(i, c, slot),
                SlotState::Overrunning(h) if h.is_finished() => match h.await {
                    // The late result is stale: drop its samples, run afresh.
                    Ok((c, ..)) => start(i, c, slot),
                    Err(e) => thread_failed(slot, &e),
                },
                SlotState::Overrunning(h) => {
                    slot.state = SlotState::Overrunning(h);
                    self_samples.extend(outcome_samples(&slot.labels, self.collector_timeout, false));
                    log_failure(slot, "still running from an earlier round (not started again)".into());
                }
            }
        }
        for (i, c) in inline {
            let slot = &mut self.slots[i];
            let result = run_collector(c, slot.last_len);
            let took = result.3;
            if took > INLINE_RUN_LIMIT.min(self.collector_timeout) {
                slot.on_thread = true;
                tracing::warn!(
                    collector = slot.name,
                    "reading took {took:.1?}, too long for kernel memory: from now on it runs on its own thread \
                     under the {:?} collector timeout",
                    self.collector_timeout
                );
            }
            record(slot, result, &mut batch, &mut self_samples);
        }
        for (i, mut handle) in running {
            let slot = &mut self.slots[i];
            match tokio::time::timeout_at(deadline, &mut handle).await {
                Err(_elapsed) => {
                    slot.state = SlotState::Overrunning(handle);
                    self_samples.extend(outcome_samples(&slot.labels, self.collector_timeout, false));
                    log_failure(slot, format!("timed out after {:?}", self.collector_timeout));
                }
                // run_collector catches panics, so a JoinError means the runtime is shutting down.
                Ok(Err(e)) => thread_failed(slot, &e),
                Ok(Ok(result)) => record(slot, result, &mut batch, &mut self_samples),
            }
        }

        self.stats.nonfinite_dropped_total += batch.nonfinite_dropped();
        batch.extend(self_samples);
        batch.push(Sample::count("dcmon_nonfinite_values_dropped_total", self.stats.nonfinite_dropped_total));
        self.last_len = batch.samples().len();
        batch
    }
}

/// File a finished run: its samples into the batch, its outcome into the self-metrics and the
/// slot's state.
fn record(slot: &mut Slot, (c, samples, result, took): RunResult, batch: &mut Batch, self_samples: &mut Vec<Sample>) {
    slot.last_len = samples.len();
    if result.is_ok() {
        slot.last_outcome = Some(Outcome::Collected { samples: samples.len(), first: samples.first().cloned() });
    }
    batch.extend(samples);
    match result {
        Ok(()) => {
            if slot.last_error.take().is_some() {
                tracing::info!(collector = slot.name, "collector recovered");
            }
            slot.state = SlotState::Idle(c);
            self_samples.extend(outcome_samples(&slot.labels, took, true));
        }
        Err(CollectError::NotPresent(why)) => {
            tracing::info!(collector = slot.name, "not collecting: {why}");
            slot.last_outcome = Some(Outcome::NotPresent(why));
            slot.state = SlotState::Absent;
        }
        Err(CollectError::Failed(e)) => {
            slot.state = SlotState::Idle(c);
            self_samples.extend(outcome_samples(&slot.labels, took, false));
            log_failure(slot, format!("{e:#}"));
        }
    }
}

fn run_collector(mut c: Box<dyn Collector>, capacity: usize) -> RunResult {
    let start = Instant::now();
    let mut samples = Vec::with_capacity(capacity);
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| c.collect(&mut samples))).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        Err(CollectError::Failed(anyhow::anyhow!("collector panicked (a bug): {msg}")))
    });
    (c, samples, result, start.elapsed())
}

fn outcome_samples(collector: &Labels, took: Duration, success: bool) -> [Sample; 2] {
    [
        Sample {
            name: "dcmon_collector_duration_seconds",
            value: Value::Gauge(took.as_secs_f64()),
            labels: collector.clone(),
        },
        Sample { name: "dcmon_collector_success", value: Value::Count(u64::from(success)), labels: collector.clone() },
    ]
}

/// A collector thread that ended without a result: the runtime is shutting down.
fn thread_failed(slot: &mut Slot, e: &tokio::task::JoinError) {
    tracing::error!(collector = slot.name, "collector thread failed: {e}; disabling it");
    slot.last_outcome = Some(Outcome::Failed(format!("collector thread failed: {e}")));
}

/// A failed round: logged when it differs from the last failure logged.
fn log_failure(slot: &mut Slot, msg: String) {
    slot.last_outcome = Some(Outcome::Failed(msg.clone()));
    if slot.last_error.as_deref() != Some(msg.as_str()) {
        tracing::warn!(collector = slot.name, "collection failed: {msg}");
        slot.last_error = Some(msg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(&'static str, Result<(), &'static str>, Duration);

    impl Collector for Fixed {
        fn name(&self) -> &'static str {
            self.0
        }
        fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
            std::thread::sleep(self.2);
            out.push(Sample::count("x", 1).label("from", self.0));
            match self.1 {
                Ok(()) => Ok(()),
                Err("absent") => Err(CollectError::NotPresent("no such thing".into())),
                // resume_unwind skips the panic hook, whose backtrace (RUST_BACKTRACE=1) can
                // take longer than the test's collector timeout; the unwind is the same.
                Err("panic") => std::panic::resume_unwind(Box::new("boom")),
                Err(e) => Err(CollectError::Failed(anyhow::anyhow!(e))),
            }
        }
    }

    fn success_of(b: &Batch, collector: &str) -> Option<Value> {
        b.samples().iter().find(|s| s.name == "dcmon_collector_success" && s.labels[0].1 == collector).map(|s| s.value)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_collectors_self_metric_label_is_made_once_and_shared_by_every_round() {
        let mut s =
            Scheduler::new(vec![Box::new(Fixed("ok", Ok(()), Duration::ZERO))], "m".into(), Duration::from_secs(5));
        let rounds = [s.collect(1).await, s.collect(2).await];
        let labels: Vec<&Labels> = rounds
            .iter()
            .flat_map(|b| b.samples())
            .filter(|x| x.name.starts_with("dcmon_collector_"))
            .map(|x| &x.labels)
            .collect();
        assert_eq!(labels.len(), 4, "duration and success, two rounds");
        for l in &labels {
            assert_eq!(**l, [("collector", "ok".into())]);
            let (Labels::Shared(a), Labels::Shared(b)) = (l, labels[0]) else { panic!("{l:?}") };
            assert!(std::sync::Arc::ptr_eq(a, b));
        }
    }

    /// An inline collector that sleeps `.0[round]` (then nothing).
    struct SlowInline(Vec<Duration>);

    impl Collector for SlowInline {
        fn name(&self) -> &'static str {
            "slow_inline"
        }
        fn may_block(&self) -> bool {
            false
        }
        fn collect(&mut self, _out: &mut Vec<Sample>) -> Result<(), CollectError> {
            if !self.0.is_empty() {
                std::thread::sleep(self.0.remove(0));
            }
            Ok(())
        }
    }

    /// An inline collector found slow is run on a thread from the next round on, where the
    /// collector timeout applies: its second, longer run is cut off instead of holding up the
    /// round.
    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_inline_collector_moves_to_a_thread_under_the_timeout() {
        let slow = SlowInline(vec![Duration::from_millis(400), Duration::from_millis(3000)]);
        let mut s = Scheduler::new(vec![Box::new(slow)], "m".into(), Duration::from_millis(300));
        let b = s.collect(1).await;
        assert_eq!(success_of(&b, "slow_inline"), Some(Value::Count(1)), "inline: no timeout to enforce");
        assert!(s.slots[0].on_thread, "400 ms inline is too slow for kernel memory");
        let b = s.collect(2).await;
        assert_eq!(
            success_of(&b, "slow_inline"),
            Some(Value::Count(0)),
            "on a thread: 3 s overruns the 300 ms timeout"
        );
    }

    /// What `check` prints: each collector's outcome of the last round, in the given order.
    #[tokio::test(flavor = "current_thread")]
    async fn each_collectors_last_outcome_is_kept() {
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(Fixed("good", Ok(()), Duration::ZERO)),
            Box::new(Fixed("bad", Err("broken"), Duration::ZERO)),
            Box::new(Fixed("absent", Err("absent"), Duration::ZERO)),
        ];
        let mut s = Scheduler::new(collectors, "m".into(), Duration::from_secs(60));
        assert_eq!(s.outcomes().count(), 0, "no round yet");
        s.collect(5).await;
        let outcomes: Vec<(&str, Outcome)> = s.outcomes().map(|(n, o)| (n, o.clone())).collect();
        assert_eq!(
            outcomes,
            [
                ("good", Outcome::Collected { samples: 1, first: Some(Sample::count("x", 1).label("from", "good")) }),
                ("bad", Outcome::Failed("broken".into())),
                ("absent", Outcome::NotPresent("no such thing".into())),
            ]
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn failures_are_isolated_and_reported() {
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(Fixed("good", Ok(()), Duration::ZERO)),
            Box::new(Fixed("bad", Err("broken"), Duration::ZERO)),
            Box::new(Fixed("absent", Err("absent"), Duration::ZERO)),
            Box::new(Fixed("panics", Err("panic"), Duration::ZERO)),
            Box::new(Fixed("slow", Ok(()), Duration::from_millis(1500))),
        ];
        let mut s = Scheduler::new(collectors, "m".into(), Duration::from_millis(300));
        let started = Instant::now();
        let b = s.collect(5).await;
        assert!(started.elapsed() < Duration::from_millis(1200), "slow collector delayed the round");
        assert_eq!(b.timestamp, 5);
        assert_eq!(success_of(&b, "good"), Some(Value::Count(1)));
        assert_eq!(success_of(&b, "bad"), Some(Value::Count(0)));
        assert_eq!(success_of(&b, "panics"), Some(Value::Count(0)));
        assert_eq!(success_of(&b, "slow"), Some(Value::Count(0)));
        assert_eq!(success_of(&b, "absent"), None, "absent collectors report nothing");
        // Samples a failing collector produced before failing are kept; the timed-out one's are not.
        let froms: Vec<&str> = b.samples().iter().filter(|s| s.name == "x").map(|s| s.labels[0].1.as_str()).collect();
        assert_eq!(froms, ["good", "bad", "absent", "panics"]);

        // Next round: the slow one is still running and is not started twice.
        let b = s.collect(6).await;
        assert_eq!(success_of(&b, "slow"), Some(Value::Count(0)));
        assert_eq!(success_of(&b, "absent"), None);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // Once it returned, it runs again (and its late result was discarded).
        let b = s.collect(7).await;
        assert_eq!(success_of(&b, "good"), Some(Value::Count(1)));
        assert_eq!(success_of(&b, "slow"), Some(Value::Count(0)), "1.5 s > 0.3 s timeout again");
    }
}
