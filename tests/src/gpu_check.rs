//! `cargo xtask gpu-check`'s comparison: every GPU metric of an agent batch against what
//! `nvidia-smi -q -x` says about the same GPU (matched by PCI bus id), as a table.
//!
//! Counters and settings must be equal; live readings (temperature, power, clocks,
//! utilization) within a tolerance, since the two reads are moments apart; readings that
//! flip from moment to moment (throttle reasons, PCIe throughput) are shown, never failed.
//! Metrics nvidia-smi's XML does not carry (energy, NVLink, throttle time, per-job use) are
//! listed as the agent's only.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Context as _;
use roxmltree::{Document, Node, ParsingOptions};
use serde_json::Value;

/// How a metric is compared.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Tolerance {
    /// Must be equal.
    Exact,
    /// Equal within `abs`, or within `rel` of nvidia-smi's value.
    Within { abs: f64, rel: f64 },
    /// Shown; a difference is not a failure.
    Shown,
}

/// One value nvidia-smi gives for a GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct SmiValue {
    /// The agent's metric name.
    pub metric: &'static str,
    /// The labels beside the GPU's (`type=corrected`, ...), `k=v` sorted.
    pub labels: Vec<String>,
    /// The value in the agent's unit.
    pub value: f64,
    /// How it is compared.
    pub tolerance: Tolerance,
}

/// One GPU of `nvidia-smi -q -x`.
#[derive(Debug, Clone, PartialEq)]
pub struct SmiGpu {
    /// `00000000:18:00.0`, upper case as nvidia-smi prints it.
    pub bus_id: String,
    /// Its values.
    pub values: Vec<SmiValue>,
}

/// The verdict of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// Equal.
    Same,
    /// Within the tolerance of a live reading, or a moment-to-moment reading.
    Close,
    /// Not equal: a failure.
    Differs,
    /// nvidia-smi has it and the agent does not: a failure.
    Missing,
    /// The agent has it and nvidia-smi's XML does not carry it.
    AgentOnly,
}

impl Verdict {
    /// Whether the row fails the check.
    pub fn fails(self) -> bool {
        matches!(self, Verdict::Differs | Verdict::Missing)
    }

