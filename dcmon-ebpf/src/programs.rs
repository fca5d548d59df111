//! The programs and maps. Names are the contract in `dcmon_common::ebpf`.

use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel};
use aya_ebpf::macros::{btf_tracepoint, map};
use aya_ebpf::maps::{Array, HashMap};
use aya_ebpf::programs::BtfTracePointContext;
use dcmon_common::ebpf::{
    AF_INET, AF_INET6, BPF_F_MMAPABLE, DISK_SLOTS, DROP_REASONS, DiskKey, DiskSlot, DiskValue, DropCounts, LAT_BUCKETS,
    LAT_OPS, LatencyHist, NET_DROP_SLOTS, NET_SLOTS, NO_DEVICE_SLOT, NetKey, NetSlot, NetValue, OOM_MAP_ENTRIES,
    OVERFLOW_SLOT, OpGroup, RQ_START_ENTRIES, SKB_NOT_DROPPED_YET, SLOT_PROBES, SLOT_TABLE_ENTRIES, TCP_FAMILIES,
    TcpCounts, kernel_stamp_latency, lat_bucket, lat_op, net_slot_hash, op_group, per_cpu_index, rq_latency, rq_stamp,
    rq_stamp_index, rq_stamp_is_own, slot_table_index,
};

/// Per disk slot, per CPU, laid out by hand (`cpu * DISK_SLOTS + slot`), so the hot path
/// updates its own CPU's copy without locks or atomics and finds it with an array lookup the
/// verifier inlines, while the agent sums the copies from a mapping (BPF_F_MMAPABLE) rather
/// than a per-CPU map's bpf(2) copy. The loader sets its length for the host's CPU ids.
#[map]
static DCMON_DISK: Array<DiskValue> = Array::with_max_entries(DISK_SLOTS, BPF_F_MMAPABLE);

/// Per interface slot, per CPU, like DCMON_DISK, `NET_SLOT_COUNT` slots a CPU. The loader sets
/// that count from the host's CPU ids (dcmon_common::ebpf::net_slots_for) and the length to
/// match.
#[map]
static DCMON_NET: Array<NetValue> = Array::with_max_entries(NET_SLOTS, BPF_F_MMAPABLE);

/// Latency histograms per (disk slot, op): see dcmon_common::ebpf::DISK_LAT_MAP. Shared by all
/// CPUs (atomic adds), so the agent reads one value whatever the number of CPUs, through a
/// mapping of the array (BPF_F_MMAPABLE).
#[map]
static DCMON_DISK_LAT: Array<LatencyHist> = Array::with_max_entries(DISK_SLOTS * LAT_OPS, BPF_F_MMAPABLE);

/// The agent's disk slots: see dcmon_common::ebpf::DISK_SLOT_MAP.
#[map]
static DCMON_DISK_SLOT: Array<DiskSlot> = Array::with_max_entries(SLOT_TABLE_ENTRIES, 0);

/// Issue stamps of requests in flight that the kernel does not stamp, direct-mapped by
/// address: see dcmon_common::ebpf::RQ_START_MAP.
#[map]
static DCMON_RQ_START: Array<u64> = Array::with_max_entries(RQ_START_ENTRIES, 0);

/// Drops per interface slot and reason: see dcmon_common::ebpf::NET_DROP_MAP. Shared by all
/// CPUs (atomic adds) and mapped by the agent, like DCMON_DISK_LAT.
#[map]
static DCMON_NET_DROP: Array<DropCounts> = Array::with_max_entries(NET_DROP_SLOTS, BPF_F_MMAPABLE);

/// The agent's interface slots: see dcmon_common::ebpf::NET_SLOT_MAP. The loader sets its
/// length and `NET_SLOT_MASK` to match.
#[map]
static DCMON_NET_SLOT: Array<NetSlot> = Array::with_max_entries(SLOT_TABLE_ENTRIES, 0);

/// OOM kills per memory cgroup: see dcmon_common::ebpf::OOM_MAP.
#[map]
static DCMON_OOM: HashMap<u64, u64> = HashMap::with_max_entries(OOM_MAP_ENTRIES, 0);

