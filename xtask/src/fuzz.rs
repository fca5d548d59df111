//! `cargo xtask fuzz`: seed the corpora from the fixture trees, build every cargo-fuzz target
//! of fuzz/ once, run each for a bounded time and say per target how many inputs it ran and
//! whether it found a crash. Exits non-zero on any finding (CI fails on it).
//!
//! Built without a sanitizer (`-s none`): the agent is safe Rust, so AddressSanitizer would
//! find nothing the panics, overflow checks and debug assertions (all on) do not, and it makes
//! the build on this project's two-core machines several times slower.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context as _, bail};

use crate::clean_command;

/// Where cargo-fuzz puts the target binaries (release, the host triple).
const TARGET_BIN_DIR: &str = "fuzz/target/x86_64-unknown-linux-gnu/release";

/// `cargo xtask fuzz` options.
#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// Seconds each target runs.
    #[arg(long, value_name = "N", default_value_t = 60)]
    pub seconds: u64,
    /// A target to run (repeatable); none: all of them.
    #[arg(long = "target", value_name = "NAME")]
    pub only: Vec<String>,
    /// Write the seed corpora and stop.
    #[arg(long)]
    pub seed_only: bool,
}

/// The target names of fuzz/Cargo.toml (`[[bin]] name = "..."`), in file order.
fn targets(root: &Path) -> anyhow::Result<Vec<String>> {
    let manifest = root.join("fuzz/Cargo.toml");
    let text = std::fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|name| *name != "dcmon-fuzz")
        .map(str::to_owned)
        .collect())
}

/// Files of the fixture host trees (tests/fixtures/hosts/HOST/...) at `rel`, where a `*`
/// component matches every entry.
fn host_files(root: &Path, rel: &str) -> Vec<PathBuf> {
    let mut paths = vec![root.join("tests/fixtures/hosts")];
    for part in std::iter::once("*").chain(rel.split('/')) {
        paths = paths
            .into_iter()
            .flat_map(|p| -> Vec<PathBuf> {
                if part == "*" {
                    let mut entries: Vec<PathBuf> = std::fs::read_dir(&p)
                        .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
                        .unwrap_or_default();
                    entries.sort();
                    entries
                } else {
                    vec![p.join(part)]
                }
            })
            .collect();
    }
    paths.retain(|p| p.is_file());
    paths
}

/// Per target: (file name in the corpus, bytes).
type Seeds = BTreeMap<&'static str, Vec<(String, Vec<u8>)>>;

/// Seed inputs from the fixture trees, per target: (file name in the corpus, bytes). The
/// committed seeds under fuzz/seeds/TARGET are passed to the fuzzer beside these.
fn fixture_seeds(root: &Path) -> anyhow::Result<Seeds> {
    let mut seeds = Seeds::new();
    let from_hosts = [
        ("proc_stat", "proc/stat"),
        ("proc_loadavg", "proc/loadavg"),
        ("proc_meminfo", "proc/meminfo"),
        ("proc_net_dev", "proc/net/dev"),
        ("proc_diskstats", "proc/diskstats"),
        ("sys_block_stat", "sys/block/*/stat"),
    ];
    let fixtures = root.join("tests/fixtures");
    for (target, rel) in from_hosts {
        for path in host_files(root, rel) {
            let name = path.strip_prefix(&fixtures).unwrap_or(&path).to_string_lossy().replace('/', "_");
            let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            seeds.entry(target).or_default().push((name, bytes));
        }
    }
    let nvme = fixtures.join("nvme");
    let dir = std::fs::read_dir(&nvme).with_context(|| format!("listing {}", nvme.display()))?;
    for entry in dir {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            seeds.entry("nvme_smart_log_json").or_default().push((name, std::fs::read(&path)?));
        }
    }
    // The stand-in nvidia-smi script echoes the CSV lines the real tool prints: the GPU query
    // without and with the health fields (19 and 27 fields) and the remapped rows (5).
    let script_path = fixtures.join("gpu/nvidia-smi");
    let script = std::fs::read_to_string(&script_path).with_context(|| format!("reading {}", script_path.display()))?;
    let lines: Vec<String> = script
        .lines()
        .filter_map(|l| l.trim().strip_prefix("echo \"")?.strip_suffix('"').map(|l| format!("{l}\n")))
        .filter(|l| !l.starts_with("Invalid"))
        .collect();
    for (fields, name) in [(19, "fixture-two-gpus"), (27, "fixture-two-gpus-health"), (5, "fixture-remapped-rows")] {
        let csv: String = lines.iter().filter(|l| l.split(',').count() == fields).map(String::as_str).collect();
        anyhow::ensure!(!csv.is_empty(), "{}: no {fields}-field line to seed the fuzzer with", script_path.display());
        seeds.entry("nvidia_smi").or_default().push((name.into(), csv.into_bytes()));
    }
    Ok(seeds)
}

