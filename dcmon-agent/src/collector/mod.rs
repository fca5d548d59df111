//! Collectors: one module per data source.
//!
//! # The contract
//! [`Collector::collect`] appends samples to `out` and returns:
//! - `Ok(())`: this round worked.
//! - `Err(CollectError::NotPresent)`: the source does not exist on this host (no such file,
//!   tool or hardware). The scheduler says so once in the log and stops calling it.
//! - `Err(CollectError::Failed)`: this round failed; it is counted in
//!   `dcmon_collector_success` and tried again next round. Samples appended before the error
//!   are kept: a collector reports what it could read.
//!
//! A collector must not panic; if one does anyway, the scheduler catches it, reports it as
//! failed and carries on with the others.
//!
//! # The table
//! Each collector module declares itself in a `pub const SOURCE: Source` near its top: its
//! name, whether it is always on or an exporter switched in the config's `exporters` map, the
//! capabilities it needs, its config section and how it is built. [`SOURCES`] lists them
//! once; [`from_config`], [`capabilities`] (the systemd unit's bounding set), the config
//! [`schema`] (the `exporters` map and the sections, which the config parser is handed), the
//! agent's default [`Config`] and the default config `install` writes are derived from it.
//! Adding a collector: its module with its `SOURCE` and a row in [`SOURCES`]; a config section
//! is a type of its module that implements [`crate::config::Section`], named in its `SOURCE`,
//! and read with [`Config::section`].

pub mod apt;
pub mod attr;
pub mod background;
pub mod disk;
pub mod ebpf_status;
pub mod edac;
pub mod filesystems;
pub mod gpu_xid;
pub mod infiniband;
pub mod ipmi;
pub mod ipmi_sel;
pub mod net;
pub mod netstat;
pub mod nic;
pub mod nvme;
pub mod nvsmi;
pub mod oom_kills;
pub mod os;
pub mod pcie;
pub mod pressure;
pub mod temperature;

use crate::batch::Sample;
use crate::config::{Config, Exporters, Schema, SectionSpec};
use crate::host::Host;

/// Why a collection round produced nothing (or only part).
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// The data source does not exist here; stop asking.
    #[error("not present on this host: {0}")]
    NotPresent(String),
    /// This round failed; try again next round.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl From<crate::host::ReadError> for CollectError {
    /// A missing file means the source is not on this host; any other read error is this
    /// round's failure.
    fn from(e: crate::host::ReadError) -> Self {
        if e.is_not_found() { CollectError::NotPresent(e.to_string()) } else { CollectError::Failed(e.into()) }
    }
}

/// One data source.
pub trait Collector: Send + 'static {
    /// The name in the `collector` label of self-metrics.
    fn name(&self) -> &'static str;
    /// Collect one round of samples into `out` (see the module docs for the error contract).
    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError>;
    /// Whether `collect` can block (device I/O, a tool, a driver call, a file that is not on
    /// procfs or sysfs). Collectors that can run on their own thread under the collector
    /// timeout; those that cannot (reads of files found on procfs and sysfs when the collector
    /// was built, [`crate::host::served_from_kernel_memory`]) run inline on the scheduler's
    /// thread, with no timeout to enforce. Called every round: answer from a stored flag.
    fn may_block(&self) -> bool {
        true
    }
    /// For a one-shot run (`dcmon-agent once`), called before the first round: a collector
    /// whose first result comes from a slow background job (apt-get, ipmitool) waits in that
    /// round for the job, up to the job's own time limit, instead of only briefly. Returns that
    /// limit, so the caller can give the round as long; `None` for collectors that never wait.
    fn wait_for_first_result(&mut self) -> Option<std::time::Duration> {
        None
    }
    /// Whether this collector holds loaded BPF programs: a reload that keeps the eBPF
    /// settings ([`EbpfSettings`]) keeps such collectors, state and all, instead of loading
    /// the programs again.
    fn uses_bpf_programs(&self) -> bool {
        false
    }
    /// The BPF programs this collector was built without because they could not be loaded,
    /// with why (the eBPF status collector's; `check` lists them).
    fn bpf_programs_left_out(&self) -> &[(&'static str, String)] {
        &[]
    }
    /// What the I/O latency programs this collector reads time, and where they take issue
    /// times from (`check` shows it); None for collectors without them.
    fn bpf_latency_timing(&self) -> Option<crate::ebpf::LatencyTiming> {
        None
    }
}

/// One collector as the rest of the agent sees it (see the module docs).
#[derive(Clone, Copy)]
pub struct Source {
    /// The `collector` label of its self-metrics; for an exporter also its key in the
    /// `exporters` map and the key of its config section.
    pub name: &'static str,
    /// When it runs.
    pub switch: Switch,
    /// The Linux capabilities it needs, kept in the systemd unit's bounding set while it runs.
    pub caps: &'static [&'static str],
    /// The type of its config section, under the key `name`.
    pub section: Option<SectionSpec>,
    /// Builds it from the config; `None` for the one [`build`] makes with the eBPF programs.
    pub build: Option<BuildFn>,
}

