//! The client against an in-test receiver on loopback that undoes snappy and protobuf and
//! records each request: headers, credentials, series, answers and their verdicts, stale
//! markers across retries, and a batch split over several requests.

use std::collections::VecDeque;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use http_body_util::BodyExt as _;
use prost::Message as _;

use super::*;
use crate::output::remote_write::STALE_NAN_BITS;
use crate::output::remote_write::proto::WriteRequest;

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    request: WriteRequest,
    /// The status it was answered with.
    status: u16,
}

/// How the receiver answers one request: status, headers, body; `None` holds the request
/// unanswered (a timeout).
type Answer = Option<(u16, Vec<(&'static str, String)>, String)>;

struct Receiver {
    url: String,
    seen: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    fn seen(&self) -> Vec<Received> {
        self.seen.lock().expect("lock").clone()
    }
}

/// A remote_write receiver on loopback: answers requests with `answers` in turn, then 204.
/// A body that is not snappy-compressed protobuf fails the test.
async fn receiver(answers: Vec<Answer>) -> Receiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/api/v1/write", listener.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
    let recorded = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (seen, answers) = (Arc::clone(&recorded), Arc::clone(&answers));
            let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let (seen, answers) = (Arc::clone(&seen), Arc::clone(&answers));
                async move {
                    let (parts, body) = request.into_parts();
                    let body = body.collect().await.expect("body").to_bytes();
                    let proto = snap::raw::Decoder::new().decompress_vec(&body).expect("snappy block format");
                    let request = WriteRequest::decode(proto.as_slice()).expect("a WriteRequest");
                    let answer =
                        answers.lock().expect("lock").pop_front().unwrap_or(Some((204, vec![], String::new())));
                    let Some((status, headers, text)) = answer else {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        return Err("held");
                    };
                    seen.lock().expect("lock").push(Received { headers: parts.headers, request, status });
                    let mut response = hyper::Response::builder().status(status);
                    for (name, value) in headers {
                        response = response.header(name, value);
                    }
                    Ok(response.body(http_body_util::Full::new(Bytes::from(text))).expect("response"))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    Receiver { url, seen }
}

fn config(json: serde_json::Value) -> RemoteWriteConfig {
    serde_json::from_value(json).expect("a remote_write entry")
}

fn secret_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path
}

fn batch_of(timestamp: i64, names: &[&str]) -> Bytes {
    let metrics: Vec<String> = names
        .iter()
        .map(|n| format!(r#"{{"name":"{n}","value":1.5,"labels":{{"gpu":"0"}},"timestamp":{timestamp}}}"#))
        .collect();
    Bytes::from(format!(r#"{{"machine_id":"m-1","timestamp":{timestamp},"metrics":[{}]}}"#, metrics.join(",")))
}

fn name_of(series: &crate::output::remote_write::proto::TimeSeries) -> &str {
    series.labels.iter().find(|l| l.name == "__name__").map_or("", |l| l.value.as_str())
}

/// `(name, value bits, timestamp)` of every stale marker in `requests`.
fn stale_markers(requests: &[Received]) -> Vec<(String, u64, i64)> {
    requests
        .iter()
        .flat_map(|r| &r.request.timeseries)
        .flat_map(|s| {
            s.samples
                .iter()
                .filter(|x| x.value.is_nan())
                .map(|x| (name_of(s).to_owned(), x.value.to_bits(), x.timestamp))
        })
        .collect()
}

#[tokio::test]
async fn posts_the_series_with_the_protocol_headers() {
    let rx = receiver(vec![]).await;
    let cfg = config(serde_json::json!({
        "name": "prom", "url": rx.url, "headers": {"X-Scope-OrgID": "tenant-1"},
        "external_labels": {"cluster": "c1", "datacenter": "dc2"}
    }));
    let mut client = RemoteWriteClient::new(&cfg).expect("client");
    let body = br#"{"machine_id":"m-1","timestamp":1700000000,"metrics":[
        {"name":"cpu_usage_percent","value":12.5,"labels":{},"timestamp":1700000000},
        {"name":"net_rx_bytes_total","value":123456789,"labels":{"interface":"eth0"},"timestamp":1700000000}]}"#;
    let sent = client.send(Bytes::from_static(body)).await.expect("stored");
    assert_eq!(
        (sent.requests, sent.series, sent.samples, sent.stale_markers, sent.status),
        (1, 2, 2, 0, Some(StatusCode::NO_CONTENT))
    );
    let seen = rx.seen();
    assert_eq!(seen.len(), 1);
    let headers = &seen[0].headers;
    assert_eq!(headers["content-encoding"], "snappy");
    assert_eq!(headers["content-type"], "application/x-protobuf");
    assert_eq!(headers["x-prometheus-remote-write-version"], "0.1.0");
    assert_eq!(headers["user-agent"], concat!("dcmon-agent/", env!("CARGO_PKG_VERSION")));
    assert_eq!(headers["x-scope-orgid"], "tenant-1");
    assert!(headers.get("authorization").is_none());
    let series = &seen[0].request.timeseries;
    let pairs = |i: usize| -> Vec<(String, String)> {
        series[i].labels.iter().map(|l| (l.name.clone(), l.value.clone())).collect()
    };
    let expect = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
    };
    assert_eq!(
        pairs(0),
        expect(&[("__name__", "cpu_usage_percent"), ("cluster", "c1"), ("datacenter", "dc2"), ("machine_id", "m-1")])
    );
    assert_eq!(
        pairs(1),
        expect(&[
            ("__name__", "net_rx_bytes_total"),
            ("cluster", "c1"),
            ("datacenter", "dc2"),
            ("interface", "eth0"),
            ("machine_id", "m-1")
        ])
    );
    assert_eq!(series[0].samples[0].value, 12.5);
    assert_eq!(series[0].samples[0].timestamp, 1_700_000_000_000);
    assert_eq!(series[1].samples[0].value, 123_456_789.0);
}

#[tokio::test]
async fn a_bearer_token_from_its_file_never_shown() {
    const TOKEN: &str = "eyJhbGciOiJIUzI1NiJ9.s3cr3t-t0ken";
    let dir = tempfile::tempdir().expect("tempdir");
    let path = secret_file(dir.path(), "token", &format!("{TOKEN}\n"), 0o600);
    let rx = receiver(vec![Some((401, vec![], "bad token".into()))]).await;
    let cfg = config(serde_json::json!({"name": "prom", "url": rx.url, "bearer_token_file": path}));
    let mut client = RemoteWriteClient::new(&cfg).expect("client");
    assert!(client.warnings().is_empty());
    let err = client.send(batch_of(100, &["a"])).await.expect_err("401");
    assert_eq!(rx.seen()[0].headers["authorization"], format!("Bearer {TOKEN}"));
    assert_eq!(err.verdict(), Verdict::Rejected);
    for text in [format!("{client:?}"), format!("{err:?}"), err.to_string()] {
        assert!(!text.contains("s3cr3t"), "{text}");
    }
    assert!(err.to_string().contains("401") && err.to_string().contains("bad token"), "{err}");
}

#[tokio::test]
async fn basic_auth_from_the_password_file_never_shown() {
    const PASSWORD: &str = "hunter2 with spaces";
    let dir = tempfile::tempdir().expect("tempdir");
    let path = secret_file(dir.path(), "password", &format!("{PASSWORD}\n"), 0o600);
    let rx = receiver(vec![]).await;
    let cfg = config(serde_json::json!({
        "name": "vm", "url": rx.url, "basic_auth": {"username": "agent", "password_file": path}
    }));
    let mut client = RemoteWriteClient::new(&cfg).expect("client");
    client.send(batch_of(100, &["a"])).await.expect("stored");
    let encoded = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("agent:{PASSWORD}"));
    assert_eq!(rx.seen()[0].headers["authorization"], format!("Basic {encoded}"));
    let debug = format!("{client:?}");
    assert!(!debug.contains("hunter2") && !debug.contains(&encoded), "{debug}");
    let (credentials, _) = Credentials::load(&cfg).expect("credentials");
    let debug = format!("{credentials:?}");
    assert!(debug.contains("agent") && !debug.contains("hunter2"), "{debug}");
}

#[tokio::test]
async fn a_secret_file_readable_by_others_warns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = secret_file(dir.path(), "token", "t0psecret", 0o644);
    let cfg = config(serde_json::json!({"name": "prom", "url": "http://127.0.0.1:9/w", "bearer_token_file": path}));
    let client = RemoteWriteClient::new(&cfg).expect("client");
    let [warning] = client.warnings() else { panic!("one warning: {:?}", client.warnings()) };
    assert!(warning.contains("\"prom\"") && warning.contains("bearer_token_file"), "{warning}");
    assert!(warning.contains("0644") && warning.contains("chmod 600"), "{warning}");
    assert!(!warning.contains("t0psecret"), "{warning}");
}

