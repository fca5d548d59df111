//! The `ebpf` collector: whether the BPF programs feed the disk and network metrics
//! (`dcmon_ebpf_active`), which programs are attached (`dcmon_ebpf_program_attached`), the
//! programs' statistics, and the OOM kills the programs count
//! (`oom_kills_total`, [`super::oom_kills`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use dcmon_common::collector_names;
use dcmon_common::ebpf::PROGRAMS;

use super::oom_kills::OomKills;
use super::{CollectError, Collector};
use crate::batch::{Labels, Sample, Value};
use crate::ebpf::{Probes, ProgramStats};
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
    /// The programs' counters as last read, each with its index in [`PROGRAMS`], and when.
    stats: Vec<(usize, ProgramStats)>,
    stats_read: Option<Instant>,
    /// Each program's `program` label, in [`PROGRAMS`] order: made once and shared by every
    /// round's samples (README, Performance).
    program_labels: [Labels; PROGRAMS.len()],
    /// Whether each program (in [`PROGRAMS`] order) is attached: fixed at the load, so not
    /// looked up among the failed programs every round.
    attached: [bool; PROGRAMS.len()],
}

/// How old the programs' counters may get before they are read again while
/// `kernel.bpf_stats_enabled` is off, when only the miss counters are sent. Reading them takes
/// one `BPF_OBJ_GET_INFO_BY_FD` per program, which at a 1 s interval is most of the eBPF mode's
/// syscalls (README, Performance); at the default 30 s interval every round reads them.
pub const STATS_MAX_AGE: Duration = Duration::from_secs(10);

/// Rounds start on a fixed schedule, so the round that comes [`STATS_MAX_AGE`] after a read can
/// find it a little less old than that: counted as due.
const STATS_AGE_SLACK: Duration = Duration::from_millis(500);

