//! Per-interface network byte counters from /proc/net/dev; [`ebpf`] holds the eBPF-fed
//! network collector, which reports the same series.

pub mod drops;
pub mod ebpf;

use anyhow::Context as _;
use dcmon_common::collector_names;

use super::{CollectError, Collector};
use crate::batch::{LabelPair, Labels, Sample, Value};
use crate::config::DeviceFilter;
use crate::host::{Host, OpenFile, served_from_kernel_memory};

/// This collector's row in the table ([`super::SOURCES`]).
pub const SOURCE: super::Source = super::Source {
    name: dcmon_common::collector_names::NET,
    switch: super::Switch::Always,
    caps: &[],
    section: None,
    build: Some(|host, config| Box::new(NetCollector::new(host.clone(), config.interfaces.clone()))),
};

/// Counters of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceCounters {
    /// Interface name (`eth0`, `ens3`, `bond0`).
    pub interface: String,
    /// Bytes received.
    pub receive_bytes: u64,
    /// Bytes transmitted.
    pub transmit_bytes: u64,
}

impl InterfaceCounters {
    /// The label set of interface `name`'s samples: `interface="name"`.
    pub fn labels(name: &str) -> [LabelPair; 1] {
        [("interface", name.into())]
    }

    /// The two metrics of one interface, labelled `labels` (made from
    /// [`InterfaceCounters::labels`]): every path, procfs and eBPF, builds them here. With a
    /// shared set (the eBPF collector's, made once per re-list) they allocate nothing.
    pub fn samples_with(labels: Labels, receive_bytes: u64, transmit_bytes: u64) -> [Sample; 2] {
        [
            Sample { name: "network_receive_bytes_total", value: Value::Count(receive_bytes), labels: labels.clone() },
            Sample { name: "network_transmit_bytes_total", value: Value::Count(transmit_bytes), labels },
        ]
    }

    /// The two metrics of this interface.
    pub fn samples(&self) -> [Sample; 2] {
        let labels = Self::labels(&self.interface).into_iter().collect();
        Self::samples_with(labels, self.receive_bytes, self.transmit_bytes)
    }
}

/// ```text
/// Inter-|   Receive                                                |  Transmit
///  face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets ...
///   eth0: 1234567    8901    0    0    0     0          0         0   7654321    5432 ...
/// ```
/// (/proc/net/dev) into the interfaces `filter` allows, sorted by name.
///
/// Parsed by hand rather than with procfs-core's `InterfaceDeviceStatus`, which hashes every
/// interface into a map and parses all 16 counters: with many interfaces that parse costs more
/// than the kernel's text generation. This reads the two counters reported and allocates only
/// for the interfaces kept.
pub fn parse_net_dev(text: &str, filter: &DeviceFilter) -> anyhow::Result<Vec<InterfaceCounters>> {
    let mut ifaces = Vec::new();
    // Two header lines, then `name: rx_bytes rx_packets ... (8 receive, 8 transmit counters)`.
    for (n, line) in text.lines().enumerate().skip(2) {
        let Some((name, counters)) = line.split_once(':') else {
            anyhow::bail!("line {}: expected `<interface>: <counters>`, got {:?}", n + 1, truncate(line));
        };
        let name = name.trim();
        if !filter.allows(name) {
            continue;
        }
        let mut fields = counters.split_whitespace();
        let mut counter = |index: usize| -> anyhow::Result<u64> {
            let field = fields.nth(index).with_context(|| format!("line {}: {name} has too few counters", n + 1))?;
            field.parse().with_context(|| format!("line {}: {name}: expected a counter, got {field:?}", n + 1))
        };
        // Receive bytes is counter 0, transmit bytes counter 8 (7 after the first).
        let (receive_bytes, transmit_bytes) = (counter(0)?, counter(7)?);
        ifaces.push(InterfaceCounters { interface: name.to_owned(), receive_bytes, transmit_bytes });
    }
    ifaces.sort_unstable_by(|a, b| a.interface.cmp(&b.interface));
    Ok(ifaces)
}

fn truncate(line: &str) -> String {
    line.chars().take(60).collect()
}

/// Per-interface received and transmitted bytes.
#[derive(Debug)]
pub struct NetCollector {
    net_dev: OpenFile,
    filter: DeviceFilter,
    buf: String,
    /// Whether /proc/net/dev is on procfs (see [`served_from_kernel_memory`]).
    inline: bool,
}

impl NetCollector {
    /// A collector reading `host`'s /proc/net/dev, reporting interfaces `filter` allows.
    pub fn new(host: Host, filter: DeviceFilter) -> Self {
        let net_dev = OpenFile::new(&host, "/proc/net/dev");
        let inline = served_from_kernel_memory(collector_names::NET, [net_dev.path()]);
        Self { net_dev, filter, buf: String::new(), inline }
    }
}

