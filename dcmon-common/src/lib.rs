//! Types shared by the kernel side (dcmon-ebpf) and the userspace agent.
//!
//! Everything here must stay `#![no_std]` and layout-stable: the BPF programs and the agent
//! both compile these definitions, and a map written by one is read by the other byte for byte.
#![no_std]

/// The `collector` label of the collectors that have an eBPF and a procfs implementation
/// (the agent's collector table names the others), and of the eBPF status collector.
pub mod collector_names {
    /// Per-device disk I/O.
    pub const DISK: &str = "disk";
    /// Per-interface network I/O.
    pub const NET: &str = "net";
    /// eBPF mode status and program statistics.
    pub const EBPF: &str = "ebpf";
}

/// Linux sector size used by /proc/diskstats and block-layer tracepoints, independent of the
/// device's logical block size (checked against a 4 KiB-block loop device in
/// dcmon-agent/tests/disk_hotplug.rs).
pub const SECTOR_BYTES: u64 = 512;

/// The contract between the BPF programs (dcmon-ebpf) and the agent's loader: map, program and
/// global-variable names, and the key/value layouts of the maps.
///
/// Every type is `#[repr(C)]` with explicit padding and a compile-time size check, because the
/// kernel copies map keys and values byte for byte between the two sides.
pub mod ebpf {
    /// Array of [`DiskValue`] laid out per CPU by hand ([`per_cpu_index`] with [`DISK_SLOTS`]
    /// slots a CPU), [`BPF_F_MMAPABLE`]: each CPU's program updates its own copy without
    /// atomics, and the agent sums the copies from a mapping of the array, with no syscall.
    /// Indexed by the disk's slot (see [`DISK_SLOT_MAP`]), filled on block request completion:
    /// an inlined array lookup per completion instead of a hash lookup. Disks without a slot
    /// count in [`OVERFLOW_SLOT`]. The loader sets its length to [`per_cpu_entries`].
    pub const DISK_MAP: &str = "DCMON_DISK";
    /// Array of [`NetValue`] laid out per CPU like [`DISK_MAP`], with [`net_slots_for`] the
    /// CPU ids slots a CPU as loaded ([`NET_SLOT_COUNT`]), indexed by the interface's slot (see
    /// [`NET_SLOT_MAP`]), filled on packet receive and transmit. Interfaces without a slot count
    /// in [`OVERFLOW_SLOT`].
    pub const NET_MAP: &str = "DCMON_NET";
    /// Bytes of a cache line: one CPU's region of a per-CPU laid-out array ([`per_cpu_index`])
    /// is a whole number of them, so two CPUs never write the same line.
    pub const CACHE_LINE: u64 = 64;

    mod issue_stamps;
    pub use issue_stamps::*;

    /// The entry of `slot` in CPU `cpu`'s copy of an array laid out per CPU with `slots`
    /// slots a CPU: CPU regions one after the other.
    #[inline(always)]
    pub const fn per_cpu_index(cpu: u32, slots: u32, slot: u32) -> u32 {
        cpu.wrapping_mul(slots).wrapping_add(slot)
    }

    /// The length of an array laid out per CPU with `slots` slots a CPU, for CPU ids below
    /// `cpu_ids` (the highest possible CPU id + 1: ids may have gaps, and every id the kernel
    /// can run a program on needs its region). None when it does not fit a u32.
    pub const fn per_cpu_entries(cpu_ids: u32, slots: u32) -> Option<u32> {
        cpu_ids.checked_mul(slots)
    }

    /// `tp_btf/block_rq_complete`: counts completed reads and writes per disk.
    pub const PROG_BLOCK_RQ_COMPLETE: &str = "block_rq_complete";
    /// `tp_btf/netif_receive_skb`: counts received packets and bytes per interface.
    pub const PROG_NETIF_RECEIVE_SKB: &str = "netif_receive_skb";
    /// `tp_btf/net_dev_xmit`: counts transmitted packets and bytes per interface.
    pub const PROG_NET_DEV_XMIT: &str = "net_dev_xmit";
    /// `tp_btf/block_rq_issue`: stamps a request's issue time for the latency histogram.
    pub const PROG_BLOCK_RQ_ISSUE: &str = "block_rq_issue";
    /// `tp_btf/kfree_skb`: counts dropped packets per interface and reason.
    pub const PROG_KFREE_SKB: &str = "kfree_skb";
    /// `tp_btf/tcp_retransmit_skb`: counts retransmitted TCP segments per address family.
    pub const PROG_TCP_RETRANSMIT_SKB: &str = "tcp_retransmit_skb";
    /// `tp_btf/tcp_send_reset`: counts TCP resets sent.
    pub const PROG_TCP_SEND_RESET: &str = "tcp_send_reset";
    /// `tp_btf/tcp_receive_reset`: counts TCP resets received.
    pub const PROG_TCP_RECEIVE_RESET: &str = "tcp_receive_reset";
    /// `tp_btf/mark_victim`: counts OOM kills per memory cgroup.
    pub const PROG_MARK_VICTIM: &str = "mark_victim";
    /// (program name, kernel tracepoint it attaches to) for every program in the object, in the
    /// order they are attached: a program comes after those it needs ([`PROGRAM_NEEDS`]).
    pub const PROGRAMS: [(&str, &str); 9] = [
        (PROG_MARK_VICTIM, "mark_victim"),
        (PROG_TCP_RETRANSMIT_SKB, "tcp_retransmit_skb"),
        (PROG_TCP_SEND_RESET, "tcp_send_reset"),
        (PROG_TCP_RECEIVE_RESET, "tcp_receive_reset"),
        (PROG_KFREE_SKB, "kfree_skb"),
        (PROG_BLOCK_RQ_COMPLETE, "block_rq_complete"),
        (PROG_BLOCK_RQ_ISSUE, "block_rq_issue"),
        (PROG_NETIF_RECEIVE_SKB, "netif_receive_skb"),
        (PROG_NET_DEV_XMIT, "net_dev_xmit"),
    ];

