//! `dcmon-agent run` with `prometheus_listen`: the scraped round equals the batch the receiver
//! got for that round, promtool accepts it, OpenMetrics on request, a taken port stops the
//! start naming `prometheus_listen`, and SIGHUP moves the endpoint to a new address.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use dcmon_tests::{AgentConfig, AgentProcess, Receiver, wait_until, write_key};
use serde_json::json;

const KEY: &str = "dcmon_scrapeKeyScrapeKeyScrapeKeyScrapeKeyScr";
const MACHINE: &str = "e2e-scrape-0001";

/// A loopback address with a port nobody listens on (probed, then released).
fn free_loopback() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("probe port");
    l.local_addr().expect("addr")
}

fn config(dir: &std::path::Path, receiver: &Receiver, listen: SocketAddr) -> std::path::PathBuf {
    AgentConfig::without_exporters()
        .extend(json!({
            "collection_interval": 2,
            "machine_id": MACHINE,
            "server_url": receiver.url(),
            "api_key_file": dir.join("api_key"),
            "outbox_dir": dir.join("outbox"),
            "ebpf": "off",
            "prometheus_listen": listen.to_string(),
        }))
        .write(dir)
}

/// Status, Content-Type and body of `GET path` with `accept`.
fn scrape(addr: SocketAddr, path: &str, accept: Option<&str>) -> Option<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{accept}Connection: close\r\n\r\n").as_bytes()).ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let content_type = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type:").map(|v| v.trim().to_owned()))
        .unwrap_or_default();
    Some((status, content_type, body.to_owned()))
}

type Series = BTreeMap<(String, Vec<(String, String)>), f64>;

/// The samples of an exposition text: name and sorted labels to value.
fn parse_text(text: &str) -> Series {
    let mut out = Series::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let (name, labels) = series.split_once('{').expect("labels");
        let labels = labels.strip_suffix('}').expect("closing brace");
        // The test's label values need no escaping: split on `",`.
        let mut pairs: Vec<(String, String)> = labels
            .split("\",")
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once("=\"").expect("label pair");
                (k.to_owned(), v.trim_end_matches('"').to_owned())
            })
            .collect();
        pairs.sort();
        out.insert((name.to_owned(), pairs), value.parse().expect("value"));
    }
    out
}

/// The samples of a JSON batch body, with the `machine_id` label the exposition adds. Values
/// are read from the body's text with Rust's float parser: serde_json's default one (no
/// `float_roundtrip`) may land one ulp off, and the two formats must agree to the bit.
fn parse_batch(body: &[u8]) -> Series {
    use serde_json::value::RawValue;
    let top: BTreeMap<String, &RawValue> = serde_json::from_slice(body).expect("batch");
    let machine_id: String = serde_json::from_str(top["machine_id"].get()).expect("machine id");
    let metrics: Vec<BTreeMap<String, &RawValue>> = serde_json::from_str(top["metrics"].get()).expect("metrics");
    let mut out = Series::new();
    for m in metrics {
        let name: String = serde_json::from_str(m["name"].get()).expect("name");
        let labels: BTreeMap<String, String> = serde_json::from_str(m["labels"].get()).expect("string labels");
        let mut pairs: Vec<(String, String)> = labels.into_iter().collect();
        pairs.push(("machine_id".into(), machine_id.clone()));
        pairs.sort();
        out.insert((name, pairs), m["value"].get().parse().expect("number"));
    }
    out
}

fn promtool_check(text: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package) must be installed");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("promtool");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Exit 3 is lint findings only; the metric names are a contract, so unit advice is fine.
    let ok = out.status.success()
        || (out.status.code() == Some(3) && said.lines().all(|l| l.trim().is_empty() || l.contains(" use base unit ")));
    assert!(ok, "promtool check metrics: {}\n{said}\n{text}", out.status);
}

