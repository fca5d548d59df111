//! The HTTP client that posts batches to `POST {server_url}/api/metrics`.
//!
//! Failures are classified ([`Verdict`]) for the delivery loop: retry later (network error,
//! timeout, 408, 429, 5xx), not authorised (401/403: keep the batches), or rejected for good
//! (other 4xx). Everything read from the server is untrusted:
//! only a short, sanitized excerpt of a body ever reaches the log.

use std::pin::Pin;
use std::time::Duration;

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

/// Posts batches to one server with one key. The URL and the headers are built once: a post
/// every second should not parse a URL and format a header each time.
///
/// Plain `http://` servers, with no proxy set in the environment, are posted to over one
/// kept-alive HTTP/1.1 connection driven by hyper directly ([`Direct`]). reqwest, built on the
/// same hyper, adds per-request layers (redirect policy re-parsing the URL, proxy matching,
/// header merging, connection pool) that cost about 0.1 ms of CPU per post on the bench VM,
/// more than collecting the batch. `https://` servers and proxied ones go through reqwest,
/// which brings rustls and the proxy rules.
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

/// What the server answered, whichever transport carried it.
struct Answer {
    status: StatusCode,
    retry_after_secs: Option<u64>,
    location: Option<String>,
    body: Bytes,
}

impl Answer {
    fn new(status: StatusCode, headers: &HeaderMap, body: Bytes) -> Self {
        let retry_after_secs = headers
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let location =
            headers.get(reqwest::header::LOCATION).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        Self { status, retry_after_secs, location, body }
    }
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
                    return Ok(Answer::new(parts.status, &parts.headers, body));
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
        /// Seconds from a Retry-After header, if any.
        retry_after_secs: Option<u64>,
    },
}

fn hint(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => " (the API key was refused: check the api_key_file)",
        403 => " (not authorised: missing key, machine id mismatch, or client disabled on the server)",
        422 => " (the server rejected the batch format)",
        300..=399 => " (the server redirects: point server_url at where it redirects to)",
        _ => "",
    }
}

/// What to do with a batch after a failed send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Transient (network, timeout, 408, 429, 5xx): back off and send it again.
    RetryLater {
        /// The server's Retry-After, honoured on 429 and 503.
        retry_after: Option<Duration>,
    },
    /// 401/403: the key or this client is not accepted; keep everything, retry slowly.
    NotAuthorized,
    /// 400, 413, 422 and other 4xx: this batch will never be accepted.
    Rejected,
}

impl UploadError {
    /// How the delivery loop should treat this failure.
    pub fn verdict(&self) -> Verdict {
        match self {
            UploadError::Unreachable { .. } => Verdict::RetryLater { retry_after: None },
            UploadError::Status { status, retry_after_secs, .. } => match status.as_u16() {
                401 | 403 => Verdict::NotAuthorized,
                429 | 503 => Verdict::RetryLater { retry_after: retry_after_secs.map(Duration::from_secs) },
                // A redirect is a setting to fix, not a verdict on this batch: keep it.
                408 | 300..=399 => Verdict::RetryLater { retry_after: None },
                s if s >= 500 => Verdict::RetryLater { retry_after: None },
                _ => Verdict::Rejected,
            },
        }
    }
}

impl Uploader {
    /// A client for `server_base` (no trailing slash) with connect and total timeouts.
    pub fn new(
        server_base: &str,
        key: ApiKey,
        connect_timeout: Duration,
        total_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let url = format!("{server_base}/api/metrics");
        let metrics_url =
            reqwest::Url::parse(&url).map_err(|e| anyhow::anyhow!("server_url gives {url}, not a valid URL: {e}"))?;
        let transport = match direct_target(&metrics_url, connect_timeout) {
            Some(direct) => Transport::Direct(direct),
            None => Transport::Reqwest(
                reqwest::Client::builder()
                    .connect_timeout(connect_timeout)
                    .timeout(total_timeout)
                    // The batch is all the agent sends; one idle connection is all it needs.
                    .pool_max_idle_per_host(1)
                    // A redirected POST would be replayed as a GET; a redirect is a server_url to fix.
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .map_err(|e| anyhow::anyhow!("cannot build the HTTP client: {e}"))?,
            ),
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

    /// Post one JSON batch. Returns the number of metrics the server says it accepted, when
    /// it says.
    pub async fn send(&mut self, body: Bytes) -> Result<Option<u64>, UploadError> {
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
                match client.execute(request).await {
                    Ok(mut resp) => {
                        let (status, headers) = (resp.status(), std::mem::take(resp.headers_mut()));
                        let mut body = Vec::new();
                        while let Ok(Some(chunk)) = resp.chunk().await {
                            body.extend_from_slice(&chunk[..chunk.len().min(ANSWER_BODY_CAP - body.len())]);
                            if body.len() >= ANSWER_BODY_CAP {
                                break;
                            }
                        }
                        Ok(Answer::new(status, &headers, body.into()))
                    }
                    Err(e) => Err(error_chain(&e)),
                }
            }
        };
        let answer = answer.map_err(|reason| UploadError::Unreachable { url: self.metrics_url.to_string(), reason })?;
        if answer.status.is_success() {
            return Ok(serde_json::from_slice::<Accepted>(&answer.body).ok().and_then(|a| a.metrics_count));
        }
        let excerpt = match (answer.status.is_redirection(), answer.location) {
            (true, Some(to)) => format!("Location: {}", excerpt(to.as_bytes())),
            _ => excerpt(&answer.body),
        };
        Err(UploadError::Status { status: answer.status, excerpt, retry_after_secs: answer.retry_after_secs })
    }
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

