//! One GPU's round through NVML: the spec's 14 gauges and the health families (memory
//! health, throttling, links, energy, utilization between polls). Runs on that GPU's worker
//! thread ([`super::workers`]), so a call that blocks holds up this GPU only.
//!
//! A reading the board does not support (NOT_SUPPORTED, NOT_FOUND, a symbol the driver lacks)
//! is absent, never zero. The first call that answers GPU_IS_LOST ends the round: the GPU is
//! reported lost and nothing else is asked of it.

use nvml_wrapper::Device;
use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, PcieUtilCounter, PerformancePolicy, PerformanceState, Sampling, TemperatureSensor,
};
use nvml_wrapper::enum_wrappers::nv_link::ErrorCounter;
use nvml_wrapper::enums::device::{SampleValue, UsedGpuMemory};
use nvml_wrapper::error::{NvmlError, nvml_sym, nvml_try, nvml_try_count};
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id::{
    NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN, NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN,
    NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN, NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX,
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
};

use super::{GpuProcess, GpuReading, percent};
use crate::batch::Sample;

/// NVML_NVLINK_MAX_LINKS: the most links a board has (18 on H100 SXM).
const MAX_NVLINKS: u32 = 18;

/// The violation counters and their `reason` label (nvmlPerfPolicyType_t).
const THROTTLE_REASONS: [(PerformancePolicy, &str); 6] = [
    (PerformancePolicy::Power, "power"),
    (PerformancePolicy::Thermal, "thermal"),
    (PerformancePolicy::SyncBoost, "sync_boost"),
    (PerformancePolicy::BoardLimit, "board_limit"),
    (PerformancePolicy::LowUtilization, "low_utilization"),
    (PerformancePolicy::Reliability, "reliability"),
];

/// The throttle reasons NVML times only as field values, and their `reason` label.
const THROTTLE_FIELDS: [(u32, &str); 3] = [
    (NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_THERM_SLOWDOWN, "sw_thermal"),
    (NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_THERM_SLOWDOWN, "hw_thermal"),
    (NVML_FI_DEV_CLOCKS_EVENT_REASON_HW_POWER_BRAKE_SLOWDOWN, "hw_power_brake"),
];

/// The NVLink error counters and their `error` label.
const NVLINK_ERRORS: [(ErrorCounter, &str); 4] = [
    (ErrorCounter::DlReplay, "replay"),
    (ErrorCounter::DlRecovery, "recovery"),
    (ErrorCounter::DlCrcFlit, "crc_flit"),
    (ErrorCounter::DlCrcData, "crc_data"),
];

/// What a GPU's worker keeps between rounds.
#[derive(Debug)]
pub struct GpuState {
    index: u32,
    /// Name, bus id and UUID do not change while the driver is loaded: read once.
    identity: Option<(String, String, String)>,
    /// The newest sample time stamp (µs) seen in the GPU and memory utilization buffers.
    last_sample_us: [Option<u64>; 2],
}

impl GpuState {
    /// Nothing read yet from GPU `index`.
    pub fn new(index: u32) -> Self {
        Self { index, identity: None, last_sample_us: [None; 2] }
    }
}

/// What one round read from one GPU.
#[derive(Debug, Clone)]
pub struct GpuRound {
    /// The readings (the identity labels may be empty if NVML never gave them).
    pub reading: GpuReading,
    /// NVML answered GPU_IS_LOST.
    pub lost: bool,
    /// Calls that failed for another reason than the board not supporting them.
    pub errors: Vec<String>,
    /// The compute processes on the GPU: pid and the GPU memory it uses (`None` where NVML
    /// does not say, as under MIG); `None` when NVML does not list them.
    pub processes: Option<Vec<GpuProcess>>,
}

impl GpuRound {
    /// A round that could not get the GPU's handle.
    pub fn failed(index: u32, e: &NvmlError) -> Self {
        let lost = matches!(e, NvmlError::GpuLost);
        let errors = if lost { Vec::new() } else { vec![format!("handle: {e}")] };
        let reading =
            GpuReading { index, model: String::new(), bus_id: String::new(), uuid: String::new(), values: Vec::new() };
        Self { reading, lost, errors, processes: None }
    }
}