/// OOM kills of every memory cgroup together: see dcmon_common::ebpf::OOM_TOTAL_MAP.
#[map]
static DCMON_OOM_TOTAL: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

#[unsafe(no_mangle)]
static OFF_TASK_CGROUPS: u32 = 0;
#[unsafe(no_mangle)]
static OFF_CSS_CGROUP: u32 = 0;
#[unsafe(no_mangle)]
static OFF_CGROUP_KN: u32 = 0;
#[unsafe(no_mangle)]
static OFF_KN_ID: u32 = 0;
/// dcmon_common::ebpf::OFF_CSS_SET_MEMCG.
#[unsafe(no_mangle)]
static OFF_CSS_SET_MEMCG: u32 = 0;

/// TCP retransmits and resets: see dcmon_common::ebpf::TCP_MAP. Shared by all CPUs (atomic
/// adds: these events are rare) and mapped by the agent, like DCMON_DISK_LAT.
#[map]
static DCMON_TCP: Array<TcpCounts> = Array::with_max_entries(1, BPF_F_MMAPABLE);

#[unsafe(no_mangle)]
static OFF_SK_FAMILY: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SK_NET: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKB_HEAD: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKB_END: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SHINFO_GSO_SEGS: u32 = 0;

/// dcmon_common::ebpf::DROP_REASON_CONSUMED.
#[unsafe(no_mangle)]
static DROP_REASON_CONSUMED: u32 = u32::MAX;

// Field offsets, set by the loader from the running kernel's BTF (see
// dcmon_common::ebpf::OFFSETS). Zero here only so the object links; the loader refuses to load
// unless it has found every one.
#[unsafe(no_mangle)]
static OFF_RQ_Q: u32 = 0;
#[unsafe(no_mangle)]
static OFF_RQ_CMD_FLAGS: u32 = 0;
#[unsafe(no_mangle)]
static OFF_RQ_DATA_LEN: u32 = 0;
#[unsafe(no_mangle)]
static OFF_Q_DISK: u32 = 0;
#[unsafe(no_mangle)]
static OFF_DISK_MAJOR: u32 = 0;
#[unsafe(no_mangle)]
static OFF_DISK_FIRST_MINOR: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKB_LEN: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKB_DEV: u32 = 0;
#[unsafe(no_mangle)]
static OFF_DEV_IFINDEX: u32 = 0;
#[unsafe(no_mangle)]
static OFF_DEV_NET: u32 = 0;
#[unsafe(no_mangle)]
static OFF_NET_NS_INUM: u32 = 0;
/// dcmon_common::ebpf::OFF_RQ_IO_START: 0 while the completion is not to read it.
#[unsafe(no_mangle)]
static OFF_RQ_IO_START: u32 = 0;
/// dcmon_common::ebpf::OFF_Q_QUEUE_FLAGS.
#[unsafe(no_mangle)]
static OFF_Q_QUEUE_FLAGS: u32 = 0;
/// dcmon_common::ebpf::QUEUE_STATS_MASK: 0 while the issue program stamps every request.
#[unsafe(no_mangle)]
static QUEUE_STATS_MASK: u64 = 0;
/// dcmon_common::ebpf::NETNS_FILTER.
#[unsafe(no_mangle)]
static NETNS_FILTER: u32 = 0;
/// dcmon_common::ebpf::NET_SLOT_COUNT: DCMON_NET's length as loaded.
#[unsafe(no_mangle)]
static NET_SLOT_COUNT: u32 = NET_SLOTS;
/// dcmon_common::ebpf::NET_SLOT_MASK: DCMON_NET_SLOT's length as loaded, minus one.
#[unsafe(no_mangle)]
static NET_SLOT_MASK: u32 = SLOT_TABLE_ENTRIES - 1;
/// dcmon_common::ebpf::TCP_RETRANSMIT_HAS_ERR. While 0 the verifier prunes the read of the
/// third argument, which older kernels' tracepoint does not have.
#[unsafe(no_mangle)]
static TCP_RETRANSMIT_HAS_ERR: u32 = 0;

/// bpf_probe_read_kernel and tp_btf need a GPL-compatible license.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Reads a global through a volatile load so the compiler cannot fold the link-time zero.
#[inline(always)]
fn off(global: &'static u32) -> usize {
    // SAFETY: a valid, aligned static.
    unsafe { core::ptr::read_volatile(global) as usize }
}

