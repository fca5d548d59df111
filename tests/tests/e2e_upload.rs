//! The real `dcmon-agent` binary against a receiver that behaves like the dcmon server.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dcmon_tests::{AgentProcess, Receiver, validate_batch, wait_until, write_key};
use serde_json::{Value, json};

const KEY: &str = "dcmon_e2eKeyE2eKeyE2eKeyE2eKeyE2eKeyE2eKeyE2e";
const MACHINE: &str = "e2e-machine-0001";

fn write_config(dir: &std::path::Path, extra: Value) -> std::path::PathBuf {
    let mut cfg = json!({
        "collection_interval": 1,
        "machine_id": MACHINE,
        "api_key_file": dir.join("api_key"),
        "outbox_dir": dir.join("outbox"),
        "exporters": {"ipmi": false, "apt": false, "nvme": false, "nvsmi": false},
    });
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        cfg[k] = v;
    }
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&cfg).expect("json")).expect("write config");
    p
}

#[test]
fn batches_arrive_every_interval_with_auth_names_labels_and_integer_timestamps() {
    let receiver = Receiver::start(&[(KEY, MACHINE)]).expect("receiver");
    let dir = tempfile::tempdir().expect("tempdir");
    write_key(dir.path(), KEY).expect("key");
    let config = write_config(dir.path(), json!({"server_url": receiver.url()}));
    let mut agent = AgentProcess::start(dir.path(), &config, &["run"]).expect("start agent");

    let got = receiver.wait_for_accepted(3, Duration::from_secs(15));
    assert!(
        got.len() >= 3,
        "only {} batches in 15 s; rejected: {:?}; agent log:\n{}",
        got.len(),
        receiver.rejected(),
        agent.stderr()
    );
    assert!(agent.try_wait().is_none(), "agent exited:\n{}", agent.stderr());
    assert!(receiver.rejected().is_empty(), "rejected: {:?}", receiver.rejected());

    let mut timestamps = Vec::new();
    for b in &got {
        assert_eq!(b.authorization, format!("Bearer {KEY}"));
        validate_batch(&b.json).expect("schema");
        assert_eq!(b.json["machine_id"], MACHINE);
        let ts = b.json["timestamp"].as_i64().expect("integer batch timestamp");
        timestamps.push(ts);
        let metrics = b.json["metrics"].as_array().expect("metrics");
        let names: BTreeSet<&str> = metrics.iter().filter_map(|m| m["name"].as_str()).collect();
        for want in [
            "cpu_load_1m",
            "cpu_load_5m",
            "cpu_load_15m",
            "cpu_usage_percent",
            "memory_total_bytes",
            "memory_available_bytes",
            "memory_used_bytes",
            "memory_usage_percent",
            "disk_reads_total",
            "disk_read_bytes_total",
            "disk_writes_total",
            "disk_write_bytes_total",
            "dcmon_collector_duration_seconds",
            "dcmon_collector_success",
        ] {
            assert!(names.contains(want), "{want} missing from batch: {names:?}");
        }
        for m in metrics {
            assert!(m["timestamp"].is_i64(), "metric timestamp not an integer: {m}");
            assert_eq!(m["timestamp"].as_i64(), Some(ts));
            let labels = m["labels"].as_object().expect("labels object");
            assert!(labels.values().all(Value::is_string), "{m}");
            let name = m["name"].as_str().unwrap_or_default();
            let want_labels: &[&str] = match name {
                // eBPF mode's own families (README, Metrics).
                "disk_io_latency_seconds_bucket" => &["device", "le", "op"],
                "disk_io_latency_seconds_sum" | "disk_io_latency_seconds_count" => &["device", "op"],
                "network_drops_total" if !labels.contains_key("interface") => &["reason"],
                "network_drops_total" => &["interface", "reason"],
                "tcp_retransmits_total" => &["family"],
                "oom_kills_total" => &["job"],
                "dcmon_ebpf_overflow_total" => &["map"],
                n if n.starts_with("disk_") => &["device"],
                n if n.starts_with("network_") => &["interface"],
                n if n.starts_with("dcmon_collector_") => &["collector"],
                n if n.starts_with("dcmon_ebpf_program_") => &["program"],
                n if n.starts_with("pressure_") => &["resource"],
                n if n.starts_with("dcmon_output_") => &["output"],
                n if n.starts_with("filesystem_") => &["device", "fstype", "mountpoint"],
                _ => &[],
            };
            let mut keys: Vec<&str> = labels.keys().map(String::as_str).collect();
            keys.sort_unstable();
            assert_eq!(keys, want_labels, "{m}");
            // Seconds counters (PSI stall time, BPF run time) have fractions; the rest are counts.
            if (name.ends_with("_total") && !name.ends_with("_seconds_total")) || name.ends_with("_bytes") {
                assert!(m["value"].is_u64(), "counter {name} not sent as an integer: {m}");
            }
        }
        // All three OS collectors worked.
        for c in ["os", "disk", "net"] {
            assert!(
                metrics.iter().any(|m| m["name"] == "dcmon_collector_success"
                    && m["labels"]["collector"] == c
                    && m["value"] == 1),
                "collector {c} not successful in {}",
                b.json
            );
        }
    }
    // Fixed cadence: one batch per second, consecutive timestamps 1 s apart (give or take the
    // second boundary), arrival gaps close to 1 s.
    for w in timestamps.windows(2) {
        assert!((1..=2).contains(&(w[1] - w[0])), "timestamps {timestamps:?}");
    }
    for w in got.windows(2) {
        let gap = w[1].at.duration_since(w[0].at);
        assert!(gap > Duration::from_millis(500) && gap < Duration::from_millis(1700), "gap {gap:?}");
    }
    assert!(!agent.stderr().contains(KEY), "the key leaked into the log");

    // SIGTERM: clean exit 0.
    let status = agent.signal_and_wait("TERM", Duration::from_secs(10)).expect("exit after SIGTERM");
    assert!(status.success(), "exit {status:?}:\n{}", agent.stderr());
}

