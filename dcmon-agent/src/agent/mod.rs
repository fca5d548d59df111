//! The scheduler and the daemon loop.
//!
//! Every round, each collector that may block (hardware, tools) runs on its own blocking thread,
//! all at once, each under the collector timeout; whatever is done by then goes into the batch.
//! Collectors that cannot block (reads of files that were found on procfs or sysfs when the
//! collector was built: the kernel serves those from memory) run on the runtime thread
//! meanwhile: handing them to a thread costs more than their work (two context switches per
//! handoff; README, Performance). A procfs
//! collector whose files are elsewhere (lxcfs's FUSE files over /proc/loadavg and friends in a
//! container, a `host_root` on any other filesystem) runs on a thread like the hardware ones.
//! A collector that overruns is reported as failed and is not started again until its earlier
//! run returns (no overlapping runs), so one hung file read never delays or multiplies the
//! others. An inline collector whose run turns out slow anyway is moved to the threaded path
//! for good, under the timeout like the others. Rounds start on a fixed cadence: the time a
//! round takes does not stretch the interval.
//!
//! Batches are stamped with the wall clock, and a batch goes to the outbox only when its
//! timestamp is after the previous one's: the server replaces the rows of a batch whose
//! timestamp repeats, so after the clock steps back rounds are held ([`BatchClock`]).

mod clock;
mod scheduler;
#[cfg(test)]
mod tests;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::commands::{CommandStats, Poller};
use crate::deliver::{DeliveryPolicy, deliver};
use crate::notify::Notifier;
use crate::outbox::{DCMON_OUTPUT, SharedOutbox};
use crate::output::metrics_endpoint::LatestRound;
use crate::output::remote_write::RemoteWriteClient;
use crate::ticker::Ticker;
use crate::upload::Uploader;

use clock::unix_millis;
pub use clock::{BatchClock, SystemClock, WallClock};
pub use scheduler::{Outcome, Scheduler};

/// One round of the daemon loop: collect, stamp, and append the batch to the outbox unless
/// the clock holds it back; then hand it to `latest` for scrapes. The outbox's self-metrics are
/// added to the batch, and the remote commands' when `commands` polling is on. True when the
/// outbox must be fsynced before going on.
async fn round(
    scheduler: &mut Scheduler,
    clock: &mut BatchClock,
    outbox: &SharedOutbox,
    latest: &LatestRound,
    scheduled: tokio::time::Instant,
    commands: Option<&CommandStats>,
) -> bool {
    let timestamp = clock.stamp(scheduled, tokio::time::Instant::now());
    let batch = scheduler.collect(timestamp).await;
    let Some(mut batch) = clock.admit(batch) else {
        // Scrapes carry no timestamp, so held rounds are shown too (a copy: this is rare).
        if let Some(held) = clock.held() {
            let mut shown = held.clone();
            shown.extend(outbox.samples(shown.timestamp));
            latest.publish(shown);
        }
        return false;
    };
    batch.extend(outbox.samples(batch.timestamp));
    if let Some(stats) = commands {
        batch.extend(stats.samples());
    }
    // One write(2) into the page cache, on this thread: a thread hop would cost more than the
    // write (outbox/mod.rs says when batches are fsynced).
    let fsync = outbox.push(batch.timestamp, Bytes::from(batch.to_json()));
    latest.publish(batch);
    fsync
}

/// Seconds since the Unix epoch, as the batch wants them.
pub fn unix_now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// This host's offset within the interval, so that many agents do not post at the same
/// instant. Derived from the machine id (FNV-1a, stable across restarts and Rust versions).
pub fn phase_offset(machine_id: &str, interval: Duration) -> Duration {
    let hash =
        machine_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(hash % interval_ms)
}

/// Time from `now_unix_ms` to the first tick: the first wall-clock instant at least `min_gap`
/// away whose offset within the interval is `phase`.
pub fn first_tick_delay(now_unix_ms: u64, phase: Duration, interval: Duration, min_gap: Duration) -> Duration {
    let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX).max(1);
    let phase_ms = u64::try_from(phase.as_millis()).unwrap_or(0) % interval_ms;
    let earliest = now_unix_ms + u64::try_from(min_gap.as_millis()).unwrap_or(0);
    let base = earliest - earliest % interval_ms + phase_ms;
    let first = if base >= earliest { base } else { base + interval_ms };
    Duration::from_millis(first - now_unix_ms)
}

