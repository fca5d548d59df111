//! Network I/O from the `netif_receive_skb` and `net_dev_xmit` BPF programs, reported like
//! [`super::NetCollector`] reports /proc/net/dev.
//!
//! Values continue the /proc since-boot counters: when an interface gets its slot the collector
//! records /proc's values (the baseline) and the slot's values (the start), and reports
//! `baseline + (slot now - start)`, so switching modes across a restart shows no jump. An
//! interface without a slot (all taken) is read from /proc/net/dev.
//! Interfaces are listed from /sys/class/net at start and again on each rtnetlink link event
//! (every round where netlink is refused), so renamed interfaces get their current names; the
//! kernel key (ifindex) never changes under a rename.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt as _;
use std::sync::Arc;

use anyhow::{Context as _, anyhow};
use dcmon_common::collector_names;
use dcmon_common::ebpf::{NetKey, NetValue, OVERFLOW_SLOT};

use super::drops::NetDrops;
use super::{InterfaceCounters, parse_net_dev};
use crate::batch::{Labels, Sample};
use crate::collector::{CollectError, Collector};
use crate::config::DeviceFilter;
use crate::ebpf::Probes;
use crate::ebpf::link_events::LinkEvents;
use crate::filter::PatternList;
use crate::host::{Host, served_from_kernel_memory};

/// `ARPHRD_ETHER` (/sys/class/net/X/type).
const ARPHRD_ETHER: u32 = 1;
/// `ARPHRD_LOOPBACK`.
const ARPHRD_LOOPBACK: u32 = 772;
/// Ethernet header bytes (`ETH_HLEN`).
const ETH_HLEN: u64 = 14;

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

/// An interface with a slot, as a round reports it.
#[derive(Debug)]
struct Counted {
    name: String,
    arphrd: u32,
    slot: u32,
    /// /proc/net/dev's (rx bytes, tx bytes) when it got its slot.
    baseline: (u64, u64),
    /// The slot's counters then.
    start: NetValue,
    /// `interface="name"`, made once per re-list and shared by every round's two samples.
    labels: Labels,
}

impl Counted {
    /// (rx bytes, tx bytes) to report, from the slots' counters `now`.
    fn bytes(&self, now: &[NetValue]) -> (u64, u64) {
        let (base_rx, base_tx) = self.baseline;
        let (now_rx, now_tx) = header_adjust(self.arphrd, now.get(self.slot as usize).unwrap_or(&NetValue::default()));
        let (s_rx, s_tx) = header_adjust(self.arphrd, &self.start);
        (base_rx.wrapping_add(now_rx.wrapping_sub(s_rx)), base_tx.wrapping_add(now_tx.wrapping_sub(s_tx)))
    }
}

/// Network I/O from the `netif_receive_skb` and `net_dev_xmit` programs, for the interfaces
/// of the agent's own network namespace (the one its /proc/net/dev shows).
#[derive(Debug)]
pub struct EbpfNetCollector {
    host: Host,
    filter: DeviceFilter,
    probes: Arc<Probes>,
    netns: u32,
    /// /proc/net/dev when the interface got its slot: (rx bytes, tx bytes).
    baseline: HashMap<NetKey, (u64, u64)>,
    /// The interface's slot and its counters when the interface got it.
    start: HashMap<NetKey, (u32, NetValue)>,
    /// The overflow slot's packets at start.
    overflow_start: u64,
    /// The overflow slot's packets since start, as of the last read.
    overflow: u64,
    /// Interfaces from the last round: name -> key and type.
    known: HashMap<String, Iface>,
    /// Link changes; without it (netlink refused) /sys/class/net is listed every round.
    link_events: Option<LinkEvents>,
    /// `known` may be out of date: the last re-list failed after the change was taken.
    stale: bool,
    /// Whether /sys/class/net is on sysfs (see [`served_from_kernel_memory`]).
    inline: bool,
    /// Packet drops by reason of the interfaces reported.
    drops: NetDrops,
    /// The interfaces with a slot that the filter allows, in name order, as of the last
    /// re-list ([`EbpfNetCollector::make_plan`]).
    plan: Vec<Counted>,
    /// The interfaces the filter allows that have no slot.
    unslotted: HashSet<String>,
    /// The interfaces were re-listed since `drops` last followed them.
    drops_stale: bool,
    /// The slots' counters as of the last round, kept so a round allocates nothing.
    counters: Vec<NetValue>,
}

/// Inode number of the network namespace that `/proc/self/ns/net` under `host` names.
pub fn own_netns(host: &Host) -> anyhow::Result<u32> {
    let path = host.path("/proc/self/ns/net");
    let ino = std::fs::metadata(&path).with_context(|| format!("stat {}", path.display()))?.ino();
    u32::try_from(ino).map_err(|_| anyhow!("{}: inode {ino} does not fit 32 bits", path.display()))
}

