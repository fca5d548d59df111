//! `cargo xtask deb`: the Debian package (cargo-deb, metadata in dcmon-agent/Cargo.toml), checked
//! with lintian. `cargo xtask static`: the agent built for x86_64-unknown-linux-musl, checked to
//! be a static executable.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// The musl target of the static build.
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-musl";

#[derive(Debug, clap::Args)]
pub struct DebArgs {
    /// Skip lintian (it takes a while and is not everywhere).
    #[arg(long)]
    pub no_lintian: bool,
}

/// Build target/debian/dcmon-agent_VERSION-1_amd64.deb and run lintian on it; returns its path.
pub fn deb(root: &Path, args: &DebArgs) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .args(["deb", "--package", "dcmon-agent"])
        .current_dir(root)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo deb (install it with `cargo install cargo-deb --locked`)")?;
    if !out.status.success() {
        bail!("cargo deb failed ({}): {}", out.status, String::from_utf8_lossy(&out.stdout));
    }
    // cargo-deb prints the package's path as its last line.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let package = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    if !package.is_file() {
        bail!("cargo deb did not say where the package is: {stdout}");
    }
    eprintln!("xtask: built {}", package.display());
    if !args.no_lintian {
        // Tags that stay are overridden, each with its reason, in
        // dcmon-agent/debian/lintian-overrides (installed with the package).
        let status = Command::new("lintian")
            .args(["--fail-on", "error,warning", "--info", "--display-info"])
            .arg(&package)
            .status()
            .context("running lintian (apt-get install lintian)")?;
        if !status.success() {
            bail!("lintian found problems in {} ({status})", package.display());
        }
        eprintln!("xtask: lintian: clean");
    }
    Ok(package)
}

#[derive(Debug, clap::Args)]
pub struct StaticArgs {
    /// mimalloc instead of musl's own malloc: less CPU a cycle, more memory (README, Install).
    #[arg(long)]
    pub mimalloc: bool,
}

/// Build target/x86_64-unknown-linux-musl/release/dcmon-agent and check that it is static.
pub fn static_binary(root: &Path, args: &StaticArgs) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(&cargo);
    build.args(["build", "--release", "--package", "dcmon-agent", "--bin", "dcmon-agent", "--target", STATIC_TARGET]);
    if args.mimalloc {
        build.args(["--features", "mimalloc"]);
    }
    let status = build.current_dir(root).status().context("running cargo build")?;
    if !status.success() {
        bail!(
            "building for {STATIC_TARGET} failed ({status}); it needs `rustup target add {STATIC_TARGET}` and musl-tools"
        );
    }
    let binary = root.join("target").join(STATIC_TARGET).join("release/dcmon-agent");
    let ldd = Command::new("ldd").arg(&binary).output().context("running ldd")?;
    let said = format!("{}{}", String::from_utf8_lossy(&ldd.stdout), String::from_utf8_lossy(&ldd.stderr));
    if !said.contains("not a dynamic executable") && !said.contains("statically linked") {
        bail!("{} is not static; ldd says:\n{said}", binary.display());
    }
    eprintln!("xtask: built {} (ldd: {})", binary.display(), said.trim());
    Ok(binary)
}
