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
//!
//! Here: [`Config`] and its parts, loading, parsing and validation. Beside it: `schema` (what the
//! config holds for the collectors without naming them), `parts` (reading the file in parts),
//! `server_url` (checking the server URL).

mod commands;
mod parts;
mod schema;
mod server_url;
#[cfg(test)]
mod tests;

use std::any::Any;
use std::borrow::Cow;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::filter::PatternList;
use crate::output::DCMON_OUTPUT;
use crate::output::remote_write::RemoteWriteConfig;
use crate::secure_file::SmallFileError;

pub use commands::{CommandType, CommandsConfig};
use parts::{
    TopLevelEntries, colon_before, field_prefix, first_value_position, join_path, parse_part, position_at,
    strip_position,
};
use schema::ExportersSeed;
pub use schema::{Exporters, Schema, Section, SectionSpec, Sections};
pub use server_url::check_server_url;
use server_url::lowercase_scheme;

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
    /// Deliver batches to the dcmon server at `server_url` (the default output).
    pub dcmon_output: bool,
    /// Prometheus remote_write outputs.
    pub remote_write: Vec<RemoteWriteConfig>,
    /// Serve the latest round at `http://ADDR/metrics` for scrapers; off when `None`.
    pub prometheus_listen: Option<SocketAddr>,
    /// Remote commands from the dcmon server (off unless `enabled`).
    pub commands: CommandsConfig,
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
            dcmon_output: true,
            remote_write: Vec::new(),
            prometheus_listen: None,
            commands: CommandsConfig::default(),
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
        /// Dotted path of the offending field (`remote_write[1].url`).
        field: Cow<'static, str>,
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
const OBJECT_SECTIONS: [&str; 4] = ["exporters", "disks", "interfaces", "commands"];

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
                        field: "ca_file".into(),
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
                    field: section.into(),
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
        let invalid = |field: &'static str, detail: String| ConfigError::Invalid {
            path: path.to_owned(),
            field: field.into(),
            detail,
        };
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
        self.validate_outputs(path)
    }

    /// Each remote_write entry, names unique, and at least one output.
    fn validate_outputs(&self, path: &Path) -> Result<(), ConfigError> {
        let mut names: Vec<String> = Vec::new();
        for (i, rw) in self.remote_write.iter().enumerate() {
            let name = rw.output_name();
            let invalid = |field: &str, detail: String| ConfigError::Invalid {
                path: path.to_owned(),
                field: format!("remote_write[{i}]{}{field}", if field.is_empty() { "" } else { "." }).into(),
                detail: format!("output {name:?}: {detail}"),
            };
            rw.validate().map_err(|(field, detail)| invalid(field, detail))?;
            if name == DCMON_OUTPUT || names.contains(&name) {
                return Err(invalid(
                    "name",
                    "another output has this name; give each remote_write entry its own `name`".into(),
                ));
            }
            names.push(name);
        }
        if self.commands.enabled && !self.dcmon_output {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                field: "commands.enabled".into(),
                detail: "commands come from the dcmon server, and dcmon_output is false".into(),
            });
        }
        if !self.dcmon_output && self.remote_write.is_empty() && self.prometheus_listen.is_none() {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                field: "dcmon_output".into(),
                detail: "is false and no remote_write or prometheus_listen is set: batches would go nowhere".into(),
            });
        }
        Ok(())
    }

    /// The names of the outputs that deliver from the outbox, each with its own cursor:
    /// [`DCMON_OUTPUT`] when enabled, then each remote_write entry's.
    pub fn output_names(&self) -> Vec<String> {
        let dcmon = self.dcmon_output.then(|| DCMON_OUTPUT.to_owned());
        dcmon.into_iter().chain(self.remote_write.iter().map(RemoteWriteConfig::output_name)).collect()
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
            ("commands.poll_interval", self.commands.poll_interval, UP_TO_A_DAY),
        ];
        for (_, section) in &self.sections.0 {
            durations.extend(section.durations());
        }
        durations
    }

    /// Advice about values that are valid but defeat their purpose: a section's round timeout
    /// ([`Section::round_timeouts`]) not below `collector_timeout`. Logged at start and shown
    /// by `check`; the agent runs anyway.
    pub fn warnings(&self) -> Vec<String> {
        let round = self.collector_timeout;
        self.sections
            .0
            .iter()
            .flat_map(|(_, section)| section.round_timeouts())
            .filter(|&(_, secs)| secs >= round)
            .map(|(field, secs)| {
                format!(
                    "`{field}` ({secs} s) is not below `collector_timeout` ({round} s): the round is cut before \
                     that wait ends and the whole collector's round fails, instead of only the part that is slow"
                )
            })
            .collect()
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
