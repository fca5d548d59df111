//! Delivery: one task per output ([`deliver`]), each sending the outbox's batches oldest first
//! from its own cursor and applying the retry policy on its own (backoff, Retry-After, log
//! throttling, catch-up pace), so a slow or dead output never delays another.
//!
//! - network error, timeout, 3xx, 5xx and every 4xx not named below (404, 405, 407, 408, 429,
//!   431, ...): exponential backoff with full jitter, capped. A Retry-After on 429 and 503
//!   (seconds or an HTTP-date) is a hint held within the backoff floor and cap.
//! - 401, 403: keep every batch, log at a slow rate, and retry slowly, re-reading the key file
//!   right before each retry, so fixing the key (or re-enabling the client on the server)
//!   delivers the backlog.
//! - 400, 413, 422 only: the batch can never be accepted; move it to `rejected/` with the
//!   answer logged and go on with the next. For an output other than the dcmon server a
//!   rejected batch is counted and its receiver's answer logged, and it goes on (no copy).
//! - After an outage the backlog goes out at a bounded rate, in order, while collection carries
//!   on in its own task.

use std::future::Future;
use std::hash::{BuildHasher as _, RandomState};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api_key::{ApiKey, ApiKeyError, PermissionWarning};
use crate::outbox::{DCMON_OUTPUT, SharedOutbox};
use crate::output::remote_write::{RemoteWriteClient, RemoteWriteError, RemoteWriteSent};
use crate::upload::{Delivered, UploadError, Uploader, Verdict};

/// How the delivery loop paces itself.
#[derive(Debug, Clone)]
pub struct DeliveryPolicy {
    /// First retry delay (before jitter); doubles per consecutive failure. Also the least a
    /// server's Retry-After can make the loop wait.
    pub backoff_base: Duration,
    /// Longest retry delay, the server's Retry-After included.
    pub backoff_max: Duration,
    /// Retry delay after 401/403.
    pub auth_retry: Duration,
    /// Backlog pace: at most this many batches per second.
    pub catchup_batches_per_sec: u32,
    /// Where to re-read the key from before retrying after a 401/403.
    pub api_key_file: PathBuf,
}

/// A send that failed, as the delivery loop needs it: what to do about it ([`Verdict`]) and,
/// through `Display`, what to log.
pub trait SendFailure: std::fmt::Display {
    /// Retry later, keep batches and retry slowly (not authorised), or give the batch up.
    fn verdict(&self) -> Verdict;
    /// The answer's status code for the debug line of each post; "none" without an answer.
    fn status(&self) -> String;
}

impl SendFailure for UploadError {
    fn verdict(&self) -> Verdict {
        UploadError::verdict(self)
    }

    fn status(&self) -> String {
        match self {
            Self::Status { status, .. } => status.as_u16().to_string(),
            Self::InvalidStatus { code } => code.to_string(),
            Self::Unreachable { .. } => "none".to_owned(),
        }
    }
}

/// A delivered batch's answer, as the debug line of each post shows it.
pub trait SendSuccess {
    /// Its status code; "2xx" when the client does not say.
    fn status(&self) -> String {
        "2xx".to_owned()
    }
}

impl SendSuccess for Delivered {
    fn status(&self) -> String {
        self.status.as_u16().to_string()
    }
}

/// A client that reports nothing about a delivered batch.
impl SendSuccess for () {}

/// What the delivery loop needs from an output's client ([`Uploader`] for the dcmon server;
/// remote_write clients fit too); a trait so the loop's timing can be tested in paused time,
/// where real sockets and timers do not mix.
pub trait BatchSender: Send + 'static {
    /// What a delivered batch's answer says.
    type Sent: SendSuccess + Send;
    /// Why a send failed.
    type Error: SendFailure + Send;
    /// Send one batch (the outbox's JSON body) and classify the answer.
    fn send(&mut self, body: Bytes) -> impl Future<Output = Result<Self::Sent, Self::Error>> + Send;
    /// Whether it sends the agent's API key, so that after a 401/403 the key file is read
    /// again before the retry ([`BatchSender::set_key`]). No default: each output says.
    fn uses_api_key(&self) -> bool;
    /// Use this key from the next send on (only called when [`BatchSender::uses_api_key`]).
    fn set_key(&mut self, _key: &ApiKey) -> anyhow::Result<()> {
        Ok(())
    }
}

impl SendFailure for RemoteWriteError {
    fn verdict(&self) -> Verdict {
        RemoteWriteError::verdict(self)
    }

    fn status(&self) -> String {
        match self {
            Self::Status { status, .. } => status.as_u16().to_string(),
            Self::InvalidStatus { code, .. } => code.to_string(),
            Self::Unreachable { .. } | Self::Batch { .. } => "none".to_owned(),
        }
    }
}

