//! A Prometheus remote-write receiver for tests: decodes every request (snappy block format,
//! then the `WriteRequest` protobuf, both decoded here, independently of the agent's encoder),
//! records what it accepted, and answers as scripted: 204, a fixed status (an outage), or 400
//! "out of bounds" for a request holding a sample older than a cutoff, as Prometheus does for
//! samples older than its head block.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use anyhow::{Context as _, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;

use crate::tsdb::Series;

/// One request the receiver answered.
#[derive(Debug, Clone)]
pub struct WriteRequestSeen {
    /// When it arrived.
    pub at: Instant,
    /// The status sent back.
    pub status: u16,
    /// The series decoded from it (empty when it could not be decoded).
    pub series: Vec<Series>,
    /// Its headers (`content-encoding`, `x-prometheus-remote-write-version`, ...), lowercase names.
    pub headers: BTreeMap<String, String>,
    /// Why it could not be decoded, if it could not.
    pub decode_error: Option<String>,
    /// The body's length as posted (snappy-compressed).
    pub bytes: usize,
}

impl WriteRequestSeen {
    /// The oldest sample's timestamp (ms).
    pub fn min_ts(&self) -> Option<i64> {
        self.series.iter().flat_map(|s| s.samples.iter().map(|p| p.0)).min()
    }
}

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteAnswer {
    /// 204 No Content, as Prometheus.
    Accept,
    /// This status for every request (e.g. 503: an outage).
    Status(u16),
    /// 400 "out of bounds" for a request holding any sample older than this (ms); 204 else.
    RejectOlderThan(i64),
}

#[derive(Debug)]
struct Inner {
    answer: WriteAnswer,
    seen: Vec<WriteRequestSeen>,
}

/// A remote-write receiver at `http://127.0.0.1:PORT/api/v1/write`, on its own thread until
/// dropped.
#[derive(Debug)]
pub struct RemoteWriteReceiver {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl RemoteWriteReceiver {
    /// Start one that accepts everything.
    pub fn start() -> anyhow::Result<Self> {
        let inner = Arc::new(Mutex::new(Inner { answer: WriteAnswer::Accept, seen: Vec::new() }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let app = Router::new()
            .route("/api/v1/write", post(write))
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(Arc::clone(&inner));
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let thread = std::thread::spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop_rx.await;
                    })
                    .await;
            });
        });
        Ok(Self { addr, inner, stop: Some(stop_tx), thread: Some(thread) })
    }

    /// The URL for the agent's `remote_write[].url`.
    pub fn url(&self) -> String {
        format!("http://{}/api/v1/write", self.addr)
    }

    /// Answer from now on as `answer`.
    pub fn set_answer(&self, answer: WriteAnswer) {
        lock(&self.inner).answer = answer;
    }

    /// Every request so far, oldest first.
    pub fn seen(&self) -> Vec<WriteRequestSeen> {
        lock(&self.inner).seen.clone()
    }

    /// The requests answered 2xx, oldest first.
    pub fn accepted(&self) -> Vec<WriteRequestSeen> {
        self.seen().into_iter().filter(|r| (200..300).contains(&r.status)).collect()
    }
}

impl Drop for RemoteWriteReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn write(State(inner): State<Arc<Mutex<Inner>>>, headers: HeaderMap, body: Bytes) -> Response {
    let headers: BTreeMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_ascii_lowercase(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let bytes = body.len();
    let decoded = snappy_decode(&body).and_then(|raw| decode_write_request(&raw));
    let (series, decode_error) = match decoded {
        Ok(s) => (s, None),
        Err(e) => (Vec::new(), Some(format!("{e:#}"))),
    };
    let mut g = lock(&inner);
    let mut seen = WriteRequestSeen { at: Instant::now(), status: 204, series, headers, decode_error, bytes };
    let (status, text) = if seen.decode_error.is_some() {
        (400, format!("cannot decode: {}", seen.decode_error.clone().unwrap_or_default()))
    } else {
        match g.answer {
            WriteAnswer::Accept => (204, String::new()),
            WriteAnswer::Status(s) => (s, "answer scripted by the test".to_owned()),
            WriteAnswer::RejectOlderThan(cutoff) => match seen.min_ts() {
                Some(t) if t < cutoff => (400, format!("out of bounds: sample at {t} is before {cutoff}")),
                _ => (204, String::new()),
            },
        }
    };
    seen.status = status;
    g.seen.push(seen);
    drop(g);
    (StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST), text).into_response()
}

