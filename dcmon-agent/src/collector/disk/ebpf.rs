//! Disk I/O from the `block_rq_complete` BPF program, reported like [`super::DiskCollector`]
//! reports /sys/block/DEV/stat.
//!
//! Values continue the /proc since-boot counters: when a disk gets its slot the collector
//! records /proc's values (the baseline) and the slot's values (the start), and reports
//! `baseline + (slot now - start)`, so switching modes across a restart shows no jump. A disk
//! without a slot (all taken) is read from its /sys/block stat file like a bio-based one.
//! Disks come from the [`DiskInventory`], listed again every [`super::RELIST_EVERY`] and at
//! once when one vanishes; the kernel key (dev_t) never changes under a name.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use dcmon_common::ebpf::{DiskKey, DiskValue, OVERFLOW_SLOT};
use dcmon_common::{SECTOR_BYTES, collector_names};

use super::latency::DiskLatency;
use super::removals::DiskRemovals;
use super::{DiskCounters, DiskInventory, is_vanished, parse_block_stat, parse_diskstats_lines};
use crate::batch::{Labels, Sample};
use crate::collector::{CollectError, Collector};
use crate::config::DeviceFilter;
use crate::ebpf::Probes;
use crate::host::{Host, OpenFile, served_from_kernel_memory};

/// Each slotted disk's slot and the slot's counters when the disk got it.
type SlotStarts = HashMap<DiskKey, (u32, DiskValue)>;

/// A disk of the last listing that the filter allows and whose number is known, with what its
/// rounds need: the filter, the names and the files are decided once per listing, not per round.
#[derive(Debug)]
struct Listed {
    name: String,
    key: DiskKey,
    request_based: bool,
    /// Its queue/iostats (request-based disks), kept open: read again in a round where its
    /// slot's counters moved since the last read.
    iostats: OpenFile,
    /// Its slot and the slot's counters when queue/iostats was last read (None: read it this
    /// round), and what it said: statistics on.
    iostats_checked: Option<(u32, DiskValue)>,
    iostats_on: bool,
    /// Its stat file, kept open (opened when first read).
    stat: OpenFile,
    /// `device="name"`, made once and shared by every round's samples.
    labels: Labels,
    /// Its slot, the slot's counters when it got it and /proc's then: a copy of `start` and
    /// `baseline`, so a round looks up neither. None while not counted from a slot.
    counted: Option<(u32, DiskValue, DiskValue)>,
    /// This round: its slot (None: read from its stat file) ...
    slot: Option<u32>,
    /// ... and its (reads, read bytes, writes, write bytes); None: not reported (vanished).
    values: Option<[u64; 4]>,
}

