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

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::batch::{Batch, Sample};
use crate::collector::{CollectError, Collector};
use crate::deliver::{DeliveryPolicy, deliver};
use crate::notify::Notifier;
use crate::outbox::SharedOutbox;
use crate::ticker::Ticker;
use crate::upload::Uploader;

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
                    self_samples.extend(outcome_samples(slot.name, self.collector_timeout, false));
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
                    self_samples.extend(outcome_samples(slot.name, self.collector_timeout, false));
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
            self_samples.extend(outcome_samples(slot.name, took, true));
        }
        Err(CollectError::NotPresent(why)) => {
            tracing::info!(collector = slot.name, "not collecting: {why}");
            slot.last_outcome = Some(Outcome::NotPresent(why));
            slot.state = SlotState::Absent;
        }
        Err(CollectError::Failed(e)) => {
            slot.state = SlotState::Idle(c);
            self_samples.extend(outcome_samples(slot.name, took, false));
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

fn outcome_samples(collector: &'static str, took: Duration, success: bool) -> [Sample; 2] {
    [
        Sample::gauge("dcmon_collector_duration_seconds", took.as_secs_f64()).label("collector", collector),
        Sample::count("dcmon_collector_success", u64::from(success)).label("collector", collector),
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

/// The wall clock that stamps batches: [`SystemClock`] in the daemon; tests step their own.
pub trait WallClock: Send + Sync {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;
}

/// The system's real-time clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Wall-clock time that runs ahead of or behind monotonic time by at least this much between
/// two rounds is logged as a clock step (NTP slewing stays far below it).
const CLOCK_STEP_LOGGED: Duration = Duration::from_secs(1);

/// Batch timestamps. Each round is stamped with the wall clock at its scheduled instant, and a
/// batch goes to the outbox only when its timestamp is after the last one pushed: the server
/// stores rows by (machine, timestamp, metric) and replaces them when a timestamp repeats.
/// After the clock steps back, rounds are held and merged (the newest reading of each series
/// wins, a series only an earlier held round had is kept) until the clock has passed the last
/// timestamp pushed; then the merged batch goes out with that round's timestamp. Counters lose
/// nothing that way (they are cumulative), and gauges keep their latest reading, where sending
/// them would overwrite readings already stored or put new ones out of order. Kept across
/// config reloads.
pub struct BatchClock {
    clock: Arc<dyn WallClock>,
    /// The last round's scheduled instant and wall-clock time (Unix ms), to tell a clock step
    /// from time passing.
    last_round: Option<(tokio::time::Instant, i64)>,
    /// The timestamp of the last batch pushed to the outbox.
    last_pushed: Option<i64>,
    /// The rounds held back since, merged into one batch.
    held: Option<Batch>,
    held_rounds: u64,
}

impl std::fmt::Debug for BatchClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchClock")
            .field("last_pushed", &self.last_pushed)
            .field("held_rounds", &self.held_rounds)
            .finish_non_exhaustive()
    }
}

fn unix_millis(t: SystemTime) -> i64 {
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    match t.duration_since(UNIX_EPOCH) {
        Ok(after) => ms(after),
        Err(before) => -ms(before.duration()),
    }
}

impl BatchClock {
    /// Timestamps read from `clock`.
    pub fn new(clock: Arc<dyn WallClock>) -> Self {
        Self { clock, last_round: None, last_pushed: None, held: None, held_rounds: 0 }
    }

    /// The Unix second of the round scheduled at `scheduled`, `now` being the monotonic time:
    /// a round that starts late on a busy host still carries its own second. A clock step
    /// since the last round is logged, once, with its size.
    pub fn stamp(&mut self, scheduled: tokio::time::Instant, now: tokio::time::Instant) -> i64 {
        let late = i64::try_from(now.saturating_duration_since(scheduled).as_millis()).unwrap_or(i64::MAX);
        let wall_ms = unix_millis(self.clock.now()).saturating_sub(late);
        if let Some((last_at, last_wall_ms)) = self.last_round {
            let elapsed = i64::try_from(scheduled.saturating_duration_since(last_at).as_millis()).unwrap_or(i64::MAX);
            let step = wall_ms.saturating_sub(last_wall_ms).saturating_sub(elapsed);
            if u128::from(step.unsigned_abs()) >= CLOCK_STEP_LOGGED.as_millis() {
                #[allow(clippy::cast_precision_loss, reason = "a step size for a log line")]
                let secs = step.unsigned_abs() as f64 / 1000.0;
                let direction = if step < 0 { "back" } else { "forward" };
                tracing::warn!("the wall clock stepped {direction} by {secs:.1} s");
            }
        }
        self.last_round = Some((scheduled, wall_ms));
        wall_ms.div_euclid(1000)
    }

    /// `batch`, with the rounds held before it merged in, when it may go to the outbox; `None`
    /// when its timestamp is not after the last batch pushed: it is held (see [`BatchClock`]).
    pub fn admit(&mut self, batch: Batch) -> Option<Batch> {
        let batch = match self.held.take() {
            Some(older) => merge_over(batch, older),
            None => batch,
        };
        match self.last_pushed {
            Some(last) if batch.timestamp <= last => {
                if self.held_rounds == 0 {
                    tracing::warn!(
                        "batch timestamp {} is not after the last one sent ({last}): holding rounds back until the \
                         wall clock passes it (the server would overwrite the batch stored there)",
                        batch.timestamp
                    );
                }
                self.held_rounds += 1;
                self.held = Some(batch);
                None
            }
            last => {
                if self.held_rounds > 0 {
                    tracing::info!(
                        "the wall clock passed {} again: {} rounds held back go out merged into batch {}",
                        last.unwrap_or_default(),
                        self.held_rounds,
                        batch.timestamp
                    );
                    self.held_rounds = 0;
                }
                self.last_pushed = Some(batch.timestamp);
                Some(batch)
            }
        }
    }

    /// Say at exit what held rounds are lost (their timestamps were not after the last one sent).
    pub fn report_at_exit(&self) {
        if self.held_rounds > 0 {
            tracing::warn!(
                "{} rounds held back since the wall clock stepped back are not sent (not after batch {})",
                self.held_rounds,
                self.last_pushed.unwrap_or_default()
            );
        }
    }
}

/// `newer` plus the samples of `older` whose series (name and labels) `newer` lacks.
fn merge_over(mut newer: Batch, older: Batch) -> Batch {
    if older.machine_id != newer.machine_id {
        // A reload changed the machine id: the held rounds describe another machine.
        return newer;
    }
    let have: HashSet<(&str, &crate::batch::Labels)> = newer.samples().iter().map(|s| (s.name, &s.labels)).collect();
    let missing: Vec<Sample> =
        older.samples().iter().filter(|s| !have.contains(&(s.name, &s.labels))).cloned().collect();
    newer.extend(missing);
    newer
}

/// One round of the daemon loop: collect, stamp, and append the batch to the outbox unless
/// the clock holds it back. True when the outbox must be fsynced before going on.
async fn round(
    scheduler: &mut Scheduler,
    clock: &mut BatchClock,
    outbox: &SharedOutbox,
    scheduled: tokio::time::Instant,
) -> bool {
    let timestamp = clock.stamp(scheduled, tokio::time::Instant::now());
    let batch = scheduler.collect(timestamp).await;
    let Some(mut batch) = clock.admit(batch) else {
        return false;
    };
    batch.extend(outbox.stats().samples());
    // One write(2) into the page cache, on this thread: a thread hop would cost more than the
    // write (outbox/mod.rs says when batches are fsynced).
    outbox.push(batch.timestamp, Bytes::from(batch.to_json()))
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

/// Everything the daemon loop needs besides the scheduler.
#[derive(Debug, Clone)]
pub struct Daemon {
    /// Time between batches.
    pub interval: Duration,
    /// Offset of this host's ticks within the interval ([`phase_offset`]).
    pub phase: Duration,
    /// The durable queue of unsent batches (kept across config reloads).
    pub outbox: SharedOutbox,
    /// The HTTP client.
    pub uploader: Uploader,
    /// Retry and pacing rules.
    pub policy: DeliveryPolicy,
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
/// own task so a slow or absent server never delays collection. Pings the systemd watchdog
/// from this loop, so a stuck loop gets the service restarted.
pub async fn run(
    scheduler: &mut Scheduler,
    daemon: &Daemon,
    clock: &mut BatchClock,
    control: &mut mpsc::Receiver<Control>,
    notifier: &Notifier,
) -> Control {
    let outbox = &daemon.outbox;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut delivery = tokio::spawn(deliver(outbox.clone(), daemon.uploader.clone(), daemon.policy.clone(), stop_rx));

    let now_ms = u64::try_from(unix_millis(clock.clock.now())).unwrap_or(0);
    // At least a second before the first round, so CPU usage has a window to measure.
    let delay = first_tick_delay(now_ms, daemon.phase, daemon.interval, Duration::from_secs(1));
    tracing::info!("first batch in {delay:.1?}, then every {:?}", daemon.interval);
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
                if round(scheduler, clock, outbox, scheduled).await {
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
    if tokio::time::timeout(SHUTDOWN_GRACE, &mut delivery).await.is_err() {
        delivery.abort();
        tracing::warn!("abandoned the upload in flight; its batch stays in the outbox");
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
            round(&mut scheduler, &mut clock, &outbox, start + Duration::from_secs(k)).await;
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
