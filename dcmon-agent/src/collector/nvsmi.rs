//! NVIDIA GPUs (the spec's `nvsmi` exporter): NVML through nvml-wrapper, initialised once and
//! kept; `nvidia-smi --query-gpu` when the library cannot be loaded or initialised.
//!
//! A field the GPU does not support (no fan on passively cooled cards, ECC off) is omitted,
//! never reported as zero.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::Duration;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError, PerformanceState, TemperatureSensor};
use nvml_wrapper::error::NvmlError;
use serde::Deserialize;

use super::{CollectError, Collector};
use crate::batch::Sample;
use crate::config::{Limit, Section, SectionSpec, UP_TO_AN_HOUR};
use crate::exec::{Cmd, ExecError};

/// This collector's row in the table ([`super::SOURCES`]).
pub const SOURCE: super::Source = super::Source {
    name: "nvsmi",
    switch: super::Switch::Exporter { default: true },
    caps: &[],
    section: Some(SectionSpec::of::<NvsmiConfig>()),
    build: Some(|_, config| Box::new(NvsmiCollector::new(&config.section::<NvsmiConfig>()))),
};

/// The `nvsmi` section: where NVML and nvidia-smi are.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct NvsmiConfig {
    /// libnvidia-ml.so path; unset means the loader's default search.
    pub nvml_library: Option<PathBuf>,
    /// The nvidia-smi program, used when NVML cannot be loaded.
    pub nvidia_smi: PathBuf,
    /// Seconds one nvidia-smi run may take.
    pub timeout: u64,
}

impl Default for NvsmiConfig {
    fn default() -> Self {
        Self { nvml_library: None, nvidia_smi: PathBuf::from("nvidia-smi"), timeout: 10 }
    }
}

impl Section for NvsmiConfig {
    fn durations(&self) -> Vec<(&'static str, u64, Limit)> {
        vec![("nvsmi.timeout", self.timeout, UP_TO_AN_HOUR)]
    }
}

/// Where the loader finds NVML when the config names no path: the driver ships the versioned
/// name; the unversioned one only comes with development packages.
pub const DEFAULT_LIBRARIES: [&str; 2] = ["libnvidia-ml.so.1", "libnvidia-ml.so"];

/// The `--query-gpu` fields, in the order [`parse_query_gpu`] reads them.
pub const QUERY_FIELDS: &str = "index,name,pci.bus_id,uuid,temperature.gpu,power.draw,\
power.limit,utilization.gpu,utilization.memory,fan.speed,clocks.sm,clocks.mem,memory.used,\
memory.total,ecc.errors.corrected.aggregate.total,ecc.errors.uncorrected.aggregate.total,\
pcie.link.gen.current,pcie.link.width.current,pstate";

/// One GPU's readings, from either source.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuReading {
    /// NVML index (`gpu` label).
    pub index: u32,
    /// Product name (`model` label).
    pub model: String,
    /// PCI bus id, `00000000:18:00.0` (`bus_id` label).
    pub bus_id: String,
    /// `GPU-…` (`uuid` label).
    pub uuid: String,
    /// The metrics this GPU supports, in the spec's order.
    pub values: Vec<(&'static str, f64)>,
}

impl GpuReading {
    /// The samples of this GPU.
    pub fn samples(&self) -> impl Iterator<Item = Sample> + '_ {
        self.values.iter().map(|&(name, v)| {
            Sample::gauge(name, v)
                .label("gpu", self.index.to_string())
                .label("model", self.model.as_str())
                .label("bus_id", self.bus_id.as_str())
                .label("uuid", self.uuid.as_str())
        })
    }
}

fn percent(used: f64, total: f64) -> Option<f64> {
    // A tiny total can make the ratio infinite.
    (total > 0.0).then(|| used / total * 100.0).filter(|p| p.is_finite())
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
                values.push((name, v));
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

/// NVML, initialised once. Dropping it calls nvmlShutdown through nvml-wrapper's `Drop`, which
/// panics (`expect`) when the library lacks that symbol; such a library is leaked instead.
struct NvmlHandle(Option<Box<Nvml>>);

impl std::fmt::Debug for NvmlHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NvmlHandle")
    }
}

