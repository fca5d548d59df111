//! What the config holds for the collectors without naming them: the [`Schema`] they hand in,
//! their [`Section`]s behind [`Sections`], and the `exporters` map ([`Exporters`]).

use std::any::Any;
use std::fmt;

use serde::de::{DeserializeOwned, DeserializeSeed};

use super::Limit;
use super::parts::{Parsed, PartError, parse_part};

/// What the config holds besides its top-level fields, handed in by the code that owns it
/// (the collector table): the keys of the `exporters` map and the sections.
#[derive(Debug, Clone, Default)]
pub struct Schema {
    /// Each exporter's key in the `exporters` map and whether it is on when the map leaves
    /// it out, in the order [`Exporters::iter`] lists them.
    pub exporters: Vec<(&'static str, bool)>,
    /// Each section's top-level key and type, in the order they are validated.
    pub sections: Vec<(&'static str, SectionSpec)>,
}

impl Schema {
    /// `name` when it is a top-level key this schema parses: `exporters` or a section's.
    pub(super) fn key_of(&self, name: &str) -> Option<&'static str> {
        if name == "exporters" {
            return Some("exporters");
        }
        self.sections.iter().map(|&(key, _)| key).find(|&key| key == name)
    }
}

/// A section of the config (`apt`, `ipmi`, ...): the checks of its values that its types
/// cannot make. Its type also gives its defaults (`Default`) and its parsing (`Deserialize`,
/// with `#[serde(default)]` so a key left out keeps its default); see [`SectionSpec::of`].
pub trait Section: Any + fmt::Debug + Send + Sync {
    /// Every duration in it (seconds), by its dotted name (`apt.interval`), with its bound.
    fn durations(&self) -> Vec<(&'static str, u64, Limit)>;
    /// A value its type allows but the collector cannot use: the dotted field and what is
    /// allowed.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        Ok(())
    }
    /// The timeouts (seconds, by dotted name) that bound a wait inside one round of its
    /// collector, such as one GPU's readings: below `collector_timeout` they mark the one slow
    /// part and the round goes on; at or above it the round is cut first and fails whole.
    fn round_timeouts(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// One section type, as the parser handles it without naming it: how to read it from its
/// JSON text and its default.
#[derive(Clone, Copy)]
pub struct SectionSpec {
    pub(super) parse: ParseSection,
    pub(super) default: fn() -> Box<dyn AnySection>,
}

/// Reads a section from its JSON text.
pub(super) type ParseSection = fn(&str) -> Result<Parsed<Box<dyn AnySection>>, PartError>;

impl SectionSpec {
    /// The spec of section type `T`.
    pub const fn of<T: Section + Clone + PartialEq + Default + DeserializeOwned>() -> Self {
        Self { parse: parse_section::<T>, default: default_section::<T> }
    }
}

impl fmt::Debug for SectionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SectionSpec")
    }
}

fn parse_section<T: Section + Clone + PartialEq + DeserializeOwned>(
    text: &str,
) -> Result<Parsed<Box<dyn AnySection>>, PartError> {
    let (section, unknown_keys) = parse_part(text, std::marker::PhantomData::<T>)?;
    Ok((Box::new(section), unknown_keys))
}

fn default_section<T: Section + Clone + PartialEq + Default>() -> Box<dyn AnySection> {
    Box::new(T::default())
}

/// A section behind a box, with the `Clone` and `PartialEq` of its type, so [`Config`] keeps
/// both.
pub(super) trait AnySection: Section {
    fn clone_box(&self) -> Box<dyn AnySection>;
    fn equals(&self, other: &dyn AnySection) -> bool;
}

impl<T: Section + Clone + PartialEq> AnySection for T {
    fn clone_box(&self) -> Box<dyn AnySection> {
        Box::new(self.clone())
    }

    fn equals(&self, other: &dyn AnySection) -> bool {
        (other as &dyn Any).downcast_ref::<T>() == Some(self)
    }
}

/// The config's sections by key, in schema order; read one with [`Config::section`].
#[derive(Default)]
pub struct Sections(pub(super) Vec<(&'static str, Box<dyn AnySection>)>);

impl Clone for Sections {
    fn clone(&self) -> Self {
        Self(self.0.iter().map(|(key, section)| (*key, section.clone_box())).collect())
    }
}

impl PartialEq for Sections {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self.0.iter().zip(&other.0).all(|((k1, s1), (k2, s2))| k1 == k2 && s1.equals(s2.as_ref()))
    }
}

impl Sections {
    pub(super) fn replace(&mut self, key: &str, section: Box<dyn AnySection>) {
        if let Some((_, slot)) = self.0.iter_mut().find(|(k, _)| *k == key) {
            *slot = section;
        }
    }
}

impl fmt::Debug for Sections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.iter().map(|(key, section)| (key, section))).finish()
    }
}

/// The spec's `exporters` map: one switch per exporter of the [`Schema`] (the collector
/// table's), each configured in its own section (`apt`, `nvme`, `ipmi`, `nvsmi`). A collector
/// without its hardware is absent, never zeros. Keys the schema does not know are ignored
/// (and reported as unknown keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exporters {
    /// Every exporter of the schema, in schema order, with whether it is on.
    switches: Vec<(&'static str, bool)>,
}

impl Exporters {
    /// These exporters, each on or off as given.
    pub fn new(switches: Vec<(&'static str, bool)>) -> Self {
        Self { switches }
    }

    /// Whether the exporter `name` is on (false for a name that is no exporter).
    pub fn enabled(&self, name: &str) -> bool {
        self.switches.iter().any(|&(n, on)| n == name && on)
    }

    /// Switch the exporter `name` on or off.
    ///
    /// # Panics
    /// When `name` is no exporter of the table: a mistake in the calling code, not in a config.
    pub fn set(&mut self, name: &str, on: bool) {
        match self.switches.iter_mut().find(|(n, _)| *n == name) {
            Some((_, switch)) => *switch = on,
            None => panic!("{name:?} is not an exporter of the collector table"),
        }
    }

    /// Every exporter's key and whether it is on, in table order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, bool)> + '_ {
        self.switches.iter().copied()
    }
}

/// Reads the `exporters` map, starting from the schema's exporters at their defaults.
pub(super) struct ExportersSeed<'a>(pub(super) &'a [(&'static str, bool)]);

impl<'de> DeserializeSeed<'de> for ExportersSeed<'_> {
    type Value = Exporters;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Exporters, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ExportersSeed<'_> {
    type Value = Exporters;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of exporter names to true or false")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Exporters, A::Error> {
        let mut exporters = Exporters::new(self.0.to_vec());
        let mut seen: Vec<&'static str> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            match exporters.switches.iter_mut().find(|(n, _)| *n == key) {
                Some((name, switch)) => {
                    // As the derived struct did: a key given twice is an error.
                    if seen.contains(name) {
                        return Err(serde::de::Error::duplicate_field(name));
                    }
                    seen.push(name);
                    *switch = map.next_value()?;
                }
                // Ignored values are what serde_ignored reports as unknown keys.
                None => drop(map.next_value::<serde::de::IgnoredAny>()?),
            }
        }
        Ok(exporters)
    }
}
