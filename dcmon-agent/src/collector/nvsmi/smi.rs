//! The fallback when NVML cannot load: `nvidia-smi --query-gpu`, one CSV line per GPU, with
//! the health fields nvidia-smi offers (clocks event reasons, retired pages, the PCIe link's
//! maximum, volatile ECC counts) and `--query-remapped-rows`. Drivers that do not know a field
//! refuse the whole query; the collector then asks for the spec's fields alone.

use std::path::Path;
use std::time::Duration;

use super::{GpuReading, percent};
use crate::batch::Sample;
use crate::exec::{Cmd, ExecError};

/// The `--query-gpu` fields, in the order [`parse_query_gpu`] reads them.
pub const QUERY_FIELDS: &str = "index,name,pci.bus_id,uuid,temperature.gpu,power.draw,\
power.limit,utilization.gpu,utilization.memory,fan.speed,clocks.sm,clocks.mem,memory.used,\
memory.total,ecc.errors.corrected.aggregate.total,ecc.errors.uncorrected.aggregate.total,\
pcie.link.gen.current,pcie.link.width.current,pstate";

/// The health fields asked after [`QUERY_FIELDS`], in the order [`parse_query_gpu`] reads them
/// (`clocks_throttle_reasons.active` is the name every driver since 418 knows; 535 added
/// `clocks_event_reasons.active` beside it).
pub const HEALTH_FIELDS: &str = "clocks_throttle_reasons.active,retired_pages.sbe,retired_pages.dbe,\
retired_pages.pending,pcie.link.gen.max,pcie.link.width.max,ecc.errors.corrected.volatile.total,\
ecc.errors.uncorrected.volatile.total";

/// The `--query-remapped-rows` fields, in the order [`parse_remapped_rows`] reads them.
pub const REMAPPED_ROWS_FIELDS: &str =
    "gpu_bus_id,remapped_rows.correctable,remapped_rows.uncorrectable,remapped_rows.pending,remapped_rows.failure";

/// Fields in a `--query-gpu` line: the spec's alone, or with [`HEALTH_FIELDS`].
const SPEC_COLUMNS: usize = 19;
const ALL_COLUMNS: usize = 27;

/// A count cell (`[N/A]` and the like absent).
fn count_cell(v: &str) -> Option<u64> {
    v.trim().parse::<u64>().ok()
}

/// `Yes`/`No` (or 1/0) as 1/0.
fn flag(v: &str) -> Option<u64> {
    match v.trim().to_ascii_lowercase().as_str() {
        "yes" | "1" | "true" | "active" => Some(1),
        "no" | "0" | "false" | "not active" => Some(0),
        _ => None,
    }
}

/// `0x0000000000000004` (a bitmask) as a number.
fn hex_cell(v: &str) -> Option<u64> {
    v.trim().strip_prefix("0x").and_then(|h| u64::from_str_radix(h, 16).ok())
}

/// A count sample with labels beside the GPU's.
fn counted(name: &'static str, v: Option<u64>, labels: &[(&'static str, &str)]) -> Option<Sample> {
    let mut s = Sample::count(name, v?);
    s.labels.extend(labels.iter().map(|&(k, v)| (k, v.into())));
    Some(s)
}

/// One CSV cell as a number; `[N/A]`, `[Not Supported]` and friends are absent.
fn cell(v: &str) -> Option<f64> {
    let v = v.trim();
    if v.starts_with('[') || v.eq_ignore_ascii_case("n/a") || v.is_empty() {
        return None;
    }
    v.parse::<f64>().ok().filter(|f| f.is_finite())
}

/// ```text
/// 0, NVIDIA H100 80GB HBM3, 00000000:18:00.0, GPU-1111…, 45, 123.45, 700.00, 87, 33, 40, 1980,
/// 2619, 20480, 81920, 0, 0, 5, 16, P0
/// ```
/// (`nvidia-smi --query-gpu=QUERY_FIELDS --format=csv,noheader,nounits`, one line per GPU), or
/// with `,HEALTH_FIELDS` eight more cells a line:
/// `0x0000000000000004, [N/A], [N/A], [N/A], 5, 16, 0, 0`.
pub fn parse_query_gpu(text: &str) -> Result<Vec<GpuReading>, String> {
    let mut gpus = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() != SPEC_COLUMNS && f.len() != ALL_COLUMNS {
            return Err(format!(
                "nvidia-smi line {}: expected {SPEC_COLUMNS} or {ALL_COLUMNS} comma-separated fields, got {}: {line:?}",
                n + 1,
                f.len()
            ));
        }
        let index =
            f[0].parse::<u32>().map_err(|_| format!("nvidia-smi line {}: index {:?} is not a number", n + 1, f[0]))?;
        let mut values = Vec::with_capacity(14);
        let mut put = |name, v: Option<f64>| {
            if let Some(v) = v {
                values.push(Sample::gauge(name, v));
            }
        };
        put("gpu_temperature", cell(f[4]));
        put("gpu_power_draw", cell(f[5]));
        put("gpu_power_limit", cell(f[6]));
        put("gpu_utilization_gpu", cell(f[7]));
        put("gpu_utilization_memory", cell(f[8]));
        put("gpu_fan_speed", cell(f[9]));
        put("gpu_clock_sm", cell(f[10]));
        put("gpu_clock_mem", cell(f[11]));
        put("gpu_memory_usage", cell(f[12]).zip(cell(f[13])).and_then(|(u, t)| percent(u, t)));
        put("gpu_ecc_errors_corrected", cell(f[14]));
        put("gpu_ecc_errors_uncorrected", cell(f[15]));
        put("gpu_pcie_gen", cell(f[16]));
        put("gpu_pcie_width", cell(f[17]));
        put("gpu_pstate", f[18].strip_prefix('P').and_then(|p| p.parse::<u8>().ok()).map(f64::from));
        if f.len() == ALL_COLUMNS {
            let health = [
                counted("gpu_ecc_errors_total", count_cell(f[14]), &[("counter", "aggregate"), ("type", "corrected")]),
                counted(
                    "gpu_ecc_errors_total",
                    count_cell(f[15]),
                    &[("counter", "aggregate"), ("type", "uncorrected")],
                ),
                counted("gpu_ecc_errors_total", count_cell(f[25]), &[("counter", "volatile"), ("type", "corrected")]),
                counted("gpu_ecc_errors_total", count_cell(f[26]), &[("counter", "volatile"), ("type", "uncorrected")]),
                counted("gpu_retired_pages_total", count_cell(f[20]), &[("cause", "single_bit")]),
                counted("gpu_retired_pages_total", count_cell(f[21]), &[("cause", "double_bit")]),
                counted("gpu_retired_pages_pending", flag(f[22]), &[]),
                counted("gpu_clocks_event_reasons", hex_cell(f[19]), &[]),
                counted("gpu_pcie_max_gen", count_cell(f[23]), &[]),
                counted("gpu_pcie_max_width", count_cell(f[24]), &[]),
            ];
            values.extend(health.into_iter().flatten());
        }
        gpus.push(GpuReading { index, model: f[1].to_owned(), bus_id: f[2].to_owned(), uuid: f[3].to_owned(), values });
    }
    Ok(gpus)
}