impl Drop for NvmlHandle {
    fn drop(&mut self) {
        if let Some(nvml) = self.0.take() {
            if nvml.lib().nvmlShutdown.is_ok() {
                if let Err(e) = (*nvml).shutdown() {
                    tracing::debug!("nvmlShutdown: {e}");
                }
            } else {
                std::mem::forget(nvml);
            }
        }
    }
}

/// An NVML field: absent when the GPU does not support it; other errors are collected.
fn field<T>(r: Result<T, NvmlError>, what: &str, errors: &mut Vec<String>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(NvmlError::NotSupported | NvmlError::NotFound | NvmlError::FunctionNotFound) => None,
        Err(e) => {
            errors.push(format!("{what}: {e}"));
            None
        }
    }
}

#[allow(clippy::cast_precision_loss, reason = "byte and error counts as f64 for the wire")]
fn read_nvml(nvml: &Nvml) -> Result<(Vec<GpuReading>, Vec<String>), NvmlError> {
    let count = nvml.device_count()?;
    let mut gpus = Vec::new();
    let mut errors = Vec::new();
    for index in 0..count {
        let dev = match nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => {
                errors.push(format!("GPU {index}: {e}"));
                continue;
            }
        };
        let mut errs = Vec::new();
        let model = field(dev.name(), "name", &mut errs).unwrap_or_default();
        let bus_id = field(dev.pci_info(), "pci_info", &mut errs).map(|p| p.bus_id).unwrap_or_default();
        let uuid = field(dev.uuid(), "uuid", &mut errs).unwrap_or_default();
        let mut values: Vec<(&'static str, f64)> = Vec::with_capacity(14);
        let mut put = |name, v: Option<f64>| {
            if let Some(v) = v {
                values.push((name, v));
            }
        };
        put("gpu_temperature", field(dev.temperature(TemperatureSensor::Gpu), "temperature", &mut errs).map(f64::from));
        put("gpu_power_draw", field(dev.power_usage(), "power_usage", &mut errs).map(|mw| f64::from(mw) / 1000.0));
        put(
            "gpu_power_limit",
            field(dev.power_management_limit(), "power_limit", &mut errs).map(|mw| f64::from(mw) / 1000.0),
        );
        let util = field(dev.utilization_rates(), "utilization", &mut errs);
        put("gpu_utilization_gpu", util.as_ref().map(|u| f64::from(u.gpu)));
        put("gpu_utilization_memory", util.as_ref().map(|u| f64::from(u.memory)));
        put("gpu_fan_speed", field(dev.fan_speed(0), "fan_speed", &mut errs).map(f64::from));
        put("gpu_clock_sm", field(dev.clock_info(Clock::SM), "clock_sm", &mut errs).map(f64::from));
        put("gpu_clock_mem", field(dev.clock_info(Clock::Memory), "clock_mem", &mut errs).map(f64::from));
        put(
            "gpu_memory_usage",
            field(dev.memory_info(), "memory_info", &mut errs).and_then(|m| percent(m.used as f64, m.total as f64)),
        );
        put(
            "gpu_ecc_errors_corrected",
            field(dev.total_ecc_errors(MemoryError::Corrected, EccCounter::Aggregate), "ecc_corrected", &mut errs)
                .map(|n| n as f64),
        );
        put(
            "gpu_ecc_errors_uncorrected",
            field(dev.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Aggregate), "ecc_uncorrected", &mut errs)
                .map(|n| n as f64),
        );
        put("gpu_pcie_gen", field(dev.current_pcie_link_gen(), "pcie_gen", &mut errs).map(f64::from));
        put("gpu_pcie_width", field(dev.current_pcie_link_width(), "pcie_width", &mut errs).map(f64::from));
        put("gpu_pstate", field(dev.performance_state(), "pstate", &mut errs).and_then(pstate_number));
        errors.extend(errs.into_iter().map(|e| format!("GPU {index} {e}")));
        gpus.push(GpuReading { index, model, bus_id, uuid, values });
    }
    Ok((gpus, errors))
}

