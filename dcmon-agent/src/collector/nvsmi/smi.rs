//! The fallback when NVML cannot load: `nvidia-smi --query-gpu`, one CSV line per GPU.

use super::{GpuReading, percent};
use crate::batch::Sample;

/// The `--query-gpu` fields, in the order [`parse_query_gpu`] reads them.
pub const QUERY_FIELDS: &str = "index,name,pci.bus_id,uuid,temperature.gpu,power.draw,\
power.limit,utilization.gpu,utilization.memory,fan.speed,clocks.sm,clocks.mem,memory.used,\
memory.total,ecc.errors.corrected.aggregate.total,ecc.errors.uncorrected.aggregate.total,\
pcie.link.gen.current,pcie.link.width.current,pstate";

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
/// (`nvidia-smi --query-gpu=QUERY_FIELDS --format=csv,noheader,nounits`, one line per GPU).
pub fn parse_query_gpu(text: &str) -> Result<Vec<GpuReading>, String> {
    let mut gpus = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() != 19 {
            return Err(format!(
                "nvidia-smi line {}: expected 19 comma-separated fields, got {}: {line:?}",
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
        gpus.push(GpuReading { index, model: f[1].to_owned(), bus_id: f[2].to_owned(), uuid: f[3].to_owned(), values });
    }
    Ok(gpus)
}
