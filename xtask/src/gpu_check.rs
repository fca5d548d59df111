//! `cargo xtask gpu-check`: on an NVIDIA host, `dcmon-agent once` with the GPU collector
//! against `nvidia-smi -q -x`, every GPU metric in a table (dcmon_tests::gpu_check compares).
//! Fails when a counter or setting differs, or nvidia-smi shows a metric the agent does not.

use std::io::ErrorKind;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, bail};
use dcmon_tests::AgentConfig;
use dcmon_tests::agent::run_once;
use dcmon_tests::gpu_check::{compare, parse_smi_xml, table};
use serde_json::json;

/// Arguments of `cargo xtask gpu-check`.
#[derive(Debug, clap::Args)]
pub struct GpuCheckArgs {
    /// The nvidia-smi to compare with.
    #[arg(long, value_name = "PATH", default_value = "nvidia-smi")]
    nvidia_smi: String,
}

pub fn run(root: &Path, args: &GpuCheckArgs) -> anyhow::Result<()> {
    let smi = match Command::new(&args.nvidia_smi).args(["-q", "-x"]).output() {
        Ok(out) if out.status.success() => out,
        Ok(out) => bail!(
            "`{} -q -x` failed ({}): {}; gpu-check needs an NVIDIA host with its driver loaded",
            args.nvidia_smi,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => bail!(
            "{} not found: gpu-check compares the agent with nvidia-smi on an NVIDIA host (driver and nvidia-smi \
             installed); it cannot run here",
            args.nvidia_smi
        ),
        Err(e) => bail!("running {}: {e}", args.nvidia_smi),
    };
    let (attached, gpus) = parse_smi_xml(&String::from_utf8_lossy(&smi.stdout))?;

    crate::build_agent(root)?;
    let dir = tempfile::tempdir().context("temporary directory")?;
    let config = AgentConfig::without_exporters()
        .set("exporters", json!({"ipmi": false, "apt": false, "nvme": false, "nvsmi": true}))
        .write(dir.path());
    let (stdout, log) = run_once(dir.path(), &config);
    let batch: serde_json::Value =
        serde_json::from_str(&stdout).with_context(|| format!("`once` printed no JSON batch; its log:\n{log}"))?;
    let rows = compare(&batch, attached, &gpus);
    #[allow(clippy::print_stdout, reason = "the table is what the command is for")]
    {
        print!("{}", table(&rows));
    }
    let failing = rows.iter().filter(|r| r.verdict.fails()).count();
    if failing > 0 {
        bail!("{failing} GPU metrics differ from nvidia-smi or are missing (DIFFERS / MISSING above)");
    }
    Ok(())
}
