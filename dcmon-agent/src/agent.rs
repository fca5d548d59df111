//! The scheduler and the daemon loop.
//!
//! Every round, each collector runs on its own blocking thread, all at once, each under the
//! collector timeout; whatever is done by then goes into the batch. A collector that overruns is
//! reported as failed and is not started again until its earlier run returns (no overlapping
//! runs), so one hung file read never delays or multiplies the others. Rounds start on a fixed
//! cadence: the time a round takes does not stretch the interval.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::batch::{Batch, Sample};
use crate::collector::{CollectError, Collector};
use crate::upload::{UploadError, Uploader};

/// Batches waiting for upload before new ones are dropped (durable queuing is the outbox's job).
const UPLOAD_QUEUE_BATCHES: usize = 64;
/// Attempts per batch for retryable failures, and the pause before each retry.
const UPLOAD_RETRY_DELAYS: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(3)];

type RunResult = (
    Box<dyn Collector>,
    Vec<Sample>,
    Result<(), CollectError>,
    Duration,
);

enum SlotState {
    Idle(Box<dyn Collector>),
    /// A run that overran its timeout; the collector comes back when the thread returns.
    Overrunning(JoinHandle<RunResult>),
    /// Reported "not present": never run again.
    Absent,
}

struct Slot {
    name: &'static str,
    state: SlotState,
    /// The last failure logged, so a failure repeating every round is logged once.
    last_error: Option<String>,
}

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
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field(
                "collectors",
                &self.slots.iter().map(|s| s.name).collect::<Vec<_>>(),
            )
            .field("machine_id", &self.machine_id)
            .finish_non_exhaustive()
    }
}

impl Scheduler {
    /// A scheduler over `collectors`, labelling batches with `machine_id`.
    pub fn new(
        collectors: Vec<Box<dyn Collector>>,
        machine_id: String,
        collector_timeout: Duration,
    ) -> Self {
        let slots = collectors
            .into_iter()
            .map(|c| Slot {
                name: c.name(),
                state: SlotState::Idle(c),
                last_error: None,
            })
            .collect();
        Self {
            slots,
            machine_id,
            collector_timeout,
            stats: SelfStats::default(),
        }
    }

    /// One round: run every collector concurrently and build the batch stamped `timestamp`.
    pub async fn collect(&mut self, timestamp: i64) -> Batch {
        let deadline = tokio::time::Instant::now() + self.collector_timeout;
        let mut batch = Batch::new(self.machine_id.clone(), timestamp);
        let mut self_samples = Vec::new();

        // Start everything first, then wait: the collectors run side by side.
        let mut running: Vec<(usize, JoinHandle<RunResult>)> = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let state = std::mem::replace(&mut slot.state, SlotState::Absent);
            match state {
                SlotState::Absent => {}
                SlotState::Idle(c) => {
                    running.push((i, tokio::task::spawn_blocking(move || run_collector(c))))
                }
                SlotState::Overrunning(h) if h.is_finished() => match h.await {
                    // The late result is stale: drop its samples, run afresh.
                    Ok((c, ..)) => {
                        running.push((i, tokio::task::spawn_blocking(move || run_collector(c))))
                    }
                    Err(e) => tracing::error!(
                        collector = slot.name,
                        "collector thread failed: {e}; disabling it"
                    ),
                },
                SlotState::Overrunning(h) => {
                    slot.state = SlotState::Overrunning(h);
                    self_samples.extend(outcome_samples(slot.name, self.collector_timeout, false));
                    log_failure(
                        slot,
                        "still running from an earlier round (not started again)".into(),
                    );
                }
            }
        }

        for (i, mut handle) in running {
            let slot = &mut self.slots[i];
            match tokio::time::timeout_at(deadline, &mut handle).await {
                Err(_elapsed) => {
                    slot.state = SlotState::Overrunning(handle);
                    self_samples.extend(outcome_samples(slot.name, self.collector_timeout, false));
                    log_failure(
                        slot,
                        format!("timed out after {:?}", self.collector_timeout),
                    );
                }
                // run_collector catches panics, so a JoinError means the runtime is shutting down.
                Ok(Err(e)) => tracing::error!(
                    collector = slot.name,
                    "collector thread failed: {e}; disabling it"
                ),
                Ok(Ok((c, samples, result, took))) => {
                    batch.extend(samples);
                    match result {
                        Ok(()) => {
                            if slot.last_error.take().is_some() {
                                tracing::info!(collector = slot.name, "collector recovered");
                            }
                            slot.state = SlotState::Idle(c);
                            self_samples.extend(outcome_samples(slot.name, took, true));
                        }
                        Err(CollectError::NotPresent(why)) => {
                            tracing::info!(collector = slot.name, "not collecting: {why}");
                            slot.state = SlotState::Absent;
                        }
                        Err(CollectError::Failed(e)) => {
                            slot.state = SlotState::Idle(c);
                            self_samples.extend(outcome_samples(slot.name, took, false));
                            log_failure(slot, format!("{e:#}"));
                        }
                    }
                }
            }
        }

        self.stats.nonfinite_dropped_total += batch.nonfinite_dropped();
        batch.extend(self_samples);
        batch.push(Sample::count(
            "dcmon_nonfinite_values_dropped_total",
            self.stats.nonfinite_dropped_total,
        ));
        batch
    }
}

fn run_collector(mut c: Box<dyn Collector>) -> RunResult {
    let start = Instant::now();
    let mut samples = Vec::new();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| c.collect(&mut samples)))
        .unwrap_or_else(|panic| {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            Err(CollectError::Failed(anyhow::anyhow!(
                "collector panicked (a bug): {msg}"
            )))
        });
    (c, samples, result, start.elapsed())
}