    /// (program, the program it works for): one left out when the other did not load. The
    /// issue stamps are read only on completion; without it they would cost every I/O a hash
    /// update for nothing.
    pub const PROGRAM_NEEDS: [(&str, &str); 1] = [(PROG_BLOCK_RQ_ISSUE, PROG_BLOCK_RQ_COMPLETE)];

    /// The programs the disk counters need: if one of them cannot load, the agent reads disk
    /// I/O from procfs (the network counters stay on eBPF if theirs load).
    pub const DISK_PROGRAMS: [&str; 1] = [PROG_BLOCK_RQ_COMPLETE];
    /// The programs the network counters need: if one of them cannot load, the agent reads
    /// network I/O from procfs (the disk counters stay on eBPF if theirs load). Every other
    /// program is optional: each that cannot load leaves only its own metrics absent.
    pub const NET_PROGRAMS: [&str; 2] = [PROG_NETIF_RECEIVE_SKB, PROG_NET_DEV_XMIT];

    /// The offset globals ([`OFFSETS`], [`OFF_CSS_SET_MEMCG`]) each program reads: a program
    /// whose fields the running kernel lacks is not loaded.
    pub const PROGRAM_OFFSETS: [(&str, &[&str]); 9] = [
        (
            PROG_BLOCK_RQ_COMPLETE,
            &[
                "OFF_RQ_Q",
                "OFF_RQ_CMD_FLAGS",
                "OFF_RQ_DATA_LEN",
                "OFF_Q_DISK",
                "OFF_DISK_MAJOR",
                "OFF_DISK_FIRST_MINOR",
            ],
        ),
        (PROG_BLOCK_RQ_ISSUE, &["OFF_RQ_CMD_FLAGS", "OFF_RQ_Q"]),
        (PROG_NETIF_RECEIVE_SKB, &["OFF_SKB_LEN", "OFF_SKB_DEV", "OFF_DEV_IFINDEX", "OFF_DEV_NET", "OFF_NET_NS_INUM"]),
        (PROG_NET_DEV_XMIT, &["OFF_DEV_IFINDEX", "OFF_DEV_NET", "OFF_NET_NS_INUM"]),
        (PROG_KFREE_SKB, &["OFF_SKB_DEV", "OFF_DEV_IFINDEX", "OFF_DEV_NET", "OFF_NET_NS_INUM"]),
        (
            PROG_TCP_RETRANSMIT_SKB,
            &["OFF_SK_FAMILY", "OFF_SK_NET", "OFF_NET_NS_INUM", "OFF_SKB_HEAD", "OFF_SKB_END", "OFF_SHINFO_GSO_SEGS"],
        ),
        (PROG_TCP_SEND_RESET, &["OFF_SK_NET", "OFF_NET_NS_INUM", "OFF_SKB_DEV", "OFF_DEV_IFINDEX", "OFF_DEV_NET"]),
        (PROG_TCP_RECEIVE_RESET, &["OFF_SK_NET", "OFF_NET_NS_INUM"]),
        (PROG_MARK_VICTIM, &["OFF_TASK_CGROUPS", OFF_CSS_SET_MEMCG, "OFF_CSS_CGROUP", "OFF_CGROUP_KN", "OFF_KN_ID"]),
    ];

    /// Kernel struct field offsets the programs read, as `.rodata` globals the loader sets from
    /// the running kernel's BTF (layouts differ between kernels and configs). Each global is a
    /// `u32` byte offset; the entries are `(global, struct, dotted field path, bytes read)`.
    pub const OFFSETS: [(&str, &str, &str, u32); 20] = [
        ("OFF_RQ_Q", "request", "q", 8),
        ("OFF_RQ_CMD_FLAGS", "request", "cmd_flags", 4),
        ("OFF_RQ_DATA_LEN", "request", "__data_len", 4),
        ("OFF_Q_DISK", "request_queue", "disk", 8),
        ("OFF_DISK_MAJOR", "gendisk", "major", 4),
        ("OFF_DISK_FIRST_MINOR", "gendisk", "first_minor", 4),
        ("OFF_SKB_LEN", "sk_buff", "len", 4),
        ("OFF_SKB_DEV", "sk_buff", "dev", 8),
        ("OFF_DEV_IFINDEX", "net_device", "ifindex", 4),
        ("OFF_DEV_NET", "net_device", "nd_net.net", 8),
        ("OFF_NET_NS_INUM", "net", "ns.inum", 4),
        ("OFF_SK_FAMILY", "sock", "__sk_common.skc_family", 2),
        ("OFF_SK_NET", "sock", "__sk_common.skc_net.net", 8),
        ("OFF_SKB_HEAD", "sk_buff", "head", 8),
        ("OFF_SKB_END", "sk_buff", "end", 4),
        ("OFF_SHINFO_GSO_SEGS", "skb_shared_info", "gso_segs", 2),
        ("OFF_TASK_CGROUPS", "task_struct", "cgroups", 8),
        ("OFF_CSS_CGROUP", "cgroup_subsys_state", "cgroup", 8),
        ("OFF_CGROUP_KN", "cgroup", "kn", 8),
        ("OFF_KN_ID", "kernfs_node", "id", 8),
    ];