#[test]
fn a_missing_or_unusable_secret_file_names_the_output_and_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope");
    let cfg = config(serde_json::json!({"name": "prom", "url": "http://127.0.0.1:9/w", "bearer_token_file": missing}));
    let err = RemoteWriteClient::new(&cfg).expect_err("missing token file");
    assert_eq!((err.output.as_str(), err.field), ("prom", "bearer_token_file"));
    assert_eq!(
        err.to_string(),
        format!("remote_write output \"prom\": bearer_token_file: {} does not exist", missing.display())
    );
    let cfg = config(serde_json::json!({
        "url": "http://127.0.0.1:9/w", "basic_auth": {"username": "u", "password_file": missing}
    }));
    let err = RemoteWriteClient::new(&cfg).expect_err("missing password file");
    assert_eq!((err.output.as_str(), err.field), ("127.0.0.1:9", "basic_auth.password_file"));
    let spaced = secret_file(dir.path(), "spaced", "two s3cr3t words", 0o600);
    let cfg = config(serde_json::json!({"name": "prom", "url": "http://127.0.0.1:9/w", "bearer_token_file": spaced}));
    let err = RemoteWriteClient::new(&cfg).expect_err("a token with a space");
    assert!(!err.to_string().contains("s3cr3t"), "{err}");
    let empty = secret_file(dir.path(), "empty", "\n", 0o600);
    let cfg = config(serde_json::json!({"name": "prom", "url": "http://127.0.0.1:9/w", "bearer_token_file": empty}));
    assert!(RemoteWriteClient::new(&cfg).expect_err("empty").to_string().ends_with("is empty"));
    let cfg =
        config(serde_json::json!({"name": "prom", "url": "http://127.0.0.1:9/w", "bearer_token_file": "/dev/zero"}));
    let err = RemoteWriteClient::new(&cfg).expect_err("a device");
    assert!(err.to_string().contains("expected a regular file"), "{err}");
    let cfg =
        config(serde_json::json!({"name": "prom", "url": "http://127.0.0.1:9/w", "headers": {"Content-Type": "x"}}));
    let err = RemoteWriteClient::new(&cfg).expect_err("an unchecked entry");
    assert_eq!(err.field, "headers", "{err}");
}

