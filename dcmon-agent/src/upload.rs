//! The HTTP client that posts batches to `POST {server_url}/api/metrics`.
//!
//! Answers are classified by [`classify_answer`], a pure function of the status, headers and
//! body, into a [`Verdict`] for the delivery loop: retry later (network error, timeout, 3xx, 5xx
//! and every 4xx not named below, with the server's Retry-After on 429 and 503), not authorised
//! (401/403: keep the batches), or rejected for good (only 400, 413 and 422). Everything read
//! from the server is untrusted: only a short, sanitized excerpt of a body ever reaches the log.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};
use tokio::net::TcpStream;

use crate::api_key::ApiKey;

/// How many bytes of an error body are kept for the log.
const BODY_EXCERPT_BYTES: usize = 200;

/// How many bytes of a server's answer are read; the rest is untrusted and of no use.
const ANSWER_BODY_CAP: usize = 64 * 1024;

/// The most bytes a `ca_file` may hold (a distribution's whole bundle is about 200 KiB).
const MAX_CA_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// The `ca_file` config key: a PEM bundle of CA certificates trusted for `https://` servers
/// in addition to the webpki roots (an internal CA). Deserialized from its path alone;
/// [`CaFile::load`] reads it, so parsing a config touches no other file.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(from = "PathBuf")]
pub struct CaFile {
    path: PathBuf,
    /// The DER of each certificate once read (never empty then); empty before.
    certificates: Vec<Vec<u8>>,
}

impl From<PathBuf> for CaFile {
    fn from(path: PathBuf) -> Self {
        Self { path, certificates: Vec::new() }
    }
}

impl std::fmt::Debug for CaFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaFile").field("path", &self.path).field("certificates", &self.certificates.len()).finish()
    }
}

impl CaFile {
    /// The bundle's path, as configured.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read and check the bundle: a regular file holding one or more PEM certificates that
    /// rustls can use as trust anchors. The error names the file and what was expected. A
    /// FIFO or device is refused at once; a file on a hung filesystem can still block.
    pub fn load(&mut self) -> Result<(), String> {
        if self.path.as_os_str().is_empty() {
            return Err("the path is empty: give a PEM bundle's path, or remove the key".to_owned());
        }
        self.certificates = read_ca_bundle(&self.path).map_err(|why| format!("{}: {why}", self.path.display()))?;
        Ok(())
    }

    /// The certificates for reqwest, reading the file first when [`CaFile::load`] has not.
    fn reqwest_certificates(&self) -> Result<Vec<reqwest::Certificate>, String> {
        let mut loaded = std::borrow::Cow::Borrowed(self);
        if self.certificates.is_empty() {
            loaded.to_mut().load()?;
        }
        loaded
            .certificates
            .iter()
            .map(|der| {
                reqwest::Certificate::from_der(der).map_err(|e| format!("{}: {}", self.path.display(), error_chain(&e)))
            })
            .collect()
    }
}

/// The DER of each certificate in the PEM bundle at `path`, each checked as a trust anchor.
fn read_ca_bundle(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let (bytes, _) = crate::secure_file::read(path, MAX_CA_FILE_BYTES).map_err(|e| e.to_string())?;
    let mut certificates = Vec::new();
    for (n, item) in CertificateDer::pem_slice_iter(&bytes).enumerate() {
        let n = n + 1;
        let der = item.map_err(|e| format!("certificate {n} is not valid PEM: {e}"))?;
        rustls::RootCertStore::empty()
            .add(der.clone())
            .map_err(|e| format!("certificate {n} is not an X.509 certificate usable as a CA: {e}"))?;
        certificates.push(der.to_vec());
    }
    if certificates.is_empty() {
        return Err("holds no certificate: expected a PEM bundle of one or more \
                    -----BEGIN CERTIFICATE----- blocks"
            .to_owned());
    }
    Ok(certificates)
}

/// A reqwest client builder for the dcmon server: rustls with the webpki roots and, with
/// `ca`, its certificates too. Every client that talks to the server starts here.
pub fn client_builder(ca: Option<&CaFile>) -> anyhow::Result<reqwest::ClientBuilder> {
    let mut builder = reqwest::Client::builder();
    for certificate in ca.map(CaFile::reqwest_certificates).transpose().map_err(anyhow::Error::msg)?.unwrap_or_default()
    {
        builder = builder.add_root_certificate(certificate);
    }
    Ok(builder)
}

/// The reason for an unreachable server, with a hint when its certificate was not trusted.
fn with_tls_hint(reason: String) -> String {
    if reason.contains("invalid peer certificate") {
        format!("{reason} (the server's certificate is not signed by a trusted CA: for an internal CA, set ca_file)")
    } else {
        reason
    }
}

/// Posts batches to one server with one key. The URL and the headers are built once: a post
/// every second should not parse a URL and format a header each time.
///
/// Plain `http://` servers, with no proxy set in the environment, are posted to over one
/// kept-alive HTTP/1.1 connection driven by hyper directly ([`Direct`]). reqwest, built on the
/// same hyper, adds per-request layers (redirect policy re-parsing the URL, proxy matching,
/// header merging, connection pool) that about double the CPU time of a post (benches/upload.rs
/// measures both). `https://` servers and proxied ones go through reqwest, which brings rustls
/// (the webpki roots and `ca_file`) and the proxy rules.
#[derive(Debug)]
pub struct Uploader {
    transport: Transport,
    metrics_url: reqwest::Url,
    /// Authorization, Content-Type and User-Agent.
    headers: HeaderMap,
    total_timeout: Duration,
    /// The direct transport's upload timeout, one timer reset for each post. A timer made
    /// afresh for each post is earlier than anything the parked runtime waits for (the cadence
    /// is a timerfd), so registering it wakes the runtime's driver with an eventfd write; a
    /// timer pushed later each time does not.
    upload_timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

#[derive(Debug, Clone)]
enum Transport {
    Direct(Direct),
    Reqwest(reqwest::Client),
}

/// A clone starts with no connection and no timer of its own.
impl Clone for Uploader {
    fn clone(&self) -> Self {
        Self {
            transport: self.transport.clone(),
            metrics_url: self.metrics_url.clone(),
            headers: self.headers.clone(),
            total_timeout: self.total_timeout,
            upload_timer: None,
        }
    }
}

/// One HTTP/1.1 connection to a plain-HTTP server, opened on first use and after the server
/// closed it, kept alive between posts.
struct Direct {
    /// Host name or address to connect to (IPv6 without brackets) and port.
    host: String,
    port: u16,
    /// The request target, in origin form (`/api/metrics`, after any base path).
    target: hyper::Uri,
    /// The `Host` header: the URL's authority.
    host_header: HeaderValue,
    connect_timeout: Duration,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direct")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("connected", &self.sender.is_some())
            .finish_non_exhaustive()
    }
}