fn outcome_samples(collector: &'static str, took: Duration, success: bool) -> [Sample; 2] {
    [
        Sample::gauge("dcmon_collector_duration_seconds", took.as_secs_f64())
            .label("collector", collector),
        Sample::count("dcmon_collector_success", u64::from(success)).label("collector", collector),
    ]
}

fn log_failure(slot: &mut Slot, msg: String) {
    if slot.last_error.as_deref() != Some(msg.as_str()) {
        tracing::warn!(collector = slot.name, "collection failed: {msg}");
        slot.last_error = Some(msg);
    }
}

/// Seconds since the Unix epoch, as the batch wants them.
pub fn unix_now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Run the daemon until `shutdown` resolves: a batch every `interval`, uploaded in the
/// background so a slow server never delays collection.
pub async fn run(
    mut scheduler: Scheduler,
    uploader: Uploader,
    interval: Duration,
    first_delay: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let (tx, rx) = mpsc::channel::<Bytes>(UPLOAD_QUEUE_BATCHES);
    let upload_task = tokio::spawn(upload_loop(uploader, rx));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + first_delay, interval);
    // After a stall (suspend, overload) skip the missed rounds instead of bursting them.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut dropped_batches: u64 = 0;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = ticker.tick() => {
                let batch = scheduler.collect(unix_now_secs()).await;
                let metrics = batch.samples().len();
                if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(Bytes::from(batch.to_json())) {
                    dropped_batches += 1;
                    tracing::warn!(dropped_batches, "upload queue full ({UPLOAD_QUEUE_BATCHES} batches): dropping this batch");
                } else {
                    tracing::debug!(metrics, "batch queued");
                }
            }
        }
    }
    tracing::info!("shutting down: finishing queued uploads (at most 5 s)");
    drop(tx);
    if tokio::time::timeout(Duration::from_secs(5), upload_task)
        .await
        .is_err()
    {
        tracing::warn!("uploads still pending at shutdown were abandoned");
    }
}

async fn upload_loop(uploader: Uploader, mut rx: mpsc::Receiver<Bytes>) {
    let mut last_failure: Option<String> = None;
    while let Some(body) = rx.recv().await {
        let mut delays = UPLOAD_RETRY_DELAYS.iter();
        loop {
            match uploader.send(body.clone()).await {
                Ok(accepted) => {
                    if last_failure.take().is_some() {
                        tracing::info!(url = uploader.metrics_url(), "uploads succeeding again");
                    }
                    tracing::debug!(accepted, "batch accepted");
                    break;
                }
                Err(e) => {
                    let retry = e.is_retryable().then(|| delays.next()).flatten();
                    log_upload_failure(&e, retry.is_some(), &mut last_failure);
                    match retry {
                        Some(d) => tokio::time::sleep(retry_delay(&e, *d)).await,
                        None => break,
                    }
                }
            }
        }
    }
}

/// Honour a short Retry-After; never wait longer than a minute here (the queue is in memory).
fn retry_delay(e: &UploadError, default: Duration) -> Duration {
    match e {
        UploadError::Status {
            retry_after_secs: Some(s),
            ..
        } => Duration::from_secs((*s).min(60)),
        _ => default,
    }
}

fn log_upload_failure(e: &UploadError, will_retry: bool, last: &mut Option<String>) {
    let msg = e.to_string();
    let action = if will_retry {
        "will retry"
    } else {
        "batch dropped"
    };
    tracing::warn!("upload failed, {action}: {msg}");
    *last = Some(msg);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Value;

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
                Err("panic") => panic!("boom"),
                Err(e) => Err(CollectError::Failed(anyhow::anyhow!(e))),
            }
        }
    }

    fn success_of(b: &Batch, collector: &str) -> Option<Value> {
        b.samples()
            .iter()
            .find(|s| s.name == "dcmon_collector_success" && s.labels[0].1 == collector)
            .map(|s| s.value)
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
        assert!(
            started.elapsed() < Duration::from_millis(1200),
            "slow collector delayed the round"
        );
        assert_eq!(b.timestamp, 5);
        assert_eq!(success_of(&b, "good"), Some(Value::Count(1)));
        assert_eq!(success_of(&b, "bad"), Some(Value::Count(0)));
        assert_eq!(success_of(&b, "panics"), Some(Value::Count(0)));
        assert_eq!(success_of(&b, "slow"), Some(Value::Count(0)));
        assert_eq!(
            success_of(&b, "absent"),
            None,
            "absent collectors report nothing"
        );
        // Samples a failing collector produced before failing are kept; the timed-out one's are not.
        let froms: Vec<&str> = b
            .samples()
            .iter()
            .filter(|s| s.name == "x")
            .map(|s| s.labels[0].1.as_str())
            .collect();
        assert_eq!(froms, ["good", "bad", "absent", "panics"]);

        // Next round: the slow one is still running and is not started twice.
        let b = s.collect(6).await;
        assert_eq!(success_of(&b, "slow"), Some(Value::Count(0)));
        assert_eq!(success_of(&b, "absent"), None);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // Once it returned, it runs again (and its late result was discarded).
        let b = s.collect(7).await;
        assert_eq!(success_of(&b, "good"), Some(Value::Count(1)));
        assert_eq!(
            success_of(&b, "slow"),
            Some(Value::Count(0)),
            "1.5 s > 0.3 s timeout again"
        );
    }
}
