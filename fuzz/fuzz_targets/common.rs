//! Checks shared by the targets: what every parser's samples must satisfy.
#![allow(dead_code, reason = "each target uses the part it needs")]

use dcmon_agent::batch::{Batch, Sample, Value};

/// Every value a parser produced is finite, and the samples make a batch whose wire body is
/// valid JSON with every sample in it.
pub fn check_samples(what: &str, samples: &[Sample]) {
    for s in samples {
        assert!(s.value.is_finite(), "{what}: {} = {:?} is not finite", s.name, s.value);
    }
    let mut batch = Batch::new("fuzz", 0);
    batch.extend(samples.iter().cloned());
    let body: serde_json::Value = serde_json::from_slice(&batch.to_json()).expect("wire body is JSON");
    assert_eq!(body["metrics"].as_array().map(Vec::len), Some(samples.len()), "{what}: every sample sent");
}

/// A float the parser produced is finite.
pub fn check_finite(what: &str, v: f64) {
    assert!(v.is_finite(), "{what}: {v} is not finite");
}

/// The input as text, the way the agent reads files (`read_to_string` refuses non-UTF-8).
pub fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// Whether a value came out as a count (an integer on the wire).
pub fn is_count(v: Value) -> bool {
    matches!(v, Value::Count(_))
}