/// The calls of one round: unsupported readings become absent, GPU_IS_LOST stops the round.
struct Calls {
    errors: Vec<String>,
    lost: bool,
}

impl Calls {
    fn get<T>(&mut self, what: &str, call: impl FnOnce() -> Result<T, NvmlError>) -> Option<T> {
        if self.lost {
            return None;
        }
        match call() {
            Ok(v) => Some(v),
            Err(NvmlError::NotSupported | NvmlError::NotFound | NvmlError::FunctionNotFound) => None,
            Err(NvmlError::GpuLost) => {
                self.lost = true;
                None
            }
            Err(e) => {
                self.errors.push(format!("{what}: {e}"));
                None
            }
        }
    }
}

/// The samples of one GPU, without its identity labels (added by [`GpuReading::samples`]).
#[derive(Default)]
struct Values(Vec<Sample>);

impl Values {
    /// A gauge with `labels`, when it was read (and is finite).
    fn gauge(&mut self, name: &'static str, v: Option<f64>, labels: &[(&'static str, &str)]) {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            self.push(Sample::gauge(name, v), labels);
        }
    }

    /// A count with `labels`, when it was read.
    fn count(&mut self, name: &'static str, v: Option<u64>, labels: &[(&'static str, &str)]) {
        if let Some(v) = v {
            self.push(Sample::count(name, v), labels);
        }
    }

    fn push(&mut self, mut s: Sample, labels: &[(&'static str, &str)]) {
        s.labels.extend(labels.iter().map(|&(k, v)| (k, v.into())));
        self.0.push(s);
    }
}

/// One round on GPU `dev`.
pub fn read_gpu(dev: &Device<'_>, state: &mut GpuState) -> GpuRound {
    let mut calls = Calls { errors: Vec::new(), lost: false };
    if state.identity.is_none() {
        let name = calls.get("name", || dev.name());
        let bus_id = calls.get("pci_info", || dev.pci_info()).map(|p| p.bus_id);
        let uuid = calls.get("uuid", || dev.uuid());
        // Kept once read without a failure (a field the board does not have stays empty);
        // asked again next round otherwise.
        if !calls.lost && calls.errors.is_empty() {
            state.identity = Some((name.unwrap_or_default(), bus_id.unwrap_or_default(), uuid.unwrap_or_default()));
        }
    }
    let (model, bus_id, uuid) = state.identity.clone().unwrap_or_default();
    let mut v = Values::default();
    spec_gauges(dev, &mut calls, &mut v);
    memory_health(dev, &mut calls, &mut v);
    throttling(dev, &mut calls, &mut v);
    links(dev, &mut calls, &mut v);
    v.gauge(
        "gpu_energy_joules_total",
        calls.get("energy", || dev.total_energy_consumption()).map(|mj| mj as f64 / 1000.0),
        &[],
    );
    utilization_between_polls(dev, &mut calls, &mut v, &mut state.last_sample_us);
    let processes = calls.get("compute_processes", || dev.running_compute_processes()).map(|list| {
        list.into_iter()
            .map(|p| {
                let bytes = match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => Some(b),
                    UsedGpuMemory::Unavailable => None,
                };
                (p.pid, bytes)
            })
            .collect()
    });
    let lost = calls.lost;
    let mut values = v.0;
    if lost {
        // Whatever was read before the GPU answered "lost" is not trusted.
        values.clear();
    }
    GpuRound {
        reading: GpuReading { index: state.index, model, bus_id, uuid, values },
        lost,
        errors: calls.errors,
        processes: if lost { None } else { processes },
    }
}

