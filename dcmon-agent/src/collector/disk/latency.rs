//! `disk_io_latency_seconds`: per disk and operation, the histogram of the time from a request's
//! issue to the driver to its completion, which the BPF programs keep per disk slot (see
//! `dcmon_common::ebpf::DISK_LAT_MAP`). Reported since the disk got its slot, cumulative.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use dcmon_common::ebpf::{
    DiskKey, LAT_BUCKETS, LAT_OP_NAMES, LAT_OPS, LatencyHist, OVERFLOW_SLOT, TimedRequests, lat_bucket_bound_ns,
};

use crate::batch::{DISK_IO_LATENCY, HistogramLabels, LabelValue, Sample, le_values};
use crate::ebpf::Probes;

type Hists = [LatencyHist; LAT_OPS as usize];

/// A disk with a slot.
#[derive(Debug)]
struct Slotted {
    name: LabelValue,
    slot: u32,
    /// The slot's histograms when the disk got it: reported values are the difference.
    start: Hists,
    /// Per op, once it has had an I/O since: its series' labels. Its series are sent from then on.
    labels: [Option<HistogramLabels>; LAT_OPS as usize],
}

/// The latency histograms of the disks the agent reports, and their slots.
#[derive(Debug)]
pub struct DiskLatency {
    probes: Arc<Probes>,
    reported: Reported,
    /// Whether the lack of a free slot was logged already.
    warned_full: bool,
}

/// What is reported of the slots' histograms, apart from the programs that fill them.
#[derive(Debug)]
struct Reported {
    /// In device-number order, the order the samples are sent in: sorted when the disks are
    /// synced, not every round.
    disks: Vec<(DiskKey, Slotted)>,
    /// Completions in the overflow slot at start.
    overflow_start: u64,
    /// Which requests the programs time: with none, nothing is reported.
    timed: TimedRequests,
}

fn count(h: &LatencyHist) -> u64 {
    h.buckets.iter().sum()
}

impl DiskLatency {
    /// Reads the overflow slot's starting count.
    pub fn new(probes: Arc<Probes>) -> anyhow::Result<Self> {
        let overflow_start = probes.disk_latency(OVERFLOW_SLOT)?.iter().map(count).sum();
        let timed = probes.latency_timing().timed();
        Ok(Self { probes, reported: Reported { disks: Vec::new(), overflow_start, timed }, warned_full: false })
    }

    /// Gives a slot to each of `disks` (whole request-based disks the filter allows) that has
    /// none, and takes back the slots of disks no longer among them.
    pub fn sync<'a>(&mut self, disks: impl IntoIterator<Item = (DiskKey, &'a str)>) -> anyhow::Result<()> {
        let wanted: HashMap<DiskKey, &str> = disks.into_iter().collect();
        let gone: Vec<DiskKey> = self
            .reported
            .disks
            .iter()
            .filter(|(key, d)| wanted.get(key).is_none_or(|name| *name != d.name))
            .map(|(key, _)| *key)
            .collect();
        for key in gone {
            self.forget(key)?;
        }
        let result = self.add(wanted);
        self.reported.disks.sort_by_key(|(k, _)| (k.major(), k.minor()));
        result
    }

    /// Gives a slot to each of `wanted` that has none (unsorted: the caller sorts).
    fn add(&mut self, wanted: HashMap<DiskKey, &str>) -> anyhow::Result<()> {
        for (key, name) in wanted {
            if self.reported.disks.iter().any(|(k, _)| *k == key) {
                continue;
            }
            let Some(slot) = self.probes.disk_slot(key)? else {
                if !self.warned_full {
                    tracing::warn!(disk = name, "no free eBPF latency slot: its I/O is timed in the overflow slot");
                    self.warned_full = true;
                }
                continue;
            };
            let start = self.probes.disk_latency(slot)?;
            self.reported.disks.push((key, Slotted { name: name.into(), slot, start, labels: Default::default() }));
        }
        Ok(())
    }

    /// Takes disk `key`'s slot back (it is gone, or its number now names another disk).
    pub fn forget(&mut self, key: DiskKey) -> anyhow::Result<()> {
        if let Some(at) = self.reported.disks.iter().position(|(k, _)| *k == key) {
            // `remove`, not `swap_remove`: the rest stay in device-number order.
            self.reported.disks.remove(at);
            self.probes.release_disk_slot(key)?;
        }
        Ok(())
    }

    /// The histograms of every slotted disk with I/O, in device-number order, and the overflow
    /// slot's count; nothing when the programs time no request.
    pub fn samples(&mut self, out: &mut Vec<Sample>) -> anyhow::Result<()> {
        // Only the slots reported, each read from the mapping: no copy of every slot a round.
        let probes = &self.probes;
        self.reported.samples(|slot| probes.disk_latency(slot), out)
    }
}

