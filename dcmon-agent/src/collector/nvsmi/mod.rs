//! NVIDIA GPUs (the spec's `nvsmi` exporter): NVML through nvml-wrapper, initialised once and
//! kept; `nvidia-smi --query-gpu` when the library cannot be loaded or initialised.
//!
//! A field the GPU does not support (no fan on passively cooled cards, ECC off) is omitted,
//! never reported as zero.
//!
//! Each GPU is read on its own thread ([`workers`]) under `gpu_timeout`, so one GPU that
//! hangs or is lost leaves the others reporting on time; `gpu_expected` (the PCI bus) against
//! `gpu_visible` (NVML) shows a GPU the driver no longer sees.

mod nvml;
mod per_job;
mod presence;
pub mod smi;
#[cfg(test)]
mod tests;
mod workers;

use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nvml_wrapper::Nvml;
use serde::Deserialize;

use self::per_job::PerJob;
use self::smi::SmiQueries;
pub use self::smi::{HEALTH_FIELDS, QUERY_FIELDS, REMAPPED_ROWS_FIELDS, parse_query_gpu, parse_remapped_rows};
use self::workers::{Answer, Workers};
use super::attr::{RELIST_EVERY, Relist};
use super::{CollectError, Collector};
use crate::batch::Sample;
use crate::config::{Limit, Section, SectionSpec, UP_TO_AN_HOUR};
use crate::exec::ExecError;
use crate::host::Host;

/// This collector's row in the table ([`super::SOURCES`]).
pub const SOURCE: super::Source = super::Source {
    name: "nvsmi",
    switch: super::Switch::Exporter { default: true },
    caps: &[],
    section: Some(SectionSpec::of::<NvsmiConfig>()),
    build: Some(|host, config| Box::new(NvsmiCollector::new(host.clone(), &config.section::<NvsmiConfig>()))),
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
    /// Seconds a round waits for each GPU's NVML readings (all GPUs are read in parallel):
    /// a GPU that takes longer is reported unresponsive and the others are sent on time.
    /// Below `collector_timeout`.
    pub gpu_timeout: u64,
}

impl Default for NvsmiConfig {
    fn default() -> Self {
        Self { nvml_library: None, nvidia_smi: PathBuf::from("nvidia-smi"), timeout: 10, gpu_timeout: 5 }
    }
}

impl Section for NvsmiConfig {
    fn durations(&self) -> Vec<(&'static str, u64, Limit)> {
        vec![("nvsmi.timeout", self.timeout, UP_TO_AN_HOUR), ("nvsmi.gpu_timeout", self.gpu_timeout, UP_TO_AN_HOUR)]
    }

    fn round_timeouts(&self) -> Vec<(&'static str, u64)> {
        vec![("nvsmi.gpu_timeout", self.gpu_timeout)]
    }
}

/// Where the loader finds NVML when the config names no path: the driver ships the versioned
/// name; the unversioned one only comes with development packages.
pub const DEFAULT_LIBRARIES: [&str; 2] = ["libnvidia-ml.so.1", "libnvidia-ml.so"];

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
    /// The metrics this GPU supports (the spec's first, in its order), each with the labels it
    /// has beside the GPU's.
    pub values: Vec<Sample>,
}

impl GpuReading {
    /// The samples of this GPU.
    pub fn samples(&self) -> impl Iterator<Item = Sample> + '_ {
        self.values.iter().map(|s| {
            let mut labelled = self.labelled(Sample { labels: crate::batch::Labels::new(), ..s.clone() });
            labelled.labels.extend(s.labels.iter().cloned());
            labelled
        })
    }

    /// `sample` with this GPU's labels (`gpu`, `model`, `bus_id`, `uuid`).
    pub fn labelled(&self, sample: Sample) -> Sample {
        sample
            .label("gpu", self.index.to_string())
            .label("model", self.model.as_str())
            .label("bus_id", self.bus_id.as_str())
            .label("uuid", self.uuid.as_str())
    }
}

fn percent(used: f64, total: f64) -> Option<f64> {
    // A tiny total can make the ratio infinite.
    (total > 0.0).then(|| used / total * 100.0).filter(|p| p.is_finite())
}

/// A compute process on a GPU: its pid and the GPU memory it uses, bytes (`None` where NVML
/// does not say, as under MIG).
pub type GpuProcess = (u32, Option<u64>);

/// NVML, initialised once. Dropping it calls nvmlShutdown through nvml-wrapper's `Drop`, which
/// panics (`expect`) when the library lacks that symbol; such a library is leaked instead.
pub struct NvmlHandle(Option<Box<Nvml>>);

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

#[derive(Debug)]
enum Source {
    Nvml(Workers),
    Smi,
}

/// The NVIDIA GPU collector.
#[derive(Debug)]
pub struct NvsmiCollector {
    host: Host,
    nvml_library: Option<PathBuf>,
    smi: SmiQueries,
    gpu_timeout: Duration,
    source: Option<Source>,
    per_job: PerJob,
    /// `gpu_expected`, listed again every [`RELIST_EVERY`].
    expected: Option<u64>,
    relist: Relist,
}

