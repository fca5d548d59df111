//! The config file model (`/etc/dcmon/config.json`): defaults, parsing with file, line, column
//! and field in every error, and validation.
//!
//! Unknown keys are warnings, not errors, so configs written for older or newer agents keep
//! working; a wrong type or an impossible value is an error, because guessing is worse.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::filter::PatternList;

/// Where the agent looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/dcmon/config.json";
/// Where the agent looks for its API key unless `api_key_file` says otherwise.
pub const DEFAULT_API_KEY_PATH: &str = "/etc/dcmon/api_key";

/// The whole configuration. Every field has the spec's default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Base URL of the dcmon server, `http://` or `https://`, without `/api/...`.
    pub server_url: String,
    /// Seconds between batches (at least 1).
    pub collection_interval: u64,
    /// Which optional exporters are enabled (the spec's map).
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
    /// The `apt` exporter's settings.
    pub apt: AptConfig,
    /// The `nvme` exporter's settings.
    pub nvme: NvmeConfig,
    /// The `ipmi` exporter's settings.
    pub ipmi: IpmiConfig,
    /// The `nvsmi` exporter's settings.
    pub nvsmi: NvsmiConfig,
    /// Count disk and network I/O with eBPF: `"auto"` (fall back to procfs), `"on"`, `"off"`.
    pub ebpf: crate::ebpf::EbpfMode,
}

/// The spec's `exporters` map: each switch enables one collector, configured in its own
/// section (`apt`, `nvme`, `ipmi`, `nvsmi`). A collector without its hardware is absent, never zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Exporters {
    /// IPMI sensors through ipmitool.
    pub ipmi: bool,
    /// APT pending upgrades and reboot flag.
    pub apt: bool,
    /// NVMe SMART/health.
    pub nvme: bool,
    /// NVIDIA GPUs through NVML / nvidia-smi.
    pub nvsmi: bool,
}

impl Default for Exporters {
    fn default() -> Self {
        Self { ipmi: true, apt: true, nvme: true, nvsmi: true }
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

impl Default for Config {
    fn default() -> Self {
        Self {
            server_url: "http://your-server.com:8000".to_owned(),
            collection_interval: 30,
            exporters: Exporters::default(),
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
            apt: AptConfig::default(),
            nvme: NvmeConfig::default(),
            ipmi: IpmiConfig::default(),
            nvsmi: NvsmiConfig::default(),
            ebpf: crate::ebpf::EbpfMode::Auto,
        }
    }
}

/// A config that could not be used, with the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read.
    #[error("config {}: cannot read: {source}", path.display())]
    Read {
        /// Config file path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
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

impl Config {
    /// Load from `path`. A missing file gives the defaults when `must_exist` is false (the
    /// default location); when the operator named the file explicitly it must exist.
    pub fn load(path: &Path, must_exist: bool) -> Result<Loaded, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                Self::parse(path, &text).map(|(config, unknown_keys)| Loaded { config, unknown_keys, from_file: true })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                Ok(Loaded { config: Config::default(), unknown_keys: Vec::new(), from_file: false })
            }
            Err(source) => Err(ConfigError::Read { path: path.to_owned(), source }),
        }
    }