impl Reported {
    /// [`DiskLatency::samples`] from the slots' histograms (`hists` of a slot).
    fn samples(&mut self, hists: impl Fn(u32) -> anyhow::Result<Hists>, out: &mut Vec<Sample>) -> anyhow::Result<()> {
        // What is timed is what is reported: without block_rq_issue the kernel-stamp paths
        // still time requests (the overflow slot's too), the table path none.
        if self.timed == TimedRequests::Nothing {
            return Ok(());
        }
        for (_, disk) in &mut self.disks {
            let now = hists(disk.slot)?;
            for (op, (now, start)) in now.iter().zip(&disk.start).enumerate() {
                let hist = since(now, start);
                if disk.labels[op].is_none() && count(&hist) > 0 {
                    let series = [("device", disk.name.clone()), ("op", LAT_OP_NAMES[op].into())];
                    disk.labels[op] = Some(HistogramLabels::new(&series, &LATENCY_LE));
                }
                if let Some(labels) = &disk.labels[op] {
                    histogram_samples(labels, &hist, out);
                }
            }
        }
        let overflow: u64 = hists(OVERFLOW_SLOT)?.iter().map(count).sum();
        out.push(
            Sample::count("dcmon_ebpf_overflow_total", overflow.wrapping_sub(self.overflow_start))
                .label("map", "disk_latency"),
        );
        Ok(())
    }
}

/// `now - start`, bucket by bucket.
fn since(now: &LatencyHist, start: &LatencyHist) -> LatencyHist {
    let mut out = *now;
    for (o, s) in out.buckets.iter_mut().zip(start.buckets) {
        *o = o.wrapping_sub(s);
    }
    out.sum_ns = out.sum_ns.wrapping_sub(start.sum_ns);
    out
}

/// The `le` values of the bounds of README's bucket table, in seconds.
static LATENCY_LE: LazyLock<Vec<LabelValue>> =
    LazyLock::new(|| le_values((0..LAT_BUCKETS - 1).map(|k| lat_bucket_bound_ns(k) as f64 / 1e9)));