/// Whether the programs' counters are read this round: every round while their run counts are
/// sent (`bpf_stats` on), else once the last reading (if any) is [`STATS_MAX_AGE`] old.
fn stats_due(last_read: Option<Duration>, bpf_stats_on: bool) -> bool {
    bpf_stats_on || last_read.is_none_or(|age| age + STATS_AGE_SLACK >= STATS_MAX_AGE)
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
        Self {
            stats_enabled,
            buf: String::new(),
            inline,
            oom,
            stats: Vec::new(),
            stats_read: None,
            program_labels: PROGRAMS.map(|(program, _)| Labels::shared([("program", program.into())])),
            attached: PROGRAMS.map(|(program, _)| probes.as_ref().is_some_and(|p| p.attached(program))),
            probes,
        }
    }

    /// A sample of program `i` of [`PROGRAMS`], with its shared label.
    fn program_sample(&self, name: &'static str, i: usize, value: Value) -> Sample {
        Sample { name, value, labels: self.program_labels[i].clone() }
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
        for (i, attached) in self.attached.iter().enumerate() {
            let value = Value::Gauge(if *attached { 1.0 } else { 0.0 });
            out.push(self.program_sample("dcmon_ebpf_program_attached", i, value));
        }
        if let Some(oom) = &mut self.oom {
            oom.samples(out)?;
        }
        let bpf_stats_on = self.stats_enabled.read_into(&mut self.buf).is_ok() && self.buf.trim() == "1";
        if stats_due(self.stats_read.map(|t| t.elapsed()), bpf_stats_on) {
            // Each program's index found once per reading, not per sample every round.
            let index = |s: &ProgramStats| PROGRAMS.iter().position(|&(p, _)| p == s.program);
            let stats = probes.program_stats()?.into_iter().filter_map(|s| Some((index(&s)?, s)));
            self.stats = stats.collect();
            self.stats_read = Some(Instant::now());
        }
        for (i, s) in &self.stats {
            if let Some(misses) = s.recursion_misses {
                out.push(self.program_sample("dcmon_ebpf_program_missed_total", *i, Value::Count(misses)));
            }
        }
        // Run time is only accounted while the sysctl is on; without it the counters are
        // zeros that would read as "costs nothing", so leave them out.
        if !bpf_stats_on {
            return Ok(());
        }
        for (i, s) in &self.stats {
            out.push(self.program_sample("dcmon_ebpf_program_runs_total", *i, Value::Count(s.run_count)));
            let seconds = Value::Gauge(s.run_time_ns as f64 / 1e9);
            out.push(self.program_sample("dcmon_ebpf_program_run_seconds_total", *i, seconds));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_counters_are_read_every_round_while_bpf_stats_is_on_else_every_max_age() {
        assert!(stats_due(None, false), "the first round reads them");
        assert!(stats_due(None, true));
        for age in [Duration::ZERO, Duration::from_secs(1), STATS_MAX_AGE] {
            assert!(stats_due(Some(age), true), "bpf_stats on, {age:?}");
        }
        assert!(!stats_due(Some(Duration::ZERO), false));
        assert!(!stats_due(Some(Duration::from_secs(1)), false), "a 1 s interval reuses the last reading");
        assert!(!stats_due(Some(STATS_MAX_AGE - Duration::from_secs(1)), false));
        // A round on schedule may start a little early: still due.
        assert!(stats_due(Some(STATS_MAX_AGE - Duration::from_millis(100)), false));
        assert!(stats_due(Some(STATS_MAX_AGE), false));
        assert!(stats_due(Some(Duration::from_secs(30)), false), "the default interval reads every round");
    }

    #[test]
    fn a_programs_label_is_made_once_and_shared_by_every_rounds_samples() {
        let collector = EbpfStatusCollector::new(Host::new("/"), None);
        for (i, (program, _)) in PROGRAMS.iter().enumerate() {
            let a = collector.program_sample("dcmon_ebpf_program_attached", i, Value::Gauge(1.0));
            let b = collector.program_sample("dcmon_ebpf_program_missed_total", i, Value::Count(0));
            assert_eq!(a.labels, [("program", (*program).into())]);
            let (Labels::Shared(a), Labels::Shared(b)) = (&a.labels, &b.labels) else { panic!("{a:?} {b:?}") };
            assert!(Arc::ptr_eq(a, b), "{program}");
        }
    }

    fn program_values(out: &[Sample], name: &str) -> Vec<(String, u64)> {
        out.iter().filter(|s| s.name == name).map(|s| (s.labels[0].1.to_string(), s.value.as_f64() as u64)).collect()
    }

    /// The programs' counters on the attached programs: the miss counters every round (also
    /// the rounds that reuse the last reading), the run counts only while bpf_stats is on, and
    /// then read fresh every round.
    #[test]
    fn program_counters_come_from_the_attached_programs() {
        let required = dcmon_tests::privilege::ebpf_required();
        let skip = |why: String| {
            assert!(!required, "DCMON_REQUIRE_EBPF=1 but {why}");
            eprintln!("SKIP program_counters_come_from_the_attached_programs: {why}");
        };
        let probes = match Probes::attach(None) {
            Ok(p) => Arc::new(p),
            Err(e) => return skip(format!("eBPF failed: {e}")),
        };
        let attached: Vec<String> =
            PROGRAMS.iter().filter(|(p, _)| probes.attached(p)).map(|(p, _)| (*p).to_owned()).collect();
        let mut collector = EbpfStatusCollector::new(Host::new("/"), Some(Arc::clone(&probes)));
        let stats_on_elsewhere =
            std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|v| v.trim() == "1");
        let mut rounds = Vec::new();
        for _ in 0..2 {
            let mut out = Vec::new();
            collector.collect(&mut out).expect("collect");
            rounds.push(out);
        }
        for out in &rounds {
            let missed = program_values(out, "dcmon_ebpf_program_missed_total");
            assert_eq!(missed.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(), attached, "{out:?}");
            if !stats_on_elsewhere {
                assert!(program_values(out, "dcmon_ebpf_program_runs_total").is_empty(), "{out:?}");
            }
        }
        // The agent sends run counts while the sysctl is 1 (BPF_ENABLE_STATS alone counts but
        // leaves the sysctl at 0): set it for the rest of the test, and put it back after.
        struct Sysctl(String);
        impl Drop for Sysctl {
            fn drop(&mut self) {
                let _ = std::fs::write(STATS_SYSCTL, &self.0);
            }
        }
        const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
        let was = std::fs::read_to_string(STATS_SYSCTL).expect("bpf_stats_enabled");
        if let Err(e) = std::fs::write(STATS_SYSCTL, "1") {
            return skip(format!("setting {STATS_SYSCTL}: {e}"));
        }
        let _restore = Sysctl(was);
        let runs_of = |collector: &mut EbpfStatusCollector| {
            let mut out = Vec::new();
            collector.collect(&mut out).expect("collect");
            let runs = program_values(&out, "dcmon_ebpf_program_runs_total");
            assert_eq!(runs.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(), attached, "{out:?}");
            runs.into_iter().find(|(p, _)| p == dcmon_common::ebpf::PROG_NETIF_RECEIVE_SKB).map(|(_, n)| n)
        };
        let before = runs_of(&mut collector).expect("netif_receive_skb attached");
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        for _ in 0..10 {
            tx.send_to(b"x", rx.local_addr().expect("addr")).expect("send");
            rx.recv(&mut [0u8; 8]).expect("recv");
        }
        // At once, well within STATS_MAX_AGE: read again because the run counts are sent.
        let after = runs_of(&mut collector).expect("netif_receive_skb attached");
        assert!(after >= before + 10, "netif_receive_skb runs {before} -> {after} after 10 loopback packets");
    }
}