    /// Parse and validate config text; `path` is only used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<(Config, Vec<String>), ConfigError> {
        let mut unknown_keys = Vec::new();
        let mut de = serde_json::Deserializer::from_str(text);
        let mut on_unknown = |p: serde_ignored::Path<'_>| unknown_keys.push(p.to_string());
        let ignoring = serde_ignored::Deserializer::new(&mut de, &mut on_unknown);
        let config: Config = serde_path_to_error::deserialize(ignoring).map_err(|e| {
            let field = Some(e.path().to_string()).filter(|p| p != "." && p != "?");
            let inner = e.into_inner();
            ConfigError::Parse {
                path: path.to_owned(),
                line: inner.line(),
                column: inner.column(),
                field,
                detail: strip_position(&inner.to_string()),
            }
        })?;
        de.end().map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            line: e.line(),
            column: e.column(),
            field: None,
            detail: strip_position(&e.to_string()),
        })?;
        config.validate(path)?;
        Ok((config, unknown_keys))
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field, detail: String| ConfigError::Invalid { path: path.to_owned(), field, detail };
        if self.collection_interval < 1 {
            return Err(invalid("collection_interval", "must be at least 1 second, got 0".into()));
        }
        let url = self.server_url.trim();
        let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
        if !scheme_ok || reqwest::Url::parse(url).is_err() {
            return Err(invalid(
                "server_url",
                format!(
                    "expected an http:// or https:// URL such as \"http://dcmon.example:8000\", got {:?}",
                    self.server_url
                ),
            ));
        }
        // Durations in seconds and rates: zero would mean "never" or a busy loop.
        for (field, value) in [
            ("collector_timeout", self.collector_timeout),
            ("upload_timeout", self.upload_timeout),
            ("connect_timeout", self.connect_timeout),
            ("outbox_max_age", self.outbox_max_age),
            ("retry_max_backoff", self.retry_max_backoff),
            ("auth_retry_interval", self.auth_retry_interval),
            ("catchup_batches_per_second", u64::from(self.catchup_batches_per_second)),
            ("apt.interval", self.apt.interval),
            ("apt.timeout", self.apt.timeout),
            ("nvme.timeout", self.nvme.timeout),
            ("ipmi.interval", self.ipmi.interval),
            ("ipmi.timeout", self.ipmi.timeout),
            ("ipmi.sdr_cache_max_age", self.ipmi.sdr_cache_max_age),
            ("nvsmi.timeout", self.nvsmi.timeout),
        ] {
            if value < 1 {
                return Err(invalid(field, "must be at least 1, got 0".into()));
            }
        }
        if self.outbox_max_bytes < 64 * 1024 {
            return Err(invalid(
                "outbox_max_bytes",
                format!("must be at least 65536 (room for a batch), got {}", self.outbox_max_bytes),
            ));
        }
        self.ipmi.validate().map_err(|(field, detail)| invalid(field, detail))?;
        if self.machine_id.as_ref().is_some_and(|id| id.trim().is_empty()) {
            return Err(invalid("machine_id", "must not be empty (remove the key to use /etc/machine-id)".into()));
        }
        Ok(())
    }

    /// Whether this config may load eBPF programs (every mode but an explicit "off").
    pub fn ebpf_may_load(&self) -> bool {
        self.ebpf != crate::ebpf::EbpfMode::Off
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

/// The `apt` section: pending upgrades, reboot flag, package list age.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct AptConfig {
    /// Seconds between upgrade counts (also recounted when dpkg's status or the lists change).
    pub interval: u64,
    /// Seconds one count may take before apt-get is killed.
    pub timeout: u64,
    /// The apt-get program.
    pub apt_get: PathBuf,
}

impl Default for AptConfig {
    fn default() -> Self {
        Self { interval: 3600, timeout: 120, apt_get: PathBuf::from("apt-get") }
    }
}

/// The `nvme` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct NvmeConfig {
    /// Controller device nodes (`/dev/nvme0`); empty means every controller in /sys/class/nvme.
    pub devices: Vec<PathBuf>,
    /// The nvme-cli program, used when the admin ioctl is not permitted.
    pub nvme_cli: PathBuf,
    /// Seconds one nvme-cli run may take.
    pub timeout: u64,
}

impl Default for NvmeConfig {
    fn default() -> Self {
        Self { devices: Vec::new(), nvme_cli: PathBuf::from("nvme"), timeout: 5 }
    }
}

