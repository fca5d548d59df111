//! Per whole-disk I/O counters: each reported disk's /sys/block/DEV/stat, or /proc/diskstats
//! where there is no /sys (some containers).
//!
//! /proc/diskstats costs the kernel a line (with an in-flight count) for every block device,
//! partitions, loop and zram devices included, where the agent reports a few whole disks:
//! reading only those disks' stat files is several times cheaper. Both give the same counters.
//!
//! [`ebpf`] holds the eBPF-fed disk collector; both list disks through [`DiskInventory`] and
//! parse /proc/diskstats with [`parse_diskstats_lines`].

pub mod ebpf;
mod inventory;
pub mod latency;
mod removals;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use dcmon_common::{SECTOR_BYTES, collector_names};
use procfs_core::DiskStat;

use super::{CollectError, Collector};
use crate::batch::{Labels, Sample, Value};
use crate::config::DeviceFilter;
use crate::host::{Host, OpenFile, ReadError, served_from_kernel_memory};
pub use inventory::{Disk, DiskInventory, RELIST_EVERY};

/// This collector's row in the table ([`super::SOURCES`]).
pub const SOURCE: super::Source = super::Source {
    name: dcmon_common::collector_names::DISK,
    switch: super::Switch::Always,
    caps: &[],
    section: None,
    build: Some(|host, config| Box::new(DiskCollector::new(host.clone(), config.disks.clone()))),
};

/// The metrics of each disk, in the order [`DiskCounters::samples`] sends them.
const DISK_METRICS: [&str; 4] =
    ["disk_reads_total", "disk_read_bytes_total", "disk_writes_total", "disk_write_bytes_total"];

/// Counters of one whole disk, in the units the metrics use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskCounters {
    /// Kernel device name (`vda`, `nvme0n1`, `dm-0`).
    pub device: String,
    /// Completed reads.
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Completed writes.
    pub writes: u64,
    /// Bytes written.
    pub write_bytes: u64,
}

impl DiskCounters {
    /// From the kernel's counters, which count 512-byte sectors. Bytes wrap at 2^64 like the
    /// kernel's own counters do.
    pub fn from_sectors(device: String, reads: u64, sectors_read: u64, writes: u64, sectors_written: u64) -> Self {
        Self {
            device,
            reads,
            read_bytes: sectors_read.wrapping_mul(SECTOR_BYTES),
            writes,
            write_bytes: sectors_written.wrapping_mul(SECTOR_BYTES),
        }
    }

    /// The four metrics of this disk, with one label set that every round shares (`labels`:
    /// `device="name"`, made once), in [`DiskCounters::samples`]' order.
    pub fn push_shared(values: [u64; 4], labels: &Labels, out: &mut Vec<Sample>) {
        for (name, value) in DISK_METRICS.into_iter().zip(values) {
            out.push(Sample { name, value: Value::Count(value), labels: labels.clone() });
        }
    }

    /// (reads, read bytes, writes, write bytes), as [`DiskCounters::samples`] sends them.
    pub fn values(&self) -> [u64; 4] {
        [self.reads, self.read_bytes, self.writes, self.write_bytes]
    }

    /// The four metrics of this disk.
    pub fn samples(&self) -> [Sample; 4] {
        let d = &self.device;
        let values = self.values();
        std::array::from_fn(|i| Sample::count(DISK_METRICS[i], values[i]).label("device", d.as_str()))
    }
}

/// How to tell whole disks from partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WholeDisks {
    /// Names in /sys/block: the kernel's own list of whole block devices.
    Sysfs(HashSet<String>),
    /// No sysfs (some containers): a name is a partition when it is another device's name
    /// plus a number (`sda1`, `nvme0n1p2`, `mmcblk0p1`).
    ByName,
}

