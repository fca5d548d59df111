//! The HTTP side of one remote_write output: posts a stored batch as one or more
//! Remote-Write 1.0 requests and says what the receiver's answer means for the batch.
//!
//! Answers (the 1.0 spec, "Retries & Backoff"): 2xx is stored; 5xx and 429 are to be retried
//! (with the receiver's Retry-After when it gives one), as are network errors and timeouts;
//! every other 4xx will never be accepted (Prometheus answers 400 for samples out of order or
//! out of bounds after a long outage, 401/403 for credentials it refuses, 413 for a request too
//! large), so the batch is given up on and the receiver's words go to the log. A 1xx or 3xx
//! (redirects are not followed: a redirected POST becomes a GET) is retried, as a setting to fix.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::RemoteWriteConfig;
use super::credentials::Credentials;
use super::encode::{Encoded, StaleState, encode};
use crate::upload::{ANSWER_BODY_CAP, Verdict, client_builder, error_chain, excerpt, retry_after, with_tls_hint};

/// The protocol version header's value for Remote-Write 1.0.
pub const REMOTE_WRITE_VERSION: &str = "0.1.0";

/// Why a remote_write output cannot be set up: names the output and the config field.
/// Never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("remote_write output {output:?}: {field}: {reason}")]
pub struct RemoteWriteSetupError {
    /// The output's name ([`RemoteWriteConfig::output_name`]).
    pub output: String,
    /// The config field at fault, relative to the entry (`bearer_token_file`, `url`, ...).
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

/// A batch the receiver stored, all of its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteWriteSent {
    /// Requests posted for it in this call (parts already stored by an earlier, failed call
    /// are not posted again).
    pub requests: usize,
    /// Series in the batch, stale ones included.
    pub series: usize,
    /// Samples, stale markers included.
    pub samples: usize,
    /// Stale markers among them.
    pub stale_markers: usize,
    /// Metrics left out because Prometheus would refuse their names.
    pub dropped: usize,
    /// Bytes posted (snappy) in this call.
    pub bytes: usize,
    /// The status of the last request, `None` when the batch needed no request (nothing in it
    /// and nothing gone stale).
    pub status: Option<StatusCode>,
}

/// A batch not (wholly) stored. `Display` is the text for the log: it names the output and
/// holds no secret; what the receiver said is a bounded, sanitised excerpt.
#[derive(Debug, thiserror::Error)]
pub enum RemoteWriteError {
    /// No HTTP answer: DNS, connect, TLS, timeout, connection reset.
    #[error("remote_write output {output:?}: cannot reach {url}: {reason}")]
    Unreachable {
        /// The output's name.
        output: String,
        /// The URL without its query (which may carry a tenant or token).
        url: String,
        /// The error chain, flattened.
        reason: String,
    },
    /// The receiver answered a request with a non-2xx status.
    #[error("remote_write output {output:?}: receiver answered {status} to request {part} of {parts}{}: {excerpt}", hint(*status))]
    Status {
        /// The output's name.
        output: String,
        /// The HTTP status.
        status: StatusCode,
        /// The start of the body, sanitised.
        excerpt: String,
        /// How long Retry-After asks to wait (429 and 5xx), when readable.
        retry_after: Option<Duration>,
        /// Which request of the batch, from 1.
        part: usize,
        /// How many requests the batch takes.
        parts: usize,
    },
    /// A status code HTTP does not have.
    #[error("remote_write output {output:?}: receiver answered with status code {code}, which is not an HTTP status")]
    InvalidStatus {
        /// The output's name.
        output: String,
        /// The code as received.
        code: u16,
    },
    /// The stored batch cannot be encoded (a damaged outbox file): it never will be.
    #[error("remote_write output {output:?}: the stored batch cannot be sent: {reason}")]
    Batch {
        /// The output's name.
        output: String,
        /// Why.
        reason: String,
    },
}

fn hint(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => " (samples refused: out of order or out of bounds after an outage, or a label the receiver refuses)",
        401 | 403 => " (credentials refused: check bearer_token_file or basic_auth)",
        404 | 405 => " (no remote_write receiver at this URL: is the path right, is the receiver enabled?)",
        413 => " (request too large: lower max_request_bytes)",
        300..=399 => " (the receiver redirects: point url at where it redirects to)",
        _ => "",
    }
}

impl RemoteWriteError {
    /// How the delivery loop should treat the batch after this failure.
    pub fn verdict(&self) -> Verdict {
        match self {
            RemoteWriteError::Unreachable { .. } | RemoteWriteError::InvalidStatus { .. } => {
                Verdict::RetryLater { retry_after: None }
            }
            RemoteWriteError::Batch { .. } => Verdict::Rejected,
            RemoteWriteError::Status { status, retry_after, .. } => match status.as_u16() {
                429 | 500..=599 => Verdict::RetryLater { retry_after: *retry_after },
                400..=499 => Verdict::Rejected,
                _ => Verdict::RetryLater { retry_after: None },
            },
        }
    }
}

