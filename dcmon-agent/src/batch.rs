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

use std::sync::Arc;

use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Serialize, Serializer};

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

/// A label value: held inline up to 24 bytes (every device, interface, program, op and bucket
/// bound name here), so making or cloning one allocates nothing; longer values on the heap.
pub type LabelValue = compact_str::CompactString;

/// One label: its name (static: the label names are a contract) and value.
pub type LabelPair = (&'static str, LabelValue);

/// Label pairs of one sample, in a fixed order. Most samples build their own; a series sent
/// every round with the same labels (a histogram's buckets) can share one set made once, so
/// that its samples cost no allocation a round and its JSON is written once (README,
/// Performance). Reads as a slice.
#[derive(Clone)]
pub enum Labels {
    /// Built for this sample.
    Owned(Vec<LabelPair>),
    /// Made once and shared; [`Labels::push`] copies it first.
    Shared(Arc<SharedLabels>),
}

/// A label set made once and shared by many samples, with the JSON object [`Batch::to_json`]
/// writes for it, encoded when the set is made.
#[derive(Debug)]
pub struct SharedLabels {
    pairs: Box<[LabelPair]>,
    json: Box<[u8]>,
}

impl SharedLabels {
    fn new(pairs: Box<[LabelPair]>) -> Self {
        let mut json = Vec::new();
        push_json_labels(&mut json, &pairs);
        Self { pairs, json: json.into_boxed_slice() }
    }
}

impl Labels {
    /// No labels; allocates nothing.
    pub const fn new() -> Self {
        Labels::Owned(Vec::new())
    }

    /// A set to share between samples: clones of it copy no pairs.
    pub fn shared(pairs: impl IntoIterator<Item = LabelPair>) -> Self {
        Labels::Shared(Arc::new(SharedLabels::new(pairs.into_iter().collect())))
    }

    /// Appends a label (copying a shared set first).
    pub fn push(&mut self, pair: LabelPair) {
        self.to_mut().push(pair);
    }

    fn to_mut(&mut self) -> &mut Vec<LabelPair> {
        if let Labels::Shared(shared) = self {
            *self = Labels::Owned(shared.pairs.to_vec());
        }
        match self {
            Labels::Owned(pairs) => pairs,
            Labels::Shared(_) => unreachable!("made owned just above"),
        }
    }
}

impl Default for Labels {
    fn default() -> Self {
        Self::new()
    }
}

impl std::ops::Deref for Labels {
    type Target = [LabelPair];

    fn deref(&self) -> &[LabelPair] {
        match self {
            Labels::Owned(pairs) => pairs,
            Labels::Shared(shared) => &shared.pairs,
        }
    }
}

impl std::fmt::Debug for Labels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl PartialEq for Labels {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}

impl Eq for Labels {}

impl std::hash::Hash for Labels {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self[..].hash(state);
    }
}

impl<const N: usize> PartialEq<[LabelPair; N]> for Labels {
    fn eq(&self, other: &[LabelPair; N]) -> bool {
        self[..] == other[..]
    }
}

impl From<Vec<LabelPair>> for Labels {
    fn from(pairs: Vec<LabelPair>) -> Self {
        Labels::Owned(pairs)
    }
}