impl EbpfNetCollector {
    /// Lists the interfaces and gives each its slot now; call right after the programs are
    /// attached.
    pub fn new(host: Host, filter: DeviceFilter, probes: Arc<Probes>) -> anyhow::Result<Self> {
        let netns = own_netns(&host)?;
        let overflow_start = overflow_packets(&probes.net_counters()?);
        // Subscribed before the first listing, so no change after it is missed. The socket
        // hears the agent's own namespace: of use only when the host root shows that one.
        let link_events = if own_netns(&Host::default()).ok() == Some(netns) {
            LinkEvents::subscribe()
                .inspect_err(|e| tracing::debug!("no rtnetlink link events ({e}); listing /sys/class/net every round"))
                .ok()
        } else {
            None
        };
        let drops = NetDrops::new(Arc::clone(&probes))?;
        let mut c = Self {
            host,
            filter,
            probes,
            netns,
            baseline: HashMap::new(),
            start: HashMap::new(),
            overflow_start,
            overflow: 0,
            known: HashMap::new(),
            link_events,
            stale: true,
            inline: false,
            drops,
            drops_stale: true,
            plan: Vec::new(),
            unslotted: HashSet::new(),
            counters: Vec::new(),
        };
        c.inline = served_from_kernel_memory(collector_names::NET, [c.host.path("/sys/class/net").as_path()]);
        c.read_all()?;
        Ok(c)
    }

    /// /proc/net/dev's byte counters of `fresh` (name, key, slot) and the slots' counters, read
    /// so that no packet of those slots falls between the two (tried a few times; an interface
    /// busy throughout may be off by the packets of a few microseconds).
    fn take_baselines(&mut self, fresh: &[(String, NetKey, u32)]) -> anyhow::Result<Vec<NetValue>> {
        let match_all = DeviceFilter { include: PatternList::match_all(), exclude: PatternList::default() };
        let mut before = self.probes.net_counters()?;
        for _ in 0..5 {
            let text = self.host.read_to_string("/proc/net/dev")?;
            let all = parse_net_dev(&text, &match_all)
                .with_context(|| format!("parsing {}", self.host.path("/proc/net/dev").display()))?;
            let after = self.probes.net_counters()?;
            let settled = fresh.iter().all(|&(_, _, slot)| before.get(slot as usize) == after.get(slot as usize));
            // By name, not a search per interface: at start every interface is fresh.
            let by_name: HashMap<&str, &InterfaceCounters> = all.iter().map(|i| (i.interface.as_str(), i)).collect();
            for (name, key, slot) in fresh {
                if let Some(i) = by_name.get(name.as_str()) {
                    self.baseline.insert(*key, (i.receive_bytes, i.transmit_bytes));
                }
                self.start.insert(*key, (*slot, after.get(*slot as usize).copied().unwrap_or_default()));
            }
            if settled {
                return Ok(after);
            }
            before = after;
        }
        Ok(before)
    }

    fn refresh_interfaces(&mut self) -> anyhow::Result<()> {
        let names = self.host.dir_names("/sys/class/net")?;
        let mut current = HashMap::with_capacity(names.len());
        for name in names {
            if let Some(i) = self.known.get(&name) {
                current.insert(name, *i);
                continue;
            }
            let number = |file: &str| {
                self.host.read_to_string(format!("/sys/class/net/{name}/{file}")).ok()?.trim().parse().ok()
            };
            let (ifindex, arphrd) = (number("ifindex"), number("type"));
            if let (Some(ifindex), Some(arphrd)) = (ifindex, arphrd) {
                let key = NetKey { ifindex, netns: self.netns };
                current.insert(name, Iface { key, arphrd });
            }
        }
        let current_keys: HashSet<NetKey> = current.values().map(|c| c.key).collect();
        for (name, i) in &self.known {
            if current.get(name).map(|c| c.key) != Some(i.key) && !current_keys.contains(&i.key) {
                self.baseline.remove(&i.key);
                self.start.remove(&i.key);
                self.probes.release_net_slot(i.key)?;
            }
        }
        self.known = current;
        Ok(())
    }

    /// Every interface of this namespace that the filter allows, now, sorted by name.
    /// /sys/class/net is listed again whenever rtnetlink reported a link change since the last
    /// round: an interface can be renamed at any time and its counters must follow the new name
    /// in the same round (the kernel queues the event before the rename returns). Between
    /// re-lists a round reads the counters and walks the plan the last re-list made, without a
    /// lookup per interface.
    pub fn read_all(&mut self) -> anyhow::Result<Vec<InterfaceCounters>> {
        self.read_counters()?;
        self.with_unslotted()
    }

