//! InfiniBand and RoCE ports from /sys/class/infiniband/DEV/ports/N/: state, physical state,
//! rate and link layer, the standard port counters (`counters/`) and every driver counter in
//! `hw_counters/` (mlx5: `out_of_buffer`, `np_cnp_sent`, `rp_cnp_handled`,
//! `local_ack_timeout_err`, ...). RDMA traffic bypasses the kernel's network stack: neither
//! /proc/net/dev nor the eBPF counters see it.
//!
//! Runs on its own thread under the collector timeout: the drivers answer counter reads with
//! firmware commands (a MAD to the port's PMA on mlx5), which can stall with the firmware.

use super::attr::{RELIST_EVERY, Relist, excerpt, is_gone, parse_u64, round_result, sorted_names};
use super::{CollectError, Collector};
use crate::batch::Sample;
use crate::host::Host;

/// This collector's row in the table ([`super::SOURCES`]).
pub const SOURCE: super::Source = super::Source {
    name: "infiniband",
    switch: super::Switch::Exporter { default: true },
    caps: &[],
    section: None,
    build: Some(|host, _| Box::new(InfinibandCollector::new(host.clone()))),
};

/// The standard counters reported (`counters/NAME`), the metric of each and the unit the
/// file counts in (the data counters count 4-byte words; reported in bytes).
pub const COUNTERS: [(&str, &str, u64); 16] = [
    ("port_rcv_data", "infiniband_port_receive_bytes_total", 4),
    ("port_xmit_data", "infiniband_port_transmit_bytes_total", 4),
    ("port_rcv_packets", "infiniband_port_receive_packets_total", 1),
    ("port_xmit_packets", "infiniband_port_transmit_packets_total", 1),
    ("symbol_error", "infiniband_symbol_errors_total", 1),
    ("link_downed", "infiniband_link_downed_total", 1),
    ("link_error_recovery", "infiniband_link_error_recovery_total", 1),
    ("port_rcv_errors", "infiniband_port_receive_errors_total", 1),
    ("port_rcv_remote_physical_errors", "infiniband_port_receive_remote_physical_errors_total", 1),
    ("port_xmit_discards", "infiniband_port_transmit_discards_total", 1),
    ("port_xmit_wait", "infiniband_port_transmit_wait_total", 1),
    ("excessive_buffer_overrun_errors", "infiniband_excessive_buffer_overrun_errors_total", 1),
    ("local_link_integrity_errors", "infiniband_local_link_integrity_errors_total", 1),
    ("port_rcv_constraint_errors", "infiniband_port_receive_constraint_errors_total", 1),
    ("port_xmit_constraint_errors", "infiniband_port_transmit_constraint_errors_total", 1),
    ("VL15_dropped", "infiniband_vl15_dropped_total", 1),
];

/// Files in `hw_counters/` that are settings, not counters (mlx5's `lifespan`: how long, in
/// ms, the driver caches the counters).
const NOT_COUNTERS: [&str; 1] = ["lifespan"];

/// `4: ACTIVE` (`state`) or `5: LinkUp` (`phys_state`): the number.
pub fn parse_state(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    t.split_once(':')
        .and_then(|(n, _)| n.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("expected \"<number>: <NAME>\" such as \"4: ACTIVE\", got {:?}", excerpt(t)))
}

/// `100 Gb/sec (4X EDR)` (`rate`) in bytes per second.
pub fn parse_rate(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let mut words = t.split_whitespace();
    match (words.next().and_then(|n| n.parse::<f64>().ok()), words.next()) {
        (Some(gbit), Some("Gb/sec")) if gbit.is_finite() && gbit >= 0.0 =>
        {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "finite, at least 0, rounded")]
            Ok((gbit * 125_000_000.0).round() as u64)
        }
        _ => anyhow::bail!("expected \"<number> Gb/sec ...\" such as \"100 Gb/sec (4X EDR)\", got {:?}", excerpt(t)),
    }
}

/// A counter file's value; `None` for `N/A (no PMA)`, what a port without a performance
/// management agent answers.
pub fn parse_counter(text: &str) -> anyhow::Result<Option<u64>> {
    if text.trim_start().starts_with("N/A") {
        return Ok(None);
    }
    parse_u64(text).map(Some)
}

/// One port and the counter files it has (listed once: the set is fixed by the driver).
#[derive(Debug)]
struct Port {
    device: String,
    port: String,
    /// `/sys/class/infiniband/DEV/ports/N`.
    dir: String,
    /// Indexes into [`COUNTERS`] of the files `counters/` holds.
    counters: Vec<usize>,
    /// The names in `hw_counters/`.
    hw_counters: Vec<String>,
}