fn pstate_number(p: PerformanceState) -> Option<f64> {
    use PerformanceState::*;
    let n = match p {
        Zero => 0,
        One => 1,
        Two => 2,
        Three => 3,
        Four => 4,
        Five => 5,
        Six => 6,
        Seven => 7,
        Eight => 8,
        Nine => 9,
        Ten => 10,
        Eleven => 11,
        Twelve => 12,
        Thirteen => 13,
        Fourteen => 14,
        Fifteen => 15,
        Unknown => return None,
    };
    Some(f64::from(n))
}

#[derive(Debug)]
enum Source {
    Nvml(NvmlHandle),
    Smi,
}

/// The NVIDIA GPU collector.
#[derive(Debug)]
pub struct NvsmiCollector {
    nvml_library: Option<PathBuf>,
    smi: Cmd,
    source: Option<Source>,
}

impl NvsmiCollector {
    /// A collector with the `nvsmi` config section. Nothing is loaded until the first round.
    pub fn new(config: &NvsmiConfig) -> Self {
        let smi = Cmd::new(&config.nvidia_smi)
            .args([format!("--query-gpu={QUERY_FIELDS}"), "--format=csv,noheader,nounits".to_owned()])
            .timeout(Duration::from_secs(config.timeout))
            .max_output(1 << 20)
            .env("LC_ALL", "C");
        Self { nvml_library: config.nvml_library.clone(), smi, source: None }
    }

    fn init_nvml(&self) -> Result<(Nvml, String), String> {
        let candidates: Vec<&OsStr> = match &self.nvml_library {
            Some(p) => vec![p.as_os_str()],
            None => DEFAULT_LIBRARIES.iter().map(OsStr::new).collect(),
        };
        let mut why = Vec::new();
        for lib in candidates {
            match Nvml::builder().lib_path(lib).init() {
                Ok(nvml) => return Ok((nvml, lib.to_string_lossy().into_owned())),
                Err(e) => why.push(format!("{}: {e}", lib.to_string_lossy())),
            }
        }
        Err(why.join("; "))
    }

