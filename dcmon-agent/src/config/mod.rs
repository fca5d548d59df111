//! The config file model (`/etc/dcmon/config.json`): defaults, parsing with file, line, column
//! and field in every error, and validation.
//!
//! Unknown keys are warnings, not errors, so configs written for older or newer agents keep
//! working; a wrong type or an impossible value is an error, because guessing is worse.
//!
//! This module knows the top-level fields. The `exporters` map's keys and the sections (`apt`,
//! `ipmi`, ...) belong to the collectors: the caller hands them in as a [`Schema`], and
//! [`Config`] keeps each section behind [`Config::section`]. The agent's `Default` config (every
//! exporter and section of the collector table at its default) is implemented next to that
//! table, in the collector module.

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{DeserializeOwned, DeserializeSeed};
use serde_json::value::RawValue;

use crate::filter::PatternList;
use crate::secure_file::SmallFileError;

/// Where the agent looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/dcmon/config.json";
/// Where the agent looks for its API key unless `api_key_file` says otherwise.
pub const DEFAULT_API_KEY_PATH: &str = "/etc/dcmon/api_key";

/// The whole configuration. Every field has the spec's default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default = "Config::top_level_defaults")]
pub struct Config {
    /// Base URL of the dcmon server, `http://` or `https://`, without `/api/...`.
    pub server_url: String,
    /// A PEM bundle of CA certificates trusted for an `https://` server besides the webpki
    /// roots; read and checked by [`Config::load`].
    pub ca_file: Option<crate::upload::CaFile>,
    /// Seconds between batches (at least 1).
    pub collection_interval: u64,
    /// Which optional exporters are enabled (the spec's map). Parsed with the [`Schema`].
    #[serde(skip)]
    pub exporters: Exporters,
    /// Overrides /etc/machine-id.
    pub machine_id: Option<String>,
    /// The file holding the server API key.
    pub api_key_file: PathBuf,
    /// Root of the host filesystem to read /proc, /sys and /etc from (`/host` in a container).
    pub host_root: PathBuf,
    /// Which block devices the disk collector reports.
    pub disks: DeviceFilter,
    /// Which network interfaces the network collector reports.
    pub interfaces: DeviceFilter,
    /// Seconds one collector may take before its result is abandoned for this batch.
    pub collector_timeout: u64,
    /// Seconds one upload request may take in total (connect, send, answer).
    pub upload_timeout: u64,
    /// Seconds to wait for the TCP/TLS connection to the server.
    pub connect_timeout: u64,
    /// Directory of the durable queue of unsent batches.
    pub outbox_dir: PathBuf,
    /// Bytes the outbox may hold before the oldest batches are dropped.
    pub outbox_max_bytes: u64,
    /// Seconds a batch may wait in the outbox before it is dropped.
    pub outbox_max_age: u64,
    /// Longest wait, in seconds, between retries while the server is unreachable or failing.
    pub retry_max_backoff: u64,
    /// Seconds between retries while the server answers 401/403.
    pub auth_retry_interval: u64,
    /// Batches per second sent while catching up on a backlog.
    pub catchup_batches_per_second: u32,
    /// The collectors' sections (`apt`, `ipmi`, ...), read with [`Config::section`]. Parsed
    /// with the [`Schema`].
    #[serde(skip)]
    pub sections: Sections,
    /// Count disk and network I/O with eBPF: `"auto"` (fall back to procfs), `"on"`, `"off"`.
    pub ebpf: EbpfMode,
}

/// The config's `ebpf` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EbpfMode {
    /// Use eBPF when it loads; otherwise log why once and use procfs.
    #[default]
    Auto,
    /// eBPF or nothing: the agent refuses to start without it.
    On,
    /// Never load BPF programs.
    Off,
}

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
    fn key_of(&self, name: &str) -> Option<&'static str> {
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
}

/// One section type, as the parser handles it without naming it: how to read it from its
/// JSON text and its default.
#[derive(Clone, Copy)]
pub struct SectionSpec {
    parse: ParseSection,
    default: fn() -> Box<dyn AnySection>,
}