/// `254  0 vda 6520 2310 496430 3380 3210 2800 181298 4460 0 6168 8810 0 0 0 0 1410 970`
/// (/proc/diskstats): every line, blank lines skipped.
pub fn parse_diskstats_lines(text: &str) -> anyhow::Result<Vec<DiskStat>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            // procfs-core's own message asks the reader to report a procfs bug: say what is wrong.
            DiskStat::from_line(l).map_err(|_| {
                anyhow!(
                    "line {}: expected \"MAJOR MINOR NAME\" and at least 11 counters (11, 15 or 17 by kernel \
                     version), got {:?}",
                    i + 1,
                    l.chars().take(200).collect::<String>()
                )
            })
        })
        .collect()
}

/// /proc/diskstats into the counters of the whole disks that `filter` allows.
pub fn parse_diskstats(text: &str, whole: &WholeDisks, filter: &DeviceFilter) -> anyhow::Result<Vec<DiskCounters>> {
    let stats = parse_diskstats_lines(text)?;
    let names: HashSet<&str> = stats.iter().map(|s| s.name.as_str()).collect();
    Ok(stats
        .iter()
        .filter(|s| filter.allows(&s.name))
        .filter(|s| match whole {
            WholeDisks::Sysfs(set) => set.contains(&s.name),
            WholeDisks::ByName => !is_partition_by_name(&s.name, &names),
        })
        .map(|s| DiskCounters::from_sectors(s.name.clone(), s.reads, s.sectors_read, s.writes, s.sectors_written))
        .collect())
}

/// The counters of a /sys/block/DEV/stat line (Documentation/block/stat.rst): the fields of a
/// /proc/diskstats line without major, minor and name. 11 fields before Linux 4.18, 15 with
/// discards, 17 with flushes since 5.5; like [`parse_diskstats`], the first 11 must be numbers
/// and any after them are not looked at.
pub fn parse_block_stat(device: &str, text: &str) -> anyhow::Result<DiskCounters> {
    let mut f = [0u64; 11];
    let mut fields = text.split_whitespace();
    for (i, slot) in f.iter_mut().enumerate() {
        let Some(field) = fields.next() else {
            return Err(anyhow!("expected at least 11 numbers (11, 15 or 17 by kernel version), found {i}"));
        };
        *slot = field.parse().map_err(|_| anyhow!("field {} is {field:?}, expected a number", i + 1))?;
    }
    // reads, reads merged, sectors read, ms reading, writes, writes merged, sectors written, ...
    Ok(DiskCounters::from_sectors(device.to_owned(), f[0], f[2], f[4], f[6]))
}

fn is_partition_by_name(name: &str, all: &HashSet<&str>) -> bool {
    let stem = name.trim_end_matches(|c: char| c.is_ascii_digit());
    if stem.len() == name.len() {
        return false;
    }
    all.contains(stem) || stem.strip_suffix('p').is_some_and(|s| all.contains(s))
}

/// A disk's stat file is gone: the disk was removed (ENODEV on the open file, ENOENT on a
/// fresh open). Anything else is a failure worth reporting.
pub fn is_vanished(e: &ReadError) -> bool {
    e.is_not_found() || e.error.raw_os_error() == Some(libc::ENODEV)
}

/// Whether reading `reported` disks' stat files costs the kernel less than one /proc/diskstats
/// of `devices` lines. Per device, a stat file costs about twice a diskstats line (two system
/// calls and a file to serve where diskstats writes one more line).
pub fn per_disk_is_cheaper(reported: usize, devices: usize) -> bool {
    reported * 2 <= devices
}

/// A reported disk and its stat file, kept open.
#[derive(Debug)]
struct SysfsDisk {
    name: String,
    stat: OpenFile,
}

/// Where the counters come from.
#[derive(Debug)]
enum Source {
    /// No /sys/block (some containers): /proc/diskstats, partitions told apart by name.
    DiskstatsByName,
    /// /proc/diskstats, whole disks from /sys/block: cheaper than per-disk files when most of
    /// its devices are reported.
    Diskstats(WholeDisks),
    /// Each reported disk's /sys/block/DEV/stat, in /proc/diskstats order.
    PerDisk(Vec<SysfsDisk>),
}