/// Decode a snappy block (the format remote write uses; not the framed stream format).
pub fn snappy_decode(src: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (len, mut i) = varint(src, 0)?;
    let len = usize::try_from(len)?;
    if len > 256 << 20 {
        bail!("snappy: decoded length {len} too large");
    }
    let mut out = Vec::with_capacity(len);
    while i < src.len() {
        let tag = src[i];
        i += 1;
        let (n, offset) = match tag & 3 {
            0 => {
                let mut n = usize::from(tag >> 2);
                if n >= 60 {
                    let extra = n - 59;
                    let bytes = src.get(i..i + extra).context("snappy: literal length cut")?;
                    n = bytes.iter().rev().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
                    i += extra;
                }
                let n = n + 1;
                out.extend_from_slice(src.get(i..i + n).context("snappy: literal cut")?);
                i += n;
                continue;
            }
            1 => {
                let b = *src.get(i).context("snappy: copy cut")?;
                i += 1;
                (4 + usize::from((tag >> 2) & 7), (usize::from(tag & 0xe0) << 3) | usize::from(b))
            }
            2 => {
                let b = src.get(i..i + 2).context("snappy: copy cut")?;
                i += 2;
                (1 + usize::from(tag >> 2), usize::from(u16::from_le_bytes([b[0], b[1]])))
            }
            _ => {
                let b = src.get(i..i + 4).context("snappy: copy cut")?;
                i += 4;
                (1 + usize::from(tag >> 2), u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            }
        };
        if offset == 0 || offset > out.len() {
            bail!("snappy: copy offset {offset} with {} bytes decoded", out.len());
        }
        for _ in 0..n {
            out.push(out[out.len() - offset]);
        }
    }
    if out.len() != len {
        bail!("snappy: decoded {} bytes, the header says {len}", out.len());
    }
    Ok(out)
}

fn varint(buf: &[u8], mut i: usize) -> anyhow::Result<(u64, usize)> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(i).context("varint cut")?;
        i += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok((v, i));
        }
    }
    bail!("varint longer than 10 bytes")
}

/// A protobuf field's value.
enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32,
}

/// The fields of a protobuf message, in order.
fn fields(buf: &[u8]) -> anyhow::Result<Vec<(u64, Field<'_>)>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < buf.len() {
        let (key, next) = varint(buf, i)?;
        i = next;
        let value = match key & 7 {
            0 => {
                let (v, next) = varint(buf, i)?;
                i = next;
                Field::Varint(v)
            }
            1 => {
                let b = buf.get(i..i + 8).context("fixed64 cut")?;
                i += 8;
                Field::Fixed64(u64::from_le_bytes(b.try_into()?))
            }
            2 => {
                let (n, next) = varint(buf, i)?;
                let n = usize::try_from(n)?;
                let b = buf.get(next..next + n).context("bytes cut")?;
                i = next + n;
                Field::Bytes(b)
            }
            5 => {
                buf.get(i..i + 4).context("fixed32 cut")?;
                i += 4;
                Field::Fixed32
            }
            w => bail!("wire type {w}"),
        };
        out.push((key >> 3, value));
    }
    Ok(out)
}

/// `prometheus.WriteRequest` (remote write 1.0): `timeseries` = 1; `TimeSeries`: `labels` = 1
/// (`Label`: `name` = 1, `value` = 2), `samples` = 2 (`Sample`: `value` = 1 double,
/// `timestamp` = 2 int64 ms). Metadata and exemplars are skipped.
pub fn decode_write_request(raw: &[u8]) -> anyhow::Result<Vec<Series>> {
    let mut out = Vec::new();
    for (no, f) in fields(raw)? {
        let (1, Field::Bytes(ts)) = (no, f) else { continue };
        let mut series = Series { labels: BTreeMap::new(), samples: Vec::new() };
        for (no, f) in fields(ts)? {
            match (no, f) {
                (1, Field::Bytes(label)) => {
                    let (mut name, mut value) = (String::new(), String::new());
                    for (no, f) in fields(label)? {
                        match (no, f) {
                            (1, Field::Bytes(b)) => name = String::from_utf8(b.to_vec())?,
                            (2, Field::Bytes(b)) => value = String::from_utf8(b.to_vec())?,
                            _ => bail!("unexpected field {no} in a Label"),
                        }
                    }
                    if series.labels.insert(name.clone(), value).is_some() {
                        bail!("label {name:?} twice in one series");
                    }
                }
                (2, Field::Bytes(sample)) => {
                    let (mut value, mut ts) = (0.0, 0i64);
                    for (no, f) in fields(sample)? {
                        match (no, f) {
                            (1, Field::Fixed64(bits)) => value = f64::from_bits(bits),
                            (2, Field::Varint(v)) => ts = v as i64,
                            _ => bail!("unexpected field {no} in a Sample"),
                        }
                    }
                    series.samples.push((ts, value));
                }
                _ => {}
            }
        }
        out.push(series);
    }
    Ok(out)
}

