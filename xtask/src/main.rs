//! Developer chores. `cargo xtask build-ebpf [--check]` builds the BPF object that the agent
//! embeds; `--check` (CI) fails when the committed object differs from what the source builds.
//! `cargo xtask bench` measures the agent's cost beside node_exporter and collectd.
//! `cargo xtask fuzz` runs the cargo-fuzz targets of fuzz/ for a bounded time each;
//! `cargo xtask mutants` runs cargo-mutants on the files whose unit tests must catch mutants.
//! `cargo xtask bless` rewrites the golden batches of the fixture hosts (tests/fixtures/golden).
//! `cargo xtask gpu-check` compares the agent's GPU metrics with `nvidia-smi -q -x` on an NVIDIA host.
//! `cargo xtask deb` builds the Debian package and runs lintian on it; `cargo xtask static`
//! builds the static (musl) agent.

mod bench;
mod bench_targets;
mod fuzz;
mod gpu_check;
mod mutants;
mod package;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use dcmon_tests::workspace_root;

/// The committed object, relative to the workspace root; the agent embeds it with
/// include_bytes so stable `cargo build` needs no BPF toolchain.
const OBJECT: &str = "dcmon-agent/ebpf/dcmon-ebpf.o";
/// The rustc and bpf-linker that built the committed object, so a `--check` mismatch caused by
/// a different nightly is easy to tell from a stale object.
const TOOLCHAIN_NOTE: &str = "dcmon-agent/ebpf/dcmon-ebpf.built-with";
/// Developer chores for dcmon.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Build dcmon-ebpf (nightly, bpfel-unknown-none, bpf-linker) into dcmon-agent/ebpf/.
    BuildEbpf {
        /// Build into target/ and fail if it differs from the committed object.
        #[arg(long)]
        check: bool,
        /// The rustup toolchain to build with.
        #[arg(long, value_name = "NAME", default_value = "nightly")]
        toolchain: String,
    },
    /// Measure the agent's cost beside node_exporter and collectd (builds release).
    Bench(bench::BenchArgs),
    /// Seed fuzz/corpus from the fixtures, build every fuzz target and run each for a while.
    Fuzz(fuzz::FuzzArgs),
    /// cargo-mutants on the files whose unit tests must catch mutants.
    Mutants(mutants::MutantsArgs),
    /// Rewrite the golden batches (tests/fixtures/golden) from the agent as it is now.
    Bless,
    /// On an NVIDIA host: `dcmon-agent once` against `nvidia-smi -q -x`, every GPU metric.
    GpuCheck(gpu_check::GpuCheckArgs),
    /// Build the Debian package (cargo-deb) into target/debian/ and check it with lintian.
    Deb(package::DebArgs),
    /// Build the static agent for x86_64-unknown-linux-musl and check that it is static.
    Static(package::StaticArgs),
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let root = workspace_root();
    match cli.task {
        Task::BuildEbpf { check, toolchain } => build_ebpf_task(&root, check, &toolchain),
        Task::Bench(args) => bench::run(&root, &args),
        Task::Fuzz(args) => fuzz::run(&root, &args),
        Task::Mutants(args) => mutants::run(&root, &args),
        Task::Bless => bless(&root),
        Task::GpuCheck(args) => gpu_check::run(&root, &args),
        Task::Deb(args) => package::deb(&root, &args).map(drop),
        Task::Static(args) => package::static_binary(&root, &args).map(drop),
    }
}

/// Build the agent first, so the golden files come from this source and not from whatever
/// binary an earlier build left in target/.
fn bless(root: &Path) -> anyhow::Result<()> {
    build_agent(root)?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let test = Command::new(&cargo)
        .args(["test", "--package", "dcmon-tests", "--test", "golden"])
        .env("DCMON_BLESS", "1")
        .current_dir(root)
        .status()
        .context("running cargo test")?;
    if !test.success() {
        bail!("writing the golden batches failed ({test})");
    }
    eprintln!("xtask: golden batches written; review them with `git diff tests/fixtures/golden`");
    Ok(())
}

