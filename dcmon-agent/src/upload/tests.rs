//! Unit tests of the upload client: both transports against scripted servers, and the answer classification.

use std::path::Path;
use std::sync::Arc;

use super::answer::{BODY_EXCERPT_BYTES, retry_after};
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
    for code in [402, 404, 405, 406, 407, 408, 409, 410, 411, 412, 414, 415, 418, 421, 425, 426, 428, 431, 451, 499] {
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
    format!("HTTP/1.1 {status} Answer\r\n{headers}connection: close\r\ncontent-length: {}\r\n\r\n{body}", body.len())
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
        let connections = cases.iter().map(|(status, headers, body, _)| vec![closing_answer(*status, headers, body)]);
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