/// ```text
/// 00000000:18:00.0, 2, 1, 1, 0
/// ```
/// (`nvidia-smi --query-remapped-rows=REMAPPED_ROWS_FIELDS --format=csv,noheader,nounits`, one
/// line per GPU with row remapping) into each bus id's samples; `[N/A]` cells are absent.
pub fn parse_remapped_rows(text: &str) -> Result<Vec<(String, Vec<Sample>)>, String> {
    let mut gpus = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() != 5 {
            return Err(format!(
                "nvidia-smi --query-remapped-rows line {}: expected 5 comma-separated fields, got {}: {line:?}",
                n + 1,
                f.len()
            ));
        }
        let samples = [
            counted("gpu_remapped_rows_total", count_cell(f[1]), &[("type", "correctable")]),
            counted("gpu_remapped_rows_total", count_cell(f[2]), &[("type", "uncorrectable")]),
            counted("gpu_remapped_rows_pending", flag(f[3]), &[]),
            counted("gpu_remapped_rows_failure", flag(f[4]), &[]),
        ];
        gpus.push((f[0].to_owned(), samples.into_iter().flatten().collect()));
    }
    Ok(gpus)
}

/// nvidia-smi's runs: the GPU query with the health fields until the driver refuses them, then
/// without; the remapped rows until the driver refuses that query.
#[derive(Debug)]
pub struct SmiQueries {
    with_health: Cmd,
    spec_only: Cmd,
    remapped_rows: Cmd,
    health_known: bool,
    remapped_rows_known: bool,
}

impl SmiQueries {
    /// The runs of `program`, each limited to `timeout`.
    pub fn new(program: &Path, timeout: Duration) -> Self {
        let cmd = |query: String| {
            Cmd::new(program)
                .args([query, "--format=csv,noheader,nounits".to_owned()])
                .timeout(timeout)
                .max_output(1 << 20)
                .env("LC_ALL", "C")
        };
        Self {
            with_health: cmd(format!("--query-gpu={QUERY_FIELDS},{HEALTH_FIELDS}")),
            spec_only: cmd(format!("--query-gpu={QUERY_FIELDS}")),
            remapped_rows: cmd(format!("--query-remapped-rows={REMAPPED_ROWS_FIELDS}")),
            health_known: true,
            remapped_rows_known: true,
        }
    }

    /// The program, for messages.
    pub fn program(&self) -> String {
        self.spec_only.program()
    }

    /// One reading of every GPU; a remapped-rows answer that cannot be parsed goes to `errors`
    /// and the rest is kept.
    pub fn read(&mut self, errors: &mut Vec<String>) -> Result<Vec<GpuReading>, ExecError> {
        let mut gpus = if self.health_known {
            match run_query(&self.with_health) {
                Err(ExecError::Status { stderr, .. }) => {
                    tracing::info!("{} refuses the health fields ({}); asking without", self.program(), stderr.trim());
                    self.health_known = false;
                    run_query(&self.spec_only)?
                }
                other => other?,
            }
        } else {
            run_query(&self.spec_only)?
        };
        if self.remapped_rows_known {
            match self.remapped_rows.run() {
                Ok(out) => match parse_remapped_rows(&String::from_utf8_lossy(&out.stdout)) {
                    Ok(rows) => {
                        for (bus_id, samples) in rows {
                            if let Some(gpu) = gpus.iter_mut().find(|g| g.bus_id.eq_ignore_ascii_case(&bus_id)) {
                                gpu.values.extend(samples);
                            }
                        }
                    }
                    Err(e) => errors.push(e),
                },
                Err(ExecError::Status { stderr, .. }) => {
                    tracing::info!("{} refuses --query-remapped-rows ({})", self.program(), stderr.trim());
                    self.remapped_rows_known = false;
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        Ok(gpus)
    }
}

fn run_query(cmd: &Cmd) -> Result<Vec<GpuReading>, ExecError> {
    let out = cmd.run()?;
    parse_query_gpu(&String::from_utf8_lossy(&out.stdout)).map_err(|e| ExecError::Io {
        program: cmd.program(),
        error: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}