/// With `http_proxy` set, batches go through the proxy (reqwest's path, not the direct
/// connection): here the receiver is the proxy, and the server's name does not even resolve.
#[test]
fn an_http_proxy_from_the_environment_is_used() {
    let receiver = Receiver::start(&[(KEY, MACHINE)]).expect("receiver");
    let dir = tempfile::tempdir().expect("tempdir");
    write_key(dir.path(), KEY).expect("key");
    let config = write_config(dir.path(), json!({"server_url": "http://dcmon-server.invalid:8000"}));
    let proxy = std::ffi::OsString::from(receiver.url());
    let agent = AgentProcess::start_with_env(dir.path(), &config, &["run"], &[("http_proxy", &proxy)]).expect("agent");
    let got = receiver.wait_for_accepted(2, Duration::from_secs(15));
    assert!(got.len() >= 2, "{} batches through the proxy; agent log:\n{}", got.len(), agent.stderr());
}

/// An internal CA made for the test and a rustls server config for `host`, signed by it.
fn internal_ca(host: &str) -> (String, Arc<rustls::ServerConfig>) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca = rcgen::CertificateParams::new(Vec::new()).expect("CA params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "dcmon e2e internal CA");
    let ca_pem = ca.self_signed(&ca_key).expect("CA certificate").pem();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().expect("server key");
    let params = rcgen::CertificateParams::new(vec![host.to_owned()]).expect("server params");
    let certificate = params.signed_by(&key, &issuer).expect("server certificate");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![certificate.der().clone()], key.into())
        .expect("server config");
    (ca_pem, Arc::new(config))
}

/// A TLS server on loopback that hands each connection's plain bytes to `upstream` (the
/// receiver): the dcmon server behind TLS. Returns its address.
fn tls_front(config: Arc<rustls::ServerConfig>, upstream: SocketAddr) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let (Ok(mut tls), Ok(mut plain)) =
                        (acceptor.accept(tcp).await, tokio::net::TcpStream::connect(upstream).await)
                    else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
    });
    addr
}