    /// `.rodata` global: the byte offset of the memory controller's state in `struct css_set`
    /// (`subsys[memory_cgrp_id]`, both from the running kernel's BTF).
    pub const OFF_CSS_SET_MEMCG: &str = "OFF_CSS_SET_MEMCG";

    /// Hash map `memory cgroup id -> OOM kills`: the victims' memory cgroups (the kernfs node
    /// id, which is the cgroup directory's inode number). OOM kills are rare, so a hash.
    pub const OOM_MAP: &str = "DCMON_OOM";
    /// Most memory cgroups with OOM kills tracked.
    pub const OOM_MAP_ENTRIES: u32 = 4096;
    /// Array of one `u64`, [`BPF_F_MMAPABLE`]: OOM kills of every memory cgroup together, added
    /// after the victim's [`OOM_MAP`] count. The agent reads it through a mapping each cycle and
    /// walks [`OOM_MAP`] (a syscall that scans all its buckets, empty or not) only when it differs
    /// from the sum of the counts the last walk found.
    pub const OOM_TOTAL_MAP: &str = "DCMON_OOM_TOTAL";

    /// `.rodata` global: count only interfaces of the network namespace with this inode number
    /// (the agent's own, whose /proc/net/dev it reports); 0 counts every namespace. Container
    /// traffic then costs no map update and cannot fill the map.
    pub const NETNS_FILTER: &str = "NETNS_FILTER";

    /// `.rodata` global: 1 when this kernel's `tcp_retransmit_skb` tracepoint passes the
    /// attempt's error as a third argument. It then also fires for attempts that never reached
    /// the wire (the original still in the host's queue, no memory, window closed), which
    /// RetransSegs does not count and neither may we.
    pub const TCP_RETRANSMIT_HAS_ERR: &str = "TCP_RETRANSMIT_HAS_ERR";

    /// `REQ_OP_MASK` (include/linux/blk_types.h): the low 8 bits of `cmd_flags` are the op.
    pub const REQ_OP_MASK: u32 = 0xff;
    /// `REQ_OP_READ`.
    pub const REQ_OP_READ: u32 = 0;
    /// `REQ_OP_FLUSH`.
    pub const REQ_OP_FLUSH: u32 = 2;
    /// `REQ_OP_DISCARD`: odd like a write, but /proc/diskstats counts it apart.
    pub const REQ_OP_DISCARD: u32 = 3;
    /// `REQ_OP_SECURE_ERASE`: a discard for accounting.
    pub const REQ_OP_SECURE_ERASE: u32 = 5;
    /// `REQ_OP_DRV_IN`: driver-private (passthrough) ops start here; /proc never counts them.
    pub const REQ_OP_DRV_IN: u32 = 34;

    /// Which accounting group /proc/diskstats puts a request op in (the kernel's
    /// `op_stat_group`, minus flushes and passthrough which are neither reads nor writes).
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum OpGroup {
        /// Counted in the read columns.
        Read,
        /// Counted in the write columns.
        Write,
        /// Flush, discard, passthrough: not a read or write.
        Other,
    }

    /// The accounting group of the op in a request's `cmd_flags`.
    #[inline(always)]
    pub const fn op_group(cmd_flags: u32) -> OpGroup {
        let op = cmd_flags & REQ_OP_MASK;
        if op >= REQ_OP_DRV_IN || op == REQ_OP_DISCARD || op == REQ_OP_SECURE_ERASE {
            OpGroup::Other
        } else if op == REQ_OP_READ {
            OpGroup::Read
        } else if op & 1 == 1 {
            // op_is_write(): every odd op writes data (WRITE, WRITE_ZEROES, ZONE_APPEND...).
            OpGroup::Write
        } else {
            OpGroup::Other
        }
    }

    /// A whole disk: the kernel's `dev_t` of its gendisk, `major << 20 | first_minor`.
    #[repr(C)]
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
    pub struct DiskKey {
        /// Kernel-internal dev_t encoding (MKDEV), not the userspace one.
        pub dev: u32,
    }

    impl DiskKey {
        /// The key of `major:minor`.
        pub const fn new(major: u32, minor: u32) -> Self {
            Self { dev: (major << 20) | (minor & 0xf_ffff) }
        }
        /// Major number.
        pub const fn major(&self) -> u32 {
            self.dev >> 20
        }
        /// Minor number.
        pub const fn minor(&self) -> u32 {
            self.dev & 0xf_ffff
        }
    }

    /// Counters of one disk on one CPU. Units match /proc/diskstats: sectors are 512 bytes.
    #[repr(C)]
    #[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
    pub struct DiskValue {
        /// Completed read requests.
        pub reads: u64,
        /// 512-byte sectors read.
        pub read_sectors: u64,
        /// Completed write requests.
        pub writes: u64,
        /// 512-byte sectors written.
        pub write_sectors: u64,
    }

    /// An interface: its ifindex within one network namespace (ifindexes repeat across
    /// namespaces, so the namespace's inode number is part of the key).
    #[repr(C)]
    #[derive(Clone, Copy, Default, PartialEq, Eq, Debug, Hash)]
    pub struct NetKey {
        /// `net_device.ifindex`.
        pub ifindex: u32,
        /// Inode number of the namespace (`stat -L /proc/self/ns/net`).
        pub netns: u32,
    }