/// Reads a section from its JSON text.
type ParseSection = fn(&str) -> Result<Parsed<Box<dyn AnySection>>, PartError>;

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
trait AnySection: Section {
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
pub struct Sections(Vec<(&'static str, Box<dyn AnySection>)>);

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
    fn replace(&mut self, key: &str, section: Box<dyn AnySection>) {
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
struct ExportersSeed<'a>(&'a [(&'static str, bool)]);

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

/// Include and exclude name patterns (`*` and `?` wildcards). A device is reported when it
/// matches an include pattern and no exclude pattern.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DeviceFilter {
    /// Names to report.
    #[serde(default = "PatternList::match_all")]
    pub include: PatternList,
    /// Names never to report, even when included.
    #[serde(default)]
    pub exclude: PatternList,
}

impl DeviceFilter {
    /// Whether `name` passes the filter.
    pub fn allows(&self, name: &str) -> bool {
        self.include.matches(name) && !self.exclude.matches(name)
    }

    /// Disks: every whole block device, but not the virtual ones that are not storage.
    /// (Partitions are left out by the collector through sysfs, not by name.)
    pub fn default_disks() -> Self {
        Self { include: PatternList::match_all(), exclude: PatternList::new(["loop*", "ram*", "zram*", "sr*", "fd*"]) }
    }

    /// Interfaces: physical and bonded links, not loopback or container/VPN plumbing.
    pub fn default_interfaces() -> Self {
        Self {
            include: PatternList::match_all(),
            exclude: PatternList::new([
                "lo",
                // ifb devices mirror other interfaces' traffic for shaping: counting them counts twice.
                "ifb*",
                "docker*",
                "veth*",
                "br-*",
                "virbr*",
                "tun*",
                "tap*",
                "tailscale*",
            ]),
        }
    }
}

impl Config {
    /// The spec's defaults with the exporters and sections of `schema` at theirs.
    pub fn defaults(schema: &Schema) -> Self {
        Self {
            exporters: Exporters::new(schema.exporters.clone()),
            sections: Sections(schema.sections.iter().map(|&(key, spec)| (key, (spec.default)())).collect()),
            ..Self::top_level_defaults()
        }
    }

    /// The top-level fields at their defaults, no exporters and no sections: what parsing
    /// starts from before the schema's parts are read.
    fn top_level_defaults() -> Self {
        Self {
            server_url: "http://your-server.com:8000".to_owned(),
            ca_file: None,
            collection_interval: 30,
            exporters: Exporters::new(Vec::new()),
            machine_id: None,
            api_key_file: PathBuf::from(DEFAULT_API_KEY_PATH),
            host_root: PathBuf::from("/"),
            disks: DeviceFilter::default_disks(),
            interfaces: DeviceFilter::default_interfaces(),
            collector_timeout: 10,
            upload_timeout: 15,
            connect_timeout: 5,
            outbox_dir: PathBuf::from("/var/lib/dcmon/outbox"),
            outbox_max_bytes: 64 * 1024 * 1024,
            outbox_max_age: 7 * 24 * 3600,
            retry_max_backoff: 300,
            auth_retry_interval: 60,
            catchup_batches_per_second: 10,
            sections: Sections::default(),
            ebpf: EbpfMode::Auto,
        }
    }
}

/// The most bytes a config file may hold: real configs are a few KiB.
pub const MAX_CONFIG_FILE_BYTES: u64 = 4 << 20;

/// A config that could not be used, with the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but cannot be used as a file: unreadable, not a regular file, or too
    /// large.
    // Not `source`: the message includes it, and `{:#}` would print a `source` a second time.
    #[error("config {}: {error}", path.display())]
    Read {
        /// Config file path.
        path: PathBuf,
        /// Why.
        error: SmallFileError,
    },
    /// JSON syntax error or a field of the wrong type.
    #[error("config {}: line {line}, column {column}: {}{detail}", path.display(), field_prefix(field))]
    Parse {
        /// Config file path.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// Dotted path of the offending field, if the error is about one.
        field: Option<String>,
        /// What serde_json said was expected.
        detail: String,
    },
    /// Well-formed, but a value is not allowed.
    #[error("config {}: field `{field}`: {detail}", path.display())]
    Invalid {
        /// Config file path.
        path: PathBuf,
        /// Dotted path of the offending field.
        field: &'static str,
        /// What is allowed.
        detail: String,
    },
}

impl ConfigError {
    /// Line and column of a parse error, to find the one first in the file (others last).
    fn position(&self) -> (usize, usize) {
        match self {
            ConfigError::Parse { line, column, .. } => (*line, *column),
            _ => (usize::MAX, usize::MAX),
        }
    }
}

/// Check a dcmon server base URL (`server_url`, `register --server`): `http://` or `https://`
/// in any case, a host, and no user name, password, query or fragment (the agent appends
/// `/api/...` to it). The message never repeats a password.
pub fn check_server_url(text: &str) -> Result<(), String> {
    let url = text.trim();
    // The URL parser forgives `http:host` and `http:///host`; an operator who wrote them meant
    // something else, so the text itself must start with the scheme and `//host`.
    let after_scheme = ["http://", "https://"].iter().find_map(|scheme| {
        url.get(..scheme.len()).filter(|s| s.eq_ignore_ascii_case(scheme)).map(|_| &url[scheme.len()..])
    });
    let parsed = reqwest::Url::parse(url).ok().filter(|u| u.has_host());
    let Some(parsed) = parsed.filter(|_| after_scheme.is_some_and(|rest| !rest.starts_with('/'))) else {
        return Err(format!(
            "expected an http:// or https:// URL such as \"http://dcmon.example:8000\", got {:?}",
            without_userinfo(url)
        ));
    };
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!(
            "must not hold a user name or password (`user:password@` before the host; the agent \
             authenticates with the API key file), got {:?}",
            without_userinfo(url)
        ));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!(
            "must not have a query (`?...`) or fragment (`#...`): the agent appends /api/metrics to it, got {url:?}"
        ));
    }
    Ok(())
}

/// `url` (already checked to start with a scheme and `://`) with its scheme in lower case.
fn lowercase_scheme(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => format!("{}://{rest}", scheme.to_ascii_lowercase()),
        None => url.to_owned(),
    }
}

