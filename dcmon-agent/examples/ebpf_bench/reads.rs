//! `ebpf_bench reads`: one round's map reads at a 256-CPU server's scale (see the bench's
//! module doc), and what one bpf(2) read costs on scratch maps (the reads before the mapping).

use std::os::fd::AsRawFd as _;
use std::time::Instant;

use anyhow::Context as _;
use dcmon_agent::ebpf::Probes;

use super::median;

/// Median ns of 201 runs of `f`.
fn time_ns(f: &mut dyn FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut v = Vec::new();
    for _ in 0..201 {
        let s = Instant::now();
        f()?;
        v.push(s.elapsed().as_nanos() as f64);
    }
    Ok(median(v))
}

/// One round's map reads at a 256-CPU server's scale, ns: what [`slot_reads`] measures.
pub struct Reads {
    pub ncpus: usize,
    /// The shared arrays read through their mapping, as the agent reads them each round: 16
    /// disks' latency histograms, 32 interfaces' drop counters, the TCP counters, the OOM total.
    pub lat_ns: f64,
    pub drop_ns: f64,
    pub tcp_ns: f64,
    pub oom_ns: f64,
    /// The same latency and drop reads as one `BPF_MAP_LOOKUP_BATCH` each (the agent's read
    /// before the mapping), on scratch arrays of the same shape.
    pub lat_syscall_ns: f64,
    pub drop_syscall_ns: f64,
    /// A walk of the (empty) OOM map, which the round made before the OOM total: now only
    /// after a kill.
    pub oom_walk_ns: f64,
    pub oom_entries: usize,
    /// The counters laid out per CPU at this host's CPU ids, summed from their mapping as the
    /// agent reads them each round, and the slots read.
    pub disk_ns: f64,
    pub net_ns: f64,
    pub disk_entries: usize,
    pub net_entries: usize,
    /// The same sums over scratch mapped arrays sized as a 256-CPU host's (the loader's
    /// lengths for 256 CPU ids): with the arrays in cache, and after evicting the caches (the
    /// agent reads once a second, so its lines are likely cold).
    pub at_256: PerCpuSums,
    pub copy: CopyCost,
}

/// ns to sum the disk and interface counters of a per-CPU laid-out array of some size.
pub struct PerCpuSums {
    pub warm_ns: f64,
    pub cold_ns: f64,
}

impl Reads {
    /// The round's per-CPU counter reads at `cpus` possible CPUs as two BPF_MAP_LOOKUP_BATCH
    /// of per-CPU arrays (the agent's read before the mapping), computed from [`CopyCost`]: a
    /// batch read of `entries` per-CPU values costs the syscall's fixed part once, then every
    /// possible CPU's copy of each entry.
    pub fn per_cpu_syscall_computed_ns(&self, cpus: f64) -> f64 {
        use dcmon_common::ebpf::{DiskValue, NetValue};
        let c = &self.copy;
        let read = |entries: usize, bytes: usize| {
            c.fixed_ns + entries as f64 * cpus * (c.per_cpu_ns + bytes as f64 * c.per_byte_ns)
        };
        read(self.disk_entries, std::mem::size_of::<DiskValue>())
            + read(self.net_entries, std::mem::size_of::<NetValue>())
    }

    /// The shared arrays' reads through their mapping, measured (one value per entry whatever
    /// the CPU count).
    pub fn shared_ns(&self) -> f64 {
        self.lat_ns + self.drop_ns + self.tcp_ns + self.oom_ns
    }

    /// The per-CPU laid-out counters' sums at this host's CPU ids, measured.
    pub fn per_cpu_here_ns(&self) -> f64 {
        self.disk_ns + self.net_ns
    }

    /// The whole round at this host's CPU count, every read measured.
    pub fn round_here_ns(&self) -> f64 {
        self.shared_ns() + self.per_cpu_here_ns()
    }

    /// The whole round at 256 CPUs: the shared arrays measured here, the per-CPU counters
    /// summed from 256-CPU-sized scratch arrays with cold caches, measured.
    pub fn round_256_ns(&self) -> f64 {
        self.shared_ns() + self.at_256.cold_ns
    }
}