/// An HTTP CONNECT proxy on loopback that tunnels every CONNECT to `upstream`, whatever host
/// it names, and records each request line. Returns its address and the lines.
fn connect_proxy(upstream: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    use std::io::{BufRead as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&seen);
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            let seen = Arc::clone(&recorded);
            std::thread::spawn(move || {
                let mut from_client = std::io::BufReader::new(client.try_clone().expect("clone"));
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    if from_client.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push(line.trim_end().to_owned());
                }
                seen.lock().expect("lock").push(head.first().cloned().unwrap_or_default());
                let Ok(server) = std::net::TcpStream::connect(upstream) else { return };
                let mut to_client = client;
                let _ = to_client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
                let mut from_server = server.try_clone().expect("clone");
                std::thread::spawn(move || std::io::copy(&mut from_server, &mut to_client));
                let mut to_server = server;
                let _ = std::io::copy(&mut from_client, &mut to_server);
                let _ = to_server.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (addr, seen)
}

/// An https server signed by an internal CA (trusted through `ca_file`), reached through the
/// HTTP CONNECT proxy in `https_proxy`: the batches really go through the tunnel (the
/// server's name does not even resolve), and the TLS session is end to end.
#[test]
fn https_with_an_internal_ca_goes_through_the_connect_proxy_in_https_proxy() {
    let receiver = Receiver::start(&[(KEY, MACHINE)]).expect("receiver");
    let (ca_pem, tls) = internal_ca("dcmon-server.invalid");
    let front = tls_front(tls, receiver.addr());
    let (proxy, connects) = connect_proxy(front);
    let dir = tempfile::tempdir().expect("tempdir");
    write_key(dir.path(), KEY).expect("key");
    let ca_path = dir.path().join("internal-ca.pem");
    std::fs::write(&ca_path, ca_pem).expect("write CA");
    let config =
        write_config(dir.path(), json!({"server_url": "https://dcmon-server.invalid:8443", "ca_file": ca_path}));
    let proxy_url = std::ffi::OsString::from(format!("http://{proxy}"));
    let agent =
        AgentProcess::start_with_env(dir.path(), &config, &["run"], &[("https_proxy", &proxy_url)]).expect("agent");
    let got = receiver.wait_for_accepted(2, Duration::from_secs(15));
    assert!(got.len() >= 2, "{} batches through the proxy; agent log:\n{}", got.len(), agent.stderr());
    assert!(got.iter().all(|b| b.authorization == format!("Bearer {KEY}")));
    let connects = connects.lock().expect("lock").clone();
    assert!(!connects.is_empty(), "the proxy saw no CONNECT");
    assert!(connects.iter().all(|c| c == "CONNECT dcmon-server.invalid:8443 HTTP/1.1"), "{connects:?}");
}

/// Without the CA in `ca_file`, the same server is refused, and the log says what to set.
#[test]
fn https_without_the_internal_ca_is_refused_saying_to_set_ca_file() {
    let receiver = Receiver::start(&[(KEY, MACHINE)]).expect("receiver");
    let (_, tls) = internal_ca("127.0.0.1");
    let front = tls_front(tls, receiver.addr());
    let dir = tempfile::tempdir().expect("tempdir");
    write_key(dir.path(), KEY).expect("key");
    let config = write_config(dir.path(), json!({"server_url": format!("https://{front}")}));
    let agent = AgentProcess::start(dir.path(), &config, &["run"]).expect("agent");
    let log = wait_until(Duration::from_secs(10), || Some(agent.stderr()).filter(|l| l.contains("UnknownIssuer")));
    let log = log.unwrap_or_else(|| agent.stderr());
    assert!(log.contains("invalid peer certificate: UnknownIssuer") && log.contains("set ca_file"), "{log}");
    assert!(receiver.accepted().is_empty());
}

/// A `ca_file` that is not a PEM bundle stops `run` with exit 78 and fails `check`, both
/// naming the file and what was expected.
#[test]
fn a_ca_file_that_is_not_pem_stops_run_and_fails_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_key(dir.path(), KEY).expect("key");
    let ca_path = dir.path().join("ca.der");
    std::fs::write(&ca_path, [0x30, 0x82, 0x01, 0x0a]).expect("write");
    let config = write_config(dir.path(), json!({"server_url": "https://127.0.0.1:9", "ca_file": ca_path}));
    let want = format!("field `ca_file`: {}: holds no certificate: expected a PEM bundle", ca_path.display());
    let mut agent = AgentProcess::start(dir.path(), &config, &["run"]).expect("start agent");
    let status = wait_until(Duration::from_secs(10), || agent.try_wait()).expect("agent should exit");
    assert_eq!(status.code(), Some(78), "{}", agent.stderr());
    assert!(agent.stderr().contains(&want), "{}", agent.stderr());
    let mut check = AgentProcess::start(dir.path(), &config, &["check"]).expect("start check");
    let status = wait_until(Duration::from_secs(10), || check.try_wait()).expect("check should exit");
    assert!(!status.success());
    let report = std::fs::read_to_string(dir.path().join("agent.stdout")).expect("check's report");
    assert!(report.contains("[FAIL] config") && report.contains(&want), "{report}");
}