    /// Counters of one interface on one CPU, as the stack sees them (link-layer header
    /// corrections to match /proc/net/dev are applied by the agent per device type).
    #[repr(C)]
    #[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
    pub struct NetValue {
        /// Packets seen by `netif_receive_skb`.
        pub rx_packets: u64,
        /// Sum of `skb->len` at `netif_receive_skb` (link-layer header already pulled).
        pub rx_bytes: u64,
        /// Packets the driver accepted (`net_dev_xmit` with `NETDEV_TX_OK`).
        pub tx_packets: u64,
        /// Sum of `skb_len` at `net_dev_xmit` (link-layer header included).
        pub tx_bytes: u64,
    }

    /// Array of [`LatencyHist`] shared by all CPUs (atomic adds), indexed by `slot * LAT_OPS + op`: I/O latency per disk
    /// slot and operation, filled on the final completion of a request the programs saw issued.
    /// Created with [`BPF_F_MMAPABLE`]: the agent reads it through a mapping.
    pub const DISK_LAT_MAP: &str = "DCMON_DISK_LAT";
    /// `BPF_F_MMAPABLE` (include/uapi/linux/bpf.h, kernel 5.5+): a plain array created with it
    /// can be mapped into the agent's memory, which then reads it with no bpf(2) call.
    pub const BPF_F_MMAPABLE: u32 = 1 << 10;
    /// Array of [`DiskSlot`], [`SLOT_TABLE_ENTRIES`] long: the agent's disk slots, direct-mapped
    /// by [`slot_table_index`] with up to [`SLOT_PROBES`] linear probes, so that the completion
    /// program finds a disk's slot with inlined array loads instead of a hash lookup.
    pub const DISK_SLOT_MAP: &str = "DCMON_DISK_SLOT";
    /// Array of u64 shared by all CPUs, [`RQ_START_ENTRIES`] long: issue stamps of requests in
    /// flight that the kernel does not stamp itself ([`IssueStamps`]), direct-mapped by the
    /// request's address ([`rq_stamp_index`]), each stamp the
    /// issue time with check bits of the address ([`rq_stamp`]). Set at `block_rq_issue`, taken
    /// and cleared at the final `block_rq_complete`: an array load and store where a hash map
    /// would cost a lookup. A completion whose entry is empty or holds another request's
    /// stamp (issued before attach, overwritten by a request mapped to the same entry, ended
    /// without being started) is not timed; a request that never completes leaves a stamp that
    /// the next request mapped there overwrites.
    pub const RQ_START_MAP: &str = "DCMON_RQ_START";
    /// Entries of [`RQ_START_MAP`] (128 KiB): far above any sum of queue depths in practice.
    pub const RQ_START_ENTRIES: u32 = 16384;
    /// Bits of a stamp that hold the issue time (ns, modulo 2^48: 78 hours, far longer than any
    /// request); the 16 above hold the check bits.
    pub const RQ_STAMP_TIME_BITS: u32 = 48;

    /// The address hashed (murmur3's 64-bit finalizer): requests of one pool are a fixed
    /// stride apart, a multiple of their alignment, which a plain multiplication keeps in the
    /// high bits.
    #[inline(always)]
    const fn rq_hash(rq: u64) -> u64 {
        let mut h = rq ^ (rq >> 33);
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }

    /// The [`RQ_START_MAP`] entry of request `rq` (its address).
    #[inline(always)]
    pub const fn rq_stamp_index(rq: u64) -> u32 {
        const _: () = assert!(RQ_START_ENTRIES == 1 << 14);
        (rq_hash(rq) >> 50) as u32
    }

    /// The stamp of request `rq` issued at `now_ns`: the time's low 48 bits under 16 check bits
    /// of the address, so one 64-bit store writes both and a completion knows its own stamp.
    #[inline(always)]
    pub const fn rq_stamp(rq: u64, now_ns: u64) -> u64 {
        let check = (rq_hash(rq) >> 24) & 0xffff;
        (check << RQ_STAMP_TIME_BITS) | (now_ns & ((1 << RQ_STAMP_TIME_BITS) - 1))
    }

    /// Whether `stamp` (an entry's value) was written for request `rq`: not empty, and its
    /// check bits are `rq`'s.
    #[inline(always)]
    pub const fn rq_stamp_is_own(rq: u64, stamp: u64) -> bool {
        stamp != 0 && stamp >> RQ_STAMP_TIME_BITS == rq_stamp(rq, 0) >> RQ_STAMP_TIME_BITS
    }

