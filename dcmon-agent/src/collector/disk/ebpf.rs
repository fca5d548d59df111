//! Disk I/O from the `block_rq_complete` BPF program, reported like [`super::DiskCollector`]
//! reports /sys/block/DEV/stat.
//!
//! Values continue the /proc since-boot counters: when a disk gets its slot the collector
//! records /proc's values (the baseline) and the slot's values (the start), and reports
//! `baseline + (slot now - start)`, so switching modes across a restart shows no jump. A disk
//! without a slot (all taken) is read from its /sys/block stat file like a bio-based one.
//! Disks come from the [`DiskInventory`], listed again every [`super::RELIST_EVERY`] and at
//! once when one vanishes; the kernel key (dev_t) never changes under a name.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use dcmon_common::collector_names;
use dcmon_common::ebpf::{DiskKey, DiskValue, OVERFLOW_SLOT};

use super::latency::DiskLatency;
use super::{DiskCounters, DiskInventory, is_vanished, parse_block_stat, parse_diskstats_lines};
use crate::batch::Sample;
use crate::collector::{CollectError, Collector};
use crate::config::DeviceFilter;
use crate::ebpf::Probes;
use crate::host::{Host, OpenFile, served_from_kernel_memory};

/// Each slotted disk's slot and the slot's counters when the disk got it.
type SlotStarts = HashMap<DiskKey, (u32, DiskValue)>;

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
    /// /proc/diskstats when the disk got its slot.
    baseline: HashMap<DiskKey, DiskValue>,
    /// The disk's slot and its counters when the disk got it.
    start: SlotStarts,
    /// The overflow slot's completions at start.
    overflow_start: u64,
    /// The overflow slot's completions since start, as of the last read.
    overflow: u64,
    /// The whole disks, as last listed.
    inventory: DiskInventory,
    /// Each request-based disk's queue/iostats, kept open: it is re-read every round.
    iostats: HashMap<String, OpenFile>,
    /// The stat file of each disk read from the kernel's counters, kept open.
    stats: HashMap<String, OpenFile>,
    buf: String,
    /// Whether /sys/block is on sysfs (see [`served_from_kernel_memory`]).
    inline: bool,
    /// The latency histograms of the request-based disks.
    latency: DiskLatency,
}

impl EbpfDiskCollector {
    /// Lists the disks and gives each its slot now; call right after the programs are attached.
    pub fn new(host: Host, filter: DeviceFilter, probes: Arc<Probes>) -> anyhow::Result<Self> {
        let latency = DiskLatency::new(Arc::clone(&probes))?;
        let overflow_start = overflow_completions(&probes.disk_counters()?);
        let inline = served_from_kernel_memory(collector_names::DISK, [host.path("/sys/block").as_path()]);
        let mut c = Self {
            inventory: DiskInventory::new(host.clone()),
            host,
            filter,
            probes,
            baseline: HashMap::new(),
            start: HashMap::new(),
            overflow_start,
            overflow: 0,
            iostats: HashMap::new(),
            stats: HashMap::new(),
            buf: String::new(),
            inline,
            latency,
        };
        c.read_all()?;
        Ok(c)
    }

    /// List /sys/block again every `every` (default [`super::RELIST_EVERY`]) to find new disks.
    pub fn relist_every(mut self, every: Duration) -> Self {
        self.inventory.set_relist_every(every);
        self
    }

