//! A stand-in dcmon server for trying the agent without one:
//! `dcmon-test-receiver API_KEY MACHINE_ID [SECONDS]` listens on 127.0.0.1, prints its URL, then
//! one line per request it answered, and exits after SECONDS (default: never).

#![allow(clippy::print_stdout, reason = "printing what arrives is what this tool is for")]

use std::time::Duration;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(key), Some(machine)) = (args.first(), args.get(1)) else {
        anyhow::bail!("usage: dcmon-test-receiver API_KEY MACHINE_ID [SECONDS]");
    };
    let seconds: Option<u64> = args.get(2).map(|s| s.parse()).transpose()?;
    let receiver = dcmon_tests::Receiver::start(&[(key.as_str(), machine.as_str())])?;
    println!("{}", receiver.url());
    let started = std::time::Instant::now();
    let (mut seen_ok, mut seen_err) = (0, 0);
    while seconds.is_none_or(|s| started.elapsed() < Duration::from_secs(s)) {
        std::thread::sleep(Duration::from_millis(100));
        let (ok, err) = (receiver.accepted(), receiver.rejected());
        for a in &ok[seen_ok..] {
            let n = a.json["metrics"].as_array().map_or(0, Vec::len);
            println!("accepted batch: {} metrics, {} bytes", n, a.body.len());
        }
        for r in &err[seen_err..] {
            println!("rejected: {} {}", r.status, r.detail);
        }
        (seen_ok, seen_err) = (ok.len(), err.len());
    }
    Ok(())
}