/// How a table row builds its collector from the host and the config.
pub type BuildFn = fn(&Host, &Config) -> Box<dyn Collector>;

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source").field("name", &self.name).field("switch", &self.switch).finish_non_exhaustive()
    }
}

/// When a collector runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    /// On every host (procfs and sysfs sources).
    Always,
    /// When its key in the config's `exporters` map is true; `default` when the map leaves
    /// the key out.
    Exporter {
        /// On when the config does not say.
        default: bool,
    },
    /// Unless the config's `ebpf` is "off".
    Ebpf,
}

impl Source {
    /// Whether `config` runs this collector.
    pub fn enabled(&self, config: &Config) -> bool {
        match self.switch {
            Switch::Always => true,
            Switch::Exporter { .. } => config.exporters.enabled(self.name),
            Switch::Ebpf => config.ebpf_may_load(),
        }
    }
}

/// Every collector (see the module docs); [`from_config`] builds them in this order.
pub const SOURCES: &[Source] = &[
    ebpf_status::SOURCE,
    os::SOURCE,
    disk::SOURCE,
    net::SOURCE,
    filesystems::SOURCE,
    pressure::SOURCE,
    netstat::SOURCE,
    nic::SOURCE,
    pcie::SOURCE,
    edac::SOURCE,
    infiniband::SOURCE,
    temperature::SOURCE,
    apt::SOURCE,
    nvme::SOURCE,
    ipmi::SOURCE,
    nvsmi::SOURCE,
    gpu_xid::SOURCE,
];

/// What the config file holds for the table: each exporter's switch in the `exporters` map
/// with its default, and each config section under its collector's name, in table order.
pub fn schema() -> Schema {
    let exporters = SOURCES.iter().filter_map(|s| match s.switch {
        Switch::Exporter { default } => Some((s.name, default)),
        _ => None,
    });
    let sections = SOURCES.iter().filter_map(|s| s.section.map(|section| (s.name, section)));
    Schema { exporters: exporters.collect(), sections: sections.collect() }
}

impl Default for Config {
    /// The agent's defaults: the spec's, with every exporter and section of the table at its
    /// default.
    fn default() -> Self {
        Config::defaults(&schema())
    }
}

impl Exporters {
    /// Every exporter of the table off.
    pub fn none() -> Self {
        Exporters::new(schema().exporters.into_iter().map(|(name, _)| (name, false)).collect())
    }
}

/// The capabilities the collectors `config` enables need, in table order, each once: the
/// systemd unit keeps these in its bounding set and drops every other.
pub fn capabilities(config: &Config) -> Vec<&'static str> {
    let mut caps: Vec<&'static str> = Vec::new();
    // Remote commands add theirs only for the types allowed (README, Remote commands).
    let commands = config.commands.caps();
    for cap in SOURCES.iter().filter(|s| s.enabled(config)).flat_map(|s| s.caps).chain(commands.iter()) {
        if !caps.contains(cap) {
            caps.push(cap);
        }
    }
    caps
}

/// What the eBPF collectors are built from. A reload that leaves these alone keeps the
/// loaded programs and the collectors' baselines ([`rebuild`]).
#[derive(Debug, Clone, PartialEq)]
pub struct EbpfSettings {
    mode: crate::config::EbpfMode,
    host_root: std::path::PathBuf,
    disks: crate::config::DeviceFilter,
    interfaces: crate::config::DeviceFilter,
}

impl EbpfSettings {
    /// The eBPF settings of `config`.
    pub fn of(config: &Config) -> Self {
        Self {
            mode: config.ebpf,
            host_root: config.host_root.clone(),
            disks: config.disks.clone(),
            interfaces: config.interfaces.clone(),
        }
    }
}

