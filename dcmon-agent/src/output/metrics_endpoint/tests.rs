//! The server over loopback, with a raw HTTP client (so the tests control every byte).

use std::time::Instant;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::*;
use crate::batch::Sample;

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn quick_limits() -> Limits {
    Limits {
        max_connections: 3,
        max_header_bytes: 8192,
        header_read_timeout: Duration::from_millis(500),
        connection_lifetime: Duration::from_secs(3),
        close_grace: Duration::from_millis(500),
    }
}

/// Status line, headers (lowercase names) and body of one request on a new connection,
/// closed after the answer.
async fn request(addr: SocketAddr, head: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw)).await.expect("answer in time").expect("read");
    parse(&raw)
}

fn parse(raw: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("end of head");
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).expect("status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, raw[end + 4..].to_vec())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn get(path: &str, accept: Option<&str>) -> String {
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n{accept}Connection: close\r\n\r\n")
}

fn batch(round: u64) -> Batch {
    let mut b = Batch::new("m-1", 1_700_000_000);
    b.push(Sample::count("round_total", round));
    b.push(Sample::gauge("cpu_load_1m", 0.5).label("k", "v"));
    b
}

#[tokio::test]
async fn unavailable_before_the_first_round_then_the_rounds_values() {
    let latest = LatestRound::new();
    let ep = MetricsEndpoint::bind(loopback(), latest.clone(), quick_limits()).expect("bind");
    let addr = ep.local_addr();
    let (status, _, body) = request(addr, &get("/metrics", None)).await;
    assert_eq!(status, 503);
    assert!(String::from_utf8_lossy(&body).contains("no round"), "{body:?}");

    latest.publish(batch(1));
    let (status, headers, body) = request(addr, &get("/metrics", None)).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    assert_eq!(body, exposition::render(&batch(1), Format::Prometheus));
    assert!(String::from_utf8_lossy(&body).contains("round_total{machine_id=\"m-1\"} 1\n"));

    latest.publish(batch(2));
    let accept = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3";
    let (status, headers, body) = request(addr, &get("/metrics", Some(accept))).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), Some("application/openmetrics-text; version=1.0.0; charset=utf-8"));
    assert_eq!(body, exposition::render(&batch(2), Format::OpenMetrics));

    // HEAD: the same headers, no body.
    let (status, headers, body) = request(addr, "HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "content-length"),
        Some(&*exposition::render(&batch(2), Format::Prometheus).len().to_string())
    );
    assert!(body.is_empty());
    ep.stop().await;
    assert!(TcpStream::connect(addr).await.is_err(), "still listening after stop");
}

#[tokio::test]
async fn index_404_405_and_oversized_headers() {
    let latest = LatestRound::new();
    latest.publish(batch(1));
    let ep = MetricsEndpoint::bind(loopback(), latest, quick_limits()).expect("bind");
    let addr = ep.local_addr();
    let (status, headers, body) = request(addr, &get("/", None)).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), Some("text/html; charset=utf-8"));
    assert!(String::from_utf8_lossy(&body).contains("href=\"/metrics\""));
    assert_eq!(request(addr, &get("/metrics/", None)).await.0, 404);
    assert_eq!(request(addr, &get("/favicon.ico", None)).await.0, 404);
    let (status, headers, _) =
        request(addr, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 405);
    assert_eq!(header(&headers, "allow"), Some("GET, HEAD"));
    let big = format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "a".repeat(10_000));
    assert_eq!(request(addr, &big).await.0, 431);
}