/// What the server answered, whichever transport carried it; [`classify_answer`] reads it.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// A plain-HTTP URL with no proxy to go through, or `None` for reqwest to handle.
fn direct_target(url: &reqwest::Url, connect_timeout: Duration) -> Option<Direct> {
    const PROXY_VARS: [&str; 4] = ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"];
    if url.scheme() != "http" || PROXY_VARS.iter().any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty())) {
        return None;
    }
    let host_in_url = url.host_str()?;
    let host = host_in_url.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = url.port_or_known_default()?;
    let target = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let authority = match url.port() {
        Some(p) => format!("{host_in_url}:{p}"),
        None => host_in_url.to_owned(),
    };
    Some(Direct {
        host,
        port,
        target: target.parse().ok()?,
        host_header: HeaderValue::from_str(&authority).ok()?,
        connect_timeout,
        sender: None,
    })
}

/// A clone has the same target and no connection.
impl Clone for Direct {
    fn clone(&self) -> Self {
        Self {
            host: self.host.clone(),
            port: self.port,
            target: self.target.clone(),
            host_header: self.host_header.clone(),
            connect_timeout: self.connect_timeout,
            sender: None,
        }
    }
}

impl Direct {
    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect((self.host.as_str(), self.port)))
            .await
            .map_err(|_| format!("connect timed out after {:?}", self.connect_timeout))?
            .map_err(|e| format!("connect: {e}"))?;
        // The request goes out in one write; Nagle would only delay it.
        stream.set_nodelay(true).map_err(|e| format!("TCP_NODELAY: {e}"))?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| error_chain(&e))?;
        // Drives the connection; ends when the server closes it or the sender is dropped.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection to the server ended: {}", error_chain(&e));
            }
        });
        Ok(sender)
    }

    /// One request and its answer. When a kept-alive connection turns out closed, the request
    /// is sent again on a new one, once: when it provably never left, and when the connection
    /// broke before any answer came (a server closes idle connections without notice, so a
    /// request can go out just as the close does; seen as a reset or an early end of stream).
    /// Sending again at once is what delivery would do after a backoff anyway, since a batch
    /// is resent until it is answered, so this adds no duplicate a later retry would not.
    async fn post(&mut self, headers: &HeaderMap, body: Bytes) -> Result<Answer, String> {
        loop {
            // Only a reused connection earns a second try: a failure on a fresh one is the
            // server's answer. After any failure `sender` is empty, so this loops at most twice.
            let (sender, reused) = match self.sender.take() {
                Some(s) if !s.is_closed() => (self.sender.insert(s), true),
                _ => {
                    let fresh = self.connect().await?;
                    (self.sender.insert(fresh), false)
                }
            };
            if let Err(e) = sender.ready().await {
                self.sender = None;
                if reused {
                    continue;
                }
                return Err(error_chain(&e));
            }
            let mut request = hyper::Request::new(Full::new(body.clone()));
            *request.method_mut() = hyper::Method::POST;
            *request.uri_mut() = self.target.clone();
            let request_headers = request.headers_mut();
            request_headers.clone_from(headers);
            request_headers.insert(hyper::header::HOST, self.host_header.clone());
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    let (body, complete) = read_capped(body).await;
                    if !complete {
                        // Part of the answer is unread or it broke off: drop the connection.
                        self.sender = None;
                    }
                    return Ok(Answer { status: parts.status, headers: parts.headers, body });
                }
                Err(mut e) => {
                    self.sender = None;
                    if reused && (e.take_message().is_some() || went_away_unanswered(e.error())) {
                        continue;
                    }
                    return Err(error_chain(e.error()));
                }
            }
        }
    }
}

/// Whether a request failed because its connection ended before any answer: an end of stream
/// where the answer should start, a reset, or a broken pipe. Timeouts and malformed answers
/// are not this.
fn went_away_unanswered(e: &hyper::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    e.is_incomplete_message()
        || std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|io| matches!(io.kind(), ConnectionReset | BrokenPipe | ConnectionAborted | UnexpectedEof))
}

/// The answer's body, at most [`ANSWER_BODY_CAP`] bytes of it, and whether it was read to its
/// end (only then may the connection carry another request).
async fn read_capped(mut body: hyper::body::Incoming) -> (Bytes, bool) {
    let mut out = Vec::new();
    loop {
        match body.frame().await {
            None => return (out.into(), true),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    let room = ANSWER_BODY_CAP - out.len();
                    out.extend_from_slice(&data[..data.len().min(room)]);
                    if data.len() > room {
                        return (out.into(), false);
                    }
                }
            }
            Some(Err(_)) => return (out.into(), false),
        }
    }
}

/// The part of the server's 2xx answer the agent reads.
#[derive(serde::Deserialize)]
struct Accepted {
    metrics_count: Option<u64>,
}

/// A batch the server accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// The 2xx status it answered with.
    pub status: StatusCode,
    /// How many metrics the server says it stored, when it says.
    pub metrics_count: Option<u64>,
}

/// `Authorization: Bearer <key>`, marked sensitive so it is never printed.
fn auth_header(key: &ApiKey) -> anyhow::Result<HeaderValue> {
    let mut v = HeaderValue::try_from(format!("Bearer {}", key.expose()))
        .map_err(|_| anyhow::anyhow!("the API key holds characters an HTTP header cannot carry"))?;
    v.set_sensitive(true);
    Ok(v)
}