/// Write the fixture seeds into fuzz/corpus/TARGET (ignored by git; the fuzzer adds to it).
fn write_corpora(root: &Path) -> anyhow::Result<()> {
    for (target, files) in fixture_seeds(root)? {
        let dir = root.join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, bytes) in files {
            std::fs::write(dir.join(&name), bytes).with_context(|| format!("writing {}/{name}", dir.display()))?;
        }
    }
    Ok(())
}

/// What one target's run came to.
#[derive(Debug)]
struct Outcome {
    target: String,
    executions: Option<u64>,
    /// The input libFuzzer wrote for a crash, timeout or out-of-memory, if any.
    finding: Option<String>,
}

/// libFuzzer's `-print_final_stats=1` line `stat::number_of_executed_units: N`, and the
/// `Test unit written to PATH` line of a finding.
fn read_log(target: &str, log: &str) -> Outcome {
    let executions =
        log.lines().find_map(|l| l.strip_prefix("stat::number_of_executed_units:")).and_then(|n| n.trim().parse().ok());
    let finding = log.lines().find_map(|l| Some(l.split_once("Test unit written to ")?.1.trim().to_owned()));
    Outcome { target: target.to_owned(), executions, finding }
}

/// Build every target once, then run each for `args.seconds`.
pub fn run(root: &Path, args: &FuzzArgs) -> anyhow::Result<()> {
    write_corpora(root)?;
    if args.seed_only {
        eprintln!("xtask: wrote the seed corpora under {}", root.join("fuzz/corpus").display());
        return Ok(());
    }
    let all = targets(root)?;
    for name in &args.only {
        if !all.contains(name) {
            bail!("no fuzz target `{name}` in fuzz/Cargo.toml (targets: {})", all.join(", "));
        }
    }
    let chosen: Vec<&String> = all.iter().filter(|t| args.only.is_empty() || args.only.contains(t)).collect();
    let started = std::time::Instant::now();
    let status = clean_command("cargo")
        .args(["+nightly", "fuzz", "build", "-s", "none"])
        .current_dir(root.join("fuzz"))
        .status()
        .context("running `cargo +nightly fuzz build` (install it with `cargo install cargo-fuzz --locked`)")?;
    if !status.success() {
        bail!("`cargo +nightly fuzz build -s none` failed ({status})");
    }
    eprintln!("xtask: fuzz targets built in {:.0?}", started.elapsed());

    let mut outcomes = Vec::new();
    for target in chosen {
        let corpus = root.join("fuzz/corpus").join(target);
        let artifacts = root.join("fuzz/artifacts").join(target);
        for dir in [&corpus, &artifacts] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let bin = root.join(TARGET_BIN_DIR).join(target);
        let mut cmd = clean_command(&bin.to_string_lossy());
        cmd.arg(format!("-max_total_time={}", args.seconds))
            .arg("-print_final_stats=1")
            // A single input taking seconds is a hang: report it as a finding.
            .arg("-timeout=10")
            .arg("-rss_limit_mb=2048")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg(&corpus);
        let seeds = root.join("fuzz/seeds").join(target);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        eprintln!("xtask: fuzzing {target} for {} s", args.seconds);
        let out = cmd.stdout(Stdio::null()).output().with_context(|| format!("running {}", bin.display()))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let mut outcome = read_log(target, &log);
        if !out.status.success() && outcome.finding.is_none() {
            // Not a finding libFuzzer wrote down: show why it stopped.
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            outcome.finding = Some(format!("exited with {} (log above)", out.status));
        }
        if let Some(found) = &outcome.finding {
            let crash: Vec<&str> =
                log.lines().filter(|l| l.contains("panicked at") || l.starts_with("==")).take(5).collect();
            eprintln!("xtask: {target}: FOUND {found}\n{}", crash.join("\n"));
        }
        outcomes.push(outcome);
    }

    // The table goes to stdout (the progress above went to stderr).
    let mut table = format!("{:<22} {:>12}  findings\n", "target", "executions");
    for o in &outcomes {
        let runs = o.executions.map_or_else(|| "?".to_owned(), |n| n.to_string());
        table.push_str(&format!("{:<22} {runs:>12}  {}\n", o.target, o.finding.as_deref().unwrap_or("none")));
    }
    let _ = std::io::stdout().lock().write_all(table.as_bytes());
    let found = outcomes.iter().filter(|o| o.finding.is_some()).count();
    if found > 0 {
        bail!(
            "{found} target(s) found a crash; reproduce with `fuzz/target/x86_64-unknown-linux-gnu/release/TARGET FILE`"
        );
    }
    Ok(())
}