/// InfiniBand and RoCE ports.
#[derive(Debug)]
pub struct InfinibandCollector {
    host: Host,
    ports: Vec<Port>,
    relist: Relist,
    buf: String,
}

impl InfinibandCollector {
    /// A collector reading `host`'s /sys/class/infiniband.
    pub fn new(host: Host) -> Self {
        Self { host, ports: Vec::new(), relist: Relist::new(RELIST_EVERY), buf: String::new() }
    }

    fn list(&mut self) -> Result<(), CollectError> {
        let first = self.relist.is_first();
        self.relist.done();
        let mut ports = Vec::new();
        for device in sorted_names(&self.host, "/sys/class/infiniband")? {
            let Ok(numbers) = sorted_names(&self.host, format!("/sys/class/infiniband/{device}/ports")) else {
                continue;
            };
            for port in numbers {
                let dir = format!("/sys/class/infiniband/{device}/ports/{port}");
                let present = sorted_names(&self.host, format!("{dir}/counters")).unwrap_or_default();
                let counters = (0..COUNTERS.len()).filter(|&i| present.iter().any(|n| n == COUNTERS[i].0)).collect();
                let mut hw_counters = sorted_names(&self.host, format!("{dir}/hw_counters")).unwrap_or_default();
                hw_counters.retain(|n| !NOT_COUNTERS.contains(&n.as_str()));
                ports.push(Port { device: device.clone(), port, dir, counters, hw_counters });
            }
        }
        self.ports = ports;
        if first && self.ports.is_empty() {
            return Err(CollectError::NotPresent("no port in /sys/class/infiniband".to_owned()));
        }
        Ok(())
    }

    /// One port's samples into `out`; errors into `errors`. Returns false when the port is
    /// gone (nothing of it is kept then).
    fn read_port(&mut self, i: usize, out: &mut Vec<Sample>, errors: &mut Vec<anyhow::Error>) -> bool {
        let (host, p, buf) = (&self.host, &self.ports[i], &mut self.buf);
        let mark = out.len();
        let labelled = |s: Sample| s.label("device", p.device.as_str()).label("port", p.port.as_str());
        // The file's text in `buf`: Some(true) read, Some(false) failed (error noted), None gone.
        let read = |rel: &str, buf: &mut String, errors: &mut Vec<anyhow::Error>| -> Option<bool> {
            match host.read_into(format!("{}/{rel}", p.dir), buf) {
                Ok(()) => Some(true),
                Err(e) if is_gone(&e) => None,
                Err(e) => {
                    errors.push(e.into());
                    Some(false)
                }
            }
        };
        let named = |rel: &str, e: anyhow::Error| {
            e.context(format!("parsing {}", host.path(format!("{}/{rel}", p.dir)).display()))
        };
        let link_layer = match read("link_layer", buf, errors) {
            None => {
                out.truncate(mark);
                return false;
            }
            Some(true) => buf.trim().to_owned(),
            Some(false) => String::new(),
        };
        for (rel, metric, parse) in [
            ("state", "infiniband_port_state", parse_state as fn(&str) -> anyhow::Result<u64>),
            ("phys_state", "infiniband_port_physical_state", parse_state),
            ("rate", "infiniband_port_rate_bytes_per_second", parse_rate),
        ] {
            match read(rel, buf, errors) {
                None => {
                    out.truncate(mark);
                    return false;
                }
                Some(false) => {}
                Some(true) => match parse(buf) {
                    Ok(v) => {
                        let s = labelled(Sample::count(metric, v));
                        out.push(if rel == "state" { s.label("link_layer", link_layer.as_str()) } else { s });
                    }
                    Err(e) => errors.push(named(rel, e)),
                },
            }
        }
        for &c in &p.counters {
            let (file, metric, unit) = COUNTERS[c];
            let rel = format!("counters/{file}");
            match read(&rel, buf, errors) {
                None => {
                    out.truncate(mark);
                    return false;
                }
                Some(false) => {}
                Some(true) => match parse_counter(buf) {
                    Ok(v) => out.extend(v.map(|v| labelled(Sample::count(metric, v.wrapping_mul(unit))))),
                    Err(e) => errors.push(named(&rel, e)),
                },
            }
        }
        for name in &p.hw_counters {
            let rel = format!("hw_counters/{name}");
            match read(&rel, buf, errors) {
                None => {
                    out.truncate(mark);
                    return false;
                }
                Some(false) => {}
                Some(true) => match parse_counter(buf) {
                    Ok(v) => out.extend(v.map(|v| {
                        labelled(Sample::count("infiniband_hw_counter_total", v)).label("counter", name.as_str())
                    })),
                    Err(e) => errors.push(named(&rel, e)),
                },
            }
        }
        true
    }
}