/// A batch the server did not accept.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// No HTTP answer: DNS, connect, TLS, timeout, connection reset.
    #[error("cannot reach {url}: {reason}")]
    Unreachable {
        /// The URL posted to.
        url: String,
        /// The error chain, flattened.
        reason: String,
    },
    /// The server answered with a non-2xx status.
    #[error("server answered {status}{}: {excerpt}", hint(*status))]
    Status {
        /// The HTTP status.
        status: StatusCode,
        /// The start of the body, sanitized (the `detail` field when it is JSON).
        excerpt: String,
        /// How long the Retry-After header asks to wait, when there is a readable one.
        retry_after: Option<Duration>,
    },
    /// A status code HTTP does not have (outside 100..=999).
    #[error("server answered with status code {code}, which is not an HTTP status")]
    InvalidStatus {
        /// The code as received.
        code: u16,
    },
}

fn hint(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => " (the API key was refused: check the api_key_file)",
        403 => " (not authorised: missing key, machine id mismatch, or client disabled on the server)",
        404 | 405 => {
            " (no POST /api/metrics there: is the path in server_url right, and does it reach the dcmon server?)"
        }
        407 => {
            " (a proxy on the way wants authentication: give it in http_proxy/https_proxy as http://user:password@proxy:port)"
        }
        422 => " (the server rejected the batch format)",
        300..=399 => " (the server redirects: point server_url at where it redirects to)",
        _ => "",
    }
}

/// What to do with a batch after a failed send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Transient or a setting to fix (network, timeout, 3xx, 5xx, 4xx other than those below):
    /// back off and send it again.
    RetryLater {
        /// The server's Retry-After on 429 and 503, unbounded: the delivery loop bounds it.
        retry_after: Option<Duration>,
    },
    /// 401/403: the key or this client is not accepted; keep everything, retry slowly.
    NotAuthorized,
    /// 400, 413, 422: this batch will never be accepted.
    Rejected,
}

impl UploadError {
    /// How the delivery loop should treat this failure.
    pub fn verdict(&self) -> Verdict {
        match self {
            UploadError::Unreachable { .. } | UploadError::InvalidStatus { .. } => {
                Verdict::RetryLater { retry_after: None }
            }
            UploadError::Status { status, retry_after, .. } => match status.as_u16() {
                401 | 403 => Verdict::NotAuthorized,
                // Only these say something about the batch itself. Any other 4xx (404 from a
                // misrouting ingress, 407 from a proxy, 431, ...) is about the path to the
                // server and goes away when that is fixed: deleting batches for it loses data.
                400 | 413 | 422 => Verdict::Rejected,
                429 | 503 => Verdict::RetryLater { retry_after: *retry_after },
                _ => Verdict::RetryLater { retry_after: None },
            },
        }
    }
}

impl Uploader {
    /// A client for `server_base` (no trailing slash) with connect and total timeouts.
    /// `ca` adds its certificates to the roots trusted for an `https://` server.
    pub fn new(
        server_base: &str,
        key: ApiKey,
        connect_timeout: Duration,
        total_timeout: Duration,
        ca: Option<&CaFile>,
    ) -> anyhow::Result<Self> {
        let url = format!("{server_base}/api/metrics");
        let metrics_url =
            reqwest::Url::parse(&url).map_err(|e| anyhow::anyhow!("server_url gives {url}, not a valid URL: {e}"))?;
        let transport = match direct_target(&metrics_url, connect_timeout) {
            Some(direct) => Transport::Direct(direct),
            None => Transport::Reqwest(reqwest_client(ca, connect_timeout, total_timeout)?),
        };
        let mut headers = HeaderMap::with_capacity(4);
        headers.insert(reqwest::header::AUTHORIZATION, auth_header(&key)?);
        headers.insert(reqwest::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            reqwest::header::USER_AGENT,
            HeaderValue::from_static(concat!("dcmon-agent/", env!("CARGO_PKG_VERSION"))),
        );
        Ok(Self { transport, metrics_url, headers, total_timeout, upload_timer: None })
    }

    /// Post through reqwest even to a plain-HTTP server without a proxy: for the upload
    /// bench, which compares the two transports.
    #[doc(hidden)]
    pub fn with_reqwest_transport(mut self, connect_timeout: Duration) -> anyhow::Result<Self> {
        self.transport = Transport::Reqwest(reqwest_client(None, connect_timeout, self.total_timeout)?);
        Ok(self)
    }

    /// Use a new key from now on (the operator fixed the key file after a 401). A key that
    /// cannot be a header value is refused with the reason, and the old one kept.
    pub fn set_key(&mut self, key: &ApiKey) -> anyhow::Result<()> {
        self.headers.insert(reqwest::header::AUTHORIZATION, auth_header(key)?);
        Ok(())
    }

    /// The URL batches go to.
    pub fn metrics_url(&self) -> &str {
        self.metrics_url.as_str()
    }

    /// Post one JSON batch. Returns the server's status and the number of metrics it says it
    /// accepted, when it says.
    pub async fn send(&mut self, body: Bytes) -> Result<Delivered, UploadError> {
        let answer = match &mut self.transport {
            Transport::Direct(direct) => {
                let deadline = tokio::time::Instant::now() + self.total_timeout;
                let timer = self.upload_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                timer.as_mut().reset(deadline);
                tokio::select! {
                    biased;
                    answer = direct.post(&self.headers, body) => answer,
                    () = timer.as_mut() => {
                        // Half a request may be on the wire: never reuse this connection.
                        direct.sender = None;
                        Err(format!("no answer within {:?} (upload_timeout)", self.total_timeout))
                    }
                }
            }
            Transport::Reqwest(client) => {
                let mut request = reqwest::Request::new(reqwest::Method::POST, self.metrics_url.clone());
                *request.headers_mut() = self.headers.clone();
                *request.body_mut() = Some(body.into());
                reqwest_post(client, request).await.map_err(|e| match e.is_timeout() && !e.is_connect() {
                    // The same words as the direct transport's timeout.
                    true => format!("no answer within {:?} (upload_timeout)", self.total_timeout),
                    false => error_chain(&e),
                })
            }
        };
        let answer = answer.map_err(|reason| UploadError::Unreachable {
            url: self.metrics_url.to_string(),
            reason: with_tls_hint(reason),
        })?;
        classify_answer(answer.status.as_u16(), &answer.headers, &answer.body, SystemTime::now())
    }
}

