//! The poll task: on its own schedule (never in the collection loop), post the results the
//! journal still holds, ask `GET {server}/api/commands/{machine_id}`, take each new command id
//! into the journal (fsynced) before it runs or is refused, run it on a blocking thread, and
//! post its result to `POST {server}/api/command-results`. Results are retried with the
//! delivery backoff until the server answers 2xx (a 400, 413 or 422, which a retry of the same
//! body cannot turn into a 2xx, drops the result with an error logged, as for batches).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderValue};
use tokio::sync::watch;

use super::journal::{Journal, Outcome};
use super::parse::{CommandId, MAX_ANSWER_BYTES, parse_answer};
use super::run::Runner;
use crate::api_key::ApiKey;
use crate::batch::Sample;
use crate::config::CommandsConfig;
use crate::deliver::{DeliveryPolicy, retry_delay};

/// The journal, shared by the poll tasks of successive configs (a reload starts a new task).
pub type SharedJournal = Arc<Mutex<Journal>>;

/// Lock the journal; a holder that panicked left it as saved on disk, so it is used as is.
pub fn lock(journal: &SharedJournal) -> MutexGuard<'_, Journal> {
    journal.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The self-metrics, added to each batch while polling is on.
#[derive(Debug, Default)]
pub struct CommandStats {
    received: AtomicU64,
    run: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

impl CommandStats {
    /// `dcmon_commands_{received,run,refused,failed}_total`.
    pub fn samples(&self) -> [Sample; 4] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            Sample::count("dcmon_commands_received_total", get(&self.received)),
            Sample::count("dcmon_commands_run_total", get(&self.run)),
            Sample::count("dcmon_commands_refused_total", get(&self.refused)),
            Sample::count("dcmon_commands_failed_total", get(&self.failed)),
        ]
    }
}

/// One poll task's settings (a reload builds a new one).
#[derive(Debug, Clone)]
pub struct Poller {
    client: reqwest::Client,
    commands_url: reqwest::Url,
    results_url: reqwest::Url,
    auth: HeaderValue,
    machine_id: String,
    config: CommandsConfig,
    policy: DeliveryPolicy,
    journal: SharedJournal,
    stats: Arc<CommandStats>,
    runner: Arc<Runner>,
}

/// What a poll task needs, as the daemon builds it.
#[allow(missing_debug_implementations)] // it holds the API key
pub struct PollerParts<'a> {
    /// The server base URL (no trailing slash).
    pub server_base: &'a str,
    /// The CA bundle for `https://`.
    pub ca: Option<&'a crate::upload::CaFile>,
    /// The API key.
    pub key: &'a ApiKey,
    /// This machine's id.
    pub machine_id: &'a str,
    /// Connect and total timeouts of one request.
    pub timeouts: (Duration, Duration),
    /// Retry pacing of results.
    pub policy: DeliveryPolicy,
    /// The journal and the counters, kept across reloads.
    pub journal: SharedJournal,
    /// The counters.
    pub stats: Arc<CommandStats>,
    /// Runs the actions.
    pub runner: Runner,
}

