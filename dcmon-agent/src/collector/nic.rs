//! NIC health per reported interface (the `interfaces` filter) from /sys/class/net/IF/:
//! receive and transmit errors, drops, FIFO errors, missed packets, carrier changes, link
//! speed, operational state and MTU.
//!
//! Runs on its own thread under the collector timeout: reading `speed` takes the RTNL lock
//! and asks the driver, which on some NICs (mlx5) is a firmware command.

use super::attr::{Relist, excerpt, is_gone, is_no_value, parse_i64, parse_u64, round_result, sorted_names};
use super::{CollectError, Collector};
use crate::batch::Sample;
use crate::config::DeviceFilter;
use crate::host::{Host, OpenFile};

/// This collector's row in the table ([`super::SOURCES`]).
pub const SOURCE: super::Source = super::Source {
    name: "nic",
    switch: super::Switch::Exporter { default: true },
    caps: &[],
    section: None,
    build: Some(|host, config| Box::new(NicCollector::new(host.clone(), config.interfaces.clone()))),
};

/// How /sys/class/net is listed again: interfaces come and go with containers and VFs.
pub const RELIST_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// What one attribute file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A counter, reported as is.
    Counter,
    /// Link speed in Mbit/s; -1 (or no answer) when unknown, reported in bytes per second.
    Speed,
    /// `up`, `down`, `dormant`, ... (RFC 2863).
    OperState,
    /// A gauge, reported as is.
    Gauge,
}

/// Each file read per interface and the metric it becomes.
const ATTRS: [(&str, &str, Kind); 11] = [
    ("statistics/rx_errors", "network_receive_errors_total", Kind::Counter),
    ("statistics/tx_errors", "network_transmit_errors_total", Kind::Counter),
    ("statistics/rx_dropped", "network_receive_drops_total", Kind::Counter),
    ("statistics/tx_dropped", "network_transmit_drops_total", Kind::Counter),
    ("statistics/rx_fifo_errors", "network_receive_fifo_errors_total", Kind::Counter),
    ("statistics/tx_fifo_errors", "network_transmit_fifo_errors_total", Kind::Counter),
    ("statistics/rx_missed_errors", "network_receive_missed_errors_total", Kind::Counter),
    ("carrier_changes", "network_carrier_changes_total", Kind::Counter),
    ("speed", "network_speed_bytes_per_second", Kind::Speed),
    ("operstate", "network_oper_state", Kind::OperState),
    ("mtu", "network_mtu_bytes", Kind::Gauge),
];

/// The operational states in the kernel's order (`IF_OPER_*`, RFC 2863): the value of
/// `network_oper_state`.
pub const OPER_STATES: [&str; 7] = ["unknown", "notpresent", "down", "lowerlayerdown", "testing", "dormant", "up"];

/// The samples one attribute file of `interface` gives (none: no value, such as the speed
/// of a link that is down).
pub fn parse_attr(interface: &str, attr: &str, text: &str) -> anyhow::Result<Vec<Sample>> {
    let Some(&(_, metric, kind)) = ATTRS.iter().find(|(a, _, _)| *a == attr) else {
        anyhow::bail!("no such interface attribute {attr:?}");
    };
    let labelled = |s: Sample| s.label("interface", interface);
    Ok(match kind {
        Kind::Counter => vec![labelled(Sample::count(metric, parse_u64(text)?))],
        Kind::Gauge => vec![labelled(Sample::count(metric, parse_u64(text)?))],
        Kind::Speed => match u64::try_from(parse_i64(text)?) {
            Ok(mbits) if mbits > 0 => vec![labelled(Sample::count(metric, mbits.saturating_mul(125_000)))],
            _ => Vec::new(),
        },
        Kind::OperState => {
            let state = text.trim();
            let Some(code) = OPER_STATES.iter().position(|s| *s == state) else {
                anyhow::bail!("expected one of {}, got {:?}", OPER_STATES.join(", "), excerpt(state));
            };
            vec![
                labelled(Sample::count(metric, code as u64)),
                labelled(Sample::count("network_up", u64::from(state == "up"))),
            ]
        }
    })
}

/// One reported interface and its files, kept open.
#[derive(Debug)]
struct Interface {
    name: String,
    files: Vec<(&'static str, OpenFile)>,
}

/// NIC health of the reported interfaces.
#[derive(Debug)]
pub struct NicCollector {
    host: Host,
    filter: DeviceFilter,
    interfaces: Vec<Interface>,
    relist: Relist,
    buf: String,
}

impl NicCollector {
    /// A collector reading `host`'s /sys/class/net, reporting interfaces `filter` allows.
    pub fn new(host: Host, filter: DeviceFilter) -> Self {
        Self { host, filter, interfaces: Vec::new(), relist: Relist::new(RELIST_EVERY), buf: String::new() }
    }