impl Listed {
    fn new(host: &Host, name: &str, key: DiskKey, request_based: bool) -> Self {
        Self {
            name: name.to_owned(),
            key,
            request_based,
            iostats: OpenFile::new(host, format!("/sys/block/{name}/queue/iostats")),
            stat: OpenFile::new(host, format!("/sys/block/{name}/stat")),
            iostats_checked: None,
            iostats_on: true,
            labels: Labels::shared([("device", name.into())]),
            counted: None,
            slot: None,
            values: None,
        }
    }
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
    /// The kernel's disk removals; None where its uevents cannot be had: /sys/block is then
    /// read every round instead.
    removals: Option<DiskRemovals>,
    /// A removal was reported: check /sys/block in the next round too, as the kernel sends the
    /// uevent before the disk leaves /sys/block.
    recheck_listing: bool,
    /// The disks of the last listing the filter allows, in device-number order (the order of
    /// /proc/diskstats, which the samples follow); made at each listing.
    listed: Vec<Listed>,
    /// The disks were listed since `latency` last followed them.
    latency_stale: bool,
    /// The slots' counters as of the last round, kept so a round allocates nothing.
    counters: Vec<DiskValue>,
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
            removals: DiskRemovals::subscribe()
                .inspect_err(|e| {
                    tracing::debug!("no uevents ({e}): /sys/block is read every round to notice a removed disk")
                })
                .ok(),
            recheck_listing: false,
            host,
            filter,
            probes,
            baseline: HashMap::new(),
            start: HashMap::new(),
            overflow_start,
            overflow: 0,
            listed: Vec::new(),
            latency_stale: true,
            counters: Vec::new(),
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
        self.read_round()?;
        let reported = self.listed.iter().filter_map(|l| Some((l, l.values?)));
        Ok(reported
            .map(|(l, [reads, read_bytes, writes, write_bytes])| DiskCounters {
                device: l.name.clone(),
                reads,
                read_bytes,
                writes,
                write_bytes,
            })
            .collect())
    }

    /// Lists the disks when due, and reads every listed disk's counters into its `values`.
    fn read_round(&mut self) -> anyhow::Result<()> {
        // A removed disk whose slot stands still reads none of its files in a round (see
        // read_known): its uevent, or else one read of /sys/block, notices it instead.
        let lost = match &self.removals {
            Some(removals) => {
                let removed = removals.removed();
                let lost = removed || (self.recheck_listing && self.inventory.lost_a_disk());
                self.recheck_listing = removed;
                lost
            }
            None => self.inventory.lost_a_disk(),
        };
        if self.inventory.is_due() || lost {
            self.relist()?;
        }
        if self.read_known()? {
            // A disk went away: list again now so a disk reusing its number starts clean.
            self.relist()?;
            self.read_known()?;
        }
        Ok(())
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
        // The filter's decisions, once per listing. A disk listed before under the same name,
        // number and type keeps its open files and label set.
        let mut before: HashMap<String, Listed> = self.listed.drain(..).map(|l| (l.name.clone(), l)).collect();
        for (name, disk) in self.inventory.disks().filter(|(name, _)| self.filter.allows(name)) {
            let Some(key) = disk.key else { continue };
            let mut l = match before.remove(name) {
                Some(l) if l.key == key && l.request_based == disk.request_based => l,
                _ => Listed::new(&self.host, name, key, disk.request_based),
            };
            l.counted = self
                .start
                .get(&key)
                .map(|&(slot, start)| (slot, start, self.baseline.get(&key).copied().unwrap_or_default()));
            self.listed.push(l);
        }
        // The order of /proc/diskstats: by device number.
        self.listed.sort_by_key(|l| (l.key.major(), l.key.minor()));
        // A disk left out (renamed to a name the filter refuses) is counted afresh when back.
        let listed = &self.listed;
        self.start.retain(|key, _| listed.iter().any(|l| l.key == *key));
        self.latency_stale = true;
        Ok(())
    }

    /// Reads the counters of the disks listed last into their `values`; whether one of them
    /// has vanished since.
    fn read_known(&mut self) -> anyhow::Result<bool> {
        let mut vanished = false;
        let buf = &mut self.buf;
        // The slots' counters first: they decide which disks need their queue/iostats read.
        self.probes.disk_counters_into(&mut self.counters)?;
        // Disks the programs cannot mirror: bio-based ones, and request-based ones whose
        // statistics are switched off (queue/iostats = 0: /proc stands still while requests
        // still complete); those are read from their stat files. iostats can be toggled at
        // runtime, but it only matters for requests that complete: queue/iostats is read again
        // only in a round where the disk's slot counted some since the last read (a disk with
        // no completion stands still in /proc and in its slot alike), which spares the idle
        // disks a file read a round. A failed read notices a removed disk, and
        // `DiskInventory::lost_a_disk` the idle ones. A disk whose number could not be read is
        // left out until a listing reads it. A disk without a slot (all taken) is read from
        // its stat file too.
        let mut fresh = Vec::new();
        for l in &mut self.listed {
            l.values = None;
            l.slot = None;
            if l.request_based
                && let Some(slot) = self.probes.disk_slot(l.key)?
            {
                let now = self.counters.get(slot as usize).copied();
                let still = now.is_some_and(|now| l.iostats_checked == Some((slot, now)));
                if !still {
                    l.iostats_checked = now.map(|now| (slot, now));
                    l.iostats_on = match l.iostats.read_into(buf) {
                        Ok(()) => buf.trim() != "0",
                        Err(_) => {
                            // Read again next round; counted from its slot in this one.
                            l.iostats_checked = None;
                            vanished = true;
                            true
                        }
                    };
                }
                if l.iostats_on {
                    l.slot = Some(slot);
                }
            }
            match l.slot {
                Some(slot) => {
                    if l.counted.is_none_or(|(had, _, _)| had != slot) {
                        fresh.push((l.key, slot));
                    }
                }
                None => {
                    // Read from its stat file for a while (iostats off): counted afresh when back.
                    if l.counted.take().is_some() {
                        self.start.remove(&l.key);
                    }
                    match l.stat.read_into(buf) {
                        Ok(()) => {
                            let c = parse_block_stat(&l.name, buf)
                                .with_context(|| format!("parsing {}", l.stat.path().display()))?;
                            l.values = Some(c.values());
                        }
                        // Removed since the listing: not reported, and forgotten at the next listing.
                        Err(e) if is_vanished(&e) => vanished = true,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        if !fresh.is_empty() {
            self.counters = take_baselines(&self.host, &self.probes, (&mut self.baseline, &mut self.start), &fresh)?;
            for l in &mut self.listed {
                if l.slot.is_some() && fresh.iter().any(|&(key, _)| key == l.key) {
                    l.counted = self
                        .start
                        .get(&l.key)
                        .map(|&(slot, start)| (slot, start, self.baseline.get(&l.key).copied().unwrap_or_default()));
                }
            }
        }
        self.overflow = overflow_completions(&self.counters).wrapping_sub(self.overflow_start);
        let zero = DiskValue::default();
        for l in &mut self.listed {
            let (Some(slot), Some((_, start, base))) = (l.slot, &l.counted) else { continue };
            let now = self.counters.get(slot as usize).unwrap_or(&zero);
            let cont = |b: u64, n: u64, s: u64| b.wrapping_add(n.wrapping_sub(s));
            let reads = cont(base.reads, now.reads, start.reads);
            let read_sectors = cont(base.read_sectors, now.read_sectors, start.read_sectors);
            let writes = cont(base.writes, now.writes, start.writes);
            let write_sectors = cont(base.write_sectors, now.write_sectors, start.write_sectors);
            l.values = Some([
                reads,
                read_sectors.wrapping_mul(SECTOR_BYTES),
                writes,
                write_sectors.wrapping_mul(SECTOR_BYTES),
            ]);
        }
        Ok(vanished)
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
        self.read_round()?;
        for l in &self.listed {
            if let Some(values) = l.values {
                DiskCounters::push_shared(values, &l.labels, out);
            }
        }
        // The disks change only at a listing: following them every round would cost a few
        // hash lookups per disk for nothing.
        if self.latency_stale {
            let timed = self.listed.iter().filter(|l| l.request_based).map(|l| (l.key, l.name.as_str()));
            self.latency.sync(timed)?;
            self.latency_stale = false;
        }
        out.push(Sample::count("dcmon_ebpf_overflow_total", self.overflow).label("map", "disk"));
        self.latency.samples(out)?;
        Ok(())
    }
}