/// The client of one push output. A new kind of output is a variant here and an arm in
/// [`OutputTask::spawn`].
#[derive(Debug, Clone)]
pub enum OutputSender {
    /// The dcmon server (JSON, with the API key).
    Dcmon(Uploader),
    /// A Prometheus remote_write receiver.
    RemoteWrite(RemoteWriteClient),
}

/// One push output: its name (its cursor in the outbox and its `output` label) and its client.
#[derive(Debug, Clone)]
pub struct OutputTask {
    /// The output's name ([`crate::config::Config::output_names`]).
    pub name: String,
    /// Its client.
    pub sender: OutputSender,
}

impl OutputTask {
    /// A remote_write output, named by its config.
    pub fn remote_write(client: RemoteWriteClient) -> Self {
        Self { name: client.output().to_owned(), sender: OutputSender::RemoteWrite(client) }
    }

    /// The dcmon server output, named [`DCMON_OUTPUT`].
    pub fn dcmon(uploader: Uploader) -> Self {
        Self { name: DCMON_OUTPUT.to_owned(), sender: OutputSender::Dcmon(uploader) }
    }

    /// Start its delivery task ([`deliver`]) on a clone of its client.
    fn spawn(&self, outbox: &SharedOutbox, policy: &DeliveryPolicy, stop: watch::Receiver<bool>) -> JoinHandle<()> {
        let (outbox, name, policy) = (outbox.clone(), self.name.clone(), policy.clone());
        match &self.sender {
            OutputSender::Dcmon(uploader) => tokio::spawn(deliver(outbox, name, uploader.clone(), policy, stop)),
            OutputSender::RemoteWrite(client) => tokio::spawn(deliver(outbox, name, client.clone(), policy, stop)),
        }
    }
}

/// Everything the daemon loop needs besides the scheduler.
#[derive(Debug, Clone)]
pub struct Daemon {
    /// Time between batches.
    pub interval: Duration,
    /// Offset of this host's ticks within the interval ([`phase_offset`]).
    pub phase: Duration,
    /// The durable queue of unsent batches (kept across config reloads).
    pub outbox: SharedOutbox,
    /// The push outputs, each delivered by its own task from its own cursor; their names are
    /// the outbox's outputs while the loop runs. Empty: batches are kept (under the outbox's
    /// bounds) and nothing is sent.
    pub outputs: Vec<OutputTask>,
    /// Retry and pacing rules (each output applies them on its own).
    pub policy: DeliveryPolicy,
    /// The remote commands poll task, when `commands.enabled` (README, Remote commands).
    pub commands: Option<Poller>,
}

/// Requests to the daemon loop (from signal handlers, or tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// SIGTERM / SIGINT: stop.
    Shutdown,
    /// SIGHUP: re-read the config.
    Reload,
}