#[test]
fn scraped_round_equals_the_batch_sent_for_it() {
    let receiver = Receiver::start(&[(KEY, MACHINE)]).expect("receiver");
    let dir = tempfile::tempdir().expect("tempdir");
    write_key(dir.path(), KEY).expect("key");
    let listen = free_loopback();
    let cfg = config(dir.path(), &receiver, listen);
    let started = std::time::Instant::now();
    let mut agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("start agent");

    // Before the first round: 503. The first round comes at least a second after the endpoint
    // is up, so an answer within a second of the start must be the 503 (a slower start, on a
    // loaded host, leaves that to the unit tests).
    let (status, _, body) =
        wait_until(Duration::from_secs(10), || scrape(listen, "/metrics", None)).expect("endpoint up");
    if started.elapsed() < Duration::from_secs(1) {
        assert_eq!(status, 503, "{body}\n{}", agent.stderr());
    }

    assert!(!receiver.wait_for_accepted(1, Duration::from_secs(15)).is_empty(), "no batch:\n{}", agent.stderr());
    let (status, content_type, text) = scrape(listen, "/metrics", None).expect("scrape");
    assert_eq!(status, 200, "{text}");
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    let scraped = parse_text(&text);
    assert!(scraped.keys().any(|(n, _)| n == "cpu_load_1m"), "{text}");
    assert!(scraped.keys().any(|(n, _)| n == "dcmon_outbox_batches"), "self-metrics: {text}");
    // The round scraped is delivered within moments; it is one of the batches received.
    let matched = wait_until(Duration::from_secs(10), || {
        receiver.accepted().iter().find(|b| parse_batch(&b.body) == scraped).map(|b| b.json["timestamp"].clone())
    });
    assert!(
        matched.is_some(),
        "no batch received equals the scrape\nscraped: {scraped:?}\nreceived: {:?}",
        receiver.accepted().iter().map(|b| parse_batch(&b.body)).collect::<Vec<_>>()
    );
    promtool_check(&text);

    let (status, content_type, om) =
        scrape(listen, "/metrics", Some("application/openmetrics-text;version=1.0.0;q=0.5,*/*;q=0.1")).expect("scrape");
    assert_eq!(status, 200);
    assert_eq!(content_type, "application/openmetrics-text; version=1.0.0; charset=utf-8");
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE dcmon_nonfinite_values_dropped counter\n"), "{om}");
    assert_eq!(scrape(listen, "/nope", None).map(|r| r.0), Some(404));

    // SIGHUP with another address: served there, not at the old one.
    let moved = free_loopback();
    config(dir.path(), &receiver, moved);
    assert!(agent.signal_and_wait("HUP", Duration::from_millis(10)).is_none(), "agent exited on SIGHUP");
    let served = wait_until(Duration::from_secs(10), || scrape(moved, "/metrics", None).filter(|r| r.0 == 200));
    assert!(served.is_some(), "not served at {moved} after SIGHUP:\n{}", agent.stderr());
    assert!(scrape(listen, "/metrics", None).is_none(), "still served at {listen}");

    // SIGHUP with a taken port: logged, and the endpoint stays where it is.
    let taken = TcpListener::bind("127.0.0.1:0").expect("listener");
    config(dir.path(), &receiver, taken.local_addr().expect("addr"));
    assert!(agent.signal_and_wait("HUP", Duration::from_millis(10)).is_none(), "agent exited on SIGHUP");
    let logged = wait_until(Duration::from_secs(10), || {
        agent.stderr().lines().any(|l| l.contains("prometheus_listen") && l.contains("still serving")).then_some(())
    });
    assert!(logged.is_some(), "bind failure on reload not logged:\n{}", agent.stderr());
    assert_eq!(scrape(moved, "/metrics", None).map(|r| r.0), Some(200));
    assert!(agent.signal_and_wait("TERM", Duration::from_secs(10)).is_some_and(|s| s.success()), "{}", agent.stderr());
}

#[test]
fn a_taken_port_stops_the_start_naming_prometheus_listen() {
    let receiver = Receiver::start(&[(KEY, MACHINE)]).expect("receiver");
    let dir = tempfile::tempdir().expect("tempdir");
    write_key(dir.path(), KEY).expect("key");
    let taken = TcpListener::bind("127.0.0.1:0").expect("listener");
    let addr = taken.local_addr().expect("addr");
    let cfg = config(dir.path(), &receiver, addr);
    let mut agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("start agent");
    let status = wait_until(Duration::from_secs(10), || agent.try_wait()).expect("agent exits");
    assert_eq!(status.code(), Some(78), "{}", agent.stderr());
    let log = agent.stderr();
    assert!(log.contains("prometheus_listen") && log.contains(&addr.to_string()) && log.contains("in use"), "{log}");
}