#[tokio::test]
async fn slowloris_is_cut_off_and_does_not_block_a_scrape() {
    let latest = LatestRound::new();
    latest.publish(batch(1));
    let limits = quick_limits();
    let ep = MetricsEndpoint::bind(loopback(), latest, limits).expect("bind");
    let addr = ep.local_addr();
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    let started = Instant::now();
    let dripping = tokio::spawn(async move {
        // A header that never ends, a byte every 50 ms.
        let mut sent = 0_usize;
        for b in b"GET /metrics HTTP/1.1\r\nX-Slow: ".iter().chain(std::iter::repeat(&b'a')) {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            sent += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            if started.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
        // The server closed: a read sees the end (or a reset).
        let mut rest = Vec::new();
        let _ = slow.read_to_end(&mut rest).await;
        (sent, started.elapsed())
    });
    // Meanwhile a normal scrape is served at once.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    assert_eq!(request(addr, &get("/metrics", None)).await.0, 200);
    assert!(t.elapsed() < Duration::from_millis(400), "scrape took {:?}", t.elapsed());
    let (sent, elapsed) = dripping.await.expect("task");
    assert!(elapsed < limits.header_read_timeout + Duration::from_secs(2), "held for {elapsed:?} ({sent} bytes)");
}

#[tokio::test]
async fn connections_past_the_bound_are_closed_and_slots_come_back() {
    let latest = LatestRound::new();
    latest.publish(batch(1));
    let limits = Limits { header_read_timeout: Duration::from_secs(30), ..quick_limits() };
    let ep = MetricsEndpoint::bind(loopback(), latest, limits).expect("bind");
    let addr = ep.local_addr();
    // Idle connections take every slot.
    let mut idle = Vec::new();
    for _ in 0..limits.max_connections {
        idle.push(TcpStream::connect(addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The next one is closed without an answer.
    let mut extra = TcpStream::connect(addr).await.expect("connect");
    let _ = extra.write_all(get("/metrics", None).as_bytes()).await;
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), extra.read_to_end(&mut raw)).await.expect("closed in time");
    assert!(read.is_err() || raw.is_empty(), "answered past the bound: {:?}", String::from_utf8_lossy(&raw));
    // A slot freed is usable again.
    drop(idle.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(request(addr, &get("/metrics", None)).await.0, 200);
    // The idle ones end at the connection lifetime: then every slot is free.
    tokio::time::sleep(limits.connection_lifetime + limits.close_grace).await;
    for _ in 0..limits.max_connections {
        assert_eq!(request(addr, &get("/metrics", None)).await.0, 200);
    }
}

#[tokio::test]
async fn keep_alive_serves_several_scrapes_on_one_connection() {
    let latest = LatestRound::new();
    latest.publish(batch(7));
    let ep = MetricsEndpoint::bind(loopback(), latest, quick_limits()).expect("bind");
    let mut s = TcpStream::connect(ep.local_addr()).await.expect("connect");
    let expected = exposition::render(&batch(7), Format::Prometheus);
    for _ in 0..3 {
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        let mut raw = Vec::new();
        let mut buf = [0_u8; 4096];
        while !raw.ends_with(&expected) {
            let n =
                tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await.expect("in time").expect("read");
            assert!(n > 0, "closed early");
            raw.extend_from_slice(&buf[..n]);
        }
        assert_eq!(parse(&raw).0, 200);
    }
}

#[tokio::test]
async fn bind_errors_name_the_key_and_reload_rebinds() {
    let latest = LatestRound::new();
    latest.publish(batch(1));
    let first = MetricsEndpoint::bind(loopback(), latest.clone(), quick_limits()).expect("bind");
    let taken = first.local_addr();
    let e = MetricsEndpoint::bind(taken, latest.clone(), quick_limits()).expect_err("port in use");
    let msg = e.to_string();
    assert!(msg.contains("prometheus_listen") && msg.contains(&taken.to_string()) && msg.contains("in use"), "{msg}");
    let e = MetricsEndpoint::bind("192.0.2.1:9100".parse().expect("addr"), latest.clone(), quick_limits())
        .expect_err("not local");
    assert!(e.to_string().contains("not an address of this host"), "{e}");

    // Same address: kept. Another port: moved. A bad one: the running one stays. None: stopped.
    let (ep, err) = MetricsEndpoint::reconfigure(Some(first), Some(taken), &latest, quick_limits()).await;
    let ep = ep.expect("kept");
    assert!(err.is_none());
    assert_eq!(ep.local_addr(), taken);
    let other = std::net::TcpListener::bind(loopback()).expect("probe");
    let free = other.local_addr().expect("addr");
    drop(other);
    let (ep, err) = MetricsEndpoint::reconfigure(Some(ep), Some(free), &latest, quick_limits()).await;
    assert!(err.is_none(), "{err:?}");
    let ep = ep.expect("moved");
    assert_eq!(ep.local_addr(), free);
    assert_eq!(request(free, &get("/metrics", None)).await.0, 200);
    assert!(TcpStream::connect(taken).await.is_err(), "old address still served");
    let (ep, err) =
        MetricsEndpoint::reconfigure(Some(ep), Some("192.0.2.1:9100".parse().expect("addr")), &latest, quick_limits())
            .await;
    assert!(err.is_some());
    let ep = ep.expect("kept on failure");
    assert_eq!(request(ep.local_addr(), &get("/metrics", None)).await.0, 200);
    let (ep, err) = MetricsEndpoint::reconfigure(Some(ep), None, &latest, quick_limits()).await;
    assert!(ep.is_none() && err.is_none());
    assert!(TcpStream::connect(free).await.is_err(), "still served after removal");
}

#[tokio::test]
async fn a_round_renders_once_per_format() {
    let latest = LatestRound::new();
    latest.publish(batch(3));
    let round = latest.get().expect("round");
    let a = round.rendered(Format::Prometheus);
    let b = round.rendered(Format::Prometheus);
    assert_eq!(a.as_ptr(), b.as_ptr(), "rendered twice");
    assert_ne!(round.rendered(Format::OpenMetrics), a);
}

/// A connection that sends nothing, at first or after a scrape (kept alive), is closed after
/// the header timeout: idle connections do not keep slots.
#[tokio::test]
async fn idle_connections_are_closed_after_the_header_timeout() {
    let latest = LatestRound::new();
    latest.publish(batch(1));
    let limits = quick_limits();
    let ep = MetricsEndpoint::bind(loopback(), latest, limits).expect("bind");
    let started = Instant::now();
    let mut silent = TcpStream::connect(ep.local_addr()).await.expect("connect");
    let mut after_scrape = TcpStream::connect(ep.local_addr()).await.expect("connect");
    after_scrape.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let limit = limits.header_read_timeout + Duration::from_secs(2);
    let mut raw = Vec::new();
    let closed = tokio::time::timeout(limit, silent.read_to_end(&mut raw)).await;
    assert!(closed.is_ok(), "silent connection open after {limit:?}");
    assert!(raw.is_empty() || raw.starts_with(b"HTTP/1.1 408"), "{:?}", String::from_utf8_lossy(&raw));
    let mut raw = Vec::new();
    let closed = tokio::time::timeout(limit, after_scrape.read_to_end(&mut raw)).await;
    assert!(closed.is_ok(), "kept-alive connection open after {limit:?}");
    assert_eq!(parse(&raw).0, 200);
    assert!(started.elapsed() >= limits.header_read_timeout, "closed before the timeout");
}
