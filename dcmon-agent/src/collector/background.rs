//! A slow job on its own thread, for sources too slow for the collection round (apt-get,
//! ipmitool): the collector asks for a refresh when it is due, `collect()` reports the latest
//! finished result at once, and there is never more than one run in flight.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

struct Latest<T> {
    result: Option<T>,
    finished_runs: u64,
}

/// The worker thread and its latest result.
pub struct Refresher<T> {
    latest: Arc<(Mutex<Latest<T>>, Condvar)>,
    kick: SyncSender<()>,
    /// Set by a successful trigger, cleared when that run has finished.
    busy: Arc<AtomicBool>,
}

impl<T> std::fmt::Debug for Refresher<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refresher").finish_non_exhaustive()
    }
}

impl<T: Clone + Send + 'static> Refresher<T> {
    /// Start a thread named `name` that runs `job` each time [`Refresher::trigger`] succeeds.
    /// The thread ends when the refresher is dropped (after a run in progress finishes).
    pub fn spawn(name: &str, mut job: impl FnMut() -> T + Send + 'static) -> std::io::Result<Self> {
        // `busy` admits one request at a time, so the one-slot channel never holds more than
        // it: a busy worker refuses new requests instead of queueing them.
        let (kick, requests) = mpsc::sync_channel::<()>(1);
        let busy = Arc::new(AtomicBool::new(false));
        let worker_busy = Arc::clone(&busy);
        let latest = Arc::new((Mutex::new(Latest { result: None, finished_runs: 0 }), Condvar::new()));
        let shared = Arc::clone(&latest);
        std::thread::Builder::new().name(name.to_owned()).spawn(move || {
            while requests.recv().is_ok() {
                let result = job();
                let (lock, cv) = &*shared;
                let mut l = lock.lock().unwrap_or_else(PoisonError::into_inner);
                l.result = Some(result);
                l.finished_runs += 1;
                worker_busy.store(false, Ordering::Release);
                cv.notify_all();
            }
        })?;
        Ok(Self { latest, kick, busy })
    }

    /// Start a run unless one is in progress; true when a run was started.
    pub fn trigger(&self) -> bool {
        if self.busy.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return false;
        }
        match self.kick.try_send(()) {
            Ok(()) => true,
            // Full cannot happen while `busy` guards the slot; Disconnected means the worker
            // panicked and nothing will refresh again.
            Err(TrySendError::Full(()) | TrySendError::Disconnected(())) => false,
        }
    }

    /// Whether a run is in progress or about to start.
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    /// The latest finished result, if any.
    pub fn latest(&self) -> Option<T> {
        let (lock, _) = &*self.latest;
        lock.lock().unwrap_or_else(PoisonError::into_inner).result.clone()
    }

    /// How many runs have finished.
    pub fn finished_runs(&self) -> u64 {
        let (lock, _) = &*self.latest;
        lock.lock().unwrap_or_else(PoisonError::into_inner).finished_runs
    }

    /// Wait up to `timeout` until more than `runs` runs have finished; true when they have.
    pub fn wait_past(&self, runs: u64, timeout: Duration) -> bool {
        // A timeout too large to add to now is no deadline at all.
        let deadline = Instant::now().checked_add(timeout);
        let (lock, cv) = &*self.latest;
        let mut l = lock.lock().unwrap_or_else(PoisonError::into_inner);
        while l.finished_runs <= runs {
            l = match deadline {
                None => cv.wait(l).unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                        return false;
                    };
                    cv.wait_timeout(l, left).unwrap_or_else(PoisonError::into_inner).0
                }
            };
        }
        true
    }

    /// Wait for the first run: up to `wait.usual`, and when `wait.patient` is longer (a
    /// one-shot run that wants every metric), say in the log that `what` is still running and
    /// go on waiting up to `wait.patient` in all.
    pub fn wait_first(&self, wait: FirstRunWait, what: &str) {
        if self.wait_past(0, wait.usual) || wait.patient <= wait.usual {
            return;
        }
        tracing::info!(
            "{what} is still running; waiting up to {:?} more for its first result",
            wait.patient - wait.usual
        );
        self.wait_past(0, wait.patient - wait.usual);
    }
}

/// How long a collection round waits for a background job's first result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirstRunWait {
    /// In the daemon: a short wait, so the first batch carries the result when it is quick but
    /// a slow tool never delays it much.
    pub usual: Duration,
    /// In a one-shot run ([`crate::collector::Collector::wait_for_first_result`]): the job's
    /// own time limit, so the one batch is complete. Equal to `usual` in the daemon.
    pub patient: Duration,
}

impl FirstRunWait {
    /// Wait `usual` only.
    pub fn usual(usual: Duration) -> Self {
        Self { usual, patient: usual }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn runs_never_overlap_and_latest_is_kept() {
        let running = Arc::new(AtomicU32::new(0));
        let r = Arc::clone(&running);
        let mut n = 0u32;
        let refresher = Refresher::spawn("test", move || {
            assert_eq!(r.fetch_add(1, Ordering::SeqCst), 0, "overlapping run");
            std::thread::sleep(Duration::from_millis(100));
            r.fetch_sub(1, Ordering::SeqCst);
            n += 1;
            n
        })
        .expect("spawn");
        assert_eq!(refresher.latest(), None);
        assert!(refresher.trigger());
        assert!(!refresher.trigger(), "second trigger while busy must be refused");
        refresher.wait_past(0, Duration::from_secs(5));
        assert_eq!(refresher.latest(), Some(1));
        assert_eq!(refresher.finished_runs(), 1);
    }

    #[test]
    fn waiting_without_end_never_overflows() {
        let refresher = Refresher::spawn("test", || 7).expect("spawn");
        assert!(refresher.trigger());
        assert!(refresher.wait_past(0, Duration::MAX), "the run finished");
        assert_eq!(refresher.latest(), Some(7));
        // Already past: returns at once, whatever the timeout.
        assert!(refresher.wait_past(0, Duration::MAX));
        assert!(!refresher.wait_past(1, Duration::ZERO), "no second run was started");
    }

    #[test]
    fn a_patient_first_wait_outlasts_the_usual_one() {
        let (release, released) = mpsc::channel::<()>();
        let released = Mutex::new(released);
        let refresher = Refresher::spawn("test", move || {
            let _ = released.lock().unwrap_or_else(PoisonError::into_inner).recv();
            1
        })
        .expect("spawn");
        assert!(refresher.trigger());
        refresher.wait_first(FirstRunWait::usual(Duration::from_millis(20)), "test job");
        assert_eq!(refresher.latest(), None, "the usual wait gives up");
        // Released only after the usual wait is over: only the patient wait sees the result.
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let _ = release.send(());
        });
        refresher.wait_first(
            FirstRunWait { usual: Duration::from_millis(20), patient: Duration::from_secs(60) },
            "test job",
        );
        assert_eq!(refresher.latest(), Some(1));
        releaser.join().expect("releaser");
    }
}