impl Collector for InfinibandCollector {
    fn name(&self) -> &'static str {
        SOURCE.name
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        if self.relist.is_due() {
            self.list()?;
        }
        let mut errors = Vec::new();
        let mut gone = false;
        for i in 0..self.ports.len() {
            gone |= !self.read_port(i, out, &mut errors);
        }
        if gone || !errors.is_empty() {
            self.relist.soon();
        }
        round_result(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Value;

    #[test]
    fn states_and_rates_parse() {
        assert_eq!(parse_state("4: ACTIVE\n").expect("state"), 4);
        assert_eq!(parse_state("5: LinkUp\n").expect("phys"), 5);
        assert_eq!(parse_rate("100 Gb/sec (4X EDR)\n").expect("rate"), 12_500_000_000);
        assert_eq!(parse_rate("2.5 Gb/sec (1X SDR)\n").expect("rate"), 312_500_000);
        assert_eq!(parse_rate("400 Gb/sec (4X NDR)\n").expect("rate"), 50_000_000_000);
        assert_eq!(parse_counter("N/A (no PMA)\n").expect("n/a"), None);
        assert_eq!(parse_counter("17\n").expect("n"), Some(17));
        let e = parse_state("ACTIVE\n").expect_err("no number");
        assert_eq!(e.to_string(), "expected \"<number>: <NAME>\" such as \"4: ACTIVE\", got \"ACTIVE\"");
        let e = parse_rate("100 Mb/sec\n").expect_err("unit");
        assert_eq!(
            e.to_string(),
            "expected \"<number> Gb/sec ...\" such as \"100 Gb/sec (4X EDR)\", got \"100 Mb/sec\""
        );
        assert!(parse_rate("inf Gb/sec").is_err() && parse_rate("-1 Gb/sec").is_err());
    }

    #[test]
    fn no_class_directory_or_no_port_is_not_present() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = InfinibandCollector::new(Host::new(dir.path()));
        assert!(matches!(c.collect(&mut Vec::new()), Err(CollectError::NotPresent(_))));
        std::fs::create_dir_all(dir.path().join("sys/class/infiniband")).expect("mkdir");
        let mut c = InfinibandCollector::new(Host::new(dir.path()));
        assert!(matches!(c.collect(&mut Vec::new()), Err(CollectError::NotPresent(_))));
    }

    #[test]
    fn a_bad_counter_is_named_and_the_rest_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = dir.path().join("sys/class/infiniband/mlx5_0/ports/1");
        std::fs::create_dir_all(port.join("counters")).expect("mkdir");
        std::fs::create_dir_all(port.join("hw_counters")).expect("mkdir");
        for (f, t) in [
            ("state", "4: ACTIVE"),
            ("phys_state", "5: LinkUp"),
            ("rate", "200 Gb/sec (4X HDR)"),
            ("link_layer", "InfiniBand"),
        ] {
            std::fs::write(port.join(f), format!("{t}\n")).expect("write");
        }
        std::fs::write(port.join("counters/port_rcv_data"), "1000\n").expect("write");
        std::fs::write(port.join("counters/symbol_error"), "many\n").expect("write");
        std::fs::write(port.join("hw_counters/out_of_buffer"), "3\n").expect("write");
        std::fs::write(port.join("hw_counters/lifespan"), "10\n").expect("write");
        let mut out = Vec::new();
        let e = InfinibandCollector::new(Host::new(dir.path())).collect(&mut out).expect_err("bad counter");
        let e = format!("{e:#}");
        assert_eq!(
            e,
            format!(
                "parsing {}: expected an unsigned integer, got \"many\"",
                port.join("counters/symbol_error").display()
            )
        );
        let got: Vec<(&str, Value)> = out.iter().map(|s| (s.name, s.value)).collect();
        assert_eq!(
            got,
            [
                ("infiniband_port_state", Value::Count(4)),
                ("infiniband_port_physical_state", Value::Count(5)),
                ("infiniband_port_rate_bytes_per_second", Value::Count(25_000_000_000)),
                ("infiniband_port_receive_bytes_total", Value::Count(4000)),
                ("infiniband_hw_counter_total", Value::Count(3)),
            ]
        );
        let l = |k: &'static str, v: &str| (k, v.into());
        assert_eq!(out[0].labels, [l("device", "mlx5_0"), l("port", "1"), l("link_layer", "InfiniBand")]);
        assert_eq!(out[4].labels, [l("device", "mlx5_0"), l("port", "1"), l("counter", "out_of_buffer")]);
    }
}
