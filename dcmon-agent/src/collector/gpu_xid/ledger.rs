//! The XID counts: observations from the two sources, the same XID seen by both counted once,
//! and the state kept across restarts within one boot.
//!
//! Matching: an NVML event and a kernel-log line with the same GPU and code whose times are at
//! most [`MATCH_WINDOW_US`] apart are one XID, paired one to one, nearest first. The times
//! compared are on one clock: a line read while following the log and an NVML event are both
//! stamped when the agent receives them (CLOCK_MONOTONIC; each source delivers within
//! milliseconds). The lines read from the ring buffer at start are of the past: they are
//! matched only with the NVML events of the agent's previous run (kept in the state file),
//! by the kernel's own timestamp, which is microseconds since boot like CLOCK_MONOTONIC.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::batch::Sample;

/// How far apart in time the two sources' sightings of one XID may be.
pub const MATCH_WINDOW_US: u64 = 10_000_000;

/// How long a sighting not yet matched waits for the other source's.
const UNMATCHED_KEEP_US: u64 = 120_000_000;

/// The most sightings waiting for a match, per source (an XID storm keeps the newest).
const UNMATCHED_CAP: usize = 1024;

/// The largest state file read (a few GPUs' counts and labels take a few KiB).
const STATE_FILE_LIMIT: u64 = 1 << 20;

/// A GPU's PCI address: domain, bus and device (GPUs are function 0, and the kernel log omits
/// the function).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PciAddr {
    /// PCI domain (segment).
    pub domain: u32,
    /// Bus number.
    pub bus: u8,
    /// Device number.
    pub device: u8,
}

impl PciAddr {
    /// `0000:18:00` (kernel log), `00000000:18:00.0` (NVML, nvidia-smi), `0000:3b:00.0`
    /// (sysfs), with or without a `PCI:` prefix, any case.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let text = text.strip_prefix("PCI:").unwrap_or(text);
        let mut parts = text.split(':');
        let (domain, bus, devfn) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || domain.len() > 8 || bus.len() > 2 {
            return None;
        }
        let device = devfn.split_once('.').map_or(devfn, |(d, _function)| d);
        if device.len() > 2 {
            return None;
        }
        Some(Self {
            domain: u32::from_str_radix(domain, 16).ok()?,
            bus: u8::from_str_radix(bus, 16).ok()?,
            device: u8::from_str_radix(device, 16).ok()?,
        })
    }
}

impl fmt::Display for PciAddr {
    /// NVML's form, `00000000:18:00.0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}:{:02X}:{:02X}.0", self.domain, self.bus, self.device)
    }
}

/// The labels of a GPU, as the NVIDIA collector reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuIdentity {
    /// NVML index (`gpu`).
    pub index: u32,
    /// Product name (`model`).
    pub model: String,
    /// NVML's PCI bus id (`bus_id`).
    pub bus_id: String,
    /// `GPU-…` (`uuid`).
    pub uuid: String,
}

/// Where an XID was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// The kernel log (/dev/kmsg).
    Kmsg,
    /// An NVML XID event.
    Nvml,
}

/// One sighting of an XID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sighting {
    /// Which source.
    pub source: Source,
    /// The GPU.
    pub gpu: PciAddr,
    /// The XID code.
    pub xid: u32,
    /// Microseconds: CLOCK_MONOTONIC at receipt when `live`, else the kernel's timestamp (a
    /// line from the ring at start) or the receipt time in the previous run (an NVML event).
    pub at_us: u64,
    /// Received while this run followed its source, as opposed to read from the ring at start
    /// or kept from the previous run.
    pub live: bool,
}

/// What is kept across restarts.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// /proc/sys/kernel/random/boot_id when this was saved: counts are of one boot.
    boot_id: String,
    /// The last kernel-log record counted (its sequence number, unique within a boot).
    last_kmsg_seq: Option<u64>,
    /// (GPU, XID) → count.
    counts: Vec<(PciAddr, u32, u64)>,
    /// The GPUs' labels, so a restart while NVML hangs keeps them.
    gpus: Vec<GpuIdentity>,
    /// NVML events not matched yet: a line of the same XID may still be in the ring.
    unmatched_nvml: Vec<Sighting>,
}

/// The counts, the sightings waiting for a match, and the state file.
#[derive(Debug)]
pub struct Ledger {
    path: Option<PathBuf>,
    boot_id: String,
    last_kmsg_seq: Option<u64>,
    counts: BTreeMap<(PciAddr, u32), u64>,
    gpus: BTreeMap<PciAddr, GpuIdentity>,
    unmatched: VecDeque<Sighting>,
    dirty: bool,
}

