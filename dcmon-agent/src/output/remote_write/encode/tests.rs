//! Unit tests of the encoder: the series, labels, timestamps and values a request holds, the
//! splitting bound, stale markers, and damaged batches.

use super::*;
use crate::output::remote_write::proto::WriteRequest;

/// Undo snappy and protobuf: the requests as the receiver reads them.
fn decode(encoded: &Encoded) -> Vec<WriteRequest> {
    encoded
        .requests
        .iter()
        .map(|body| {
            let proto = snap::raw::Decoder::new().decompress_vec(body).expect("snappy block format");
            WriteRequest::decode(proto.as_slice()).expect("a WriteRequest")
        })
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> Vec<Label> {
    pairs.iter().map(|(k, v)| Label::new(*k, *v)).collect()
}

fn no_labels() -> BTreeMap<String, String> {
    BTreeMap::new()
}

const BATCH: &str = r#"{"machine_id": "m-1", "timestamp": 1700000000, "metrics": [
    {"name": "cpu_usage_percent", "value": 12.5, "labels": {}, "timestamp": 1700000000},
    {"name": "disk_read_bytes_total", "value": 18446744073709551615, "labels": {"device": "nvme0n1", "Zone": "a"}, "timestamp": 1700000000},
    {"name": "gpu_temp", "value": 0, "labels": {"gpu": "0", "empty": ""}, "timestamp": 1699999999}
]}"#;

#[test]
fn series_labels_values_and_millisecond_timestamps() {
    let external: BTreeMap<String, String> = [("cluster".to_owned(), "c1".to_owned())].into();
    let encoded = encode(BATCH.as_bytes(), &external, &StaleState::new(), 1 << 20).expect("encode");
    assert_eq!((encoded.series, encoded.samples, encoded.stale_markers, encoded.dropped), (3, 3, 0, 0));
    assert_eq!(encoded.timestamp_ms, 1_700_000_000_000);
    let requests = decode(&encoded);
    assert_eq!(requests.len(), 1);
    let series = &requests[0].timeseries;
    assert_eq!(
        series[0].labels,
        labels(&[("__name__", "cpu_usage_percent"), ("cluster", "c1"), ("machine_id", "m-1")])
    );
    assert_eq!(series[0].samples, [Sample { value: 12.5, timestamp: 1_700_000_000_000 }]);
    // Byte order: upper case before `__name__`, which is before lower case.
    assert_eq!(
        series[1].labels,
        labels(&[
            ("Zone", "a"),
            ("__name__", "disk_read_bytes_total"),
            ("cluster", "c1"),
            ("device", "nvme0n1"),
            ("machine_id", "m-1")
        ])
    );
    assert_eq!(series[1].samples[0].value, 18_446_744_073_709_551_615_f64);
    // The empty label is no label; a metric's own timestamp is kept; 0 is a value.
    assert_eq!(
        series[2].labels,
        labels(&[("__name__", "gpu_temp"), ("cluster", "c1"), ("gpu", "0"), ("machine_id", "m-1")])
    );
    assert_eq!(series[2].samples, [Sample { value: 0.0, timestamp: 1_699_999_999_000 }]);
    for s in series {
        let names: Vec<&str> = s.labels.iter().map(|l| l.name.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(names, sorted, "sorted, no name twice");
    }
}

#[test]
fn a_metric_label_wins_over_an_external_one() {
    let external: BTreeMap<String, String> = [("device".to_owned(), "external".to_owned())].into();
    let body = r#"{"machine_id":"m","timestamp":1,"metrics":[{"name":"a","value":1,"labels":{"device":"sda"},"timestamp":1}]}"#;
    let requests = decode(&encode(body.as_bytes(), &external, &StaleState::new(), 1 << 20).expect("encode"));
    assert_eq!(requests[0].timeseries[0].labels, labels(&[("__name__", "a"), ("device", "sda"), ("machine_id", "m")]));
}

#[test]
fn samples_of_one_series_are_in_timestamp_order_one_per_timestamp() {
    let body = r#"{"machine_id":"m","timestamp":10,"metrics":[
        {"name":"a","value":3,"labels":{},"timestamp":10},
        {"name":"a","value":1,"labels":{},"timestamp":8},
        {"name":"a","value":2,"labels":{},"timestamp":9},
        {"name":"a","value":4,"labels":{},"timestamp":10}]}"#;
    let encoded = encode(body.as_bytes(), &no_labels(), &StaleState::new(), 1 << 20).expect("encode");
    let requests = decode(&encoded);
    let samples: Vec<(f64, i64)> = requests[0].timeseries[0].samples.iter().map(|s| (s.value, s.timestamp)).collect();
    assert_eq!(samples, [(1.0, 8000), (2.0, 9000), (4.0, 10_000)]);
    assert_eq!((encoded.series, encoded.samples), (1, 3));
}

