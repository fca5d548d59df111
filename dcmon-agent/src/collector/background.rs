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

    /// Wait up to `timeout` until more than `runs` runs have finished.
    pub fn wait_past(&self, runs: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.latest;
        let mut l = lock.lock().unwrap_or_else(PoisonError::into_inner);
        while l.finished_runs <= runs {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return;
            };
            l = cv.wait_timeout(l, left).unwrap_or_else(PoisonError::into_inner).0;
        }
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
}
