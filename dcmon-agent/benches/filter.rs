//! What matching device names against include/exclude patterns costs: the agent's
//! hand-written byte matcher (`DeviceFilter::allows`) against the `wildmatch` crate that
//! could replace it, on the default interface excludes and a host's worth of interface names,
//! in one run, alternating, repeated so the noise shows. Both are called through a function
//! that is never inlined, so neither gains from being compiled into the bench. CPU time of
//! this thread. Prints numbers; asserts nothing about speed.
//!
//! `cargo bench -p dcmon-agent --bench filter`
#![allow(clippy::print_stdout, reason = "a benchmark prints its numbers")]

mod common;

use std::hint::black_box;

use dcmon_agent::config::DeviceFilter;
use wildmatch::WildMatch;

const ROUNDS: usize = 2000;
const REPEATS: usize = 10;

/// The same filter as [`DeviceFilter`], on `wildmatch` patterns compiled once.
struct CrateFilter {
    include: Vec<WildMatch>,
    exclude: Vec<WildMatch>,
}

#[inline(never)]
fn agent_allows(filter: &DeviceFilter, name: &str) -> bool {
    filter.allows(name)
}

#[inline(never)]
fn crate_allows(filter: &CrateFilter, name: &str) -> bool {
    filter.include.iter().any(|p| p.matches(name)) && !filter.exclude.iter().any(|p| p.matches(name))
}

fn main() {
    let excludes = ["lo", "ifb*", "docker*", "veth*", "br-*", "virbr*", "tun*", "tap*", "tailscale*"];
    let agent = DeviceFilter::default_interfaces();
    let by_crate = CrateFilter {
        include: vec![WildMatch::new("*")],
        exclude: excludes.iter().map(|p| WildMatch::new(p)).collect(),
    };
    // A GPU host: NICs, IB ports, a bond, and a few hundred container veths.
    let mut names: Vec<String> = (0..16).map(|i| format!("enp{i}s0f{}", i % 2)).collect();
    names.extend((0..8).map(|i| format!("ibp{i}s0")));
    names.extend(["bond0", "lo", "docker0"].map(String::from));
    names.extend((0..300).map(|i| format!("veth{i:07x}")));
    for name in &names {
        assert_eq!(crate_allows(&by_crate, name), agent_allows(&agent, name), "{name}");
    }
    let hand = |name: &str| agent_allows(&agent, name);
    let wildmatch = |name: &str| crate_allows(&by_crate, name);
    println!("{} names x {} patterns, {ROUNDS} rounds per run; CPU per name:", names.len(), excludes.len() + 1);
    println!("{:<12} {:>6} {:>8}", "matcher", "repeat", "ns");
    for repeat in 1..=REPEATS {
        for (matcher, allows) in [("hand", &hand as &dyn Fn(&str) -> bool), ("wildmatch", &wildmatch)] {
            let started = common::thread_cpu();
            let mut kept = 0;
            for _ in 0..ROUNDS {
                kept += names.iter().filter(|n| allows(black_box(n))).count();
            }
            black_box(kept);
            let per_name = (common::thread_cpu() - started).as_secs_f64() * 1e9 / (ROUNDS * names.len()) as f64;
            println!("{matcher:<12} {repeat:>6} {per_name:>8.1}");
        }
    }
}