/// Appends one histogram to `out` as `disk_io_latency_seconds` samples, with `labels` made
/// from [`LATENCY_LE`].
pub fn histogram_samples(labels: &HistogramLabels, hist: &LatencyHist, out: &mut Vec<Sample>) {
    let last = (LAT_BUCKETS - 1) as usize;
    DISK_IO_LATENCY.samples(labels, &hist.buckets[..last], hist.buckets[last], hist.sum_ns as f64 / 1e9, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Value;

    #[test]
    fn histogram_is_cumulative_and_inf_equals_count() {
        let mut hist = LatencyHist::default();
        hist.buckets[0] = 2; // under 1.024 µs
        hist.buckets[5] = 3; // 16.384 to 32.768 µs
        hist.buckets[(LAT_BUCKETS - 1) as usize] = 1; // over 17.18 s
        hist.sum_ns = 20_000_000_123;
        let labels = [("device", "vda".into()), ("op", "read".into())];
        let mut samples = Vec::new();
        histogram_samples(&HistogramLabels::new(&labels, &LATENCY_LE), &hist, &mut samples);
        assert_eq!(samples.len(), LAT_BUCKETS as usize + 2);
        let le = |s: &Sample| s.labels.iter().find(|(k, _)| *k == "le").map(|(_, v)| v.clone());
        let first = &samples[0];
        assert_eq!(
            (first.name, first.value, le(first).as_deref()),
            ("disk_io_latency_seconds_bucket", Value::Count(2), Some("0.000001024"))
        );
        assert_eq!(samples[4].value, Value::Count(2));
        assert_eq!((samples[5].value, le(&samples[5]).as_deref()), (Value::Count(5), Some("0.000032768")));
        let last_bound = &samples[LAT_BUCKETS as usize - 2];
        assert_eq!((last_bound.value, le(last_bound).as_deref()), (Value::Count(5), Some("17.179869184")));
        let inf = &samples[LAT_BUCKETS as usize - 1];
        assert_eq!((inf.value, le(inf).as_deref()), (Value::Count(6), Some("+Inf")));
        let sum = &samples[LAT_BUCKETS as usize];
        assert_eq!((sum.name, sum.value), ("disk_io_latency_seconds_sum", Value::Gauge(20.000000123)));
        let count = &samples[LAT_BUCKETS as usize + 1];
        assert_eq!((count.name, count.value), ("disk_io_latency_seconds_count", Value::Count(6)));
        assert!(samples.iter().all(|s| s.labels[..2] == labels[..]));
    }

    /// The overflow slot (0) and disk vda's (1), each with reads in bucket 3, vda's slot given
    /// when its slot held one read already and the overflow's start at 1.
    fn reported(timed: TimedRequests) -> (Reported, Vec<Hists>) {
        let mut slots = vec![[LatencyHist::default(); LAT_OPS as usize]; 2];
        slots[0][0].buckets[3] = 4;
        slots[1][0].buckets[3] = 6;
        slots[1][0].sum_ns = 6 * 10_000;
        let mut start = [LatencyHist::default(); LAT_OPS as usize];
        start[0].buckets[3] = 1;
        start[0].sum_ns = 10_000;
        let vda = Slotted { name: "vda".into(), slot: 1, start, labels: Default::default() };
        let disks = vec![(DiskKey::new(253, 0), vda)];
        (Reported { disks, overflow_start: 1, timed }, slots)
    }

    /// The histograms of a slot of `slots` (zeros past the end, as the mapping reads them).
    fn of(slots: &[Hists]) -> impl Fn(u32) -> anyhow::Result<Hists> + '_ {
        |slot| Ok(slots.get(slot as usize).copied().unwrap_or([LatencyHist::default(); LAT_OPS as usize]))
    }

    /// (name, value) of each sample but the histogram's buckets.
    fn summary(samples: &[Sample]) -> Vec<(&'static str, Value)> {
        samples.iter().filter(|s| s.name != "disk_io_latency_seconds_bucket").map(|s| (s.name, s.value)).collect()
    }

    /// Without block_rq_issue the kernel-stamp paths still time requests, into the overflow
    /// slot too: its count is reported with the histograms, as with every program attached.
    #[test]
    fn the_overflow_count_is_sent_whenever_requests_are_timed() {
        for timed in [TimedRequests::All, TimedRequests::KernelStamped] {
            let (mut reported, slots) = reported(timed);
            let mut out = Vec::new();
            reported.samples(of(&slots), &mut out).expect("samples");
            assert_eq!(
                summary(&out),
                [
                    ("disk_io_latency_seconds_sum", Value::Gauge(0.00005)),
                    ("disk_io_latency_seconds_count", Value::Count(5)),
                    ("dcmon_ebpf_overflow_total", Value::Count(3)),
                ],
                "{timed:?}"
            );
            let overflow = out.last().expect("overflow sample");
            assert_eq!(
                overflow.labels.iter().find(|(k, _)| *k == "map").map(|(_, v)| v.to_string()).as_deref(),
                Some("disk_latency")
            );
        }
    }

    /// The table path without block_rq_issue times nothing: no histogram, no overflow count.
    #[test]
    fn nothing_is_reported_when_nothing_is_timed() {
        let (mut reported, slots) = reported(TimedRequests::Nothing);
        let mut out = Vec::new();
        reported.samples(of(&slots), &mut out).expect("samples");
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn histogram_text_passes_promtool() {
        let mut hist = LatencyHist::default();
        hist.buckets[12] = 7;
        hist.sum_ns = 7 * 3_000_000;
        let mut batch = crate::batch::Batch::new("m1", 1);
        let mut samples = Vec::new();
        for (device, op) in [("vda", "read"), ("vda", "write"), ("loop0", "read")] {
            let labels = HistogramLabels::new(&[("device", device.into()), ("op", op.into())], &LATENCY_LE);
            histogram_samples(&labels, &hist, &mut samples);
        }
        batch.extend(samples);
        batch.push(Sample::count("disk_reads_total", 3).label("device", "vda"));
        let text = crate::output::exposition::render(&batch, crate::output::exposition::Format::Prometheus);
        let text = String::from_utf8(text).expect("utf-8");
        assert!(text.contains("# TYPE disk_io_latency_seconds histogram\n"), "{text}");
        assert_eq!(text.matches("# TYPE").count(), 2, "{text}");
        assert!(
            text.contains(
                "disk_io_latency_seconds_bucket{machine_id=\"m1\",device=\"vda\",op=\"read\",le=\"+Inf\"} 7\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("disk_io_latency_seconds_sum{machine_id=\"m1\",device=\"vda\",op=\"read\"} 0.021\n"),
            "{text}"
        );
        crate::output::exposition::tests::promtool_check(text.as_bytes()).expect("promtool");
    }
}
