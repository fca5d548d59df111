//! Slot tables: which slot (of the counters, histograms and drop counters) each disk or interface has, and where its entry sits in the
//! direct-mapped table the programs probe (see `dcmon_common::ebpf::DISK_SLOT_MAP` and
//! `NET_SLOT_MAP`).

use std::collections::HashMap;
use std::hash::Hash;

use dcmon_common::ebpf::{
    DISK_SLOTS, NO_DEVICE_SLOT, NetKey, OVERFLOW_SLOT, SLOT_PROBES, SLOT_TABLE_ENTRIES, net_slot_hash, slot_table_index,
};

/// The agent's copy of a table: assignments, and which table entries are in use.
#[derive(Debug)]
pub struct SlotTable<K> {
    /// key -> (slot, table index).
    assigned: HashMap<K, (u32, u32)>,
    /// Slots not given to any key.
    free: Vec<u32>,
    /// Which table entries hold a key (as many as the table has).
    used: Vec<bool>,
    /// The key's home index before the table's mask (the program's hash).
    home: fn(K) -> u32,
    /// The lowest slot handed out; those below are the program's own (overflow, no device).
    first: u32,
}

impl<K: Copy + Eq + Hash> SlotTable<K> {
    /// Slots `first..slots` to hand out, from the low end, in a table of `entries` (a power of
    /// two).
    fn new(first: u32, slots: u32, entries: u32, home: fn(K) -> u32) -> Self {
        debug_assert!(entries.is_power_of_two());
        let free = (first..slots).rev().collect();
        Self { assigned: HashMap::new(), free, used: vec![false; entries as usize], home, first }
    }

    /// The slots of the table, the program's own below `first` included.
    pub fn slot_count(&self) -> u32 {
        self.free.len() as u32 + self.assigned.len() as u32 + self.first
    }

    /// The slot of `key`, if it has one.
    pub fn slot_of(&self, key: K) -> Option<u32> {
        self.assigned.get(&key).map(|&(slot, _)| slot)
    }

    /// Every key with a slot, and its slot.
    pub fn slots(&self) -> impl Iterator<Item = (K, u32)> + '_ {
        self.assigned.iter().map(|(&key, &(slot, _))| (key, slot))
    }

    /// One past the highest slot handed out (at least `first`): the slots a read must cover.
    pub fn end(&self) -> u32 {
        self.assigned.values().map(|&(slot, _)| slot + 1).max().unwrap_or(self.first).max(self.first)
    }

    /// Gives `key` a slot and a table entry within the program's probe window: (table index,
    /// slot) to write into the map, or None when the slots or the window's entries are all
    /// taken. The caller writes the entry, or calls [`SlotTable::release`] if that fails.
    pub fn assign(&mut self, key: K) -> Option<(u32, u32)> {
        let (home, mask) = ((self.home)(key), self.used.len() as u32 - 1);
        let index = (0..SLOT_PROBES).map(|i| home.wrapping_add(i) & mask).find(|&i| !self.used[i as usize])?;
        let slot = self.free.pop()?;
        self.used[index as usize] = true;
        self.assigned.insert(key, (slot, index));
        Some((index, slot))
    }

    /// Frees `key`'s slot: the table index to clear, if it had one.
    pub fn release(&mut self, key: K) -> Option<u32> {
        let (slot, index) = self.assigned.remove(&key)?;
        self.used[index as usize] = false;
        self.free.push(slot);
        Some(index)
    }
}

/// Disk slots, keyed by `DiskKey::dev`; slot 0 is the overflow.
pub fn disk_slots() -> SlotTable<u32> {
    const _: () = assert!(OVERFLOW_SLOT == 0);
    SlotTable::new(OVERFLOW_SLOT + 1, DISK_SLOTS, SLOT_TABLE_ENTRIES, slot_table_index)
}