    /// Re-lists the interfaces if they changed, and reads the slots' counters into `counters`.
    fn read_counters(&mut self) -> anyhow::Result<()> {
        if self.stale || self.link_events.as_ref().is_none_or(LinkEvents::changed) {
            self.stale = true;
            self.drops_stale = true;
            self.refresh_interfaces()?;
            self.counters = self.make_plan()?;
            self.stale = false;
        } else {
            self.probes.net_counters_into(&mut self.counters)?;
        }
        self.overflow = overflow_packets(&self.counters).wrapping_sub(self.overflow_start);
        Ok(())
    }

    /// The planned interfaces' counters as of [`EbpfNetCollector::read_counters`], and those
    /// of the interfaces without a slot from /proc/net/dev, in name order.
    fn with_unslotted(&self) -> anyhow::Result<Vec<InterfaceCounters>> {
        let mut out = Vec::with_capacity(self.plan.len() + self.unslotted.len());
        for c in &self.plan {
            let (receive_bytes, transmit_bytes) = c.bytes(&self.counters);
            out.push(InterfaceCounters { interface: c.name.clone(), receive_bytes, transmit_bytes });
        }
        // The plan is in name order; interfaces without a slot come from /proc/net/dev.
        if !self.unslotted.is_empty() {
            let match_all = DeviceFilter { include: PatternList::match_all(), exclude: PatternList::default() };
            let text = self.host.read_to_string("/proc/net/dev")?;
            let all = parse_net_dev(&text, &match_all)
                .with_context(|| format!("parsing {}", self.host.path("/proc/net/dev").display()))?;
            out.extend(all.into_iter().filter(|i| self.unslotted.contains(&i.interface)));
            out.sort_by(|a, b| a.interface.cmp(&b.interface));
        }
        Ok(out)
    }

    /// Gives each listed interface the filter allows its slot (those left without one are read
    /// from /proc/net/dev), takes the baselines of those whose slot is new, and plans the rounds
    /// until the next re-list: the counters read meanwhile.
    fn make_plan(&mut self) -> anyhow::Result<Vec<NetValue>> {
        let (mut slotted, mut fresh, mut unslotted) = (Vec::new(), Vec::new(), HashSet::new());
        for (name, i) in self.known.iter().filter(|(name, _)| self.filter.allows(name)) {
            match self.probes.net_slot(i.key)? {
                Some(slot) => {
                    if self.start.get(&i.key).is_none_or(|&(had, _)| had != slot) {
                        fresh.push((name.clone(), i.key, slot));
                    }
                    slotted.push((name.clone(), *i, slot));
                }
                // No slot left: its packets count in the overflow slot; /proc has its bytes.
                None => {
                    unslotted.insert(name.clone());
                }
            }
        }
        // An interface left out (filtered after a rename) is counted afresh when it is back.
        let counted: HashSet<NetKey> = slotted.iter().map(|(_, i, _)| i.key).collect();
        self.start.retain(|key, _| counted.contains(key));
        let now = if fresh.is_empty() { self.probes.net_counters()? } else { self.take_baselines(&fresh)? };
        let mut plan: Vec<Counted> = slotted
            .into_iter()
            .map(|(name, i, slot)| Counted {
                arphrd: i.arphrd,
                slot,
                baseline: self.baseline.get(&i.key).copied().unwrap_or((0, 0)),
                start: self.start.get(&i.key).map_or_else(NetValue::default, |&(_, v)| v),
                labels: Labels::shared(InterfaceCounters::labels(&name)),
                name,
            })
            .collect();
        plan.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        self.plan = plan;
        self.unslotted = unslotted;
        Ok(now)
    }
}

/// Packets counted in the overflow slot (of interfaces without a slot).
fn overflow_packets(slots: &[NetValue]) -> u64 {
    slots.get(OVERFLOW_SLOT as usize).map_or(0, |v| v.rx_packets.wrapping_add(v.tx_packets))
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
        self.read_counters()?;
        if self.unslotted.is_empty() {
            // Every interface has a slot: its samples straight from the plan, with its shared
            // label set, allocating nothing.
            for c in &self.plan {
                let (rx, tx) = c.bytes(&self.counters);
                out.extend(InterfaceCounters::samples_with(c.labels.clone(), rx, tx));
            }
        } else {
            out.extend(self.with_unslotted()?.iter().flat_map(InterfaceCounters::samples));
        }
        out.push(Sample::count("dcmon_ebpf_overflow_total", self.overflow).label("map", "net"));
        // The interfaces change only when re-listed: following them every round would cost a
        // few hash lookups per interface for nothing.
        if self.drops_stale {
            let filter = &self.filter;
            let allowed =
                self.known.iter().filter(|(name, _)| filter.allows(name)).map(|(name, i)| (i.key, name.as_str()));
            self.drops.sync(allowed)?;
            self.drops_stale = false;
        }
        self.drops.samples(out)?;
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
}
