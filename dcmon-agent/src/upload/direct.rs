//! The hand-driven hyper transport: one kept-alive HTTP/1.1 connection to a plain-HTTP server.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use reqwest::header::{HeaderMap, HeaderValue};
use tokio::net::TcpStream;

use super::answer::Answer;
use super::{ANSWER_BODY_CAP, error_chain};

/// One HTTP/1.1 connection to a plain-HTTP server, opened on first use and after the server
/// closed it, kept alive between posts.
pub(super) struct Direct {
    /// Host name or address to connect to (IPv6 without brackets) and port.
    pub(super) host: String,
    pub(super) port: u16,
    /// The request target, in origin form (`/api/metrics`, after any base path).
    pub(super) target: hyper::Uri,
    /// The `Host` header: the URL's authority.
    pub(super) host_header: HeaderValue,
    connect_timeout: Duration,
    pub(super) sender: Option<SendRequest<Full<Bytes>>>,
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

/// A plain-HTTP URL with no proxy to go through, or `None` for reqwest to handle.
pub(super) fn direct_target(url: &reqwest::Url, connect_timeout: Duration) -> Option<Direct> {
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
    pub(super) async fn post(&mut self, headers: &HeaderMap, body: Bytes) -> Result<Answer, String> {
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