#[test]
fn wrong_key_is_logged_as_401_and_the_agent_keeps_running() {
    let receiver = Receiver::start(&[(KEY, MACHINE)]).expect("receiver");
    let dir = tempfile::tempdir().expect("tempdir");
    let wrong = "dcmon_wrongWrongWrongWrongWrongWrongWrongWron";
    write_key(dir.path(), wrong).expect("key");
    let config = write_config(dir.path(), json!({"server_url": receiver.url(), "auth_retry_interval": 1}));
    let mut agent = AgentProcess::start(dir.path(), &config, &["run"]).expect("start agent");

    let rejected = receiver.wait_for_rejected(3, Duration::from_secs(15));
    assert!(rejected.len() >= 3, "agent stopped trying: {rejected:?}\n{}", agent.stderr());
    assert!(rejected.iter().all(|r| r.status == 401), "{rejected:?}");
    assert!(receiver.accepted().is_empty());
    assert!(agent.try_wait().is_none(), "agent exited on 401:\n{}", agent.stderr());
    let log = agent.stderr();
    assert!(log.contains("401") && log.contains("Invalid API key") && log.contains("API key was refused"), "{log}");
    assert!(!log.contains(wrong), "the key leaked into the log:\n{log}");
}

/// Issue 14: README says `--log-level debug` shows every batch; no line was logged per batch.
#[test]
fn debug_log_shows_every_batch() {
    let receiver = Receiver::start(&[(KEY, MACHINE)]).expect("receiver");
    let dir = tempfile::tempdir().expect("tempdir");
    write_key(dir.path(), KEY).expect("key");
    let config = write_config(dir.path(), json!({"server_url": receiver.url()}));
    let agent = AgentProcess::start(dir.path(), &config, &["run", "--log-level", "debug"]).expect("start agent");
    let got = receiver.wait_for_accepted(3, Duration::from_secs(15));
    assert!(got.len() >= 3, "{}", agent.stderr());
    let log = wait_until(Duration::from_secs(5), || {
        Some(agent.stderr()).filter(|l| l.matches("batch posted").count() >= got.len())
    })
    .unwrap_or_else(|| agent.stderr());
    for (seq, batch) in got.iter().enumerate() {
        let samples = batch.json["metrics"].as_array().map_or(0, Vec::len);
        let want = format!("seq={seq} samples={samples} bytes={} status=200 took=", batch.body.len());
        assert!(log.lines().any(|l| l.contains("DEBUG") && l.contains(&want)), "no {want:?} in:\n{log}");
    }
}