/// [`off`] for a 64-bit global.
#[inline(always)]
fn global_u64(global: &'static u64) -> u64 {
    // SAFETY: a valid, aligned static.
    unsafe { core::ptr::read_volatile(global) }
}

/// Reads a `T` at `base + offset` of a kernel struct reached from a tp_btf argument.
///
/// A plain load, not bpf_probe_read_kernel: the verifier knows `base` is a BTF-typed pointer
/// and reads `offset` as a constant from the frozen `.rodata` map, so it checks the access
/// against the kernel's BTF at load time and emits a fault-tolerant direct load (a NULL or bad
/// pointer reads as zero). That saves a helper call per field on every event.
#[inline(always)]
fn read<T: Copy>(base: usize, offset: usize) -> Option<T> {
    if base == 0 {
        return None;
    }
    // SAFETY: see above; the kernel makes faulting loads through BTF pointers return zero.
    Some(unsafe { core::ptr::read_volatile((base + offset) as *const T) })
}

/// Adds to this CPU's copy of `slot` in `map`, laid out `slots` slots a CPU. `slot` is below
/// `slots`: [`disk_slot`] and [`net_slot`] return no other, so it is not checked again here
/// (past the array's end the lookup fails and nothing is counted).
#[inline(always)]
fn bump<V>(map: &Array<V>, slots: u32, slot: u32, add: impl Fn(&mut V)) {
    // SAFETY: a helper call without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    if let Some(v) = map.get_ptr_mut(per_cpu_index(cpu, slots, slot)) {
        // SAFETY: this CPU's copy of the value. Nothing else writes it while we run: tracing
        // programs run with migration disabled, and the kernel skips (and counts in
        // recursion_misses) a run of this program that would nest on the same CPU.
        unsafe { add(&mut *v) };
    }
}

/// `block_rq_complete(struct request *rq, blk_status_t error, unsigned int nr_bytes)`, fired
/// from blk_update_request once per (partial) completion, before `__data_len` is reduced.
#[btf_tracepoint(function = "block_rq_complete")]
pub fn block_rq_complete(ctx: BtfTracePointContext) -> i32 {
    let _ = try_block_rq_complete(&ctx);
    0
}

#[inline(always)]
fn try_block_rq_complete(ctx: &BtfTracePointContext) -> Option<()> {
    let rq: usize = ctx.arg(0);
    let nr_bytes: u32 = ctx.arg(2);
    let cmd_flags: u32 = read(rq, off(&OFF_RQ_CMD_FLAGS))?;
    let data_len: u32 = read(rq, off(&OFF_RQ_DATA_LEN))?;
    // /proc/diskstats counts the request once, when its last bytes complete
    // (blk_account_io_done), and its sectors at every partial completion
    // (blk_account_io_completion: bytes >> 9).
    let last = nr_bytes >= data_len;
    let group = op_group(cmd_flags);
    // A plain u32 with an out-of-range "not timed" rather than an Option: LLVM would spill the
    // Option's undefined payload on the None path, which the verifier refuses to read.
    let timed = match lat_op(cmd_flags) {
        Some(op) if last => op,
        _ => NOT_TIMED,
    };
    if group == OpGroup::Other && timed == NOT_TIMED {
        return None;
    }
    let q: usize = read(rq, off(&OFF_RQ_Q))?;
    let disk: usize = read(q, off(&OFF_Q_DISK))?;
    if disk == 0 {
        return None;
    }
    let major: u32 = read(disk, off(&OFF_DISK_MAJOR))?;
    let minor: u32 = read(disk, off(&OFF_DISK_FIRST_MINOR))?;
    let slot = disk_slot(DiskKey::new(major, minor).dev);
    if timed != NOT_TIMED {
        time_request(rq as u64, slot, timed);
    }
    let done = u64::from(last);
    let sectors = u64::from(nr_bytes >> 9);
    match group {
        OpGroup::Read => bump(&DCMON_DISK, DISK_SLOTS, slot, |v: &mut DiskValue| {
            v.reads += done;
            v.read_sectors += sectors;
        }),
        OpGroup::Write => bump(&DCMON_DISK, DISK_SLOTS, slot, |v: &mut DiskValue| {
            v.writes += done;
            v.write_sectors += sectors;
        }),
        OpGroup::Other => {}
    }
    Some(())
}

