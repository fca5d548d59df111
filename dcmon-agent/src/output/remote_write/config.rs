//! One `remote_write` entry of the config: where to send, how to authenticate, what to add.
//!
//! Secrets (the bearer token, the basic-auth password) are named by file, never written in
//! the config; the files are read (with the API key) at start and at each reload.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::upload::CaFile;

/// `basic_auth` of a remote_write output.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BasicAuth {
    /// The user name (not a secret).
    pub username: String,
    /// File holding the password (mode 0600).
    pub password_file: PathBuf,
}

/// One Prometheus remote_write destination.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RemoteWriteConfig {
    /// The `output` label and the name of this output's cursor in the outbox; defaults to the
    /// URL's `host:port`. Renaming an output starts a new cursor.
    #[serde(default)]
    pub name: Option<String>,
    /// The receiver's write endpoint, e.g. `http://prometheus:9090/api/v1/write`.
    pub url: String,
    /// Extra request headers (`X-Scope-OrgID` for Mimir, `THANOS-TENANT`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// File holding a bearer token (mode 0600).
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    /// User name and password file.
    #[serde(default)]
    pub basic_auth: Option<BasicAuth>,
    /// A PEM bundle trusted for an `https://` receiver besides the webpki roots.
    #[serde(default)]
    pub ca_file: Option<CaFile>,
    /// Seconds one request may take in total.
    #[serde(default = "RemoteWriteConfig::default_timeout")]
    pub timeout: u64,
    /// Seconds to connect.
    #[serde(default = "RemoteWriteConfig::default_connect_timeout")]
    pub connect_timeout: u64,
    /// Labels added to every series (`cluster`, `datacenter`, ...).
    #[serde(default)]
    pub external_labels: BTreeMap<String, String>,
    /// Largest uncompressed `WriteRequest` in bytes; a batch that encodes larger is split.
    #[serde(default = "RemoteWriteConfig::default_max_request_bytes")]
    pub max_request_bytes: u64,
}

/// Headers the agent sets itself: an operator's value would break the protocol or carry a
/// secret in the config.
const RESERVED_HEADERS: [&str; 7] = [
    "authorization",
    "content-encoding",
    "content-type",
    "content-length",
    "host",
    "user-agent",
    "x-prometheus-remote-write-version",
];

impl RemoteWriteConfig {
    fn default_timeout() -> u64 {
        30
    }

    fn default_connect_timeout() -> u64 {
        5
    }

    fn default_max_request_bytes() -> u64 {
        1 << 20
    }

    /// The output's name: `name`, or the URL's `host:port`.
    pub fn output_name(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        match reqwest::Url::parse(self.url.trim()) {
            Ok(url) => {
                let host = url.host_str().unwrap_or_default();
                match url.port_or_known_default() {
                    Some(port) => format!("{host}:{port}"),
                    None => host.to_owned(),
                }
            }
            Err(_) => self.url.clone(),
        }
    }

    /// Check this entry; the error is `(field, what is wrong)`, the field relative to the entry.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        check_url(&self.url).map_err(|why| ("url", why))?;
        if let Some(name) = &self.name {
            check_name(name).map_err(|why| ("name", why))?;
        }
        if self.bearer_token_file.is_some() && self.basic_auth.is_some() {
            return Err(("bearer_token_file", "give either bearer_token_file or basic_auth, not both".into()));
        }
        if let Some(path) = &self.bearer_token_file
            && path.as_os_str().is_empty()
        {
            return Err(("bearer_token_file", "the path is empty".into()));
        }
        if let Some(auth) = &self.basic_auth {
            if auth.username.is_empty() || auth.username.contains(':') {
                return Err(("basic_auth.username", "must be non-empty and hold no `:`".into()));
            }
            if auth.password_file.as_os_str().is_empty() {
                return Err(("basic_auth.password_file", "the path is empty".into()));
            }
        }
        for (name, value) in &self.headers {
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(("headers", format!("{name:?} is not a valid HTTP header name")));
            }
            if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                return Err((
                    "headers",
                    format!(
                        "{name:?} is set by the agent (credentials come from bearer_token_file or basic_auth.password_file)"
                    ),
                ));
            }
            if reqwest::header::HeaderValue::from_str(value).is_err() {
                return Err(("headers", format!("the value of {name:?} is not a valid HTTP header value")));
            }
        }
        for name in self.external_labels.keys() {
            check_label_name(name).map_err(|why| ("external_labels", why))?;
        }
        for (field, value) in [("timeout", self.timeout), ("connect_timeout", self.connect_timeout)] {
            if !(1..=3600).contains(&value) {
                return Err((field, format!("must be 1 to 3600 seconds, got {value}")));
            }
        }
        if !(4096..=64 << 20).contains(&self.max_request_bytes) {
            return Err((
                "max_request_bytes",
                format!("must be 4096 to {} bytes, got {}", 64u64 << 20, self.max_request_bytes),
            ));
        }
        Ok(())
    }
}

