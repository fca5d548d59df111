//! Kernel counters from BPF programs: the programs count disk and network I/O in arrays laid
//! out per CPU, indexed by CPU and the slot the agent gives each disk and interface,
//! and [`Probes`] loads them, attaches them and reads the maps. A library: it knows nothing of
//! collectors or the config (the collectors that report these counters are
//! `collector::disk::ebpf` and `collector::net::ebpf`).
//!
//! - [`btf`]: field offsets from the running kernel's BTF.
//! - [`load`]: loading the embedded object, attaching, classifying failures.
//! - [`maps`]: updates, program counters, the possible CPU ids.
//! - [`mapped`]: the arrays mapped into the agent's memory, read with no syscall.
//! - [`link_events`]: interface changes from rtnetlink, so interfaces are re-listed only then.
//! - [`slots`]: the slot tables that give each disk and interface its slot.

pub mod btf;
pub mod link_events;
pub mod load;
pub mod mapped;
pub mod maps;
pub mod slots;

use std::os::fd::{AsFd as _, BorrowedFd};
use std::sync::Mutex;

use anyhow::{Context as _, anyhow};
use aya::Ebpf;
use aya::maps::Map;
use dcmon_common::ebpf::{
    DISK_LAT_MAP, DISK_MAP, DISK_SLOT_MAP, DISK_SLOTS, DiskKey, DiskSlot, DiskValue, DropCounts, IssueStamps, LAT_OPS,
    LatencyHist, NET_DROP_MAP, NET_DROP_SLOTS, NET_MAP, NET_SLOT_MAP, NetKey, NetSlot, NetValue, OOM_MAP,
    OOM_TOTAL_MAP, PROG_BLOCK_RQ_COMPLETE, PROG_BLOCK_RQ_ISSUE, PROGRAMS, TCP_MAP, TcpCounts, TimedRequests,
};

pub use load::{LoadError, Reason};

/// The loaded and attached programs and their maps. Dropping it detaches everything.
#[derive(Debug)]
pub struct Probes {
    ebpf: Mutex<Ebpf>,
    /// The counters laid out per CPU (DCMON_DISK, DCMON_NET), mapped once after the load.
    disk: mapped::MappedPerCpuArray<DiskValue>,
    net: mapped::MappedPerCpuArray<NetValue>,
    /// The arrays shared by all CPUs (DCMON_DISK_LAT, DCMON_NET_DROP, DCMON_OOM_TOTAL,
    /// DCMON_TCP), mapped once after the load.
    disk_lat: mapped::MappedArray<LatencyHist>,
    net_drop: mapped::MappedArray<DropCounts>,
    oom_total: mapped::MappedArray<u64>,
    tcp: mapped::MappedArray<TcpCounts>,
    disk_slots: Mutex<slots::SlotTable<u32>>,
    net_slots: Mutex<slots::SlotTable<NetKey>>,
    /// Label of each drop reason counter (see [`load::DropReasonNames`]).
    drop_reasons: load::DropReasonNames,
    /// Optional programs that could not be loaded, with why.
    failed: Vec<(&'static str, String)>,
    /// Where the I/O latency programs take issue times from.
    issue_stamps: IssueStamps,
}

/// Per-program counters from `kernel.bpf_stats_enabled`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramStats {
    /// Program name (see `dcmon_common::ebpf::PROGRAMS`).
    pub program: &'static str,
    /// Times the program ran since it was loaded.
    pub run_count: u64,
    /// Total time it ran, in nanoseconds.
    pub run_time_ns: u64,
    /// Events skipped because the program was already running on that CPU (not gated by
    /// `bpf_stats_enabled`); `None` where the kernel does not report it.
    pub recursion_misses: Option<u64>,
}