    fn read_smi(&self) -> Result<Vec<GpuReading>, ExecError> {
        let out = self.smi.run()?;
        parse_query_gpu(&String::from_utf8_lossy(&out.stdout)).map_err(|e| ExecError::Io {
            program: self.smi.program(),
            error: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }
}

impl Collector for NvsmiCollector {
    fn name(&self) -> &'static str {
        SOURCE.name
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        if self.source.is_none() {
            match self.init_nvml() {
                Ok((nvml, lib)) => {
                    tracing::info!(library = lib, "NVML initialised");
                    self.source = Some(Source::Nvml(NvmlHandle(Some(Box::new(nvml)))));
                }
                Err(nvml_err) => match self.read_smi() {
                    Ok(gpus) => {
                        tracing::info!("NVML unavailable ({nvml_err}); using {}", self.smi.program());
                        self.source = Some(Source::Smi);
                        out.extend(gpus.iter().flat_map(GpuReading::samples));
                        return Ok(());
                    }
                    Err(e @ ExecError::NotFound { .. }) => {
                        return Err(CollectError::NotPresent(format!("no NVIDIA driver: NVML: {nvml_err}; {e}")));
                    }
                    Err(e) => {
                        return Err(anyhow::anyhow!("NVML: {nvml_err}; {e}").into());
                    }
                },
            }
        }
        match &self.source {
            Some(Source::Nvml(NvmlHandle(Some(nvml)))) => {
                let (gpus, errors) = read_nvml(nvml).map_err(|e| anyhow::anyhow!("NVML device count: {e}"))?;
                out.extend(gpus.iter().flat_map(GpuReading::samples));
                if !errors.is_empty() {
                    return Err(anyhow::anyhow!("NVML: {}", errors.join("; ")).into());
                }
            }
            Some(Source::Smi) => {
                let gpus = self.read_smi().map_err(anyhow::Error::from)?;
                out.extend(gpus.iter().flat_map(GpuReading::samples));
            }
            Some(Source::Nvml(NvmlHandle(None))) | None => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented `--format=csv,noheader,nounits` shape: a passively cooled GPU prints
    /// `[N/A]` for the fan, a GPU with ECC off `[N/A]` for its counters, and older drivers
    /// `[Not Supported]`.
    const SMI: &str = "\
0, NVIDIA H100 80GB HBM3, 00000000:18:00.0, GPU-11111111-2222-3333-4444-555555555555, 45, 123.45, 700.00, 87, 33, 40, 1980, 2619, 20480, 81920, 0, 0, 5, 16, P0
1, NVIDIA A100-SXM4-40GB, 00000000:3B:00.0, GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee, 61, 250.00, 400.00, 100, 75, [N/A], 1410, 1215, 10240, 40960, 12, 3, 4, 8, P2
2, Tesla T4, 00000000:5E:00.0, GPU-t4, 38, [Not Supported], 70.00, 0, 0, [N/A], 300, 405, 0, 15360, [N/A], [N/A], 3, 16, P8
";

    #[test]
    fn csv_with_absent_fields() {
        let gpus = parse_query_gpu(SMI).expect("parse");
        assert_eq!(gpus.len(), 3);
        assert_eq!(gpus[0].values.len(), 14);
        assert_eq!(gpus[0].bus_id, "00000000:18:00.0");
        let a100: Vec<&str> = gpus[1].values.iter().map(|(n, _)| *n).collect();
        assert!(!a100.contains(&"gpu_fan_speed"));
        assert_eq!(a100.len(), 13);
        let t4 = &gpus[2].values;
        let get = |n: &str| t4.iter().find(|(m, _)| *m == n).map(|(_, v)| *v);
        assert_eq!(get("gpu_power_draw"), None);
        assert_eq!(get("gpu_ecc_errors_corrected"), None);
        assert_eq!(get("gpu_memory_usage"), Some(0.0));
        assert_eq!(get("gpu_pstate"), Some(8.0));
        assert_eq!(get("gpu_power_limit"), Some(70.0));
    }

    #[test]
    fn malformed_lines_are_errors() {
        let e = parse_query_gpu("0, x, y\n").expect_err("short");
        assert!(e.contains("19"), "{e}");
        let line = SMI.lines().next().unwrap_or_default().replacen('0', "z", 1);
        let e = parse_query_gpu(&line).expect_err("index");
        assert!(e.contains("index"), "{e}");
    }

    #[test]
    fn no_library_and_no_tool_is_not_present() {
        let config = NvsmiConfig {
            nvml_library: Some("/nonexistent/libnvidia-ml.so.1".into()),
            nvidia_smi: "/nonexistent/nvidia-smi".into(),
            timeout: 5,
        };
        let mut c = NvsmiCollector::new(&config);
        let err = c.collect(&mut Vec::new()).expect_err("absent");
        assert!(
            matches!(&err, CollectError::NotPresent(w)
                if w.contains("libnvidia-ml") && w.contains("nvidia-smi")),
            "{err}"
        );
    }

    #[test]
    fn memory_usage_that_overflows_is_left_out() {
        let line = "0, GPU, 00000000:18:00.0, GPU-1, 45, 1, 2, 3, 4, 5, 6, 7, 1e308, 1e-300, 0, 0, 5, 16, P0\n";
        let gpus = parse_query_gpu(line).expect("parse");
        assert!(gpus[0].values.iter().all(|(name, v)| v.is_finite() && *name != "gpu_memory_usage"), "{gpus:?}");
    }
}