/// An op index no request has: the request is not timed.
const NOT_TIMED: u32 = LAT_OPS;

/// `block_rq_issue(struct request *rq)`, from blk_mq_start_request when the driver takes the
/// request: stamps the time for [`time_request`], unless the kernel stamps it right after
/// (its queue has QUEUE_FLAG_STATS: dcmon_common::ebpf::IssueStamps).
#[btf_tracepoint(function = "block_rq_issue")]
pub fn block_rq_issue(ctx: BtfTracePointContext) -> i32 {
    let rq: u64 = ctx.arg(0);
    let stats_mask = global_u64(&QUEUE_STATS_MASK);
    // While the mask is 0 (rodata) the verifier drops this branch.
    if stats_mask != 0
        && let Some(q) = read::<usize>(rq as usize, off(&OFF_RQ_Q))
        && let Some(flags) = read::<u64>(q, off(&OFF_Q_QUEUE_FLAGS))
        && flags & stats_mask != 0
    {
        return 0;
    }
    if let Some(cmd_flags) = read::<u32>(rq as usize, off(&OFF_RQ_CMD_FLAGS))
        && lat_op(cmd_flags).is_some()
    {
        if let Some(rq) = request_id(rq)
            && let Some(entry) = DCMON_RQ_START.get_ptr_mut(rq_stamp_index(rq))
        {
            // SAFETY: a helper call.
            let now = unsafe { bpf_ktime_get_ns() };
            // SAFETY: a value pointer the lookup returned; one aligned 64-bit store, so a
            // completion on another CPU reads the whole stamp or the one before. A requeued
            // request is stamped again.
            unsafe { core::ptr::write_volatile(entry, rq_stamp(rq, now)) };
        }
    }
    0
}

/// Request `rq`'s address as a number the program may hash: its distance from the stamp array,
/// whose address is fixed. The verifier refuses arithmetic on a kernel pointer other than
/// adding an offset, but lets a program loaded with CAP_PERFMON subtract two pointers.
#[inline(always)]
fn request_id(rq: u64) -> Option<u64> {
    let base = DCMON_RQ_START.get_ptr(0)? as u64;
    Some(rq.wrapping_sub(base))
}

/// The slot the agent gave disk `dev`, or the overflow slot: a few inlined array loads.
#[inline(always)]
fn disk_slot(dev: u32) -> u32 {
    let home = slot_table_index(dev);
    for i in 0..SLOT_PROBES {
        if let Some(e) = DCMON_DISK_SLOT.get((home + i) & (SLOT_TABLE_ENTRIES - 1))
            && e.dev == dev
            && e.slot < DISK_SLOTS
        {
            return e.slot;
        }
    }
    OVERFLOW_SLOT
}

/// Adds the issue-to-completion time of request `rq` to disk slot `slot`'s histogram of `op`,
/// from the kernel's issue stamp when the request has one, else from the stamp table. A request
/// with neither (issued before the programs attached, or its table entry overwritten by
/// another request mapped to the same entry) is not timed.
#[inline(always)]
fn time_request(rq: u64, slot: u32, op: u32) {
    let io_start = off(&OFF_RQ_IO_START);
    // While the offset is 0 (rodata) the verifier drops this branch.
    let kernel_stamp = if io_start != 0 { read::<u64>(rq as usize, io_start).unwrap_or(0) } else { 0 };
    let ns = if kernel_stamp != 0 {
        if global_u64(&QUEUE_STATS_MASK) == 0 {
            // The issue program stamped this request in the table too (IssueStamps::
            // KernelAtCompletion): clear it, or the address, back from its pool and ended
            // without being started (no kernel stamp then), would find this stamp.
            let _ = take_table_stamp(rq);
        }
        // SAFETY: a helper call.
        match kernel_stamp_latency(kernel_stamp, unsafe { bpf_ktime_get_ns() }) {
            Some(ns) => ns,
            None => return,
        }
    } else {
        let Some((id, stamp)) = take_table_stamp(rq) else { return };
        // SAFETY: a helper call.
        match rq_latency(id, stamp, unsafe { bpf_ktime_get_ns() }) {
            Some(ns) => ns,
            None => return,
        }
    };
    add_latency(slot, op, ns);
}