fn build_ebpf_task(root: &Path, check: bool, toolchain: &str) -> anyhow::Result<()> {
    let built = build_ebpf(root, toolchain)?;
    let version = rustc_version(toolchain)?;
    let committed = root.join(OBJECT);
    if check {
        let want =
            std::fs::read(&committed).with_context(|| format!("reading committed object {}", committed.display()))?;
        let got = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
        if want != got {
            let note = std::fs::read_to_string(root.join(TOOLCHAIN_NOTE)).unwrap_or_default();
            bail!(
                "{} ({} bytes) differs from what dcmon-ebpf builds ({}, {} bytes).\n\
                 committed with: {}built with:     {}\n\
                 run `cargo xtask build-ebpf` and commit the result",
                committed.display(),
                want.len(),
                built.display(),
                got.len(),
                note,
                version
            );
        }
        eprintln!("xtask: {} matches the source", committed.display());
        return Ok(());
    }
    if let Some(dir) = committed.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::copy(&built, &committed)
        .with_context(|| format!("copying {} to {}", built.display(), committed.display()))?;
    std::fs::write(root.join(TOOLCHAIN_NOTE), format!("{version}\n"))
        .with_context(|| format!("writing {TOOLCHAIN_NOTE}"))?;
    eprintln!("xtask: wrote {}", committed.display());
    Ok(())
}

/// `rustc -V` of the toolchain and `bpf-linker --version`: both decide the object's bytes.
fn rustc_version(toolchain: &str) -> anyhow::Result<String> {
    let linker = clean_command("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .context("running `bpf-linker --version` (is bpf-linker on PATH?)")?;
    Ok(format!("{}, {linker}", toolchain_rustc(toolchain)?))
}

fn toolchain_rustc(toolchain: &str) -> anyhow::Result<String> {
    let out = clean_command("rustup")
        .args(["run", toolchain, "rustc", "-V"])
        .output()
        .context("running `rustup run <toolchain> rustc -V`")?;
    if !out.status.success() {
        bail!("`rustup run {toolchain} rustc -V` failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A command without the toolchain variables the outer (stable) cargo set for xtask.
pub(crate) fn clean_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Builds dcmon-ebpf and returns the path of the object.
fn build_ebpf(root: &Path, toolchain: &str) -> anyhow::Result<PathBuf> {
    let target_dir = root.join("target/bpf");
    let home = std::env::var("HOME").unwrap_or_default();
    let sysroot = clean_command("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    // Reproducible output: no debug info (it would carry absolute paths into BTF line info),
    // and every path that could still leak remapped to a fixed prefix, so the object is the
    // same byte for byte on any machine with the same toolchain.
    let mut rustflags = vec![format!("--remap-path-prefix={}=/dcmon", root.display()), "-Cdebuginfo=0".to_owned()];
    if !home.is_empty() {
        rustflags.push(format!("--remap-path-prefix={home}/.cargo=/cargo"));
    }
    if !sysroot.is_empty() {
        rustflags.push(format!("--remap-path-prefix={sysroot}=/rustc"));
    }
    let status = clean_command("rustup")
        .args([
            "run",
            toolchain,
            "cargo",
            "build",
            "--package",
            "dcmon-ebpf",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(root)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags.join("\x1f"))
        // The workspace's release profile is tuned for the agent (opt-level s): pin every
        // setting the object depends on, so tuning the agent never changes the BPF bytes.
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "3")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "false")
        .env("CARGO_PROFILE_RELEASE_LTO", "true")
        .env("CARGO_PROFILE_RELEASE_PANIC", "abort")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
        .env("CARGO_PROFILE_RELEASE_INCREMENTAL", "false")
        .status()
        .context("running cargo for dcmon-ebpf (is rustup installed?)")?;
    if !status.success() {
        bail!(
            "building dcmon-ebpf failed ({status}); it needs `rustup toolchain install {toolchain} \
             --component rust-src` and `bpf-linker` on PATH"
        );
    }
    Ok(target_dir.join("bpfel-unknown-none/release/dcmon-ebpf"))
}

/// `cargo build` of the agent's debug binary, the one the tests and `gpu-check` run.
fn build_agent(root: &Path) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let build = Command::new(&cargo)
        .args(["build", "--package", "dcmon-agent", "--bin", "dcmon-agent"])
        .current_dir(root)
        .status()
        .context("running cargo build")?;
    if !build.success() {
        bail!("building dcmon-agent failed ({build})");
    }
    Ok(())
}
