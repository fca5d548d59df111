//! Real time-series databases for the output tests: Prometheus (`/usr/bin/prometheus`, Debian
//! package `prometheus`) with its remote-write receiver on, and VictoriaMetrics
//! (`/usr/bin/victoria-metrics`, package `victoria-metrics`), each on a free loopback port with
//! its storage in a folder of the test. Both can be killed (SIGKILL) and started again on the
//! same storage and port, as an outage. A database is killed when its handle is dropped.
//!
//! The query helpers return [`Series`]: the labels and every `(timestamp ms, value)` read back.
//! The HTTP client is a few lines of std (HTTP/1.0 over loopback), so this module needs no
//! dependency.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::wait_until;

/// A series read back from a database: its labels (`__name__` included) and its samples,
/// `(timestamp in ms, value)`, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Every label, `__name__` included.
    pub labels: BTreeMap<String, String>,
    /// `(timestamp ms, value)`, oldest first.
    pub samples: Vec<(i64, f64)>,
}

impl Series {
    /// The metric name (`__name__`), or "" without one.
    pub fn name(&self) -> &str {
        self.labels.get("__name__").map_or("", String::as_str)
    }
}

/// Prometheus's stale marker (`value.StaleNaN`), written by a remote-write sender when a
/// series ends; VictoriaMetrics exports it as `null`.
pub const STALE_NAN_BITS: u64 = 0x7ff0_0000_0000_0002;

/// How long a database may take to answer its readiness endpoint after a start.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// One HTTP request to a database.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// A free port on 127.0.0.1 (bound, read, released: the database binds it right after).
pub fn free_loopback_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("binding 127.0.0.1:0: {e}"));
    l.local_addr().unwrap_or_else(|e| panic!("local_addr: {e}"))
}

/// The binary at `path`, or a failure saying which package to install.
#[track_caller]
pub fn require_binary(path: &str, package: &str) -> PathBuf {
    let p = PathBuf::from(path);
    assert!(
        p.is_file(),
        "{path} not found: these tests run a real {package}; install the Debian package \
         (`apt-get install {package}`, as .ci/run does) or leave the tests out with `--skip`"
    );
    p
}

/// One database process: its command line, port, storage and log. Killed when dropped.
#[derive(Debug)]
struct DbProcess {
    what: &'static str,
    bin: PathBuf,
    args: Vec<String>,
    addr: SocketAddr,
    log: PathBuf,
    ready_path: &'static str,
    child: Option<Child>,
    starts: u32,
}

impl DbProcess {
    fn spawn(&mut self) {
        self.starts += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.log.display()));
        let _ = writeln!(
            log,
            "==== start {} of {}: {} {}",
            self.starts,
            self.what,
            self.bin.display(),
            self.args.join(" ")
        );
        let err = log.try_clone().unwrap_or_else(|e| panic!("{e}"));
        let child = Command::new(&self.bin)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        let ready = wait_until(READY_TIMEOUT, || {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("{} exited ({status}) before it was ready:\n{}", self.what, self.log_text());
            }
            http_request("GET", self.addr, self.ready_path, None).ok().filter(|(status, _)| *status == 200)
        });
        assert!(
            ready.is_some(),
            "{} not ready on {} after {:?}:\n{}",
            self.what,
            self.addr,
            started.elapsed(),
            self.log_text()
        );
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for DbProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A scrape job for [`Prometheus::start`]: `job` scraping `http://target/metrics` every
/// `interval`.
#[derive(Debug, Clone)]
pub struct ScrapeJob {
    /// The `job` label.
    pub job: String,
    /// `host:port` to scrape.
    pub target: String,
    /// scrape_interval (and scrape_timeout, capped at it).
    pub interval: Duration,
}

/// A Prometheus 2.x with `--web.enable-remote-write-receiver`, its TSDB in `DIR/prometheus`,
/// on a free loopback port. Killed when dropped.
#[derive(Debug)]
pub struct Prometheus {
    process: DbProcess,
}

impl Prometheus {
    /// Start one with no scrape job (remote write only); waits for `/-/ready`.
    #[track_caller]
    pub fn start(dir: &Path) -> Self {
        Self::start_with_scrapes(dir, &[])
    }

    /// Start one that also scrapes `jobs` (a `{{self}}` target scrapes this Prometheus).
    #[track_caller]
    pub fn start_with_scrapes(dir: &Path, jobs: &[ScrapeJob]) -> Self {
        Self::start_with(dir, jobs, "")
    }

