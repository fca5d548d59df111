//! Cost per round of the families of issue 18 (pressure, netstat, nic, pcie, edac,
//! infiniband, temperature), each alone and all together, on this host (where it has the
//! hardware) and on the GPU-server fixture tree; with the OS collectors (os, disk, net) alone
//! and everything together for scale. A round is one `collect` into a reused buffer.
//!
//! The fixture is a tree of regular files on the build machine's filesystem: its reads cost
//! what a path walk, an open and a read of a small file cost there, close to sysfs's own
//! (kernfs generates each attribute on read); firmware-backed attributes (mlx5 counters,
//! some hwmon drivers) cost more on real hardware.
//!
//! `cargo bench -p dcmon-agent --bench collectors`

use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use dcmon_agent::batch::Sample;
use dcmon_agent::collector::{CollectError, Collector, SOURCES};
use dcmon_agent::config::Config;
use dcmon_agent::host::Host;

const NEW: [&str; 7] = ["pressure", "netstat", "nic", "pcie", "edac", "infiniband", "temperature"];
const OS: [&str; 3] = ["os", "disk", "net"];

/// The collectors named, built for `root`, that have their source there.
fn built(root: &Path, names: &[&str]) -> Vec<Box<dyn Collector>> {
    let config = Config { host_root: root.to_owned(), ..Config::default() };
    let host = Host::new(root);
    let mut out = Vec::new();
    for source in SOURCES.iter().filter(|s| names.contains(&s.name)) {
        let Some(build) = source.build else { continue };
        let mut c = build(&host, &config);
        match c.collect(&mut Vec::new()) {
            Ok(()) => out.push(c),
            Err(CollectError::NotPresent(why)) => {
                eprintln!("{} on {}: not present ({why})", source.name, root.display())
            }
            Err(e) => panic!("{} on {}: {e:#}", source.name, root.display()),
        }
    }
    out
}

fn round(collectors: &mut [Box<dyn Collector>], buf: &mut Vec<Sample>) -> usize {
    buf.clear();
    for c in collectors.iter_mut() {
        let _ = c.collect(buf);
    }
    buf.len()
}

fn bench_root(c: &mut Criterion, label: &str, root: &Path) {
    let mut buf = Vec::new();
    for name in NEW {
        let mut one = built(root, &[name]);
        if one.is_empty() {
            continue;
        }
        let samples = round(&mut one, &mut buf);
        c.bench_function(&format!("{label}: {name} ({samples} samples)"), |b| b.iter(|| round(&mut one, &mut buf)));
    }
    for (group, names) in [("all 7 new families", &NEW[..]), ("os+disk+net", &OS[..])] {
        let mut all = built(root, names);
        let samples = round(&mut all, &mut buf);
        c.bench_function(&format!("{label}: {group} ({samples} samples)"), |b| b.iter(|| round(&mut all, &mut buf)));
    }
}

fn collectors(c: &mut Criterion) {
    bench_root(c, "this host", Path::new("/"));
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hosts/gpu-server");
    bench_root(c, "gpu-server fixture", &fixture);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(2)).warm_up_time(std::time::Duration::from_millis(500));
    targets = collectors
}
criterion_main!(benches);