/// `url` with anything before an `@` in its authority replaced by `***`, for messages.
fn without_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

fn field_prefix(field: &Option<String>) -> String {
    field.as_ref().map(|f| format!("field `{f}`: ")).unwrap_or_default()
}

/// A loaded config plus the unknown keys that were ignored (to be logged as warnings once
/// logging is up).
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The validated config.
    pub config: Config,
    /// Dotted paths of keys this agent does not know.
    pub unknown_keys: Vec<String>,
    /// False when the file did not exist and the defaults are in use.
    pub from_file: bool,
}

/// The sections of the config that are JSON objects, besides each collector's section.
/// serde's derive also accepts an array for a struct and maps it by position, so `[30, ...]`
/// would silently set the fields in declaration order: these are checked to be objects first.
const OBJECT_SECTIONS: [&str; 3] = ["exporters", "disks", "interfaces"];

/// [`OBJECT_SECTIONS`] and every section of `schema`.
fn object_sections(schema: &Schema) -> impl Iterator<Item = &'static str> + '_ {
    OBJECT_SECTIONS.into_iter().chain(schema.sections.iter().map(|&(key, _)| key))
}

const MINUTE: u64 = 60;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;
const WEEK: u64 = 7 * DAY;
/// Seconds in 365 days.
pub const YEAR: u64 = 365 * DAY;

