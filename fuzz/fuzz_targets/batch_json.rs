//! The wire body: `Batch::to_json` (hand-written around serde_json) for arbitrary machine ids,
//! label values (owned and shared label sets) and values is byte for byte what serde_json
//! writes, and parses back to them.
#![no_main]
use arbitrary::Arbitrary;
use dcmon_agent::batch::{Batch, Labels, Sample, Value};
use libfuzzer_sys::fuzz_target;

/// Metric names and label keys are the code's constants; these include ones that need
/// escaping, so the escaping path is taken for names too.
const NAMES: [&str; 6] = ["cpu_load_1m", "disk_read_bytes_total", "quote\"in_name", "back\\slash", "nl\n", "ünï"];
const KEYS: [&str; 5] = ["device", "interface", "model", "a\"b", "\u{1}"];

#[derive(Debug, Arbitrary)]
enum FuzzValue {
    Count(u64),
    Gauge(f64),
}

#[derive(Debug, Arbitrary)]
struct FuzzSample {
    name: u8,
    value: FuzzValue,
    labels: Vec<(u8, String)>,
    /// Whether its label set is a shared one, whose JSON is encoded when it is made.
    shared: bool,
}

#[derive(Debug, Arbitrary)]
struct FuzzBatch {
    machine_id: String,
    timestamp: i64,
    samples: Vec<FuzzSample>,
}

fuzz_target!(|input: FuzzBatch| {
    let mut batch = Batch::new(input.machine_id.clone(), input.timestamp);
    let mut pushed = Vec::new();
    for s in input.samples {
        let value = match s.value {
            FuzzValue::Count(v) => Value::Count(v),
            FuzzValue::Gauge(v) => Value::Gauge(v),
        };
        let pairs = s.labels.into_iter().map(|(k, v)| (KEYS[usize::from(k) % KEYS.len()], v.into()));
        let labels: Labels = if s.shared { Labels::shared(pairs) } else { pairs.collect() };
        let sample = Sample { name: NAMES[usize::from(s.name) % NAMES.len()], value, labels };
        if value.is_finite() {
            pushed.push(sample.clone());
        }
        batch.push(sample);
    }
    assert_eq!(batch.samples(), pushed, "finite samples kept in order, the others dropped");

    let body = batch.to_json();
    assert_eq!(
        String::from_utf8_lossy(&body),
        String::from_utf8_lossy(&serde_json::to_vec(&batch).expect("serde_json")),
        "hand-written body differs from serde_json's"
    );
    let parsed: serde_json::Value = serde_json::from_slice(&body).expect("wire body is JSON");
    assert_eq!(parsed["machine_id"], input.machine_id.as_str());
    assert_eq!(parsed["timestamp"], input.timestamp);
    let metrics = parsed["metrics"].as_array().expect("metrics array");
    assert_eq!(metrics.len(), pushed.len());
    for (m, s) in metrics.iter().zip(&pushed) {
        assert_eq!(m["name"], s.name);
        assert_eq!(m["timestamp"], input.timestamp);
        match s.value {
            Value::Count(v) => assert_eq!(m["value"].as_u64(), Some(v), "{m}"),
            Value::Gauge(v) => assert_eq!(m["value"].as_f64(), Some(v), "{m}"),
        }
        // A repeated key: JSON readers keep the last value.
        let mut labels = serde_json::Map::new();
        for (k, v) in &s.labels {
            labels.insert((*k).to_owned(), serde_json::Value::String(v.to_string()));
        }
        assert_eq!(m["labels"], serde_json::Value::Object(labels), "{m}");
    }
});
