//! The disk slot table: which latency histogram slot each disk has, and where its entry sits in
//! the direct-mapped table the completion program probes (see `dcmon_common::ebpf::DISK_SLOT_MAP`).

use std::collections::HashMap;

use dcmon_common::ebpf::{DISK_SLOTS, DiskSlot, OVERFLOW_SLOT, SLOT_PROBES, SLOT_TABLE_ENTRIES, slot_table_index};

/// The agent's copy of the table: assignments, and which table entries are in use.
#[derive(Debug)]
pub struct SlotTable {
    /// dev -> (slot, table index).
    assigned: HashMap<u32, (u32, u32)>,
    /// Slots not given to any disk.
    free: Vec<u32>,
    /// Which table entries hold a disk.
    used: Vec<bool>,
}

impl Default for SlotTable {
    fn default() -> Self {
        // Handed out from the low end: pop() takes the last.
        let free = (0..DISK_SLOTS).rev().filter(|&s| s != OVERFLOW_SLOT).collect();
        Self { assigned: HashMap::new(), free, used: vec![false; SLOT_TABLE_ENTRIES as usize] }
    }
}

impl SlotTable {
    /// The slot of disk `dev`, if it has one.
    pub fn slot_of(&self, dev: u32) -> Option<u32> {
        self.assigned.get(&dev).map(|&(slot, _)| slot)
    }

    /// Gives `dev` a slot and a table entry within the program's probe window: the (index,
    /// entry) to write into the map, or None when the slots or the window's entries are all
    /// taken. The caller writes the entry, or calls [`SlotTable::release`] if that fails.
    pub fn assign(&mut self, dev: u32) -> Option<(u32, DiskSlot)> {
        let home = slot_table_index(dev);
        let index =
            (0..SLOT_PROBES).map(|i| (home + i) & (SLOT_TABLE_ENTRIES - 1)).find(|&i| !self.used[i as usize])?;
        let slot = self.free.pop()?;
        self.used[index as usize] = true;
        self.assigned.insert(dev, (slot, index));
        Some((index, DiskSlot { dev, slot }))
    }

    /// Frees `dev`'s slot: the table index to clear, if it had one.
    pub fn release(&mut self, dev: u32) -> Option<u32> {
        let (slot, index) = self.assigned.remove(&dev)?;
        self.used[index as usize] = false;
        self.free.push(slot);
        Some(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_unique_and_entries_stay_in_the_probe_window() {
        let mut table = SlotTable::default();
        let mut slots = std::collections::HashSet::new();
        // Loop devices, SCSI disks and NVMe namespaces, as a host numbers them.
        let devs: Vec<u32> = (0..16)
            .map(|m| (7 << 20) | m)
            .chain((0..16).map(|d| (8 << 20) | (d * 16)))
            .chain((0..16).map(|m| (259 << 20) | m))
            .collect();
        for &dev in &devs {
            let (index, entry) = table.assign(dev).expect("room");
            assert_eq!(entry.dev, dev);
            assert!(entry.slot != OVERFLOW_SLOT && entry.slot < DISK_SLOTS);
            assert!(slots.insert(entry.slot), "slot {} twice", entry.slot);
            let home = slot_table_index(dev);
            assert!((0..SLOT_PROBES).any(|i| (home + i) & (SLOT_TABLE_ENTRIES - 1) == index));
            assert_eq!(table.slot_of(dev), Some(entry.slot));
        }
        // 63 slots: the 64th disk finds none, and gets one once a disk is released.
        let more: Vec<u32> = (100..115).map(|m| (7 << 20) | m).collect();
        for &dev in &more {
            table.assign(dev).expect("room");
        }
        assert!(table.assign((7 << 20) | 200).is_none(), "all 63 slots taken");
        let freed = table.slot_of(devs[3]).expect("assigned");
        assert!(table.release(devs[3]).is_some());
        assert_eq!(table.release(devs[3]), None, "already released");
        assert_eq!(table.assign((7 << 20) | 200).expect("room").1.slot, freed);
    }

    #[test]
    fn a_full_probe_window_refuses_the_disk() {
        let mut table = SlotTable::default();
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
}