#[test]
fn machine_id_mismatch_is_a_clear_403() {
    let receiver = Receiver::start(&[(KEY, "another-machine")]).expect("receiver");
    let dir = tempfile::tempdir().expect("tempdir");
    write_key(dir.path(), KEY).expect("key");
    let config = write_config(dir.path(), json!({"server_url": receiver.url()}));
    let agent = AgentProcess::start(dir.path(), &config, &["run"]).expect("start agent");
    let rejected = receiver.wait_for_rejected(1, Duration::from_secs(10));
    assert_eq!(rejected.first().map(|r| r.status), Some(403), "{rejected:?}");
    let log = wait_until(Duration::from_secs(5), || Some(agent.stderr()).filter(|l| l.contains("Machine ID mismatch")));
    assert!(log.is_some(), "{}", agent.stderr());
}

#[test]
fn malformed_config_exits_non_zero_naming_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.json");
    std::fs::write(&config, "{\n  \"server_url\": \"http://127.0.0.1:9\",\n  \"collection_interval\": 30,,\n}\n")
        .expect("write");
    let mut agent = AgentProcess::start(dir.path(), &config, &["run"]).expect("start agent");
    let status = wait_until(Duration::from_secs(10), || agent.try_wait()).expect("agent should exit");
    assert!(!status.success());
    let log = agent.stderr();
    assert!(log.contains(&config.display().to_string()) && log.contains("line 3, column 29"), "{log}");

    // A value of the wrong type: the field is named.
    std::fs::write(&config, "{\"collection_interval\": \"often\"}").expect("write");
    let mut agent = AgentProcess::start(dir.path(), &config, &["once"]).expect("start agent");
    let status = wait_until(Duration::from_secs(10), || agent.try_wait()).expect("agent should exit");
    assert!(!status.success());
    assert!(agent.stderr().contains("field `collection_interval`"), "{}", agent.stderr());
}

#[test]
fn missing_key_file_says_how_to_create_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), json!({"server_url": "http://127.0.0.1:9"}));
    let mut agent = AgentProcess::start(dir.path(), &config, &["run"]).expect("start agent");
    let status = wait_until(Duration::from_secs(10), || agent.try_wait()).expect("agent should exit");
    assert!(!status.success());
    let log = agent.stderr();
    assert!(log.contains("echo 'YOUR_API_KEY' | sudo tee") && log.contains("chmod 600"), "{log}");
}

#[test]
fn unreachable_server_does_not_stop_collection() {
    // Nothing listens on the port: uploads fail with a connection error, the agent keeps going.
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    let dir = tempfile::tempdir().expect("tempdir");
    write_key(dir.path(), KEY).expect("key");
    let config =
        write_config(dir.path(), json!({"server_url": format!("http://127.0.0.1:{port}"), "connect_timeout": 1}));
    let mut agent = AgentProcess::start(dir.path(), &config, &["run"]).expect("start agent");
    let log = wait_until(Duration::from_secs(10), || Some(agent.stderr()).filter(|l| l.contains("cannot reach")));
    assert!(log.is_some(), "{}", agent.stderr());
    assert!(agent.try_wait().is_none(), "agent exited:\n{}", agent.stderr());
}

#[test]
fn a_five_megabyte_batch_is_accepted_like_the_real_server_does() {
    // A host with ~25,000 interfaces sends batches of several MB; the real server takes them.
    use dcmon_agent::batch::{Batch, Sample};
    let receiver = Receiver::start(&[(KEY, MACHINE)]).expect("receiver");
    let dir = tempfile::tempdir().expect("tempdir");
    let key_path = write_key(dir.path(), KEY).expect("key");
    let (key, _) = dcmon_agent::api_key::load(&key_path).expect("key");
    let mut batch = Batch::new(MACHINE, 1_795_540_732);
    for i in 0..50_000 {
        batch.push(Sample::count("network_receive_bytes_total", i).label("interface", format!("eth{i}")));
    }
    let body = batch.to_json();
    assert!(body.len() > 4_000_000, "{} bytes", body.len());
    let mut uploader =
        dcmon_agent::upload::Uploader::new(&receiver.url(), key, Duration::from_secs(5), Duration::from_secs(30), None)
            .expect("uploader");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let accepted = rt.block_on(uploader.send(body.into())).expect("accepted");
    assert_eq!(accepted.metrics_count, Some(50_000));
}
