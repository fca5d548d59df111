//! Per-interface network byte counters from /proc/net/dev.

use anyhow::Context as _;
use dcmon_common::collector_names;
use procfs_core::FromRead as _;
use procfs_core::net::InterfaceDeviceStatus;

use super::{CollectError, Collector};
use crate::batch::Sample;
use crate::config::DeviceFilter;
use crate::host::{Host, OpenFile};

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
    /// The two metrics of this interface.
    pub fn samples(&self) -> [Sample; 2] {
        let i = self.interface.as_str();
        [
            Sample::count("network_receive_bytes_total", self.receive_bytes).label("interface", i),
            Sample::count("network_transmit_bytes_total", self.transmit_bytes).label("interface", i),
        ]
    }
}

/// ```text
/// Inter-|   Receive                                                |  Transmit
///  face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets ...
///   eth0: 1234567    8901    0    0    0     0          0         0   7654321    5432 ...
/// ```
/// (/proc/net/dev) into the interfaces `filter` allows, sorted by name.
pub fn parse_net_dev(text: &str, filter: &DeviceFilter) -> Result<Vec<InterfaceCounters>, procfs_core::ProcError> {
    let status = InterfaceDeviceStatus::from_read(text.as_bytes())?;
    let mut ifaces: Vec<InterfaceCounters> = status
        .0
        .into_values()
        .filter(|d| filter.allows(&d.name))
        .map(|d| InterfaceCounters { interface: d.name, receive_bytes: d.recv_bytes, transmit_bytes: d.sent_bytes })
        .collect();
    ifaces.sort_by(|a, b| a.interface.cmp(&b.interface));
    Ok(ifaces)
}

/// Per-interface received and transmitted bytes.
#[derive(Debug)]
pub struct NetCollector {
    net_dev: OpenFile,
    filter: DeviceFilter,
    buf: String,
}

impl NetCollector {
    /// A collector reading `host`'s /proc/net/dev, reporting interfaces `filter` allows.
    pub fn new(host: Host, filter: DeviceFilter) -> Self {
        Self { net_dev: OpenFile::new(&host, "/proc/net/dev"), filter, buf: String::new() }
    }
}

impl Collector for NetCollector {
    fn name(&self) -> &'static str {
        collector_names::NET
    }

    /// procfs and sysfs are served from kernel memory: nothing here waits on a device.
    fn may_block(&self) -> bool {
        false
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

    #[test]
    fn malformed_is_an_error() {
        assert!(parse_net_dev("h1\nh2\n eth0: x y\n", &DeviceFilter::default_interfaces()).is_err());
    }
}