    /// Start one that scrapes `jobs`, with `extra_yaml` (top-level keys such as
    /// `remote_write:`) appended to its config file.
    #[track_caller]
    pub fn start_with(dir: &Path, jobs: &[ScrapeJob], extra_yaml: &str) -> Self {
        let bin = require_binary("/usr/bin/prometheus", "prometheus");
        let home = dir.join("prometheus");
        std::fs::create_dir_all(home.join("data")).unwrap_or_else(|e| panic!("creating {}: {e}", home.display()));
        let addr = free_loopback_addr();
        let mut config = String::from("global:\n  evaluation_interval: 1s\nscrape_configs:\n");
        for job in jobs {
            let ms = job.interval.as_millis().max(100);
            let target = job.target.replace("{{self}}", &addr.to_string());
            config.push_str(&format!(
                "  - job_name: {job:?}\n    scrape_interval: {ms}ms\n    scrape_timeout: {ms}ms\n    \
                 static_configs:\n      - targets: [{target:?}]\n",
                job = job.job
            ));
        }
        config.push_str(extra_yaml);
        let config_path = home.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap_or_else(|e| panic!("writing {}: {e}", config_path.display()));
        let args = vec![
            format!("--config.file={}", config_path.display()),
            format!("--storage.tsdb.path={}", home.join("data").display()),
            format!("--web.listen-address={addr}"),
            "--web.enable-remote-write-receiver".to_owned(),
            "--storage.tsdb.retention.time=1d".to_owned(),
            "--log.level=info".to_owned(),
        ];
        let mut process = DbProcess {
            what: "prometheus",
            bin,
            args,
            addr,
            log: home.join("prometheus.log"),
            ready_path: "/-/ready",
            child: None,
            starts: 0,
        };
        process.spawn();
        Self { process }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.process.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.process.addr
    }

    /// The remote-write endpoint for the agent's `remote_write[].url`.
    pub fn remote_write_url(&self) -> String {
        format!("{}/api/v1/write", self.url())
    }