impl FromIterator<LabelPair> for Labels {
    fn from_iter<I: IntoIterator<Item = LabelPair>>(pairs: I) -> Self {
        Labels::Owned(pairs.into_iter().collect())
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = &'a LabelPair;
    type IntoIter = std::slice::Iter<'a, LabelPair>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl Extend<LabelPair> for Labels {
    fn extend<I: IntoIterator<Item = LabelPair>>(&mut self, pairs: I) {
        self.to_mut().extend(pairs);
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

    /// The JSON body for `POST /api/metrics`: byte for byte what serde_json makes of this
    /// batch's `Serialize` (a test holds them equal), written by hand around serde_json's
    /// number formatting and string escaping. serde_json escapes every key and metric name byte
    /// by byte, a seventh of the agent's userspace instructions a cycle; here the keys are
    /// literals, names and label keys are copied when they need no escaping (they are the
    /// code's own constants), and the timestamp every metric repeats is formatted once.
    pub fn to_json(&self) -> Vec<u8> {
        // A metric takes 80 to 130 bytes: reserve once instead of growing through reallocations.
        let mut out = Vec::with_capacity(128 + self.samples.len() * 128);
        let timestamp = serde_json::to_vec(&self.timestamp).unwrap_or_default();
        out.extend_from_slice(b"{\"machine_id\":");
        push_json_str(&mut out, &self.machine_id);
        out.extend_from_slice(b",\"timestamp\":");
        out.extend_from_slice(&timestamp);
        out.extend_from_slice(b",\"metrics\":[");
        for (i, sample) in self.samples.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"name\":");
            push_json_str(&mut out, sample.name);
            out.extend_from_slice(b",\"value\":");
            // Writing a number into a Vec cannot fail.
            let _ = match sample.value {
                Value::Count(v) => serde_json::to_writer(&mut out, &v),
                Value::Gauge(v) => serde_json::to_writer(&mut out, &v),
            };
            out.extend_from_slice(b",\"labels\":");
            match &sample.labels {
                Labels::Owned(pairs) => push_json_labels(&mut out, pairs),
                Labels::Shared(shared) => out.extend_from_slice(&shared.json),
            }
            out.extend_from_slice(b",\"timestamp\":");
            out.extend_from_slice(&timestamp);
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
        out
    }

    /// The JSON body, indented for people (`dcmon-agent once`).
    pub fn to_json_pretty(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}

/// `pairs` as a JSON object.
#[inline]
fn push_json_labels(out: &mut Vec<u8>, pairs: &[LabelPair]) {
    out.push(b'{');
    for (j, (key, value)) in pairs.iter().enumerate() {
        if j > 0 {
            out.push(b',');
        }
        push_json_str(out, key);
        out.push(b':');
        push_json_str(out, value);
    }
    out.push(b'}');
}

/// `text` as a JSON string: copied between quotes when nothing in it needs escaping (every
/// metric name and label key, most label values), else escaped by serde_json.
fn push_json_str(out: &mut Vec<u8>, text: &str) {
    if !needs_json_escape(text.as_bytes()) {
        out.reserve(text.len() + 2);
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, text);
    }
}

/// The bytes JSON escapes in a string: control characters, the quote and the backslash.
const JSON_ESCAPED: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// Whether `text` has a byte JSON escapes.
fn needs_json_escape(text: &[u8]) -> bool {
    // Label keys and most label values are a few bytes, where the vector loop below runs only
    // its byte-at-a-time tail (three compares a byte): one table lookup a byte is cheaper there.
    if text.len() < 16 {
        text.iter().any(|&b| JSON_ESCAPED[usize::from(b)])
    } else {
        // No early exit, so the check compiles to a vector loop over the whole string.
        text.iter().fold(false, |any, &b| any | (b < 0x20) | (b == b'"') | (b == b'\\'))
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            Value::Count(v) => s.serialize_u64(v),
            Value::Gauge(v) => s.serialize_f64(v),
        }
    }
}

struct WireLabels<'a>(&'a Labels);

impl Serialize for WireLabels<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k, v.as_str())?;
        }
        map.end()
    }
}

struct WireMetric<'a> {
    sample: &'a Sample,
    timestamp: i64,
}

impl Serialize for WireMetric<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_struct("Metric", 4)?;
        m.serialize_field("name", self.sample.name)?;
        m.serialize_field("value", &self.sample.value)?;
        m.serialize_field("labels", &WireLabels(&self.sample.labels))?;
        m.serialize_field("timestamp", &self.timestamp)?;
        m.end()
    }
}

struct WireMetrics<'a>(&'a Batch);

impl Serialize for WireMetrics<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.samples.iter().map(|sample| WireMetric { sample, timestamp: self.0.timestamp }))
    }
}