    /// The issue-to-completion time of request `rq` completing at `now_ns` from the `stamp` in
    /// its entry, or `None` when the entry is empty or holds another request's stamp.
    #[inline(always)]
    pub const fn rq_latency(rq: u64, stamp: u64, now_ns: u64) -> Option<u64> {
        if !rq_stamp_is_own(rq, stamp) {
            return None;
        }
        Some(now_ns.wrapping_sub(stamp) & ((1 << RQ_STAMP_TIME_BITS) - 1))
    }
    /// Disk slots, slot [`OVERFLOW_SLOT`] included: disks beyond that are read from their
    /// /sys/block stat file instead.
    pub const DISK_SLOTS: u32 = 64;
    /// The slot of disks and interfaces the agent has not given one (yet, or because all are
    /// taken): their I/O is counted and timed there, so it is counted rather than lost.
    pub const OVERFLOW_SLOT: u32 = 0;
    /// Entries of the direct-mapped slot table (a power of two).
    pub const SLOT_TABLE_ENTRIES: u32 = 1024;
    /// Entries the program probes from a disk's home index.
    pub const SLOT_PROBES: u32 = 4;
    /// Operations timed: read, write, flush, discard (the order of `op` in the map index).
    pub const LAT_OPS: u32 = 4;
    /// Names of the timed operations, in index order (the `op` label).
    pub const LAT_OP_NAMES: [&str; LAT_OPS as usize] = ["read", "write", "flush", "discard"];
    /// Log2 latency buckets: bucket `k < LAT_BUCKETS - 1` counts latencies below
    /// `2^(k + LAT_SHIFT)` ns (from 1.024 µs to 17.18 s); the last one counts the rest.
    pub const LAT_BUCKETS: u32 = 26;
    /// Bucket 0's bound is `2^LAT_SHIFT` ns.
    pub const LAT_SHIFT: u32 = 10;

    /// Array of [`DropCounts`] shared by all CPUs (atomic adds), indexed by interface slot,
    /// [`NET_DROP_SLOTS`] long: packet drops by reason. Created with [`BPF_F_MMAPABLE`].
    pub const NET_DROP_MAP: &str = "DCMON_NET_DROP";
    /// Array of [`NetSlot`], [`net_slot_table_entries`] long as loaded: the agent's interface
    /// slots, direct-mapped by [`net_slot_hash`] with up to [`SLOT_PROBES`] probes.
    pub const NET_SLOT_MAP: &str = "DCMON_NET_SLOT";
    /// Interface slots, the overflow and no-device slots included, as compiled into the object
    /// and at the least: the loader sizes [`NET_MAP`] and [`NET_SLOT_MAP`] with
    /// [`net_slots_for`] the possible CPUs. Interfaces of the agent's network namespace beyond
    /// the slots are read from /proc/net/dev instead.
    pub const NET_SLOTS: u32 = 256;
    /// Most interface slots, whatever the number of CPUs.
    pub const NET_SLOTS_MAX: u32 = 16384;
    /// Kernel memory the per-CPU interface counters may take: slots x possible CPUs x
    /// `size_of::<NetValue>()` stays within it up to 512 possible CPUs (16,384 slots up to 8
    /// CPUs, 512 at 256; the 256 slots of the floor beyond 512 CPUs).
    pub const NET_COUNTERS_BUDGET: u64 = 4 << 20;
    /// Interface slots with drop counters ([`NET_DROP_MAP`]'s length: a [`DropCounts`] is
    /// 1,280 bytes whatever the CPUs): an interface with a higher slot counts its drops in
    /// the overflow slot.
    pub const NET_DROP_SLOTS: u32 = 256;
    /// `.rodata` global: the interface slots a CPU of [`NET_MAP`] as loaded (its per-CPU
    /// stride); the programs count no slot at or above it.
    pub const NET_SLOT_COUNT: &str = "NET_SLOT_COUNT";
    /// `.rodata` global: [`NET_SLOT_MAP`]'s length as loaded minus one (a power of two minus
    /// one): the mask of [`net_slot_hash`].
    pub const NET_SLOT_MASK: &str = "NET_SLOT_MASK";

    /// The interface slots to load on a host whose CPU ids are below `cpu_ids` (the highest
    /// possible CPU id + 1; the per-CPU regions of [`NET_MAP`] are that many): as many as
    /// [`NET_COUNTERS_BUDGET`] holds, from [`NET_SLOTS`] to [`NET_SLOTS_MAX`], a whole number
    /// of cache lines a CPU.
    pub const fn net_slots_for(cpu_ids: u32) -> u32 {
        let per_slot = core::mem::size_of::<NetValue>() as u64 * if cpu_ids == 0 { 1 } else { cpu_ids as u64 };
        let per_line = CACHE_LINE / core::mem::size_of::<NetValue>() as u64;
        let fit = NET_COUNTERS_BUDGET / per_slot / per_line * per_line;
        if fit < NET_SLOTS as u64 {
            NET_SLOTS
        } else if fit > NET_SLOTS_MAX as u64 {
            NET_SLOTS_MAX
        } else {
            fit as u32
        }
    }

    /// [`NET_SLOT_MAP`]'s length for `slots` interface slots: a power of two at least twice
    /// the slots (so a probe window of [`SLOT_PROBES`] rarely fills) and at least
    /// [`SLOT_TABLE_ENTRIES`].
    pub const fn net_slot_table_entries(slots: u32) -> u32 {
        let want = (slots as u64 * 2).next_power_of_two();
        if want < SLOT_TABLE_ENTRIES as u64 { SLOT_TABLE_ENTRIES } else { want as u32 }
    }
    /// Drops of packets without a device (`skb->dev` NULL, e.g. at a socket).
    pub const NO_DEVICE_SLOT: u32 = 1;
    /// Drop reasons counted by value; values at or above `DROP_REASONS - 1` (subsystem reasons
    /// such as mac80211's, which have high bits set) share the last counter.
    pub const DROP_REASONS: u32 = 160;
    /// `.rodata` global: the running kernel's `SKB_CONSUMED` value (from BTF), a normal end of
    /// life that is not counted; `u32::MAX` where the kernel has none.
    pub const DROP_REASON_CONSUMED: &str = "DROP_REASON_CONSUMED";
    /// `SKB_NOT_DROPPED_YET`: a free that is not a drop, on every kernel with drop reasons.
    pub const SKB_NOT_DROPPED_YET: u32 = 0;

