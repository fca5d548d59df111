//! One stored JSON batch to snappy-compressed Remote-Write 1.0 requests.
//!
//! The outbox holds each batch as the JSON body the dcmon server takes
//! (`{"machine_id", "timestamp", "metrics": [{"name", "value", "labels", "timestamp"}]}`,
//! timestamps in whole seconds). It is the agent's own file, but a damaged one must give an
//! error, never a panic or a malformed request, so everything read is checked:
//!
//! - each metric becomes a series: `__name__`, the external labels, `machine_id` (the batch's),
//!   then the metric's own labels (a metric's label wins over an external one of the same name,
//!   as in Prometheus), sorted by name, empty values left out (the spec says a label with an
//!   empty value is no label);
//! - a metric whose name or label names Prometheus would refuse is left out and counted
//!   ([`Encoded::dropped`]), so one bad entry does not cost the batch;
//! - samples of one series (a batch may repeat a series) are sorted by timestamp, one sample
//!   per millisecond (the last one given);
//! - timestamps become milliseconds;
//! - a series of the previous delivered batch that this one lacks gets one stale marker
//!   ([`STALE_NAN_BITS`]) at this batch's timestamp ([`StaleState`]);
//! - series are packed into as few requests as keep each under `max_request_bytes`
//!   uncompressed; a series is never split, so one larger than the bound goes alone.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash as _, Hasher as _};

use bytes::Bytes;
use prost::Message as _;

use super::proto::{Label, Sample, TimeSeries};

/// The bits of Prometheus's stale marker (`value.StaleNaN`), a NaN no computation makes. The
/// only NaN the agent ever sends.
pub const STALE_NAN_BITS: u64 = 0x7ff0_0000_0000_0002;

/// The label that carries the metric name.
const NAME_LABEL: &str = "__name__";

/// The label every series gets from the batch.
const MACHINE_ID_LABEL: &str = "machine_id";

/// A stored batch, as far as remote_write reads it (unknown keys ignored). Strings without
/// escapes are borrowed from the body.
#[derive(serde::Deserialize)]
struct JsonBatch<'a> {
    #[serde(borrow)]
    machine_id: Str<'a>,
    timestamp: i64,
    #[serde(borrow)]
    metrics: Vec<JsonMetric<'a>>,
}

#[derive(serde::Deserialize)]
struct JsonMetric<'a> {
    #[serde(borrow)]
    name: Str<'a>,
    value: f64,
    #[serde(default, borrow)]
    labels: BTreeMap<Str<'a>, Str<'a>>,
    #[serde(default)]
    timestamp: Option<i64>,
}

/// A JSON string, borrowed from the body unless it holds escapes (serde's `Cow<str>` always
/// copies inside a map).
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Str<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for Str<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visitor<'a> {
            type Value = Str<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(Visitor(std::marker::PhantomData))
    }
}

/// FxHash (rustc's, from `rustc-hash`): the series maps hash every label of every series of
/// every batch, and SipHash was the largest single cost of encoding. The keys are the agent's
/// own labels, not an attacker's, so flooding resistance buys nothing here.
type FxBuild = rustc_hash::FxBuildHasher;

fn hash_labels(labels: &[Label]) -> u64 {
    let mut hasher = rustc_hash::FxHasher::default();
    labels.hash(&mut hasher);
    hasher.finish()
}

/// Why a stored batch cannot become a request. It will not get better on a retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// Not the JSON batch format (damaged file, truncated write).
    #[error("not a JSON batch: {0}")]
    Json(String),
    /// A field with a value no series can have.
    #[error("{0}")]
    Invalid(String),
    /// The snappy encoder refused a request (larger than snappy's limit).
    #[error("snappy: {0}")]
    Snappy(String),
}

/// The series of the last batch delivered (or given up on), with each one's last timestamp
/// in milliseconds: what the next batch's stale markers are computed from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StaleState {
    last: HashMap<Vec<Label>, i64, FxBuild>,
}

impl StaleState {
    /// No previous batch: no stale markers.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many series the previous batch had.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    /// Whether there was no previous batch (or it had no series).
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }

    /// Make `encoded`'s batch the previous one: call when it was delivered or given up on,
    /// never after a failed attempt that will be retried (its stale markers would be lost).
    pub fn advance(&mut self, encoded: Encoded) {
        self.last = encoded.next_state;
    }
}