impl Ledger {
    /// The ledger of boot `boot_id`, kept in `path`: the saved counts when the file is of the
    /// same boot, none on a new boot or a first start. An unreadable or corrupt file is logged,
    /// naming it, and counting starts afresh. Without a path or a boot id nothing is kept.
    pub fn load(path: Option<&Path>, boot_id: Option<&str>) -> Self {
        let (path, boot_id) = match (path, boot_id) {
            (Some(path), Some(boot_id)) => (Some(path.to_owned()), boot_id.to_owned()),
            _ => (None, String::new()),
        };
        let state = match path.as_deref().map(|p| (p, crate::secure_file::read(p, STATE_FILE_LIMIT))) {
            None => State::default(),
            Some((_, Ok((bytes, _)))) => serde_json::from_slice::<State>(&bytes).unwrap_or_else(|e| {
                let path = path.as_deref().unwrap_or(Path::new("")).display();
                tracing::warn!("{path}: not a GPU XID state file ({e}); counting XIDs afresh");
                State::default()
            }),
            Some((_, Err(e))) if e.is_not_found() => State::default(),
            Some((p, Err(e))) => {
                tracing::warn!("{}: {e}; counting XIDs afresh", p.display());
                State::default()
            }
        };
        let same_boot = path.is_some() && state.boot_id == boot_id;
        let mut ledger = Self {
            path,
            boot_id,
            last_kmsg_seq: None,
            counts: BTreeMap::new(),
            gpus: state.gpus.into_iter().filter_map(|g| Some((PciAddr::parse(&g.bus_id)?, g))).collect(),
            unmatched: VecDeque::new(),
            dirty: false,
        };
        if same_boot {
            ledger.last_kmsg_seq = state.last_kmsg_seq;
            ledger.counts = state.counts.into_iter().map(|(gpu, xid, n)| ((gpu, xid), n)).collect();
            ledger.unmatched = state.unmatched_nvml.into_iter().map(|s| Sighting { live: false, ..s }).collect();
        }
        ledger
    }

    /// The GPUs NVML enumerated: their labels (saved with the next count, so a host without
    /// XIDs writes no state file).
    pub fn set_gpus(&mut self, gpus: Vec<GpuIdentity>) {
        self.gpus.extend(gpus.into_iter().filter_map(|g| Some((PciAddr::parse(&g.bus_id)?, g))));
    }

    /// Count a kernel-log record `seq` unless an earlier run counted it (the ring is read
    /// from its start at each launch) or an NVML event of the same XID was counted.
    pub fn kmsg(&mut self, seq: u64, sighting: Sighting) {
        if self.last_kmsg_seq.is_some_and(|last| seq <= last) {
            return;
        }
        self.last_kmsg_seq = Some(seq);
        self.dirty = true;
        self.sight(sighting);
    }

    /// Count an NVML event unless a kernel-log line of the same XID was counted.
    pub fn nvml(&mut self, sighting: Sighting) {
        self.sight(sighting);
    }

    fn sight(&mut self, new: Sighting) {
        self.dirty = true;
        let partner = self
            .unmatched
            .iter()
            .enumerate()
            .filter(|(_, s)| s.source != new.source && s.gpu == new.gpu && s.xid == new.xid && s.live == new.live)
            .map(|(i, s)| (i, s.at_us.abs_diff(new.at_us)))
            .filter(|&(_, gap)| gap <= MATCH_WINDOW_US)
            .min_by_key(|&(_, gap)| gap);
        if let Some((i, _)) = partner {
            self.unmatched.remove(i);
            return;
        }
        *self.counts.entry((new.gpu, new.xid)).or_insert(0) += 1;
        // A line of the past can only be matched by the previous run's events, all loaded
        // already: it waits for nothing.
        if new.live || new.source == Source::Nvml {
            self.unmatched.push_back(new);
            if self.unmatched.iter().filter(|s| s.source == new.source).count() > UNMATCHED_CAP
                && let Some(oldest) = self.unmatched.iter().position(|s| s.source == new.source)
            {
                self.unmatched.remove(oldest);
            }
        }
    }

    /// Forget the live sightings too old to be matched (`now_us` on CLOCK_MONOTONIC).
    pub fn prune(&mut self, now_us: u64) {
        let before = self.unmatched.len();
        self.unmatched.retain(|s| !s.live || s.at_us.saturating_add(UNMATCHED_KEEP_US) >= now_us);
        self.dirty |= self.unmatched.len() != before;
    }

    /// Forget the previous run's events: the ring has been read, nothing of the past is left
    /// to match them.
    pub fn past_read(&mut self) {
        let before = self.unmatched.len();
        self.unmatched.retain(|s| s.live);
        self.dirty |= self.unmatched.len() != before;
    }

    /// XIDs counted for (GPU, code).
    pub fn count(&self, gpu: PciAddr, xid: u32) -> u64 {
        self.counts.get(&(gpu, xid)).copied().unwrap_or(0)
    }

    /// `gpu_xid_errors_total` per GPU and code: the NVIDIA collector's GPU labels where the
    /// GPU is known, else `bus_id` alone.
    pub fn samples(&self) -> Vec<Sample> {
        self.counts
            .iter()
            .map(|(&(addr, xid), &n)| {
                let sample = Sample::count("gpu_xid_errors_total", n);
                let sample = match self.gpus.get(&addr) {
                    Some(g) => sample
                        .label("gpu", g.index.to_string())
                        .label("model", g.model.as_str())
                        .label("bus_id", g.bus_id.as_str())
                        .label("uuid", g.uuid.as_str()),
                    None => sample.label("bus_id", addr.to_string()),
                };
                sample.label("xid", xid.to_string())
            })
            .collect()
    }

    /// Save the state if it changed since the last save.
    pub fn save_if_changed(&mut self) -> Result<(), String> {
        let Some(path) = self.path.as_deref().filter(|_| self.dirty) else { return Ok(()) };
        let state = State {
            boot_id: self.boot_id.clone(),
            last_kmsg_seq: self.last_kmsg_seq,
            counts: self.counts.iter().map(|(&(gpu, xid), &n)| (gpu, xid, n)).collect(),
            gpus: self.gpus.values().cloned().collect(),
            unmatched_nvml: self.unmatched.iter().filter(|s| s.source == Source::Nvml).copied().collect(),
        };
        let bytes = serde_json::to_vec(&state).map_err(|e| format!("GPU XID state: {e}"))?;
        crate::secure_file::write_replacing(path, &bytes)?;
        self.dirty = false;
        Ok(())
    }
}