/// Per-disk reads, writes and bytes.
#[derive(Debug)]
pub struct DiskCollector {
    host: Host,
    filter: DeviceFilter,
    diskstats: OpenFile,
    buf: String,
    inventory: DiskInventory,
    /// Whether `source` was chosen since the last failure to choose it; not: choose this round.
    chosen: bool,
    /// The names in /sys/block that the filter allows, sorted, as last listed; `None` when the
    /// host has no /sys/block.
    wanted: Option<Vec<String>>,
    source: Source,
    /// Device names of the last /proc/diskstats read, in order, when the source is
    /// diskstats: a change (a disk came or went) lists /sys/block again at once.
    names: Vec<String>,
    /// Whether /proc/diskstats and /sys/block are on procfs and sysfs (see
    /// [`served_from_kernel_memory`]).
    inline: bool,
}

impl DiskCollector {
    /// A collector reading `host`'s disk counters, reporting disks `filter` allows.
    pub fn new(host: Host, filter: DeviceFilter) -> Self {
        let diskstats = OpenFile::new(&host, "/proc/diskstats");
        let inline = served_from_kernel_memory(collector_names::DISK, [diskstats.path(), &host.path("/sys/block")]);
        Self {
            inventory: DiskInventory::new(host.clone()),
            host,
            filter,
            diskstats,
            buf: String::new(),
            chosen: false,
            wanted: None,
            source: Source::DiskstatsByName,
            names: Vec::new(),
            inline,
        }
    }

    /// List /sys/block again every `every` (default [`RELIST_EVERY`]) to find new disks.
    pub fn relist_every(mut self, every: Duration) -> Self {
        self.inventory.set_relist_every(every);
        self
    }

    /// List /sys/block; when the disks to report changed (or `rechoose`: the devices in
    /// /proc/diskstats did), choose the source again and open the new disks' stat files.
    /// /proc/diskstats is read here (into `buf`) only then: at start and when a disk came or
    /// went.
    fn relist(&mut self, rechoose: bool) -> Result<(), CollectError> {
        // Without /sys/block (some containers) partitions are told apart by name.
        let listed = self.inventory.relist().ok().map(|_| {
            let names = self.inventory.disks().map(|(name, _)| name).filter(|n| self.filter.allows(n));
            names.map(str::to_owned).collect::<Vec<_>>()
        });
        if rechoose || !self.chosen || listed != self.wanted {
            self.chosen = false;
            self.source = match &listed {
                None => Source::DiskstatsByName,
                Some(names) => self.choose_source(names)?,
            };
            match &self.source {
                Source::DiskstatsByName => tracing::debug!("disks: no /sys/block, reading /proc/diskstats"),
                Source::Diskstats(_) => tracing::debug!(
                    "disks: reading /proc/diskstats ({} devices) for {} disks",
                    self.names.len(),
                    listed.as_ref().map_or(0, Vec::len)
                ),
                Source::PerDisk(d) => {
                    tracing::debug!("disks: reading {} /sys/block/*/stat of {} devices", d.len(), self.names.len());
                }
            }
            self.wanted = listed;
            self.chosen = true;
        }
        Ok(())
    }

    /// The source for reporting `names` (whole disks the filter allows): their stat files
    /// (those already open stay open) in /proc/diskstats order, a name not in it last; or
    /// /proc/diskstats itself when that costs less.
    fn choose_source(&mut self, names: &[String]) -> Result<Source, CollectError> {
        self.diskstats.read_into(&mut self.buf)?;
        self.names = device_names(&self.buf).map(str::to_owned).collect();
        let position: HashMap<&str, usize> = device_names(&self.buf).enumerate().map(|(i, n)| (n, i)).collect();
        if !per_disk_is_cheaper(names.len(), position.len()) {
            return Ok(Source::Diskstats(WholeDisks::Sysfs(names.iter().cloned().collect())));
        }
        let mut ordered: Vec<&String> = names.iter().collect();
        ordered.sort_by_key(|n| position.get(n.as_str()).copied().unwrap_or(usize::MAX));
        let mut open: HashMap<String, OpenFile> = match std::mem::replace(&mut self.source, Source::DiskstatsByName) {
            Source::PerDisk(disks) => disks.into_iter().map(|d| (d.name, d.stat)).collect(),
            _ => HashMap::new(),
        };
        Ok(Source::PerDisk(
            ordered
                .into_iter()
                .map(|name| SysfsDisk {
                    stat: open
                        .remove(name)
                        .unwrap_or_else(|| OpenFile::new(&self.host, format!("/sys/block/{name}/stat"))),
                    name: name.clone(),
                })
                .collect(),
        ))
    }

