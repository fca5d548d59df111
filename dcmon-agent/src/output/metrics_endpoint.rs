//! `GET /metrics`: the latest round for Prometheus scrapers (`prometheus_listen`).
//!
//! A scrape never triggers a collection: the daemon loop hands each round to a [`LatestRound`]
//! (an `Arc` swap under a mutex held for a pointer copy) and the server only reads it. Each
//! round is rendered lazily, at most once per format, by the first scrape that wants it, and
//! the bytes are shared by every later scrape of that round (see [`Round`] for why).
//!
//! The server is an HTTP/1.1 hyper server on the agent's runtime, bounded so that no scraper,
//! however slow or hostile, can hold the agent's resources for long or delay collection:
//!
//! - at most [`Limits::max_connections`] connections at once; a connection past that is
//!   accepted and closed at once (the kernel's backlog is not left to fill up);
//! - request headers (start line included) of at most [`Limits::max_header_bytes`] (431 past
//!   that) and at most 64 header fields;
//! - the headers of each request must arrive within [`Limits::header_read_timeout`] (a
//!   slowloris client sending a byte at a time is cut off then). hyper starts that timer when
//!   it starts waiting for a request, so an idle connection, a kept-alive one between scrapes
//!   included, is closed after it too: at usual scrape intervals each scrape connects anew;
//! - a connection lives at most [`Limits::connection_lifetime`]: then it is asked to close
//!   after the request in flight, and closed for good [`Limits::close_grace`] later.
//!
//! Routes: `GET`/`HEAD /metrics` (503 before the first round), `/` a short page pointing at
//! `/metrics`, anything else 404; a method other than GET or HEAD on those 405.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use super::exposition::{self, Format};
use crate::batch::Batch;

/// The latest round the daemon loop collected, shared with the server. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct LatestRound(Arc<Mutex<Option<Arc<Round>>>>);

impl LatestRound {
    /// No round yet: `/metrics` answers 503 until [`LatestRound::publish`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Make `batch` the round scrapes see. Takes the batch (no copy); the previous round is
    /// dropped once the last scrape reading it is done.
    pub fn publish(&self, batch: Batch) {
        let round = Arc::new(Round { batch, rendered: [OnceLock::new(), OnceLock::new()] });
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(round);
    }

    /// The round scrapes see now, if any.
    pub fn get(&self) -> Option<Arc<Round>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// One round and its renderings. Rendered on first use, per format (README, Scrape endpoint,
/// has the numbers: rendering a 188-sample round costs about 26 µs of CPU, serving it 11 µs on a
/// kept-alive connection and 49 µs on a new one): rendering per scrape would repeat the work
/// for every scrape of a round (several Prometheus servers, or a scrape interval shorter than
/// the collection interval), rendering in the loop would spend it on rounds nobody scrapes.
/// Lazily, a round nobody scrapes costs nothing, and each format is rendered at most once.
#[derive(Debug)]
pub struct Round {
    batch: Batch,
    rendered: [OnceLock<Bytes>; 2],
}

impl Round {
    /// The round's batch.
    pub fn batch(&self) -> &Batch {
        &self.batch
    }

    /// The batch in `format`, rendered on the first call.
    pub fn rendered(&self, format: Format) -> Bytes {
        let slot = match format {
            Format::Prometheus => &self.rendered[0],
            Format::OpenMetrics => &self.rendered[1],
        };
        slot.get_or_init(|| Bytes::from(exposition::render(&self.batch, format))).clone()
    }
}

/// The server's bounds (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// Bytes of request line and headers a request may have.
    pub max_header_bytes: usize,
    /// Time a request's headers may take to arrive.
    pub header_read_timeout: Duration,
    /// Time after which a connection is asked to close (after the request in flight).
    pub connection_lifetime: Duration,
    /// Time a connection asked to close has to finish before it is dropped.
    pub close_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // A few Prometheus servers and a person with curl; each scraper keeps one connection.
            max_connections: 8,
            max_header_bytes: 16 * 1024,
            header_read_timeout: Duration::from_secs(5),
            // Bounds a client that keeps sending requests on one connection.
            connection_lifetime: Duration::from_secs(120),
            close_grace: Duration::from_secs(10),
        }
    }
}

/// A bind failure: the message names `prometheus_listen` and the address.
#[derive(Debug, thiserror::Error)]
#[error("prometheus_listen {addr}: cannot listen there: {error}{hint}")]
pub struct BindError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// What bind(2) said (in the message, hence not a `source`: anyhow's chain would repeat it).
    pub error: io::Error,
    hint: &'static str,
}