/// The largest value a duration in the config may have, in seconds, and how to say it. A
/// larger value is a typo (an interval of 10^12 s means never sending), and values from 2^63
/// up would overflow time arithmetic.
#[derive(Debug, Clone, Copy)]
pub struct Limit(pub u64, pub &'static str);

/// At most an hour.
pub const UP_TO_AN_HOUR: Limit = Limit(HOUR, "1 hour");
const UP_TO_A_DAY: Limit = Limit(DAY, "1 day");
/// At most 7 days.
pub const UP_TO_A_WEEK: Limit = Limit(WEEK, "7 days");

impl Config {
    /// Load from `path`: a regular file of at most [`MAX_CONFIG_FILE_BYTES`], with the
    /// exporters and sections of `schema`. A missing file gives the defaults when `must_exist`
    /// is false (the default location); when the operator named the file explicitly it must
    /// exist. A FIFO or device is refused at once; a file on a hung filesystem can still block,
    /// so async callers run this on a blocking thread under a timeout.
    pub fn load(path: &Path, must_exist: bool, schema: &Schema) -> Result<Loaded, ConfigError> {
        match crate::secure_file::read(path, MAX_CONFIG_FILE_BYTES) {
            Ok((bytes, _)) => {
                let (mut config, unknown_keys) = Self::parse_bytes(path, &bytes, schema)?;
                if let Some(ca) = &mut config.ca_file {
                    ca.load().map_err(|detail| ConfigError::Invalid {
                        path: path.to_owned(),
                        field: "ca_file",
                        detail,
                    })?;
                }
                Ok(Loaded { config, unknown_keys, from_file: true })
            }
            Err(e) if e.is_not_found() && !must_exist => {
                Ok(Loaded { config: Config::defaults(schema), unknown_keys: Vec::new(), from_file: false })
            }
            Err(error) => Err(ConfigError::Read { path: path.to_owned(), error }),
        }
    }

    /// Parse and validate config text; `path` is only used in error messages.
    pub fn parse(path: &Path, text: &str, schema: &Schema) -> Result<(Config, Vec<String>), ConfigError> {
        Self::parse_bytes(path, text.as_bytes(), schema)
    }

    /// Parse and validate the bytes of a config file, touching nothing else (a fuzz target
    /// can call it); `path` is only used in error messages. Bytes that are not UTF-8 are a
    /// parse error with their position.
    ///
    /// The top-level fields are read in one pass over the whole text; `exporters` and each
    /// section of `schema` from their own text, with their errors' lines and columns moved to
    /// the file's. The error reported is the one that comes first in the file, as from a
    /// single pass.
    pub fn parse_bytes(path: &Path, bytes: &[u8], schema: &Schema) -> Result<(Config, Vec<String>), ConfigError> {
        let at =
            |line, column, field, detail| ConfigError::Parse { path: path.to_owned(), line, column, field, detail };
        let parse_error = |e: &serde_json::Error, field, detail| at(e.line(), e.column(), field, detail);
        let serde_detail = |e: &serde_json::Error| strip_position(&e.to_string());
        // The shape first: the top level and each section must be objects (see OBJECT_SECTIONS).
        let top: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(bytes).map_err(|e| {
            if !e.is_data() {
                return parse_error(&e, None, serde_detail(&e));
            }
            // "invalid type: sequence, expected a map": say what was there instead.
            let message = e.to_string();
            let got = message.strip_prefix("invalid type: ").and_then(|m| m.split_once(", expected"));
            let got = got.map_or("something else", |(got, _)| got);
            // serde_json reports this before the value, at column 0; point at the value.
            let (line, column) = first_value_position(bytes);
            at(line, column, None, format!("the config must be a JSON object {{...}}, got {got}"))
        })?;
        for section in object_sections(schema) {
            if let Some(serde_json::Value::Array(_)) = top.get(section) {
                return Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    field: section,
                    detail: "expected a JSON object {...}, got an array".into(),
                });
            }
        }
        // Valid JSON is valid UTF-8: serde_json checked every string above.
        let text = std::str::from_utf8(bytes).map_err(|e| {
            let (line, column) = position_at(bytes, e.valid_up_to());
            at(line, column, None, e.to_string())
        })?;

        // Candidate errors by position: the first in the file is reported.
        let mut errors: Vec<ConfigError> = Vec::new();
        let top_level = parse_part(text, std::marker::PhantomData::<Config>);
        let (mut config, top_level_unknown) = match top_level {
            Ok(parsed) => parsed,
            Err(e) => {
                errors.push(e.in_file(path, text, 0, None));
                (Config::top_level_defaults(), Vec::new())
            }
        };
        config.exporters = Exporters::new(schema.exporters.clone());
        config.sections = Sections(schema.sections.iter().map(|&(key, spec)| (key, (spec.default)())).collect());
        let mut part_unknown: Vec<(&'static str, Vec<String>)> = Vec::new();
        let entries =
            serde_json::from_str::<TopLevelEntries<'_>>(text).map_err(|e| parse_error(&e, None, serde_detail(&e)))?;
        for (name, raw) in entries.0 {
            let Some(key) = schema.key_of(&name) else { continue };
            let offset = raw.get().as_ptr() as usize - text.as_ptr() as usize;
            if part_unknown.iter().any(|&(seen, _)| seen == key) {
                // As the derived struct did: a key given twice is an error, placed where serde_json
                // stops reading after the key (its closing quote and any blanks before the colon).
                let (line, column) = position_at(text.as_bytes(), colon_before(text.as_bytes(), offset));
                errors.push(at(line, column, None, format!("duplicate field `{key}`")));
                continue;
            }
            let parsed = match schema.sections.iter().find(|&&(section, _)| section == key) {
                None => parse_part(raw.get(), ExportersSeed(&schema.exporters)).map(|(exporters, unknown)| {
                    config.exporters = exporters;
                    unknown
                }),
                Some((_, spec)) => (spec.parse)(raw.get()).map(|(section, unknown)| {
                    config.sections.replace(key, section);
                    unknown
                }),
            };
            match parsed {
                Ok(unknown) => part_unknown.push((key, unknown)),
                Err(e) => {
                    part_unknown.push((key, Vec::new()));
                    errors.push(e.in_file(path, text, offset, Some(key)));
                }
            }
        }
        if let Some(first) = errors.into_iter().min_by_key(ConfigError::position) {
            return Err(first);
        }
        // Each part's unknown keys where the top-level pass skipped the part, so the list
        // keeps the file's order.
        let mut unknown_keys = Vec::new();
        for key in top_level_unknown {
            match part_unknown.iter_mut().find(|(part, _)| *part == key) {
                Some((part, unknown)) => unknown_keys.extend(unknown.drain(..).map(|inner| join_path(part, &inner))),
                None => unknown_keys.push(key),
            }
        }
        config.validate(path)?;
        // Schemes are case-insensitive; everything after reads `server_base` as lower case.
        config.server_url = lowercase_scheme(config.server_url.trim());
        Ok((config, unknown_keys))
    }

    /// Section `T` of this config: its default where the config's schema has no such section.
    pub fn section<T: Section + Clone + Default>(&self) -> Cow<'_, T> {
        let found = self.sections.0.iter().find_map(|(_, section)| (section.as_ref() as &dyn Any).downcast_ref::<T>());
        found.map_or_else(|| Cow::Owned(T::default()), Cow::Borrowed)
    }

    /// Replace section `T` (for tests and tools that build a config in code).
    ///
    /// # Panics
    /// When this config's schema has no section of type `T`: a mistake in the calling code.
    pub fn set_section<T: Section + Clone + PartialEq>(&mut self, value: T) {
        let slot = self.sections.0.iter_mut().find(|(_, section)| (section.as_ref() as &dyn Any).is::<T>());
        match slot {
            Some((_, section)) => *section = Box::new(value),
            None => panic!("{} is not a section of this config's schema", std::any::type_name::<T>()),
        }
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field, detail: String| ConfigError::Invalid { path: path.to_owned(), field, detail };
        check_server_url(&self.server_url).map_err(|detail| invalid("server_url", detail))?;
        for (field, value, Limit(max, max_text)) in self.durations() {
            if value < 1 {
                return Err(invalid(field, "must be at least 1 second, got 0".into()));
            }
            if value > max {
                return Err(invalid(field, format!("must be at most {max} seconds ({max_text}), got {value}")));
            }
        }
        // Zero would mean a busy loop.
        if self.catchup_batches_per_second < 1 {
            return Err(invalid("catchup_batches_per_second", "must be at least 1, got 0".into()));
        }
        if self.outbox_max_bytes < 64 * 1024 {
            return Err(invalid(
                "outbox_max_bytes",
                format!("must be at least 65536 (room for a batch), got {}", self.outbox_max_bytes),
            ));
        }
        for (_, section) in &self.sections.0 {
            section.validate().map_err(|(field, detail)| invalid(field, detail))?;
        }
        if self.machine_id.as_ref().is_some_and(|id| id.trim().is_empty()) {
            return Err(invalid("machine_id", "must not be empty (remove the key to use /etc/machine-id)".into()));
        }
        Ok(())
    }

    /// Every duration in the config (seconds) by its dotted name, with its upper bound: the
    /// top-level ones, then each section's.
    fn durations(&self) -> Vec<(&'static str, u64, Limit)> {
        let mut durations = vec![
            ("collection_interval", self.collection_interval, UP_TO_A_DAY),
            ("collector_timeout", self.collector_timeout, UP_TO_AN_HOUR),
            ("upload_timeout", self.upload_timeout, UP_TO_AN_HOUR),
            ("connect_timeout", self.connect_timeout, UP_TO_AN_HOUR),
            ("outbox_max_age", self.outbox_max_age, Limit(10 * YEAR, "10 years")),
            ("retry_max_backoff", self.retry_max_backoff, UP_TO_A_DAY),
            ("auth_retry_interval", self.auth_retry_interval, UP_TO_A_DAY),
        ];
        for (_, section) in &self.sections.0 {
            durations.extend(section.durations());
        }
        durations
    }

    /// Whether this config may load eBPF programs (every mode but an explicit "off").
    pub fn ebpf_may_load(&self) -> bool {
        self.ebpf != EbpfMode::Off
    }

    /// Time between batches.
    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.collection_interval)
    }

    /// The server URL without a trailing slash, so `{base}/api/metrics` is well-formed.
    pub fn server_base(&self) -> &str {
        self.server_url.trim().trim_end_matches('/')
    }
}