    /// A plain-HTTP server for one test: for each connection it accepts in turn, it reads one
    /// request per answer in that connection's list and writes the answer, then closes the
    /// connection. An empty answer holds the connection unanswered until the client gives up;
    /// see [`CLOSE_WHEN_IDLE`]. Returns its base URL and, when joined, each request as text
    /// with the connection's number in front.
    fn scripted_server(connections: Vec<Vec<String>>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        use std::io::{BufRead as _, BufReader, Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for (n, answers) in connections.into_iter().enumerate() {
                let (stream, _) = listener.accept().expect("accept");
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut writer = stream;
                for answer in answers {
                    if answer == CLOSE_WHEN_IDLE {
                        std::thread::sleep(Duration::from_millis(100));
                        break;
                    }
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).expect("read") == 0 {
                            return seen;
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
                    if answer.is_empty() {
                        // Never answer: hold the connection until the client gives up.
                        let _ = reader.read(&mut [0; 1]);
                        break;
                    }
                    let _ = writer.write_all(answer.as_bytes());
                }
            }
            seen
        });
        (base, handle)
    }

    fn ok_answer() -> String {
        let body = r#"{"status":"ok","metrics_count":3}"#;
        format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len())
    }

    fn uploader(base: &str, total_timeout: Duration) -> Uploader {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("api_key");
        std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").expect("write key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let (key, _) = crate::api_key::load(&path).expect("key");
        let u = Uploader::new(base, key, Duration::from_secs(2), total_timeout).expect("uploader");
        assert!(matches!(u.transport, Transport::Direct(_)), "plain http goes direct");
        u
    }

    #[tokio::test(flavor = "current_thread")]
    async fn one_kept_alive_connection_replaced_when_the_server_closed_it() {
        let (base, server) = scripted_server(vec![vec![ok_answer(), ok_answer()], vec![ok_answer()]]);
        let mut u = uploader(&format!("{base}/dcmon"), Duration::from_secs(5));
        for i in 0..3 {
            let sent = u.send(Bytes::from(format!("{{\"n\":{i}}}"))).await;
            assert_eq!(sent.expect("accepted"), Some(3), "post {i}");
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
        assert_eq!(u.send(Bytes::from_static(b"{\"n\":0}")).await.expect("first post"), Some(3));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(u.send(Bytes::from_static(b"{\"n\":1}")).await.expect("second post, sent again"), Some(3));
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
        assert_eq!(u.send(Bytes::from_static(b"{}")).await.expect("second post"), Some(3));
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

    #[test]
    fn https_and_proxied_urls_go_through_reqwest() {
        let url = reqwest::Url::parse("https://example.com/api/metrics").expect("url");
        assert!(direct_target(&url, Duration::from_secs(1)).is_none());
        let url = reqwest::Url::parse("http://[::1]:8000/api/metrics").expect("url");
        let d = direct_target(&url, Duration::from_secs(1)).expect("direct");
        assert_eq!((d.host.as_str(), d.port), ("::1", 8000));
        assert_eq!(d.host_header, "[::1]:8000");
        assert_eq!(d.target, "/api/metrics");
    }

    #[test]
    fn verdicts() {
        let st = |code: u16, retry_after_secs| UploadError::Status {
            status: StatusCode::from_u16(code).expect("status"),
            excerpt: String::new(),
            retry_after_secs,
        };
        assert_eq!(st(429, Some(7)).verdict(), Verdict::RetryLater { retry_after: Some(Duration::from_secs(7)) });
        assert_eq!(
            st(500, Some(7)).verdict(),
            Verdict::RetryLater { retry_after: None },
            "Retry-After only on 429/503"
        );
        assert_eq!(st(401, None).verdict(), Verdict::NotAuthorized);
        assert_eq!(st(403, None).verdict(), Verdict::NotAuthorized);
        assert_eq!(st(301, None).verdict(), Verdict::RetryLater { retry_after: None }, "redirects keep the batch");
        assert!(st(308, None).to_string().contains("point server_url at"));
        for code in [400, 404, 413, 422] {
            assert_eq!(st(code, None).verdict(), Verdict::Rejected, "{code}");
        }
    }
}