impl Collector for NetCollector {
    fn name(&self) -> &'static str {
        collector_names::NET
    }

    /// Not when /proc/net/dev is on procfs: the kernel serves it from memory.
    fn may_block(&self) -> bool {
        !self.inline
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        self.net_dev.read_into(&mut self.buf)?;
        let ifaces = parse_net_dev(&self.buf, &self.filter)
            .with_context(|| format!("parsing {}", self.net_dev.path().display()))?;
        out.extend(ifaces.iter().flat_map(InterfaceCounters::samples));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET_DEV: &str = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:  123456     789    0    0    0     0          0         0   123456     789    0    0    0     0       0          0
  eth0: 98765432   65432    0    0    0     0          0         0 12345678   23456    0    0    0     0       0          0
docker0:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
vethab12: 100 1 0 0 0 0 0 0 200 2 0 0 0 0 0 0
  bond0: 18446744073709551615 1 0 0 0 0 0 0 5 1 0 0 0 0 0 0
";

    /// Real /proc/net/dev is read inline; a fixture tree's (not kernel memory, like a FUSE
    /// mount) on a thread under the collector timeout.
    #[test]
    fn reads_inline_only_from_procfs() {
        let filter = DeviceFilter::default_interfaces;
        assert!(!NetCollector::new(Host::default(), filter()).may_block(), "/proc is procfs");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("proc/net")).expect("mkdir");
        std::fs::write(dir.path().join("proc/net/dev"), NET_DEV).expect("write");
        assert!(NetCollector::new(Host::new(dir.path()), filter()).may_block(), "a fixture tree is not procfs");
    }

    #[test]
    fn default_filter_drops_loopback_and_virtual() {
        let i = parse_net_dev(NET_DEV, &DeviceFilter::default_interfaces()).expect("parse");
        assert_eq!(
            i,
            [
                InterfaceCounters { interface: "bond0".into(), receive_bytes: u64::MAX, transmit_bytes: 5 },
                InterfaceCounters { interface: "eth0".into(), receive_bytes: 98_765_432, transmit_bytes: 12_345_678 },
            ]
        );
    }

    /// The procfs path's samples (owned labels) and the eBPF fast path's (one shared set) come
    /// from one constructor: the same names, values and labels; the shared set stays shared.
    #[test]
    fn samples_are_the_same_with_owned_and_shared_labels() {
        let eth0 = InterfaceCounters { interface: "eth0".into(), receive_bytes: 7, transmit_bytes: u64::MAX };
        let owned = eth0.samples();
        let expected = [("network_receive_bytes_total", 7), ("network_transmit_bytes_total", u64::MAX)];
        for (s, (name, value)) in owned.iter().zip(expected) {
            assert_eq!((s.name, s.value), (name, Value::Count(value)));
            assert_eq!(s.labels, [("interface", "eth0".into())], "{s:?}");
        }
        let shared = Labels::shared(InterfaceCounters::labels("eth0"));
        let fast = InterfaceCounters::samples_with(shared.clone(), 7, u64::MAX);
        assert_eq!(fast, owned);
        let Labels::Shared(set) = &shared else { panic!("{shared:?}") };
        for s in &fast {
            assert!(matches!(&s.labels, Labels::Shared(l) if std::sync::Arc::ptr_eq(l, set)), "{s:?}: a copy");
        }
    }

    #[test]
    fn malformed_is_an_error_naming_the_line() {
        let all = DeviceFilter::default_interfaces();
        let e = parse_net_dev("h1\nh2\n eth0: x y\n", &all).expect_err("not numbers");
        assert_eq!(e.to_string(), "line 3: eth0: expected a counter, got \"x\"");
        let e = parse_net_dev("h1\nh2\n eth0: 1 2 3\n", &all).expect_err("short");
        assert_eq!(e.to_string(), "line 3: eth0 has too few counters");
        let e = parse_net_dev("h1\nh2\n eth0: 1 2 3 4 5 6 7 8 9\nno colon here\n", &all).expect_err("no colon");
        assert_eq!(e.to_string(), "line 4: expected `<interface>: <counters>`, got \"no colon here\"");
    }

    #[test]
    fn matches_procfs_core_on_this_host() {
        use procfs_core::FromRead as _;
        let text = std::fs::read_to_string("/proc/net/dev").expect("/proc/net/dev");
        let reference = procfs_core::net::InterfaceDeviceStatus::from_read(text.as_bytes()).expect("procfs-core");
        let everything = DeviceFilter {
            include: crate::filter::PatternList::match_all(),
            exclude: crate::filter::PatternList::new(Vec::<String>::new()),
        };
        let mine = parse_net_dev(&text, &everything).expect("parse");
        assert_eq!(mine.len(), reference.0.len());
        for i in &mine {
            let r = &reference.0[&i.interface];
            assert_eq!((i.receive_bytes, i.transmit_bytes), (r.recv_bytes, r.sent_bytes), "{}", i.interface);
        }
    }

    #[test]
    fn errors_name_the_file_line_and_quote_it() {
        let e = parse_net_dev("h1\nh2\nno colon here\n", &DeviceFilter::default_interfaces()).expect_err("no colon");
        assert_eq!(e.to_string(), "line 3: expected `<interface>: <counters>`, got \"no colon here\"");
        // A long line is cut to its first 60 characters.
        let long = "x".repeat(100);
        let e = parse_net_dev(&format!("h1\nh2\n{long}\n"), &DeviceFilter::default_interfaces()).expect_err("long");
        assert_eq!(e.to_string(), format!("line 3: expected `<interface>: <counters>`, got \"{}\"", &long[..60]));
        // Through the collector, the file is named.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("proc/net")).expect("mkdir");
        std::fs::write(dir.path().join("proc/net/dev"), "h1\nh2\n  eth0: 1 2 3 4 5 6 7 8 lots 10\n").expect("write");
        let mut c = NetCollector::new(Host::new(dir.path()), DeviceFilter::default_interfaces());
        let e = format!("{:#}", c.collect(&mut Vec::new()).expect_err("bad counter"));
        let path = dir.path().join("proc/net/dev");
        assert_eq!(
            e,
            format!(
                "parsing {}: line 3: eth0: expected a counter, got \"lots\": invalid digit found in string",
                path.display()
            )
        );
    }
}