/// A parsed part of the config and the dotted paths of its unknown keys.
type Parsed<T> = (T, Vec<String>);

/// An error in a part of the config parsed on its own: the path inside the part and the
/// error, with the line and column inside the part's text.
struct PartError {
    path: String,
    error: serde_json::Error,
}

impl PartError {
    /// The error in the file: `text` is the whole file, the part starts at byte `offset`
    /// under the top-level key `key` (`None` for the top level itself).
    fn in_file(self, path: &Path, text: &str, offset: usize, key: Option<&str>) -> ConfigError {
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
fn parse_part<'de, S: DeserializeSeed<'de>>(text: &'de str, seed: S) -> Result<Parsed<S::Value>, PartError> {
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
fn join_path(key: &str, inner: &str) -> String {
    match inner {
        "." => key.to_owned(),
        _ => format!("{key}.{inner}"),
    }
}

/// The top level's keys and their values' text, in file order, duplicates kept.
struct TopLevelEntries<'a>(Vec<(String, &'a RawValue)>);

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
fn colon_before(bytes: &[u8], value_start: usize) -> usize {
    bytes[..value_start].iter().rposition(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r')).unwrap_or(0)
}

/// Line (1-based) and column of byte `index` as serde_json counts them: the column is the
/// number of bytes before `index` on its line.
fn position_at(bytes: &[u8], index: usize) -> (usize, usize) {
    let before = &bytes[..index.min(bytes.len())];
    let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    (before.iter().filter(|&&b| b == b'\n').count() + 1, before.len() - line_start)
}

/// 1-based line and column of the first byte that is not JSON whitespace.
fn first_value_position(bytes: &[u8]) -> (usize, usize) {
    let start = bytes.iter().position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r')).unwrap_or(bytes.len());
    let before = &bytes[..start];
    let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    (before.iter().filter(|&&b| b == b'\n').count() + 1, start - line_start + 1)
}

/// serde_json appends " at line X column Y"; the error already says where.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::apt::AptConfig;
    use crate::collector::ipmi::IpmiConfig;
    use crate::collector::nvme::NvmeConfig;
    use crate::collector::nvsmi::NvsmiConfig;
    use crate::collector::schema;

    fn parse(text: &str) -> Result<(Config, Vec<String>), ConfigError> {
        Config::parse(Path::new("/etc/dcmon/config.json"), text, &schema())
    }

    #[test]
    fn spec_example_parses_to_defaults() {
        let (c, unknown) = parse(
            r#"{"server_url": "http://your-server.com:8000", "collection_interval": 30,
                "exporters": {"ipmi": true, "apt": true, "nvme": true, "nvsmi": true}}"#,
        )
        .expect("spec example");
        assert_eq!(c, Config::default());
        assert!(unknown.is_empty());
    }

    #[test]
    fn empty_object_is_defaults() {
        assert_eq!(parse("{}").expect("empty").0, Config::default());
    }

