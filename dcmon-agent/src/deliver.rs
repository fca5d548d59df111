//! Delivery: sends the outbox's batches oldest first and applies the retry policy.
//!
//! - network error, timeout, 408, 429, 5xx: exponential backoff with full jitter, capped;
//!   Retry-After honoured on 429 and 503.
//! - 401, 403: keep every batch, log at a slow rate, re-read the key file and retry slowly, so
//!   fixing the key (or re-enabling the client on the server) delivers the backlog.
//! - 400, 413, 422 (and other 4xx): the batch can never be accepted; move it to `rejected/`
//!   with the answer logged and go on with the next.
//! - After an outage the backlog goes out at a bounded rate, in order, while collection carries
//!   on in its own task.

use std::hash::{BuildHasher as _, RandomState};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use crate::outbox::Outbox;
use crate::upload::{Uploader, Verdict};

/// How the delivery loop paces itself.
#[derive(Debug, Clone)]
pub struct DeliveryPolicy {
    /// First retry delay (before jitter); doubles per consecutive failure.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Retry delay after 401/403.
    pub auth_retry: Duration,
    /// Backlog pace: at most this many batches per second.
    pub catchup_batches_per_sec: u32,
    /// Where to re-read the key from after a 401/403.
    pub api_key_file: PathBuf,
}

/// The outbox, shared between the collection loop (push) and delivery (send, remove).
pub type SharedOutbox = Arc<Mutex<Outbox>>;

/// Lock the outbox. Its state stays consistent even if a holder panicked (every method leaves
/// the index matching the files), so a poisoned lock is used as is.
pub fn lock(outbox: &SharedOutbox) -> MutexGuard<'_, Outbox> {
    outbox.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Fsync what the outbox wrote since the last sync, on a blocking thread, so the batches that
/// have to wait survive a power loss.
pub async fn sync(outbox: &SharedOutbox) {
    let Some(job) = lock(outbox).sync_job() else { return };
    match tokio::task::spawn_blocking(move || {
        let result = job.run();
        (job, result)
    })
    .await
    {
        Ok((job, result)) => lock(outbox).sync_finished(&job, result),
        Err(e) => tracing::error!("outbox fsync task failed: {e}"),
    }
}

/// Full jitter: uniform in [0, min(max, base * 2^failures)).
pub fn backoff_delay(policy: &DeliveryPolicy, failures: u32) -> Duration {
    let ceiling = policy.backoff_base.saturating_mul(1u32 << failures.min(20)).min(policy.backoff_max);
    let random = RandomState::new().hash_one(Instant::now());
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(if nanos == 0 { 0 } else { random % nanos })
}

/// A log line that repeats at most every `every` unless its text changes.
#[derive(Debug)]
struct SlowLog {
    every: Duration,
    last: Option<(String, Instant)>,
}

impl SlowLog {
    fn should_log(&mut self, msg: &str) -> bool {
        let due = match &self.last {
            Some((m, at)) => m != msg || at.elapsed() >= self.every,
            None => true,
        };
        if due {
            self.last = Some((msg.to_owned(), Instant::now()));
        }
        due
    }
}

/// Send batches until `shutdown` turns true. `wake` is notified when a batch is pushed.
pub async fn deliver(
    outbox: SharedOutbox,
    mut uploader: Uploader,
    policy: DeliveryPolicy,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failures: u32 = 0;
    let mut log = SlowLog { every: Duration::from_secs(600), last: None };
    let pace = Duration::from_secs(1) / policy.catchup_batches_per_sec.max(1);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let next = lock(&outbox).oldest();
        let Some((seq, body)) = next else {
            tokio::select! {
                () = wake.notified() => {}
                _ = shutdown.changed() => {}
            }
            continue;
        };
        let result = uploader.send(body).await;
        if result.as_ref().is_err_and(|e| !matches!(e.verdict(), Verdict::Rejected)) {
            // The batch has to wait: make sure it outlives a power loss.
            sync(&outbox).await;
        }
        let pause = match result {
            Ok(_) => {
                let mut o = lock(&outbox);
                o.remove(seq);
                if failures > 0 || log.last.is_some() {
                    tracing::info!(backlog = o.stats().batches, "uploads succeeding again");
                    log.last = None;
                }
                failures = 0;
                // Pace only the backlog: with nothing waiting the loop sleeps on `wake`.
                if o.stats().batches > 0 { pace } else { Duration::ZERO }
            }
            Err(e) => match e.verdict() {
                Verdict::RetryLater { retry_after } => {
                    failures = failures.saturating_add(1);
                    let delay = retry_after.unwrap_or_else(|| backoff_delay(&policy, failures));
                    if log.should_log(&e.to_string()) {
                        let backlog = lock(&outbox).stats().batches;
                        tracing::warn!(backlog, "upload failed: {e}; retrying in {delay:.1?} (batches are kept)");
                    }
                    delay
                }
                Verdict::NotAuthorized => {
                    if log.should_log(&e.to_string()) {
                        let backlog = lock(&outbox).stats().batches;
                        tracing::error!(
                            backlog,
                            "upload refused: {e}; keeping batches, retrying every {:?}",
                            policy.auth_retry
                        );
                    }
                    match crate::api_key::load(&policy.api_key_file) {
                        Ok((key, _)) => {
                            if let Err(e) = uploader.set_key(&key) {
                                tracing::error!("{}: {e}", policy.api_key_file.display());
                            }
                        }
                        Err(e) => tracing::error!("{e}"),
                    }
                    policy.auth_retry
                }
                Verdict::Rejected => {
                    tracing::error!("server refused a batch for good: {e}; moved it to rejected/ and going on");
                    lock(&outbox).reject(seq, &e.to_string());
                    Duration::ZERO
                }
            },
        };
        if !pause.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_and_capped() {
        let policy = DeliveryPolicy {
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            auth_retry: Duration::from_secs(60),
            catchup_batches_per_sec: 10,
            api_key_file: PathBuf::new(),
        };
        for failures in 0..40 {
            let ceiling = Duration::from_secs(1u64 << failures.min(20)).min(Duration::from_secs(300));
            let d = backoff_delay(&policy, failures);
            assert!(d < ceiling, "{failures}: {d:?} >= {ceiling:?}");
        }
        let draws: std::collections::HashSet<Duration> = (0..20).map(|_| backoff_delay(&policy, 10)).collect();
        assert!(draws.len() > 10, "not random: {draws:?}");
    }

    #[test]
    fn slow_log_repeats_only_on_change() {
        let mut l = SlowLog { every: Duration::from_secs(600), last: None };
        assert!(l.should_log("a"));
        assert!(!l.should_log("a"));
        assert!(l.should_log("b"));
    }
}
