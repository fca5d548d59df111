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
    /// Per-CPU hash map `DiskKey -> DiskValue`, filled on block request completion.
    pub const DISK_MAP: &str = "DCMON_DISK";
    /// Per-CPU hash map `NetKey -> NetValue`, filled on packet receive and transmit.
    pub const NET_MAP: &str = "DCMON_NET";
    /// Most disks tracked; a full map stops counting new disks (existing ones keep counting).
    pub const DISK_MAP_ENTRIES: u32 = 4096;
    /// Most (namespace, interface) pairs tracked: container hosts have many veths.
    pub const NET_MAP_ENTRIES: u32 = 65536;

    /// `tp_btf/block_rq_complete`: counts completed reads and writes per disk.
    pub const PROG_BLOCK_RQ_COMPLETE: &str = "block_rq_complete";
    /// `tp_btf/netif_receive_skb`: counts received packets and bytes per interface.
    pub const PROG_NETIF_RECEIVE_SKB: &str = "netif_receive_skb";
    /// `tp_btf/net_dev_xmit`: counts transmitted packets and bytes per interface.
    pub const PROG_NET_DEV_XMIT: &str = "net_dev_xmit";
    /// (program name, kernel tracepoint it attaches to) for every program in the object.
    pub const PROGRAMS: [(&str, &str); 3] = [
        (PROG_BLOCK_RQ_COMPLETE, "block_rq_complete"),
        (PROG_NETIF_RECEIVE_SKB, "netif_receive_skb"),
        (PROG_NET_DEV_XMIT, "net_dev_xmit"),
    ];

    /// Kernel struct field offsets the programs read, as `.rodata` globals the loader sets from
    /// the running kernel's BTF (layouts differ between kernels and configs). Each global is a
    /// `u32` byte offset; the entries are `(global, struct, dotted field path, bytes read)`.
    pub const OFFSETS: [(&str, &str, &str, u32); 11] = [
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
    ];

    /// `.rodata` global: count only interfaces of the network namespace with this inode number
    /// (the agent's own, whose /proc/net/dev it reports); 0 counts every namespace. Container
    /// traffic then costs no map update and cannot fill the map.
    pub const NETNS_FILTER: &str = "NETNS_FILTER";

    /// `REQ_OP_MASK` (include/linux/blk_types.h): the low 8 bits of `cmd_flags` are the op.
    pub const REQ_OP_MASK: u32 = 0xff;
    /// `REQ_OP_READ`.
    pub const REQ_OP_READ: u32 = 0;
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
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
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

    const _: () = assert!(core::mem::size_of::<DiskKey>() == 4);
    const _: () = assert!(core::mem::size_of::<DiskValue>() == 32);
    const _: () = assert!(core::mem::size_of::<NetKey>() == 8);
    const _: () = assert!(core::mem::size_of::<NetValue>() == 32);
    // Map names are limited to 15 bytes plus NUL by the kernel (BPF_OBJ_NAME_LEN).
    const _: () = assert!(DISK_MAP.len() <= 15 && NET_MAP.len() <= 15);

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
        let k = super::ebpf::DiskKey::new(259, 3);
        assert_eq!((k.major(), k.minor()), (259, 3));
    }
}
