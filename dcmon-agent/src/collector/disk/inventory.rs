//! The host's whole disks as /sys/block lists them, shared by both disk collectors: each
//! disk's name, device number and whether it is request-based. Listed again at an interval to
//! find new disks, and at once when a collector finds a disk's file gone.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use dcmon_common::ebpf::DiskKey;

use crate::host::{Host, ReadError};

/// How often /sys/block is listed again to find disks that appeared. A disk that goes away is
/// noticed at once: reading one of its files fails, or (the eBPF collector, which reads no file
/// of an idle disk) its removal uevent arrives or [`DiskInventory::lost_a_disk`] misses it, and
/// the collector lists again.
pub const RELIST_EVERY: Duration = Duration::from_secs(10);

/// One whole disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disk {
    /// Its device number (/sys/block/X/dev); `None` where that file is missing or unreadable.
    pub key: Option<DiskKey>,
    /// Whether it completes a `struct request` per I/O (blk-mq: /sys/block/X/mq exists).
    /// Bio-based disks (device-mapper, md, zram, NVMe multipath heads) do not.
    pub request_based: bool,
}

/// The whole disks of a host, as last listed.
#[derive(Debug)]
pub struct DiskInventory {
    host: Host,
    /// `/sys/block` under the host root, made once: [`Self::lost_a_disk`] reads it every round.
    sys_block: std::path::PathBuf,
    /// By name, so iteration is in name order.
    disks: BTreeMap<String, Disk>,
    relist_every: Duration,
    /// When /sys/block was last listed; `None`: never.
    listed_at: Option<Instant>,
}

impl DiskInventory {
    /// The disks of `host`, not listed yet.
    pub fn new(host: Host) -> Self {
        let sys_block = host.path("/sys/block");
        Self { host, sys_block, disks: BTreeMap::new(), relist_every: RELIST_EVERY, listed_at: None }
    }

    /// List again every `every` (default [`RELIST_EVERY`]).
    pub fn set_relist_every(&mut self, every: Duration) {
        self.relist_every = every;
    }

    /// Whether the listing is due: never listed, or listed `relist_every` ago.
    pub fn is_due(&self) -> bool {
        self.listed_at.is_none_or(|t| t.elapsed() >= self.relist_every)
    }

    /// Lists /sys/block now. A disk listed before keeps its entry (a device number does not
    /// change while its name exists); a new one reads its device number and type. Returns
    /// the device numbers that no listed disk has any more, so that a disk reusing one can
    /// start from zero. On error (no /sys/block) the last listing is kept.
    pub fn relist(&mut self) -> Result<Vec<DiskKey>, ReadError> {
        self.listed_at = Some(Instant::now());
        let names = self.host.dir_names("/sys/block")?;
        let mut current = BTreeMap::new();
        for name in names {
            let disk = match self.disks.get(&name) {
                Some(known) if known.key.is_some() => *known,
                _ => Disk {
                    key: self.host.read_to_string(format!("/sys/block/{name}/dev")).ok().as_deref().and_then(parse_dev),
                    request_based: self.host.path(format!("/sys/block/{name}/mq")).exists(),
                },
            };
            current.insert(name, disk);
        }
        let gone = self
            .disks
            .values()
            .filter_map(|d| d.key)
            .filter(|key| !current.values().any(|d| d.key == Some(*key)))
            .collect();
        self.disks = current;
        Ok(gone)
    }

    /// The disks of the last listing, in name order.
    pub fn disks(&self) -> impl Iterator<Item = (&str, Disk)> {
        self.disks.iter().map(|(name, d)| (name.as_str(), *d))
    }

    /// Whether a disk of the last listing is missing from /sys/block now: one directory read,
    /// no file per disk, so a round can notice a removed disk without reading each disk's
    /// files. Disks that appeared are left for the next listing. False when /sys/block cannot
    /// be read (the collectors' reads of their files notice what they can then).
    pub fn lost_a_disk(&self) -> bool {
        let Ok(dir) = std::fs::read_dir(&self.sys_block) else { return false };
        let present = dir
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_str().is_some_and(|name| self.disks.contains_key(name)))
            .count();
        present < self.disks.len()
    }

    /// Whether the last listing had a disk named `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.disks.contains_key(name)
    }
}