impl SendSuccess for RemoteWriteSent {
    fn status(&self) -> String {
        // No request at all: an empty batch with nothing gone stale.
        self.status.map_or_else(|| "none".to_owned(), |s| s.as_u16().to_string())
    }
}

impl BatchSender for RemoteWriteClient {
    type Sent = RemoteWriteSent;
    type Error = RemoteWriteError;

    fn send(&mut self, body: Bytes) -> impl Future<Output = Result<RemoteWriteSent, RemoteWriteError>> + Send {
        RemoteWriteClient::send(self, body)
    }

    /// Its credentials are the output's own (headers, basic auth, bearer token files).
    fn uses_api_key(&self) -> bool {
        false
    }
}

impl BatchSender for Uploader {
    type Sent = Delivered;
    type Error = UploadError;

    fn send(&mut self, body: Bytes) -> impl Future<Output = Result<Delivered, UploadError>> + Send {
        Uploader::send(self, body)
    }

    fn uses_api_key(&self) -> bool {
        true
    }

    fn set_key(&mut self, key: &ApiKey) -> anyhow::Result<()> {
        Uploader::set_key(self, key)
    }
}

/// Full jitter: uniform in [0, min(max, base * 2^failures)).
pub fn backoff_delay(policy: &DeliveryPolicy, failures: u32) -> Duration {
    let ceiling = policy.backoff_base.saturating_mul(1u32 << failures.min(20)).min(policy.backoff_max);
    let random = RandomState::new().hash_one(Instant::now());
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(if nanos == 0 { 0 } else { random % nanos })
}

/// The wait after a transient failure. The server's Retry-After is a hint held within
/// [`DeliveryPolicy::backoff_base`] and [`DeliveryPolicy::backoff_max`]: taken as is, a 0
/// made a request storm and a huge one stopped delivery until a restart. Without one, the
/// jittered backoff.
pub fn retry_delay(policy: &DeliveryPolicy, failures: u32, retry_after: Option<Duration>) -> Duration {
    match retry_after {
        // Not `clamp`: it panics when the bounds cross, and the cap is the one to keep.
        Some(hint) => hint.max(policy.backoff_base).min(policy.backoff_max),
        None => backoff_delay(policy, failures),
    }
}

/// How long a read of the key file may take before the retry goes ahead with the key in use.
const KEY_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a repeated delivery error is logged again.
const SLOW_LOG_EVERY: Duration = Duration::from_secs(600);

/// A log line that repeats at most every `every` unless its text changes.
#[derive(Debug)]
struct SlowLog {
    every: Duration,
    last: Option<(String, tokio::time::Instant)>,
}

impl SlowLog {
    fn should_log(&mut self, msg: &str) -> bool {
        let due = match &self.last {
            Some((m, at)) => m != msg || at.elapsed() >= self.every,
            None => true,
        };
        if due {
            self.last = Some((msg.to_owned(), tokio::time::Instant::now()));
        }
        due
    }
}

type KeyRead = JoinHandle<Result<(ApiKey, Option<PermissionWarning>), ApiKeyError>>;

/// Reads the key file on a blocking thread, so a file that blocks (a FIFO with no writer, a
/// hung network filesystem) cannot freeze delivery. A read that outlives its timeout is kept
/// and waited for again before the next retry: one stuck thread, not one per retry.
#[derive(Debug)]
struct KeyFile {
    path: PathBuf,
    pending: Option<KeyRead>,
}

impl KeyFile {
    /// The key now in the file, or `None` (logged) when it cannot be had in time.
    async fn read(&mut self) -> Option<ApiKey> {
        let path = &self.path;
        let read = self.pending.get_or_insert_with(|| {
            let path = path.clone();
            tokio::task::spawn_blocking(move || crate::api_key::load(&path))
        });
        let Ok(joined) = tokio::time::timeout(KEY_READ_TIMEOUT, read).await else {
            tracing::error!(
                "reading the API key file {} took longer than {KEY_READ_TIMEOUT:?} (is it a FIFO, or on a hung \
                 filesystem?); retrying with the key in use",
                path.display()
            );
            return None;
        };
        self.pending = None;
        match joined {
            Ok(Ok((key, _))) => Some(key),
            Ok(Err(e)) => {
                tracing::error!("{e}");
                None
            }
            Err(e) => {
                tracing::error!("reading the API key file {} failed: {e}", self.path.display());
                None
            }
        }
    }
}

