//! The outbox shared by the daemon loop, which pushes batches and fsyncs those that have to
//! wait, and delivery, which sends them and takes them out.

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::watch;

use super::{Outbox, OutboxStats};
use crate::batch::Sample;

/// A handle on one outbox; clones share it.
#[derive(Debug, Clone)]
pub struct SharedOutbox {
    outbox: Arc<Mutex<Outbox>>,
    /// Bumped at each push, so that every output's delivery waiting for a batch goes on (a
    /// `Notify` wakes only one waiter, and there is one per output).
    pushed: Arc<watch::Sender<()>>,
}

/// One delivery task's view of the pushes ([`SharedOutbox::watch_pushes`]).
#[derive(Debug)]
pub struct PushWatch(watch::Receiver<()>);

impl PushWatch {
    /// Until the next push since the last wait (at once if one came meanwhile).
    pub async fn pushed(&mut self) {
        if self.0.changed().await.is_err() {
            // The sender lives as long as the outbox; should it go, no push ever comes.
            std::future::pending::<()>().await;
        }
    }
}

impl SharedOutbox {
    /// Share `outbox`.
    pub fn new(outbox: Outbox) -> Self {
        Self { outbox: Arc::new(Mutex::new(outbox)), pushed: Arc::new(watch::channel(()).0) }
    }

    /// Wake-ups at each push, for one delivery task; pushes before this call are not seen.
    pub fn watch_pushes(&self) -> PushWatch {
        PushWatch(self.pushed.subscribe())
    }

    /// The outbox self-metrics and each output's ([`Outbox::output_samples`]), for a batch
    /// stamped `now_unix`.
    pub fn samples(&self, now_unix: i64) -> Vec<Sample> {
        let o = self.lock();
        let mut samples = o.stats().samples().to_vec();
        samples.extend(o.output_samples(now_unix));
        samples
    }

    /// Lock the outbox. Its state stays consistent even if a holder panicked (every method
    /// leaves the index matching the files), so a poisoned lock is used as is.
    pub fn lock(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Depth and counters.
    pub fn stats(&self) -> OutboxStats {
        self.lock().stats()
    }

    /// Store a batch collected at `timestamp` ([`Outbox::push`]) and wake delivery. Returns
    /// whether a stored batch now has to wait behind another, so that [`SharedOutbox::sync`]
    /// is due before anything else.
    #[must_use = "a batch that has to wait is fsynced with `sync`"]
    pub fn push(&self, timestamp: i64, body: Bytes) -> bool {
        let must_sync = {
            let mut o = self.lock();
            o.push(timestamp, body);
            o.backlog_needs_sync()
        };
        self.pushed.send_replace(());
        must_sync
    }

    /// Fsync what the outbox wrote since the last sync, on a blocking thread, so the batches
    /// that have to wait survive a power loss.
    pub async fn sync(&self) {
        let Some(job) = self.lock().sync_job() else { return };
        match tokio::task::spawn_blocking(move || {
            let result = job.run();
            (job, result)
        })
        .await
        {
            Ok((job, result)) => self.lock().sync_finished(&job, result),
            Err(e) => tracing::error!("outbox fsync task failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::outbox::OutboxLimits;

    fn shared(dir: &std::path::Path) -> SharedOutbox {
        let limits = OutboxLimits { max_bytes: 64 << 20, max_age: Duration::from_secs(86400) };
        SharedOutbox::new(Outbox::open(dir.join("outbox"), limits, 1_700_000_000))
    }

    fn body(timestamp: i64) -> Bytes {
        Bytes::from(format!(r#"{{"timestamp":{timestamp},"metrics":[]}}"#))
    }

    /// Whether `watch` wakes within 100 ms (paused time: no real wait).
    async fn wakes(watch: &mut PushWatch) -> bool {
        tokio::time::timeout(Duration::from_millis(100), watch.pushed()).await.is_ok()
    }

    /// Every output's delivery task wakes at a push (not only one of them), a wake-up is not
    /// lost when the push comes before the wait, and a task waits while nothing was pushed.
    #[tokio::test(start_paused = true)]
    async fn a_push_wakes_every_watcher_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = shared(dir.path());
        let (mut first, mut second) = (outbox.watch_pushes(), outbox.watch_pushes());
        assert!(!wakes(&mut first).await, "nothing pushed yet");
        let _ = outbox.push(1, body(1));
        assert!(wakes(&mut first).await && wakes(&mut second).await, "both outputs wake");
        assert!(!wakes(&mut first).await, "one wake-up per push");
        let mut late = outbox.watch_pushes();
        assert!(!wakes(&mut late).await, "pushes before the watch began are not seen");
    }

    /// The second batch stored while the first waits must be fsynced before anything else; after
    /// `sync` nothing is left to fsync. Stats and samples read the same outbox.
    #[tokio::test]
    async fn a_batch_behind_another_is_due_for_sync_and_sync_does_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outbox = shared(dir.path());
        assert!(!outbox.push(1, body(1)), "the only batch goes out at once: no fsync due");
        assert!(outbox.push(2, body(2)), "a batch behind another waits: fsync due");
        assert!(outbox.lock().sync_job().is_some());
        outbox.sync().await;
        assert!(outbox.lock().sync_job().is_none(), "sync wrote everything to disk");
        assert!(!outbox.lock().backlog_needs_sync());
        let stats = outbox.stats();
        assert_eq!(stats.batches, 2);
        assert!(stats.bytes > (body(1).len() + body(2).len()) as u64, "the records, headers and bodies: {stats:?}");
        let samples = outbox.samples(1_700_000_000);
        let batches = samples.iter().find(|s| s.name == "dcmon_outbox_batches").map(|s| s.value.as_f64());
        assert_eq!(batches, Some(2.0), "{samples:?}");
        assert_eq!(samples.iter().filter(|s| s.name.starts_with("dcmon_outbox_")).count(), 5, "{samples:?}");
    }
}