/// `"259:0"` (/sys/block/X/dev) into a key.
fn parse_dev(text: &str) -> Option<DiskKey> {
    let (major, minor) = text.trim().split_once(':')?;
    Some(DiskKey::new(major.parse().ok()?, minor.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_numbers_parse() {
        assert_eq!(parse_dev("259:3\n"), Some(DiskKey::new(259, 3)));
        assert_eq!(parse_dev("x:3"), None);
        assert_eq!(parse_dev(""), None);
    }

    /// A /sys/block tree: each disk's name, `dev` contents (None: no file) and whether it has `mq`.
    fn write_sys_block(root: &std::path::Path, disks: &[(&str, Option<&str>, bool)]) {
        let _ = std::fs::remove_dir_all(root.join("sys/block"));
        for (name, dev, mq) in disks {
            let dir = root.join("sys/block").join(name);
            std::fs::create_dir_all(&dir).expect("mkdir");
            if let Some(dev) = dev {
                std::fs::write(dir.join("dev"), format!("{dev}\n")).expect("write dev");
            }
            if *mq {
                std::fs::create_dir_all(dir.join("mq")).expect("mkdir mq");
            }
        }
    }

    #[test]
    fn lists_numbers_and_types_and_reports_numbers_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        write_sys_block(root, &[("vda", Some("254:0"), true), ("dm-0", Some("253:0"), false), ("odd", None, true)]);
        let mut inventory = DiskInventory::new(Host::new(root));
        assert!(inventory.is_due(), "never listed");
        assert_eq!(inventory.relist().expect("list"), []);
        assert!(!inventory.is_due(), "just listed, relisted every {RELIST_EVERY:?}");
        let disks: Vec<(&str, Disk)> = inventory.disks().collect();
        assert_eq!(
            disks,
            [
                ("dm-0", Disk { key: Some(DiskKey::new(253, 0)), request_based: false }),
                ("odd", Disk { key: None, request_based: true }),
                ("vda", Disk { key: Some(DiskKey::new(254, 0)), request_based: true }),
            ]
        );
        // dm-0 removed, vda renamed vdb (same number), odd's number readable now.
        write_sys_block(root, &[("vdb", Some("254:0"), true), ("odd", Some("7:9"), true)]);
        assert_eq!(inventory.relist().expect("list"), [DiskKey::new(253, 0)], "only dm-0's number is gone");
        assert!(!inventory.contains("vda") && inventory.contains("vdb"));
        let odd: Vec<Disk> = inventory.disks().filter(|(n, _)| *n == "odd").map(|(_, d)| d).collect();
        assert_eq!(
            odd,
            [Disk { key: Some(DiskKey::new(7, 9)), request_based: true }],
            "a missing number is read again"
        );
        // Nothing gone since: no disk lost. A disk that appeared is not a loss either.
        assert!(!inventory.lost_a_disk());
        write_sys_block(root, &[("vdb", Some("254:0"), true), ("odd", Some("7:9"), true), ("new", Some("7:1"), true)]);
        assert!(!inventory.lost_a_disk(), "a disk appeared, none lost");
        write_sys_block(root, &[("odd", Some("7:9"), true), ("new", Some("7:1"), true)]);
        assert!(inventory.lost_a_disk(), "vdb removed");
        write_sys_block(root, &[("vdb", Some("254:0"), true), ("odd", Some("7:9"), true)]);
        // No /sys/block: an error naming it, and the last listing kept.
        std::fs::remove_dir_all(root.join("sys")).expect("rm");
        let err = inventory.relist().expect_err("no /sys/block");
        assert!(err.to_string().contains(&root.join("sys/block").display().to_string()), "{err}");
        assert!(inventory.contains("vdb"));
        assert!(!inventory.lost_a_disk(), "no /sys/block to read: left to the reads of the disks' files");
    }
}