/// A batch as requests, ready to post in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// Each request body, snappy block format.
    pub requests: Vec<Bytes>,
    /// Each request's protobuf size before snappy (each at most `max_request_bytes` unless it
    /// holds a single series larger than that).
    pub uncompressed_bytes: Vec<usize>,
    /// Series sent, stale ones included.
    pub series: usize,
    /// Samples sent, stale markers included.
    pub samples: usize,
    /// Stale markers among them.
    pub stale_markers: usize,
    /// Metrics left out: a name or label name Prometheus refuses, or a timestamp out of range.
    pub dropped: usize,
    /// The batch's timestamp in milliseconds.
    pub timestamp_ms: i64,
    next_state: HashMap<Vec<Label>, i64, FxBuild>,
}

/// Encode one stored JSON batch: its series with `external_labels` added, stale markers for
/// the series of `previous` it lacks, split into requests of at most `max_request_bytes`.
pub fn encode(
    body: &[u8],
    external_labels: &BTreeMap<String, String>,
    previous: &StaleState,
    max_request_bytes: usize,
) -> Result<Encoded, EncodeError> {
    let batch: JsonBatch = serde_json::from_slice(body).map_err(|e| EncodeError::Json(e.to_string()))?;
    if batch.machine_id.0.is_empty() {
        return Err(EncodeError::Invalid("machine_id is empty".into()));
    }
    let timestamp_ms = seconds_to_ms(batch.timestamp)
        .ok_or_else(|| EncodeError::Invalid(format!("timestamp {} is out of range", batch.timestamp)))?;

    // Series in the batch's order, found by their labels' hash (a chain per hash for the
    // labels that share one), so that each label set is built once and owned by its series.
    let mut series: Vec<TimeSeries> = Vec::with_capacity(batch.metrics.len());
    let mut by_hash: HashMap<u64, usize, FxBuild> = HashMap::default();
    by_hash.reserve(batch.metrics.len());
    let mut same_hash: Vec<Option<usize>> = Vec::with_capacity(batch.metrics.len());
    let mut dropped = 0;
    for metric in &batch.metrics {
        let Some((labels, sample)) = metric_series(metric, &batch.machine_id.0, batch.timestamp, external_labels)
        else {
            dropped += 1;
            continue;
        };
        let hash = hash_labels(&labels);
        let mut slot = by_hash.get(&hash).copied();
        while let Some(i) = slot {
            if series[i].labels == labels {
                break;
            }
            slot = same_hash[i];
        }
        match slot {
            Some(i) => series[i].samples.push(sample),
            None => {
                same_hash.push(by_hash.insert(hash, series.len()));
                series.push(TimeSeries { labels, samples: vec![sample] });
            }
        }
    }
    let fresh = series.len();

    let mut samples = 0;
    for s in &mut series {
        order_samples(&mut s.samples);
        samples += s.samples.len();
    }

    // Stale markers, sorted so that a retry of this batch encodes to the same requests. A
    // series whose last sample is not older than this batch gets none: it would be out of
    // order, and Prometheus rejects the whole request for it.
    let is_current = |labels: &Vec<Label>| {
        let mut slot = by_hash.get(&hash_labels(labels)).copied();
        while let Some(i) = slot {
            if series[i].labels == *labels {
                return true;
            }
            slot = same_hash[i];
        }
        false
    };
    let mut stale: Vec<&Vec<Label>> = previous
        .last
        .iter()
        .filter(|(labels, last)| **last < timestamp_ms && !is_current(labels))
        .map(|(labels, _)| labels)
        .collect();
    stale.sort_unstable();
    let stale_markers = stale.len();
    for labels in stale {
        let value = f64::from_bits(STALE_NAN_BITS);
        series.push(TimeSeries { labels: labels.clone(), samples: vec![Sample { value, timestamp: timestamp_ms }] });
    }

    let series_count = series.len();
    let (requests, uncompressed_bytes) = pack(&series, max_request_bytes)?;
    // The requests are written: the batch's own series' labels move into the state.
    series.truncate(fresh);
    let mut next_state: HashMap<Vec<Label>, i64, FxBuild> = HashMap::default();
    next_state.reserve(fresh);
    next_state.extend(series.into_iter().map(|s| {
        let last = s.samples.last().map_or(timestamp_ms, |x| x.timestamp);
        (s.labels, last)
    }));
    Ok(Encoded {
        requests,
        uncompressed_bytes,
        series: series_count,
        samples: samples + stale_markers,
        stale_markers,
        dropped,
        timestamp_ms,
        next_state,
    })
}