    /// Its log (stdout and stderr of every start), for failure messages.
    pub fn log(&self) -> String {
        self.process.log_text()
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// SIGKILL it (an outage; nothing flushed).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Start it again on the same storage and port (after [`Prometheus::kill`]); waits for
    /// `/-/ready` (the WAL replayed).
    #[track_caller]
    pub fn restart(&mut self) {
        self.process.kill();
        self.process.spawn();
    }

    /// `/api/v1/query` at `time` (unix seconds; now when `None`). An instant vector gives one
    /// sample per series; a range-vector selector (`m[5m]`) gives every raw sample stored.
    pub fn query(&self, promql: &str, time: Option<f64>) -> anyhow::Result<Vec<Series>> {
        let mut form = vec![("query", promql.to_owned())];
        if let Some(t) = time {
            form.push(("time", format!("{t:.3}")));
        }
        self.api("/api/v1/query", &form).and_then(|data| prometheus_result(&data))
    }

    /// `/api/v1/query_range` from `start` to `end` (unix seconds) every `step`.
    pub fn query_range(&self, promql: &str, start: f64, end: f64, step: Duration) -> anyhow::Result<Vec<Series>> {
        let form = [
            ("query", promql.to_owned()),
            ("start", format!("{start:.3}")),
            ("end", format!("{end:.3}")),
            ("step", format!("{}", step.as_secs_f64())),
        ];
        self.api("/api/v1/query_range", &form).and_then(|data| prometheus_result(&data))
    }

    /// `/api/v1/series` for the selector `matcher` between `start` and `end` (unix seconds).
    pub fn series(&self, matcher: &str, start: f64, end: f64) -> anyhow::Result<Vec<BTreeMap<String, String>>> {
        let form = [("match[]", matcher.to_owned()), ("start", format!("{start:.3}")), ("end", format!("{end:.3}"))];
        let data = self.api("/api/v1/series", &form)?;
        let list = data.as_array().context("series: `data` is not a list")?;
        list.iter().map(labels_of).collect()
    }

    /// Every raw sample stored of the series `matcher` selects within the last `window`
    /// (a range-vector selector evaluated now): `(ts ms, value)` exactly as stored.
    pub fn raw_samples(&self, matcher: &str, window: Duration) -> anyhow::Result<Vec<Series>> {
        self.query(&format!("{matcher}[{}s]", window.as_secs().max(1)), None)
    }

    /// POST `form` to an API path; the `data` of a `"status": "success"` answer.
    fn api(&self, path: &str, form: &[(&str, String)]) -> anyhow::Result<Value> {
        let body = form_encode(form);
        let (status, answer) = http_request(
            "POST",
            self.process.addr,
            path,
            Some(("application/x-www-form-urlencoded", body.as_bytes())),
        )?;
        let v: Value = serde_json::from_slice(&answer)
            .with_context(|| format!("{path}: HTTP {status}, not JSON: {}", String::from_utf8_lossy(&answer)))?;
        if status != 200 || v["status"] != "success" {
            bail!("{path} {form:?}: HTTP {status}: {} {}", v["errorType"], v["error"]);
        }
        Ok(v["data"].clone())
    }
}

/// The series of a query's `data` (`vector` or `matrix`; a `scalar` is one series without labels).
fn prometheus_result(data: &Value) -> anyhow::Result<Vec<Series>> {
    let pair = |p: &Value| -> anyhow::Result<(i64, f64)> {
        let t = p[0].as_f64().with_context(|| format!("timestamp of {p}"))?;
        let v = p[1].as_str().with_context(|| format!("value of {p}"))?;
        Ok(((t * 1000.0).round() as i64, parse_prom_float(v)?))
    };
    match data["resultType"].as_str() {
        Some("vector") | Some("matrix") => {
            let list = data["result"].as_array().context("`result` is not a list")?;
            list.iter()
                .map(|s| {
                    let labels = labels_of(&s["metric"])?;
                    let samples = match (s.get("value"), s.get("values")) {
                        (Some(p), _) => vec![pair(p)?],
                        (None, Some(Value::Array(ps))) => ps.iter().map(pair).collect::<anyhow::Result<_>>()?,
                        _ => bail!("a result without value(s): {s}"),
                    };
                    Ok(Series { labels, samples })
                })
                .collect()
        }
        Some("scalar") => Ok(vec![Series { labels: BTreeMap::new(), samples: vec![pair(&data["result"])?] }]),
        other => bail!("unexpected resultType {other:?}: {data}"),
    }
}

/// Prometheus writes values as Go's `strconv.FormatFloat(v, 'f', -1, 64)` (exact round trip)
/// plus `NaN`, `+Inf`, `-Inf`.
fn parse_prom_float(s: &str) -> anyhow::Result<f64> {
    match s {
        "NaN" => Ok(f64::NAN),
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ => s.parse().with_context(|| format!("value {s:?}")),
    }
}

fn labels_of(v: &Value) -> anyhow::Result<BTreeMap<String, String>> {
    let obj = v.as_object().with_context(|| format!("labels are not an object: {v}"))?;
    obj.iter()
        .map(|(k, v)| Ok((k.clone(), v.as_str().with_context(|| format!("label {k}: {v}"))?.to_owned())))
        .collect()
}

/// A VictoriaMetrics single node, its storage in `DIR/victoria-metrics`, on a free loopback
/// port. Killed when dropped.
#[derive(Debug)]
pub struct VictoriaMetrics {
    process: DbProcess,
}

impl VictoriaMetrics {
    /// Start one; waits for `/health`.
    #[track_caller]
    pub fn start(dir: &Path) -> Self {
        let bin = require_binary("/usr/bin/victoria-metrics", "victoria-metrics");
        let home = dir.join("victoria-metrics");
        std::fs::create_dir_all(home.join("data")).unwrap_or_else(|e| panic!("creating {}: {e}", home.display()));
        let addr = free_loopback_addr();
        let args = vec![
            format!("-storageDataPath={}", home.join("data").display()),
            format!("-httpListenAddr={addr}"),
            "-retentionPeriod=1".to_owned(),
            // The export must show what was written a moment ago.
            "-search.latencyOffset=0s".to_owned(),
            "-search.disableCache".to_owned(),
        ];
        let mut process = DbProcess {
            what: "victoria-metrics",
            bin,
            args,
            addr,
            log: home.join("victoria-metrics.log"),
            ready_path: "/health",
            child: None,
            starts: 0,
        };
        process.spawn();
        Self { process }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.process.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.process.addr
    }

    /// The remote-write endpoint for the agent's `remote_write[].url`.
    pub fn remote_write_url(&self) -> String {
        format!("{}/api/v1/write", self.url())
    }

