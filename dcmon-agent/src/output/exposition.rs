//! A [`Batch`] as Prometheus's text exposition format 0.0.4, or as OpenMetrics 1.0 text when the
//! scraper asks for it (the `/metrics` endpoint, [`super::metrics_endpoint`]).
//!
//! What both formats get, after client_golang's `expfmt` and node_exporter:
//!
//! - one `# HELP` and one `# TYPE` line per family, then all its samples, even when the batch
//!   interleaves families (families in order of first appearance, samples in batch order);
//! - `histogram` for the `_bucket`, `_sum` and `_count` samples of a family in
//!   [`crate::batch::HISTOGRAM_FAMILIES`], under the family's name; else `counter` for names
//!   ending in `_total` (the agent's naming contract: README, Metrics), `gauge` otherwise. OpenMetrics names a counter family without `_total` in its HELP and TYPE
//!   lines; its samples keep the suffix;
//! - a `machine_id` label on every sample, the batch's machine id (the label remote_write adds),
//!   unless the sample has one itself;
//! - label values escaped (`\\`, `\"`, `\n`); HELP text escaped (`\\`, `\n`, and in OpenMetrics
//!   also `\"`);
//! - [`Value::Count`] as an integer, [`Value::Gauge`] as the shortest decimal that reads back as
//!   the same `f64` (ryu, through serde_json, as in the JSON batch);
//! - no timestamps. A scrape reads the latest round, at most one collection interval old, and
//!   Prometheus stamps what it scrapes with the scrape's time. An explicit timestamp would make
//!   Prometheus treat the series as pushed ones: staleness markers stop working (a disk or GPU
//!   that goes away would linger for 5 minutes instead of ending at the next scrape), and two
//!   scrapes within one round would send the same timestamp twice, which Prometheus counts as
//!   duplicate samples. node_exporter and client_golang leave timestamps out for the same reason.

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::batch::{Batch, Sample, Value, histogram_family};

/// The label every sample carries: the batch's machine id.
pub const MACHINE_ID_LABEL: &str = "machine_id";

/// Which text format to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Prometheus text format 0.0.4 (`text/plain; version=0.0.4`).
    Prometheus,
    /// OpenMetrics 1.0.0 text (`application/openmetrics-text; version=1.0.0`).
    OpenMetrics,
}

impl Format {
    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// The format a scraper's `Accept` header asks for: OpenMetrics when
    /// `application/openmetrics-text` (version 1.0.0, 0.0.1 or unversioned) has a higher
    /// quality than `text/plain` and `*/*` (an earlier entry wins a tie), else Prometheus text,
    /// which is also the answer to no header, `*/*`, or only types this endpoint does not
    /// write (protobuf): client_golang's `expfmt.Negotiate` does the same.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let Some(accept) = accept else { return Self::Prometheus };
        let mut best: Option<(f32, Self)> = None;
        for entry in accept.split(',') {
            let mut parts = entry.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let mut q = 1.0_f32;
            let mut version = None;
            for p in parts {
                let Some((k, v)) = p.split_once('=') else { continue };
                let v = v.trim().trim_matches('"');
                match k.trim().to_ascii_lowercase().as_str() {
                    "q" => q = v.parse().unwrap_or(0.0),
                    "version" => version = Some(v.to_owned()),
                    _ => {}
                }
            }
            let format = match media.as_str() {
                "application/openmetrics-text" if matches!(version.as_deref(), None | Some("1.0.0" | "0.0.1")) => {
                    Self::OpenMetrics
                }
                "text/plain" | "*/*" | "text/*" => Self::Prometheus,
                _ => continue,
            };
            if q > 0.0 && best.is_none_or(|(b, _)| q > b) {
                best = Some((q, format));
            }
        }
        best.map_or(Self::Prometheus, |(_, f)| f)
    }
}