/// Takes request `rq`'s stamp from the table: (its id, the stamp), or None when its entry holds
/// no stamp of its own.
#[inline(always)]
fn take_table_stamp(rq: u64) -> Option<(u64, u64)> {
    let rq = request_id(rq)?;
    let entry = DCMON_RQ_START.get_ptr_mut(rq_stamp_index(rq))?;
    // SAFETY: a value pointer the lookup returned.
    let stamp = unsafe { core::ptr::read_volatile(entry) };
    if !rq_stamp_is_own(rq, stamp) {
        return None;
    }
    // SAFETY: as above. Cleared, so that this request's address, back from its pool without
    // being started again, finds no stamp. A request mapped to the same entry and stamped
    // between the read and this store loses its stamp and goes untimed: never a wrong time.
    unsafe { core::ptr::write_volatile(entry, 0) };
    Some((rq, stamp))
}

/// Adds one latency of `ns` to disk slot `slot`'s histogram of `op`.
#[inline(always)]
fn add_latency(slot: u32, op: u32, ns: u64) {
    let Some(hist) = DCMON_DISK_LAT.get_ptr_mut(slot * LAT_OPS + op) else { return };
    let bucket = lat_bucket(ns) as usize;
    if bucket < LAT_BUCKETS as usize {
        // SAFETY: a value pointer the lookup returned; the index is in bounds (checked above).
        unsafe {
            shared_add(&raw mut (*hist).buckets[bucket], 1);
            shared_add(&raw mut (*hist).sum_ns, ns);
        }
    }
}

/// The (namespace, ifindex) of a `struct net_device *`.
#[inline(always)]
fn net_key(dev: usize) -> Option<NetKey> {
    if dev == 0 {
        return None;
    }
    let ifindex: u32 = read(dev, off(&OFF_DEV_IFINDEX))?;
    let net: usize = read(dev, off(&OFF_DEV_NET))?;
    let netns: u32 = read(net, off(&OFF_NET_NS_INUM))?;
    let only = off(&NETNS_FILTER) as u32;
    if only != 0 && netns != only {
        return None;
    }
    Some(NetKey { ifindex, netns })
}

/// `netif_receive_skb(struct sk_buff *skb)`, in __netif_receive_skb_core: once per packet per
/// device it reaches (a bond or VLAN sees it again under its own device, as /proc counts it).
#[btf_tracepoint(function = "netif_receive_skb")]
pub fn netif_receive_skb(ctx: BtfTracePointContext) -> i32 {
    let _ = try_netif_receive_skb(&ctx);
    0
}

#[inline(always)]
fn try_netif_receive_skb(ctx: &BtfTracePointContext) -> Option<()> {
    let skb: usize = ctx.arg(0);
    let len: u32 = read(skb, off(&OFF_SKB_LEN))?;
    let dev: usize = read(skb, off(&OFF_SKB_DEV))?;
    let slot = net_slot(net_key(dev)?);
    bump(&DCMON_NET, off(&NET_SLOT_COUNT) as u32, slot, |v: &mut NetValue| {
        v.rx_packets += 1;
        v.rx_bytes += u64::from(len);
    });
    Some(())
}

/// `net_dev_xmit(struct sk_buff *skb, int rc, struct net_device *dev, unsigned int skb_len)`,
/// after the driver's ndo_start_xmit returned.
#[btf_tracepoint(function = "net_dev_xmit")]
pub fn net_dev_xmit(ctx: BtfTracePointContext) -> i32 {
    let _ = try_net_dev_xmit(&ctx);
    0
}