/// One round's reads of the maps at the scale of a 256-CPU GPU server (16 disks, 32
/// interfaces, given slots here under device numbers and interface indexes no device has):
/// measured for the shared arrays (read through their mapping), whose read does not depend on
/// the CPU count, for the per-CPU laid-out counters at this host's CPU count, and for the same
/// counters summed from scratch mapped arrays sized for 256 CPU ids.
pub fn slot_reads() -> anyhow::Result<Reads> {
    use dcmon_common::ebpf::{DiskKey, DropCounts, LatencyHist, NetKey};
    let probes = Probes::attach(None)?;
    let ncpus = dcmon_agent::ebpf::maps::possible_cpus()?;
    for minor in 0..16 {
        probes.disk_slot(DiskKey::new(4095, minor))?.context("a free disk slot")?;
    }
    for ifindex in 0..32 {
        probes.net_slot(NetKey { ifindex: 1_000_000 + ifindex, netns: 1 })?.context("a free slot")?;
    }
    let lat_entries = probes.disk_latency_all()?.len() * dcmon_common::ebpf::LAT_OPS as usize;
    let drop_entries = probes.net_drops_all()?.len();
    Ok(Reads {
        ncpus,
        lat_syscall_ns: scratch_read_ns(ARRAY, std::mem::size_of::<LatencyHist>(), lat_entries)?,
        drop_syscall_ns: scratch_read_ns(ARRAY, std::mem::size_of::<DropCounts>(), drop_entries)?,
        oom_walk_ns: time_ns(&mut || probes.oom_kills().map(|_| ()))?,
        oom_entries: probes.oom_kills()?.len(),
        lat_ns: time_ns(&mut || probes.disk_latency_all().map(|_| ()))?,
        drop_ns: time_ns(&mut || probes.net_drops_all().map(|_| ()))?,
        tcp_ns: time_ns(&mut || probes.tcp_counts().map(|_| ()))?,
        oom_ns: time_ns(&mut || {
            std::hint::black_box(probes.oom_kill_total());
            Ok(())
        })?,
        disk_ns: time_ns(&mut || probes.disk_counters().map(|_| ()))?,
        net_ns: time_ns(&mut || probes.net_counters().map(|_| ()))?,
        disk_entries: probes.disk_counters()?.len(),
        net_entries: probes.net_counters()?.len(),
        at_256: sums_at_cpus(256, probes.disk_counters()?.len(), probes.net_counters()?.len())?,
        copy: copy_cost()?,
    })
}

pub fn print_reads(r: &Reads) {
    let c = &r.copy;
    println!(
        "lookup, {} possible CPUs: one 8 B array value {:.0} ns; batch of {COPY_KEYS} 8 B values: array {:.1} us, per-CPU array {:.1} us; one per-CPU value of 8 B {:.0} ns, of 32 KiB {:.0} ns => {:.1} ns per CPU copy, {:.3} ns per byte",
        r.ncpus,
        c.fixed_ns,
        c.array_batch_ns / 1e3,
        c.percpu_batch_ns / 1e3,
        c.percpu_small_ns,
        c.percpu_large_ns,
        c.per_cpu_ns,
        c.per_byte_ns,
    );
    println!(
        "shared arrays read through their mapping, no syscall (any CPU count; the agent's round): 16 disks' latency histograms {:.2} us, 32 interfaces' drop counters {:.2} us, TCP counters {:.0} ns, OOM kill total {:.0} ns",
        r.lat_ns / 1e3,
        r.drop_ns / 1e3,
        r.tcp_ns,
        r.oom_ns
    );
    println!(
        "the same read with bpf(2), one BPF_MAP_LOOKUP_BATCH each (the agent's read before the mapping; scratch arrays of the same shape): latency histograms {:.1} us, drop counters {:.1} us; a walk of the OOM map ({} entries), every round before the total, now after a kill only: {:.1} us",
        r.lat_syscall_ns / 1e3,
        r.drop_syscall_ns / 1e3,
        r.oom_entries,
        r.oom_walk_ns / 1e3
    );
    println!(
        "per-CPU laid-out counters summed from their mapping at {} CPUs (the agent's round): disks ({} slots) {:.2} us, interfaces ({} slots) {:.2} us",
        r.ncpus,
        r.disk_entries,
        r.disk_ns / 1e3,
        r.net_entries,
        r.net_ns / 1e3,
    );
    println!(
        "the same sums from scratch mapped arrays sized for 256 CPU ids: {:.1} us in cache, {:.1} us after evicting the caches",
        r.at_256.warm_ns / 1e3,
        r.at_256.cold_ns / 1e3,
    );
    println!(
        "round at {} CPUs, 16 disks, 32 interfaces: {:.1} us measured; at 256 CPUs: {:.1} us (shared arrays {:.1} us, per-CPU sums {:.1} us cold, measured)",
        r.ncpus,
        r.round_here_ns() / 1e3,
        r.round_256_ns() / 1e3,
        r.shared_ns() / 1e3,
        r.at_256.cold_ns / 1e3,
    );
    println!(
        "before the mapping, the per-CPU counters as two per-CPU array batch reads: {:.0} us at 256 CPUs (computed from the copy costs above)",
        r.per_cpu_syscall_computed_ns(256.0) / 1e3
    );
}

