//! What one upload costs the agent, per transport: the hand-driven hyper connection
//! (`Direct`, plain http) against reqwest (what https and proxied servers use), posting the
//! same batch to the same loopback server in one run, alternating, several repeats so the
//! noise shows. CPU time is the agent thread's alone (the server answers on other threads).
//! Prints numbers; asserts nothing about speed.
//!
//! `cargo bench -p dcmon-agent --bench upload`
#![allow(clippy::print_stdout, reason = "a benchmark prints its numbers")]

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dcmon_agent::batch::{Batch, Sample};
use dcmon_agent::upload::Uploader;

const POSTS: usize = 2000;
const REPEATS: usize = 5;

/// A loopback HTTP/1.1 server answering every request with the dcmon server's 200, a thread
/// per connection. Returns its base URL.
fn serve() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let stream = stream.expect("accept");
            std::thread::spawn(move || answer_every_request(stream));
        }
    });
    base
}

fn answer_every_request(stream: std::net::TcpStream) {
    let body = r#"{"status":"ok","metrics_count":300}"#;
    let answer =
        format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut body = Vec::new();
    loop {
        let mut length = 0;
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().expect("content-length");
            }
            if line == "\r\n" {
                break;
            }
        }
        body.resize(length, 0);
        reader.read_exact(&mut body).expect("body");
        reader.get_mut().write_all(answer.as_bytes()).expect("answer");
    }
}

/// A batch the size of a GPU host's: 300 samples with labels.
fn realistic_batch() -> Bytes {
    let mut batch = Batch::new("bench-machine-0001", 1_795_540_732);
    for i in 0..300_u64 {
        batch.push(
            Sample::count("network_receive_bytes_total", i * 1_000_003)
                .label("interface", format!("enp{}s0f{}", i / 4, i % 4)),
        );
    }
    Bytes::from(batch.to_json())
}

fn main() {
    let base = serve();
    let dir = tempfile::tempdir().expect("tempdir");
    let key_path = dir.path().join("api_key");
    std::fs::write(&key_path, "0123456789abcdef0123456789abcdef\n").expect("key");
    std::fs::set_permissions(&key_path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    let (key, _) = dcmon_agent::api_key::load(&key_path).expect("key");
    let connect = Duration::from_secs(2);
    let total = Duration::from_secs(10);
    let direct = Uploader::new(&base, key.clone(), connect, total, None).expect("direct");
    let reqwest = Uploader::new(&base, key, connect, total, None)
        .and_then(|u| u.with_reqwest_transport(connect))
        .expect("reqwest");
    let body = realistic_batch();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut transports = [("direct (hyper)", direct), ("reqwest", reqwest)];
    println!("{POSTS} posts of {} bytes per run, alternating; per post:", body.len());
    println!("{:<16} {:>6} {:>12} {:>12}", "transport", "repeat", "CPU µs", "wall µs");
    runtime.block_on(async {
        // Warm-up: connections open, allocator and caches settled.
        for (_, uploader) in &mut transports {
            for _ in 0..200 {
                uploader.send(body.clone()).await.expect("accepted");
            }
        }
        for repeat in 1..=REPEATS {
            for (name, uploader) in &mut transports {
                let (cpu, wall) = (common::thread_cpu(), Instant::now());
                for _ in 0..POSTS {
                    uploader.send(body.clone()).await.expect("accepted");
                }
                let per_post = |d: Duration| d.as_secs_f64() * 1e6 / POSTS as f64;
                println!(
                    "{name:<16} {repeat:>6} {:>12.1} {:>12.1}",
                    per_post(common::thread_cpu() - cpu),
                    per_post(wall.elapsed())
                );
            }
        }
    });
}
