//! Reading the config file in parts: each part (the top level, `exporters`, a section) is parsed
//! from its own text, and its errors' lines and columns are moved to the file's.

use std::fmt;
use std::path::Path;

use serde::Deserialize;
use serde::de::DeserializeSeed;
use serde_json::value::RawValue;

use super::ConfigError;

pub(super) fn field_prefix(field: &Option<String>) -> String {
    field.as_ref().map(|f| format!("field `{f}`: ")).unwrap_or_default()
}
/// A parsed part of the config and the dotted paths of its unknown keys.
pub(super) type Parsed<T> = (T, Vec<String>);

/// An error in a part of the config parsed on its own: the path inside the part and the
/// error, with the line and column inside the part's text.
pub(super) struct PartError {
    path: String,
    error: serde_json::Error,
}

impl PartError {
    /// The error in the file: `text` is the whole file, the part starts at byte `offset`
    /// under the top-level key `key` (`None` for the top level itself).
    pub(super) fn in_file(self, path: &Path, text: &str, offset: usize, key: Option<&str>) -> ConfigError {
        let (part_line, part_column) = position_at(text.as_bytes(), offset);
        let (line, column) = match self.error.line() {
            // On the part's first line, columns count from where the part starts.
            1 => (part_line, part_column + self.error.column()),
            line => (part_line + line - 1, self.error.column()),
        };
        let field = match key {
            Some(key) => Some(join_path(key, &self.path)),
            None => Some(self.path).filter(|p| p != "." && p != "?"),
        };
        ConfigError::Parse {
            path: path.to_owned(),
            line,
            column,
            field,
            detail: strip_position(&self.error.to_string()),
        }
    }
}

/// Read `text` with `seed`, noting the path of an error and of every ignored (unknown) key.
pub(super) fn parse_part<'de, S: DeserializeSeed<'de>>(text: &'de str, seed: S) -> Result<Parsed<S::Value>, PartError> {
    let mut unknown_keys = Vec::new();
    let mut de = serde_json::Deserializer::from_str(text);
    let mut track = serde_path_to_error::Track::new();
    let value = {
        let mut on_unknown = |p: serde_ignored::Path<'_>| unknown_keys.push(p.to_string());
        let ignoring = serde_ignored::Deserializer::new(&mut de, &mut on_unknown);
        seed.deserialize(serde_path_to_error::Deserializer::new(ignoring, &mut track))
    };
    let value = value.map_err(|error| PartError { path: track.path().to_string(), error })?;
    de.end().map_err(|error| PartError { path: ".".to_owned(), error })?;
    Ok((value, unknown_keys))
}

/// `inner` (a path inside the part under top-level key `key`) as a path in the file.
pub(super) fn join_path(key: &str, inner: &str) -> String {
    match inner {
        "." => key.to_owned(),
        _ => format!("{key}.{inner}"),
    }
}

/// The top level's keys and their values' text, in file order, duplicates kept.
pub(super) struct TopLevelEntries<'a>(pub(super) Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for TopLevelEntries<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = TopLevelEntries<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(TopLevelEntries(entries))
            }
        }
        deserializer.deserialize_map(Entries)
    }
}

/// The index of the colon before the value that starts at byte `value_start` of valid JSON.
pub(super) fn colon_before(bytes: &[u8], value_start: usize) -> usize {
    bytes[..value_start].iter().rposition(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r')).unwrap_or(0)
}

/// Line (1-based) and column of byte `index` as serde_json counts them: the column is the
/// number of bytes before `index` on its line.
pub(super) fn position_at(bytes: &[u8], index: usize) -> (usize, usize) {
    let before = &bytes[..index.min(bytes.len())];
    let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    (before.iter().filter(|&&b| b == b'\n').count() + 1, before.len() - line_start)
}

/// 1-based line and column of the first byte that is not JSON whitespace.
pub(super) fn first_value_position(bytes: &[u8]) -> (usize, usize) {
    let start = bytes.iter().position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r')).unwrap_or(bytes.len());
    let before = &bytes[..start];
    let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    (before.iter().filter(|&&b| b == b'\n').count() + 1, start - line_start + 1)
}

/// serde_json appends " at line X column Y"; the error already says where.
pub(super) fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}