/// `batch` in `format`, ready to serve.
pub fn render(batch: &Batch, format: Format) -> Vec<u8> {
    let samples = batch.samples();
    // Families in order of first appearance, each with its samples in batch order.
    let mut index: HashMap<&'static str, usize> = HashMap::with_capacity(64);
    let mut families: Vec<(&'static str, Vec<&Sample>)> = Vec::with_capacity(64);
    for s in samples {
        let family = histogram_family(s.name).map_or(s.name, |h| h.family);
        let i = *index.entry(family).or_insert_with(|| {
            families.push((family, Vec::new()));
            families.len() - 1
        });
        families[i].1.push(s);
    }
    // A sample line takes 60 to 150 bytes, a family's two comment lines about 100.
    let mut out = String::with_capacity(samples.len() * 128 + families.len() * 112 + 16);
    let mut machine_id = String::with_capacity(batch.machine_id.len() + 2);
    push_label_value(&mut machine_id, &batch.machine_id);
    for (name, members) in &families {
        let histogram = histogram_family(members[0].name).is_some();
        let counter = !histogram && name.ends_with("_total");
        let family = match format {
            Format::OpenMetrics if counter => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        out.push_str("# HELP ");
        out.push_str(family);
        out.push(' ');
        push_help(&mut out, help(name), format);
        out.push_str("\n# TYPE ");
        out.push_str(family);
        out.push_str(if histogram {
            " histogram\n"
        } else if counter {
            " counter\n"
        } else {
            " gauge\n"
        });
        for s in members {
            out.push_str(s.name);
            out.push('{');
            let own_machine_id = s.labels.iter().any(|(k, _)| *k == MACHINE_ID_LABEL);
            if !own_machine_id {
                out.push_str(MACHINE_ID_LABEL);
                out.push_str("=\"");
                out.push_str(&machine_id);
                out.push('"');
            }
            for (i, (key, value)) in s.labels.iter().enumerate() {
                if i > 0 || !own_machine_id {
                    out.push(',');
                }
                out.push_str(key);
                out.push_str("=\"");
                push_label_value(&mut out, value);
                out.push('"');
            }
            out.push_str("} ");
            push_value(&mut out, s.value);
            out.push('\n');
        }
    }
    if format == Format::OpenMetrics {
        out.push_str("# EOF\n");
    }
    out.into_bytes()
}

/// A label value with `\`, `"` and line feeds escaped (both formats).
fn push_label_value(out: &mut String, value: &str) {
    if !value.bytes().any(|b| matches!(b, b'\\' | b'"' | b'\n')) {
        out.push_str(value);
        return;
    }
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// HELP text: `\` and line feeds escaped; OpenMetrics escapes `"` too, where Prometheus 0.0.4
/// knows no `\"` escape in HELP (its parser rejects it).
fn push_help(out: &mut String, text: &str, format: Format) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if format == Format::OpenMetrics => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

fn push_value(out: &mut String, value: Value) {
    match value {
        // Writing into a String cannot fail.
        Value::Count(v) => {
            let _ = write!(out, "{v}");
        }
        Value::Gauge(v) if v.is_finite() => {
            // serde_json writes finite floats with ryu: the shortest round-trip decimal.
            let mut buf = Vec::with_capacity(24);
            let _ = serde_json::to_writer(&mut buf, &v);
            out.push_str(std::str::from_utf8(&buf).unwrap_or("0"));
        }
        // A batch holds finite values only (Batch::push); both formats spell these so.
        Value::Gauge(v) if v.is_nan() => out.push_str("NaN"),
        Value::Gauge(v) => out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" }),
    }
}

/// The HELP text of a metric: the README's metric table in one line.
pub fn help(name: &str) -> &'static str {
    match name {
        "cpu_load_1m" => "Load average over 1 minute (/proc/loadavg).",
        "cpu_load_5m" => "Load average over 5 minutes (/proc/loadavg).",
        "cpu_load_15m" => "Load average over 15 minutes (/proc/loadavg).",
        "cpu_usage_percent" => "Percent of all CPUs busy over the last collection interval.",
        "memory_total_bytes" => "Total memory in bytes (MemTotal).",
        "memory_available_bytes" => "Available memory in bytes (MemAvailable).",
        "memory_used_bytes" => "Used memory in bytes (total minus available).",
        "memory_usage_percent" => "Used memory in percent of total.",
        "disk_reads_total" => "Completed reads since boot.",
        "disk_read_bytes_total" => "Bytes read since boot.",
        "disk_writes_total" => "Completed writes since boot.",
        "disk_write_bytes_total" => "Bytes written since boot.",
        "network_receive_bytes_total" => "Bytes received since boot.",
        "tcp_retransmits_total" => "TCP segments retransmitted since the agent started, by address family (eBPF).",
        "tcp_resets_sent_total" => "TCP resets sent since the agent started (eBPF).",
        "tcp_resets_received_total" => "TCP resets received since the agent started (eBPF).",
        "oom_kills_total" => "Processes the kernel OOM killer killed since the agent started, by job (eBPF).",
        "network_drops_total" => {
            "Packets the kernel dropped, by interface and drop reason, since the agent started (eBPF)."
        }
        "network_transmit_bytes_total" => "Bytes transmitted since boot.",
        "apt_upgrades_pending" => "Installed packages with a newer candidate.",
        "apt_reboot_required" => "1 if /run/reboot-required exists, else 0.",
        "apt_lists_age_seconds" => "Seconds since the package lists last changed.",
        "nvme_temperature_celsius" => "NVMe composite temperature in degrees Celsius.",
        "nvme_available_spare_ratio" => "NVMe spare capacity left, 0 to 1.",
        "nvme_percentage_used_ratio" => "NVMe vendor wear estimate, 0 to 1 (may exceed 1).",
        "nvme_critical_warning_total" => "NVMe critical-warning bit field (0 = none).",
        "nvme_power_on_hours_total" => "NVMe power-on hours.",
        "nvme_media_errors_total" => "NVMe media and data integrity errors.",
        "nvme_unsafe_shutdowns_total" => "NVMe unsafe shutdowns.",
        "nvme_data_units_read_total" => "NVMe data units read (1 unit = 512000 bytes).",
        "nvme_data_units_written_total" => "NVMe data units written (1 unit = 512000 bytes).",
        "ipmi_temperature_celsius" => "IPMI temperature sensor in degrees Celsius.",
        "ipmi_power_watts" => "IPMI power sensor in watts.",
        "ipmi_speed_rpm" => "IPMI fan speed sensor in RPM.",
        "ipmi_volts" => "IPMI voltage sensor in volts.",
        "ipmi_amps" => "IPMI current sensor in amperes.",
        "ipmi_sensor_state" => "IPMI discrete sensor state bits.",
        "dcmon_collector_duration_seconds" => "Seconds the collector took this round.",
        "dcmon_collector_success" => "1 if the collector worked this round, else 0.",
        "dcmon_nonfinite_values_dropped_total" => "Values dropped because they were NaN or infinite, since start.",
        "disk_io_latency_seconds" => "Disk I/O latency from issue to completion, per disk and operation (eBPF).",
        "dcmon_ebpf_overflow_total" => "Events the eBPF programs counted in the overflow slot: devices without a slot.",
        "dcmon_ebpf_active" => "1 when eBPF programs feed the disk or network metrics, 0 on procfs.",
        "dcmon_ebpf_program_attached" => "1 when the eBPF program is attached, 0 when it could not be loaded.",
        "dcmon_ebpf_program_missed_total" => "Events the kernel skipped for an eBPF program.",
        "dcmon_ebpf_program_runs_total" => "eBPF program runs (kernel.bpf_stats_enabled=1).",
        "dcmon_ebpf_program_run_seconds_total" => "eBPF program run time in seconds (kernel.bpf_stats_enabled=1).",
        "dcmon_outbox_batches" => "Batches waiting in the outbox.",
        "dcmon_outbox_bytes" => "Bytes waiting in the outbox.",
        "dcmon_outbox_dropped_batches_total" => "Batches dropped by the outbox size and age bounds, since start.",
        "dcmon_outbox_corrupt_batches_total" => "Corrupt or lost outbox batches set aside, since start.",
        "dcmon_outbox_rejected_batches_total" => "Batches the server refused for good, since start.",
        n if n.starts_with("gpu_") => "NVIDIA GPU metric (NVML or nvidia-smi).",
        _ => "dcmon-agent metric.",
    }
}

#[cfg(test)]
pub(crate) mod tests;