    /// Array of one [`TcpCounts`] shared by all CPUs (atomic adds: retransmits and resets are
    /// rare next to packets), [`BPF_F_MMAPABLE`]: TCP retransmits and resets.
    pub const TCP_MAP: &str = "DCMON_TCP";
    /// Address families of [`TcpCounts::retrans_segs`], in index order (the `family` label);
    /// the last is any other family.
    pub const TCP_FAMILIES: [&str; 3] = ["ipv4", "ipv6", "other"];
    /// `AF_INET`.
    pub const AF_INET: u16 = 2;
    /// `AF_INET6`.
    pub const AF_INET6: u16 = 10;

    /// TCP events of the counted network namespace, all CPUs together.
    #[repr(C)]
    #[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
    pub struct TcpCounts {
        /// Segments retransmitted (`tcp_skb_pcount` of each retransmitted skb, as
        /// /proc/net/snmp's RetransSegs counts them), by [`TCP_FAMILIES`] index.
        pub retrans_segs: [u64; 3],
        /// Resets sent (`tcp_send_reset`).
        pub resets_sent: u64,
        /// Resets received (`tcp_receive_reset`).
        pub resets_received: u64,
    }

    /// One interface slot table entry: (namespace, ifindex) `key` has `slot` (slot 0: empty).
    #[repr(C)]
    #[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
    pub struct NetSlot {
        /// The interface.
        pub key: NetKey,
        /// Its slot, 2 to `NET_SLOTS - 1`; 0 marks an empty entry.
        pub slot: u32,
    }

    /// Drops per reason of one interface slot.
    #[repr(C)]
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub struct DropCounts {
        /// Indexed by `enum skb_drop_reason` value (see [`DROP_REASONS`]).
        pub reasons: [u64; DROP_REASONS as usize],
    }

    impl Default for DropCounts {
        fn default() -> Self {
            Self { reasons: [0; DROP_REASONS as usize] }
        }
    }

    /// Home index of interface `key` in the interface slot table, before the table's mask
    /// ([`NET_SLOT_MASK`]). Interfaces of one namespace have consecutive ifindexes, so they
    /// take consecutive entries.
    #[inline(always)]
    pub const fn net_slot_hash(key: NetKey) -> u32 {
        key.ifindex ^ key.netns.wrapping_mul(97)
    }

    /// The latency operation index of a request's `cmd_flags`, or None for ops not timed
    /// (passthrough, zone management).
    #[inline(always)]
    pub const fn lat_op(cmd_flags: u32) -> Option<u32> {
        let op = cmd_flags & REQ_OP_MASK;
        if op >= REQ_OP_DRV_IN {
            None
        } else if op == REQ_OP_READ {
            Some(0)
        } else if op == REQ_OP_FLUSH {
            Some(2)
        } else if op == REQ_OP_DISCARD || op == REQ_OP_SECURE_ERASE {
            Some(3)
        } else if op & 1 == 1 {
            Some(1)
        } else {
            None
        }
    }

    /// The histogram bucket of a latency of `ns` nanoseconds: the bit length of `ns >> LAT_SHIFT`,
    /// capped at the last bucket. A branch-only binary search: BPF has no count-leading-zeros.
    #[inline(always)]
    pub const fn lat_bucket(ns: u64) -> u32 {
        let mut v = ns >> LAT_SHIFT;
        let mut bits = 0;
        if v >= 1 << 32 {
            v >>= 32;
            bits += 32;
        }
        if v >= 1 << 16 {
            v >>= 16;
            bits += 16;
        }
        if v >= 1 << 8 {
            v >>= 8;
            bits += 8;
        }
        if v >= 1 << 4 {
            v >>= 4;
            bits += 4;
        }
        if v >= 1 << 2 {
            v >>= 2;
            bits += 2;
        }
        if v >= 1 << 1 {
            v >>= 1;
            bits += 1;
        }
        bits += v as u32;
        if bits >= LAT_BUCKETS { LAT_BUCKETS - 1 } else { bits }
    }

    /// The exclusive upper bound in nanoseconds of bucket `k` (not the last, which is unbounded).
    pub const fn lat_bucket_bound_ns(k: u32) -> u64 {
        1 << (k + LAT_SHIFT)
    }

    /// Home index of disk `dev` (a [`DiskKey::dev`]) in the slot table. Minors of one major are
    /// consecutive or strided, so they spread; majors are moved apart.
    #[inline(always)]
    pub const fn slot_table_index(dev: u32) -> u32 {
        let major = dev >> 20;
        let minor = dev & 0xf_ffff;
        (minor ^ major.wrapping_mul(97)) & (SLOT_TABLE_ENTRIES - 1)
    }

    /// One slot table entry: disk `dev` (a [`DiskKey::dev`]; 0 = empty) has `slot`.
    #[repr(C)]
    #[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
    pub struct DiskSlot {
        /// The disk, or 0 for an empty entry.
        pub dev: u32,
        /// Its slot, 1 to `DISK_SLOTS - 1`.
        pub slot: u32,
    }

    /// The latency histogram of one (slot, op).
    #[repr(C)]
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub struct LatencyHist {
        /// Completions per bucket (see [`LAT_BUCKETS`]).
        pub buckets: [u64; LAT_BUCKETS as usize],
        /// Sum of the latencies in nanoseconds.
        pub sum_ns: u64,
    }