    fn text(self) -> &'static str {
        match self {
            Verdict::Same => "same",
            Verdict::Close => "close",
            Verdict::Differs => "DIFFERS",
            Verdict::Missing => "MISSING",
            Verdict::AgentOnly => "agent only",
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The GPU's bus id (empty for host-wide metrics).
    pub bus_id: String,
    /// The metric.
    pub metric: String,
    /// Its labels beside the GPU's.
    pub labels: String,
    /// What the agent sent.
    pub agent: Option<f64>,
    /// What nvidia-smi says.
    pub smi: Option<f64>,
    /// The comparison.
    pub verdict: Verdict,
}

/// The text of the element at `path` below `node`, trimmed; `None` when absent or `N/A`.
fn text<'a>(node: Node<'a, 'a>, path: &[&str]) -> Option<&'a str> {
    let mut n = node;
    for step in path {
        n = n.children().find(|c| c.has_tag_name(*step))?;
    }
    let t = n.text()?.trim();
    (!t.is_empty() && t != "N/A" && !t.starts_with('[')).then_some(t)
}

/// `45 C`, `123.45 W`, `16x`, `1000 KB/s`: the number before the unit.
fn number(t: &str) -> Option<f64> {
    let first = t.split_whitespace().next()?;
    first.trim_end_matches('x').parse::<f64>().ok().filter(|v| v.is_finite())
}

fn yes_no(t: &str) -> Option<f64> {
    match t {
        "Yes" => Some(1.0),
        "No" => Some(0.0),
        _ => None,
    }
}

/// The first of `paths` that has a number.
fn first_number(node: Node<'_, '_>, paths: &[&[&str]]) -> Option<f64> {
    paths.iter().find_map(|p| text(node, p).and_then(number))
}

/// The sum of the numbers at `paths` below `node`, if any is there.
fn sum(node: Node<'_, '_>, paths: &[&[&str]]) -> Option<f64> {
    let parts: Vec<f64> = paths.iter().filter_map(|p| text(node, p).and_then(number)).collect();
    (!parts.is_empty()).then(|| parts.iter().sum())
}

/// The clocks event (throttle) reason bits NVML defines, by nvidia-smi's element suffix.
const REASON_BITS: [(&str, u64); 9] = [
    ("gpu_idle", 0x1),
    ("applications_clocks_setting", 0x2),
    ("sw_power_cap", 0x4),
    ("hw_slowdown", 0x8),
    ("sync_boost", 0x10),
    ("sw_thermal_slowdown", 0x20),
    ("hw_thermal_slowdown", 0x40),
    ("hw_power_brake_slowdown", 0x80),
    ("display_clocks_setting", 0x100),
];

/// `<clocks_event_reasons>` (driver 535 and later) or `<clocks_throttle_reasons>` as NVML's
/// bitmask.
fn reasons(gpu: Node<'_, '_>) -> Option<f64> {
    let node =
        gpu.children().find(|c| c.has_tag_name("clocks_event_reasons") || c.has_tag_name("clocks_throttle_reasons"))?;
    let mut bits = 0u64;
    let mut seen = false;
    for child in node.children().filter(Node::is_element) {
        let name = child.tag_name().name();
        let Some((_, reason)) = name.split_once("reason_") else { continue };
        let Some(&(_, bit)) = REASON_BITS.iter().find(|(r, _)| *r == reason) else { continue };
        match child.text().map(str::trim) {
            Some("Active") => {
                bits |= bit;
                seen = true;
            }
            Some("Not Active") => seen = true,
            _ => {}
        }
    }
    #[allow(clippy::cast_precision_loss, reason = "nine bits")]
    seen.then_some(bits as f64)
}

/// The GPUs of an `nvidia-smi -q -x` document.
pub fn parse_smi_xml(xml: &str) -> anyhow::Result<(Option<f64>, Vec<SmiGpu>)> {
    // nvidia-smi names its DTD (`<!DOCTYPE nvidia_smi_log SYSTEM "nvsmi_device_v12.dtd">`);
    // roxmltree never loads external DTDs or entities.
    let options = ParsingOptions { allow_dtd: true, ..ParsingOptions::default() };
    let doc = Document::parse_with_options(xml, options).context("nvidia-smi -q -x output is not XML")?;
    let root = doc.root_element();
    anyhow::ensure!(
        root.has_tag_name("nvidia_smi_log"),
        "expected <nvidia_smi_log> as the root element, got <{}>",
        root.tag_name().name()
    );
    let attached = text(root, &["attached_gpus"]).and_then(number);
    let mut gpus = Vec::new();
    for gpu in root.children().filter(|c| c.has_tag_name("gpu")) {
        let bus_id = gpu
            .attribute("id")
            .map(str::to_owned)
            .or_else(|| text(gpu, &["pci", "pci_bus_id"]).map(str::to_owned))
            .context("a <gpu> without an id attribute or <pci><pci_bus_id>")?;
        let mut values = Vec::new();
        let mut put = |metric, labels: &[&str], value: Option<f64>, tolerance| {
            if let Some(value) = value {
                let labels = labels.iter().map(|l| (*l).to_owned()).collect();
                values.push(SmiValue { metric, labels, value, tolerance });
            }
        };
        let live = |abs, rel| Tolerance::Within { abs, rel };
        put("gpu_temperature", &[], text(gpu, &["temperature", "gpu_temp"]).and_then(number), live(3.0, 0.0));
        put(
            "gpu_power_draw",
            &[],
            first_number(
                gpu,
                &[
                    &["gpu_power_readings", "power_draw"],
                    &["gpu_power_readings", "instant_power_draw"],
                    &["power_readings", "power_draw"],
                ],
            ),
            live(20.0, 0.2),
        );
        put(
            "gpu_power_limit",
            &[],
            first_number(gpu, &[&["gpu_power_readings", "current_power_limit"], &["power_readings", "power_limit"]]),
            Tolerance::Exact,
        );
        put("gpu_utilization_gpu", &[], text(gpu, &["utilization", "gpu_util"]).and_then(number), live(25.0, 0.0));
        put(
            "gpu_utilization_memory",
            &[],
            text(gpu, &["utilization", "memory_util"]).and_then(number),
            live(25.0, 0.0),
        );
        put("gpu_fan_speed", &[], text(gpu, &["fan_speed"]).and_then(number), live(5.0, 0.0));
        put("gpu_clock_sm", &[], text(gpu, &["clocks", "sm_clock"]).and_then(number), live(0.0, 0.25));
        put("gpu_clock_mem", &[], text(gpu, &["clocks", "mem_clock"]).and_then(number), live(0.0, 0.05));
        let used = text(gpu, &["fb_memory_usage", "used"]).and_then(number);
        let total = text(gpu, &["fb_memory_usage", "total"]).and_then(number);
        put(
            "gpu_memory_usage",
            &[],
            used.zip(total).filter(|(_, t)| *t > 0.0).map(|(u, t)| u / t * 100.0),
            live(1.0, 0.0),
        );
        for (counter, element) in [("aggregate", "aggregate"), ("volatile", "volatile")] {
            let errors = |paths: &[&[&str]]| {
                let paths: Vec<Vec<&str>> = paths.iter().map(|p| [&["ecc_errors", element][..], p].concat()).collect();
                let refs: Vec<&[&str]> = paths.iter().map(Vec::as_slice).collect();
                sum(gpu, &refs)
            };
            // Before driver 535 a total per kind; since, per memory (SRAM, DRAM).
            let corrected =
                errors(&[&["single_bit", "total"]]).or_else(|| errors(&[&["sram_correctable"], &["dram_correctable"]]));
            let uncorrected = errors(&[&["double_bit", "total"]]).or_else(|| {
                errors(&[
                    &["sram_uncorrectable"],
                    &["sram_uncorrectable_parity"],
                    &["sram_uncorrectable_secded"],
                    &["dram_uncorrectable"],
                ])
            });
            if counter == "aggregate" {
                put("gpu_ecc_errors_corrected", &[], corrected, Tolerance::Exact);
                put("gpu_ecc_errors_uncorrected", &[], uncorrected, Tolerance::Exact);
            }
            let counter_label = format!("counter={counter}");
            put("gpu_ecc_errors_total", &[&counter_label, "type=corrected"], corrected, Tolerance::Exact);
            put("gpu_ecc_errors_total", &[&counter_label, "type=uncorrected"], uncorrected, Tolerance::Exact);
        }
        let link = ["pci", "pci_gpu_link_info"];
        let at = |rest: &[&'static str]| [&link[..], rest].concat();
        put("gpu_pcie_gen", &[], text(gpu, &at(&["pcie_gen", "current_link_gen"])).and_then(number), Tolerance::Exact);
        put(
            "gpu_pcie_width",
            &[],
            text(gpu, &at(&["link_widths", "current_link_width"])).and_then(number),
            Tolerance::Exact,
        );
        put("gpu_pcie_max_gen", &[], text(gpu, &at(&["pcie_gen", "max_link_gen"])).and_then(number), Tolerance::Exact);
        put(
            "gpu_pcie_max_width",
            &[],
            text(gpu, &at(&["link_widths", "max_link_width"])).and_then(number),
            Tolerance::Exact,
        );
        put("gpu_pcie_replays_total", &[], text(gpu, &["pci", "replay_counter"]).and_then(number), Tolerance::Exact);
        for (direction, element) in [("direction=tx", "tx_util"), ("direction=rx", "rx_util")] {
            let kib = text(gpu, &["pci", element]).and_then(number);
            put("gpu_pcie_throughput_bytes_per_second", &[direction], kib.map(|k| k * 1024.0), Tolerance::Shown);
        }
        put(
            "gpu_pstate",
            &[],
            text(gpu, &["performance_state"]).and_then(|p| p.strip_prefix('P')).and_then(|p| p.parse().ok()),
            Tolerance::Shown,
        );
        put("gpu_clocks_event_reasons", &[], reasons(gpu), Tolerance::Shown);
        let remap = |e| text(gpu, &["remapped_rows", e]);
        put(
            "gpu_remapped_rows_total",
            &["type=correctable"],
            remap("remapped_row_corr").and_then(number),
            Tolerance::Exact,
        );
        put(
            "gpu_remapped_rows_total",
            &["type=uncorrectable"],
            remap("remapped_row_unc").and_then(number),
            Tolerance::Exact,
        );
        put("gpu_remapped_rows_pending", &[], remap("remapped_row_pending").and_then(yes_no), Tolerance::Exact);
        put("gpu_remapped_rows_failure", &[], remap("remapped_row_failure").and_then(yes_no), Tolerance::Exact);
        let retired = |path: &[&str]| text(gpu, &[&["retired_pages"][..], path].concat());
        put(
            "gpu_retired_pages_total",
            &["cause=single_bit"],
            retired(&["multiple_single_bit_retirement", "retired_count"]).and_then(number),
            Tolerance::Exact,
        );
        put(
            "gpu_retired_pages_total",
            &["cause=double_bit"],
            retired(&["double_bit_retirement", "retired_count"]).and_then(number),
            Tolerance::Exact,
        );
        put("gpu_retired_pages_pending", &[], retired(&["pending_retirement"]).and_then(yes_no), Tolerance::Exact);
        // nvidia-smi lists the GPU: the agent must not call it lost.
        put("gpu_lost", &[], Some(0.0), Tolerance::Exact);
        gpus.push(SmiGpu { bus_id, values });
    }
    Ok((attached, gpus))
}

/// The labels of the GPU itself, left out of a row's `labels`.
const GPU_LABELS: [&str; 4] = ["gpu", "model", "bus_id", "uuid"];

/// The agent's GPU samples of `batch` (the JSON the agent sends): (bus id upper case, metric,
/// other labels `k=v` sorted) → value.
fn agent_values(batch: &Value) -> BTreeMap<(String, String, Vec<String>), f64> {
    let mut values = BTreeMap::new();
    for m in batch["metrics"].as_array().into_iter().flatten() {
        let Some(name) = m["name"].as_str().filter(|n| n.starts_with("gpu_")) else { continue };
        let Some(value) = m["value"].as_f64() else { continue };
        let labels = m["labels"].as_object();
        let bus_id = labels.and_then(|l| l.get("bus_id")).and_then(Value::as_str).unwrap_or("").to_ascii_uppercase();
        let mut rest: Vec<String> = labels
            .into_iter()
            .flatten()
            .filter(|(k, _)| !GPU_LABELS.contains(&k.as_str()))
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect();
        rest.sort();
        values.insert((bus_id, name.to_owned(), rest), value);
    }
    values
}

fn verdict(agent: f64, smi: f64, tolerance: Tolerance) -> Verdict {
    #[allow(clippy::float_cmp, reason = "counts and settings compare exactly")]
    if agent == smi {
        return Verdict::Same;
    }
    match tolerance {
        Tolerance::Exact => Verdict::Differs,
        Tolerance::Within { abs, rel } if (agent - smi).abs() <= abs.max(rel * smi.abs()) => Verdict::Close,
        Tolerance::Within { .. } => Verdict::Differs,
        Tolerance::Shown => Verdict::Close,
    }
}

/// Every GPU metric of `batch` against nvidia-smi's: the XML's values first (GPU by GPU), then
/// what only the agent has.
pub fn compare(batch: &Value, attached: Option<f64>, smi: &[SmiGpu]) -> Vec<Row> {
    let mut agent = agent_values(batch);
    let mut rows = Vec::new();
    if let Some(n) = attached {
        let got = agent.remove(&(String::new(), "gpu_visible".to_owned(), Vec::new()));
        let verdict = got.map_or(Verdict::Missing, |g| verdict(g, n, Tolerance::Exact));
        rows.push(Row {
            bus_id: String::new(),
            metric: "gpu_visible".into(),
            labels: String::new(),
            agent: got,
            smi: Some(n),
            verdict,
        });
    }
    for gpu in smi {
        let bus_id = gpu.bus_id.to_ascii_uppercase();
        for v in &gpu.values {
            let mut labels = v.labels.clone();
            labels.sort();
            let got = agent.remove(&(bus_id.clone(), v.metric.to_owned(), labels.clone()));
            let verdict = got.map_or(Verdict::Missing, |g| verdict(g, v.value, v.tolerance));
            rows.push(Row {
                bus_id: bus_id.clone(),
                metric: v.metric.to_owned(),
                labels: labels.join(","),
                agent: got,
                smi: Some(v.value),
                verdict,
            });
        }
    }
    for ((bus_id, metric, labels), value) in agent {
        rows.push(Row {
            bus_id,
            metric,
            labels: labels.join(","),
            agent: Some(value),
            smi: None,
            verdict: Verdict::AgentOnly,
        });
    }
    rows
}

/// The rows as an aligned text table with a summary line.
pub fn table(rows: &[Row]) -> String {
    let show = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v}"));
    let header = ["bus_id", "metric", "labels", "agent", "nvidia-smi", "verdict"];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.bus_id.clone(),
                r.metric.clone(),
                r.labels.clone(),
                show(r.agent),
                show(r.smi),
                r.verdict.text().to_owned(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for c in &cells {
        for (w, cell) in widths.iter_mut().zip(c) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, c: &[&str]| {
        let parts: Vec<String> = c.iter().zip(widths).map(|(s, w)| format!("{s:<w$}")).collect();
        let _ = writeln!(out, "{}", parts.join("  ").trim_end());
    };
    line(&mut out, &header);
    for c in &cells {
        line(&mut out, &c.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let count = |v: Verdict| rows.iter().filter(|r| r.verdict == v).count();
    let _ = writeln!(
        out,
        "{} rows: {} same, {} close, {} differ, {} missing, {} agent only",
        rows.len(),
        count(Verdict::Same),
        count(Verdict::Close),
        count(Verdict::Differs),
        count(Verdict::Missing),
        count(Verdict::AgentOnly)
    );
    out
}