impl NvsmiCollector {
    /// A collector with the `nvsmi` config section, looking for GPUs on `host`'s PCI bus.
    /// Nothing is loaded until the first round.
    pub fn new(host: Host, config: &NvsmiConfig) -> Self {
        let smi = SmiQueries::new(&config.nvidia_smi, Duration::from_secs(config.timeout));
        Self {
            per_job: PerJob::new(host.clone()),
            host,
            nvml_library: config.nvml_library.clone(),
            smi,
            gpu_timeout: Duration::from_secs(config.gpu_timeout),
            source: None,
            expected: None,
            relist: Relist::new(RELIST_EVERY),
        }
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

    /// `gpu_expected`, from the listing of at most [`RELIST_EVERY`] ago.
    fn expected(&mut self, out: &mut Vec<Sample>, errors: &mut Vec<String>) -> Option<u64> {
        if self.relist.is_due() {
            match presence::expected_gpus(&self.host) {
                Ok(n) => self.expected = n,
                Err(e) => errors.push(format!("counting NVIDIA GPUs on the PCI bus: {e:#}")),
            }
            self.relist.done();
        }
        if let Some(n) = self.expected {
            out.push(Sample::count("gpu_expected", n));
        }
        self.expected
    }

    /// One round through NVML: every GPU on its own worker, all under one deadline.
    fn collect_nvml(&mut self, out: &mut Vec<Sample>, errors: &mut Vec<String>) -> Result<(), CollectError> {
        let Some(Source::Nvml(workers)) = &mut self.source else { return Ok(()) };
        let Some(nvml) = workers.nvml().0.as_deref() else { return Ok(()) };
        let count = nvml.device_count().map_err(|e| anyhow::anyhow!("NVML device count: {e}"))?;
        out.push(Sample::count("gpu_visible", u64::from(count)));
        let answers =
            workers.round(count, self.gpu_timeout).map_err(|e| anyhow::anyhow!("starting a GPU thread: {e}"))?;
        let with_processes: Vec<(&GpuReading, &[GpuProcess])> = answers
            .iter()
            .filter_map(|a| match a {
                Answer::Read(round) => Some((&round.reading, round.processes.as_deref()?)),
                _ => None,
            })
            .collect();
        self.per_job.samples(&with_processes, out, errors);
        for answer in answers {
            match answer {
                Answer::Read(round) => {
                    let gpu = &round.reading;
                    out.extend(gpu.samples());
                    out.push(gpu.labelled(Sample::count("gpu_lost", u64::from(round.lost))));
                    out.push(gpu.labelled(Sample::count("gpu_unresponsive", 0)));
                    errors.extend(round.errors.iter().map(|e| format!("GPU {} {e}", gpu.index)));
                }
                Answer::Unresponsive { index, last } => {
                    let gpu = last.map_or_else(|| GpuReading::unknown(index), |r| r.reading);
                    out.push(gpu.labelled(Sample::count("gpu_unresponsive", 1)));
                    errors.push(format!("GPU {index}: NVML did not answer within {} s", self.gpu_timeout.as_secs()));
                }
                Answer::Gone { index } => errors.push(format!("GPU {index}: its NVML thread ended")),
            }
        }
        Ok(())
    }
}

impl GpuReading {
    /// A GPU NVML never told anything about: only its index.
    fn unknown(index: u32) -> Self {
        Self { index, model: String::new(), bus_id: String::new(), uuid: String::new(), values: Vec::new() }
    }
}

impl Collector for NvsmiCollector {
    fn name(&self) -> &'static str {
        SOURCE.name
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        let mut errors = Vec::new();
        if self.source.is_none() {
            match self.init_nvml() {
                Ok((nvml, lib)) => {
                    tracing::info!(library = lib, "NVML initialised");
                    let handle = Arc::new(NvmlHandle(Some(Box::new(nvml))));
                    self.source = Some(Source::Nvml(Workers::new(handle)));
                }
                Err(nvml_err) => match self.smi.read(&mut errors) {
                    Ok(gpus) => {
                        tracing::info!("NVML unavailable ({nvml_err}); using {}", self.smi.program());
                        self.source = Some(Source::Smi);
                        self.expected(out, &mut errors);
                        out.extend(gpus.iter().flat_map(GpuReading::samples));
                        return joined(errors);
                    }
                    Err(e @ ExecError::NotFound { .. }) => {
                        let why = format!("NVML: {nvml_err}; {e}");
                        return match self.expected(out, &mut errors) {
                            // GPUs on the bus and no driver to ask: that is worth a failure
                            // each round, not silence.
                            Some(n) if n > 0 => {
                                out.push(Sample::count("gpu_visible", 0));
                                Err(anyhow::anyhow!("{n} NVIDIA GPUs on the PCI bus but no driver: {why}").into())
                            }
                            _ => Err(CollectError::NotPresent(format!("no NVIDIA driver: {why}"))),
                        };
                    }
                    Err(e) => {
                        return Err(anyhow::anyhow!("NVML: {nvml_err}; {e}").into());
                    }
                },
            }
        }
        self.expected(out, &mut errors);
        match &mut self.source {
            Some(Source::Nvml(_)) => self.collect_nvml(out, &mut errors)?,
            Some(Source::Smi) => {
                let gpus = self.smi.read(&mut errors).map_err(anyhow::Error::from)?;
                out.extend(gpus.iter().flat_map(GpuReading::samples));
            }
            None => {}
        }
        joined(errors)
    }
}

/// The round's errors as one.
fn joined(errors: Vec<String>) -> Result<(), CollectError> {
    if errors.is_empty() { Ok(()) } else { Err(anyhow::anyhow!("{}", errors.join("; ")).into()) }
}
