//! The eBPF-fed disk and network collectors, and the eBPF status collector.
//!
//! Values continue the /proc since-boot counters: at attach the collector records /proc's
//! values (the baseline) and the map's values (the start), and reports
//! `baseline + (map now - start)`, so switching modes across a restart shows no jump.
//! Devices are listed from sysfs every round (cheap: one directory read) so hot-plugged and
//! renamed devices get their current names; the kernel keys (dev_t, ifindex) never change
//! under a rename.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use dcmon_common::collector_names;
use dcmon_common::ebpf::{DiskKey, DiskValue, NetKey, NetValue};
use procfs_core::DiskStat;

use super::Probes;
use super::link_events::LinkEvents;
use crate::batch::Sample;
use crate::collector::disk::{DiskCounters, RELIST_EVERY, is_vanished, parse_block_stat};
use crate::collector::net::{InterfaceCounters, parse_net_dev};
use crate::collector::{CollectError, Collector};
use crate::config::DeviceFilter;
use crate::filter::PatternList;
use crate::host::{Host, OpenFile, served_from_kernel_memory};

/// `ARPHRD_ETHER` (/sys/class/net/X/type).
const ARPHRD_ETHER: u32 = 1;
/// `ARPHRD_LOOPBACK`.
const ARPHRD_LOOPBACK: u32 = 772;
/// Ethernet header bytes (`ETH_HLEN`).
const ETH_HLEN: u64 = 14;

fn read_trimmed(host: &Host, rel: &str) -> Option<String> {
    host.read_to_string(rel).ok().map(|s| s.trim().to_owned())
}

/// Names in a sysfs directory (`/sys/block`, `/sys/class/net`).
fn list_dir(host: &Host, rel: &str) -> anyhow::Result<Vec<String>> {
    let path = host.path(rel);
    let dir = std::fs::read_dir(&path).with_context(|| format!("listing {}", path.display()))?;
    Ok(dir.filter_map(Result::ok).filter_map(|e| e.file_name().into_string().ok()).collect())
}

/// `"259:0"` (/sys/block/X/dev) into a key.
fn parse_dev(text: &str) -> Option<DiskKey> {
    let (major, minor) = text.trim().split_once(':')?;
    Some(DiskKey::new(major.parse().ok()?, minor.parse().ok()?))
}

/// Disk I/O from the `block_rq_complete` program.
///
/// That tracepoint sees request-based (blk-mq) disks: SCSI/SATA, NVMe namespaces without
/// native multipath, virtio, loop. Bio-based disks (device-mapper, md, zram, NVMe multipath
/// heads; no `/sys/block/X/mq`) account their I/O without a `struct request`, and disks with
/// `queue/iostats` off are not accounted at all, so for those this collector reads their
/// /sys/block/X/stat instead (the counters of their /proc/diskstats line, without the kernel
/// writing a line for every other device), and only when one passes the filter.
#[derive(Debug)]
pub struct EbpfDiskCollector {
    host: Host,
    filter: DeviceFilter,
    probes: Arc<Probes>,
    /// /proc/diskstats at attach.
    baseline: HashMap<DiskKey, DiskValue>,
    /// The map at attach.
    start: HashMap<DiskKey, DiskValue>,
    /// Whole disks from the last round: name -> key and whether it is request-based.
    known: HashMap<String, (DiskKey, bool)>,
    /// Each request-based disk's queue/iostats, kept open: it is re-read every round.
    iostats: HashMap<String, OpenFile>,
    /// The stat file of each disk read from the kernel's counters, kept open.
    stats: HashMap<String, OpenFile>,
    buf: String,
    /// When /sys/block was last listed; it is listed again every `relist_every`, or at once
    /// when a disk's file has vanished.
    listed_at: Option<Instant>,
    relist_every: Duration,
    /// Whether /sys/block is on sysfs (see [`served_from_kernel_memory`]).
    inline: bool,
}