/// Give the heap freed after the load back to the kernel. Parsing the kernel's BTF (several MB,
/// in many small allocations) leaves freed but mapped heap that glibc would otherwise keep for
/// the agent's whole life.
fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// [`LatencyTiming`] of path `stamps` with the programs `failed` left out.
fn latency_timing(stamps: IssueStamps, failed: &[(&'static str, String)]) -> LatencyTiming {
    let why = |program: &str| failed.iter().find(|(p, _)| *p == program).map(|(_, why)| why.clone());
    LatencyTiming { stamps, complete_left_out: why(PROG_BLOCK_RQ_COMPLETE), issue_left_out: why(PROG_BLOCK_RQ_ISSUE) }
}

/// The log line for a program that could not be loaded, `timing` being what the I/O latency
/// programs time on this load. `check` shows these on lines of their own and recognises them
/// among the other warnings by their start, [`left_out_start`].
pub fn left_out_message(program: &str, why: &str, timing: &LatencyTiming) -> String {
    format!("{}{}: {why}", left_out_start(program), left_out_loss(program, Some(timing)))
}

/// How [`left_out_message`] starts for `program`.
pub fn left_out_start(program: &str) -> String {
    format!("eBPF program {program} not loaded, ")
}

/// What the agent goes without when `program` is left out: its metrics, but for
/// `block_rq_issue`, which only stamps requests for `block_rq_complete`: while that one is
/// attached, the requests the kernel stamps itself are still timed. `timing`: what the I/O
/// latency programs time (None where no collector reads them).
pub fn left_out_loss(program: &str, timing: Option<&LatencyTiming>) -> &'static str {
    let timed =
        timing.filter(|t| program == PROG_BLOCK_RQ_ISSUE && t.complete_left_out.is_none()).map(LatencyTiming::timed);
    match timed {
        Some(TimedRequests::KernelStamped) => {
            "the latency of requests the kernel does not stamp itself is not measured (see the I/O latency line)"
        }
        Some(TimedRequests::Nothing) => "no I/O latency is measured (see the I/O latency line)",
        _ => "its metrics are absent",
    }
}

/// What the I/O latency histograms time on a load: where issue times come from, and why
/// `block_rq_complete` or `block_rq_issue` is not attached where one is not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencyTiming {
    /// Where issue times come from.
    pub stamps: IssueStamps,
    /// Why `block_rq_complete` is not attached (then nothing is timed); None when it is.
    pub complete_left_out: Option<String>,
    /// Why `block_rq_issue` is not attached; None when it is.
    pub issue_left_out: Option<String>,
}

impl LatencyTiming {
    /// Which requests are timed.
    pub fn timed(&self) -> TimedRequests {
        if self.complete_left_out.is_some() {
            return TimedRequests::Nothing;
        }
        self.stamps.timed(self.issue_left_out.is_none())
    }

    /// What the log line at load and `check` say: which requests are timed, and from where.
    pub fn describe(&self) -> String {
        match (self.timed(), &self.complete_left_out, &self.issue_left_out) {
            (_, Some(why), _) => format!("not timed: {PROG_BLOCK_RQ_COMPLETE} did not load: {why}"),
            (TimedRequests::All, _, _) => format!("issue times from {}", self.stamps.describe()),
            (TimedRequests::KernelStamped, _, why) => format!(
                "only requests the kernel stamps itself are timed (io_start_time_ns, on queues with \
                 QUEUE_FLAG_STATS, which writeback throttling turns on); those of other queues are not, \
                 as {PROG_BLOCK_RQ_ISSUE} did not load: {}",
                why.as_deref().unwrap_or_default()
            ),
            (TimedRequests::Nothing, _, why) => format!(
                "not timed: the kernel's own issue stamps are not used on this load (no io_start_time_ns \
                 in its BTF, or turned off), so issue times come only from the programs' stamp table, \
                 which {PROG_BLOCK_RQ_ISSUE} fills, and it did not load: {}",
                why.as_deref().unwrap_or_default()
            ),
        }
    }
}

/// Maps array `name` of the loaded object read-only, at the length and value size it was
/// loaded with.
fn map_shared<V: aya::Pod + Default>(ebpf: &Ebpf, name: &str) -> Result<mapped::MappedArray<V>, LoadError> {
    let error = |detail: String| LoadError { reason: Reason::Other, detail };
    let Some(Map::Array(data)) = ebpf.map(name) else {
        return Err(error(format!("BPF map {name} is not an array in the loaded object")));
    };
    let info = data.info().map_err(|e| error(format!("BPF map {name}: {e}")))?;
    mapped::MappedArray::new(name, data.fd().as_fd(), info.max_entries(), info.value_size(), info.map_flags())
        .map_err(|e| error(format!("mapping the shared array: {e}")))
}

