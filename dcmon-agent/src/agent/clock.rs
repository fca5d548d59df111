//! Batch timestamps: the wall clock, and the clock that holds rounds back after it steps back.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::batch::{Batch, Sample};

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
    pub(super) clock: Arc<dyn WallClock>,
    /// The last round's scheduled instant and wall-clock time (Unix ms), to tell a clock step
    /// from time passing.
    last_round: Option<(tokio::time::Instant, i64)>,
    /// The timestamp of the last batch pushed to the outbox.
    last_pushed: Option<i64>,
    /// The rounds held back since, merged into one batch.
    held: Option<Batch>,
    pub(super) held_rounds: u64,
}

impl std::fmt::Debug for BatchClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchClock")
            .field("last_pushed", &self.last_pushed)
            .field("held_rounds", &self.held_rounds)
            .finish_non_exhaustive()
    }
}

pub(super) fn unix_millis(t: SystemTime) -> i64 {
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

    /// The rounds held back since the clock stepped back, merged, if any.
    pub(super) fn held(&self) -> Option<&Batch> {
        self.held.as_ref()
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