impl Serialize for Batch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut b = s.serialize_struct("Batch", 3)?;
        b.serialize_field("machine_id", &self.machine_id)?;
        b.serialize_field("timestamp", &self.timestamp)?;
        b.serialize_field("metrics", &WireMetrics(self))?;
        b.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_matches_the_spec() {
        let mut b = Batch::new("m1", 1_693_401_234);
        b.push(Sample::gauge("cpu_load_1m", 2.5));
        b.push(Sample::count("disk_read_bytes_total", 1 << 40).label("device", "vda"));
        let v: serde_json::Value = serde_json::from_slice(&b.to_json()).expect("valid json");
        assert_eq!(
            v,
            serde_json::json!({
                "machine_id": "m1", "timestamp": 1_693_401_234,
                "metrics": [
                    {"name": "cpu_load_1m", "value": 2.5, "labels": {}, "timestamp": 1_693_401_234},
                    {"name": "disk_read_bytes_total", "value": 1_099_511_627_776_u64,
                     "labels": {"device": "vda"}, "timestamp": 1_693_401_234},
                ]
            })
        );
        // Counters are integers on the wire, not 1.0995e12.
        let text = String::from_utf8(b.to_json()).expect("utf8");
        assert!(text.contains("\"value\":1099511627776,"), "{text}");
    }

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
    fn hand_written_json_is_what_serde_json_writes() {
        let odd =
            ["", "plain", "a\"b", "back\\slash", "nl\n", "tab\t", "\u{1}\u{1f}\u{7f}", "ünï©ødé", "😀", "</script>"];
        let values = [
            Value::Gauge(0.0),
            Value::Gauge(-0.0),
            Value::Gauge(0.1),
            Value::Gauge(2.5),
            Value::Gauge(1e300),
            Value::Gauge(-1.5e-7),
            Value::Gauge(5e-324),
            Value::Gauge(f64::MAX),
            Value::Count(0),
            Value::Count(u64::MAX),
        ];
        for machine in odd {
            for timestamp in [0, 1_795_540_732, -1, i64::MAX] {
                let mut b = Batch::new(machine, timestamp);
                assert_eq!(b.to_json(), serde_json::to_vec(&b).expect("serde"), "empty batch, {machine:?}");
                for (i, value) in values.into_iter().enumerate() {
                    let mut s = Sample { name: "disk_read_bytes_total", value, labels: Labels::new() };
                    for label in odd.iter().take(i % 4) {
                        s = s.label("device", *label);
                    }
                    b.push(s.label("model", odd[i % odd.len()]));
                    b.push(Sample::gauge("quote\"in_name", 1.0));
                    let shared = Labels::shared(odd.iter().skip(i).take(i % 4).map(|l| ("device", (*l).into())));
                    b.push(Sample { name: "disk_io_latency_seconds_bucket", value, labels: shared });
                }
                assert_eq!(
                    String::from_utf8(b.to_json()).expect("utf8"),
                    String::from_utf8(serde_json::to_vec(&b).expect("serde")).expect("utf8"),
                    "machine {machine:?}, timestamp {timestamp}"
                );
            }
        }
    }

    #[test]
    fn label_values_are_escaped_strings() {
        let mut b = Batch::new("m\"1", 7);
        b.push(Sample::count("x", 1).label("device", "a\"b\\c\n"));
        let v: serde_json::Value = serde_json::from_slice(&b.to_json()).expect("valid json");
        assert_eq!(v["machine_id"], "m\"1");
        assert_eq!(v["metrics"][0]["labels"]["device"], "a\"b\\c\n");
    }

    /// Strings that the "needs escaping" check must send to serde_json. Each defeats a wrong
    /// form of the check: two escapes cancel out under `^` (`WDC "Blue"`, `C:\a\b`); a string
    /// of control characters only passes `> 0x20`; a lone quote or backslash passes `!=`.
    const MUST_ESCAPE: [&str; 9] = ["WDC \"Blue\"", "C:\\a\\b", "\"", "\\", "\"\n\"", "\n", "\t\u{1f}", "\"\"", "\\\\"];

    #[test]
    fn strings_needing_escapes_are_escaped_byte_for_byte() {
        for text in MUST_ESCAPE {
            let mut b = Batch::new(text, 1);
            b.push(Sample::count("disk_reads_total", 1).label("model", text));
            let body = b.to_json();
            let escaped = String::from_utf8(serde_json::to_vec(text).expect("serde")).expect("utf8");
            let want = format!(
                "{{\"machine_id\":{escaped},\"timestamp\":1,\"metrics\":[{{\"name\":\"disk_reads_total\",\
                 \"value\":1,\"labels\":{{\"model\":{escaped}}},\"timestamp\":1}}]}}"
            );
            assert_eq!(String::from_utf8_lossy(&body), want, "{text:?}");
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!((&v["machine_id"], &v["metrics"][0]["labels"]["model"]), (&text.into(), &text.into()));
        }
    }

    /// Label values and metric names: any text, and text made mostly of the characters JSON
    /// escapes (so that strings with two, three or only escapes come up often).
    fn wire_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            any::<String>(),
            proptest::collection::vec(
                prop_oneof![
                    Just('"'),
                    Just('\\'),
                    Just('\n'),
                    Just('\u{0}'),
                    Just('\u{1f}'),
                    Just(' '),
                    Just('a'),
                    Just('é'),
                    Just('\u{7f}'),
                    Just('\u{2028}'),
                ],
                0..8
            )
            .prop_map(|chars| chars.into_iter().collect()),
        ]
    }

    proptest::proptest! {
        #[test]
        fn to_json_is_what_serde_json_writes_for_any_labels(
            machine_id in wire_text(),
            timestamp: i64,
            samples in proptest::collection::vec(
                (wire_text(), proptest::prelude::any::<u64>(), proptest::collection::vec((wire_text(), wire_text()), 0..4)),
                0..4,
            ),
        ) {
            let mut b = Batch::new(machine_id.as_str(), timestamp);
            for (i, (name, value, labels)) in samples.iter().enumerate() {
                // Names and label keys are `&'static str` (the code's constants): leaking the
                // generated ones is a few bytes per case.
                let leak = |text: &String| -> &'static str { Box::leak(text.clone().into_boxed_str()) };
                let pairs = labels.iter().map(|(key, label)| (leak(key), LabelValue::from(label.as_str())));
                // Every other sample's set is shared, whose JSON is encoded when it is made.
                let labels = if i % 2 == 0 { Labels::shared(pairs) } else { pairs.collect() };
                b.push(Sample { name: leak(name), value: Value::Count(*value), labels });
            }
            let body = b.to_json();
            let reference = serde_json::to_vec(&b).expect("serde");
            proptest::prop_assert_eq!(String::from_utf8_lossy(&body), String::from_utf8_lossy(&reference));
            let v: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
            proptest::prop_assert_eq!(&v["machine_id"], &serde_json::Value::from(machine_id));
            for (i, (name, value, labels)) in samples.iter().enumerate() {
                let m = &v["metrics"][i];
                proptest::prop_assert_eq!(&m["name"], &serde_json::Value::from(name.as_str()));
                proptest::prop_assert_eq!(m["value"].as_u64(), Some(*value));
                // A repeated key: JSON readers keep the last value.
                let mut want = serde_json::Map::new();
                for (key, label) in labels {
                    want.insert(key.clone(), label.as_str().into());
                }
                proptest::prop_assert_eq!(&m["labels"], &serde_json::Value::Object(want));
            }
        }
    }

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
    fn shared_labels_are_shared_by_clones_and_copied_by_a_push() {
        let shared = Labels::shared([("device", "vda".into()), ("op", "read".into())]);
        let clone = shared.clone();
        let (Labels::Shared(a), Labels::Shared(b)) = (&shared, &clone) else { panic!("{shared:?} {clone:?}") };
        assert!(Arc::ptr_eq(a, b), "a clone shares the pairs");
        let mut grown = clone.clone();
        grown.push(("le", "0.5".into()));
        assert_eq!(grown, [("device", "vda".into()), ("op", "read".into()), ("le", "0.5".into())]);
        assert_eq!(shared, [("device", "vda".into()), ("op", "read".into())], "the shared set is unchanged");
        assert_eq!(clone, shared);
        assert_eq!(Labels::from(vec![("device", "vda".into()), ("op", "read".into())]), shared, "equal by pairs");
        let mut extended = Labels::new();
        extended.extend(shared.iter().cloned());
        assert_eq!(format!("{extended:?}"), format!("{shared:?}"));
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

    /// The point of [`LabelValue`]: the values a cycle makes (device, interface, program and op
    /// names, bucket bounds) are held inline, so a sample's labels cost no allocation each.
    #[test]
    fn short_label_values_are_inline() {
        let s = Sample::count("x", 1)
            .label("program", "tcp_retransmit_skb")
            .label("interface", String::from("veth-dcmon-a0"));
        assert!(s.labels.iter().all(|(_, v)| !v.is_heap_allocated()), "{s:?}");
        let long = Sample::count("x", 1).label("model", "SAMSUNG MZQL215THBLA-00A07 with a long name");
        assert_eq!(long.labels[0].1, "SAMSUNG MZQL215THBLA-00A07 with a long name");
    }

    /// Both forms of the check (short strings by table, long ones by the vector loop) agree
    /// with serde_json on every byte, at every position and length around the switch.
    #[test]
    fn escape_check_agrees_with_serde_json_for_every_byte_position_and_length() {
        for len in [1, 2, 7, 8, 15, 16, 17, 31, 32, 33] {
            for at in [0, len / 2, len - 1] {
                for byte in 0..=0x7f_u8 {
                    let mut text = vec![b'a'; len];
                    text[at] = byte;
                    let text = String::from_utf8(text).expect("ascii");
                    let escaped = serde_json::to_string(&text).expect("serde");
                    assert_eq!(needs_json_escape(text.as_bytes()), escaped.len() != len + 2, "{text:?}");
                    let mut out = Vec::new();
                    push_json_str(&mut out, &text);
                    assert_eq!(String::from_utf8(out).expect("utf8"), escaped, "{text:?}");
                }
            }
        }
    }

    /// Two or three bytes that need escaping in one string, of every kind and pair of kinds, in
    /// the short and the long form: one escaped byte must not cancel another (an `^` for an `|`
    /// in the vector loop's fold would, and the string would go out raw: invalid JSON).
    #[test]
    fn strings_with_several_bytes_to_escape_are_escaped() {
        let special = [0x01_u8, 0x1f, b'"', b'\\', b'\n'];
        for len in [8, 16, 17, 40] {
            for &first in &special {
                for &second in &special {
                    for third in [None, Some(b'"'), Some(0x02)] {
                        let mut text = vec![b'a'; len];
                        text[1] = first;
                        text[len - 2] = second;
                        if let Some(third) = third {
                            text[len / 2] = third;
                        }
                        let text = String::from_utf8(text).expect("ascii");
                        assert!(needs_json_escape(text.as_bytes()), "{text:?}");
                        let mut out = Vec::new();
                        push_json_str(&mut out, &text);
                        assert_eq!(
                            String::from_utf8(out).expect("utf8"),
                            serde_json::to_string(&text).expect("serde"),
                            "{text:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn values_as_floats() {
        assert_eq!(Value::Count(1 << 40).as_f64(), 1_099_511_627_776.0);
        assert_eq!(Value::Gauge(-2.5).as_f64(), -2.5);
    }

    #[test]
    fn pretty_json_is_the_same_batch() {
        let mut b = Batch::new("m1", 7);
        b.push(Sample::gauge("cpu_load_1m", 0.5).label("device", "WDC \"Blue\""));
        let pretty: serde_json::Value = serde_json::from_slice(&b.to_json_pretty()).expect("valid JSON");
        let compact: serde_json::Value = serde_json::from_slice(&b.to_json()).expect("valid JSON");
        assert_eq!(pretty, compact);
        assert!(b.to_json_pretty().contains(&b'\n'), "indented");
    }
}
