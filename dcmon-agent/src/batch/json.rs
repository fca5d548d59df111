//! The JSON body of a batch, written by hand around serde_json's number formatting and string
//! escaping, and the `Serialize` impls it is held equal to.

use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Serialize, Serializer};

use super::{Batch, LabelPair, Labels, Sample, Value};

impl Batch {
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
pub(super) fn push_json_labels(out: &mut Vec<u8>, pairs: &[LabelPair]) {
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
    use crate::batch::{LabelValue, Sample};

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
    fn pretty_json_is_the_same_batch() {
        let mut b = Batch::new("m1", 7);
        b.push(Sample::gauge("cpu_load_1m", 0.5).label("device", "WDC \"Blue\""));
        let pretty: serde_json::Value = serde_json::from_slice(&b.to_json_pretty()).expect("valid JSON");
        let compact: serde_json::Value = serde_json::from_slice(&b.to_json()).expect("valid JSON");
        assert_eq!(pretty, compact);
        assert!(b.to_json_pretty().contains(&b'\n'), "indented");
    }
}