    #[test]
    fn unknown_keys_are_reported_not_fatal() {
        let (c, unknown) =
            parse(r#"{"collection_interval": 5, "log_file": "/x", "exporters": {"gpu2": true}}"#).expect("ok");
        assert_eq!(c.collection_interval, 5);
        assert_eq!(unknown, ["log_file", "exporters.gpu2"]);
    }

    #[test]
    fn an_exporter_given_twice_is_an_error() {
        let err = parse(r#"{"exporters": {"apt": true, "nvme": false, "apt": false}}"#).expect_err("twice");
        let msg = err.to_string();
        assert!(msg.ends_with("line 1, column 48: field `exporters`: duplicate field `apt`"), "{msg}");
    }

    #[test]
    fn syntax_error_names_file_line_and_column() {
        let err = parse("{\n  \"collection_interval\": 30,\n  \"server_url\": \"http://x\"\n  \"exporters\": {}\n}")
            .expect_err("missing comma");
        let msg = err.to_string();
        assert!(msg.starts_with("config /etc/dcmon/config.json: line 4, column 3:"), "{msg}");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let err = parse("{\"exporters\": {\"apt\": \"yes\"}}").expect_err("wrong type");
        let msg = err.to_string();
        assert!(msg.contains("line 1") && msg.contains("field `exporters.apt`"), "{msg}");
        assert!(msg.contains("expected a boolean"), "{msg}");
        let err = parse("{\"collection_interval\": \"30\"}").expect_err("string interval");
        assert!(err.to_string().contains("field `collection_interval`"), "{err}");
        let err = parse("{\"collection_interval\": 0.5}").expect_err("fractional interval");
        assert!(err.to_string().contains("field `collection_interval`"), "{err}");
    }

    #[test]
    fn invalid_values_are_rejected() {
        let err = parse("{\"collection_interval\": 0}").expect_err("zero");
        assert!(err.to_string().contains("`collection_interval`: must be at least 1 second"), "{err}");
        for url in ["ftp://x", "localhost:8000", "", "http://"] {
            let err = parse(&format!("{{\"server_url\": {url:?}}}")).expect_err(url);
            assert!(err.to_string().contains("field `server_url`"), "{err}");
        }
        assert!(parse(r#"{"server_url": "https://dcmon.example/"}"#).is_ok());
        assert!(parse(r#"{"machine_id": " "}"#).is_err());
    }

    #[test]
    fn trailing_garbage_is_an_error() {
        let err = parse("{} x").expect_err("trailing");
        assert!(err.to_string().contains("line 1, column 4"), "{err}");
    }

    #[test]
    fn filters_keep_their_defaults_when_only_one_side_is_given() {
        let (c, _) = parse(r#"{"interfaces": {"exclude": ["lo"]}, "disks": {"include": ["vd*"]}}"#).expect("ok");
        assert!(c.interfaces.allows("veth0"));
        assert!(!c.interfaces.allows("lo"));
        assert!(c.disks.allows("vda"));
        assert!(!c.disks.allows("sda"));
    }

    #[test]
    fn exporter_sections_parse_and_validate() {
        let (c, unknown) = parse(
            r#"{"apt": {"interval": 600}, "nvme": {"devices": ["/dev/nvme1"]},
                "ipmi": {"interface": "lanplus", "host": "10.0.0.5", "cipher_suite": 3,
                         "username": "admin", "password_file": "/etc/dcmon/bmc"},
                "nvsmi": {"nvml_library": "/opt/nv/libnvidia-ml.so.1"}}"#,
        )
        .expect("ok");
        assert!(unknown.is_empty(), "{unknown:?}");
        assert_eq!(c.section::<AptConfig>().interval, 600);
        assert_eq!(c.section::<AptConfig>().timeout, AptConfig::default().timeout);
        assert_eq!(c.section::<NvmeConfig>().devices, [PathBuf::from("/dev/nvme1")]);
        assert_eq!(c.section::<IpmiConfig>().cipher_suite, Some(3));
        assert_eq!(c.section::<IpmiConfig>().interval, 60);
        assert_eq!(c.section::<NvsmiConfig>().nvml_library.as_deref(), Some(Path::new("/opt/nv/libnvidia-ml.so.1")));
        let err = parse(r#"{"ipmi": {"interface": "lanplus"}}"#).expect_err("no host");
        assert!(err.to_string().contains("field `ipmi.host`"), "{err}");
        let err = parse(r#"{"ipmi": {"interface": "serial"}}"#).expect_err("bad interface");
        assert!(err.to_string().contains("field `ipmi.interface`"), "{err}");
        let err = parse(r#"{"apt": {"interval": 0}}"#).expect_err("zero");
        assert!(err.to_string().contains("field `apt.interval`"), "{err}");
    }

    /// A section is parsed from its own text; its errors still carry the file's line and
    /// column, on the section's first line (which starts mid-line) and on later ones.
    #[test]
    fn a_type_error_in_a_section_names_the_file_line_and_column() {
        let text = "{\n  \"collection_interval\": 30, \"ipmi\": {\"interface\": \"open\",\n      \"port\": 623,\n      \"timeout\": \"soon\"}\n}";
        let err = parse(text).expect_err("a string timeout");
        assert_eq!(
            err.to_string(),
            "config /etc/dcmon/config.json: line 4, column 23: field `ipmi.timeout`: \
             invalid type: string \"soon\", expected u64"
        );
        let err = parse("{\"ebpf\": \"auto\",  \"apt\": {\"timeout\": 60, \"interval\": -1}}").expect_err("negative");
        assert_eq!(
            err.to_string(),
            "config /etc/dcmon/config.json: line 1, column 55: field `apt.interval`: \
             invalid value: integer `-1`, expected u64"
        );
        let (_, unknown) =
            parse("{\"apt\": {\"intervall\": 5}, \"x\": 1, \"exporters\": {\"gpu\": true}}").expect("ok");
        assert_eq!(unknown, ["apt.intervall", "x", "exporters.gpu"], "the file's order, full dotted paths");
    }

    /// A section given twice is refused, as the other fields are.
    #[test]
    fn a_section_given_twice_is_an_error() {
        let err = parse("{\"apt\": {\"interval\": 1},\n  \"apt\" : {\"interval\": 2}}").expect_err("twice");
        assert_eq!(err.to_string(), "config /etc/dcmon/config.json: line 2, column 8: duplicate field `apt`");
    }

    /// Sections sit behind `Config::section`; comparing, cloning and printing a config still
    /// covers them (the reload path compares configs).
    #[test]
    fn sections_take_part_in_eq_clone_and_debug() {
        let (parsed, _) = parse(r#"{"apt": {"interval": 600}}"#).expect("ok");
        assert_ne!(parsed, Config::default());
        assert_eq!(parsed.clone(), parsed);
        assert!(format!("{parsed:?}").contains("interval: 600"), "{parsed:?}");
        let mut set = Config::default();
        set.set_section(AptConfig { interval: 600, ..AptConfig::default() });
        assert_eq!(set, parsed);
        assert_eq!(set.section::<AptConfig>().interval, 600);
        assert_eq!(*Config::default().section::<IpmiConfig>(), IpmiConfig::default());
        let bare = Config::defaults(&Schema::default());
        assert_eq!(*bare.section::<NvmeConfig>(), NvmeConfig::default(), "a section the schema lacks: its default");
        assert!(!bare.exporters.enabled("apt"));
    }

    #[test]
    fn server_base_has_no_trailing_slash() {
        let (c, _) = parse(r#"{"server_url": "http://h:8000/"}"#).expect("ok");
        assert_eq!(c.server_base(), "http://h:8000");
    }

    #[test]
    fn missing_default_file_means_defaults_but_named_file_must_exist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("config.json");
        let loaded = Config::load(&p, false, &schema()).expect("defaults");
        assert!(!loaded.from_file);
        assert_eq!(loaded.config, Config::default());
        let err = Config::load(&p, true, &schema()).expect_err("must exist");
        assert!(err.to_string().contains("config.json"), "{err}");
    }

    #[test]
    fn a_fifo_device_or_directory_config_is_refused_at_once() {
        use crate::secure_file::test_support::{mkfifo, read_without_blocking};
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = mkfifo(dir.path(), "config.json");
        let path = fifo.clone();
        let err = read_without_blocking(&fifo, move || Config::load(&path, true, &schema())).expect_err("a FIFO");
        assert_eq!(err.to_string(), format!("config {}: is a FIFO, expected a regular file", fifo.display()));
        let err = Config::load(Path::new("/dev/zero"), true, &schema()).expect_err("/dev/zero");
        assert_eq!(err.to_string(), "config /dev/zero: is a character device, expected a regular file");
        // Printed with its whole chain, the reason appears once.
        let err = Config::load(dir.path(), false, &schema()).expect_err("a directory");
        let msg = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(msg, format!("config {}: is a directory, expected a regular file", dir.path().display()));
    }

    #[test]
    fn an_oversized_config_is_refused_naming_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("config.json");
        let mut text = " ".repeat(5 << 20);
        text.push_str("{}");
        std::fs::write(&p, &text).expect("write");
        let err = Config::load(&p, true, &schema()).expect_err("5 MiB");
        assert_eq!(err.to_string(), format!("config {}: is larger than the limit of 4194304 bytes", p.display()));
    }

    #[test]
    fn the_config_and_its_sections_must_be_objects() {
        let err = parse("[\"http://x:8000\", 5]").expect_err("an array");
        assert_eq!(
            err.to_string(),
            "config /etc/dcmon/config.json: line 1, column 1: the config must be a JSON object {...}, got sequence"
        );
        let err = parse("\n  \"http://x\"").expect_err("a string");
        assert!(err.to_string().contains("line 2, column 3: the config must be a JSON object"), "{err}");
        for section in object_sections(&schema()) {
            let err = parse(&format!("{{\"{section}\": [true, false, 1]}}")).expect_err(section);
            assert_eq!(
                err.to_string(),
                format!(
                    "config /etc/dcmon/config.json: field `{section}`: expected a JSON object {{...}}, got an array"
                )
            );
        }
        let err = parse("").expect_err("empty");
        assert!(err.to_string().contains("line 1, column 0: EOF while parsing"), "{err}");
    }

    #[test]
    fn every_duration_has_an_upper_bound_and_huge_values_never_panic() {
        let fields = Config::default().durations().into_iter().map(|(field, ..)| field);
        for field in fields {
            for value in [1_u64 << 63, u64::MAX, 1_000_000_000_000] {
                let json = match field.split_once('.') {
                    Some((section, key)) => format!("{{\"{section}\": {{\"{key}\": {value}}}}}"),
                    None => format!("{{\"{field}\": {value}}}"),
                };
                let err = std::panic::catch_unwind(|| parse(&json))
                    .unwrap_or_else(|_| panic!("{json} panicked"))
                    .expect_err(&json);
                let msg = err.to_string();
                assert!(msg.contains(&format!("field `{field}`: must be at most ")), "{json}: {msg}");
                assert!(msg.ends_with(&format!("got {value}")), "{json}: {msg}");
            }
        }
        let err = parse(r#"{"collection_interval": 86401}"#).expect_err("a day and a second");
        assert!(err.to_string().ends_with("must be at most 86400 seconds (1 day), got 86401"), "{err}");
        assert!(parse(r#"{"collection_interval": 86400, "outbox_max_age": 315360000}"#).is_ok());
        // One past u64 is a type error, not a panic.
        let err = parse(r#"{"upload_timeout": 18446744073709551616}"#).expect_err("2^64");
        assert!(err.to_string().contains("field `upload_timeout`"), "{err}");
    }

    #[test]
    fn server_url_scheme_is_case_insensitive_and_query_fragment_userinfo_are_refused() {
        for ok in ["HTTP://dcmon.example:8000", "Https://dcmon.example/base/", "http://[::1]:8000"] {
            let (c, _) = parse(&format!("{{\"server_url\": {ok:?}}}")).unwrap_or_else(|e| panic!("{ok}: {e}"));
            // The scheme is kept in lower case (found by the config fuzz target: `httPs://`
            // came out of server_base as written), the rest as written.
            let (scheme, rest) = ok.split_once("://").expect("scheme");
            assert_eq!(c.server_url, format!("{}://{rest}", scheme.to_ascii_lowercase()));
            assert!(c.server_base().starts_with("http://") || c.server_base().starts_with("https://"));
        }
        for bad in ["http://h:8000/?x=1", "http://h:8000?", "http://h/#frag", "http:h:8000", "http:///x"] {
            let err = parse(&format!("{{\"server_url\": {bad:?}}}")).expect_err(bad);
            assert!(err.to_string().contains("field `server_url`"), "{bad}: {err}");
        }
        for with_password in ["http://user:hunter2@h:8000", "https://hunter2@h", "http://u:hunter2@h:99999"] {
            let err = parse(&format!("{{\"server_url\": {with_password:?}}}")).expect_err(with_password);
            let msg = err.to_string();
            assert!(msg.contains("field `server_url`"), "{msg}");
            assert!(!msg.contains("hunter2"), "the password is in the message: {msg}");
        }
        let err = parse(r#"{"server_url": "http://user:hunter2@h:8000"}"#).expect_err("userinfo");
        assert!(err.to_string().contains("must not hold a user name or password"), "{err}");
    }

    #[test]
    fn bytes_that_are_not_utf8_are_a_parse_error() {
        let err =
            Config::parse_bytes(Path::new("c.json"), b"{\"machine_id\": \"\xff\"}", &schema()).expect_err("not UTF-8");
        assert!(err.to_string().starts_with("config c.json: line 1, column "), "{err}");
    }

    /// Every prefix of a full config, and the config with any one byte replaced, loads or
    /// gives an error naming the file: never a panic.
    #[test]
    fn truncated_or_corrupted_configs_never_panic() {
        let text = br#"{"server_url": "https://dcmon.example:8443/x", "collection_interval": 15,
            "exporters": {"ipmi": false}, "disks": {"include": ["sd*"], "exclude": []},
            "apt": {"interval": 600, "timeout": 60}, "ipmi": {"interface": "lanplus", "host": "10.0.0.5"},
            "outbox_max_bytes": 1048576, "machine_id": "m1"}"#;
        let path = Path::new("fuzz.json");
        assert!(Config::parse_bytes(path, text, &schema()).is_ok());
        let check = |bytes: &[u8]| {
            let result = std::panic::catch_unwind(|| Config::parse_bytes(path, bytes, &schema()));
            match result {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => assert!(e.to_string().starts_with("config fuzz.json: "), "{e}"),
                Err(_) => panic!("panicked on {:?}", String::from_utf8_lossy(bytes)),
            }
        };
        for end in 0..text.len() {
            check(&text[..end]);
        }
        let mut corrupted = text.to_vec();
        for i in 0..text.len() {
            for replacement in [b'[', b'9', b'"', 0xff] {
                corrupted[i] = replacement;
                check(&corrupted);
            }
            corrupted[i] = text[i];
        }
    }

    #[test]
    fn ebpf_key_parses_and_defaults_to_auto() {
        assert_eq!(Config::default().ebpf, EbpfMode::Auto);
        for (text, want) in [("auto", EbpfMode::Auto), ("on", EbpfMode::On), ("off", EbpfMode::Off)] {
            let json = format!(r#"{{"ebpf": "{text}"}}"#);
            let (config, unknown) = Config::parse(Path::new("c.json"), &json, &schema()).expect(text);
            assert_eq!(config.ebpf, want);
            assert!(unknown.is_empty());
        }
        let err =
            Config::parse(Path::new("c.json"), r#"{"ebpf": "yes"}"#, &schema()).expect_err("unknown mode").to_string();
        assert!(err.contains("ebpf") && err.contains("auto"), "{err}");
    }
}