/// Encode `series` as a snappy-compressed `WriteRequest`, the body of a remote-write request:
/// what a test sends to a database to check the read-back path without the agent. The snappy
/// block holds literals only (valid snappy, not compressed).
pub fn encode_write_request(series: &[Series]) -> Vec<u8> {
    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn put_bytes(out: &mut Vec<u8>, field: u64, b: &[u8]) {
        put_varint(out, (field << 3) | 2);
        put_varint(out, b.len() as u64);
        out.extend_from_slice(b);
    }
    let mut raw = Vec::new();
    for s in series {
        let mut ts = Vec::new();
        for (name, value) in &s.labels {
            let mut label = Vec::new();
            put_bytes(&mut label, 1, name.as_bytes());
            put_bytes(&mut label, 2, value.as_bytes());
            put_bytes(&mut ts, 1, &label);
        }
        for (t, v) in &s.samples {
            let mut sample = vec![0x09];
            sample.extend_from_slice(&v.to_bits().to_le_bytes());
            sample.push(0x10);
            put_varint(&mut sample, *t as u64);
            put_bytes(&mut ts, 2, &sample);
        }
        put_bytes(&mut raw, 1, &ts);
    }
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 60_000 * 5 + 10);
    put_varint(&mut out, raw.len() as u64);
    for chunk in raw.chunks(65_536) {
        // A literal of n bytes: tag 61 << 2 then n - 1 in two little-endian bytes.
        let n = chunk.len() - 1;
        out.extend_from_slice(&[61 << 2, n as u8, (n >> 8) as u8]);
        out.extend_from_slice(chunk);
    }
    out
}

/// POST `series` to a remote-write endpoint (`addr`, `path`); the answer's status and body.
pub fn push(addr: SocketAddr, path: &str, series: &[Series]) -> anyhow::Result<(u16, String)> {
    let body = encode_write_request(series);
    let (status, answer) = crate::tsdb::http_request_with_headers(
        "POST",
        addr,
        path,
        &[("Content-Encoding", "snappy"), ("X-Prometheus-Remote-Write-Version", "0.1.0")],
        Some(("application/x-protobuf", &body)),
    )?;
    Ok((status, String::from_utf8_lossy(&answer).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_then_decode_is_the_identity() {
        let series = vec![Series {
            labels: [("__name__", "m"), ("a", "b")].map(|(k, v)| (k.to_owned(), v.to_owned())).into(),
            samples: vec![(1_700_000_000_000, 6.520352247073754), (1_700_000_001_000, 0.0)],
        }];
        let body = encode_write_request(&series);
        assert_eq!(decode_write_request(&snappy_decode(&body).expect("snappy")).expect("decode"), series);
    }

    #[test]
    fn snappy_literals_and_copies() {
        // "abcabcabcabc": a 3-byte literal then a 1-byte-offset copy of 9 (4 + 5) at offset 3.
        let src = [12u8, 2 << 2, b'a', b'b', b'c', 0b0001_0101, 3];
        assert_eq!(snappy_decode(&src).expect("decode"), b"abcabcabcabc");
        assert!(snappy_decode(&[5u8, 0, b'x']).is_err(), "length mismatch");
        assert!(snappy_decode(&[4u8, 0b0000_0001, 9]).is_err(), "copy before any output");
    }

    #[test]
    fn write_request_decodes() {
        // One series {__name__="up"} with one sample (1.0 at 1000 ms), encoded by hand.
        let label = [&[0x0a, 8][..], b"__name__", &[0x12, 2], b"up"].concat();
        let sample = [&[0x09][..], &1.0f64.to_bits().to_le_bytes(), &[0x10, 0xe8, 0x07]].concat();
        let ts = [&[0x0a, label.len() as u8][..], &label, &[0x12, sample.len() as u8], &sample].concat();
        let req = [&[0x0a, ts.len() as u8][..], &ts].concat();
        let got = decode_write_request(&req).expect("decode");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].name(), "up");
        assert_eq!(got[0].samples, vec![(1000, 1.0)]);
    }
}