#[allow(clippy::cast_precision_loss, reason = "byte and error counts as f64 for the wire")]
fn spec_gauges(dev: &Device<'_>, calls: &mut Calls, v: &mut Values) {
    v.gauge(
        "gpu_temperature",
        calls.get("temperature", || dev.temperature(TemperatureSensor::Gpu)).map(f64::from),
        &[],
    );
    v.gauge("gpu_power_draw", calls.get("power_usage", || dev.power_usage()).map(|mw| f64::from(mw) / 1000.0), &[]);
    v.gauge(
        "gpu_power_limit",
        calls.get("power_limit", || dev.power_management_limit()).map(|mw| f64::from(mw) / 1000.0),
        &[],
    );
    let util = calls.get("utilization", || dev.utilization_rates());
    v.gauge("gpu_utilization_gpu", util.as_ref().map(|u| f64::from(u.gpu)), &[]);
    v.gauge("gpu_utilization_memory", util.as_ref().map(|u| f64::from(u.memory)), &[]);
    v.gauge("gpu_fan_speed", calls.get("fan_speed", || dev.fan_speed(0)).map(f64::from), &[]);
    v.gauge("gpu_clock_sm", calls.get("clock_sm", || dev.clock_info(Clock::SM)).map(f64::from), &[]);
    v.gauge("gpu_clock_mem", calls.get("clock_mem", || dev.clock_info(Clock::Memory)).map(f64::from), &[]);
    v.gauge(
        "gpu_memory_usage",
        calls.get("memory_info", || dev.memory_info()).and_then(|m| percent(m.used as f64, m.total as f64)),
        &[],
    );
    let ecc = |calls: &mut Calls, error, counter, what| calls.get(what, || dev.total_ecc_errors(error, counter));
    let aggregate = [
        ecc(calls, MemoryError::Corrected, EccCounter::Aggregate, "ecc_corrected"),
        ecc(calls, MemoryError::Uncorrected, EccCounter::Aggregate, "ecc_uncorrected"),
    ];
    v.gauge("gpu_ecc_errors_corrected", aggregate[0].map(|n| n as f64), &[]);
    v.gauge("gpu_ecc_errors_uncorrected", aggregate[1].map(|n| n as f64), &[]);
    v.gauge("gpu_pcie_gen", calls.get("pcie_gen", || dev.current_pcie_link_gen()).map(f64::from), &[]);
    v.gauge("gpu_pcie_width", calls.get("pcie_width", || dev.current_pcie_link_width()).map(f64::from), &[]);
    v.gauge("gpu_pstate", calls.get("pstate", || dev.performance_state()).and_then(pstate_number), &[]);
    // The spec's two are the aggregate totals; the family adds the volatile ones by type.
    let volatile = [
        ecc(calls, MemoryError::Corrected, EccCounter::Volatile, "ecc_volatile_corrected"),
        ecc(calls, MemoryError::Uncorrected, EccCounter::Volatile, "ecc_volatile_uncorrected"),
    ];
    for (counter, counts) in [("aggregate", aggregate), ("volatile", volatile)] {
        for (kind, n) in ["corrected", "uncorrected"].into_iter().zip(counts) {
            v.count("gpu_ecc_errors_total", n, &[("counter", counter), ("type", kind)]);
        }
    }
}

/// Row remapping (Ampere and later), page retirement (before Ampere).
fn memory_health(dev: &Device<'_>, calls: &mut Calls, v: &mut Values) {
    let nvml = dev.nvml();
    let remapped = calls.get("remapped_rows", || {
        let sym = nvml_sym(nvml.lib().nvmlDeviceGetRemappedRows.as_ref())?;
        let (mut corr, mut unc, mut pending, mut failure) = (0, 0, 0, 0);
        // SAFETY: a device handle of this library, four out-pointers to c_uint as nvml.h has them.
        nvml_try(unsafe { sym(dev.handle(), &mut corr, &mut unc, &mut pending, &mut failure) })?;
        Ok((corr, unc, pending, failure))
    });
    if let Some((corr, unc, pending, failure)) = remapped {
        v.count("gpu_remapped_rows_total", Some(u64::from(corr)), &[("type", "correctable")]);
        v.count("gpu_remapped_rows_total", Some(u64::from(unc)), &[("type", "uncorrectable")]);
        v.count("gpu_remapped_rows_pending", Some(u64::from(pending != 0)), &[]);
        v.count("gpu_remapped_rows_failure", Some(u64::from(failure != 0)), &[]);
    }
    for (cause, label) in [(0u32, "single_bit"), (1u32, "double_bit")] {
        let pages = calls.get("retired_pages", || {
            let sym = nvml_sym(nvml.lib().nvmlDeviceGetRetiredPages.as_ref())?;
            let mut count = 0;
            // SAFETY: with a zero count NVML writes only the count, never through `addresses`.
            nvml_try_count(unsafe { sym(dev.handle(), cause, &mut count, std::ptr::null_mut()) })?;
            Ok(count)
        });
        v.count("gpu_retired_pages_total", pages.map(u64::from), &[("cause", label)]);
    }
    v.count(
        "gpu_retired_pages_pending",
        calls.get("retired_pending", || dev.are_pages_pending_retired()).map(u64::from),
        &[],
    );
}