/// How long delivery may take to finish its in-flight request when the loop stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Run the daemon until a [`Control`] arrives (a closed channel means shutdown), and return
/// it: a batch every interval, each written to the outbox before delivery, which runs in its
/// own task so a slow or absent server never delays collection, and handed to `latest` (the
/// `/metrics` endpoint reads it; publishing moves the batch, it costs no copy). Pings the
/// systemd watchdog from this loop, so a stuck loop gets the service restarted.
pub async fn run(
    scheduler: &mut Scheduler,
    daemon: &Daemon,
    clock: &mut BatchClock,
    control: &mut mpsc::Receiver<Control>,
    notifier: &Notifier,
    latest: &LatestRound,
) -> Control {
    let outbox = &daemon.outbox;
    let (stop_tx, stop_rx) = watch::channel(false);
    // The outbox holds batches for exactly the outputs running now: one a reload took out no
    // longer holds any, one it added starts from its saved cursor (or the oldest batch).
    let names: Vec<String> = daemon.outputs.iter().map(|o| o.name.clone()).collect();
    outbox.lock().set_outputs(&names);
    let mut delivery: Vec<(String, JoinHandle<()>)> =
        daemon.outputs.iter().map(|o| (o.name.clone(), o.spawn(outbox, &daemon.policy, stop_rx.clone()))).collect();
    if let Some(poller) = &daemon.commands {
        delivery.push(("commands".to_owned(), tokio::spawn(poller.clone().run(stop_rx.clone()))));
    }
    drop(stop_rx);
    let command_stats = daemon.commands.as_ref().map(|p| p.stats().clone());

    let now_ms = u64::try_from(unix_millis(clock.clock.now())).unwrap_or(0);
    // At least a second before the first round, so CPU usage has a window to measure.
    let delay = first_tick_delay(now_ms, daemon.phase, daemon.interval, Duration::from_secs(1));
    tracing::info!("first batch in {delay:.1?}, then every {:?}", daemon.interval);
    // `systemctl status` shows it; after a reload, the interval now in force.
    notifier.notify(&format!("STATUS=collecting every {:?}", daemon.interval));
    let mut ticker = Cadence::new(tokio::time::Instant::now() + delay, daemon.interval);
    let mut watchdog = notifier.watchdog_interval().map(tokio::time::interval);
    let mut rounds: u64 = 0;
    let exit = loop {
        tokio::select! {
            c = control.recv() => break c.unwrap_or(Control::Shutdown),
            () = async { match watchdog.as_mut() { Some(w) => { w.tick().await; } None => std::future::pending().await } } => {
                notifier.notify("WATCHDOG=1");
            }
            scheduled = ticker.tick() => {
                if round(scheduler, clock, outbox, latest, scheduled, command_stats.as_deref()).await {
                    outbox.sync().await;
                }
                rounds += 1;
                // By the second round start-up is over (config, collectors, eBPF load, the
                // first connection): let the kernel take back the code only it used.
                if rounds == 2 {
                    match crate::footprint::page_out_own_code() {
                        Ok(bytes) => tracing::debug!("paged out {} KiB of start-up code", bytes / 1024),
                        Err(e) => tracing::debug!("cannot page out start-up code: {e}"),
                    }
                }
            }
        }
    };
    let _ = stop_tx.send(true);
    // One grace period for all outputs, not one each.
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    for (name, task) in &mut delivery {
        if tokio::time::timeout_at(deadline, &mut *task).await.is_err() {
            task.abort();
            if name == "commands" {
                tracing::warn!("abandoned the command poll in flight; its results stay in the journal");
            } else {
                tracing::warn!(output = %name, "abandoned the upload in flight; its batch stays in the outbox");
            }
        }
    }
    exit
}

/// The collection cadence: a timerfd ([`Ticker`]), or tokio's interval if no timerfd can be
/// made. Either way, after a stall (suspend, overload) missed rounds are skipped, not burst.
enum Cadence {
    Timerfd(Ticker),
    Tokio(tokio::time::Interval),
}

impl Cadence {
    fn new(first: tokio::time::Instant, period: Duration) -> Self {
        match Ticker::new(first, period) {
            Ok(t) => Self::Timerfd(t),
            Err(e) => {
                tracing::warn!("no timerfd ({e}); using the runtime's timer, which wakes more often");
                Self::tokio(first, period)
            }
        }
    }

    fn tokio(first: tokio::time::Instant, period: Duration) -> Self {
        let mut interval = tokio::time::interval_at(first, period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        Self::Tokio(interval)
    }

    /// The scheduled instant of the next tick.
    async fn tick(&mut self) -> tokio::time::Instant {
        match self {
            Self::Timerfd(t) => match t.tick().await {
                Ok(at) => at,
                Err(e) => {
                    tracing::warn!("timerfd failed ({e}); using the runtime's timer from now on");
                    let period = t.period();
                    *self = Self::tokio(tokio::time::Instant::now(), period);
                    Box::pin(self.tick()).await
                }
            },
            Self::Tokio(i) => i.tick().await,
        }
    }
}

/// Fsync the outbox and log what is left in it, at shutdown.
pub fn report_outbox_at_exit(outbox: &SharedOutbox) {
    let mut o = outbox.lock();
    o.sync_now();
    let stats = o.stats();
    if stats.in_memory > 0 {
        tracing::error!(
            "{} unsent batches were held in memory ({}) and are lost",
            stats.in_memory,
            o.persist_error().unwrap_or("outbox not writable")
        );
    } else {
        tracing::info!(backlog = stats.batches, "outbox {} left for the next start", o.dir().display());
    }
}
