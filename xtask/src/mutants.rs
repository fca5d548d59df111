//! `cargo xtask mutants`: cargo-mutants on the files whose unit tests are meant to catch
//! every behavioural change, with the test set that belongs to them (dcmon-agent's `--lib`
//! unit tests; the integration tests start agents and servers and would make each mutant take
//! minutes). The whole set takes long enough (README, Testing) that this is not part of CI.
//!
//! cargo-mutants writes its report to mutants.out/ (caught.txt, missed.txt, timeout.txt,
//! unviable.txt); README's Testing section keeps the table and why each survivor is harmless.

use std::path::Path;

use anyhow::{Context as _, bail};

use crate::clean_command;

/// The files checked by default.
pub const FILES: [&str; 18] = [
    "dcmon-agent/src/batch/mod.rs",
    "dcmon-agent/src/batch/histogram.rs",
    "dcmon-agent/src/batch/json.rs",
    "dcmon-agent/src/batch/labels.rs",
    "dcmon-agent/src/collector/os.rs",
    "dcmon-agent/src/collector/net/mod.rs",
    "dcmon-agent/src/deliver/mod.rs",
    "dcmon-agent/src/outbox/cursor.rs",
    "dcmon-agent/src/outbox/handle.rs",
    "dcmon-agent/src/outbox/lock.rs",
    "dcmon-agent/src/outbox/mod.rs",
    "dcmon-agent/src/outbox/open.rs",
    "dcmon-agent/src/outbox/queue.rs",
    "dcmon-agent/src/outbox/record.rs",
    "dcmon-agent/src/outbox/repair.rs",
    "dcmon-agent/src/outbox/segment.rs",
    "dcmon-agent/src/outbox/set_aside.rs",
    "dcmon-agent/src/outbox/writer.rs",
];

/// `cargo xtask mutants` options.
#[derive(Debug, clap::Args)]
pub struct MutantsArgs {
    /// A file to mutate (repeatable): one of the default set or any other file of dcmon-agent.
    #[arg(long = "file", value_name = "PATH")]
    pub files: Vec<String>,
    /// List the mutants without testing them.
    #[arg(long)]
    pub list: bool,
    /// Passed on to cargo-mutants; after a further `--`, to `cargo test` (`-- -- outbox::`
    /// runs only those tests).
    #[arg(last = true, value_name = "CARGO-MUTANTS ARGS")]
    pub extra: Vec<String>,
}

/// cargo-mutants on [`FILES`] (or `args.files`) with dcmon-agent's `--lib` tests.
pub fn run(root: &Path, args: &MutantsArgs) -> anyhow::Result<()> {
    let mut files = args.files.clone();
    let mut extra = args.extra.clone();
    if args.list {
        extra.insert(0, "--list".into());
    }
    if files.is_empty() {
        files = FILES.iter().map(|f| (*f).to_owned()).collect();
    }
    for f in &files {
        if !root.join(f).is_file() {
            bail!("--file {f}: no such file under {}", root.display());
        }
    }
    let mut cmd = clean_command("cargo");
    // `--lib` for every cargo run, the builds included: given after `--` it reached only the
    // test runs, and each mutant also rebuilt and relinked every test, example and bench.
    cmd.args(["mutants", "--package", "dcmon-agent", "--timeout-multiplier", "3", "--cargo-arg=--lib"]);
    for f in &files {
        cmd.args(["--file", f]);
    }
    cmd.args(&extra).current_dir(root);
    eprintln!("xtask: cargo mutants on {}", files.join(", "));
    let status =
        cmd.status().context("running `cargo mutants` (install it with `cargo install cargo-mutants --locked`)")?;
    // cargo-mutants exits 2 when mutants were missed, 3 on timeouts: the report says which.
    if !status.success() {
        bail!("cargo mutants: {status}; see mutants.out/missed.txt and mutants.out/timeout.txt");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// A file that moved (a module turned into a folder) must move here too, or the default
    /// run mutates nothing in it.
    #[test]
    fn every_default_file_exists() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let missing: Vec<&str> = super::FILES.iter().copied().filter(|f| !root.join(f).is_file()).collect();
        assert!(missing.is_empty(), "xtask mutants FILES that do not exist: {missing:?}");
    }
}
