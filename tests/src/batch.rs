//! Reading a batch as the agent sends it (`{machine_id, timestamp, metrics: [...]}`).

use serde_json::Value;

/// The batch's metrics.
#[track_caller]
pub fn metrics(batch: &Value) -> &Vec<Value> {
    batch["metrics"].as_array().unwrap_or_else(|| panic!("a batch has a `metrics` list: {batch}"))
}

/// The value of the first metric `name` that has a label whose value is `label` (any metric
/// `name`, when `label` is empty).
pub fn find(batch: &Value, name: &str, label: &str) -> Option<Value> {
    metrics(batch)
        .iter()
        .find(|m| {
            m["name"] == name
                && (label.is_empty() || m["labels"].as_object().is_some_and(|l| l.values().any(|v| v == label)))
        })
        .map(|m| m["value"].clone())
}