    impl Default for LatencyHist {
        fn default() -> Self {
            Self { buckets: [0; LAT_BUCKETS as usize], sum_ns: 0 }
        }
    }

    const _: () = assert!(core::mem::size_of::<DiskKey>() == 4);
    const _: () = assert!(core::mem::size_of::<DiskValue>() == 32);
    const _: () = assert!(core::mem::size_of::<NetKey>() == 8);
    const _: () = assert!(core::mem::size_of::<NetValue>() == 32);
    // Map names are limited to 15 bytes plus NUL by the kernel (BPF_OBJ_NAME_LEN).
    const _: () = assert!(DISK_MAP.len() <= 15 && NET_MAP.len() <= 15);
    const _: () = assert!(DISK_LAT_MAP.len() <= 15 && DISK_SLOT_MAP.len() <= 15 && RQ_START_MAP.len() <= 15);
    const _: () = assert!(core::mem::size_of::<DiskSlot>() == 8);
    const _: () = assert!(core::mem::size_of::<NetSlot>() == 12);
    const _: () = assert!(NET_DROP_MAP.len() <= 15 && NET_SLOT_MAP.len() <= 15 && TCP_MAP.len() <= 15);
    const _: () = assert!(OOM_MAP.len() <= 15);
    const _: () = assert!(SLOT_PROBES >= 1);
    const _: () = assert!(core::mem::size_of::<LatencyHist>() == 8 * (LAT_BUCKETS as usize + 1));
    const _: () = assert!(SLOT_TABLE_ENTRIES.is_power_of_two());
    const _: () = assert!(NET_DROP_SLOTS <= NET_SLOTS && NET_SLOTS <= NET_SLOTS_MAX);
    // Whole cache lines a CPU in the per-CPU laid-out arrays (net_slots_for rounds to them).
    const _: () = assert!((DISK_SLOTS as u64 * core::mem::size_of::<DiskValue>() as u64).is_multiple_of(CACHE_LINE));
    const _: () = assert!(CACHE_LINE.is_multiple_of(core::mem::size_of::<NetValue>() as u64));
    const _: () = assert!((NET_SLOTS as u64 * core::mem::size_of::<NetValue>() as u64).is_multiple_of(CACHE_LINE));
    const _: () = assert!((NET_SLOTS_MAX as u64 * core::mem::size_of::<NetValue>() as u64).is_multiple_of(CACHE_LINE));

    // SAFETY: plain-old-data: repr(C), only integers, no padding bytes (sizes asserted above),
    // every bit pattern valid.
    #[cfg(feature = "user")]
    unsafe impl aya::Pod for DiskKey {}
    // SAFETY: as above.
    #[cfg(feature = "user")]
    unsafe impl aya::Pod for DiskValue {}
    // SAFETY: as above.
    #[cfg(feature = "user")]
    unsafe impl aya::Pod for NetKey {}
    // SAFETY: as above.
    #[cfg(feature = "user")]
    unsafe impl aya::Pod for NetValue {}
    // SAFETY: as above.
    #[cfg(feature = "user")]
    unsafe impl aya::Pod for DiskSlot {}
    // SAFETY: as above.
    #[cfg(feature = "user")]
    unsafe impl aya::Pod for LatencyHist {}
    // SAFETY: as above.
    #[cfg(feature = "user")]
    unsafe impl aya::Pod for NetSlot {}
    // SAFETY: as above.
    #[cfg(feature = "user")]
    unsafe impl aya::Pod for DropCounts {}
    // SAFETY: as above.
    #[cfg(feature = "user")]
    unsafe impl aya::Pod for TcpCounts {}
}

#[cfg(test)]
mod tests {
    #[test]
    fn op_groups_follow_op_stat_group() {
        use super::ebpf::{OpGroup, op_group};
        // READ, WRITE, FLUSH, DISCARD, SECURE_ERASE, ZONE_APPEND, WRITE_ZEROES, DRV_IN, DRV_OUT
        let cases = [
            (0, OpGroup::Read),
            (1, OpGroup::Write),
            (2, OpGroup::Other),
            (3, OpGroup::Other),
            (5, OpGroup::Other),
            (7, OpGroup::Write),
            (9, OpGroup::Write),
            (34, OpGroup::Other),
            (35, OpGroup::Other),
        ];
        for (op, want) in cases {
            // Flags above the op bits (REQ_SYNC, REQ_FUA...) must not change the group.
            assert!(op_group(op | 0x0800_0800) == want, "op {op}");
        }
        // Every program says which offsets it reads, and every offset is read by one.
        use super::ebpf::{OFF_CSS_SET_MEMCG, OFFSETS, PROGRAM_OFFSETS, PROGRAMS};
        for (name, _) in PROGRAMS {
            assert!(PROGRAM_OFFSETS.iter().any(|(p, _)| *p == name), "{name} has no offset list");
        }
        let is_global = |g: &str| g == OFF_CSS_SET_MEMCG || OFFSETS.iter().any(|o| o.0 == g);
        for (p, needs) in PROGRAM_OFFSETS {
            assert!(needs.iter().all(|n| is_global(n)), "{p}: {needs:?}");
        }
        let read = |g: &str| PROGRAM_OFFSETS.iter().any(|(_, n)| n.contains(&g));
        assert!(OFFSETS.iter().all(|o| read(o.0)) && read(OFF_CSS_SET_MEMCG));
        let k = super::ebpf::DiskKey::new(259, 3);
        assert_eq!((k.major(), k.minor()), (259, 3));
        // Latency ops: READ, WRITE, FLUSH, DISCARD, SECURE_ERASE, WRITE_ZEROES, DRV_IN.
        use super::ebpf::lat_op;
        let ops = [(0, Some(0)), (1, Some(1)), (2, Some(2)), (3, Some(3)), (5, Some(3)), (9, Some(1)), (34, None)];
        for (op, want) in ops {
            assert_eq!(lat_op(op | 0x0800_0800), want, "op {op}");
        }
    }

