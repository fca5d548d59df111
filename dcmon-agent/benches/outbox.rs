//! What the outbox costs per batch: write + fsync + rename + directory fsync on push, read and
//! verify on send, unlink on acknowledge. Prints numbers; asserts nothing about speed.
//!
//! `cargo bench -p dcmon-agent --bench outbox [-- DIR]` (DIR defaults to a temp dir under
//! /var/tmp, which is disk-backed where /tmp may be tmpfs).
#![allow(clippy::print_stdout, reason = "a benchmark prints its numbers")]

use std::time::{Duration, Instant};

use bytes::Bytes;
use dcmon_agent::outbox::{Outbox, OutboxLimits};

fn main() {
    let base = std::env::args().nth(1).filter(|a| !a.starts_with('-')).unwrap_or_else(|| "/var/tmp".to_owned());
    let dir = tempfile::tempdir_in(&base).expect("temp dir");
    let limits = OutboxLimits { max_bytes: 1 << 30, max_age: Duration::from_secs(3600) };
    let mut outbox = Outbox::open(dir.path(), limits, 0);
    // A typical OS-collector batch is about 2 KB; GPU servers with many devices send ~10 KB.
    for size in [2_048usize, 16_384] {
        let body = Bytes::from(vec![b'x'; size]);
        let rounds = 200;
        let mut push = Vec::with_capacity(rounds);
        for i in 0..rounds {
            let t = Instant::now();
            outbox.push(i64::try_from(i).unwrap_or(0), body.clone());
            push.push(t.elapsed());
        }
        let mut send = Vec::with_capacity(rounds);
        while let Some((seq, _)) = {
            let t = Instant::now();
            let next = outbox.oldest();
            send.push(t.elapsed());
            next
        } {
            let t = Instant::now();
            outbox.remove(seq);
            if let Some(last) = send.last_mut() {
                *last += t.elapsed();
            }
        }
        send.pop();
        push.sort();
        send.sort();
        let med = |v: &[Duration]| v[v.len() / 2];
        let p99 = |v: &[Duration]| v[v.len() * 99 / 100];
        println!(
            "outbox {size:>6} B batch on {base}: push (write+fsync+rename+dir fsync) median {:?} p99 {:?}; read+verify+unlink median {:?} p99 {:?}",
            med(&push),
            p99(&push),
            med(&send),
            p99(&send)
        );
    }
}