/// The collectors this config enables, with the eBPF mode decided: `"auto"` tries the BPF
/// programs and falls back to procfs with one log line saying why (the eBPF status collector
/// then reports `dcmon_ebpf_active` 0), `"on"` returns an error when they cannot be used,
/// `"off"` never loads them and has no eBPF collector at all. Disk and network are decided
/// apart: when only one's programs load (`dcmon_common::ebpf::DISK_PROGRAMS`, `NET_PROGRAMS`),
/// that one is counted by them and the other read from procfs ("on" refuses that too).
pub fn build(config: &Config) -> anyhow::Result<Vec<Box<dyn Collector>>> {
    use crate::config::EbpfMode;
    use crate::ebpf::Probes;
    use dcmon_common::ebpf::{DISK_PROGRAMS, NET_PROGRAMS};
    use ebpf_status::EbpfStatusCollector;
    use std::sync::Arc;
    let host = Host::new(&config.host_root);
    let probes = match config.ebpf {
        EbpfMode::Off => None,
        mode => match net::ebpf::own_netns(&host).and_then(|netns| {
            // The host root's, where it has one: a container that sees the host's /sys only
            // there may lack its own. Only a regular file: reading a FIFO would never end.
            let vmlinux = std::path::Path::new(crate::ebpf::load::VMLINUX_BTF);
            let btf = Some(host.path(vmlinux)).filter(|p| p.is_file()).unwrap_or_else(|| vmlinux.to_owned());
            let p = Arc::new(Probes::attach_with_btf(&btf, Some(netns))?);
            let mut ebpf: Vec<Box<dyn Collector>> = Vec::new();
            let (disk, net) = (p.counts(&DISK_PROGRAMS), p.counts(&NET_PROGRAMS));
            if let Ok(()) = &disk {
                ebpf.push(Box::new(disk::ebpf::EbpfDiskCollector::new(host.clone(), config.disks.clone(), p.clone())?));
            }
            if let Ok(()) = &net {
                ebpf.push(Box::new(net::ebpf::EbpfNetCollector::new(
                    host.clone(),
                    config.interfaces.clone(),
                    p.clone(),
                )?));
            }
            match (disk, net) {
                (Err(disk), Err(net)) => Err(anyhow::anyhow!("{disk}; {net}")),
                (Err(why), Ok(())) | (Ok(()), Err(why)) if mode == EbpfMode::On => Err(anyhow::anyhow!("{why}")),
                (Err(why), Ok(())) => {
                    tracing::warn!("eBPF counts network I/O, disk I/O is read from procfs: {why}");
                    Ok((p, ebpf))
                }
                (Ok(()), Err(why)) => {
                    tracing::warn!("eBPF counts disk I/O, network I/O is read from procfs: {why}");
                    Ok((p, ebpf))
                }
                (Ok(()), Ok(())) => {
                    tracing::info!("eBPF mode: disk and network I/O counted by BPF programs");
                    Ok((p, ebpf))
                }
            }
        }) {
            Ok(ok) => Some(ok),
            Err(e) if mode == EbpfMode::On => {
                return Err(e.context("config `ebpf` is \"on\" but eBPF cannot be used"));
            }
            Err(e) => {
                tracing::warn!("eBPF unavailable, using procfs for disk and network I/O: {e:#}");
                None
            }
        },
    };
    Ok(match probes {
        Some((p, mut ebpf)) => {
            ebpf.push(Box::new(EbpfStatusCollector::new(host, Some(p))));
            rebuild(config, ebpf)
        }
        None if config.ebpf == EbpfMode::Off => from_config(config),
        None => {
            let mut collectors = from_config(config);
            collectors.push(Box::new(EbpfStatusCollector::new(host, None)));
            collectors
        }
    })
}

/// The collectors `config` enables, with `ebpf` (collectors that hold loaded BPF programs,
/// kept from before a reload, see [`EbpfSettings`]) in place of the procfs collectors of the
/// same names.
pub fn rebuild(config: &Config, ebpf: Vec<Box<dyn Collector>>) -> Vec<Box<dyn Collector>> {
    let mut collectors = from_config(config);
    collectors.retain(|c| !ebpf.iter().any(|e| e.name() == c.name()));
    collectors.extend(ebpf);
    collectors
}

/// The procfs collectors this config enables, in reporting order.
pub fn from_config(config: &Config) -> Vec<Box<dyn Collector>> {
    let host = Host::new(&config.host_root);
    SOURCES.iter().filter(|s| s.enabled(config)).filter_map(|s| s.build).map(|build| build(&host, config)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row's name is the `collector` label of what it builds, and names are unique (they
    /// key the `exporters` map and the config sections).
    #[test]
    fn each_row_builds_the_collector_of_its_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config { host_root: dir.path().to_owned(), ..Config::default() };
        let host = Host::new(&config.host_root);
        for source in SOURCES {
            if let Some(build) = source.build {
                assert_eq!(build(&host, &config).name(), source.name);
            }
            assert_eq!(SOURCES.iter().filter(|s| s.name == source.name).count(), 1, "{source:?}");
        }
        let built: Vec<&str> = from_config(&config).iter().map(|c| c.name()).collect();
        assert_eq!(
            built,
            [
                "os",
                "disk",
                "net",
                "filesystems",
                "pressure",
                "netstat",
                "nic",
                "pcie",
                "edac",
                "infiniband",
                "temperature",
                "apt",
                "nvme",
                "ipmi",
                "nvsmi",
                "gpu_xid"
            ]
        );
        let mut none = Config { exporters: Exporters::none(), ..config };
        let built: Vec<&str> = from_config(&none).iter().map(|c| c.name()).collect();
        assert_eq!(built, ["os", "disk", "net"]);
        none.exporters.set("ipmi", true);
        assert_eq!(from_config(&none).last().map(|c| c.name()), Some("ipmi"));
    }
}