#[inline(always)]
fn try_net_dev_xmit(ctx: &BtfTracePointContext) -> Option<()> {
    let rc: i32 = ctx.arg(1);
    // NETDEV_TX_OK: the driver took the packet; NETDEV_TX_BUSY is requeued and seen again.
    if rc != 0 {
        return None;
    }
    let dev: usize = ctx.arg(2);
    let len: u32 = ctx.arg(3);
    let slot = net_slot(net_key(dev)?);
    bump(&DCMON_NET, off(&NET_SLOT_COUNT) as u32, slot, |v: &mut NetValue| {
        v.tx_packets += 1;
        v.tx_bytes += u64::from(len);
    });
    Some(())
}

/// `kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...)`: a packet
/// freed as dropped (consume_skb, the normal end of life, is another tracepoint).
#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let skb: usize = ctx.arg(0);
    let reason: u32 = ctx.arg(2);
    if reason == SKB_NOT_DROPPED_YET || reason == off(&DROP_REASON_CONSUMED) as u32 {
        return 0;
    }
    let slot = match read::<usize>(skb, off(&OFF_SKB_DEV)) {
        Some(0) | None => NO_DEVICE_SLOT,
        Some(dev) => match net_key(dev) {
            Some(key) => net_slot(key),
            // Another namespace's interface: not the agent's, counted as unslotted.
            None => OVERFLOW_SLOT,
        },
    };
    // Interface slots beyond the drop counters' count their drops in the overflow slot.
    let slot = if slot < NET_DROP_SLOTS { slot } else { OVERFLOW_SLOT };
    let index = if reason < DROP_REASONS - 1 { reason } else { DROP_REASONS - 1 };
    if let Some(counts) = DCMON_NET_DROP.get_ptr_mut(slot)
        && index < DROP_REASONS
    {
        // SAFETY: a value pointer the lookup returned; the index is in bounds (checked above).
        unsafe { shared_add(&raw mut (*counts).reasons[index as usize], 1) };
    }
    0
}

/// Adds `n` to a counter in a map value every CPU updates: one atomic add (BPF_ATOMIC_ADD).
///
/// # Safety
/// `counter` points into a live map value, 8-byte aligned.
#[inline(always)]
unsafe fn shared_add(counter: *mut u64, n: u64) {
    use core::intrinsics::{AtomicOrdering, atomic_xadd};
    // SAFETY: the caller's contract; other CPUs touch it only through this same atomic add.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, n) };
}

/// The slot the agent gave interface `key`, or the overflow slot.
#[inline(always)]
fn net_slot(key: NetKey) -> u32 {
    // The table's and the counters' lengths as loaded, not as compiled: the loader sizes both.
    let (mask, slots) = (off(&NET_SLOT_MASK) as u32, off(&NET_SLOT_COUNT) as u32);
    let home = net_slot_hash(key);
    for i in 0..SLOT_PROBES {
        if let Some(e) = DCMON_NET_SLOT.get(home.wrapping_add(i) & mask)
            && e.key == key
            && e.slot != 0
            && e.slot < slots
        {
            return e.slot;
        }
    }
    OVERFLOW_SLOT
}

/// Whether socket `sk` is in the counted network namespace (see `NETNS_FILTER`).
#[inline(always)]
fn counted_sock(sk: usize) -> bool {
    let only = off(&NETNS_FILTER) as u32;
    if only == 0 {
        return true;
    }
    let Some(net) = read::<usize>(sk, off(&OFF_SK_NET)) else { return false };
    read::<u32>(net, off(&OFF_NET_NS_INUM)) == Some(only)
}

/// The TCP counters, which every CPU updates through [`shared_add`].
#[inline(always)]
fn tcp_counts() -> Option<*mut TcpCounts> {
    DCMON_TCP.get_ptr_mut(0)
}