/// The running `/metrics` server. Dropping it stops accepting (the socket closes when the
/// runtime next runs); [`MetricsEndpoint::stop`] waits until it is closed.
#[derive(Debug)]
pub struct MetricsEndpoint {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl MetricsEndpoint {
    /// Listen on `addr` and serve `latest` there. Must be called within a tokio runtime.
    pub fn bind(addr: SocketAddr, latest: LatestRound, limits: Limits) -> Result<Self, BindError> {
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| {
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)
            })
            .map_err(|error| BindError { addr, hint: bind_hint(&error), error })?;
        let addr = listener.local_addr().unwrap_or(addr);
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, latest, limits, stopped));
        tracing::info!("serving the latest round at http://{addr}/metrics");
        Ok(Self { addr, stop, task: Some(task) })
    }

    /// The address it listens on (the port the kernel chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting and close the listening socket; connections in flight end by their
    /// own bounds.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// The endpoint for `wanted` after a config reload: this one when the address is the
    /// same, none when `wanted` is `None`, else one on the new address. The new address is
    /// bound before this one closes, or, when that fails because this one holds the port (the
    /// same port on another of the host's addresses), after. When the new address cannot be
    /// bound, the error is returned with the endpoint that keeps serving (this one, rebound if
    /// it had to be closed).
    pub async fn reconfigure(
        current: Option<Self>,
        wanted: Option<SocketAddr>,
        latest: &LatestRound,
        limits: Limits,
    ) -> (Option<Self>, Option<BindError>) {
        let Some(addr) = wanted else {
            if let Some(old) = current {
                tracing::info!("prometheus_listen removed: no longer serving http://{}/metrics", old.addr);
                old.stop().await;
            }
            return (None, None);
        };
        let Some(old) = current else {
            return match Self::bind(addr, latest.clone(), limits) {
                Ok(new) => (Some(new), None),
                Err(e) => (None, Some(e)),
            };
        };
        if addr == old.addr || (addr.port() == 0 && addr.ip() == old.addr.ip()) {
            return (Some(old), None);
        }
        match Self::bind(addr, latest.clone(), limits) {
            Ok(new) => {
                old.stop().await;
                (Some(new), None)
            }
            Err(e) if e.error.kind() == io::ErrorKind::AddrInUse && addr.port() == old.addr.port() => {
                let old_addr = old.addr;
                old.stop().await;
                match Self::bind(addr, latest.clone(), limits) {
                    Ok(new) => (Some(new), None),
                    Err(e) => (Self::bind(old_addr, latest.clone(), limits).ok(), Some(e)),
                }
            }
            Err(e) => (Some(old), Some(e)),
        }
    }
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn bind_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::AddrInUse => " (another process listens on that port)",
        io::ErrorKind::AddrNotAvailable => " (not an address of this host)",
        io::ErrorKind::PermissionDenied => " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        _ => "",
    }
}

async fn accept_loop(listener: TcpListener, latest: LatestRound, limits: Limits, mut stopped: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut refused: u64 = 0;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopped.wait_for(|s| *s) => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and the like: wait a moment rather than spin on the error.
                tracing::debug!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    "metrics endpoint: {} connections open, closed one from {peer} ({refused} so far)",
                    limits.max_connections
                );
            }
            drop(stream);
            continue;
        };
        let latest = latest.clone();
        tokio::spawn(async move {
            serve_connection(stream, latest, limits).await;
            drop(permit);
        });
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, latest: LatestRound, limits: Limits) {
    let _ = stream.set_nodelay(true);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_header_size(limits.max_header_bytes)
        .max_headers(64);
    let service = hyper::service::service_fn(move |req| {
        let answer = answer(&req, &latest);
        async move { Ok::<_, Infallible>(answer) }
    });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = tokio::time::sleep(limits.connection_lifetime) => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(limits.close_grace, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!("metrics endpoint: connection ended: {e}");
    }
}

const INDEX: &str = "<html><head><title>dcmon-agent</title></head><body><h1>dcmon-agent</h1>\
                     <p><a href=\"/metrics\">Metrics</a></p></body></html>\n";

/// The response to `req`.
fn answer(req: &Request<Incoming>, latest: &LatestRound) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path != "/metrics" && path != "/" {
        return text(StatusCode::NOT_FOUND, "not found: the metrics are at /metrics\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed: use GET or HEAD\n");
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if path == "/" {
        let mut r = Response::new(Full::new(Bytes::from_static(INDEX.as_bytes())));
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
        return r;
    }
    let Some(round) = latest.get() else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "no round collected yet: try again after the first interval\n");
    };
    let format = Format::negotiate(req.headers().get(ACCEPT).and_then(|v| v.to_str().ok()));
    let mut r = Response::new(Full::new(round.rendered(format)));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

#[cfg(test)]
mod tests;
