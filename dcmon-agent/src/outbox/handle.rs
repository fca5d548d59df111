//! The outbox shared by the daemon loop, which pushes batches and fsyncs those that have to
//! wait, and delivery, which sends them and takes them out.

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::Notify;

use super::{Outbox, OutboxStats};

/// A handle on one outbox; clones share it.
#[derive(Debug, Clone)]
pub struct SharedOutbox {
    outbox: Arc<Mutex<Outbox>>,
    /// Notified at each push, so that delivery waiting on an empty outbox goes on.
    pushed: Arc<Notify>,
}

impl SharedOutbox {
    /// Share `outbox`.
    pub fn new(outbox: Outbox) -> Self {
        Self { outbox: Arc::new(Mutex::new(outbox)), pushed: Arc::new(Notify::new()) }
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
        self.pushed.notify_one();
        must_sync
    }

    /// Until the next [`SharedOutbox::push`] (at once if one came since the last wait).
    pub async fn pushed(&self) {
        self.pushed.notified().await;
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
