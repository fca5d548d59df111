//! Types shared by the kernel side (dcmon-ebpf) and the userspace agent.
//!
//! Everything here must stay `#![no_std]` and layout-stable: the BPF programs and the agent
//! both compile these definitions, and a map written by one is read by the other byte for byte.
#![no_std]

/// Names of the collectors as they appear in the `collector` label of self-metrics.
pub mod collector_names {
    /// Load average, CPU usage and memory from procfs.
    pub const OS: &str = "os";
    /// Per-device disk I/O.
    pub const DISK: &str = "disk";
    /// Per-interface network I/O.
    pub const NET: &str = "net";
    /// APT pending upgrades, reboot flag and package list age.
    pub const APT: &str = "apt";
    /// NVMe SMART/health per controller.
    pub const NVME: &str = "nvme";
    /// IPMI sensors through ipmitool.
    pub const IPMI: &str = "ipmi";
    /// NVIDIA GPUs through NVML or nvidia-smi.
    pub const NVSMI: &str = "nvsmi";
}

/// Linux sector size used by /proc/diskstats and block-layer tracepoints, independent of the
/// device's logical block size.
pub const SECTOR_BYTES: u64 = 512;

#[cfg(test)]
mod tests {
    #[test]
    fn sector_is_512_bytes() {
        assert_eq!(super::SECTOR_BYTES, 512);
    }
}