/// How many metric objects a batch body holds, counted without building them; 0 when the
/// body has no `metrics` list.
fn count_metrics(body: &[u8]) -> usize {
    use serde::de::{Deserializer, IgnoredAny, SeqAccess, Visitor};
    struct Count;
    impl<'de> Visitor<'de> for Count {
        type Value = usize;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
            let mut n = 0;
            while seq.next_element::<IgnoredAny>()?.is_some() {
                n += 1;
            }
            Ok(n)
        }
    }
    fn count<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        d.deserialize_seq(Count)
    }
    #[derive(serde::Deserialize)]
    struct Metrics {
        #[serde(deserialize_with = "count")]
        metrics: usize,
    }
    serde_json::from_slice::<Metrics>(body).map_or(0, |m| m.metrics)
}

/// The debug line for one post: what went and what came back.
fn log_post<S: BatchSender>(
    output: &str,
    seq: u64,
    samples: usize,
    bytes: usize,
    result: &Result<S::Sent, S::Error>,
    took: Duration,
) {
    let status = match result {
        Ok(sent) => sent.status(),
        Err(e) => e.status(),
    };
    tracing::debug!(output, seq, samples, bytes, status = %status, took = ?took, "batch posted");
}

/// Send `output`'s batches (from its cursor in the outbox) until `shutdown` turns true; with
/// none waiting, wait for the next push. Run one per output: each keeps its own failures,
/// backoff and log throttling.
pub async fn deliver<S: BatchSender>(
    outbox: SharedOutbox,
    output: String,
    mut sender: S,
    policy: DeliveryPolicy,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failures: u32 = 0;
    let mut log = SlowLog { every: SLOW_LOG_EVERY, last: None };
    let mut key_file = KeyFile { path: policy.api_key_file.clone(), pending: None };
    let mut reread_key = false;
    let pace = Duration::from_secs(1) / policy.catchup_batches_per_sec.max(1);
    // Subscribed before the first look at the outbox, so no push in between is missed.
    let mut pushes = outbox.watch_pushes();
    let dcmon = output == DCMON_OUTPUT;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let next = outbox.lock().oldest_for(&output);
        let Some((seq, body)) = next else {
            tokio::select! {
                () = pushes.pushed() => {}
                _ = shutdown.changed() => {}
            }
            continue;
        };
        // After a 401/403 the key is read right before the retry, so a key fixed during the
        // wait is the one sent.
        if std::mem::take(&mut reread_key)
            && let Some(key) = key_file.read().await
            && let Err(e) = sender.set_key(&key)
        {
            tracing::error!("{}: {e}", policy.api_key_file.display());
        }
        // Counting samples walks the body: only when the line is wanted.
        let samples = tracing::enabled!(tracing::Level::DEBUG).then(|| count_metrics(&body));
        let bytes = body.len();
        let started = tokio::time::Instant::now();
        let result = sender.send(body).await;
        if let Some(samples) = samples {
            log_post::<S>(&output, seq, samples, bytes, &result, started.elapsed());
        }
        if result.as_ref().is_err_and(|e| !matches!(e.verdict(), Verdict::Rejected)) {
            // The batch has to wait: make sure it outlives a power loss.
            outbox.sync().await;
        }
        let pause = match result {
            Ok(_) => {
                let mut o = outbox.lock();
                o.delivered(&output, seq);
                let backlog = o.backlog_for(&output);
                if failures > 0 || log.last.is_some() {
                    tracing::info!(output, backlog, "uploads succeeding again");
                    log.last = None;
                }
                failures = 0;
                // Pace only the backlog: with nothing waiting the loop sleeps until a push.
                if backlog > 0 { pace } else { Duration::ZERO }
            }
            Err(e) => match e.verdict() {
                Verdict::RetryLater { retry_after } => {
                    failures = failures.saturating_add(1);
                    let delay = retry_delay(&policy, failures, retry_after);
                    let backlog = {
                        let mut o = outbox.lock();
                        o.send_failed(&output);
                        o.backlog_for(&output)
                    };
                    if log.should_log(&e.to_string()) {
                        tracing::warn!(
                            output,
                            backlog,
                            "upload failed: {e}; retrying in {delay:.1?} (batches are kept)"
                        );
                    }
                    delay
                }
                Verdict::NotAuthorized => {
                    let backlog = {
                        let mut o = outbox.lock();
                        o.send_failed(&output);
                        o.backlog_for(&output)
                    };
                    if log.should_log(&e.to_string()) {
                        tracing::error!(
                            output,
                            backlog,
                            "upload refused: {e}; keeping batches, retrying every {:?}",
                            policy.auth_retry
                        );
                    }
                    reread_key = sender.uses_api_key();
                    policy.auth_retry
                }
                Verdict::Rejected => {
                    if dcmon {
                        tracing::error!(
                            output,
                            "server refused a batch for good: {e}; moved it to rejected/ and going on"
                        );
                    } else {
                        tracing::error!(
                            output,
                            "output {output} refused batch {seq} for good: {e}; dropped it for this output and going on"
                        );
                    }
                    outbox.lock().gave_up(&output, seq, &e.to_string());
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
mod tests;
