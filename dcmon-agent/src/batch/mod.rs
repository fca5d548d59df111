//! The wire format: the JSON batch of the dcmon spec.
//!
//! ```json
//! {"machine_id": "…", "timestamp": 1693401234,
//!  "metrics": [{"name": "cpu_load_1m", "value": 2.5, "labels": {}, "timestamp": 1693401234}]}
//! ```
//!
//! The server rejects label values that are not strings and fractional timestamps (422), and
//! stores Infinity in a way that breaks every later read of the machine, so this module is the
//! one place that guarantees: integer second timestamps, string labels, finite values only.

mod histogram;
mod json;
mod labels;

pub use histogram::{
    DISK_IO_LATENCY, HISTOGRAM_FAMILIES, HistogramFamily, HistogramLabels, LE_LABEL, histogram_family, le_values,
};
pub use labels::{LabelPair, LabelValue, Labels, SharedLabels};

/// A metric value. Counters and byte counts stay integers on the wire.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// A count (events, bytes, state); serialized as a JSON integer.
    Count(u64),
    /// A measurement; serialized as a JSON number. Never sent when not finite.
    Gauge(f64),
}

impl Value {
    /// Whether this value may be sent (the server mishandles NaN and infinities).
    pub fn is_finite(self) -> bool {
        match self {
            Value::Count(_) => true,
            Value::Gauge(v) => v.is_finite(),
        }
    }

    /// The value as a float (for tests and arithmetic).
    pub fn as_f64(self) -> f64 {
        match self {
            #[allow(clippy::cast_precision_loss, reason = "the server stores f64 anyway")]
            Value::Count(v) => v as f64,
            Value::Gauge(v) => v,
        }
    }
}

/// One metric reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name, e.g. `disk_read_bytes_total`.
    pub name: &'static str,
    /// The reading.
    pub value: Value,
    /// Labels such as `device` or `interface`.
    pub labels: Labels,
}

impl Sample {
    /// A gauge without labels.
    pub fn gauge(name: &'static str, value: f64) -> Self {
        Self { name, value: Value::Gauge(value), labels: Labels::new() }
    }

    /// A counter without labels.
    pub fn count(name: &'static str, value: u64) -> Self {
        Self { name, value: Value::Count(value), labels: Labels::new() }
    }

    /// This sample with one more label.
    #[must_use]
    pub fn label(mut self, key: &'static str, value: impl Into<LabelValue>) -> Self {
        self.labels.push((key, value.into()));
        self
    }
}

/// A batch ready to send: every metric carries the batch's timestamp.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// The machine this batch describes (must match the API key's machine on the server).
    pub machine_id: String,
    /// Collection time, whole seconds since the Unix epoch.
    pub timestamp: i64,
    /// Finite samples only (see [`Batch::push`]).
    samples: Vec<Sample>,
    /// How many samples [`Batch::push`] refused because their value was not finite.
    nonfinite_dropped: u64,
}

impl Batch {
    /// An empty batch.
    pub fn new(machine_id: impl Into<String>, timestamp: i64) -> Self {
        Self { machine_id: machine_id.into(), timestamp, samples: Vec::new(), nonfinite_dropped: 0 }
    }

    /// Add a sample; a sample whose value is NaN or infinite is dropped and counted instead.
    pub fn push(&mut self, sample: Sample) {
        if sample.value.is_finite() {
            self.samples.push(sample);
        } else {
            tracing::debug!(metric = sample.name, labels = ?sample.labels, "dropping non-finite value");
            self.nonfinite_dropped += 1;
        }
    }

    /// Room for `additional` more samples without reallocating.
    pub fn reserve(&mut self, additional: usize) {
        self.samples.reserve(additional);
    }

    /// Add many samples (see [`Batch::push`]).
    pub fn extend(&mut self, samples: impl IntoIterator<Item = Sample>) {
        let samples = samples.into_iter();
        self.samples.reserve(samples.size_hint().0);
        for s in samples {
            self.push(s);
        }
    }

    /// The samples in this batch.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Samples refused by [`Batch::push`] because their value was not finite.
    pub fn nonfinite_dropped(&self) -> u64 {
        self.nonfinite_dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_are_dropped_and_counted() {
        let mut b = Batch::new("m1", 1);
        b.extend([
            Sample::gauge("a", f64::NAN),
            Sample::gauge("b", f64::INFINITY),
            Sample::gauge("c", f64::NEG_INFINITY),
            Sample::gauge("d", 0.0),
            Sample::count("e", u64::MAX),
        ]);
        let names: Vec<_> = b.samples().iter().map(|s| s.name).collect();
        assert_eq!(names, ["d", "e"]);
        assert_eq!(b.nonfinite_dropped(), 3);
        let text = String::from_utf8(b.to_json()).expect("utf8");
        assert!(!text.contains("null") && !text.contains("NaN") && !text.contains("inf"), "{text}");
    }

    #[test]
    fn values_as_floats() {
        assert_eq!(Value::Count(1 << 40).as_f64(), 1_099_511_627_776.0);
        assert_eq!(Value::Gauge(-2.5).as_f64(), -2.5);
    }
}
