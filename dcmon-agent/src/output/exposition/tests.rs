//! Exact text of small batches in both formats, the Accept negotiation, and promtool.

use super::*;
use crate::batch::Sample;

/// Interleaved families, an escaped label value, a counter and gauges, a float and an integer.
fn small_batch() -> Batch {
    let mut b = Batch::new("m-1", 1_700_000_000);
    b.push(Sample::count("disk_reads_total", 12).label("device", "vda"));
    b.push(Sample::gauge("cpu_load_1m", 0.1));
    b.push(Sample::count("disk_reads_total", 1 << 60).label("device", "we\"ird\\dev\nname"));
    b.push(Sample::gauge("dcmon_collector_duration_seconds", 2.5e-5).label("collector", "os"));
    b.push(Sample::count("memory_total_bytes", 8_000_000_000));
    b.push(Sample::gauge("cpu_load_1m_odd", 1e21));
    b
}

#[test]
fn prometheus_text_groups_families_escapes_and_types() {
    let text = String::from_utf8(render(&small_batch(), Format::Prometheus)).expect("utf8");
    let expected = "\
# HELP disk_reads_total Completed reads since boot.
# TYPE disk_reads_total counter
disk_reads_total{machine_id=\"m-1\",device=\"vda\"} 12
disk_reads_total{machine_id=\"m-1\",device=\"we\\\"ird\\\\dev\\nname\"} 1152921504606846976
# HELP cpu_load_1m Load average over 1 minute (/proc/loadavg).
# TYPE cpu_load_1m gauge
cpu_load_1m{machine_id=\"m-1\"} 0.1
# HELP dcmon_collector_duration_seconds Seconds the collector took this round.
# TYPE dcmon_collector_duration_seconds gauge
dcmon_collector_duration_seconds{machine_id=\"m-1\",collector=\"os\"} 0.000025
# HELP memory_total_bytes Total memory in bytes (MemTotal).
# TYPE memory_total_bytes gauge
memory_total_bytes{machine_id=\"m-1\"} 8000000000
# HELP cpu_load_1m_odd dcmon-agent metric.
# TYPE cpu_load_1m_odd gauge
cpu_load_1m_odd{machine_id=\"m-1\"} 1e+21
";
    assert_eq!(text, expected);
}

#[test]
fn openmetrics_names_counter_families_without_total_and_ends_with_eof() {
    let text = String::from_utf8(render(&small_batch(), Format::OpenMetrics)).expect("utf8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "# HELP disk_reads Completed reads since boot.");
    assert_eq!(lines[1], "# TYPE disk_reads counter");
    assert_eq!(lines[2], "disk_reads_total{machine_id=\"m-1\",device=\"vda\"} 12");
    assert_eq!(lines[5], "# TYPE cpu_load_1m gauge");
    assert_eq!(lines.last(), Some(&"# EOF"));
    assert!(text.ends_with("# EOF\n"));
    // Everything but the counter family lines and the EOF is the same as in 0.0.4.
    let prom = String::from_utf8(render(&small_batch(), Format::Prometheus)).expect("utf8");
    assert_eq!(
        text.replace("# HELP disk_reads ", "# HELP disk_reads_total ")
            .replace("# TYPE disk_reads ", "# TYPE disk_reads_total "),
        prom + "# EOF\n"
    );
}

#[test]
fn help_escaping_differs_between_formats() {
    let mut p = String::new();
    push_help(&mut p, "a\\b\n\"c\"", Format::Prometheus);
    assert_eq!(p, "a\\\\b\\n\"c\"");
    let mut o = String::new();
    push_help(&mut o, "a\\b\n\"c\"", Format::OpenMetrics);
    assert_eq!(o, "a\\\\b\\n\\\"c\\\"");
}

#[test]
fn own_machine_id_label_is_not_doubled_and_empty_batch_is_empty() {
    let mut b = Batch::new("batch-id", 1);
    b.push(Sample::gauge("x", 1.0).label("machine_id", "own"));
    let text = String::from_utf8(render(&b, Format::Prometheus)).expect("utf8");
    assert!(text.ends_with("x{machine_id=\"own\"} 1.0\n"), "{text}");
    assert!(render(&Batch::new("m", 1), Format::Prometheus).is_empty());
    assert_eq!(render(&Batch::new("m", 1), Format::OpenMetrics), b"# EOF\n");
}

#[test]
fn gauges_read_back_as_the_same_float() {
    for v in [0.0, -0.0, 0.1, 1.0 / 3.0, 1e-300, 1.7976931348623157e308, 123_456_789.125, -42.0] {
        let mut out = String::new();
        push_value(&mut out, Value::Gauge(v));
        assert_eq!(out.parse::<f64>().expect("float").to_bits(), v.to_bits(), "{out}");
    }
    let mut out = String::new();
    push_value(&mut out, Value::Count(u64::MAX));
    assert_eq!(out, "18446744073709551615");
}

#[test]
fn accept_header_negotiation() {
    use Format::{OpenMetrics as Om, Prometheus as P};
    let prometheus_3 = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,\
                        application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,\
                        text/plain;version=0.0.4;q=0.2,*/*;q=0.1";
    let prometheus_2 = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
                        text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let cases: [(Option<&str>, Format); 10] = [
        (None, P),
        (Some(""), P),
        (Some("*/*"), P),
        (Some("text/plain"), P),
        (Some("application/openmetrics-text"), Om),
        (Some("Application/OpenMetrics-Text; version=1.0.0"), Om),
        (Some("application/openmetrics-text; version=2.0.0"), P),
        (Some("text/plain;q=0.9, application/openmetrics-text;q=0.5"), P),
        (Some(prometheus_3), Om),
        (Some(prometheus_2), Om),
    ];
    for (accept, want) in cases {
        assert_eq!(Format::negotiate(accept), want, "{accept:?}");
    }
    assert_eq!(Format::negotiate(Some("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily")), P);
    assert_eq!(Format::negotiate(Some("application/openmetrics-text;q=0, text/plain;q=0.1")), P);
}

/// promtool's verdict on `text`: `Ok` when it parses and lints clean, or when the only lint
/// findings are about units in names the metric table fixes (README, Metrics). promtool ships
/// with Prometheus (Debian's `prometheus` package; CI installs it).
pub(crate) fn promtool_check(text: &[u8]) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run promtool (install Debian's prometheus package): {e}"))?;
    child.stdin.take().ok_or("no stdin")?.write_all(text).map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Exit 3: lint findings only (the text parsed). Names are a contract (the JSON batch has
    // the same ones), so promlint's unit advice on them is accepted; nothing else is.
    let accepted = |l: &str| l.trim().is_empty() || l.contains(" use base unit ");
    match out.status.code() {
        Some(0) => Ok(()),
        Some(3) if said.lines().all(accepted) => Ok(()),
        _ => Err(format!("promtool check metrics: {}\n{said}", out.status)),
    }
}

#[test]
fn promtool_accepts_the_small_batch() {
    // promtool parses the 0.0.4 text format only.
    promtool_check(&render(&small_batch(), Format::Prometheus)).expect("promtool");
}