#[test]
fn names_prometheus_refuses_are_dropped_and_counted() {
    let body = r#"{"machine_id":"m","timestamp":1,"metrics":[
        {"name":"ok:rule_1","value":1,"labels":{}},
        {"name":"1bad","value":1,"labels":{}},
        {"name":"","value":1,"labels":{}},
        {"name":"a","value":1,"labels":{"bad-label":"x"}},
        {"name":"a","value":1,"labels":{"__name__":"b"}},
        {"name":"a","value":1,"labels":{},"timestamp":9223372036854775807}]}"#;
    let encoded = encode(body.as_bytes(), &no_labels(), &StaleState::new(), 1 << 20).expect("encode");
    assert_eq!((encoded.series, encoded.dropped), (1, 5));
    assert_eq!(decode(&encoded)[0].timeseries[0].labels[0], Label::new("__name__", "ok:rule_1"));
}

#[test]
fn a_damaged_batch_is_an_error_not_a_panic() {
    for body in [
        "",
        "{",
        "[]",
        r#"{"machine_id":"m","timestamp":1}"#,
        r#"{"machine_id":"m","timestamp":1.5,"metrics":[]}"#,
        r#"{"machine_id":"m","timestamp":1,"metrics":[{"name":"a","value":"1"}]}"#,
        r#"{"machine_id":"m","timestamp":1,"metrics":[{"name":"a","value":1,"labels":{"x":1}}]}"#,
        r#"{"machine_id":"m","timestamp":1,"metrics":[{"name":"a","value":1e999}]}"#,
        r#"{"machine_id":"","timestamp":1,"metrics":[]}"#,
        r#"{"machine_id":"m","timestamp":9223372036854775807,"metrics":[]}"#,
    ] {
        assert!(encode(body.as_bytes(), &no_labels(), &StaleState::new(), 1 << 20).is_err(), "{body}");
    }
    let mut bytes = BATCH.as_bytes().to_vec();
    for cut in 0..bytes.len() {
        let _ = encode(&bytes[..cut], &no_labels(), &StaleState::new(), 4096);
    }
    for i in 0..bytes.len() {
        let keep = bytes[i];
        bytes[i] = b'\xff';
        let _ = encode(&bytes, &no_labels(), &StaleState::new(), 4096);
        bytes[i] = keep;
    }
}

/// A batch of `n` series, each with labels making it about 150 bytes encoded.
fn wide_batch(n: usize, timestamp: i64) -> String {
    let metrics: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"name":"series_{i}","value":{i},"labels":{{"device":"device-{i:04}","model":"{}"}},"timestamp":{timestamp}}}"#,
                "m".repeat(80)
            )
        })
        .collect();
    format!(r#"{{"machine_id":"m","timestamp":{timestamp},"metrics":[{}]}}"#, metrics.join(","))
}