impl EbpfDiskCollector {
    /// Takes the baseline now; call right after the programs are attached.
    pub fn new(host: Host, filter: DeviceFilter, probes: Arc<Probes>) -> anyhow::Result<Self> {
        let start = probes.disk_totals()?.into_iter().collect();
        let inline = served_from_kernel_memory(collector_names::DISK, [host.path("/sys/block").as_path()]);
        let path = host.path("/proc/diskstats");
        let text = host.read_to_string("/proc/diskstats")?;
        let mut baseline = HashMap::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let s = DiskStat::from_line(line).with_context(|| format!("parsing {}: {line:?}", path.display()))?;
            let (Ok(major), Ok(minor)) = (u32::try_from(s.major), u32::try_from(s.minor)) else {
                continue;
            };
            baseline.insert(
                DiskKey::new(major, minor),
                DiskValue {
                    reads: s.reads,
                    read_sectors: s.sectors_read,
                    writes: s.writes,
                    write_sectors: s.sectors_written,
                },
            );
        }
        Ok(Self {
            host,
            filter,
            probes,
            baseline,
            start,
            known: HashMap::new(),
            iostats: HashMap::new(),
            stats: HashMap::new(),
            buf: String::new(),
            listed_at: None,
            relist_every: RELIST_EVERY,
            inline,
        })
    }

    /// List /sys/block again every `every` (default [`RELIST_EVERY`]) to find new disks.
    pub fn relist_every(mut self, every: Duration) -> Self {
        self.relist_every = every;
        self
    }

    /// The counters of every whole disk the filter allows, in device-number order.
    pub fn read_all(&mut self) -> anyhow::Result<Vec<DiskCounters>> {
        if self.listed_at.is_none_or(|t| t.elapsed() >= self.relist_every) {
            self.relist()?;
        }
        let (counters, vanished) = self.read_known()?;
        if vanished {
            // A disk went away: list again now so a disk reusing its number starts clean.
            self.relist()?;
            return Ok(self.read_known()?.0);
        }
        Ok(counters)
    }

    fn relist(&mut self) -> anyhow::Result<()> {
        self.listed_at = Some(Instant::now());
        let names = list_dir(&self.host, "/sys/block")?;
        let mut current = HashMap::with_capacity(names.len());
        for name in names {
            let entry = match self.known.get(&name) {
                Some(e) => *e,
                None => {
                    match read_trimmed(&self.host, &format!("/sys/block/{name}/dev")).as_deref().and_then(parse_dev) {
                        Some(k) => (k, self.host.path(format!("/sys/block/{name}/mq")).exists()),
                        None => continue, // vanished between the listing and the read
                    }
                }
            };
            current.insert(name, entry);
        }
        // A disk gone since the last round: forget its counts so a new disk that reuses the
        // number starts from its own /proc zero, not from the old disk's total.
        for (name, (key, _)) in &self.known {
            if current.get(name).map(|e| e.0) != Some(*key) && !current.values().any(|e| e.0 == *key) {
                self.baseline.remove(key);
                self.start.remove(key);
                self.probes.forget_disk(key)?;
            }
        }
        self.known = current;
        self.iostats.retain(|name, _| self.known.contains_key(name));
        self.stats.retain(|name, _| self.known.contains_key(name));
        Ok(())
    }

    /// The counters of the disks listed last, and whether one of them has vanished since.
    fn read_known(&mut self) -> anyhow::Result<(Vec<DiskCounters>, bool)> {
        let mut vanished = false;
        let (filter, host, iostats, buf) = (&self.filter, &self.host, &mut self.iostats, &mut self.buf);
        // Disks the programs cannot mirror: bio-based ones, and request-based ones whose
        // statistics are switched off (queue/iostats = 0: /proc stands still while requests
        // still complete). Re-checked every round because iostats can be toggled at runtime.
        let from_proc_names: HashSet<String> = self
            .known
            .iter()
            .filter(|(name, _)| filter.allows(name))
            .filter(|(name, (_, request_based))| {
                let mut iostats_off = || {
                    let file = iostats
                        .entry((*name).clone())
                        .or_insert_with(|| OpenFile::new(host, format!("/sys/block/{name}/queue/iostats")));
                    match file.read_into(buf) {
                        Ok(()) => buf.trim() == "0",
                        Err(_) => {
                            vanished = true;
                            false
                        }
                    }
                };
                !request_based || iostats_off()
            })
            .map(|(name, _)| name.clone())
            .collect();
        let mut from_proc = Vec::with_capacity(from_proc_names.len());
        for name in &from_proc_names {
            let file = self
                .stats
                .entry(name.clone())
                .or_insert_with(|| OpenFile::new(host, format!("/sys/block/{name}/stat")));
            match file.read_into(buf) {
                Ok(()) => from_proc
                    .push(parse_block_stat(name, buf).with_context(|| format!("parsing {}", file.path().display()))?),
                // Removed since the listing: not reported, and forgotten at the next listing.
                Err(e) if is_vanished(&e) => vanished = true,
                Err(e) => return Err(e.into()),
            }
        }
        let mapped: Vec<DiskKey> = self
            .known
            .iter()
            .filter(|(name, _)| filter.allows(name) && !from_proc_names.contains(*name))
            .map(|(_, (key, _))| *key)
            .collect();
        let now: HashMap<DiskKey, DiskValue> = self.probes.disk_values(&mapped)?.into_iter().collect();
        let zero = DiskValue::default();
        let mut out: Vec<(DiskKey, DiskCounters)> = self
            .known
            .iter()
            .filter(|(name, _)| filter.allows(name) && !from_proc_names.contains(*name))
            .map(|(name, (key, _))| {
                let base = self.baseline.get(key).unwrap_or(&zero);
                let start = self.start.get(key).unwrap_or(&zero);
                let now = now.get(key).unwrap_or(&zero);
                let cont = |b: u64, n: u64, s: u64| b.wrapping_add(n.wrapping_sub(s));
                (
                    *key,
                    DiskCounters::from_sectors(
                        name.clone(),
                        cont(base.reads, now.reads, start.reads),
                        cont(base.read_sectors, now.read_sectors, start.read_sectors),
                        cont(base.writes, now.writes, start.writes),
                        cont(base.write_sectors, now.write_sectors, start.write_sectors),
                    ),
                )
            })
            .collect();
        for c in from_proc {
            if let Some((key, _)) = self.known.get(&c.device) {
                out.push((*key, c));
            }
        }
        // The order of /proc/diskstats: by device number.
        out.sort_by_key(|(k, _)| (k.major(), k.minor()));
        Ok((out.into_iter().map(|(_, c)| c).collect(), vanished))
    }
}

