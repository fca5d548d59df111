//! The HTTP client that posts batches to `POST {server_url}/api/metrics`.
//!
//! Answers are classified by [`classify_answer`], a pure function of the status, headers and
//! body, into a [`Verdict`] for the delivery loop: retry later (network error, timeout, 3xx, 5xx
//! and every 4xx not named below, with the server's Retry-After on 429 and 503), not authorised
//! (401/403: keep the batches), or rejected for good (only 400, 413 and 422). Everything read
//! from the server is untrusted: only a short, sanitized excerpt of a body ever reaches the log.

mod answer;
mod direct;
mod tls;

use std::pin::Pin;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};

pub use answer::{UploadError, Verdict, classify_answer, error_chain, excerpt};
pub use tls::{CaFile, client_builder};

use crate::api_key::ApiKey;
use answer::Answer;
pub(crate) use answer::retry_after;
use direct::{Direct, direct_target};
pub(crate) use tls::with_tls_hint;

/// How many bytes of a server's answer are read; the rest is untrusted and of no use.
pub(crate) const ANSWER_BODY_CAP: usize = 64 * 1024;

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

#[cfg(test)]
mod tests;