/// `slots` interface slots in a table of `entries` (the two maps' lengths as loaded); slot 0 is
/// the overflow, slot 1 the packets without a device.
pub fn net_slots(slots: u32, entries: u32) -> SlotTable<NetKey> {
    SlotTable::new(NO_DEVICE_SLOT + 1, slots, entries, net_slot_hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_unique_and_entries_stay_in_the_probe_window() {
        let mut table = disk_slots();
        let mut slots = std::collections::HashSet::new();
        // Loop devices, SCSI disks and NVMe namespaces, as a host numbers them.
        let devs: Vec<u32> = (0..16)
            .map(|m| (7 << 20) | m)
            .chain((0..16).map(|d| (8 << 20) | (d * 16)))
            .chain((0..16).map(|m| (259 << 20) | m))
            .collect();
        for &dev in &devs {
            let (index, slot) = table.assign(dev).expect("room");
            assert!(slot != OVERFLOW_SLOT && slot < DISK_SLOTS);
            assert!(slots.insert(slot), "slot {slot} twice");
            let home = slot_table_index(dev);
            assert!((0..SLOT_PROBES).any(|i| (home + i) & (SLOT_TABLE_ENTRIES - 1) == index));
            assert_eq!(table.slot_of(dev), Some(slot));
        }
        // 63 slots: the 64th disk finds none, and gets one once a disk is released.
        let more: Vec<u32> = (100..115).map(|m| (7 << 20) | m).collect();
        for &dev in &more {
            table.assign(dev).expect("room");
        }
        assert!(table.assign((7 << 20) | 200).is_none(), "all 63 slots taken");
        assert_eq!(table.end(), DISK_SLOTS);
        let freed = table.slot_of(devs[3]).expect("assigned");
        assert!(table.release(devs[3]).is_some());
        assert_eq!(table.release(devs[3]), None, "already released");
        assert_eq!(table.assign((7 << 20) | 200).expect("room").1, freed);
    }

    #[test]
    fn a_full_probe_window_refuses_the_disk() {
        let mut table = disk_slots();
        // Five disks with home index 0: minor = major * 97 cancels out.
        let devs: Vec<u32> = (0..64)
            .map(|major| (major << 20) | ((major * 97) & (SLOT_TABLE_ENTRIES - 1)))
            .filter(|&dev| slot_table_index(dev) == 0)
            .take(5)
            .collect();
        assert_eq!(devs.len(), 5);
        for &dev in &devs[..4] {
            table.assign(dev).expect("window has room");
        }
        assert!(table.assign(devs[4]).is_none(), "window of {SLOT_PROBES} full");
    }

    #[test]
    fn interface_slots_start_after_the_no_device_slot() {
        use dcmon_common::ebpf::NET_SLOTS;
        let mut table = net_slots(NET_SLOTS, SLOT_TABLE_ENTRIES);
        assert_eq!(table.end(), NO_DEVICE_SLOT + 1, "nothing handed out: the program's slots only");
        let (_, slot) = table.assign(NetKey { ifindex: 1, netns: 4026531840 }).expect("room");
        assert_eq!(slot, NO_DEVICE_SLOT + 1);
        assert_eq!(table.end(), slot + 1);
        let given = (0..NET_SLOTS).filter_map(|i| table.assign(NetKey { ifindex: 100 + i * 8, netns: 7 })).count();
        assert_eq!(given as u32, NET_SLOTS - 3, "slots 0 and 1 are the program's, one is taken");
    }

    /// 10,000 interfaces of one namespace (consecutive ifindexes, as a host numbers them) all
    /// get a slot when the counters have room for them, each in its probe window.
    #[test]
    fn ten_thousand_interfaces_get_a_slot_each() {
        use dcmon_common::ebpf::{NET_SLOTS_MAX, net_slot_table_entries, net_slots_for};
        let slots = net_slots_for(2);
        assert_eq!(slots, NET_SLOTS_MAX);
        let mut table = net_slots(slots, net_slot_table_entries(slots));
        assert_eq!(table.slot_count(), slots);
        let mask = net_slot_table_entries(slots) - 1;
        let mut seen = std::collections::HashSet::new();
        for ifindex in 1..=10_001 {
            let key = NetKey { ifindex, netns: 4026532200 };
            let (index, slot) = table.assign(key).unwrap_or_else(|| panic!("no slot for ifindex {ifindex}"));
            assert!(slot > NO_DEVICE_SLOT && slot < slots && seen.insert(slot), "slot {slot}");
            assert!((0..SLOT_PROBES).any(|i| net_slot_hash(key).wrapping_add(i) & mask == index));
        }
        assert_eq!(table.end(), 10_003, "slots 2 to 10,002 handed out");
    }
}
