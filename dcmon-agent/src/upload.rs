//! The HTTP client that posts batches to `POST {server_url}/api/metrics`.
//!
//! Failures are classified ([`Verdict`]) for the delivery loop: retry later (network error,
//! timeout, 408, 429, 5xx), not authorised (401/403: keep the batches), or rejected for good
//! (other 4xx). Everything read from the server is untrusted:
//! only a short, sanitized excerpt of a body ever reaches the log.

use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;

use crate::api_key::ApiKey;

/// How many bytes of an error body are kept for the log.
const BODY_EXCERPT_BYTES: usize = 200;

/// Posts batches to one server with one key. The URL and the headers are built once: a post
/// every second should not parse a URL and format a header each time.
#[derive(Debug, Clone)]
pub struct Uploader {
    client: reqwest::Client,
    metrics_url: reqwest::Url,
    headers: reqwest::header::HeaderMap,
}

/// The part of the server's 2xx answer the agent reads.
#[derive(serde::Deserialize)]
struct Accepted {
    metrics_count: Option<u64>,
}

/// `Authorization: Bearer <key>`, marked sensitive so it is never printed.
fn auth_header(key: &ApiKey) -> anyhow::Result<reqwest::header::HeaderValue> {
    let mut v = reqwest::header::HeaderValue::try_from(format!("Bearer {}", key.expose()))
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
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .timeout(total_timeout)
            .user_agent(concat!("dcmon-agent/", env!("CARGO_PKG_VERSION")))
            // The batch is all the agent sends; one idle connection is all it needs.
            .pool_max_idle_per_host(1)
            // A redirected POST would be replayed as a GET; a redirect is a server_url to fix.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the HTTP client: {e}"))?;
        let url = format!("{server_base}/api/metrics");
        let metrics_url =
            reqwest::Url::parse(&url).map_err(|e| anyhow::anyhow!("server_url gives {url}, not a valid URL: {e}"))?;
        let mut headers = reqwest::header::HeaderMap::with_capacity(2);
        headers.insert(reqwest::header::AUTHORIZATION, auth_header(&key)?);
        headers.insert(reqwest::header::CONTENT_TYPE, reqwest::header::HeaderValue::from_static("application/json"));
        Ok(Self { client, metrics_url, headers })
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
    pub async fn send(&self, body: Bytes) -> Result<Option<u64>, UploadError> {
        let mut request = reqwest::Request::new(reqwest::Method::POST, self.metrics_url.clone());
        *request.headers_mut() = self.headers.clone();
        *request.body_mut() = Some(body.into());
        let resp = self
            .client
            .execute(request)
            .await
            .map_err(|e| UploadError::Unreachable { url: self.metrics_url.to_string(), reason: error_chain(&e) })?;
        let status = resp.status();
        let retry_after_secs = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let location =
            resp.headers().get(reqwest::header::LOCATION).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let body = resp.bytes().await.unwrap_or_default();
        if status.is_success() {
            return Ok(serde_json::from_slice::<Accepted>(&body).ok().and_then(|a| a.metrics_count));
        }
        let excerpt = match (status.is_redirection(), location) {
            (true, Some(to)) => format!("Location: {}", excerpt(to.as_bytes())),
            _ => excerpt(&body),
        };
        Err(UploadError::Status { status, excerpt, retry_after_secs })
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