/// One request through reqwest and its answer, the body read up to [`ANSWER_BODY_CAP`]. A
/// body that breaks off or stalls past the upload timeout is an error, as with the direct
/// transport: the answer is not whole.
async fn reqwest_post(client: &reqwest::Client, request: reqwest::Request) -> Result<Answer, reqwest::Error> {
    let mut resp = client.execute(request).await?;
    let (status, headers) = (resp.status(), std::mem::take(resp.headers_mut()));
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        body.extend_from_slice(&chunk[..chunk.len().min(ANSWER_BODY_CAP - body.len())]);
        if body.len() >= ANSWER_BODY_CAP {
            break;
        }
    }
    Ok(Answer { status, headers, body: body.into() })
}

/// The reqwest client for `https://` and proxied servers.
fn reqwest_client(
    ca: Option<&CaFile>,
    connect_timeout: Duration,
    total_timeout: Duration,
) -> anyhow::Result<reqwest::Client> {
    client_builder(ca)?
        .connect_timeout(connect_timeout)
        .timeout(total_timeout)
        // The batch is all the agent sends; one idle connection is all it needs.
        .pool_max_idle_per_host(1)
        // A redirected POST would be replayed as a GET; a redirect is a server_url to fix.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| anyhow::anyhow!("cannot build the HTTP client: {}", error_chain(&e)))
}