/// The labels and sample of one metric, or `None` when Prometheus would refuse it.
fn metric_series(
    metric: &JsonMetric<'_>,
    machine_id: &str,
    batch_timestamp: i64,
    external_labels: &BTreeMap<String, String>,
) -> Option<(Vec<Label>, Sample)> {
    if !is_metric_name(&metric.name.0) || !metric.value.is_finite() {
        return None;
    }
    if !metric.labels.keys().all(|name| is_label_name(&name.0) && !name.0.starts_with("__")) {
        return None;
    }
    let timestamp = seconds_to_ms(metric.timestamp.unwrap_or(batch_timestamp))?;
    // Highest precedence first: the name, the metric's labels, machine_id, the external
    // labels. A stable sort by name keeps that order among equal names; the first is kept.
    let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(2 + metric.labels.len() + external_labels.len());
    pairs.push((NAME_LABEL, &metric.name.0));
    pairs.extend(metric.labels.iter().map(|(k, v)| (&*k.0, &*v.0)));
    pairs.push((MACHINE_ID_LABEL, machine_id));
    pairs.extend(external_labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    // Byte order, the order Prometheus sorts labels in.
    pairs.sort_by(|a, b| a.0.cmp(b.0));
    pairs.dedup_by(|later, first| later.0 == first.0);
    let labels = pairs.into_iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| Label::new(k, v)).collect();
    Some((labels, Sample { value: metric.value, timestamp }))
}

/// Oldest first, one sample per timestamp: the last one the batch gave for it.
fn order_samples(samples: &mut Vec<Sample>) {
    if samples.len() < 2 {
        return;
    }
    // Stable: samples of one timestamp keep the batch's order, so the last given is last.
    samples.sort_by_key(|s| s.timestamp);
    let mut kept: Vec<Sample> = Vec::with_capacity(samples.len());
    for s in samples.drain(..) {
        match kept.last_mut() {
            Some(prev) if prev.timestamp == s.timestamp => *prev = s,
            _ => kept.push(s),
        }
    }
    *samples = kept;
}

/// Whole seconds to milliseconds; `None` past what an i64 of milliseconds holds.
fn seconds_to_ms(seconds: i64) -> Option<i64> {
    seconds.checked_mul(1000)
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
fn is_metric_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`
fn is_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Pack the series in order into requests of at most `max_bytes` encoded (a series larger
/// than that alone in its request), each encoded as a `WriteRequest` and snappy-compressed.
/// Returns the bodies and their sizes before snappy.
fn pack(series: &[TimeSeries], max_bytes: usize) -> Result<(Vec<Bytes>, Vec<usize>), EncodeError> {
    let mut requests = Vec::new();
    let mut sizes = Vec::new();
    let mut snappy = snap::raw::Encoder::new();
    let mut proto = Vec::new();
    let mut start = 0;
    while start < series.len() {
        // Field 1 of WriteRequest, length-delimited: one tag byte, the length, the message.
        let mut end = start;
        let mut bytes = 0;
        while let Some(s) = series.get(end) {
            let len = s.encoded_len();
            let size = 1 + prost::encoding::encoded_len_varint(len as u64) + len;
            if end > start && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            end += 1;
        }
        proto.clear();
        proto.reserve(bytes);
        for s in &series[start..end] {
            prost::encoding::message::encode(1, s, &mut proto);
        }
        let compressed = snappy.compress_vec(&proto).map_err(|e| EncodeError::Snappy(e.to_string()))?;
        requests.push(Bytes::from(compressed));
        sizes.push(proto.len());
        start = end;
    }
    Ok((requests, sizes))
}

#[cfg(test)]
mod tests;