/// Time spent throttled per reason (so a throttle between two rounds shows), and the reasons now.
fn throttling(dev: &Device<'_>, calls: &mut Calls, v: &mut Values) {
    for (policy, reason) in THROTTLE_REASONS {
        let ns = calls.get("violation_status", || dev.violation_status(policy)).map(|t| t.violation_time);
        v.gauge("gpu_throttle_seconds_total", ns.map(|ns| ns as f64 / 1e9), &[("reason", reason)]);
    }
    // The reasons without a violation counter: time throttled, as field values (ns).
    let ids = THROTTLE_FIELDS.map(|(id, _)| FieldId(id));
    if let Some(values) = calls.get("throttle_fields", || dev.field_values_for(&ids)) {
        for ((_, reason), value) in THROTTLE_FIELDS.iter().zip(values) {
            match value.and_then(|f| f.value) {
                Ok(ns) => v.gauge("gpu_throttle_seconds_total", Some(sample_value(&ns) / 1e9), &[("reason", reason)]),
                Err(NvmlError::NotSupported | NvmlError::NotFound) => {}
                Err(NvmlError::GpuLost) => calls.lost = true,
                Err(e) => calls.errors.push(format!("throttle time {reason}: {e}")),
            }
        }
    }
    let nvml = dev.nvml();
    let reasons = calls.get("clocks_event_reasons", || {
        // The name since driver 535; nvml-wrapper 0.13 only wraps the older one.
        let sym = match nvml.lib().nvmlDeviceGetCurrentClocksEventReasons.as_ref() {
            Ok(sym) => *sym,
            Err(_) => *nvml_sym(nvml.lib().nvmlDeviceGetCurrentClocksThrottleReasons.as_ref())?,
        };
        let mut bits = 0;
        // SAFETY: a device handle of this library and an out-pointer to c_ulonglong.
        nvml_try(unsafe { sym(dev.handle(), &mut bits) })?;
        Ok(bits)
    });
    v.count("gpu_clocks_event_reasons", reasons, &[]);
}

/// PCIe replays, link against its maximum, throughput; NVLink per link.
fn links(dev: &Device<'_>, calls: &mut Calls, v: &mut Values) {
    v.count("gpu_pcie_replays_total", calls.get("pcie_replays", || dev.pcie_replay_counter()).map(u64::from), &[]);
    v.gauge("gpu_pcie_max_gen", calls.get("pcie_max_gen", || dev.max_pcie_link_gen()).map(f64::from), &[]);
    v.gauge("gpu_pcie_max_width", calls.get("pcie_max_width", || dev.max_pcie_link_width()).map(f64::from), &[]);
    for (counter, direction) in [(PcieUtilCounter::Send, "tx"), (PcieUtilCounter::Receive, "rx")] {
        // NVML counts KiB/s over a 20 ms window.
        let kib = calls.get("pcie_throughput", || dev.pcie_throughput(counter));
        v.gauge(
            "gpu_pcie_throughput_bytes_per_second",
            kib.map(|k| f64::from(k) * 1024.0),
            &[("direction", direction)],
        );
    }
    nvlinks(dev, calls, v);
}