    /// Whether the disks are read from their /sys/block/DEV/stat files (else /proc/diskstats).
    pub fn is_per_disk(&self) -> bool {
        matches!(self.source, Source::PerDisk(_))
    }

    /// Each disk's counters into `out`. Returns whether a disk's stat file was gone, in which
    /// case nothing was appended and the caller lists /sys/block again; with `last_try` a
    /// missing file is an error instead.
    fn read_per_disk(&mut self, out: &mut Vec<Sample>, last_try: bool) -> Result<bool, CollectError> {
        let Source::PerDisk(disks) = &mut self.source else {
            return Ok(false);
        };
        let mark = out.len();
        let mut vanished = false;
        let mut failed: Option<anyhow::Error> = None;
        for d in disks {
            match d.stat.read_into(&mut self.buf) {
                Ok(()) => match parse_block_stat(&d.name, &self.buf) {
                    Ok(c) => out.extend(c.samples()),
                    Err(e) => {
                        failed.get_or_insert(e.context(format!("parsing {}", d.stat.path().display())));
                    }
                },
                Err(e) if !last_try && is_vanished(&e) => vanished = true,
                Err(e) => {
                    failed.get_or_insert(e.into());
                }
            }
        }
        if vanished {
            out.truncate(mark);
        } else if let Some(e) = failed {
            // Not `NotPresent`: the other disks were reported, and next round may work.
            return Err(CollectError::Failed(e));
        }
        Ok(vanished)
    }
}

/// The device name column of each diskstats line.
fn device_names(diskstats: &str) -> impl Iterator<Item = &str> {
    diskstats.lines().filter_map(|l| l.split_whitespace().nth(2))
}