/// What the server's answer to a batch means, from its status code, headers and body alone:
/// `Ok` for a 2xx (with the count the server says it stored), else the failure, whose
/// [`UploadError::verdict`] says what to do with the batch (and how long the server asks to
/// wait) and whose `Display` is the text for the log. `now` is the clock an HTTP-date
/// Retry-After is measured from.
///
/// Pure and total: any status, any header bytes, any body give an answer, never a panic.
pub fn classify_answer(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> Result<Delivered, UploadError> {
    let Ok(status) = StatusCode::from_u16(status) else {
        return Err(UploadError::InvalidStatus { code: status });
    };
    if status.is_success() {
        let metrics_count = serde_json::from_slice::<Accepted>(body).ok().and_then(|a| a.metrics_count);
        return Ok(Delivered { status, metrics_count });
    }
    let location = headers.get(reqwest::header::LOCATION).filter(|_| status.is_redirection());
    let excerpt = match location {
        Some(to) => format!("Location: {}", excerpt(to.as_bytes())),
        None => excerpt(body),
    };
    let retry_after = headers.get(reqwest::header::RETRY_AFTER).and_then(|v| retry_after(v, now));
    Err(UploadError::Status { status, excerpt, retry_after })
}

/// A Retry-After value (RFC 9110 10.2.3) as a wait from `now`: delay-seconds, or an HTTP-date
/// in any of the three forms RFC 9110 says to accept (a date in the past is no wait). A
/// number too big for a u64 is "very long" ([`Duration::MAX`]); the delivery loop bounds it.
/// `None` when the value is neither.
fn retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return Some(text.parse::<u64>().map_or(Duration::MAX, Duration::from_secs));
    }
    let date = httpdate::parse_http_date(text).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `e` and its sources joined with ": " (reqwest's Display alone says only "error sending
/// request").
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// A log-safe excerpt of an untrusted body: the `detail` of a FastAPI error when there is one,
/// else the raw start; at most [`BODY_EXCERPT_BYTES`], control characters replaced.
pub fn excerpt(body: &[u8]) -> String {
    let detail = serde_json::from_slice::<serde_json::Value>(body).ok().and_then(|v| match v.get("detail") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
        None => None,
    });
    let text = detail.unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let mut out: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).take(BODY_EXCERPT_BYTES).collect();
    if text.chars().count() > BODY_EXCERPT_BYTES {
        out.push('…');
    }
    if out.trim().is_empty() { "(empty body)".to_owned() } else { out }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn excerpt_prefers_detail_and_sanitizes() {
        assert_eq!(excerpt(br#"{"detail": "Invalid API key"}"#), "Invalid API key");
        assert_eq!(excerpt(b"bad\x1b[31mgateway\n"), "bad [31mgateway ");
        assert_eq!(excerpt(b""), "(empty body)");
        let long = "x".repeat(1000);
        assert_eq!(excerpt(long.as_bytes()).chars().count(), BODY_EXCERPT_BYTES + 1);
        let v = excerpt(br#"{"detail": [{"loc": ["body"], "msg": "field required"}]}"#);
        assert!(v.contains("field required"), "{v}");
    }

    /// Last entry of a connection's answers that makes [`scripted_server`] wait 100 ms, read
    /// nothing, and close the connection (an idle close, after the client settled).
    const CLOSE_WHEN_IDLE: &str = "idle close";

    /// At the end of an answer: write what comes before it, then hold the connection until
    /// the client gives up (a body that stalls).
    const THEN_HOLD: &str = "\0hold";

    /// A plain-HTTP server for one test: for each connection it accepts in turn, it reads one
    /// request per answer in that connection's list and writes the answer, then closes the
    /// connection. An empty answer holds the connection unanswered until the client gives up;
    /// see [`CLOSE_WHEN_IDLE`] and [`THEN_HOLD`]. Returns its base URL and, when joined, each
    /// request as text with the connection's number in front.
    fn scripted_server(connections: Vec<Vec<String>>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        scripted_server_over(None, connections)
    }

    /// A stream the scripted server reads requests from and writes answers to.
    trait Duplex: std::io::Read + std::io::Write + Send {}
    impl<T: std::io::Read + std::io::Write + Send> Duplex for T {}

    /// [`scripted_server`] over TLS with `tls` (an `https://` base URL), or plain without. A
    /// connection whose read fails (a refused TLS handshake) ends, and the next is accepted.
    fn scripted_server_over(
        tls: Option<Arc<rustls::ServerConfig>>,
        connections: Vec<Vec<String>>,
    ) -> (String, std::thread::JoinHandle<Vec<String>>) {
        use std::io::{BufRead as _, BufReader, Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base = format!("{scheme}://{}", listener.local_addr().expect("addr"));
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for (n, answers) in connections.into_iter().enumerate() {
                let (tcp, _) = listener.accept().expect("accept");
                let stream: Box<dyn Duplex> = match &tls {
                    Some(config) => Box::new(rustls::StreamOwned::new(
                        rustls::ServerConnection::new(Arc::clone(config)).expect("TLS session"),
                        tcp,
                    )),
                    None => Box::new(tcp),
                };
                let mut reader = BufReader::new(stream);
                'answers: for answer in answers {
                    if answer == CLOSE_WHEN_IDLE {
                        std::thread::sleep(Duration::from_millis(100));
                        break;
                    }
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        match reader.read_line(&mut line) {
                            Ok(0) => return seen,
                            Ok(_) => {}
                            Err(_) => break 'answers,
                        }
                        head.push_str(&line);
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    let mut body = vec![0; len];
                    reader.read_exact(&mut body).expect("body");
                    seen.push(format!("{n} {head}{}", String::from_utf8_lossy(&body)));
                    let (to_write, hold) = match answer.strip_suffix(THEN_HOLD) {
                        Some(part) => (part, true),
                        None => (answer.as_str(), answer.is_empty()),
                    };
                    let writer = reader.get_mut();
                    let _ = writer.write_all(to_write.as_bytes()).and_then(|()| writer.flush());
                    if hold {
                        // Hold the connection until the client gives up.
                        let _ = reader.read(&mut [0; 1]);
                        break;
                    }
                }
            }
            seen
        });
        (base, handle)
    }

    /// A CA made for one test, its PEM, and a rustls server config with a certificate for
    /// 127.0.0.1 that it signed.
    struct TestCa {
        pem: String,
        server: Arc<rustls::ServerConfig>,
    }

    fn test_ca(name: &str) -> TestCa {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca = rcgen::CertificateParams::new(Vec::new()).expect("CA params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name.push(rcgen::DnType::CommonName, name);
        let pem = ca.self_signed(&ca_key).expect("CA certificate").pem();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().expect("server key");
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("server params");
        let certificate = params.signed_by(&key, &issuer).expect("server certificate");
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![certificate.der().clone()], key.into())
            .expect("server config");
        TestCa { pem, server: Arc::new(server) }
    }

    /// `pem` written to `ca.pem` in `dir`, loaded as the `ca_file` config key does.
    fn ca_file(dir: &Path, pem: &str) -> CaFile {
        let path = dir.join("ca.pem");
        std::fs::write(&path, pem).expect("write CA file");
        let mut ca = CaFile::from(path);
        ca.load().expect("a good CA file");
        ca
    }

    fn ok_answer() -> String {
        let body = r#"{"status":"ok","metrics_count":3}"#;
        format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len())
    }

    fn uploader(base: &str, total_timeout: Duration) -> Uploader {
        uploader_trusting(base, total_timeout, None)
    }

    /// An uploader for `base` that trusts `ca` too; plain http goes direct, https through reqwest.
    fn uploader_trusting(base: &str, total_timeout: Duration, ca: Option<&CaFile>) -> Uploader {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("api_key");
        std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").expect("write key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let (key, _) = crate::api_key::load(&path).expect("key");
        let u = Uploader::new(base, key, Duration::from_secs(2), total_timeout, ca).expect("uploader");
        assert_eq!(matches!(u.transport, Transport::Direct(_)), base.starts_with("http://"), "plain http goes direct");
        u
    }

    #[tokio::test(flavor = "current_thread")]
    async fn one_kept_alive_connection_replaced_when_the_server_closed_it() {
        let (base, server) = scripted_server(vec![vec![ok_answer(), ok_answer()], vec![ok_answer()]]);
        let mut u = uploader(&format!("{base}/dcmon"), Duration::from_secs(5));
        for i in 0..3 {
            let sent = u.send(Bytes::from(format!("{{\"n\":{i}}}"))).await;
            assert_eq!(sent.expect("accepted").metrics_count, Some(3), "post {i}");
        }
        let seen = server.join().expect("server");
        assert_eq!(seen.len(), 3, "{seen:?}");
        let connections: Vec<&str> = seen.iter().map(|r| &r[..1]).collect();
        assert_eq!(connections, ["0", "0", "1"], "two posts on the first connection, then a new one");
        let first = &seen[0];
        let port = base.rsplit(':').next().expect("port");
        assert!(first.starts_with("0 POST /dcmon/api/metrics HTTP/1.1\r\n"), "{first}");
        for header in [
            format!("host: 127.0.0.1:{port}\r\n"),
            "authorization: Bearer 0123456789abcdef0123456789abcdef\r\n".to_owned(),
            "content-type: application/json\r\n".to_owned(),
            "content-length: 7\r\n".to_owned(),
            format!("user-agent: dcmon-agent/{}\r\n", env!("CARGO_PKG_VERSION")),
        ] {
            assert!(first.contains(&header), "{header:?} missing in {first}");
        }
        assert!(first.ends_with("\r\n\r\n{\"n\":0}"), "{first}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_post_that_meets_the_servers_close_of_an_idle_connection_is_sent_again() {
        // The server answers on connection 0 and, once the client has settled, closes it
        // without notice, as servers do with idle kept-alive connections. The runtime is held
        // (a blocking sleep) while the close arrives, so the client has not seen it when the
        // next post goes out on that connection: the request meets the close (an end of stream
        // where the answer should be) and must go out again on a new connection at once.
        let (base, server) = scripted_server(vec![vec![ok_answer(), CLOSE_WHEN_IDLE.to_owned()], vec![ok_answer()]]);
        let mut u = uploader(&base, Duration::from_secs(5));
        assert_eq!(u.send(Bytes::from_static(b"{\"n\":0}")).await.expect("first post").metrics_count, Some(3));
        std::thread::sleep(Duration::from_millis(300));
        let second = u.send(Bytes::from_static(b"{\"n\":1}")).await.expect("second post, sent again");
        assert_eq!(second.metrics_count, Some(3));
        let seen = server.join().expect("server");
        let connections: Vec<&str> = seen.iter().map(|r| &r[..1]).collect();
        assert_eq!(connections, ["0", "1"], "{seen:?}");
        assert!(seen[1].ends_with("{\"n\":1}"), "{seen:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_server_that_never_answers_times_out_and_the_next_post_reconnects() {
        let (base, server) = scripted_server(vec![vec![String::new()], vec![ok_answer()]]);
        let mut u = uploader(&base, Duration::from_millis(300));
        let started = std::time::Instant::now();
        let e = u.send(Bytes::from_static(b"{}")).await.expect_err("no answer");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert!(e.to_string().contains("no answer within 300ms (upload_timeout)"), "{e}");
        assert_eq!(e.verdict(), Verdict::RetryLater { retry_after: None });
        let second = u.send(Bytes::from_static(b"{}")).await.expect("second post");
        assert_eq!((second.status, second.metrics_count), (StatusCode::OK, Some(3)));
        assert_eq!(server.join().expect("server").len(), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn status_retry_after_and_an_oversized_answer() {
        let big = "x".repeat(ANSWER_BODY_CAP * 4);
        let (base, server) = scripted_server(vec![
            vec!["HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-length: 0\r\n\r\n".to_owned()],
            vec![format!("HTTP/1.1 500 Internal Server Error\r\ncontent-length: {}\r\n\r\n{big}", big.len())],
        ]);
        let mut u = uploader(&base, Duration::from_secs(5));
        let e = u.send(Bytes::from_static(b"{}")).await.expect_err("429");
        assert_eq!(e.verdict(), Verdict::RetryLater { retry_after: Some(Duration::from_secs(7)) });
        // The server closed after the 429 without saying so; the post goes out on a new one.
        let e = u.send(Bytes::from_static(b"{}")).await.expect_err("500");
        match e {
            UploadError::Status { status, excerpt, .. } => {
                assert_eq!(status.as_u16(), 500);
                assert_eq!(excerpt, format!("{}…", "x".repeat(BODY_EXCERPT_BYTES)), "the start of the answer is kept");
            }
            other => panic!("{other}"),
        }
        drop(u);
        assert_eq!(server.join().expect("server").len(), 2);
    }

    /// Which URLs the direct transport takes. That proxies are used for real is the e2e tests'
    /// part (e2e_upload: `http_proxy` for plain http, a CONNECT proxy in `https_proxy`): the
    /// proxy variables are the process's, shared by every test here.
    #[test]
    fn https_goes_through_reqwest_and_plain_http_goes_direct() {
        let url = reqwest::Url::parse("https://example.com/api/metrics").expect("url");
        assert!(direct_target(&url, Duration::from_secs(1)).is_none());
        let url = reqwest::Url::parse("http://[::1]:8000/api/metrics").expect("url");
        let d = direct_target(&url, Duration::from_secs(1)).expect("direct");
        assert_eq!((d.host.as_str(), d.port), ("::1", 8000));
        assert_eq!(d.host_header, "[::1]:8000");
        assert_eq!(d.target, "/api/metrics");
    }

    fn answer(code: u16, headers: &[(&'static str, &str)], body: &[u8]) -> Result<Delivered, UploadError> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, HeaderValue::from_str(value).expect("header value"));
        }
        classify_answer(code, &map, body, SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
    }

    fn verdict(code: u16, headers: &[(&'static str, &str)]) -> Verdict {
        answer(code, headers, b"").expect_err("a failure").verdict()
    }

    #[test]
    fn verdicts() {
        let retry = |secs: Option<u64>| Verdict::RetryLater { retry_after: secs.map(Duration::from_secs) };
        assert_eq!(verdict(429, &[("retry-after", "7")]), retry(Some(7)));
        assert_eq!(verdict(503, &[("retry-after", " 7 ")]), retry(Some(7)));
        assert_eq!(verdict(500, &[("retry-after", "7")]), retry(None), "Retry-After only on 429/503");
        assert_eq!(verdict(401, &[]), Verdict::NotAuthorized);
        assert_eq!(verdict(403, &[]), Verdict::NotAuthorized);
        assert_eq!(verdict(301, &[]), retry(None), "redirects keep the batch");
        for code in [400, 413, 422] {
            assert_eq!(verdict(code, &[]), Verdict::Rejected, "{code}");
        }
        for code in [100, 204, 299] {
            assert!(answer(code, &[], b"").is_ok() == (200..300).contains(&code), "{code}");
        }
        let moved = answer(308, &[("location", "https://elsewhere/api/metrics")], b"").expect_err("308");
        assert!(moved.to_string().contains("point server_url at"), "{moved}");
        assert!(moved.to_string().contains("Location: https://elsewhere/api/metrics"), "{moved}");
        let accepted = answer(200, &[], br#"{"status":"accepted","metrics_count":12}"#).expect("200");
        assert_eq!(accepted, Delivered { status: StatusCode::OK, metrics_count: Some(12) });
    }

    /// Only 400, 413 and 422 say the batch itself can never be accepted; every other 4xx is
    /// about the way to the server, and setting batches aside for it deleted data.
    #[test]
    fn only_400_413_and_422_reject_a_batch_for_good() {
        for code in [402, 404, 405, 406, 407, 408, 409, 410, 411, 412, 414, 415, 418, 421, 425, 426, 428, 431, 451, 499]
        {
            assert_eq!(verdict(code, &[]), Verdict::RetryLater { retry_after: None }, "{code}");
        }
        let text = |code| answer(code, &[], br#"{"detail":"Not Found"}"#).expect_err("4xx").to_string();
        for code in [404, 405] {
            let t = text(code);
            assert!(t.contains("is the path in server_url right") && t.contains("Not Found"), "{t}");
        }
        assert!(text(407).contains("a proxy on the way wants authentication"), "{}", text(407));
    }

    #[test]
    fn retry_after_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let wait = |value: &str| retry_after(&HeaderValue::from_str(value).expect("value"), now);
        assert_eq!(wait("0"), Some(Duration::ZERO));
        assert_eq!(wait("120"), Some(Duration::from_secs(120)));
        assert_eq!(wait("18446744073709551615"), Some(Duration::from_secs(u64::MAX)));
        assert_eq!(wait("99999999999999999999999"), Some(Duration::MAX), "too big for u64 is very long");
        // 1_700_000_000 is Tue, 14 Nov 2023 22:13:20 GMT; each form, 100 s later.
        for date in ["Tue, 14 Nov 2023 22:15:00 GMT", "Tuesday, 14-Nov-23 22:15:00 GMT", "Tue Nov 14 22:15:00 2023"] {
            assert_eq!(wait(date), Some(Duration::from_secs(100)), "{date}");
        }
        assert_eq!(wait("Sun, 06 Nov 1994 08:49:37 GMT"), Some(Duration::ZERO), "a past date is now");
        for garbage in ["", "-1", "1.5", "soon", "Tue, 14 Nov 2023 25:15:00 GMT", "0x10", "+5"] {
            assert_eq!(wait(garbage), None, "{garbage:?}");
        }
        let not_text = HeaderValue::from_bytes(b"\xff\xfe").expect("opaque value");
        assert_eq!(retry_after(&not_text, now), None);
    }

    /// The classification takes anything a server (or a fuzzer) can send without panicking.
    #[test]
    fn classify_answer_takes_any_input() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for code in [0, 1, 99, 100, 199, 200, 302, 429, 503, 999, 1000, u16::MAX] {
            for _ in 0..200 {
                let len = usize::try_from(next() % 64).expect("small");
                let bytes: Vec<u8> = (0..len).map(|_| (next() % 256) as u8).collect();
                let mut headers = HeaderMap::new();
                if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                    headers.insert(reqwest::header::RETRY_AFTER, v.clone());
                    headers.insert(reqwest::header::LOCATION, v);
                }
                let outcome = classify_answer(code, &headers, &bytes, now);
                if let Err(e) = outcome {
                    let _ = (e.verdict(), e.to_string());
                }
            }
        }
        let e = classify_answer(1000, &HeaderMap::new(), b"", now).expect_err("no such status");
        assert_eq!(e.verdict(), Verdict::RetryLater { retry_after: None });
        assert!(e.to_string().contains("status code 1000"), "{e}");
    }

    /// An HTTP-date Retry-After over real HTTP: the wait is measured from now.
    #[tokio::test(flavor = "current_thread")]
    async fn an_http_date_retry_after_over_http() {
        let (base, server) = scripted_server(vec![
            vec!["HTTP/1.1 503 Service Unavailable\r\nretry-after: Fri, 01 Jan 2100 00:00:00 GMT\r\ncontent-length: 0\r\n\r\n".to_owned()],
            vec!["HTTP/1.1 429 Too Many Requests\r\nretry-after: Sun, 06 Nov 1994 08:49:37 GMT\r\ncontent-length: 0\r\n\r\n".to_owned()],
        ]);
        let mut u = uploader(&base, Duration::from_secs(5));
        let e = u.send(Bytes::from_static(b"{}")).await.expect_err("503");
        let Verdict::RetryLater { retry_after: Some(wait) } = e.verdict() else { panic!("{e}: {:?}", e.verdict()) };
        assert!(wait > Duration::from_secs(70 * 365 * 86400), "{wait:?}");
        let e = u.send(Bytes::from_static(b"{}")).await.expect_err("429");
        assert_eq!(e.verdict(), Verdict::RetryLater { retry_after: Some(Duration::ZERO) });
        drop(u);
        assert_eq!(server.join().expect("server").len(), 2);
    }

    /// An answer with `status`, `headers` (each ending in CRLF) and `body`, after which the
    /// server closes the connection and says so.
    fn closing_answer(status: u16, headers: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status} Answer\r\n{headers}connection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    /// Every kind of answer gets the same verdict over plain http (the direct transport) and
    /// over https (reqwest, trusting a CA made for the test through `ca_file`).
    #[tokio::test(flavor = "current_thread")]
    async fn every_answer_is_classified_alike_over_http_and_https() {
        let retry = |secs: Option<u64>| Err(Verdict::RetryLater { retry_after: secs.map(Duration::from_secs) });
        // Status, headers, body, and the metrics count or the verdict.
        type Case = (u16, &'static str, &'static str, Result<Option<u64>, Verdict>);
        let cases: [Case; 13] = [
            (200, "", r#"{"status":"ok","metrics_count":3}"#, Ok(Some(3))),
            (202, "", "", Ok(None)),
            (400, "", r#"{"detail":"bad batch"}"#, Err(Verdict::Rejected)),
            (413, "", "", Err(Verdict::Rejected)),
            (422, "", r#"{"detail":[{"msg":"field required"}]}"#, Err(Verdict::Rejected)),
            (401, "", r#"{"detail":"Invalid API key"}"#, Err(Verdict::NotAuthorized)),
            (403, "", "", Err(Verdict::NotAuthorized)),
            (429, "retry-after: 7\r\n", "", retry(Some(7))),
            (503, "retry-after: 120\r\n", "", retry(Some(120))),
            (500, "", "boom", retry(None)),
            (502, "retry-after: 7\r\n", "", retry(None)),
            (404, "", r#"{"detail":"Not Found"}"#, retry(None)),
            (301, "location: http://elsewhere/\r\n", "", retry(None)),
        ];
        let ca = test_ca("dcmon test CA");
        let dir = tempfile::tempdir().expect("tempdir");
        let trusted = ca_file(dir.path(), &ca.pem);
        for tls in [None, Some(Arc::clone(&ca.server))] {
            let connections =
                cases.iter().map(|(status, headers, body, _)| vec![closing_answer(*status, headers, body)]);
            let (base, server) = scripted_server_over(tls, connections.collect());
            let mut u = uploader_trusting(&base, Duration::from_secs(5), Some(&trusted));
            for (status, _, _, want) in &cases {
                let got = u.send(Bytes::from_static(b"{}")).await;
                let text = got.as_ref().map_or_else(ToString::to_string, |_| String::new());
                assert_eq!(got.map(|d| d.metrics_count).map_err(|e| e.verdict()), *want, "{base}: {status} {text}");
                if *status == 401 {
                    assert!(text.contains("Invalid API key") && text.contains("API key was refused"), "{text}");
                }
            }
            drop(u);
            assert_eq!(server.join().expect("server").len(), cases.len(), "{base}");
        }
    }

    /// No answer at all and an answer whose body stalls both end at the upload timeout, with
    /// the same words over http and https; the next post goes out on a new connection.
    #[tokio::test(flavor = "current_thread")]
    async fn no_answer_and_a_stalled_body_time_out_over_http_and_https() {
        let ca = test_ca("dcmon test CA");
        let dir = tempfile::tempdir().expect("tempdir");
        let trusted = ca_file(dir.path(), &ca.pem);
        let stalled = format!("HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{{\"status\"{THEN_HOLD}");
        for tls in [None, Some(Arc::clone(&ca.server))] {
            let (base, server) =
                scripted_server_over(tls, vec![vec![String::new()], vec![stalled.clone()], vec![ok_answer()]]);
            let mut u = uploader_trusting(&base, Duration::from_secs(1), Some(&trusted));
            for case in ["no answer", "stalled body"] {
                let started = std::time::Instant::now();
                let e = u.send(Bytes::from_static(b"{}")).await.expect_err(case);
                assert!(started.elapsed() < Duration::from_secs(5), "{base} {case}: {:?}", started.elapsed());
                assert!(e.to_string().contains("no answer within 1s (upload_timeout)"), "{base} {case}: {e}");
                assert_eq!(e.verdict(), Verdict::RetryLater { retry_after: None }, "{base} {case}");
            }
            let third = u.send(Bytes::from_static(b"{}")).await.expect("third post");
            assert_eq!(third.metrics_count, Some(3), "{base}");
            drop(u);
            assert_eq!(server.join().expect("server").len(), 3, "{base}");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn connection_refused_over_http_and_https() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        for scheme in ["http", "https"] {
            let mut u = uploader(&format!("{scheme}://127.0.0.1:{port}"), Duration::from_secs(5));
            let e = u.send(Bytes::from_static(b"{}")).await.expect_err("refused");
            let text = e.to_string();
            assert!(text.contains(&format!("cannot reach {scheme}://127.0.0.1:{port}/api/metrics")), "{text}");
            assert!(text.contains("Connection refused"), "{text}");
            assert_eq!(e.verdict(), Verdict::RetryLater { retry_after: None });
        }
    }

    /// A server whose certificate no trusted CA signed is refused, saying so and what to set;
    /// trusting its CA through `ca_file` is what makes it reachable.
    #[tokio::test(flavor = "current_thread")]
    async fn a_server_signed_by_an_untrusted_ca_is_refused_with_a_clear_error() {
        let server_ca = test_ca("the server's CA");
        let dir = tempfile::tempdir().expect("tempdir");
        let other = ca_file(dir.path(), &test_ca("another CA").pem);
        let (base, server) =
            scripted_server_over(Some(server_ca.server), vec![vec![ok_answer()], vec![ok_answer()], vec![ok_answer()]]);
        for ca in [None, Some(&other)] {
            let mut u = uploader_trusting(&base, Duration::from_secs(5), ca);
            let e = u.send(Bytes::from_static(b"{}")).await.expect_err("untrusted");
            let text = e.to_string();
            assert!(text.contains("invalid peer certificate: UnknownIssuer"), "{text}");
            assert!(text.contains("not signed by a trusted CA: for an internal CA, set ca_file"), "{text}");
            assert_eq!(e.verdict(), Verdict::RetryLater { retry_after: None });
        }
        let trusted = ca_file(dir.path(), &server_ca.pem);
        let mut u = uploader_trusting(&base, Duration::from_secs(5), Some(&trusted));
        assert_eq!(u.send(Bytes::from_static(b"{}")).await.expect("trusted").metrics_count, Some(3));
        drop(u);
        assert_eq!(server.join().expect("server").len(), 1, "only the trusted post got through");
    }

    /// `ca_file` is read when the config is loaded (so `run` and `check` stop on it); a file
    /// that is missing, not a file, empty or not a PEM bundle is an error naming the file and
    /// saying what was expected.
    #[test]
    fn a_bad_ca_file_is_a_config_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_path = dir.path().join("ca.pem");
        let config_path = dir.path().join("config.json");
        let config = serde_json::json!({"server_url": "https://dcmon.example", "ca_file": ca_path});
        std::fs::write(&config_path, config.to_string()).expect("write config");
        let load_error = || {
            crate::config::Config::load(&config_path, true, &crate::collector::schema())
                .expect_err("a bad ca_file")
                .to_string()
        };
        let prefix = format!("config {}: field `ca_file`: {}: ", config_path.display(), ca_path.display());

        let e = load_error();
        assert!(e.starts_with(&prefix) && e.contains("cannot read: No such file or directory"), "{e}");
        let empty_path = serde_json::json!({"ca_file": ""});
        std::fs::write(&config_path, empty_path.to_string()).expect("write config");
        let e = load_error();
        assert!(e.ends_with("field `ca_file`: the path is empty: give a PEM bundle's path, or remove the key"), "{e}");
        std::fs::write(&config_path, config.to_string()).expect("write config");
        std::fs::create_dir(&ca_path).expect("mkdir");
        let e = load_error();
        assert!(e.starts_with(&prefix) && e.ends_with("is a directory, expected a regular file"), "{e}");
        std::fs::remove_dir(&ca_path).expect("rmdir");

        let ca = test_ca("dcmon test CA");
        let der = rustls::pki_types::CertificateDer::from_pem_slice(ca.pem.as_bytes()).expect("PEM");
        use rustls::pki_types::pem::PemObject as _;
        let no_certificate =
            "holds no certificate: expected a PEM bundle of one or more -----BEGIN CERTIFICATE----- blocks";
        for (what, bytes) in [
            ("empty", Vec::new()),
            ("DER, not PEM", der.to_vec()),
            ("a key, not a certificate", rcgen::KeyPair::generate().expect("key").serialize_pem().into_bytes()),
            ("text", b"not a certificate\n".to_vec()),
        ] {
            std::fs::write(&ca_path, bytes).expect("write CA file");
            let e = load_error();
            assert_eq!(e, format!("{prefix}{no_certificate}"), "{what}");
        }
        let broken = format!("{}-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n", ca.pem);
        std::fs::write(&ca_path, broken).expect("write CA file");
        let e = load_error();
        assert!(e.starts_with(&format!("{prefix}certificate 2 is not valid PEM")), "{e}");
        let not_x509 = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        std::fs::write(&ca_path, not_x509).expect("write CA file");
        let e = load_error();
        assert!(e.starts_with(&format!("{prefix}certificate 1 is not an X.509 certificate usable as a CA")), "{e}");

        std::fs::write(&ca_path, format!("{}{}", ca.pem, test_ca("a second CA").pem)).expect("write CA file");
        let loaded =
            crate::config::Config::load(&config_path, true, &crate::collector::schema()).expect("a good bundle").config;
        let ca = loaded.ca_file.expect("ca_file");
        assert_eq!((ca.path(), ca.certificates.len()), (ca_path.as_path(), 2));
    }
}