/// The batch being posted when a call failed part-way: which of its requests the receiver
/// has stored. A retry of the same batch posts only the rest.
#[derive(Debug, Clone)]
struct Progress {
    body: Bytes,
    stored: usize,
}

/// Posts the outbox's batches to one remote_write receiver, with the stale-marker state that
/// runs from one batch to the next. One per output; `send` takes `&mut self`. A clone starts
/// where the original stands (each run of the daemon loop delivers with a clone).
#[derive(Debug, Clone)]
pub struct RemoteWriteClient {
    output: String,
    client: reqwest::Client,
    url: reqwest::Url,
    /// For messages: the URL without query or fragment.
    url_for_log: String,
    /// Every request's headers, credentials (sensitive) included.
    headers: HeaderMap,
    external_labels: BTreeMap<String, String>,
    max_request_bytes: usize,
    stale: StaleState,
    progress: Option<Progress>,
    warnings: Vec<String>,
}

impl RemoteWriteClient {
    /// A client for `config`: reads the credential files (a blocking read of small regular
    /// files) and the `ca_file`, builds the headers once. Warnings (a secret file readable by
    /// group or others) are logged here and kept for [`RemoteWriteClient::warnings`]. The
    /// error names the output and the field.
    pub fn new(config: &RemoteWriteConfig) -> Result<Self, RemoteWriteSetupError> {
        let output = config.output_name();
        let setup_error =
            |field: &'static str, reason: String| RemoteWriteSetupError { output: output.clone(), field, reason };
        // The config loader has checked the entry; a client built from an unchecked one is
        // refused for the same reasons.
        config.validate().map_err(|(field, reason)| setup_error(field, reason))?;
        let url = reqwest::Url::parse(config.url.trim()).map_err(|e| setup_error("url", e.to_string()))?;
        let (credentials, warnings) = Credentials::load(config)?;
        for warning in &warnings {
            tracing::warn!("{warning}");
        }
        let mut headers = HeaderMap::with_capacity(6 + config.headers.len());
        for (name, value) in &config.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| setup_error("headers", format!("{name:?} is not a valid HTTP header name")))?;
            let value = HeaderValue::from_str(value).map_err(|_| {
                setup_error("headers", format!("the value of {name:?} is not a valid HTTP header value"))
            })?;
            headers.insert(name, value);
        }
        // After the operator's: these are the protocol's (the config refuses them in `headers`).
        headers.insert(reqwest::header::CONTENT_ENCODING, HeaderValue::from_static("snappy"));
        headers.insert(reqwest::header::CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
        headers.insert("x-prometheus-remote-write-version", HeaderValue::from_static(REMOTE_WRITE_VERSION));
        headers.insert(
            reqwest::header::USER_AGENT,
            HeaderValue::from_static(concat!("dcmon-agent/", env!("CARGO_PKG_VERSION"))),
        );
        if let Some(credentials) = &credentials {
            let field = match credentials {
                Credentials::Bearer(_) => "bearer_token_file",
                Credentials::Basic { .. } => "basic_auth.password_file",
            };
            headers
                .insert(reqwest::header::AUTHORIZATION, credentials.header().map_err(|why| setup_error(field, why))?);
        }
        let client = client_builder(config.ca_file.as_ref())
            .map_err(|e| setup_error("ca_file", format!("{e:#}")))?
            .connect_timeout(Duration::from_secs(config.connect_timeout))
            .timeout(Duration::from_secs(config.timeout))
            .pool_max_idle_per_host(1)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| setup_error("url", format!("cannot build the HTTP client: {}", error_chain(&e))))?;
        let mut url_for_log = url.clone();
        url_for_log.set_query(None);
        url_for_log.set_fragment(None);
        Ok(Self {
            output,
            client,
            url_for_log: url_for_log.to_string(),
            url,
            headers,
            external_labels: config.external_labels.clone(),
            max_request_bytes: usize::try_from(config.max_request_bytes).unwrap_or(usize::MAX),
            stale: StaleState::new(),
            progress: None,
            warnings,
        })
    }

    /// The output's name.
    pub fn output(&self) -> &str {
        &self.output
    }

    /// What [`RemoteWriteClient::new`] warned about (already logged).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Post one stored JSON batch, as as many requests as `max_request_bytes` needs, in order.
    ///
    /// Stale markers: the series of the previous batch that this one lacks get one each. That
    /// state moves on when the batch is stored, or given up on (an error whose verdict is
    /// [`Verdict::Rejected`]), never on a failure to be retried: the retry sends the same
    /// markers.
    ///
    /// A batch of several requests whose later request fails to be retried: the requests
    /// already stored are remembered with the batch, and a retry of the same batch (the same
    /// bytes) posts only the rest. Were that memory lost (another batch in between), resending
    /// the stored parts would still be harmless: Prometheus accepts a sample equal in value and
    /// timestamp to one it has as a duplicate.
    pub async fn send(&mut self, body: Bytes) -> Result<RemoteWriteSent, RemoteWriteError> {
        let encoded = encode(&body, &self.external_labels, &self.stale, self.max_request_bytes)
            .map_err(|e| RemoteWriteError::Batch { output: self.output.clone(), reason: e.to_string() })?;
        let already = match self.progress.take() {
            Some(p) if p.body == body => p.stored.min(encoded.requests.len()),
            _ => 0,
        };
        let parts = encoded.requests.len();
        let mut sent = RemoteWriteSent {
            requests: 0,
            series: encoded.series,
            samples: encoded.samples,
            stale_markers: encoded.stale_markers,
            dropped: encoded.dropped,
            bytes: 0,
            status: None,
        };
        for (i, request) in encoded.requests.iter().enumerate().skip(already) {
            match self.post(request.clone(), i + 1, parts).await {
                Ok(status) => {
                    sent.requests += 1;
                    sent.bytes += request.len();
                    sent.status = Some(status);
                }
                Err(e) => {
                    if e.verdict() == Verdict::Rejected {
                        self.give_up(encoded);
                    } else {
                        self.progress = Some(Progress { body, stored: i });
                    }
                    return Err(e);
                }
            }
        }
        self.give_up(encoded);
        Ok(sent)
    }

    /// The batch is done with (stored, or never will be): its series are the previous ones now.
    fn give_up(&mut self, encoded: Encoded) {
        self.stale.advance(encoded);
        self.progress = None;
    }

    /// One request; `Ok` with its 2xx status.
    async fn post(&self, body: Bytes, part: usize, parts: usize) -> Result<StatusCode, RemoteWriteError> {
        let mut request = reqwest::Request::new(reqwest::Method::POST, self.url.clone());
        *request.headers_mut() = self.headers.clone();
        *request.body_mut() = Some(body.into());
        let (status, headers, answer) = match read_answer(&self.client, request).await {
            Ok(answer) => answer,
            Err(e) => {
                return Err(RemoteWriteError::Unreachable {
                    output: self.output.clone(),
                    url: self.url_for_log.clone(),
                    // reqwest's message repeats the URL, query and all: the query may carry a tenant or
                    // token, and the URL is in the message already.
                    reason: with_tls_hint(error_chain(&e.without_url())),
                });
            }
        };
        classify(&self.output, status, &headers, &answer, part, parts, SystemTime::now())
    }
}

