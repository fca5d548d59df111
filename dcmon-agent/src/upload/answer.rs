//! What the server answered and what it means: the answer, its classification, and the log-safe text.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};

use super::Delivered;

/// How many bytes of an error body are kept for the log.
pub(super) const BODY_EXCERPT_BYTES: usize = 200;

/// What the server answered, whichever transport carried it; [`classify_answer`] reads it.
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
}

/// The part of the server's 2xx answer the agent reads.
#[derive(serde::Deserialize)]
struct Accepted {
    metrics_count: Option<u64>,
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
pub(crate) fn retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
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