    /// Its log (every start), for failure messages.
    pub fn log(&self) -> String {
        self.process.log_text()
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// SIGKILL it (an outage; what was only in memory is lost, as in a real crash).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Start it again on the same storage and port; waits for `/health`.
    #[track_caller]
    pub fn restart(&mut self) {
        self.process.kill();
        self.process.spawn();
    }

    /// Write the Prometheus text format (`/api/v1/import/prometheus`); samples without a
    /// timestamp get the time of the import.
    pub fn import_prometheus(&self, text: &str) -> anyhow::Result<()> {
        let (status, body) = http_request(
            "POST",
            self.process.addr,
            "/api/v1/import/prometheus",
            Some(("text/plain", text.as_bytes())),
        )?;
        if !(200..300).contains(&status) {
            bail!("import: HTTP {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(())
    }

    /// Make what was written searchable now (`/internal/force_flush`).
    pub fn flush(&self) -> anyhow::Result<()> {
        let (status, body) = http_request("GET", self.process.addr, "/internal/force_flush", None)?;
        if status != 200 {
            bail!("force_flush: HTTP {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(())
    }

    /// `/api/v1/export` of the series `matcher` selects (every raw sample since `start`,
    /// unix seconds), after a flush. Series sorted by labels.
    pub fn export(&self, matcher: &str, start: f64) -> anyhow::Result<Vec<Series>> {
        self.flush()?;
        let body = form_encode(&[("match[]", matcher.to_owned()), ("start", format!("{start:.3}"))]);
        let (status, answer) = http_request(
            "POST",
            self.process.addr,
            "/api/v1/export",
            Some(("application/x-www-form-urlencoded", body.as_bytes())),
        )?;
        let text = String::from_utf8_lossy(&answer);
        if status != 200 {
            bail!("export {matcher}: HTTP {status}: {text}");
        }
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).with_context(|| format!("export line {line}"))?;
            let labels = labels_of(&v["metric"])?;
            let ts = v["timestamps"].as_array().context("timestamps")?;
            let vals = v["values"].as_array().context("values")?;
            if ts.len() != vals.len() {
                bail!("export line with {} timestamps and {} values: {line}", ts.len(), vals.len());
            }
            let mut samples: Vec<(i64, f64)> = ts
                .iter()
                .zip(vals)
                .map(|(t, v)| {
                    let t = t.as_i64().with_context(|| format!("timestamp {t}"))?;
                    let v = match v {
                        Value::Number(n) => n.as_f64().context("value")?,
                        Value::String(s) => parse_prom_float(s)?,
                        // A stale marker (Prometheus's StaleNaN) is exported as null.
                        Value::Null => f64::from_bits(STALE_NAN_BITS),
                        other => bail!("value {other}"),
                    };
                    Ok((t, v))
                })
                .collect::<anyhow::Result<_>>()?;
            samples.sort_by_key(|s| s.0);
            out.push(Series { labels, samples });
        }
        // One series may come back in several lines (one per internal block): merge them.
        out.sort_by(|a, b| a.labels.cmp(&b.labels));
        let mut merged: Vec<Series> = Vec::new();
        for s in out {
            match merged.last_mut() {
                Some(last) if last.labels == s.labels => {
                    last.samples.extend(s.samples);
                    last.samples.sort_by_key(|p| p.0);
                }
                _ => merged.push(s),
            }
        }
        Ok(merged)
    }
}

/// `application/x-www-form-urlencoded`.
pub fn form_encode(pairs: &[(&str, String)]) -> String {
    pairs.iter().map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v))).collect::<Vec<_>>().join("&")
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One HTTP/1.0 request to `addr` (no keep-alive, no chunked answer): `(status, body)`.
pub fn http_request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    body: Option<(&str, &[u8])>,
) -> anyhow::Result<(u16, Vec<u8>)> {
    http_request_with_headers(method, addr, path, &[], body)
}

/// [`http_request`] with extra request headers.
pub fn http_request_with_headers(
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, &[u8])>,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: dcmon-tests\r\n").into_bytes();
    for (k, v) in headers {
        req.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    if let Some((content_type, data)) = body {
        req.extend_from_slice(format!("Content-Type: {content_type}\r\nContent-Length: {}\r\n", data.len()).as_bytes());
        req.extend_from_slice(b"\r\n");
        req.extend_from_slice(data);
    } else {
        req.extend_from_slice(b"\r\n");
    }
    stream.write_all(&req)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").context("an HTTP answer without a header end")?;
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("status line of {head:?}"))?;
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        bail!("a chunked answer to an HTTP/1.0 request: {head}");
    }
    Ok((status, answer[split + 4..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding_escapes_promql() {
        assert_eq!(
            form_encode(&[("query", "rate(x{a=\"b c\"}[1m])".to_owned())]),
            "query=rate%28x%7Ba%3D%22b%20c%22%7D%5B1m%5D%29"
        );
    }

    #[test]
    fn prometheus_results_parse_exactly() {
        let data = serde_json::json!({"resultType": "matrix", "result": [
            {"metric": {"__name__": "m", "a": "b"}, "values": [[1700000000.5, "0.1"], [1700000001, "+Inf"]]}]});
        let s = prometheus_result(&data).expect("parse");
        assert_eq!(s[0].name(), "m");
        assert_eq!(s[0].samples[0], (1_700_000_000_500, 0.1));
        assert_eq!(s[0].samples[1], (1_700_000_001_000, f64::INFINITY));
        assert!(prometheus_result(&serde_json::json!({"resultType": "string"})).is_err());
    }
}