/// An `http://` or `https://` URL with a host and no `user:password@` (credentials come from
/// files). A query is allowed: VictoriaMetrics takes `?extra_label=`.
fn check_url(text: &str) -> Result<(), String> {
    let url = text.trim();
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| format!("{e}: expected a URL such as \"http://prometheus:9090/api/v1/write\""))?;
    if !matches!(parsed.scheme(), "http" | "https") || !parsed.has_host() {
        return Err(format!("expected an http:// or https:// URL with a host, got scheme {:?}", parsed.scheme()));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("must not hold a user name or password; use basic_auth with a password_file".into());
    }
    if parsed.fragment().is_some() {
        return Err("must not have a fragment (`#...`)".into());
    }
    Ok(())
}

/// Output names go into the `output` label and the outbox's cursor records.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("must be 1 to 64 characters, got {}", name.len()));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':')) {
        return Err(format!("{name:?} may hold only letters, digits, `_`, `-`, `.` and `:`"));
    }
    if name == super::super::DCMON_OUTPUT {
        return Err(format!("{name:?} is the dcmon server output's name"));
    }
    Ok(())
}

/// A Prometheus label name that an operator may add: `[a-zA-Z_][a-zA-Z0-9_]*`, not reserved
/// (`__` prefix) and not one the agent sets.
fn check_label_name(name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let valid = bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid {
        return Err(format!("{name:?} is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"));
    }
    if name.starts_with("__") {
        return Err(format!("{name:?}: names starting with `__` are reserved"));
    }
    if name == "machine_id" {
        return Err("\"machine_id\" is set by the agent on every series".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(json: &str) -> RemoteWriteConfig {
        serde_json::from_str(json).expect("entry")
    }

    #[test]
    fn defaults_and_name_from_the_url() {
        let rw = entry(r#"{"url": "http://prom.example:9090/api/v1/write"}"#);
        assert_eq!(rw.output_name(), "prom.example:9090");
        assert_eq!((rw.timeout, rw.connect_timeout, rw.max_request_bytes), (30, 5, 1 << 20));
        assert_eq!(rw.validate(), Ok(()));
        assert_eq!(entry(r#"{"url": "https://mimir.example/api/v1/push"}"#).output_name(), "mimir.example:443");
        assert_eq!(entry(r#"{"name": "vm", "url": "http://a/"}"#).output_name(), "vm");
    }

    #[test]
    fn each_bad_value_names_its_field() {
        let cases = [
            (r#"{"url": "ftp://a/"}"#, "url"),
            (r#"{"url": "not a url"}"#, "url"),
            (r#"{"url": "http://u:p@a/"}"#, "url"),
            (r#"{"url": "http://a/", "name": "dcmon"}"#, "name"),
            (r#"{"url": "http://a/", "name": "a b"}"#, "name"),
            (
                r#"{"url": "http://a/", "bearer_token_file": "/t", "basic_auth": {"username": "u", "password_file": "/p"}}"#,
                "bearer_token_file",
            ),
            (
                r#"{"url": "http://a/", "basic_auth": {"username": "u:x", "password_file": "/p"}}"#,
                "basic_auth.username",
            ),
            (r#"{"url": "http://a/", "headers": {"Authorization": "Bearer x"}}"#, "headers"),
            (r#"{"url": "http://a/", "headers": {"bad header": "x"}}"#, "headers"),
            (r#"{"url": "http://a/", "external_labels": {"__name__": "x"}}"#, "external_labels"),
            (r#"{"url": "http://a/", "external_labels": {"machine_id": "x"}}"#, "external_labels"),
            (r#"{"url": "http://a/", "external_labels": {"1x": "x"}}"#, "external_labels"),
            (r#"{"url": "http://a/", "timeout": 0}"#, "timeout"),
            (r#"{"url": "http://a/", "connect_timeout": 3601}"#, "connect_timeout"),
            (r#"{"url": "http://a/", "max_request_bytes": 100}"#, "max_request_bytes"),
        ];
        for (json, field) in cases {
            let err = entry(json).validate().expect_err(json);
            assert_eq!(err.0, field, "{json}: {}", err.1);
        }
    }

    #[test]
    fn a_password_in_the_url_is_never_repeated() {
        let err = entry(r#"{"url": "http://user:hunter2@a/"}"#).validate().expect_err("userinfo");
        assert!(!err.1.contains("hunter2"), "{}", err.1);
    }
}