/// The `ipmi` section: where the BMC is and how often to ask it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct IpmiConfig {
    /// ipmitool interface: `open` (the local BMC through /dev/ipmi0), `lan` or `lanplus`.
    pub interface: String,
    /// BMC address for `lan`/`lanplus`.
    pub host: Option<String>,
    /// BMC UDP port.
    pub port: u16,
    /// BMC user.
    pub username: Option<String>,
    /// File holding the BMC password (never the password itself in the config).
    pub password_file: Option<PathBuf>,
    /// lanplus cipher suite (`-C`); without it ipmitool spends seconds probing.
    pub cipher_suite: Option<u8>,
    /// Seconds between sensor reads.
    pub interval: u64,
    /// Seconds one ipmitool run may take before it is killed.
    pub timeout: u64,
    /// The ipmitool program.
    pub ipmitool: PathBuf,
    /// Where the SDR cache lives (rebuilt when missing, stale or failing).
    pub sdr_cache: PathBuf,
    /// Seconds after which the SDR cache is rebuilt.
    pub sdr_cache_max_age: u64,
}

impl Default for IpmiConfig {
    fn default() -> Self {
        Self {
            interface: "open".to_owned(),
            host: None,
            port: 623,
            username: None,
            password_file: None,
            cipher_suite: None,
            interval: 60,
            timeout: 30,
            ipmitool: PathBuf::from("ipmitool"),
            sdr_cache: PathBuf::from("/var/cache/dcmon/ipmi-sdr.cache"),
            sdr_cache_max_age: 86_400,
        }
    }
}

impl IpmiConfig {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        match self.interface.as_str() {
            "open" => Ok(()),
            "lan" | "lanplus" if self.host.as_deref().is_some_and(|h| !h.trim().is_empty()) => Ok(()),
            "lan" | "lanplus" => Err(("ipmi.host", format!("interface {:?} needs the BMC address", self.interface))),
            other => Err(("ipmi.interface", format!("expected \"open\", \"lan\" or \"lanplus\", got {other:?}"))),
        }
    }
}

/// The `nvsmi` section: where NVML and nvidia-smi are.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct NvsmiConfig {
    /// libnvidia-ml.so path; unset means the loader's default search.
    pub nvml_library: Option<PathBuf>,
    /// The nvidia-smi program, used when NVML cannot be loaded.
    pub nvidia_smi: PathBuf,
    /// Seconds one nvidia-smi run may take.
    pub timeout: u64,
}

impl Default for NvsmiConfig {
    fn default() -> Self {
        Self { nvml_library: None, nvidia_smi: PathBuf::from("nvidia-smi"), timeout: 10 }
    }
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

    fn parse(text: &str) -> Result<(Config, Vec<String>), ConfigError> {
        Config::parse(Path::new("/etc/dcmon/config.json"), text)
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
        assert_eq!(c.apt.interval, 600);
        assert_eq!(c.apt.timeout, AptConfig::default().timeout);
        assert_eq!(c.nvme.devices, [PathBuf::from("/dev/nvme1")]);
        assert_eq!(c.ipmi.cipher_suite, Some(3));
        assert_eq!(c.ipmi.interval, 60);
        assert_eq!(c.nvsmi.nvml_library.as_deref(), Some(Path::new("/opt/nv/libnvidia-ml.so.1")));
        let err = parse(r#"{"ipmi": {"interface": "lanplus"}}"#).expect_err("no host");
        assert!(err.to_string().contains("field `ipmi.host`"), "{err}");
        let err = parse(r#"{"ipmi": {"interface": "serial"}}"#).expect_err("bad interface");
        assert!(err.to_string().contains("field `ipmi.interface`"), "{err}");
        let err = parse(r#"{"apt": {"interval": 0}}"#).expect_err("zero");
        assert!(err.to_string().contains("field `apt.interval`"), "{err}");
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
        let loaded = Config::load(&p, false).expect("defaults");
        assert!(!loaded.from_file);
        assert_eq!(loaded.config, Config::default());
        let err = Config::load(&p, true).expect_err("must exist");
        assert!(err.to_string().contains("config.json"), "{err}");
    }
}