/// Maps array `name`, laid out per CPU for the CPU ids `cpus`, read-only.
fn map_per_cpu<V: aya::Pod + Default>(
    ebpf: &Ebpf,
    name: &str,
    cpus: &[u32],
) -> Result<mapped::MappedPerCpuArray<V>, LoadError> {
    mapped::MappedPerCpuArray::new(name, map_shared(ebpf, name)?, cpus.to_vec())
        .map_err(|e| LoadError { reason: Reason::Other, detail: e.to_string() })
}

impl Probes {
    /// Loads the embedded object and attaches every program, counting the interfaces of
    /// network namespace `netns` (its inode number; None: every namespace).
    pub fn attach(netns: Option<u32>) -> Result<Self, LoadError> {
        Self::attach_with_btf(std::path::Path::new(load::VMLINUX_BTF), netns)
    }

    /// [`Probes::attach`] with the kernel's BTF read from `btf_path`.
    pub fn attach_with_btf(btf_path: &std::path::Path, netns: Option<u32>) -> Result<Self, LoadError> {
        Self::attach_with(btf_path, netns, load::KernelStamps::Use)
    }

    /// [`Probes::attach_with_btf`], choosing whether the I/O latency programs may take the
    /// kernel's own issue stamps.
    pub fn attach_with(
        btf_path: &std::path::Path,
        netns: Option<u32>,
        kernel_stamps: load::KernelStamps,
    ) -> Result<Self, LoadError> {
        let load::Attached { ebpf, drop_reasons, failed, issue_stamps } =
            load::load_and_attach(btf_path, load::OBJECT, netns, kernel_stamps)?;
        let failed: Vec<(&'static str, String)> = failed.into_iter().map(|(p, e)| (p, e.to_string())).collect();
        let timing = latency_timing(issue_stamps, &failed);
        for (program, why) in &failed {
            tracing::warn!("{}", left_out_message(program, why, &timing));
        }
        if timing.complete_left_out.is_none() {
            // Info, not a warning: a program left out is warned about above already.
            tracing::info!("I/O latency: {}", timing.describe());
        }
        release_freed_heap();
        let cpus = maps::possible_cpu_ids()
            .map_err(|e| LoadError { reason: Reason::Other, detail: format!("listing possible CPUs: {e}") })?;
        let disk = map_per_cpu(&ebpf, DISK_MAP, &cpus)?;
        if disk.slots() != DISK_SLOTS {
            return Err(LoadError {
                reason: Reason::Other,
                detail: format!("BPF map {DISK_MAP}: {} slots a CPU as loaded, expected {DISK_SLOTS}", disk.slots()),
            });
        }
        let net = map_per_cpu(&ebpf, NET_MAP, &cpus)?;
        // The slot table follows the lengths the maps were loaded with (see load::load_object_with).
        let table_length = match ebpf.map(NET_SLOT_MAP) {
            Some(Map::Array(data)) => data
                .info()
                .map(|info| info.max_entries())
                .map_err(|e| LoadError { reason: Reason::Other, detail: format!("BPF map {NET_SLOT_MAP}: {e}") }),
            _ => Err(LoadError { reason: Reason::Other, detail: format!("BPF map {NET_SLOT_MAP} is not an array") }),
        }?;
        let net_slots = slots::net_slots(net.slots(), table_length);
        let disk_lat = map_shared(&ebpf, DISK_LAT_MAP)?;
        let net_drop = map_shared(&ebpf, NET_DROP_MAP)?;
        let oom_total = map_shared(&ebpf, OOM_TOTAL_MAP)?;
        let tcp = map_shared(&ebpf, TCP_MAP)?;
        Ok(Self {
            ebpf: Mutex::new(ebpf),
            disk,
            net,
            disk_lat,
            net_drop,
            oom_total,
            tcp,
            disk_slots: Mutex::new(slots::disk_slots()),
            net_slots: Mutex::new(net_slots),
            drop_reasons,
            failed,
            issue_stamps,
        })
    }

    /// Runs `f` with the file descriptor of map `name` of the loaded object (tests read and
    /// write the maps through it with [`maps::lookup`] and [`maps::update`]).
    pub fn with_map_fd<T>(
        &self,
        name: &str,
        f: impl FnOnce(BorrowedFd<'_>) -> std::io::Result<T>,
    ) -> anyhow::Result<T> {
        let ebpf = self.ebpf.lock().map_err(|_| anyhow!("eBPF state poisoned by an earlier panic"))?;
        match ebpf.map(name) {
            Some(Map::PerCpuArray(data) | Map::Array(data) | Map::LruHashMap(data)) => {
                f(data.fd().as_fd()).with_context(|| format!("BPF map {name}"))
            }
            Some(_) => Err(anyhow!("BPF map {name} is not of a type the agent reads")),
            None => Err(anyhow!("BPF map {name} is not in the loaded object")),
        }
    }

    /// The slot of disk `key` (its counters and latency histograms), given it now if it has
    /// none: None when every slot is taken (its I/O is then counted in the overflow slot).
    pub fn disk_slot(&self, key: DiskKey) -> anyhow::Result<Option<u32>> {
        let mut table = self.disk_slots.lock().map_err(|_| anyhow!("disk slots poisoned by an earlier panic"))?;
        if let Some(slot) = table.slot_of(key.dev) {
            return Ok(Some(slot));
        }
        let Some((index, slot)) = table.assign(key.dev) else { return Ok(None) };
        let entry = DiskSlot { dev: key.dev, slot };
        if let Err(e) = self.with_map_fd(DISK_SLOT_MAP, |fd| maps::update(fd, &index, &entry)) {
            table.release(key.dev);
            return Err(e);
        }
        Ok(Some(slot))
    }

    /// The slot of interface `key` (its counters and drops), given it now if it has none: None
    /// when every slot is taken (its packets are then counted in the overflow slot).
    pub fn net_slot(&self, key: NetKey) -> anyhow::Result<Option<u32>> {
        let mut table = self.net_slots.lock().map_err(|_| anyhow!("interface slots poisoned by an earlier panic"))?;
        if let Some(slot) = table.slot_of(key) {
            return Ok(Some(slot));
        }
        let Some((index, slot)) = table.assign(key) else { return Ok(None) };
        let entry = NetSlot { key, slot };
        if let Err(e) = self.with_map_fd(NET_SLOT_MAP, |fd| maps::update(fd, &index, &entry)) {
            table.release(key);
            return Err(e);
        }
        Ok(Some(slot))
    }

    /// The interface slots, the overflow and no-device slots included: the counters' length as
    /// loaded for this host's possible CPUs (`dcmon_common::ebpf::net_slots_for`).
    pub fn net_slot_count(&self) -> anyhow::Result<u32> {
        let table = self.net_slots.lock().map_err(|_| anyhow!("interface slots poisoned by an earlier panic"))?;
        Ok(table.slot_count())
    }

    /// Takes interface `key`'s slot back (it is gone).
    pub fn release_net_slot(&self, key: NetKey) -> anyhow::Result<()> {
        let mut table = self.net_slots.lock().map_err(|_| anyhow!("interface slots poisoned by an earlier panic"))?;
        if let Some(index) = table.release(key) {
            self.with_map_fd(NET_SLOT_MAP, |fd| maps::update(fd, &index, &NetSlot::default()))?;
        }
        Ok(())
    }

    /// The drop counts of interface slot `slot` by reason value since the programs were loaded
    /// (none for a slot without drop counters: its drops are counted in the overflow slot).
    pub fn net_drops(&self, slot: u32) -> anyhow::Result<DropCounts> {
        Ok(self.net_drop.get(slot).unwrap_or_default())
    }

    /// The drop counts of every interface slot handed out below `NET_DROP_SLOTS` and of the
    /// slots below them (the overflow and no-device slots first), indexed by slot: read from
    /// the mapping of the array's prefix, no syscall.
    pub fn net_drops_all(&self) -> anyhow::Result<Vec<DropCounts>> {
        let mut out = Vec::new();
        self.net_drops_all_into(&mut out)?;
        Ok(out)
    }

    /// [`Probes::net_drops_all`] into `out`, reusing its memory (a collector's every round).
    pub fn net_drops_all_into(&self, out: &mut Vec<DropCounts>) -> anyhow::Result<()> {
        let end = self.net_slots.lock().map_err(|_| anyhow!("interface slots poisoned by an earlier panic"))?.end();
        // Only the low slots have drop counters (higher ones count their drops in the overflow).
        let end = end.min(NET_DROP_SLOTS);
        self.net_drop.prefix_into(end as usize, out);
        Ok(())
    }

    /// Whether program `name` is loaded and attached.
    pub fn attached(&self, name: &str) -> bool {
        !self.failed.iter().any(|(p, _)| *p == name)
    }

    /// Ok when every one of `programs` is attached, else which are not and why.
    pub fn counts(&self, programs: &[&str]) -> Result<(), String> {
        let missing: Vec<String> =
            self.failed.iter().filter(|(p, _)| programs.contains(p)).map(|(_, why)| why.clone()).collect();
        if missing.is_empty() { Ok(()) } else { Err(missing.join("; ")) }
    }

    /// The optional programs that could not be loaded, with why.
    pub fn failed_programs(&self) -> &[(&'static str, String)] {
        &self.failed
    }

    /// Where the I/O latency programs take issue times from.
    pub fn issue_stamps(&self) -> IssueStamps {
        self.issue_stamps
    }

    /// What the I/O latency histograms time with the programs attached here.
    pub fn latency_timing(&self) -> LatencyTiming {
        latency_timing(self.issue_stamps, &self.failed)
    }

    /// OOM kills of every memory cgroup together since the programs were loaded, read from the
    /// mapping (no syscall): the sum of [`Probes::oom_kills`]'s counts once that has caught up.
    pub fn oom_kill_total(&self) -> u64 {
        self.oom_total.get(0).unwrap_or_default()
    }

    /// OOM kills per victim memory cgroup id since the programs were loaded: a walk of the
    /// hash map, whose every step scans its buckets (see [`Probes::oom_kill_total`]).
    pub fn oom_kills(&self) -> anyhow::Result<Vec<(u64, u64)>> {
        let ebpf = self.ebpf.lock().map_err(|_| anyhow!("eBPF state poisoned by an earlier panic"))?;
        let map = ebpf.map(OOM_MAP).ok_or_else(|| anyhow!("BPF map {OOM_MAP} is not in the loaded object"))?;
        let map = aya::maps::HashMap::<_, u64, u64>::try_from(map)?;
        map.iter().map(|entry| entry.with_context(|| format!("reading BPF map {OOM_MAP}"))).collect()
    }

    /// The TCP retransmit and reset counters since the programs were loaded, read from the
    /// mapping (no syscall).
    pub fn tcp_counts(&self) -> anyhow::Result<TcpCounts> {
        Ok(self.tcp.get(0).unwrap_or_default())
    }

    /// The label of drop reason counter `index`: the running kernel's name for that value.
    pub fn drop_reason_name(&self, index: usize) -> Option<&str> {
        self.drop_reasons.get(index).map(String::as_str)
    }

    /// Takes disk `key`'s slot back (the disk is gone), so another disk can have it.
    pub fn release_disk_slot(&self, key: DiskKey) -> anyhow::Result<()> {
        let mut table = self.disk_slots.lock().map_err(|_| anyhow!("disk slots poisoned by an earlier panic"))?;
        if let Some(index) = table.release(key.dev) {
            self.with_map_fd(DISK_SLOT_MAP, |fd| maps::update(fd, &index, &DiskSlot::default()))?;
        }
        Ok(())
    }

    /// The latency histograms of `slot`, one per op (`LAT_OP_NAMES` order), since the programs
    /// were loaded.
    pub fn disk_latency(&self, slot: u32) -> anyhow::Result<[LatencyHist; LAT_OPS as usize]> {
        Ok(std::array::from_fn(|op| {
            slot.checked_mul(LAT_OPS).and_then(|first| self.disk_lat.get(first + op as u32)).unwrap_or_default()
        }))
    }

    /// The latency histograms of every disk slot handed out and of the slots below them (the
    /// overflow slot first), indexed by slot, one per op: read from the mapping of the array's
    /// prefix, no syscall.
    pub fn disk_latency_all(&self) -> anyhow::Result<Vec<[LatencyHist; LAT_OPS as usize]>> {
        let end = self.disk_slots.lock().map_err(|_| anyhow!("disk slots poisoned by an earlier panic"))?.end();
        let flat = self.disk_lat.prefix(end as usize * LAT_OPS as usize);
        Ok(flat.chunks_exact(LAT_OPS as usize).map(|ops| std::array::from_fn(|op| ops[op])).collect())
    }

    /// The counters of every disk slot handed out and of the slots below them (the overflow
    /// slot first), indexed by slot, summed over CPUs: read from the mapping, no syscall.
    pub fn disk_counters(&self) -> anyhow::Result<Vec<DiskValue>> {
        let mut out = Vec::new();
        self.disk_counters_into(&mut out)?;
        Ok(out)
    }

    /// [`Probes::disk_counters`] into `out`, reusing its memory (a collector's every round).
    pub fn disk_counters_into(&self, out: &mut Vec<DiskValue>) -> anyhow::Result<()> {
        let end = self.disk_slots.lock().map_err(|_| anyhow!("disk slots poisoned by an earlier panic"))?.end();
        self.disk.sum_prefix_into(end as usize, out);
        Ok(())
    }

    /// Every disk with a slot and its counters since the slot was given, summed over CPUs.
    pub fn disk_totals(&self) -> anyhow::Result<Vec<(DiskKey, DiskValue)>> {
        let slots: Vec<(u32, u32)> =
            self.disk_slots.lock().map_err(|_| anyhow!("disk slots poisoned by an earlier panic"))?.slots().collect();
        let values = self.disk_counters()?;
        Ok(slots.into_iter().filter_map(|(dev, slot)| Some((DiskKey { dev }, *values.get(slot as usize)?))).collect())
    }

    /// The counters of every interface slot handed out and of the slots below them, indexed by
    /// slot, summed over CPUs: read from the mapping, no syscall.
    pub fn net_counters(&self) -> anyhow::Result<Vec<NetValue>> {
        let mut out = Vec::new();
        self.net_counters_into(&mut out)?;
        Ok(out)
    }

    /// [`Probes::net_counters`] into `out`, reusing its memory (a collector's every round).
    pub fn net_counters_into(&self, out: &mut Vec<NetValue>) -> anyhow::Result<()> {
        let end = self.net_slots.lock().map_err(|_| anyhow!("interface slots poisoned by an earlier panic"))?.end();
        self.net.sum_prefix_into(end as usize, out);
        Ok(())
    }

    /// Every interface with a slot and its counters since the slot was given, summed over CPUs.
    pub fn net_totals(&self) -> anyhow::Result<Vec<(NetKey, NetValue)>> {
        let slots: Vec<(NetKey, u32)> = self
            .net_slots
            .lock()
            .map_err(|_| anyhow!("interface slots poisoned by an earlier panic"))?
            .slots()
            .collect();
        let values = self.net_counters()?;
        Ok(slots.into_iter().filter_map(|(key, slot)| Some((key, *values.get(slot as usize)?))).collect())
    }

    /// Run count and time of each program; zeros unless `kernel.bpf_stats_enabled` is 1.
    pub fn program_stats(&self) -> anyhow::Result<Vec<ProgramStats>> {
        let ebpf = self.ebpf.lock().map_err(|_| anyhow!("eBPF state poisoned by an earlier panic"))?;
        PROGRAMS
            .iter()
            .filter(|(program, _)| self.attached(program))
            .map(|&(program, _)| {
                let prog = ebpf.program(program).ok_or_else(|| anyhow!("program {program} not loaded"))?;
                let c = maps::prog_counters(prog.fd()?.as_fd())
                    .with_context(|| format!("BPF_OBJ_GET_INFO_BY_FD for program {program}"))?;
                Ok(ProgramStats {
                    program,
                    run_count: c.run_count,
                    run_time_ns: c.run_time_ns,
                    recursion_misses: c.recursion_misses,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use dcmon_common::ebpf::{IssueStamps, TimedRequests};

    /// The timing follows the programs left out: without the completion nothing is timed
    /// (the issue program is left out with it), without the issue program what the path allows.
    #[test]
    fn latency_timing_follows_the_programs_left_out() {
        let issue = ("block_rq_issue", "left out, it only works for block_rq_complete".to_owned());
        let complete = ("block_rq_complete", "no such tracepoint".to_owned());
        let all = super::latency_timing(IssueStamps::Kernel, &[("kfree_skb", "x".to_owned())]);
        assert_eq!((all.timed(), all.issue_left_out), (TimedRequests::All, None));
        let partial = super::latency_timing(IssueStamps::Kernel, std::slice::from_ref(&issue));
        assert_eq!(partial.timed(), TimedRequests::KernelStamped);
        assert!(partial.describe().ends_with(&format!("did not load: {}", issue.1)), "{}", partial.describe());
        let none = super::latency_timing(IssueStamps::Kernel, &[complete.clone(), issue]);
        assert_eq!(none.timed(), TimedRequests::Nothing);
        assert_eq!(none.describe(), "not timed: block_rq_complete did not load: no such tracepoint");
    }

    /// The raw bpf_prog_info offsets agree with aya's parsed info (run count and time).
    #[test]
    fn prog_counters_match_aya() {
        let required = dcmon_tests::privilege::ebpf_required();
        let skip = |why: String| {
            assert!(!required, "DCMON_REQUIRE_EBPF=1 but {why}");
            eprintln!("SKIP prog_counters_match_aya: {why}");
        };
        let probes = match super::Probes::attach(None) {
            Ok(p) => p,
            Err(e) => return skip(format!("eBPF failed: {e}")),
        };
        // Run time is counted only with stats enabled, which takes CAP_SYS_ADMIN (CAP_BPF
        // alone loads and attaches the programs).
        let _stats = match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => fd,
            Err(e) => {
                let e = anyhow::Error::from(e);
                return skip(format!("enabling BPF run-time stats (BPF_ENABLE_STATS needs CAP_SYS_ADMIN): {e:#}"));
            }
        };
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        for _ in 0..10 {
            tx.send_to(b"x", rx.local_addr().expect("addr")).expect("send");
            rx.recv(&mut [0u8; 8]).expect("recv");
        }
        let ebpf = probes.ebpf.lock().expect("lock");
        for (name, _) in dcmon_common::ebpf::PROGRAMS {
            let prog = ebpf.program(name).expect("program");
            // Other I/O keeps the programs running: sandwich aya's reading between two of ours.
            let fd = prog.fd().expect("fd");
            let before = super::maps::prog_counters(fd.as_fd()).expect("info");
            let aya = prog.info().expect("aya info");
            let ours = super::maps::prog_counters(fd.as_fd()).expect("info");
            // The loopback packets above ran the network counting programs; the disk may be
            // idle, and drops, retransmits, resets and OOM kills are rare.
            if [dcmon_common::ebpf::PROG_NETIF_RECEIVE_SKB, dcmon_common::ebpf::PROG_NET_DEV_XMIT].contains(&name) {
                assert!(before.run_count > 0, "{name}: no runs counted");
            }
            assert!(
                (before.run_count..=ours.run_count).contains(&aya.run_count()),
                "{name}: run count {before:?} / {} / {ours:?}",
                aya.run_count()
            );
            let aya_ns = u64::try_from(aya.run_time().as_nanos()).expect("fits");
            assert!(
                (before.run_time_ns..=ours.run_time_ns).contains(&aya_ns),
                "{name}: run time {before:?} / {aya_ns} / {ours:?}"
            );
            assert!(ours.recursion_misses.is_some(), "{name}: kernel 5.12+ reports misses");
        }
        drop(ebpf);
    }
}