    fn list(&mut self) -> Result<(), CollectError> {
        let first = self.relist.is_first();
        self.relist.done();
        let names = sorted_names(&self.host, "/sys/class/net")?;
        let mut old: Vec<Interface> = std::mem::take(&mut self.interfaces);
        for name in names.into_iter().filter(|n| self.filter.allows(n)) {
            // `bonding_masters` is a file beside the interfaces.
            if !self.host.path(format!("/sys/class/net/{name}/operstate")).exists() {
                continue;
            }
            let iface = match old.iter().position(|i| i.name == name) {
                Some(i) => old.swap_remove(i),
                // Only the attributes this kernel has (`carrier_changes` since Linux 3.15): a
                // file missing later means the interface is gone.
                None => Interface {
                    files: ATTRS
                        .iter()
                        .map(|(attr, _, _)| (*attr, format!("/sys/class/net/{name}/{attr}")))
                        .filter(|(_, rel)| self.host.path(rel).exists())
                        .map(|(attr, rel)| (attr, OpenFile::new(&self.host, rel)))
                        .collect(),
                    name,
                },
            };
            self.interfaces.push(iface);
        }
        if first && self.interfaces.is_empty() {
            return Err(CollectError::NotPresent("no reported interface in /sys/class/net".to_owned()));
        }
        Ok(())
    }
}

impl Collector for NicCollector {
    fn name(&self) -> &'static str {
        SOURCE.name
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        if self.relist.is_due() {
            self.list()?;
        }
        let mut errors = Vec::new();
        let mut gone = false;
        for iface in &mut self.interfaces {
            let mark = out.len();
            for (attr, file) in &mut iface.files {
                match file.read_into(&mut self.buf) {
                    Ok(()) => match parse_attr(&iface.name, attr, &self.buf) {
                        Ok(samples) => out.extend(samples),
                        Err(e) => errors.push(e.context(format!("parsing {}", file.path().display()))),
                    },
                    Err(e) if is_gone(&e) => {
                        // The interface went away: none of its samples, and list again.
                        out.truncate(mark);
                        gone = true;
                        break;
                    }
                    // A link that is down has no speed; a virtual one often none at all.
                    Err(e) if *attr == "speed" && is_no_value(&e) => {}
                    Err(e) => errors.push(anyhow::Error::from(e).context(format!("interface {}", iface.name))),
                }
            }
        }
        // A failed read may be an interface replaced under its name: list again next round.
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

    /// A /sys/class/net/NAME with every attribute: the counters numbered from `base`.
    fn write_iface(root: &std::path::Path, name: &str, base: u64, speed: &str, operstate: &str) {
        let dir = root.join("sys/class/net").join(name);
        std::fs::create_dir_all(dir.join("statistics")).expect("mkdir");
        for (i, (attr, _, kind)) in ATTRS.iter().enumerate() {
            let text = match kind {
                Kind::Counter => format!("{}\n", base + i as u64),
                Kind::Speed => format!("{speed}\n"),
                Kind::OperState => format!("{operstate}\n"),
                Kind::Gauge => "9000\n".to_owned(),
            };
            std::fs::write(dir.join(attr), text).expect("write");
        }
    }

    fn values(out: &[Sample], iface: &str) -> Vec<(&'static str, Value)> {
        out.iter().filter(|s| s.labels == [("interface", iface.into())]).map(|s| (s.name, s.value)).collect()
    }

    #[test]
    fn every_attribute_of_each_reported_interface() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_iface(dir.path(), "eth0", 100, "25000", "up");
        write_iface(dir.path(), "eth1", 200, "-1", "lowerlayerdown");
        write_iface(dir.path(), "veth1", 300, "10000", "up");
        std::fs::write(dir.path().join("sys/class/net/bonding_masters"), "bond0\n").expect("write");
        let mut c = NicCollector::new(Host::new(dir.path()), DeviceFilter::default_interfaces());
        let mut out = Vec::new();
        c.collect(&mut out).expect("collect");
        assert_eq!(
            values(&out, "eth0"),
            [
                ("network_receive_errors_total", Value::Count(100)),
                ("network_transmit_errors_total", Value::Count(101)),
                ("network_receive_drops_total", Value::Count(102)),
                ("network_transmit_drops_total", Value::Count(103)),
                ("network_receive_fifo_errors_total", Value::Count(104)),
                ("network_transmit_fifo_errors_total", Value::Count(105)),
                ("network_receive_missed_errors_total", Value::Count(106)),
                ("network_carrier_changes_total", Value::Count(107)),
                ("network_speed_bytes_per_second", Value::Count(25_000 * 125_000)),
                ("network_oper_state", Value::Count(6)),
                ("network_up", Value::Count(1)),
                ("network_mtu_bytes", Value::Count(9000)),
            ]
        );
        let eth1 = values(&out, "eth1");
        assert!(!eth1.iter().any(|(n, _)| *n == "network_speed_bytes_per_second"), "speed -1 is no speed");
        assert!(
            eth1.contains(&("network_oper_state", Value::Count(3))) && eth1.contains(&("network_up", Value::Count(0)))
        );
        assert!(values(&out, "veth1").is_empty(), "veth* is not reported by default");
        assert_eq!(out.len(), 12 + 11);