    /// The counters of every whole disk the filter allows, in device-number order.
    pub fn read_all(&mut self) -> anyhow::Result<Vec<DiskCounters>> {
        if self.inventory.is_due() {
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
        // A number no disk has any more: forget its counts so a new disk that reuses it starts
        // from its own /proc zero, not from the old disk's total.
        for key in self.inventory.relist()? {
            self.baseline.remove(&key);
            self.start.remove(&key);
            self.latency.forget(key)?;
            self.probes.release_disk_slot(key)?;
        }
        let inventory = &self.inventory;
        self.iostats.retain(|name, _| inventory.contains(name));
        self.stats.retain(|name, _| inventory.contains(name));
        Ok(())
    }

    /// The counters of the disks listed last, and whether one of them has vanished since.
    fn read_known(&mut self) -> anyhow::Result<(Vec<DiskCounters>, bool)> {
        let mut vanished = false;
        let (host, buf) = (&self.host, &mut self.buf);
        // Disks the programs cannot mirror: bio-based ones, and request-based ones whose
        // statistics are switched off (queue/iostats = 0: /proc stands still while requests
        // still complete); those are read from their stat files. queue/iostats is read every
        // round: iostats can be toggled at runtime, and a failed read is what notices a
        // removed disk in the very next round. A disk whose number could not be read is left
        // out until a listing reads it. A disk without a slot (all taken) is read from its
        // stat file too.
        let (mut from_proc, mut mapped, mut fresh) = (Vec::new(), Vec::new(), Vec::new());
        for (name, disk) in self.inventory.disks().filter(|(name, _)| self.filter.allows(name)) {
            let Some(key) = disk.key else { continue };
            let mirrored = disk.request_based && {
                let iostats = self
                    .iostats
                    .entry(name.to_owned())
                    .or_insert_with(|| OpenFile::new(host, format!("/sys/block/{name}/queue/iostats")));
                match iostats.read_into(buf) {
                    Ok(()) => buf.trim() != "0",
                    Err(_) => {
                        vanished = true;
                        true
                    }
                }
            };
            let slot = if mirrored { self.probes.disk_slot(key)? } else { None };
            match slot {
                Some(slot) => {
                    if self.start.get(&key).is_none_or(|&(had, _)| had != slot) {
                        fresh.push((key, slot));
                    }
                    mapped.push((key, slot, name));
                }
                None => from_proc.push((key, name)),
            }
        }
        let mut out: Vec<(DiskKey, DiskCounters)> = Vec::with_capacity(from_proc.len() + mapped.len());
        for (key, name) in from_proc {
            let stat = self
                .stats
                .entry(name.to_owned())
                .or_insert_with(|| OpenFile::new(host, format!("/sys/block/{name}/stat")));
            match stat.read_into(buf) {
                Ok(()) => out.push((
                    key,
                    parse_block_stat(name, buf).with_context(|| format!("parsing {}", stat.path().display()))?,
                )),
                // Removed since the listing: not reported, and forgotten at the next listing.
                Err(e) if is_vanished(&e) => vanished = true,
                Err(e) => return Err(e.into()),
            }
        }
        // A disk read from its stat file for a while (iostats off) is counted afresh when back.
        let counted: HashSet<DiskKey> = mapped.iter().map(|&(key, _, _)| key).collect();
        self.start.retain(|key, _| counted.contains(key));
        let now = if fresh.is_empty() {
            self.probes.disk_counters()?
        } else {
            take_baselines(&self.host, &self.probes, (&mut self.baseline, &mut self.start), &fresh)?
        };
        self.overflow = overflow_completions(&now).wrapping_sub(self.overflow_start);
        let zero = DiskValue::default();
        for (key, slot, name) in mapped {
            let base = self.baseline.get(&key).unwrap_or(&zero);
            let start = self.start.get(&key).map_or(&zero, |(_, v)| v);
            let now = now.get(slot as usize).unwrap_or(&zero);
            let cont = |b: u64, n: u64, s: u64| b.wrapping_add(n.wrapping_sub(s));
            let counters = DiskCounters::from_sectors(
                name.to_owned(),
                cont(base.reads, now.reads, start.reads),
                cont(base.read_sectors, now.read_sectors, start.read_sectors),
                cont(base.writes, now.writes, start.writes),
                cont(base.write_sectors, now.write_sectors, start.write_sectors),
            );
            out.push((key, counters));
        }
        // The order of /proc/diskstats: by device number.
        out.sort_by_key(|(k, _)| (k.major(), k.minor()));
        Ok((out.into_iter().map(|(_, c)| c).collect(), vanished))
    }
}

/// /proc/diskstats' counters of `keys` and the slots' counters, read so that no completion
/// of those slots falls between the two (tried a few times; a disk busy throughout may be
/// off by the completions of a few microseconds).
fn take_baselines(
    host: &Host,
    probes: &Probes,
    starts: (&mut HashMap<DiskKey, DiskValue>, &mut SlotStarts),
    keys: &[(DiskKey, u32)],
) -> anyhow::Result<Vec<DiskValue>> {
    let (baseline, start) = starts;
    let mut before = probes.disk_counters()?;
    for _ in 0..5 {
        let text = host.read_to_string("/proc/diskstats")?;
        let lines = parse_diskstats_lines(&text)
            .with_context(|| format!("parsing {}", host.path("/proc/diskstats").display()))?;
        let after = probes.disk_counters()?;
        let settled = keys.iter().all(|&(_, slot)| before.get(slot as usize) == after.get(slot as usize));
        for s in lines {
            let (Ok(major), Ok(minor)) = (u32::try_from(s.major), u32::try_from(s.minor)) else { continue };
            let key = DiskKey::new(major, minor);
            if keys.iter().any(|&(k, _)| k == key) {
                let proc = DiskValue {
                    reads: s.reads,
                    read_sectors: s.sectors_read,
                    writes: s.writes,
                    write_sectors: s.sectors_written,
                };
                baseline.insert(key, proc);
            }
        }
        for &(key, slot) in keys {
            start.insert(key, (slot, after.get(slot as usize).copied().unwrap_or_default()));
        }
        if settled {
            return Ok(after);
        }
        before = after;
    }
    Ok(before)
}

/// Completed requests counted in the overflow slot (of disks without a slot).
fn overflow_completions(slots: &[DiskValue]) -> u64 {
    slots.get(OVERFLOW_SLOT as usize).map_or(0, |v| v.reads.wrapping_add(v.writes))
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

    fn bpf_latency_timing(&self) -> Option<crate::ebpf::LatencyTiming> {
        Some(self.probes.latency_timing())
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        let disks = self.read_all()?;
        out.extend(disks.iter().flat_map(DiskCounters::samples));
        let filter = &self.filter;
        let timed = self
            .inventory
            .disks()
            .filter(|(name, disk)| disk.request_based && filter.allows(name))
            .filter_map(|(name, disk)| Some((disk.key?, name)));
        self.latency.sync(timed)?;
        out.push(Sample::count("dcmon_ebpf_overflow_total", self.overflow).label("map", "disk"));
        self.latency.samples(out)?;
        Ok(())
    }
}