    /// The interface counters stay within their kernel memory budget on any host, and a host
    /// with few CPUs gets far more slots than the object's compiled 256.
    #[test]
    fn interface_slots_fit_the_budget_at_any_cpu_count() {
        use super::ebpf::{
            CACHE_LINE, NET_COUNTERS_BUDGET, NET_SLOTS, NET_SLOTS_MAX, NetValue, net_slot_table_entries, net_slots_for,
        };
        let value = core::mem::size_of::<NetValue>() as u64;
        assert_eq!(net_slots_for(2), NET_SLOTS_MAX);
        assert_eq!(net_slots_for(8), NET_SLOTS_MAX);
        assert_eq!(net_slots_for(64), 2048);
        assert_eq!(net_slots_for(256), 512);
        assert_eq!(net_slots_for(8192), NET_SLOTS, "never fewer than the compiled slots");
        assert_eq!(net_slots_for(0), NET_SLOTS_MAX, "a count of 0 is treated as 1");
        assert_eq!(net_slots_for(96), 1364, "4 MiB / (96 x 32 B) = 1365.3, down to whole lines");
        for cpus in [1u32, 2, 3, 7, 16, 96, 128, 255, 256, 512] {
            let slots = net_slots_for(cpus);
            assert!(slots as u64 * cpus as u64 * value <= NET_COUNTERS_BUDGET, "{cpus} CPUs: {slots} slots");
            assert_eq!(slots as u64 * value % CACHE_LINE, 0, "{cpus} CPUs: {slots} slots share a line across CPUs");
            let entries = net_slot_table_entries(slots);
            assert!(entries.is_power_of_two() && entries >= 2 * slots, "{slots} slots: {entries} entries");
        }
    }

    #[test]
    fn request_stamps_spread_and_time_only_their_own_request() {
        extern crate std;
        use std::vec::Vec;

        use super::ebpf::{RQ_START_ENTRIES, rq_latency, rq_stamp, rq_stamp_index};
        // A pool of 1,024 requests 384 bytes apart (a request and its driver data): they fall
        // in nearly as many entries, so requests in flight rarely share one.
        let pool: Vec<u64> = (0..1024u64).map(|i| 0xffff_8881_0a00_0000 + i * 384).collect();
        let mut entries: Vec<u32> = pool.iter().map(|&rq| rq_stamp_index(rq)).collect();
        assert!(entries.iter().all(|&e| e < RQ_START_ENTRIES));
        entries.sort_unstable();
        entries.dedup();
        assert!(entries.len() > 990, "{} entries for 1,024 requests", entries.len());
        // A request's own stamp gives its latency, across the 48-bit wrap of the stored time.
        let (rq, other) = (pool[0], pool[1]);
        for (issued, took) in [(5_000u64, 40_000u64), ((1 << 48) - 10, 25), (u64::MAX - 3, 1_000_000)] {
            let stamp = rq_stamp(rq, issued);
            assert_ne!(stamp, 0);
            assert_eq!(rq_latency(rq, stamp, issued.wrapping_add(took)), Some(took), "issued at {issued}");
        }
        // An empty entry and another request's stamp time nothing.
        assert_eq!(rq_latency(rq, 0, 1_000), None);
        let theirs = rq_stamp(other, 500);
        assert_eq!(rq_latency(rq, theirs, 1_000), None);
        let same_check = pool.iter().filter(|&&o| o != rq && rq_stamp(o, 0) == rq_stamp(rq, 0)).count();
        assert!(same_check <= 1, "{same_check} requests of the pool share rq's check bits");
    }

    #[test]
    fn latency_buckets_are_log2_of_microsecond_units() {
        use super::ebpf::{LAT_BUCKETS, lat_bucket, lat_bucket_bound_ns};
        assert_eq!(lat_bucket(0), 0);
        assert_eq!(lat_bucket(1023), 0);
        assert_eq!(lat_bucket(1024), 1);
        assert_eq!(lat_bucket(2047), 1);
        assert_eq!(lat_bucket(2048), 2);
        assert_eq!(lat_bucket(u64::MAX), LAT_BUCKETS - 1);
        // Every latency lies below its bucket's bound and at or above the previous one's.
        for ns in [1u64, 999, 1024, 5_000, 1_000_000, 47_000_000, 17_179_869_183] {
            let k = lat_bucket(ns);
            assert!(ns < lat_bucket_bound_ns(k), "{ns} in bucket {k}");
            assert!(k == 0 || ns >= lat_bucket_bound_ns(k - 1), "{ns} in bucket {k}");
        }
        assert_eq!(lat_bucket(17_179_869_184), LAT_BUCKETS - 1);
        assert_eq!(lat_bucket_bound_ns(LAT_BUCKETS - 2), 17_179_869_184);
    }
}
