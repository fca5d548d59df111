//! Developer chores: `cargo xtask bench`.
#![allow(clippy::print_stdout, reason = "a command-line tool for developers")]

mod bench;

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // xtask lives one level below the workspace root.
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_default();
    match args.first().map(String::as_str) {
        Some("bench") => bench::run(&workspace, &bench::BenchArgs::parse(&args[1..])?),
        _ => anyhow::bail!("usage: cargo xtask bench [--seconds N] [--rounds N] [--no-scale]"),
    }
}
