//! The Remote-Write 1.0 messages, declared with prost's derive (no protoc, no generated code).
//!
//! Field numbers as in Prometheus's `prompb/remote.proto` and `prompb/types.proto`:
//!
//! ```protobuf
//! message WriteRequest { repeated TimeSeries timeseries = 1; reserved 2; repeated MetricMetadata metadata = 3; }
//! message TimeSeries   { repeated Label labels = 1; repeated Sample samples = 2; repeated Exemplar exemplars = 3; repeated Histogram histograms = 4; }
//! message Label        { string name = 1; string value = 2; }
//! message Sample       { double value = 1; int64 timestamp = 2; }
//! ```
//!
//! The agent sends neither metadata, exemplars nor histograms (the 1.0 spec leaves them out),
//! so those fields are not declared: a decoder skips them, an encoder never writes them.

/// The body of one remote_write request, before snappy.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    /// The series, each with its samples.
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

/// One series: its labels (sorted by name, `__name__` among them) and its samples (in
/// timestamp order).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    /// Sorted by name, no name twice, no empty value.
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    /// Oldest first.
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

/// A label pair.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Message)]
pub struct Label {
    /// `[a-zA-Z_][a-zA-Z0-9_]*`, or `__name__`.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Any UTF-8, never empty.
    #[prost(string, tag = "2")]
    pub value: String,
}

/// One sample.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Sample {
    /// The value; NaN only as the stale marker.
    #[prost(double, tag = "1")]
    pub value: f64,
    /// Milliseconds since the Unix epoch.
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

impl Label {
    /// A label from its name and value.
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        Self { name: name.into(), value: value.into() }
    }
}
