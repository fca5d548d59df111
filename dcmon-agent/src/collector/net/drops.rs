//! `network_drops_total{interface,reason}`: packets the kernel freed as dropped (`kfree_skb`),
//! per interface slot and `enum skb_drop_reason` value, named as the running kernel names them
//! (see `dcmon_common::ebpf::NET_DROP_MAP`). Counted since the interface got its slot. And the
//! TCP counters of the same namespace: `tcp_retransmits_total{family}`, `tcp_resets_sent_total`,
//! `tcp_resets_received_total`, since the agent started.

use std::collections::HashMap;
use std::sync::Arc;

use dcmon_common::ebpf::{
    DropCounts, NET_DROP_SLOTS, NO_DEVICE_SLOT, NetKey, OVERFLOW_SLOT, PROG_KFREE_SKB, PROG_TCP_RECEIVE_RESET,
    PROG_TCP_RETRANSMIT_SKB, PROG_TCP_SEND_RESET, TCP_FAMILIES, TcpCounts,
};

use crate::batch::Sample;
use crate::ebpf::Probes;

/// An interface with a slot.
#[derive(Debug)]
struct Slotted {
    name: String,
    slot: u32,
    /// The slot's counts when the interface got it.
    start: DropCounts,
}

/// The drop counters of the interfaces the agent reports, and their slots.
#[derive(Debug)]
pub struct NetDrops {
    probes: Arc<Probes>,
    /// In name order, the order the samples are sent in: sorted when the interfaces are synced,
    /// not every round.
    ifaces: Vec<(NetKey, Slotted)>,
    /// The drop counters of the slots, as of the last round (kept to reuse its memory).
    slots: Vec<DropCounts>,
    /// No drops, for a slot past the counters read: made once, not zeroed (1.3 KB) a round.
    zero: DropCounts,
    /// The no-device slot at start.
    no_device_start: DropCounts,
    /// Drops in the overflow slot at start.
    overflow_start: u64,
    /// Whether the lack of a free slot was logged already.
    warned_full: bool,
    /// The TCP counters at start.
    tcp_start: TcpCounts,
}

impl NetDrops {
    /// Reads the no-device and overflow slots' starting counts.
    pub fn new(probes: Arc<Probes>) -> anyhow::Result<Self> {
        let no_device_start = probes.net_drops(NO_DEVICE_SLOT)?;
        let overflow_start = probes.net_drops(OVERFLOW_SLOT)?.reasons.iter().sum();
        let tcp_start = probes.tcp_counts()?;
        Ok(Self {
            probes,
            ifaces: Vec::new(),
            slots: Vec::new(),
            zero: DropCounts::default(),
            no_device_start,
            overflow_start,
            warned_full: false,
            tcp_start,
        })
    }

    /// Gives a slot to each of `ifaces` (interfaces the filter allows) that has none, follows
    /// renames, and takes back the slots of interfaces no longer among them.
    pub fn sync<'a>(&mut self, ifaces: impl IntoIterator<Item = (NetKey, &'a str)>) -> anyhow::Result<()> {
        let wanted: HashMap<NetKey, &str> = ifaces.into_iter().collect();
        let mut had: HashMap<NetKey, Slotted> = self.ifaces.drain(..).collect();
        // Put back into name order whatever happens below (an error leaves the slots taken
        // so far in place).
        let result = self.sync_into(&wanted, &mut had);
        self.ifaces.extend(had);
        self.ifaces.sort_by(|(_, a), (_, b)| a.name.cmp(&b.name));
        result
    }

    fn sync_into(
        &mut self,
        wanted: &HashMap<NetKey, &str>,
        ifaces: &mut HashMap<NetKey, Slotted>,
    ) -> anyhow::Result<()> {
        let gone: Vec<NetKey> = ifaces.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
        for key in gone {
            ifaces.remove(&key);
            self.probes.release_net_slot(key)?;
        }
        for (&key, &name) in wanted {
            if let Some(i) = ifaces.get_mut(&key) {
                if i.name != name {
                    name.clone_into(&mut i.name);
                }
                continue;
            }
            // Only the low interface slots have drop counters: the programs count the drops of
            // the others in the overflow slot.
            let Some(slot) = self.probes.net_slot(key)?.filter(|&slot| slot < NET_DROP_SLOTS) else {
                if !self.warned_full {
                    tracing::warn!(
                        interface = name,
                        "no free eBPF drop slot: its drops are counted in the overflow slot"
                    );
                    self.warned_full = true;
                }
                continue;
            };
            let start = self.probes.net_drops(slot)?;
            ifaces.insert(key, Slotted { name: name.to_owned(), slot, start });
        }
        Ok(())
    }

    /// `network_drops_total` of every reason that has had a drop, per interface in name order,
    /// then the drops of packets without a device (no `interface` label), and the overflow
    /// slot's count.
    pub fn samples(&mut self, out: &mut Vec<Sample>) -> anyhow::Result<()> {
        self.probes.net_drops_all_into(&mut self.slots)?;
        let (slots, zero) = (&self.slots, &self.zero);
        let slot = |slot: u32| slots.get(slot as usize).unwrap_or(zero);
        for (_, i) in &self.ifaces {
            self.push(slot(i.slot), &i.start, Some(&i.name), out);
        }
        self.push(slot(NO_DEVICE_SLOT), &self.no_device_start, None, out);
        if self.probes.attached(PROG_KFREE_SKB) {
            let overflow: u64 = slot(OVERFLOW_SLOT).reasons.iter().sum();
            out.push(
                Sample::count("dcmon_ebpf_overflow_total", overflow.wrapping_sub(self.overflow_start))
                    .label("map", "net_drops"),
            );
        }
        // Each counter only while its program runs: a program that could not load leaves its
        // metric absent, not zero.
        let (tcp, start) = (self.probes.tcp_counts()?, &self.tcp_start);
        if self.probes.attached(PROG_TCP_RETRANSMIT_SKB) {
            for (i, family) in TCP_FAMILIES.iter().enumerate() {
                let n = tcp.retrans_segs[i].wrapping_sub(start.retrans_segs[i]);
                // The families a host has, and any other once it has retransmitted.
                if i < 2 || n > 0 {
                    out.push(Sample::count("tcp_retransmits_total", n).label("family", *family));
                }
            }
        }
        if self.probes.attached(PROG_TCP_SEND_RESET) {
            out.push(Sample::count("tcp_resets_sent_total", tcp.resets_sent.wrapping_sub(start.resets_sent)));
        }
        if self.probes.attached(PROG_TCP_RECEIVE_RESET) {
            let n = tcp.resets_received.wrapping_sub(start.resets_received);
            out.push(Sample::count("tcp_resets_received_total", n));
        }
        Ok(())
    }

    fn push(&self, now: &DropCounts, start: &DropCounts, interface: Option<&str>, out: &mut Vec<Sample>) {
        for (index, (n, s)) in now.reasons.iter().zip(&start.reasons).enumerate() {
            let n = n.wrapping_sub(*s);
            if n == 0 {
                continue;
            }
            let Some(reason) = self.probes.drop_reason_name(index) else { continue };
            let sample = Sample::count("network_drops_total", n);
            let sample = match interface {
                Some(name) => sample.label("interface", name),
                None => sample,
            };
            out.push(sample.label("reason", reason));
        }
    }
}