        // A bad file fails the round naming it; the rest is still reported.
        std::fs::write(dir.path().join("sys/class/net/eth0/operstate"), "sideways\n").expect("write");
        std::fs::write(dir.path().join("sys/class/net/eth1/statistics/rx_errors"), "lots\n").expect("write");
        let mut out = Vec::new();
        let e = format!("{:#}", c.collect(&mut out).expect_err("bad files"));
        let path = |rel: &str| dir.path().join("sys/class/net").join(rel).display().to_string();
        assert!(e.contains(&format!("parsing {}: expected one of unknown, notpresent", path("eth0/operstate"))), "{e}");
        assert!(
            e.contains(&format!(
                "parsing {}: expected an unsigned integer, got \"lots\"",
                path("eth1/statistics/rx_errors")
            )),
            "{e}"
        );
        assert_eq!(out.len(), 10 + 10);

        // An interface that goes away is dropped, with no error (sysfs answers ENODEV on its
        // open files; the failed round above has the list read again).
        std::fs::remove_dir_all(dir.path().join("sys/class/net/eth1")).expect("rm");
        std::fs::write(dir.path().join("sys/class/net/eth0/operstate"), "up\n").expect("write");
        let mut out = Vec::new();
        c.collect(&mut out).expect("eth1 gone");
        assert_eq!(out.len(), 12);

        // An attribute this kernel lacks is left out, not taken for an interface gone.
        std::fs::remove_file(dir.path().join("sys/class/net/eth0/carrier_changes")).expect("rm");
        let mut fresh = NicCollector::new(Host::new(dir.path()), DeviceFilter::default_interfaces());
        let mut out = Vec::new();
        fresh.collect(&mut out).expect("collect");
        assert_eq!(values(&out, "eth0").len(), 11, "{out:?}");
    }

    #[test]
    fn no_sysfs_or_no_interface_is_not_present() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = NicCollector::new(Host::new(dir.path()), DeviceFilter::default_interfaces());
        assert!(matches!(c.collect(&mut Vec::new()), Err(CollectError::NotPresent(_))));
        write_iface(dir.path(), "lo", 1, "-1", "unknown");
        let mut c = NicCollector::new(Host::new(dir.path()), DeviceFilter::default_interfaces());
        assert!(matches!(c.collect(&mut Vec::new()), Err(CollectError::NotPresent(_))));
    }

    #[test]
    fn this_hosts_interfaces_match_their_files() {
        let filter = DeviceFilter::default_interfaces();
        let mut c = NicCollector::new(Host::default(), filter.clone());
        let mut out = Vec::new();
        c.collect(&mut out).expect("collect");
        let names: Vec<String> = sorted_names(&Host::default(), "/sys/class/net")
            .expect("list")
            .into_iter()
            .filter(|n| filter.allows(n) && std::path::Path::new(&format!("/sys/class/net/{n}/operstate")).exists())
            .collect();
        assert!(!names.is_empty(), "this host reports no interface");
        for name in &names {
            let read = |attr: &str| std::fs::read_to_string(format!("/sys/class/net/{name}/{attr}"));
            let got = values(&out, name);
            let mtu: u64 = read("mtu").expect("mtu").trim().parse().expect("mtu");
            assert!(got.contains(&("network_mtu_bytes", Value::Count(mtu))), "{name}: {got:?}");
            let state = read("operstate").expect("operstate");
            let code = OPER_STATES.iter().position(|s| *s == state.trim()).expect("known state") as u64;
            assert!(got.contains(&("network_oper_state", Value::Count(code))), "{name}: {got:?}");
            match read("speed").ok().and_then(|s| s.trim().parse::<i64>().ok()).filter(|s| *s > 0) {
                Some(mbits) => {
                    assert!(got.contains(&("network_speed_bytes_per_second", Value::Count(mbits as u64 * 125_000))))
                }
                None => assert!(!got.iter().any(|(n, _)| *n == "network_speed_bytes_per_second"), "{name}: {got:?}"),
            }
            // Error counters only grow: the collector's reading is at most the file's now.
            let errors: u64 = read("statistics/rx_errors").expect("rx_errors").trim().parse().expect("n");
            let reported = got.iter().find(|(n, _)| *n == "network_receive_errors_total").expect("rx errors").1;
            assert!(reported.as_f64() <= errors as f64, "{name}");
            assert_eq!(
                got.len(),
                11 + usize::from(got.iter().any(|(n, _)| *n == "network_speed_bytes_per_second")),
                "{name}: {got:?}"
            );
        }
    }
}