/// Bytes written between cold runs of [`sums_at_cpus`]: more than any last-level cache here.
const EVICT_BYTES: usize = 64 << 20;

/// The ns to sum `disk_slots` disk and `net_slots` interface slots over `cpus` CPU ids from
/// scratch BPF_F_MMAPABLE arrays of the lengths the loader gives a host with that many CPU ids,
/// with the summing code the agent runs: median of 201 runs in cache, and of 51 runs each
/// after writing [`EVICT_BYTES`] elsewhere.
fn sums_at_cpus(cpus: u32, disk_slots: usize, net_slots: usize) -> anyhow::Result<PerCpuSums> {
    use dcmon_agent::ebpf::mapped::MappedPerCpuArray;
    use dcmon_common::ebpf::{DISK_SLOTS, DiskValue, NetValue, net_slots_for, per_cpu_entries};
    let ids: Vec<u32> = (0..cpus).collect();
    let (_disk_fd, disk) = scratch_mapped::<DiskValue>(per_cpu_entries(cpus, DISK_SLOTS).context("disk length")?)?;
    let (_net_fd, net) = scratch_mapped::<NetValue>(per_cpu_entries(cpus, net_slots_for(cpus)).context("net length")?)?;
    let disk = MappedPerCpuArray::new("scratch disk", disk, ids.clone())?;
    let net = MappedPerCpuArray::new("scratch net", net, ids)?;
    let sum = || {
        std::hint::black_box(disk.sum_prefix(disk_slots));
        std::hint::black_box(net.sum_prefix(net_slots));
    };
    let warm_ns = time_ns(&mut || {
        sum();
        Ok(())
    })?;
    let mut evict = vec![0u8; EVICT_BYTES];
    let mut cold = Vec::new();
    for i in 0..51u8 {
        evict.iter_mut().step_by(64).for_each(|b| *b = b.wrapping_add(i));
        std::hint::black_box(&evict);
        let s = Instant::now();
        sum();
        cold.push(s.elapsed().as_nanos() as f64);
    }
    Ok(PerCpuSums { warm_ns, cold_ns: median(cold) })
}

/// A new BPF_F_MMAPABLE array of `entries` values of `V`, and its mapping.
fn scratch_mapped<V: aya::Pod + Default>(
    entries: u32,
) -> anyhow::Result<(std::os::fd::OwnedFd, dcmon_agent::ebpf::mapped::MappedArray<V>)> {
    use dcmon_common::ebpf::BPF_F_MMAPABLE;
    use std::os::fd::AsFd as _;
    let value_size = std::mem::size_of::<V>() as u32;
    // union bpf_attr's map_create member: map_type, key_size, value_size, max_entries, map_flags.
    let mut attr = [0u64; 8];
    attr[0] = u64::from(ARRAY) | 4 << 32;
    attr[1] = u64::from(value_size) | u64::from(entries) << 32;
    attr[2] = u64::from(BPF_F_MMAPABLE);
    // SAFETY: a zeroed bpf_attr prefix of the size passed, with map_create's fields set.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_mut_ptr(), std::mem::size_of_val(&attr) as u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("BPF_MAP_CREATE mmapable array of {entries} x {value_size} B"));
    }
    // SAFETY: the kernel just returned this fd to us.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    let mapped =
        dcmon_agent::ebpf::mapped::MappedArray::new("scratch", fd.as_fd(), entries, value_size, BPF_F_MMAPABLE)?;
    Ok((fd, mapped))
}

/// Keys of the scratch maps' batch reads in [`copy_cost`].
const COPY_KEYS: usize = 1024;

/// What one per-CPU map lookup costs: `fixed + cpus * (per_cpu + bytes * per_byte)` ns, and the
/// scratch-map timings they come from.
pub struct CopyCost {
    pub fixed_ns: f64,
    pub per_cpu_ns: f64,
    pub per_byte_ns: f64,
    pub array_batch_ns: f64,
    pub percpu_batch_ns: f64,
    pub percpu_small_ns: f64,
    pub percpu_large_ns: f64,
}

