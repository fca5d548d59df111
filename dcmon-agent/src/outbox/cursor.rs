//! The outputs' cursors: each output delivers the batches oldest first, at its own pace, and a
//! batch leaves the outbox once every configured output is done with it.

use bytes::Bytes;

use super::record::encode_cursor;
use super::{DCMON_OUTPUT, Outbox};
use crate::batch::Sample;

/// One output's counters since start, reported as self-metrics with an `output` label.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OutputStats {
    /// Batches it delivered.
    pub sent: u64,
    /// Attempts that failed (each retry counts).
    pub failed: u64,
    /// Batches it gave up on (refused for good by its receiver).
    pub dropped: u64,
}

impl Outbox {
    /// The outputs that deliver from this outbox (the config's `output_names`). An output with
    /// no saved cursor starts at the oldest batch waiting; batches that only outputs no longer
    /// listed still had to deliver leave now. With no output at all (only the scrape endpoint),
    /// the batches waiting leave and new ones are not stored.
    pub fn set_outputs(&mut self, outputs: &[String]) {
        let mut listed: Vec<String> = Vec::with_capacity(outputs.len());
        for o in outputs {
            if !listed.contains(o) {
                listed.push(o.clone());
            }
        }
        for o in &listed {
            if !super::valid_output_name(o) {
                // Config names are checked; one derived from a URL might not fit a record.
                tracing::warn!(
                    "outbox: output name {o:?} cannot be stored in a cursor record; after a restart it resends \
                     from the oldest batch waiting"
                );
            }
        }
        self.outputs = listed;
        self.release();
    }

    /// The configured outputs.
    pub fn outputs(&self) -> &[String] {
        &self.outputs
    }

    /// The first batch `output` has not finished.
    fn cursor(&self, output: &str) -> u64 {
        self.cursors.get(output).copied().unwrap_or(0)
    }

    /// The oldest batch `output` still has to deliver, as `(seq, body)`; `None` when it is
    /// caught up or not a configured output. Damage is handled as in [`Outbox::oldest`].
    pub fn oldest_for(&mut self, output: &str) -> Option<(u64, Bytes)> {
        if !self.outputs.iter().any(|o| o == output) {
            return None;
        }
        self.oldest_from(self.cursor(output))
    }

    /// `output` delivered batch `seq` (and, delivering in order, everything before it).
    pub fn delivered(&mut self, output: &str, seq: u64) {
        self.output_stats.entry(output.to_owned()).or_default().sent += 1;
        self.advance(output, seq);
    }

    /// `output` will never deliver batch `seq` (its receiver refused it for good): counted as
    /// dropped for that output, and it goes on with the next. The dcmon server's refusals
    /// (400, 413, 422) are also copied to `rejected/` with its `answer`, as they always were;
    /// other outputs only log theirs.
    pub fn gave_up(&mut self, output: &str, seq: u64, answer: &str) {
        if output == DCMON_OUTPUT {
            self.copy_rejected(seq, answer);
        }
        self.output_stats.entry(output.to_owned()).or_default().dropped += 1;
        self.advance(output, seq);
    }

    /// An attempt of `output` failed (it retries later).
    pub fn send_failed(&mut self, output: &str) {
        self.output_stats.entry(output.to_owned()).or_default().failed += 1;
    }

    /// Move `output`'s cursor past `seq`; release what every output is done with, and persist
    /// the cursor while the batch still waits for others.
    fn advance(&mut self, output: &str, seq: u64) {
        if !self.outputs.iter().any(|o| o == output) {
            // A reload took it out while its send was in flight: it holds nothing any more.
            return;
        }
        let next = seq.saturating_add(1);
        let cursor = self.cursors.entry(output.to_owned()).or_insert(0);
        if next <= *cursor {
            return;
        }
        *cursor = next;
        self.release();
        // Released batches got their `D` record (or their segment went); one that others still
        // need gets a `C` record so a restart does not resend it to this output.
        if self.entries.iter().any(|e| e.seq == seq) {
            self.scratch.clear();
            if encode_cursor(&mut self.scratch, output, seq) {
                self.append_progress();
            }
        }
    }

    /// Batches every configured output is past leave the outbox.
    fn release(&mut self) {
        // No output at all: nothing will deliver any of them.
        let min = self.outputs.iter().map(|o| self.cursor(o)).min().unwrap_or(u64::MAX);
        while let Some(seq) = self.entries.front().map(|e| e.seq).filter(|&seq| seq < min) {
            self.finish(seq, true);
        }
    }

    /// How many batches `output` still has to deliver.
    pub fn backlog_for(&self, output: &str) -> u64 {
        let from = self.cursor(output);
        (self.entries.len() - self.entries.partition_point(|e| e.seq < from)) as u64
    }

    /// `output`'s counters since start.
    pub fn output_stats(&self, output: &str) -> OutputStats {
        self.output_stats.get(output).copied().unwrap_or_default()
    }

    /// How far behind `output` is: the age (batch timestamp to `now_unix`, seconds) of the
    /// oldest batch it still has to deliver; 0 when caught up.
    pub fn lag_secs(&self, output: &str, now_unix: i64) -> u64 {
        let from = self.cursor(output);
        self.entries
            .get(self.entries.partition_point(|e| e.seq < from))
            .map_or(0, |e| u64::try_from(now_unix.saturating_sub(e.timestamp)).unwrap_or(0))
    }

    /// The per-output self-metrics, each with an `output` label, for the configured outputs.
    pub fn output_samples(&self, now_unix: i64) -> Vec<Sample> {
        let mut samples = Vec::with_capacity(self.outputs.len() * 4);
        for o in &self.outputs {
            let stats = self.output_stats(o);
            samples.extend([
                Sample::count("dcmon_output_batches_sent_total", stats.sent).label("output", o.as_str()),
                Sample::count("dcmon_output_batches_failed_total", stats.failed).label("output", o.as_str()),
                Sample::count("dcmon_output_batches_dropped_total", stats.dropped).label("output", o.as_str()),
                // A gauge: seconds behind, exact as f64 up to 2^53 s.
                #[allow(clippy::cast_precision_loss)]
                Sample::gauge("dcmon_output_lag_seconds", self.lag_secs(o, now_unix) as f64)
                    .label("output", o.as_str()),
            ]);
        }
        samples
    }
}
