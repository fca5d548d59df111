//! The `ebpf` collector: whether the BPF programs feed the disk and network metrics
//! (`dcmon_ebpf_active`), which programs are attached (`dcmon_ebpf_program_attached`), the
//! programs' statistics, and the OOM kills the programs count
//! (`oom_kills_total`, [`super::oom_kills`]).

use std::sync::Arc;

use dcmon_common::collector_names;
use dcmon_common::ebpf::PROGRAMS;

use super::oom_kills::OomKills;
use super::{CollectError, Collector};
use crate::batch::Sample;
use crate::ebpf::Probes;
use crate::host::{Host, OpenFile, served_from_kernel_memory};

/// The eBPF status collector (`dcmon_ebpf_active`), which [`super::build`] makes with the BPF
/// programs. First in the table so its capabilities lead the unit's bounding set.
pub const SOURCE: super::Source = super::Source {
    name: dcmon_common::collector_names::EBPF,
    switch: super::Switch::Ebpf,
    caps: &["CAP_BPF", "CAP_PERFMON", "CAP_DAC_READ_SEARCH"],
    section: None,
    build: None,
};

/// `dcmon_ebpf_active`, and the programs' run count and time when `kernel.bpf_stats_enabled`.
#[derive(Debug)]
pub struct EbpfStatusCollector {
    probes: Option<Arc<Probes>>,
    /// `kernel.bpf_stats_enabled`, kept open: it is read every round.
    stats_enabled: OpenFile,
    buf: String,
    /// Whether `stats_enabled` is on procfs (see [`served_from_kernel_memory`]).
    inline: bool,
    /// OOM kills by job, with the programs.
    oom: Option<OomKills>,
}

impl EbpfStatusCollector {
    /// Reports eBPF as active when `probes` is some.
    pub fn new(host: Host, probes: Option<Arc<Probes>>) -> Self {
        let stats_enabled = OpenFile::new(&host, "/proc/sys/kernel/bpf_stats_enabled");
        // Without the programs it reads nothing.
        let inline = probes.is_none() || served_from_kernel_memory(collector_names::EBPF, [stats_enabled.path()]);
        let oom = probes.as_ref().and_then(|p| {
            OomKills::new(&host, Arc::clone(p)).inspect_err(|e| tracing::warn!("OOM kills not reported: {e:#}")).ok()
        });
        Self { probes, stats_enabled, buf: String::new(), inline, oom }
    }
}

impl Collector for EbpfStatusCollector {
    fn name(&self) -> &'static str {
        collector_names::EBPF
    }

    /// Not when its files are on procfs and sysfs: map lookups and reads of kernel memory.
    fn may_block(&self) -> bool {
        !self.inline
    }

    fn uses_bpf_programs(&self) -> bool {
        self.probes.is_some()
    }

    fn bpf_programs_left_out(&self) -> &[(&'static str, String)] {
        self.probes.as_ref().map_or(&[], |p| p.failed_programs())
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        out.push(Sample::gauge("dcmon_ebpf_active", if self.probes.is_some() { 1.0 } else { 0.0 }));
        let Some(probes) = &self.probes else {
            return Ok(());
        };
        for (program, _) in PROGRAMS {
            let attached = if probes.attached(program) { 1.0 } else { 0.0 };
            out.push(Sample::gauge("dcmon_ebpf_program_attached", attached).label("program", program));
        }
        if let Some(oom) = &mut self.oom {
            oom.samples(out)?;
        }
        let stats = probes.program_stats()?;
        for s in &stats {
            if let Some(misses) = s.recursion_misses {
                out.push(Sample::count("dcmon_ebpf_program_missed_total", misses).label("program", s.program));
            }
        }
        // Run time is only accounted while the sysctl is on; without it the counters are
        // zeros that would read as "costs nothing", so leave them out.
        if self.stats_enabled.read_into(&mut self.buf).is_err() || self.buf.trim() != "1" {
            return Ok(());
        }
        for s in stats {
            out.push(Sample::count("dcmon_ebpf_program_runs_total", s.run_count).label("program", s.program));
            out.push(
                Sample::gauge("dcmon_ebpf_program_run_seconds_total", s.run_time_ns as f64 / 1e9)
                    .label("program", s.program),
            );
        }
        Ok(())
    }
}