/// The cost of one per-CPU map lookup as `fixed + cpus * (per_cpu + bytes * per_byte)` ns, from
/// scratch maps made here: a batch read of 1,024 8-byte values from a plain array (one copy per
/// key) against a per-CPU array (one copy per key and possible CPU) gives the cost of one CPU's
/// copy; one 32 KiB value against one 8-byte value of a per-CPU array the cost per byte; one
/// lookup of an 8-byte plain array value the syscall's fixed part. A map sized for 256 CPUs
/// cannot be made on a host with fewer: the kernel sizes per-CPU values by its possible CPUs.
fn copy_cost() -> anyhow::Result<CopyCost> {
    const KEYS: usize = COPY_KEYS;
    let ncpus = dcmon_agent::ebpf::maps::possible_cpus()?;
    let read_ns = scratch_read_ns;
    let fixed = read_ns(ARRAY, 8, 1)?;
    let (arr_batch, pc_batch) = (read_ns(ARRAY, 8, KEYS)?, read_ns(PERCPU_ARRAY, 8, KEYS)?);
    let (pc_small, pc_large) = (read_ns(PERCPU_ARRAY, 8, 1)?, read_ns(PERCPU_ARRAY, 32 << 10, 1)?);
    let per_byte = ((pc_large - pc_small) / ncpus as f64 / ((32 << 10) - 8) as f64).max(0.0);
    let per_cpu = ((pc_batch - arr_batch) / KEYS as f64 / (ncpus - 1).max(1) as f64).max(0.0);
    Ok(CopyCost {
        fixed_ns: fixed,
        per_cpu_ns: per_cpu,
        per_byte_ns: per_byte,
        array_batch_ns: arr_batch,
        percpu_batch_ns: pc_batch,
        percpu_small_ns: pc_small,
        percpu_large_ns: pc_large,
    })
}

/// `BPF_MAP_TYPE_ARRAY` and `BPF_MAP_TYPE_PERCPU_ARRAY`.
const ARRAY: u32 = 2;
const PERCPU_ARRAY: u32 = 6;

/// Median ns of reading every key of a new map of `map_type` with `entries` values of
/// `value_size` bytes with bpf(2): one lookup, or one batch for many keys.
fn scratch_read_ns(map_type: u32, value_size: usize, entries: usize) -> anyhow::Result<f64> {
    const LOOKUP_ELEM: libc::c_long = 1;
    const LOOKUP_BATCH: libc::c_long = 24;
    let ncpus = dcmon_agent::ebpf::maps::possible_cpus()?;
    let bpf = |cmd: libc::c_long, attr: &mut [u64]| -> std::io::Result<i64> {
        // SAFETY: `attr` is a zeroed bpf_attr prefix with the command's fields set; every
        // address in it points to a live buffer sized for what the command writes.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr) as u32) };
        if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
    };
    let mut create = [0u64; 16];
    create[0] = u64::from(map_type) | 4 << 32; // map_type, key_size
    create[1] = value_size as u64 | (entries as u64) << 32; // value_size, max_entries
    let fd = bpf(0, &mut create).with_context(|| format!("BPF_MAP_CREATE type {map_type}, {value_size} B"))?;
    // SAFETY: the kernel just returned this fd to us.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    let copies = if map_type == PERCPU_ARRAY { ncpus } else { 1 };
    let mut values = vec![0u64; value_size.div_ceil(8) * copies * entries];
    let mut keys = vec![0u32; entries];
    let mut out_batch = 0u64;
    time_ns(&mut || {
        let mut attr = [0u64; 8];
        if entries == 1 {
            attr[0] = fd.as_raw_fd() as u64;
            attr[1] = keys.as_ptr() as u64;
            attr[2] = values.as_mut_ptr() as u64;
            bpf(LOOKUP_ELEM, &mut attr).context("BPF_MAP_LOOKUP_ELEM")?;
        } else {
            // in_batch NULL (from the start), out_batch, keys, values, count | map_fd << 32.
            attr[1] = &raw mut out_batch as u64;
            attr[2] = keys.as_mut_ptr() as u64;
            attr[3] = values.as_mut_ptr() as u64;
            attr[4] = entries as u64 | (fd.as_raw_fd() as u64) << 32;
            match bpf(LOOKUP_BATCH, &mut attr) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e).context("BPF_MAP_LOOKUP_BATCH"),
            }
            anyhow::ensure!(attr[4] as u32 as usize == entries, "batch read {} of {entries} keys", attr[4] as u32);
        }
        Ok(())
    })
}
