//! Label sets: the pairs of one sample, owned or made once and shared with their JSON.

use std::sync::Arc;

use super::json::push_json_labels;

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
    /// The pairs as a JSON object ([`super::Batch::to_json`] copies it).
    pub(super) json: Box<[u8]>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Sample;

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
}
