//! Classic Prometheus histograms as samples: the families, their shared label sets, `le`.

use super::{LabelPair, LabelValue, Labels, Sample, Value};

/// A Prometheus histogram family the agent sends, as the 1.0 remote_write and the text format
/// carry classic histograms: one cumulative `<family>_bucket` counter per bound with an `le`
/// label (the last `+Inf`, equal to `_count`), `<family>_sum` and `<family>_count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistogramFamily {
    /// The family name, e.g. `disk_io_latency_seconds`.
    pub family: &'static str,
    /// `<family>_bucket`.
    pub bucket: &'static str,
    /// `<family>_sum`.
    pub sum: &'static str,
    /// `<family>_count`.
    pub count: &'static str,
}

/// The label of a histogram bucket's upper bound.
pub const LE_LABEL: &str = "le";

/// Disk I/O latency, issue to completion (README, Metrics).
pub const DISK_IO_LATENCY: HistogramFamily = HistogramFamily {
    family: "disk_io_latency_seconds",
    bucket: "disk_io_latency_seconds_bucket",
    sum: "disk_io_latency_seconds_sum",
    count: "disk_io_latency_seconds_count",
};

/// Every histogram family the agent sends.
pub const HISTOGRAM_FAMILIES: [HistogramFamily; 1] = [DISK_IO_LATENCY];

/// The histogram family a sample name belongs to, if it is one's bucket, sum or count.
pub fn histogram_family(name: &str) -> Option<&'static HistogramFamily> {
    HISTOGRAM_FAMILIES.iter().find(|h| name == h.bucket || name == h.sum || name == h.count)
}

/// The label sets of one histogram series (say `device="vda",op="read"`), made once when the
/// series first has data and shared by every round's samples: the series' own (for `_sum` and
/// `_count`) and one per bucket with its `le`, the last `+Inf`.
#[derive(Debug, Clone)]
pub struct HistogramLabels {
    series: Labels,
    buckets: Vec<Labels>,
}

impl HistogramLabels {
    /// The sets of the series with `labels` whose bucket bounds have the `le` values `le`
    /// ([`le_values`], made once), followed by `+Inf`.
    pub fn new(labels: &[LabelPair], le: &[LabelValue]) -> Self {
        let with_le = |le: &LabelValue| Labels::shared(labels.iter().cloned().chain([(LE_LABEL, le.clone())]));
        Self {
            series: Labels::shared(labels.iter().cloned()),
            buckets: le.iter().chain([&LE_INF]).map(with_le).collect(),
        }
    }
}

impl HistogramFamily {
    /// Appends to `out` the samples of one histogram with `labels`: `counts[i]` is the count in
    /// bucket `i` alone (one count per bound of `labels`), `overflow` the count above the last
    /// bound; the bucket samples are cumulative, the last one `le="+Inf"`.
    pub fn samples(&self, labels: &HistogramLabels, counts: &[u64], overflow: u64, sum: f64, out: &mut Vec<Sample>) {
        debug_assert_eq!(labels.buckets.len(), counts.len() + 1, "one le value per bucket of {}", self.family);
        out.reserve(counts.len() + 3);
        let mut cumulative = 0;
        for (le, &n) in labels.buckets.iter().zip(counts) {
            cumulative += n;
            out.push(Sample { name: self.bucket, value: Value::Count(cumulative), labels: le.clone() });
        }
        cumulative += overflow;
        if let Some(inf) = labels.buckets.last() {
            out.push(Sample { name: self.bucket, value: Value::Count(cumulative), labels: inf.clone() });
        }
        out.push(Sample { name: self.sum, value: Value::Gauge(sum), labels: labels.series.clone() });
        out.push(Sample { name: self.count, value: Value::Count(cumulative), labels: labels.series.clone() });
    }
}

/// The last bucket's `le`.
const LE_INF: LabelValue = LabelValue::const_new("+Inf");

/// The `le` values of bucket upper `bounds` (in the unit of the family), made once per
/// histogram kind and kept: Display, the shortest decimal that reads back as the bound, never
/// in exponent form, so a bound's label value is the same string in every output.
pub fn le_values(bounds: impl IntoIterator<Item = f64>) -> Vec<LabelValue> {
    bounds.into_iter().map(|bound| compact_str::format_compact!("{bound}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn le_values_are_the_bounds_display_never_exponent_form() {
        let bounds = [0.000_001_024, 0.1, 2.5, 17.179_869_184, 1e-9, 1e21, 3.0];
        let le = le_values(bounds);
        let want: Vec<String> = bounds.iter().map(ToString::to_string).collect();
        assert_eq!(le, want);
        assert_eq!(le[4], "0.000000001");
        assert_eq!(le[5], "1000000000000000000000");
    }

    #[test]
    fn a_histograms_labels_are_made_once_and_shared_by_every_rounds_samples() {
        let labels = HistogramLabels::new(&[("device", "nvme0n1".into())], &le_values([0.5, 1.0]));
        let mut rounds = [Vec::new(), Vec::new()];
        for out in &mut rounds {
            DISK_IO_LATENCY.samples(&labels, &[2, 3], 4, 6.5, out);
        }
        assert_eq!(rounds[0], rounds[1]);
        for (a, b) in rounds[0].iter().zip(&rounds[1]) {
            let (Labels::Shared(a), Labels::Shared(b)) = (&a.labels, &b.labels) else { panic!("{a:?} {b:?}") };
            assert!(Arc::ptr_eq(a, b), "{a:?}");
        }
    }

    #[test]
    fn histogram_samples_are_cumulative_with_le_last_and_labels_first() {
        let labels = HistogramLabels::new(&[("device", "nvme0n1".into())], &le_values([0.5, 1.0]));
        let mut out = vec![Sample::gauge("before", 1.0)];
        DISK_IO_LATENCY.samples(&labels, &[2, 3], 4, 6.5, &mut out);
        type Row<'a> = (&'a str, Value, Vec<(&'a str, &'a str)>);
        let got: Vec<Row<'_>> = out[1..]
            .iter()
            .map(|s| (s.name, s.value, s.labels.iter().map(|(k, v)| (*k, v.as_str())).collect()))
            .collect();
        let bucket = "disk_io_latency_seconds_bucket";
        assert_eq!(
            got,
            [
                (bucket, Value::Count(2), vec![("device", "nvme0n1"), ("le", "0.5")]),
                (bucket, Value::Count(5), vec![("device", "nvme0n1"), ("le", "1")]),
                (bucket, Value::Count(9), vec![("device", "nvme0n1"), ("le", "+Inf")]),
                ("disk_io_latency_seconds_sum", Value::Gauge(6.5), vec![("device", "nvme0n1")]),
                ("disk_io_latency_seconds_count", Value::Count(9), vec![("device", "nvme0n1")]),
            ]
        );
        assert_eq!(out[0].name, "before", "appended, not replaced");
    }
}