#[test]
fn requests_stay_under_the_bound_and_together_hold_the_batch() {
    let body = wide_batch(500, 100);
    let whole = decode(&encode(body.as_bytes(), &no_labels(), &StaleState::new(), 64 << 20).expect("encode"));
    assert_eq!(whole.len(), 1);
    let whole_bytes = whole[0].encoded_len();
    let bound = 4096;
    let encoded = encode(body.as_bytes(), &no_labels(), &StaleState::new(), bound).expect("encode");
    let parts = decode(&encoded);
    assert!(parts.len() >= whole_bytes / bound, "{} parts for {whole_bytes} bytes", parts.len());
    for (part, size) in parts.iter().zip(&encoded.uncompressed_bytes) {
        assert_eq!(part.encoded_len(), *size);
        assert!(*size <= bound, "{size} > {bound}");
        assert!(!part.timeseries.is_empty());
    }
    let union: Vec<TimeSeries> = parts.into_iter().flat_map(|p| p.timeseries).collect();
    assert_eq!(union, whole[0].timeseries);
}

#[test]
fn one_series_larger_than_the_bound_goes_alone_and_whole() {
    let big = "v".repeat(10_000);
    let body = format!(
        r#"{{"machine_id":"m","timestamp":1,"metrics":[{{"name":"a","value":1,"labels":{{}}}},{{"name":"big","value":2,"labels":{{"x":"{big}"}}}},{{"name":"c","value":3,"labels":{{}}}}]}}"#
    );
    let encoded = encode(body.as_bytes(), &no_labels(), &StaleState::new(), 4096).expect("encode");
    let parts = decode(&encoded);
    let names: Vec<Vec<&str>> =
        parts.iter().map(|p| p.timeseries.iter().map(|s| s.labels[0].value.as_str()).collect()).collect();
    assert_eq!(names, [vec!["a"], vec!["big"], vec!["c"]]);
    assert!(encoded.uncompressed_bytes[1] > 10_000);
    assert_eq!(parts[1].timeseries[0].labels[2].value, big);
}

