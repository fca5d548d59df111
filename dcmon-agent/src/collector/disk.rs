//! Per whole-disk I/O counters from /proc/diskstats.

use std::collections::HashSet;

use anyhow::Context as _;
use dcmon_common::{SECTOR_BYTES, collector_names};
use procfs_core::DiskStat;

use super::{CollectError, Collector};
use crate::batch::Sample;
use crate::config::DeviceFilter;
use crate::host::{Host, OpenFile};

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
    /// The four metrics of this disk.
    pub fn samples(&self) -> [Sample; 4] {
        let d = &self.device;
        [
            Sample::count("disk_reads_total", self.reads).label("device", d.as_str()),
            Sample::count("disk_read_bytes_total", self.read_bytes).label("device", d.as_str()),
            Sample::count("disk_writes_total", self.writes).label("device", d.as_str()),
            Sample::count("disk_write_bytes_total", self.write_bytes).label("device", d.as_str()),
        ]
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
/// (/proc/diskstats) into the counters of the whole disks that `filter` allows.
pub fn parse_diskstats(
    text: &str,
    whole: &WholeDisks,
    filter: &DeviceFilter,
) -> Result<Vec<DiskCounters>, procfs_core::ProcError> {
    let stats =
        text.lines().filter(|l| !l.trim().is_empty()).map(DiskStat::from_line).collect::<Result<Vec<_>, _>>()?;
    let names: HashSet<&str> = stats.iter().map(|s| s.name.as_str()).collect();
    Ok(stats
        .iter()
        .filter(|s| filter.allows(&s.name))
        .filter(|s| match whole {
            WholeDisks::Sysfs(set) => set.contains(&s.name),
            WholeDisks::ByName => !is_partition_by_name(&s.name, &names),
        })
        .map(|s| DiskCounters {
            device: s.name.clone(),
            reads: s.reads,
            read_bytes: s.sectors_read * SECTOR_BYTES,
            writes: s.writes,
            write_bytes: s.sectors_written * SECTOR_BYTES,
        })
        .collect())
}

fn is_partition_by_name(name: &str, all: &HashSet<&str>) -> bool {
    let stem = name.trim_end_matches(|c: char| c.is_ascii_digit());
    if stem.len() == name.len() {
        return false;
    }
    all.contains(stem) || stem.strip_suffix('p').is_some_and(|s| all.contains(s))
}

/// Per-disk reads, writes and bytes.
#[derive(Debug)]
pub struct DiskCollector {
    host: Host,
    filter: DeviceFilter,
    diskstats: OpenFile,
    buf: String,
    /// Device names of the last diskstats read, in order, and the whole disks among them:
    /// /sys/block is listed again only when this list changes (a disk came or went).
    names: Vec<String>,
    whole: WholeDisks,
}

impl DiskCollector {
    /// A collector reading `host`'s diskstats, reporting disks `filter` allows.
    pub fn new(host: Host, filter: DeviceFilter) -> Self {
        let diskstats = OpenFile::new(&host, "/proc/diskstats");
        Self { host, filter, diskstats, buf: String::new(), names: Vec::new(), whole: WholeDisks::ByName }
    }

    /// Whole-disk names from /sys/block.
    fn list_whole_disks(&self) -> WholeDisks {
        match std::fs::read_dir(self.host.path("/sys/block")) {
            Ok(dir) => {
                WholeDisks::Sysfs(dir.filter_map(Result::ok).filter_map(|e| e.file_name().into_string().ok()).collect())
            }
            Err(_) => WholeDisks::ByName,
        }
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

    /// procfs and sysfs are served from kernel memory: nothing here waits on a device.
    fn may_block(&self) -> bool {
        false
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        self.diskstats.read_into(&mut self.buf)?;
        if !device_names(&self.buf).eq(self.names.iter().map(String::as_str)) {
            self.names = device_names(&self.buf).map(str::to_owned).collect();
            self.whole = self.list_whole_disks();
        }
        let disks = parse_diskstats(&self.buf, &self.whole, &self.filter)
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
        assert!(parse_diskstats("254 0 vda x y\n", &WholeDisks::ByName, &DeviceFilter::default_disks()).is_err());
    }
}
