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