fn batch_of(timestamp: i64, names: &[&str]) -> String {
    let metrics: Vec<String> = names
        .iter()
        .map(|n| format!(r#"{{"name":"{n}","value":1,"labels":{{"gpu":"0"}},"timestamp":{timestamp}}}"#))
        .collect();
    format!(r#"{{"machine_id":"m","timestamp":{timestamp},"metrics":[{}]}}"#, metrics.join(","))
}

fn stale_series(encoded: &Encoded) -> Vec<(String, u64, i64)> {
    decode(encoded)
        .into_iter()
        .flat_map(|r| r.timeseries)
        .flat_map(|s| {
            let name = s.labels.iter().find(|l| l.name == "__name__").map(|l| l.value.clone()).unwrap_or_default();
            s.samples
                .into_iter()
                .filter(|x| x.value.is_nan())
                .map(move |x| (name.clone(), x.value.to_bits(), x.timestamp))
        })
        .collect()
}

#[test]
fn a_series_gone_gets_one_stale_marker_once() {
    let mut state = StaleState::new();
    let first = encode(batch_of(100, &["a", "b", "c"]).as_bytes(), &no_labels(), &state, 1 << 20).expect("first");
    assert!(stale_series(&first).is_empty());
    state.advance(first);
    assert_eq!(state.len(), 3);

    let second = encode(batch_of(130, &["b"]).as_bytes(), &no_labels(), &state, 1 << 20).expect("second");
    assert_eq!(stale_series(&second), [("a".into(), STALE_NAN_BITS, 130_000), ("c".into(), STALE_NAN_BITS, 130_000)]);
    assert_eq!((second.series, second.samples, second.stale_markers), (3, 3, 2));
    // The stale series carry their whole label set.
    let stale_labels = &decode(&second)[0].timeseries[1].labels;
    assert_eq!(stale_labels, &labels(&[("__name__", "a"), ("gpu", "0"), ("machine_id", "m")]));
    state.advance(second);

    let third = encode(batch_of(160, &["b"]).as_bytes(), &no_labels(), &state, 1 << 20).expect("third");
    assert!(stale_series(&third).is_empty(), "sent once");
    // A series that comes back is a plain series again.
    state.advance(third);
    let fourth = encode(batch_of(190, &["a"]).as_bytes(), &no_labels(), &state, 1 << 20).expect("fourth");
    assert_eq!(stale_series(&fourth), [("b".into(), STALE_NAN_BITS, 190_000)]);
}

#[test]
fn no_stale_marker_at_or_before_the_series_last_sample() {
    let mut state = StaleState::new();
    state.advance(encode(batch_of(100, &["a", "b"]).as_bytes(), &no_labels(), &state, 1 << 20).expect("first"));
    // The clock went back: a marker at 90 s would be out of order and fail the request.
    let back = encode(batch_of(90, &["b"]).as_bytes(), &no_labels(), &state, 1 << 20).expect("back");
    assert!(stale_series(&back).is_empty());
    let same = encode(batch_of(100, &["b"]).as_bytes(), &no_labels(), &state, 1 << 20).expect("same");
    assert!(stale_series(&same).is_empty());
}

#[test]
fn the_only_nan_is_the_stale_marker() {
    let mut state = StaleState::new();
    state.advance(encode(wide_batch(50, 100).as_bytes(), &no_labels(), &state, 1 << 20).expect("first"));
    let next = encode(batch_of(130, &["x"]).as_bytes(), &no_labels(), &state, 4096).expect("next");
    let all: Vec<Sample> = decode(&next).into_iter().flat_map(|r| r.timeseries).flat_map(|s| s.samples).collect();
    assert_eq!(all.len(), 51);
    assert_eq!(all.iter().filter(|s| s.value.is_nan()).count(), 50);
    assert!(all.iter().filter(|s| s.value.is_nan()).all(|s| s.value.to_bits() == STALE_NAN_BITS));
}

#[test]
fn an_empty_batch_needs_no_request() {
    let encoded = encode(br#"{"machine_id":"m","timestamp":1,"metrics":[]}"#, &no_labels(), &StaleState::new(), 4096)
        .expect("encode");
    assert!(encoded.requests.is_empty());
}

#[test]
fn escaped_strings_are_read_whole() {
    let body = r#"{"machine_id":"m\u002d1","timestamp":1,"metrics":[
        {"name":"a","value":1,"labels":{"model":"H100 \"SXM\" caf\u00e9","path":"C:\\x"}},
        {"name":"a","value":2,"labels":{"path":"C:\\x","model":"H100 \"SXM\" café"}}]}"#;
    let encoded = encode(body.as_bytes(), &no_labels(), &StaleState::new(), 1 << 20).expect("encode");
    let requests = decode(&encoded);
    assert_eq!(requests[0].timeseries.len(), 1, "one series, however its labels were written");
    assert_eq!(
        requests[0].timeseries[0].labels,
        labels(&[("__name__", "a"), ("machine_id", "m-1"), ("model", "H100 \"SXM\" café"), ("path", "C:\\x")])
    );
    assert_eq!(requests[0].timeseries[0].samples, [Sample { value: 2.0, timestamp: 1000 }]);
}

/// The value sent is the very f64 the batch's JSON was written from. serde_json's default
/// float parser is off by one unit in the last place for about one value in ten of this range
/// (measured over 5 million random values in [0, 1000)); the agent's `float_roundtrip`
/// feature makes the reading exact.
#[test]
fn gauge_values_arrive_bit_for_bit() {
    let mut batch = crate::batch::Batch::new("m-1", 1_700_000_000);
    let values = [985.690_694_632_869_5, 212.918_907_267_134_6, 479.607_564_269_825_96, 6.520_352_247_073_754];
    for (i, v) in values.iter().enumerate() {
        batch.push(crate::batch::Sample::gauge("g", *v).label("i", i.to_string()));
    }
    let encoded = encode(&batch.to_json(), &no_labels(), &StaleState::new(), 1 << 20).expect("encode");
    let sent: Vec<u64> =
        decode(&encoded).iter().flat_map(|r| &r.timeseries).map(|s| s.samples[0].value.to_bits()).collect();
    assert_eq!(sent, values.map(f64::to_bits));
}