impl Collector for EbpfDiskCollector {
    fn name(&self) -> &'static str {
        collector_names::DISK
    }

    /// Not when its files are on procfs and sysfs: map lookups and reads of kernel memory.
    fn may_block(&self) -> bool {
        !self.inline
    }

    fn uses_bpf_programs(&self) -> bool {
        true
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        let disks = self.read_all()?;
        out.extend(disks.iter().flat_map(DiskCounters::samples));
        Ok(())
    }
}

/// `(rx bytes, tx bytes)` of `v` corrected so the stack's view matches what drivers count in /proc/net/dev.
/// `netif_receive_skb` sees Ethernet frames with the 14-byte header already pulled, which
/// Ethernet drivers (virtio, veth, physical NICs) count; loopback transmit carries a header
/// that lo's counters (taken after eth_type_trans) leave out.
pub fn header_adjust(arphrd: u32, v: &NetValue) -> (u64, u64) {
    match arphrd {
        ARPHRD_ETHER => (v.rx_bytes.wrapping_add(v.rx_packets.wrapping_mul(ETH_HLEN)), v.tx_bytes),
        ARPHRD_LOOPBACK => (v.rx_bytes, v.tx_bytes.wrapping_sub(v.tx_packets.wrapping_mul(ETH_HLEN))),
        _ => (v.rx_bytes, v.tx_bytes),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Iface {
    key: NetKey,
    arphrd: u32,
}

/// Network I/O from the `netif_receive_skb` and `net_dev_xmit` programs, for the interfaces
/// of the agent's own network namespace (the one its /proc/net/dev shows).
#[derive(Debug)]
pub struct EbpfNetCollector {
    host: Host,
    filter: DeviceFilter,
    probes: Arc<Probes>,
    netns: u32,
    /// /proc/net/dev at attach: (rx bytes, tx bytes).
    baseline: HashMap<NetKey, (u64, u64)>,
    /// The map at attach.
    start: HashMap<NetKey, NetValue>,
    /// Interfaces from the last round: name -> key and type.
    known: HashMap<String, Iface>,
    /// Link changes; without it (netlink refused) /sys/class/net is listed every round.
    link_events: Option<LinkEvents>,
    /// `known` may be out of date: the last re-list failed after the change was taken.
    stale: bool,
    /// Whether /sys/class/net is on sysfs (see [`served_from_kernel_memory`]).
    inline: bool,
}

/// Inode number of the network namespace that `/proc/self/ns/net` under `host` names.
pub fn own_netns(host: &Host) -> anyhow::Result<u32> {
    let path = host.path("/proc/self/ns/net");
    let ino = std::fs::metadata(&path).with_context(|| format!("stat {}", path.display()))?.ino();
    u32::try_from(ino).map_err(|_| anyhow!("{}: inode {ino} does not fit 32 bits", path.display()))
}

impl EbpfNetCollector {
    /// Takes the baseline now; call right after the programs are attached.
    pub fn new(host: Host, filter: DeviceFilter, probes: Arc<Probes>) -> anyhow::Result<Self> {
        let netns = own_netns(&host)?;
        let start = probes.net_totals()?.into_iter().collect();
        // Subscribed before the first listing, so no change after it is missed. The socket
        // hears the agent's own namespace: of use only when the host root shows that one.
        let link_events = if own_netns(&Host::default()).ok() == Some(netns) {
            LinkEvents::subscribe()
                .inspect_err(|e| tracing::debug!("no rtnetlink link events ({e}); listing /sys/class/net every round"))
                .ok()
        } else {
            None
        };
        let mut c = Self {
            host,
            filter,
            probes,
            netns,
            baseline: HashMap::new(),
            start,
            known: HashMap::new(),
            link_events,
            stale: false,
            inline: false,
        };
        c.inline = served_from_kernel_memory(collector_names::NET, [c.host.path("/sys/class/net").as_path()]);
        let text = c.host.read_to_string("/proc/net/dev")?;
        let match_all = DeviceFilter { include: PatternList::match_all(), exclude: PatternList::default() };
        let all = parse_net_dev(&text, &match_all)
            .with_context(|| format!("parsing {}", c.host.path("/proc/net/dev").display()))?;
        c.refresh_interfaces()?;
        for i in all {
            if let Some(iface) = c.known.get(&i.interface) {
                c.baseline.insert(iface.key, (i.receive_bytes, i.transmit_bytes));
            }
        }
        Ok(c)
    }

    fn refresh_interfaces(&mut self) -> anyhow::Result<()> {
        let names = list_dir(&self.host, "/sys/class/net")?;
        let mut current = HashMap::with_capacity(names.len());
        for name in names {
            if let Some(i) = self.known.get(&name) {
                current.insert(name, *i);
                continue;
            }
            let ifindex =
                read_trimmed(&self.host, &format!("/sys/class/net/{name}/ifindex")).and_then(|s| s.parse::<u32>().ok());
            let arphrd =
                read_trimmed(&self.host, &format!("/sys/class/net/{name}/type")).and_then(|s| s.parse::<u32>().ok());
            if let (Some(ifindex), Some(arphrd)) = (ifindex, arphrd) {
                let key = NetKey { ifindex, netns: self.netns };
                current.insert(name, Iface { key, arphrd });
            }
        }
        for (name, i) in &self.known {
            if current.get(name).map(|c| c.key) != Some(i.key) && !current.values().any(|c| c.key == i.key) {
                self.baseline.remove(&i.key);
                self.start.remove(&i.key);
                self.probes.forget_net(&i.key)?;
            }
        }
        self.known = current;
        Ok(())
    }

    /// Every interface of this namespace now, before filtering, sorted by name. /sys/class/net
    /// is listed again whenever rtnetlink reported a link change since the last round: an
    /// interface can be renamed at any time and its counters must follow the new name in the
    /// same round (the kernel queues the event before the rename returns).
    pub fn read_all(&mut self) -> anyhow::Result<Vec<InterfaceCounters>> {
        if self.stale || self.link_events.as_ref().is_none_or(LinkEvents::changed) {
            self.stale = true;
            self.refresh_interfaces()?;
            self.stale = false;
        }
        let keys: Vec<NetKey> = self.known.values().map(|i| i.key).collect();
        let now: HashMap<NetKey, NetValue> = self.probes.net_values(&keys)?.into_iter().collect();
        let zero = NetValue::default();
        let mut out: Vec<InterfaceCounters> = self
            .known
            .iter()
            .map(|(name, i)| {
                let (base_rx, base_tx) = self.baseline.get(&i.key).copied().unwrap_or((0, 0));
                let (now_rx, now_tx) = header_adjust(i.arphrd, now.get(&i.key).unwrap_or(&zero));
                let (s_rx, s_tx) = header_adjust(i.arphrd, self.start.get(&i.key).unwrap_or(&zero));
                InterfaceCounters {
                    interface: name.clone(),
                    receive_bytes: base_rx.wrapping_add(now_rx.wrapping_sub(s_rx)),
                    transmit_bytes: base_tx.wrapping_add(now_tx.wrapping_sub(s_tx)),
                }
            })
            .collect();
        out.sort_by(|a, b| a.interface.cmp(&b.interface));
        Ok(out)
    }
}

impl Collector for EbpfNetCollector {
    fn name(&self) -> &'static str {
        collector_names::NET
    }

    /// Not when its files are on procfs and sysfs: map lookups and reads of kernel memory.
    fn may_block(&self) -> bool {
        !self.inline
    }

    fn uses_bpf_programs(&self) -> bool {
        true
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        let ifaces = self.read_all()?;
        out.extend(ifaces.iter().filter(|i| self.filter.allows(&i.interface)).flat_map(InterfaceCounters::samples));
        Ok(())
    }
}

/// `dcmon_ebpf_active`, and the programs' run count and time when `kernel.bpf_stats_enabled`.
#[derive(Debug)]
pub struct EbpfStatusCollector {
    probes: Option<Arc<Probes>>,
    /// `kernel.bpf_stats_enabled`, kept open: it is read every round.
    stats_enabled: OpenFile,
    buf: String,
    /// Whether `stats_enabled` is on procfs (see [`served_from_kernel_memory`]).
    inline: bool,
}

impl EbpfStatusCollector {
    /// Reports eBPF as active when `probes` is some.
    pub fn new(host: Host, probes: Option<Arc<Probes>>) -> Self {
        let stats_enabled = OpenFile::new(&host, "/proc/sys/kernel/bpf_stats_enabled");
        // Without the programs it reads nothing.
        let inline = probes.is_none() || served_from_kernel_memory(collector_names::EBPF, [stats_enabled.path()]);
        Self { probes, stats_enabled, buf: String::new(), inline }
    }
}

impl Collector for EbpfStatusCollector {
    fn name(&self) -> &'static str {
        collector_names::EBPF
    }

    /// Not when its files are on procfs and sysfs: map lookups and reads of kernel memory.
    fn may_block(&self) -> bool {
        !self.inline
    }

    fn uses_bpf_programs(&self) -> bool {
        self.probes.is_some()
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        out.push(Sample::gauge("dcmon_ebpf_active", if self.probes.is_some() { 1.0 } else { 0.0 }));
        let Some(probes) = &self.probes else {
            return Ok(());
        };
        let stats = probes.program_stats()?;
        for s in &stats {
            if let Some(misses) = s.recursion_misses {
                out.push(Sample::count("dcmon_ebpf_program_missed_total", misses).label("program", s.program));
            }
        }
        // Run time is only accounted while the sysctl is on; without it the counters are
        // zeros that would read as "costs nothing", so leave them out.
        if self.stats_enabled.read_into(&mut self.buf).is_err() || self.buf.trim() != "1" {
            return Ok(());
        }
        for s in stats {
            out.push(Sample::count("dcmon_ebpf_program_runs_total", s.run_count).label("program", s.program));
            out.push(
                Sample::gauge("dcmon_ebpf_program_run_seconds_total", s.run_time_ns as f64 / 1e9)
                    .label("program", s.program),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_adjustments_per_device_type() {
        let v = NetValue { rx_packets: 2, rx_bytes: 100, tx_packets: 3, tx_bytes: 300 };
        assert_eq!(header_adjust(ARPHRD_ETHER, &v), (128, 300));
        assert_eq!(header_adjust(ARPHRD_LOOPBACK, &v), (100, 258));
        assert_eq!(header_adjust(65534, &v), (100, 300));
    }

    #[test]
    fn dev_numbers_parse() {
        assert_eq!(parse_dev("259:3\n"), Some(DiskKey::new(259, 3)));
        assert_eq!(parse_dev("x:3"), None);
        assert_eq!(parse_dev(""), None);
    }
}
