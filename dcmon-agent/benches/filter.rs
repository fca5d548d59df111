//! What matching device names against include/exclude patterns costs: the agent's
//! hand-written byte matcher (`DeviceFilter::allows`) against the `wildmatch` crate that
//! could replace it, on the default interface excludes and a host's worth of interface names,
//! in one run, alternating, repeated so the noise shows. Prints numbers; asserts nothing
//! about speed.
//!
//! `cargo bench -p dcmon-agent --bench filter`
#![allow(clippy::print_stdout, reason = "a benchmark prints its numbers")]

use std::hint::black_box;
use std::time::Instant;

use dcmon_agent::config::DeviceFilter;
use wildmatch::WildMatch;

const ROUNDS: usize = 2000;
const REPEATS: usize = 5;

fn main() {
    let excludes = ["lo", "ifb*", "docker*", "veth*", "br-*", "virbr*", "tun*", "tap*", "tailscale*"];
    let filter = DeviceFilter::default_interfaces();
    // A GPU host: NICs, IB ports, a bond, and a few hundred container veths.
    let mut names: Vec<String> = (0..16).map(|i| format!("enp{i}s0f{}", i % 2)).collect();
    names.extend((0..8).map(|i| format!("ibp{i}s0")));
    names.extend(["bond0", "lo", "docker0"].map(String::from));
    names.extend((0..300).map(|i| format!("veth{i:07x}")));
    let include = WildMatch::new("*");
    let exclude: Vec<WildMatch> = excludes.iter().map(|p| WildMatch::new(p)).collect();
    let agent_allows = |name: &str| filter.allows(name);
    let crate_allows = |name: &str| include.matches(name) && !exclude.iter().any(|p| p.matches(name));
    for name in &names {
        assert_eq!(crate_allows(name), agent_allows(name), "{name}");
    }
    println!("{} names x {} patterns, {ROUNDS} rounds per run; per name:", names.len(), excludes.len() + 1);
    println!("{:<12} {:>6} {:>8}", "matcher", "repeat", "ns");
    for repeat in 1..=REPEATS {
        for (matcher, allows) in [("hand", &agent_allows as &dyn Fn(&str) -> bool), ("wildmatch", &crate_allows)] {
            let started = Instant::now();
            let mut kept = 0;
            for _ in 0..ROUNDS {
                kept += names.iter().filter(|n| allows(black_box(n))).count();
            }
            black_box(kept);
            let per_name = started.elapsed().as_secs_f64() * 1e9 / (ROUNDS * names.len()) as f64;
            println!("{matcher:<12} {repeat:>6} {per_name:>8.1}");
        }
    }
}