#[tokio::test]
async fn each_answer_and_its_verdict() {
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
    let cases: Vec<(Answer, Result<u16, Verdict>)> = vec![
        (Some((200, vec![], String::new())), Ok(200)),
        (Some((204, vec![], String::new())), Ok(204)),
        (Some((400, vec![], "out of bounds: sample for series {__name__=\"a\"}\n".into())), Err(Verdict::Rejected)),
        (Some((400, vec![], "out of order sample".into())), Err(Verdict::Rejected)),
        (Some((401, vec![], "Unauthorized".into())), Err(Verdict::Rejected)),
        (Some((403, vec![], String::new())), Err(Verdict::Rejected)),
        (Some((404, vec![], "404 page not found".into())), Err(Verdict::Rejected)),
        (Some((413, vec![], "too large".into())), Err(Verdict::Rejected)),
        (
            Some((429, vec![("retry-after", "7".into())], "slow down".into())),
            Err(Verdict::RetryLater { retry_after: Some(Duration::from_secs(7)) }),
        ),
        (Some((500, vec![], "oops".into())), Err(Verdict::RetryLater { retry_after: None })),
        (Some((503, vec![("retry-after", date)], String::new())), Err(Verdict::RetryLater { retry_after: None })),
        (
            Some((302, vec![("location", "http://elsewhere/".into())], String::new())),
            Err(Verdict::RetryLater { retry_after: None }),
        ),
    ];
    let rx = receiver(cases.iter().map(|(a, _)| a.clone()).collect()).await;
    let mut client =
        RemoteWriteClient::new(&config(serde_json::json!({"name": "prom", "url": rx.url}))).expect("client");
    for (n, (answer, expected)) in cases.into_iter().enumerate() {
        let result = client.send(batch_of(100 + 30 * n as i64, &["a"])).await;
        match (result, expected) {
            (Ok(sent), Ok(status)) => assert_eq!(sent.status.map(|s| s.as_u16()), Some(status)),
            (Err(e), Err(verdict)) => {
                let text = e.to_string();
                assert!(text.starts_with("remote_write output \"prom\": receiver answered"), "{text}");
                match (e.verdict(), verdict) {
                    // An HTTP-date: about two minutes from now.
                    (Verdict::RetryLater { retry_after: Some(wait) }, Verdict::RetryLater { retry_after: None })
                        if answer.as_ref().is_some_and(|a| a.0 == 503) =>
                    {
                        assert!(wait > Duration::from_secs(100) && wait <= Duration::from_secs(120), "{wait:?}");
                    }
                    (got, want) => assert_eq!(got, want, "{text}"),
                }
                if let Some((_, _, body)) = answer.filter(|a| !a.2.is_empty() && a.0 != 302) {
                    assert!(text.contains(body.trim_end()), "{text}");
                }
            }
            (got, want) => panic!("answer {n}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn classification_of_what_no_receiver_should_say() {
    let headers = HeaderMap::new();
    let err = classify("p", 1000, &headers, b"", 1, 1, SystemTime::now()).expect_err("not a status");
    assert_eq!(err.verdict(), Verdict::RetryLater { retry_after: None });
    let mut headers = HeaderMap::new();
    headers.insert("retry-after", HeaderValue::from_static("5"));
    let err = classify("p", 400, &headers, b"\x1b[31mbad\nthing", 2, 3, SystemTime::now()).expect_err("400");
    assert_eq!(err.verdict(), Verdict::Rejected);
    assert!(err.to_string().contains("request 2 of 3") && err.to_string().contains(" [31mbad thing"), "{err}");
    let long = "x".repeat(100_000);
    let err = classify("p", 400, &HeaderMap::new(), long.as_bytes(), 1, 1, SystemTime::now()).expect_err("400");
    assert!(err.to_string().len() < 1000);
}

#[tokio::test]
async fn no_receiver_and_a_silent_one_are_retried() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/api/v1/write?tenant=x", closed.local_addr().expect("addr"));
    drop(closed);
    let mut client = RemoteWriteClient::new(&config(serde_json::json!({"name": "prom", "url": url}))).expect("client");
    let err = client.send(batch_of(100, &["a"])).await.expect_err("refused");
    assert_eq!(err.verdict(), Verdict::RetryLater { retry_after: None });
    let text = err.to_string();
    assert!(text.starts_with("remote_write output \"prom\": cannot reach http://127.0.0.1:"), "{text}");
    assert!(!text.contains("tenant=x"), "{text}");

    let rx = receiver(vec![None]).await;
    let cfg = config(serde_json::json!({"name": "prom", "url": rx.url, "timeout": 1}));
    let mut client = RemoteWriteClient::new(&cfg).expect("client");
    let started = std::time::Instant::now();
    let err = client.send(batch_of(100, &["a"])).await.expect_err("timeout");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(err.verdict(), Verdict::RetryLater { retry_after: None }, "{err}");
}

#[tokio::test]
async fn stale_markers_survive_a_retried_failure_and_go_once() {
    let rx = receiver(vec![
        Some((204, vec![], String::new())),
        Some((503, vec![], "busy".into())),
        Some((204, vec![], String::new())),
        Some((204, vec![], String::new())),
    ])
    .await;
    let mut client =
        RemoteWriteClient::new(&config(serde_json::json!({"name": "prom", "url": rx.url}))).expect("client");
    client.send(batch_of(100, &["a", "b"])).await.expect("first");
    let second = batch_of(130, &["b"]);
    let err = client.send(second.clone()).await.expect_err("503");
    assert!(matches!(err.verdict(), Verdict::RetryLater { .. }));
    let sent = client.send(second).await.expect("retried");
    assert_eq!(sent.stale_markers, 1);
    client.send(batch_of(160, &["b"])).await.expect("third");
    let seen = rx.seen();
    assert_eq!(seen.len(), 4);
    let stale = (String::from("a"), STALE_NAN_BITS, 130_000);
    assert_eq!(stale_markers(&seen[1..2]), vec![stale.clone()], "the failed attempt carried it");
    assert_eq!(stale_markers(&seen[2..3]), [stale], "and so did the retry");
    assert!(stale_markers(&seen[3..]).is_empty(), "sent once");
    assert!(stale_markers(&seen[..1]).is_empty());
}

#[tokio::test]
async fn a_rejected_batch_moves_the_stale_state_on() {
    let rx = receiver(vec![Some((204, vec![], String::new())), Some((400, vec![], "out of order".into()))]).await;
    let mut client =
        RemoteWriteClient::new(&config(serde_json::json!({"name": "prom", "url": rx.url}))).expect("client");
    client.send(batch_of(100, &["a", "b"])).await.expect("first");
    let err = client.send(batch_of(130, &["b"])).await.expect_err("400");
    assert_eq!(err.verdict(), Verdict::Rejected);
    client.send(batch_of(160, &["b"])).await.expect("third");
    assert!(stale_markers(&rx.seen()[2..]).is_empty(), "given up on with its marker");
}

#[tokio::test]
async fn a_batch_split_over_requests_resumes_where_it_failed() {
    let names: Vec<String> = (0..200).map(|i| format!("series_with_a_long_name_{i:03}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let body = batch_of(100, &names);
    let rx = receiver(vec![
        Some((200, vec![], String::new())),
        Some((200, vec![], String::new())),
        Some((503, vec![], "busy".into())),
    ])
    .await;
    let cfg = config(serde_json::json!({"name": "prom", "url": rx.url, "max_request_bytes": 4096}));
    let mut client = RemoteWriteClient::new(&cfg).expect("client");
    let err = client.send(body.clone()).await.expect_err("third request 503");
    assert!(err.to_string().contains("request 3 of "), "{err}");
    let sent = client.send(body).await.expect("the rest");
    let seen = rx.seen();
    assert_eq!(sent.requests, seen.len() - 3, "parts 1 and 2 are not posted again");
    let stored: Vec<String> = seen
        .iter()
        .filter(|r| r.status < 300)
        .flat_map(|r| r.request.timeseries.iter().map(|s| name_of(s).to_owned()))
        .collect();
    assert_eq!(stored, names, "every series stored once, in order");
    for r in &seen {
        assert!(r.request.encoded_len() <= 4096);
    }
}

/// A CA's PEM and a rustls server config with a certificate for 127.0.0.1 that it signed.
fn test_ca() -> (String, Arc<rustls::ServerConfig>) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca = rcgen::CertificateParams::new(Vec::new()).expect("CA params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "remote_write test CA");
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
    (pem, Arc::new(server))
}

/// An `https://` receiver on a thread: for each of `connections` connections, reads one
/// request and answers 204; a connection whose handshake fails ends. Returns the URL and,
/// joined, the request bodies (snappy) it read.
fn tls_receiver(tls: Arc<rustls::ServerConfig>, connections: usize) -> (String, std::thread::JoinHandle<Vec<Vec<u8>>>) {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("https://{}/api/v1/write", listener.local_addr().expect("addr"));
    let handle = std::thread::spawn(move || {
        let mut bodies = Vec::new();
        for _ in 0..connections {
            let (tcp, _) = listener.accept().expect("accept");
            let session = rustls::ServerConnection::new(Arc::clone(&tls)).expect("TLS session");
            let mut reader = BufReader::new(rustls::StreamOwned::new(session, tcp));
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().expect("content-length");
                }
                if line == "\r\n" {
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).expect("body");
                    bodies.push(body);
                    let answer = "HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                    reader.get_mut().write_all(answer.as_bytes()).expect("answer");
                    let _ = reader.get_mut().flush();
                    break;
                }
            }
        }
        bodies
    });
    (url, handle)
}

#[tokio::test]
async fn https_with_the_ca_file() {
    let (pem, tls) = test_ca();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, pem).expect("write CA");
    let (url, server) = tls_receiver(tls, 2);
    let mut untrusting =
        RemoteWriteClient::new(&config(serde_json::json!({"name": "prom", "url": url}))).expect("client");
    let err = untrusting.send(batch_of(100, &["a"])).await.expect_err("an unknown CA");
    assert!(err.to_string().contains("set ca_file"), "{err}");
    assert_eq!(err.verdict(), Verdict::RetryLater { retry_after: None });
    let cfg = config(serde_json::json!({"name": "prom", "url": url, "ca_file": ca_path}));
    let mut client = RemoteWriteClient::new(&cfg).expect("client");
    let sent = client.send(batch_of(100, &["a"])).await.expect("trusted");
    assert_eq!(sent.status, Some(StatusCode::NO_CONTENT));
    let bodies = server.join().expect("server");
    assert_eq!(bodies.len(), 1);
    let proto = snap::raw::Decoder::new().decompress_vec(&bodies[0]).expect("snappy");
    assert_eq!(WriteRequest::decode(proto.as_slice()).expect("proto").timeseries.len(), 1);
    let cfg = config(serde_json::json!({"name": "prom", "url": url, "ca_file": dir.path().join("none.pem")}));
    let err = RemoteWriteClient::new(&cfg).expect_err("a missing ca_file");
    assert_eq!(err.field, "ca_file", "{err}");
}