impl Collector for DiskCollector {
    fn name(&self) -> &'static str {
        collector_names::DISK
    }

    /// Not when its files are on procfs and sysfs: the kernel serves them from memory.
    fn may_block(&self) -> bool {
        !self.inline
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        if !self.chosen || self.inventory.is_due() {
            self.relist(false)?;
        }
        if self.is_per_disk() {
            if !self.read_per_disk(out, false)? {
                return Ok(());
            }
            // A disk went away (or was replaced under the same name): list again, read again.
            self.relist(false)?;
            if self.is_per_disk() {
                self.read_per_disk(out, true)?;
                return Ok(());
            }
        }
        self.diskstats.read_into(&mut self.buf)?;
        if !device_names(&self.buf).eq(self.names.iter().map(String::as_str)) {
            // A device came or went: list /sys/block now, and weigh the sources again (the
            // number of devices changed). `buf` still holds a diskstats read after.
            self.names = device_names(&self.buf).map(str::to_owned).collect();
            self.relist(true)?;
            if self.is_per_disk() {
                self.read_per_disk(out, true)?;
                return Ok(());
            }
        }
        let whole = match &self.source {
            Source::Diskstats(whole) => whole,
            _ => &WholeDisks::ByName,
        };
        let disks = parse_diskstats(&self.buf, whole, &self.filter)
            .with_context(|| format!("parsing {}", self.diskstats.path().display()))?;
        out.extend(disks.iter().flat_map(DiskCounters::samples));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATS: &str = "\
   7       0 loop0 10 0 20 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 254       0 vda 6520 2310 496430 3380 3210 2800 181298 4460 0 6168 8810 0 0 0 0 1410 970
 254       1 vda1 6400 2310 490000 3300 3210 2800 181298 4460 0 6100 8700 0 0 0 0 0 0
 259       0 nvme0n1 5 0 8 0 7 0 16 0 0 0 0
 259       1 nvme0n1p1 4 0 8 0 7 0 16 0 0 0 0
 179       0 mmcblk0 1 0 2 0 0 0 0 0 0 0 0
 179       1 mmcblk0p1 1 0 2 0 0 0 0 0 0 0 0
   9       0 md0 3 0 6 0 0 0 0 0 0 0 0
 253       0 dm-0 9 0 18 0 0 0 0 0 0 0 0
  11       0 sr0 1 0 2 0 0 0 0 0 0 0 0
";

    fn names(d: &[DiskCounters]) -> Vec<&str> {
        d.iter().map(|d| d.device.as_str()).collect()
    }

    #[test]
    fn by_name_keeps_whole_disks_only() {
        let d = parse_diskstats(STATS, &WholeDisks::ByName, &DeviceFilter::default_disks()).expect("parse");
        assert_eq!(names(&d), ["vda", "nvme0n1", "mmcblk0", "md0", "dm-0"]);
        assert_eq!(
            d[0],
            DiskCounters {
                device: "vda".into(),
                reads: 6520,
                read_bytes: 496_430 * 512,
                writes: 3210,
                write_bytes: 181_298 * 512
            }
        );
    }

    #[test]
    fn sysfs_list_is_authoritative() {
        let whole = WholeDisks::Sysfs(["vda", "loop0", "sr0"].map(String::from).into());
        let d = parse_diskstats(STATS, &whole, &DeviceFilter::default_disks()).expect("parse");
        assert_eq!(names(&d), ["vda"], "loop0 and sr0 are whole but excluded by default");
    }

    #[test]
    fn include_and_exclude_patterns_apply() {
        let filter = DeviceFilter {
            include: crate::filter::PatternList::new(["nvme*", "loop*"]),
            exclude: crate::filter::PatternList::default(),
        };
        let d = parse_diskstats(STATS, &WholeDisks::ByName, &filter).expect("parse");
        assert_eq!(names(&d), ["loop0", "nvme0n1"]);
    }

    #[test]
    fn hot_plugged_disk_appears_in_the_next_round() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("proc")).expect("mkdir");
        std::fs::create_dir_all(root.join("sys/block/vda")).expect("mkdir");
        let line_vda = " 254 0 vda 1 0 2 0 3 0 4 0 0 0 0\n";
        std::fs::write(root.join("proc/diskstats"), line_vda).expect("write");
        let mut c = DiskCollector::new(Host::new(root), DeviceFilter::default_disks());
        let mut out = Vec::new();
        c.collect(&mut out).expect("collect");
        assert_eq!(out.len(), 4);
        std::fs::create_dir_all(root.join("sys/block/vdb")).expect("mkdir");
        std::fs::write(root.join("proc/diskstats"), format!("{line_vda} 254 16 vdb 5 0 6 0 7 0 8 0 0 0 0\n"))
            .expect("write");
        out.clear();
        c.collect(&mut out).expect("collect");
        let devices: Vec<&str> = out.iter().map(|s| s.labels[0].1.as_str()).collect();
        assert_eq!(devices, ["vda", "vda", "vda", "vda", "vdb", "vdb", "vdb", "vdb"]);
    }

    #[test]
    fn malformed_line_is_an_error() {
        let e = parse_diskstats(
            "254 0 vda 1 0 2 0 3 0 4 0 0 0 0\n254 0 vdb x y\n",
            &WholeDisks::ByName,
            &DeviceFilter::default_disks(),
        )
        .expect_err("malformed");
        assert_eq!(
            e.to_string(),
            "line 2: expected \"MAJOR MINOR NAME\" and at least 11 counters (11, 15 or 17 by kernel version), \
             got \"254 0 vdb x y\""
        );
    }

    #[test]
    fn a_malformed_diskstats_line_is_named_in_our_words() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("proc")).expect("mkdir");
        let bad = " 254 1 vdb 1 2 x 4\n";
        std::fs::write(dir.path().join("proc/diskstats"), format!(" 254 0 vda 1 0 2 0 3 0 4 0 0 0 0\n{bad}"))
            .expect("write");
        // No /sys/block here: the collector reads /proc/diskstats.
        let mut c = DiskCollector::new(Host::new(dir.path()), DeviceFilter::default_disks());
        let err = c.collect(&mut Vec::new()).expect_err("malformed line");
        let msg = format!("{err:#}");
        assert!(!msg.contains("procfs bug"), "{msg}");
        let path = dir.path().join("proc/diskstats");
        assert!(msg.contains(&format!("parsing {}: line 2: expected", path.display())), "{msg}");
        assert!(msg.contains(&format!("{:?}", bad.trim_end_matches('\n'))), "{msg}");
    }

    #[test]
    fn block_stat_of_every_kernel_generation_parses() {
        let want = DiskCounters::from_sectors("vda".into(), 6520, 496_430, 3210, 181_298);
        // 17 fields (5.5+), 15 (4.18+), 11 (older), padded the way the kernel pads them.
        for text in [
            "    6520     2310   496430     3380     3210     2800   181298     4460        0     6168     8810        0        0        0        0     1410      970\n",
            "6520 2310 496430 3380 3210 2800 181298 4460 0 6168 8810 0 0 0 0\n",
            "6520 2310 496430 3380 3210 2800 181298 4460 0 6168 8810\n",
        ] {
            assert_eq!(parse_block_stat("vda", text).expect(text), want, "{text}");
        }
    }

    #[test]
    fn malformed_block_stat_says_what_was_expected() {
        let err = parse_block_stat("vda", "1 2 3 4\n").expect_err("too short");
        assert!(
            err.to_string().contains("expected at least 11 numbers") && err.to_string().contains("found 4"),
            "{err}"
        );
        let err = parse_block_stat("vda", "1 2 x 4 5 6 7 8 9 10 11\n").expect_err("not a number");
        assert!(err.to_string().contains("field 3 is \"x\""), "{err}");
        let err = parse_block_stat("vda", "").expect_err("empty");
        assert_eq!(err.to_string(), "expected at least 11 numbers (11, 15 or 17 by kernel version), found 0");
    }

    #[test]
    fn huge_sector_counts_wrap_like_the_kernel_counters() {
        let c = DiskCounters::from_sectors("vda".into(), 1, u64::MAX, 1, 1 << 56);
        assert_eq!((c.read_bytes, c.write_bytes), (u64::MAX.wrapping_mul(512), 0));
    }

    /// A host tree with /proc/diskstats holding `lines` and a /sys/block/NAME/stat for each
    /// whole disk in `whole` (the same counters as its diskstats line).
    fn write_tree(root: &std::path::Path, lines: &[&str], whole: &[&str]) {
        std::fs::create_dir_all(root.join("proc")).expect("mkdir");
        std::fs::write(root.join("proc/diskstats"), lines.concat()).expect("write diskstats");
        let _ = std::fs::remove_dir_all(root.join("sys/block"));
        for name in whole {
            let line = lines
                .iter()
                .find(|l| l.split_whitespace().nth(2) == Some(*name))
                .unwrap_or_else(|| panic!("no diskstats line for {name}"));
            let counters: Vec<&str> = line.split_whitespace().skip(3).collect();
            std::fs::create_dir_all(root.join("sys/block").join(name)).expect("mkdir");
            std::fs::write(root.join("sys/block").join(name).join("stat"), counters.join(" ") + "\n")
                .expect("write stat");
        }
    }

    fn devices(out: &[Sample]) -> Vec<&str> {
        out.iter().step_by(4).map(|s| s.labels[0].1.as_str()).collect()
    }

    const VDA: &str = " 254 0 vda 1 0 2 0 3 0 4 0 0 0 0\n";
    const VDA1: &str = " 254 1 vda1 1 0 2 0 3 0 4 0 0 0 0\n";
    const VDB: &str = " 254 16 vdb 5 0 6 0 7 0 8 0 0 0 0\n";
    const LOOPS: [&str; 3] = [
        " 7 0 loop0 0 0 0 0 0 0 0 0 0 0 0\n",
        " 7 1 loop1 0 0 0 0 0 0 0 0 0 0 0\n",
        " 7 2 loop2 0 0 0 0 0 0 0 0 0 0 0\n",
    ];

    #[test]
    fn few_disks_among_many_devices_are_read_from_their_stat_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        // vdb listed after vda in diskstats (the kernel's order), though it sorts first nowhere.
        let lines = [VDB, LOOPS[0], VDA, VDA1, LOOPS[1], LOOPS[2]];
        write_tree(root, &lines, &["vdb", "loop0", "vda", "loop1", "loop2"]);
        let mut c = DiskCollector::new(Host::new(root), DeviceFilter::default_disks());
        let mut out = Vec::new();
        c.collect(&mut out).expect("collect");
        assert!(c.is_per_disk(), "2 of 6 devices: {:?}", c.source);
        assert_eq!(devices(&out), ["vdb", "vda"], "diskstats order");
        let from_diskstats: Vec<Sample> =
            parse_diskstats(&lines.concat(), &WholeDisks::ByName, &DeviceFilter::default_disks())
                .expect("parse")
                .iter()
                .flat_map(DiskCounters::samples)
                .collect();
        assert_eq!(out, from_diskstats, "same names, labels, values and order as from /proc/diskstats");
        // The stat files are what is read now: diskstats going stale changes nothing.
        std::fs::write(root.join("proc/diskstats"), "").expect("empty diskstats");
        std::fs::write(root.join("sys/block/vda/stat"), "9 0 10 0 11 0 12 0 0 0 0\n").expect("write");
        out.clear();
        c.collect(&mut out).expect("collect");
        assert_eq!(out[4..], DiskCounters::from_sectors("vda".into(), 9, 10, 11, 12).samples());
    }

    #[test]
    fn per_disk_source_lists_sysfs_again_at_its_interval() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let mut lines = vec![VDA, VDA1, LOOPS[0], LOOPS[1], LOOPS[2]];
        write_tree(root, &lines, &["vda", "loop0", "loop1", "loop2"]);
        let host = Host::new(root);
        let mut slow = DiskCollector::new(host.clone(), DeviceFilter::default_disks());
        let mut fast = DiskCollector::new(host, DeviceFilter::default_disks()).relist_every(Duration::ZERO);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        slow.collect(&mut a).expect("collect");
        fast.collect(&mut b).expect("collect");
        assert_eq!((devices(&a), devices(&b)), (vec!["vda"], vec!["vda"]));
        // A disk is plugged in: seen at the next listing.
        lines.push(VDB);
        write_tree(root, &lines, &["vda", "loop0", "loop1", "loop2", "vdb"]);
        a.clear();
        b.clear();
        slow.collect(&mut a).expect("collect");
        fast.collect(&mut b).expect("collect");
        assert_eq!(devices(&a), ["vda"], "not listed again before {RELIST_EVERY:?}");
        assert_eq!(devices(&b), ["vda", "vdb"]);
        // And unplugged.
        lines.pop();
        write_tree(root, &lines, &["vda", "loop0", "loop1", "loop2"]);
        b.clear();
        fast.collect(&mut b).expect("collect");
        assert_eq!(devices(&b), ["vda"]);
    }

    #[test]
    fn missing_stat_file_of_a_listed_disk_fails_the_round_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let lines = [VDA, VDB, LOOPS[0], LOOPS[1], LOOPS[2]];
        write_tree(root, &lines, &["vda", "vdb", "loop0", "loop1", "loop2"]);
        std::fs::remove_file(root.join("sys/block/vdb/stat")).expect("rm");
        let mut c = DiskCollector::new(Host::new(root), DeviceFilter::default_disks());
        let mut out = Vec::new();
        let err = c.collect(&mut out).expect_err("vdb has no stat file");
        assert!(matches!(err, CollectError::Failed(_)), "a failed round, not an absent collector: {err}");
        assert!(format!("{err:#}").contains("sys/block/vdb/stat"), "{err:#}");
        assert_eq!(devices(&out), ["vda"], "the other disks are still reported");
        std::fs::write(root.join("sys/block/vdb/stat"), "x\n").expect("write");
        out.clear();
        let err = c.collect(&mut out).expect_err("vdb stat malformed");
        assert!(format!("{err:#}").contains("parsing") && format!("{err:#}").contains("vdb/stat"), "{err:#}");
    }

    #[test]
    fn most_devices_reported_reads_diskstats_and_follows_hotplug_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        write_tree(root, &[VDA, VDA1, VDB], &["vda", "vdb"]);
        let mut c = DiskCollector::new(Host::new(root), DeviceFilter::default_disks());
        let mut out = Vec::new();
        c.collect(&mut out).expect("collect");
        assert!(!c.is_per_disk(), "2 disks of 3 devices: diskstats is cheaper");
        assert_eq!(devices(&out), ["vda", "vdb"]);
        // diskstats is what is read: a stat file going stale changes nothing.
        std::fs::write(root.join("sys/block/vda/stat"), "9 0 10 0 11 0 12 0 0 0 0\n").expect("write");
        out.clear();
        c.collect(&mut out).expect("collect");
        assert_eq!(out[..4], DiskCounters::from_sectors("vda".into(), 1, 2, 3, 4).samples());
        // Many devices appear (loop devices set up): per-disk files become cheaper at once.
        let lines = [VDA, VDA1, VDB, LOOPS[0], LOOPS[1], LOOPS[2]];
        write_tree(root, &lines, &["vda", "vdb", "loop0", "loop1", "loop2"]);
        std::fs::write(root.join("sys/block/vda/stat"), "9 0 10 0 11 0 12 0 0 0 0\n").expect("write");
        out.clear();
        c.collect(&mut out).expect("collect");
        assert!(c.is_per_disk(), "{:?}", c.source);
        assert_eq!(devices(&out), ["vda", "vdb"]);
        assert_eq!(out[..4], DiskCounters::from_sectors("vda".into(), 9, 10, 11, 12).samples());
    }

    #[test]
    fn without_sysfs_partitions_are_told_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        write_tree(root, &[VDA, VDA1, VDB, LOOPS[0]], &[]);
        assert!(!root.join("sys").exists());
        let mut c = DiskCollector::new(Host::new(root), DeviceFilter::default_disks());
        let mut out = Vec::new();
        c.collect(&mut out).expect("collect");
        assert_eq!(devices(&out), ["vda", "vdb"]);
    }

    #[test]
    fn errors_name_the_file_and_quote_the_field() {
        // /proc/diskstats without /sys (by name).
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("proc")).expect("mkdir");
        std::fs::write(dir.path().join("proc/diskstats"), format!("{VDA} 254 16 vdb 5 0 six 0 7 0 8 0 0 0 0\n"))
            .expect("write");
        let mut c = DiskCollector::new(Host::new(dir.path()), DeviceFilter::default_disks());
        let e = format!("{:#}", c.collect(&mut Vec::new()).expect_err("bad diskstats line"));
        assert!(e.starts_with(&format!("parsing {}: ", dir.path().join("proc/diskstats").display())), "{e}");
        // A stat file: the file, the field number and what was there.
        let dir = tempfile::tempdir().expect("tempdir");
        write_tree(dir.path(), &[VDA, VDB, LOOPS[0], LOOPS[1], LOOPS[2]], &["vda", "vdb", "loop0", "loop1", "loop2"]);
        let stat = dir.path().join("sys/block/vdb/stat");
        std::fs::write(&stat, "5 0 6 0 7 0 eight 0 0 0 0\n").expect("write");
        let mut c = DiskCollector::new(Host::new(dir.path()), DeviceFilter::default_disks());
        let e = format!("{:#}", c.collect(&mut Vec::new()).expect_err("bad stat file"));
        assert_eq!(e, format!("parsing {}: field 7 is \"eight\", expected a number", stat.display()));
        std::fs::write(&stat, "5 0 6\n").expect("write");
        let e = format!("{:#}", c.collect(&mut Vec::new()).expect_err("short stat file"));
        assert_eq!(
            e,
            format!(
                "parsing {}: expected at least 11 numbers (11, 15 or 17 by kernel version), found 3",
                stat.display()
            )
        );
    }
}