/// What a request's answer means: `Ok` for a 2xx, else the error with its verdict.
fn classify(
    output: &str,
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    part: usize,
    parts: usize,
    now: SystemTime,
) -> Result<StatusCode, RemoteWriteError> {
    let Ok(status) = StatusCode::from_u16(status) else {
        return Err(RemoteWriteError::InvalidStatus { output: output.to_owned(), code: status });
    };
    if status.is_success() {
        return Ok(status);
    }
    let retry_after = match status.as_u16() {
        429 | 500..=599 => headers.get(reqwest::header::RETRY_AFTER).and_then(|v| retry_after(v, now)),
        _ => None,
    };
    let excerpt = match headers.get(reqwest::header::LOCATION).filter(|_| status.is_redirection()) {
        Some(to) => format!("Location: {}", excerpt(to.as_bytes())),
        None => excerpt(body),
    };
    Err(RemoteWriteError::Status { output: output.to_owned(), status, excerpt, retry_after, part, parts })
}

/// Post and read the answer, its body up to [`ANSWER_BODY_CAP`] (the rest is of no use). A
/// body that breaks off or stalls past the timeout is an error: the answer is not whole.
async fn read_answer(
    client: &reqwest::Client,
    request: reqwest::Request,
) -> Result<(u16, HeaderMap, Vec<u8>), reqwest::Error> {
    let mut response = client.execute(request).await?;
    let (status, headers) = (response.status().as_u16(), std::mem::take(response.headers_mut()));
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        body.extend_from_slice(&chunk[..chunk.len().min(ANSWER_BODY_CAP - body.len())]);
        if body.len() >= ANSWER_BODY_CAP {
            break;
        }
    }
    Ok((status, headers, body))
}

#[cfg(test)]
mod tests;