/// `tcp_retransmit_skb(const struct sock *sk, const struct sk_buff *skb, ...)`, once per
/// retransmitted skb, which may carry several segments.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: BtfTracePointContext) -> i32 {
    let sk: usize = ctx.arg(0);
    let skb: usize = ctx.arg(1);
    if !counted_sock(sk) {
        return 0;
    }
    if off(&TCP_RETRANSMIT_HAS_ERR) != 0 {
        // __tcp_retransmit_skb's exits before RetransSegs is added: -EBUSY (the original still
        // queued in the host), -EAGAIN (outside the window), -EINVAL, -ENOMEM.
        let err: i64 = ctx.arg(2);
        if matches!(err as i32, -16 | -11 | -22 | -12) {
            return 0;
        }
    }
    let family = match read::<u16>(sk, off(&OFF_SK_FAMILY)) {
        Some(AF_INET) => 0,
        Some(AF_INET6) => 1,
        _ => 2,
    };
    // tcp_skb_pcount: skb_shinfo(skb)->gso_segs, the shared info at head + end. Read with a
    // helper: the verifier knows `head` only as a byte pointer.
    let mut segs: u16 = 0;
    if let (Some(head), Some(end)) = (read::<usize>(skb, off(&OFF_SKB_HEAD)), read::<u32>(skb, off(&OFF_SKB_END))) {
        let at = (head + end as usize + off(&OFF_SHINFO_GSO_SEGS)) as *const u16;
        // SAFETY: a helper that reads kernel memory and fails cleanly on a bad address.
        segs = unsafe { bpf_probe_read_kernel(at) }.unwrap_or(0);
    }
    if let Some(c) = tcp_counts()
        && family < TCP_FAMILIES.len()
    {
        // SAFETY: a value pointer the lookup returned; `family` indexes retrans_segs (checked
        // above), whose counters are 8-byte aligned.
        unsafe { shared_add((&raw mut (*c).retrans_segs).cast::<u64>().add(family), u64::from(segs.max(1))) };
    }
    0
}

/// `tcp_send_reset(const struct sock *sk, const struct sk_buff *skb, ...)`: `sk` is NULL for
/// a reset answering a segment no socket took; its namespace is then the device's.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    let sk: usize = ctx.arg(0);
    let skb: usize = ctx.arg(1);
    let counted =
        if sk != 0 { counted_sock(sk) } else { read::<usize>(skb, off(&OFF_SKB_DEV)).and_then(net_key).is_some() };
    if counted && let Some(c) = tcp_counts() {
        // SAFETY: a value pointer the lookup returned.
        unsafe { shared_add(&raw mut (*c).resets_sent, 1) };
    }
    0
}

/// `tcp_receive_reset(struct sock *sk)`.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: BtfTracePointContext) -> i32 {
    let sk: usize = ctx.arg(0);
    if counted_sock(sk)
        && let Some(c) = tcp_counts()
    {
        // SAFETY: a value pointer the lookup returned.
        unsafe { shared_add(&raw mut (*c).resets_received, 1) };
    }
    0
}

/// `mark_victim(struct task_struct *task, uid_t uid)`: once per task the OOM killer picks.
#[btf_tracepoint(function = "mark_victim")]
pub fn mark_victim(ctx: BtfTracePointContext) -> i32 {
    let task: usize = ctx.arg(0);
    let id = memory_cgroup_id(task).unwrap_or(0);
    if let Some(n) = DCMON_OOM.get_ptr_mut(&id) {
        // SAFETY: a value of the map. A plain add: the kernel picks victims under oom_lock, so
        // two runs never update at once.
        unsafe { *n += 1 };
    } else if DCMON_OOM.insert(&id, &1, BPF_NOEXIST as u64).is_err()
        && let Some(n) = DCMON_OOM.get_ptr_mut(&id)
    {
        // SAFETY: as above.
        unsafe { *n += 1 };
    }
    // After the per-cgroup count, so an agent that sees the new total finds that count too.
    if let Some(total) = DCMON_OOM_TOTAL.get_ptr_mut(0) {
        // SAFETY: a value pointer the lookup returned, 8-byte aligned.
        unsafe { shared_add(total, 1) };
    }
    0
}

/// The id of `task`'s memory cgroup: task->cgroups->subsys[memory_cgrp_id]->cgroup->kn->id.
#[inline(always)]
fn memory_cgroup_id(task: usize) -> Option<u64> {
    let cgroups: usize = read(task, off(&OFF_TASK_CGROUPS))?;
    let css: usize = read(cgroups, off(&OFF_CSS_SET_MEMCG))?;
    let cgroup: usize = read(css, off(&OFF_CSS_CGROUP))?;
    let kn: usize = read(cgroup, off(&OFF_CGROUP_KN))?;
    read(kn, off(&OFF_KN_ID))
}