/// NVLink per link: state, error counters, data sent and received; nothing on boards without.
fn nvlinks(dev: &Device<'_>, calls: &mut Calls, v: &mut Values) {
    let mut links = Vec::new();
    for link in 0..MAX_NVLINKS {
        if calls.lost {
            return;
        }
        let nvlink = dev.link_wrapper_for(link);
        let active = match nvlink.is_active() {
            Ok(a) => a,
            // No NVLink on this board, or no link this far: the links end here.
            Err(NvmlError::NotSupported | NvmlError::InvalidArg | NvmlError::FunctionNotFound) => break,
            Err(NvmlError::GpuLost) => {
                calls.lost = true;
                return;
            }
            Err(e) => {
                calls.errors.push(format!("nvlink {link} state: {e}"));
                continue;
            }
        };
        links.push(link);
        let link_label = link.to_string();
        v.count("gpu_nvlink_active", Some(u64::from(active)), &[("link", &link_label)]);
        for (counter, error) in NVLINK_ERRORS {
            let n = calls.get("nvlink_errors", || nvlink.error_counter(counter));
            v.count("gpu_nvlink_errors_total", n, &[("link", &link_label), ("error", error)]);
        }
    }
    if links.is_empty() {
        return;
    }
    // Both counters of every link in one call; nvml-wrapper's field_values_for cannot name a
    // link (scopeId).
    let mut fields: Vec<FieldValue> = links
        .iter()
        .flat_map(|&link| {
            [NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX]
                .map(|id| FieldValue::ask(id, link))
        })
        .collect();
    let nvml = dev.nvml();
    let answered = calls.get("nvlink_throughput", || {
        let sym = nvml_sym(nvml.lib().nvmlDeviceGetFieldValues.as_ref())?;
        let count = i32::try_from(fields.len()).unwrap_or(i32::MAX);
        // SAFETY: `fields` holds `count` values laid out as nvml.h's nvmlFieldValue_t.
        nvml_try(unsafe { sym(dev.handle(), count, fields.as_mut_ptr().cast()) })
    });
    if answered.is_none() {
        return;
    }
    for f in &fields {
        let name = if f.field_id == NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX {
            "gpu_nvlink_transmit_bytes_total"
        } else {
            "gpu_nvlink_receive_bytes_total"
        };
        // NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, in KiB.
        match (f.nvml_return, f.value_type) {
            (0, 3) => v.count(name, Some(f.value.saturating_mul(1024)), &[("link", &f.scope_id.to_string())]),
            (0, other) => {
                calls.errors.push(format!("nvlink {} throughput: value type {other}, expected 3", f.scope_id))
            }
            // NOT_SUPPORTED, NOT_FOUND: that link does not count it.
            (3 | 6, _) => {}
            (code, _) => calls.errors.push(format!("nvlink {} throughput: NVML error {code}", f.scope_id)),
        }
    }
}

/// nvml.h's nvmlFieldValue_t with its value read as an unsigned long long.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct FieldValue {
    field_id: u32,
    scope_id: u32,
    timestamp: i64,
    latency_usec: i64,
    value_type: u32,
    nvml_return: u32,
    value: u64,
}

impl FieldValue {
    fn ask(field_id: u32, scope_id: u32) -> Self {
        Self { field_id, scope_id, timestamp: 0, latency_usec: 0, value_type: 0, nvml_return: 0, value: 0 }
    }
}

/// Average and peak GPU and memory utilization over the samples NVML took since the last round.
fn utilization_between_polls(dev: &Device<'_>, calls: &mut Calls, v: &mut Values, last: &mut [Option<u64>; 2]) {
    for (slot, (sampling, engine)) in
        [(Sampling::GpuUtilization, "gpu"), (Sampling::MemoryUtilization, "memory")].into_iter().enumerate()
    {
        let Some(samples) = calls.get("samples", || dev.samples(sampling, last[slot])) else { continue };
        let Some(newest) = samples.iter().map(|s| s.timestamp).max() else { continue };
        last[slot] = Some(newest);
        let values: Vec<f64> = samples.iter().map(|s| sample_value(&s.value)).collect();
        #[allow(clippy::cast_precision_loss, reason = "a sample count")]
        let average = values.iter().sum::<f64>() / values.len() as f64;
        let peak = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        v.gauge("gpu_utilization_interval_average", Some(average), &[("engine", engine)]);
        v.gauge("gpu_utilization_interval_peak", Some(peak), &[("engine", engine)]);
    }
}

#[allow(clippy::cast_precision_loss, reason = "percentages")]
fn sample_value(v: &SampleValue) -> f64 {
    match *v {
        SampleValue::F64(x) => x,
        SampleValue::U32(x) => f64::from(x),
        SampleValue::U64(x) => x as f64,
        SampleValue::I64(x) => x as f64,
    }
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