impl Poller {
    /// A poll task for `parts.runner.config`.
    pub fn new(parts: PollerParts<'_>) -> anyhow::Result<Self> {
        let url = |path: String| {
            reqwest::Url::parse(&format!("{}{path}", parts.server_base))
                .map_err(|e| anyhow::anyhow!("server_url gives no valid commands URL: {e}"))
        };
        let mut commands_url = url("/api/commands/".into())?;
        commands_url
            .path_segments_mut()
            .map_err(|()| anyhow::anyhow!("server_url cannot take a path"))?
            .pop_if_empty()
            .push(parts.machine_id);
        let mut auth = HeaderValue::try_from(format!("Bearer {}", parts.key.expose()))
            .map_err(|_| anyhow::anyhow!("the API key holds characters an HTTP header cannot carry"))?;
        auth.set_sensitive(true);
        let (connect, total) = parts.timeouts;
        let client = crate::upload::client_builder(parts.ca)?
            .connect_timeout(connect)
            .timeout(total)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            client,
            commands_url,
            results_url: url("/api/command-results".into())?,
            auth,
            machine_id: parts.machine_id.to_owned(),
            config: parts.runner.config.clone(),
            policy: parts.policy,
            journal: parts.journal,
            stats: parts.stats,
            runner: Arc::new(parts.runner),
        })
    }

    /// The counters (for the batches).
    pub fn stats(&self) -> &Arc<CommandStats> {
        &self.stats
    }

    /// Poll every `poll_interval` until `stop` turns true; after a failure, retry with the
    /// delivery backoff (at most the poll interval).
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let interval = Duration::from_secs(self.config.poll_interval.max(1));
        let mut failures: u32 = 0;
        let allowed: Vec<&str> = self.config.allow.iter().map(|t| t.name()).collect();
        tracing::info!("polling for commands every {interval:?}; allowed: {}", allowed.join(", "));
        loop {
            // A stop ends a poll in flight: a command already taken finishes on its blocking
            // thread and its result stays in the journal for the next start or config.
            let outcome = tokio::select! {
                r = self.cycle() => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            let wait = match outcome {
                Ok(()) => {
                    failures = 0;
                    interval
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!("commands: {e}");
                    retry_delay(&self.policy, failures, None).min(interval)
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// One poll: pending results, the server's commands, their results. A server that does
    /// not take results is still polled: a command it offers again is then seen in the journal
    /// and not run twice.
    pub async fn cycle(&self) -> Result<(), String> {
        let earlier = self.post_results().await;
        let polled = self.poll_and_run().await;
        let now = if earlier.is_ok() { self.post_results().await } else { Ok(()) };
        earlier.and(polled).and(now)
    }

    /// Fetch the server's commands; journal, run or refuse each new one.
    async fn poll_and_run(&self) -> Result<(), String> {
        let body = self.fetch().await?;
        let parsed = parse_answer(&body, &self.config)?;
        if parsed.without_id > 0 {
            tracing::warn!("commands: {} command(s) without a usable id ignored", parsed.without_id);
        }
        if !parsed.commands.is_empty() {
            let (journal, stats, runner) = (self.journal.clone(), self.stats.clone(), self.runner.clone());
            tokio::task::spawn_blocking(move || {
                for command in parsed.commands {
                    // Taken (durably, before anything runs) under the lock, which is not held while
                    // the command runs: the async side reads the journal too.
                    {
                        let mut j = lock(&journal);
                        if j.contains(&command.id) {
                            // Offered again: the server did not record the result; post it again.
                            j.redeliver(&command.id)?;
                            continue;
                        }
                        j.take(&command.id, unix_now())?;
                    }
                    stats.received.fetch_add(1, Ordering::Relaxed);
                    let outcome = match &command.action {
                        Err(why) => {
                            stats.refused.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(id = %command.id, r#type = %command.type_name, "command refused: {why}");
                            Outcome { success: false, message: format!("refused: {why}") }
                        }
                        Ok(action) => {
                            tracing::info!(id = %command.id, r#type = %command.type_name, "running command");
                            let outcome = runner.run(action);
                            let counter = if outcome.success { &stats.run } else { &stats.failed };
                            counter.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(id = %command.id, success = outcome.success, "{}", outcome.message);
                            outcome
                        }
                    };
                    lock(&journal).finish(&command.id, outcome)?;
                }
                Ok::<(), String>(())
            })
            .await
            .map_err(|e| format!("running commands: {e}"))??;
        }
        Ok(())
    }

    async fn fetch(&self) -> Result<Vec<u8>, String> {
        let mut response = self
            .client
            .get(self.commands_url.clone())
            .header(AUTHORIZATION, self.auth.clone())
            .send()
            .await
            .map_err(|e| format!("GET {}: {}", self.commands_url, crate::upload::error_chain(&e)))?;
        let status = response.status();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| format!("reading the commands answer: {e}"))? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(format!("commands answer larger than {MAX_ANSWER_BYTES} bytes refused"));
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            return Err(format!("GET {}: {status}: {}", self.commands_url, crate::upload::excerpt(&body)));
        }
        Ok(body)
    }

    /// Post every result the journal holds undelivered, oldest first; stop at the first failure.
    async fn post_results(&self) -> Result<(), String> {
        // On a blocking thread: a holder of the lock may be in fsync, and the runtime has one thread.
        let journal = self.journal.clone();
        let pending = tokio::task::spawn_blocking(move || lock(&journal).undelivered())
            .await
            .map_err(|e| format!("command journal: {e}"))?;
        for (id, outcome) in pending {
            let body = serde_json::json!({
                "machine_id": self.machine_id,
                "command_id": id.0,
                "timestamp": unix_now(),
                "result": {"success": outcome.success, "message": outcome.message},
            });
            let response = self
                .client
                .post(self.results_url.clone())
                .header(AUTHORIZATION, self.auth.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string())
                .send()
                .await
                .map_err(|e| format!("POST {}: {}", self.results_url, crate::upload::error_chain(&e)))?;
            let status = response.status();
            if matches!(status.as_u16(), 400 | 413 | 422) {
                // Rejected for good, as batches are (upload::classify_answer): retrying the
                // same body cannot succeed, and it would hold back every later result.
                tracing::error!("commands: the server rejected the result of command {id} ({status}); dropped");
            } else if !status.is_success() {
                return Err(format!("POST {} for command {id}: {status}", self.results_url));
            }
            self.mark_delivered(id).await?;
        }
        Ok(())
    }

    async fn mark_delivered(&self, id: CommandId) -> Result<(), String> {
        let journal = self.journal.clone();
        tokio::task::spawn_blocking(move || lock(&journal).delivered(&id))
            .await
            .map_err(|e| format!("command journal: {e}"))?
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
