//! GPU XID errors as counters (`gpu_xid_errors_total` per GPU and code), from two sources on
//! their own threads: the kernel log ([`kmsg`], read from the start of the ring buffer at
//! launch, then followed) and NVML's XID events ([`events`]). The same XID seen by both is
//! counted once ([`ledger`]), and the counts are kept across restarts within one boot.
//!
//! `collect()` never waits on either source: it reports the counts so far. The kernel log sees
//! XIDs when NVML hangs or is absent and those logged before the agent started; NVML sees them
//! when the kernel log cannot be read (no CAP_SYSLOG under `kernel.dmesg_restrict=1`, a
//! container without /dev/kmsg).

pub mod events;
pub mod kmsg;
pub mod ledger;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::nvsmi::NvsmiConfig;
use super::{CollectError, Collector};
use crate::batch::Sample;
use crate::config::{Limit, Section, SectionSpec};
use crate::host::Host;
use ledger::{GpuIdentity, Ledger, PciAddr, Sighting, Source};

/// This collector's row in the table ([`super::SOURCES`]).
pub const SOURCE: super::Source = super::Source {
    name: "gpu_xid",
    switch: super::Switch::Exporter { default: true },
    // /dev/kmsg under kernel.dmesg_restrict=1.
    caps: &["CAP_SYSLOG"],
    section: Some(SectionSpec::of::<GpuXidConfig>()),
    build: Some(|host, config| {
        let nvml_library = config.section::<NvsmiConfig>().nvml_library.clone();
        Box::new(GpuXidCollector::new(host.clone(), &config.section::<GpuXidConfig>(), nvml_library))
    }),
};

/// The `gpu_xid` section. NVML is the library `nvsmi.nvml_library` names.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct GpuXidConfig {
    /// The kernel log device.
    pub kmsg: PathBuf,
    /// Where the counts are kept across restarts within one boot.
    pub state_file: PathBuf,
}

impl Default for GpuXidConfig {
    fn default() -> Self {
        Self { kmsg: PathBuf::from("/dev/kmsg"), state_file: PathBuf::from("/var/lib/dcmon/gpu-xid.state") }
    }
}

impl Section for GpuXidConfig {
    fn durations(&self) -> Vec<(&'static str, u64, Limit)> {
        Vec::new()
    }
}

/// The loaded NVIDIA kernel module (sysfs); with NVML absent too, there is no GPU to watch.
const NVIDIA_MODULE: &str = "/sys/module/nvidia";

/// Identifies this boot: counts saved under another boot id start from zero.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// How long a one-shot run waits for both sources to have read what is already there.
const FIRST_RESULT_WAIT: Duration = Duration::from_secs(5);

/// What the threads and `collect()` share.
#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    /// Notified when a source has read what was pending.
    changed: Condvar,
}

#[derive(Debug)]
struct Inner {
    ledger: Ledger,
    kmsg_caught_up: bool,
    /// `Some(true)` once NVML delivers events, `Some(false)` when it cannot.
    nvml_up: Option<bool>,
    nvml_settled: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic on a source thread leaves the counts consistent (each update is one call).
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Microseconds on CLOCK_MONOTONIC (the clock of the kernel log's timestamps, boot-relative).
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1000
}

struct KmsgToLedger(Arc<Shared>);

impl kmsg::KmsgSink for KmsgToLedger {
    fn xid(&mut self, seq: u64, line: kmsg::XidLine, ts_us: u64, live: bool) {
        let at_us = if live { monotonic_us() } else { ts_us };
        let sighting = Sighting { source: Source::Kmsg, gpu: line.gpu, xid: line.xid, at_us, live };
        self.0.lock().ledger.kmsg(seq, sighting);
    }

    fn caught_up(&mut self) {
        let mut inner = self.0.lock();
        inner.kmsg_caught_up = true;
        inner.ledger.past_read();
        self.0.changed.notify_all();
    }
}

struct NvmlToLedger(Arc<Shared>);

impl events::NvmlSink for NvmlToLedger {
    fn gpus(&mut self, gpus: Vec<GpuIdentity>) {
        let mut inner = self.0.lock();
        inner.nvml_up = Some(true);
        inner.ledger.set_gpus(gpus);
    }

    fn xid(&mut self, gpu: PciAddr, xid: u32) {
        let sighting = Sighting { source: Source::Nvml, gpu, xid, at_us: monotonic_us(), live: true };
        self.0.lock().ledger.nvml(sighting);
    }

    fn settled(&mut self) {
        let mut inner = self.0.lock();
        inner.nvml_up.get_or_insert(false);
        inner.nvml_settled = true;
        self.0.changed.notify_all();
    }
}

/// The source threads, told to stop when this is dropped (each ends within a wait).
#[derive(Debug)]
struct Running {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The GPU XID collector.
#[derive(Debug)]
pub struct GpuXidCollector {
    host: Host,
    kmsg: PathBuf,
    state_file: PathBuf,
    nvml_library: Option<PathBuf>,
    running: Option<Running>,
    first_wait: Option<Duration>,
}

impl GpuXidCollector {
    /// A collector with the `gpu_xid` section and NVML at `nvml_library` (the loader's
    /// default names when `None`). Nothing starts until the first round.
    pub fn new(host: Host, config: &GpuXidConfig, nvml_library: Option<PathBuf>) -> Self {
        Self {
            host,
            kmsg: config.kmsg.clone(),
            state_file: config.state_file.clone(),
            nvml_library,
            running: None,
            first_wait: None,
        }
    }

    fn start(&self) -> Result<Running, CollectError> {
        let boot_id = match self.host.read_to_string(BOOT_ID) {
            Ok(id) => Some(id.trim().to_owned()),
            Err(e) => {
                tracing::warn!("{e}: GPU XID counts start from zero at each start, not each boot");
                None
            }
        };
        let ledger = Ledger::load(boot_id.is_some().then_some(self.state_file.as_path()), boot_id.as_deref());
        let inner = Inner { ledger, kmsg_caught_up: false, nvml_up: None, nvml_settled: false };
        let shared = Arc::new(Shared { inner: Mutex::new(inner), changed: Condvar::new() });
        let stop = Arc::new(AtomicBool::new(false));
        let spawn = |name: &str, work: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(work)
                .map_err(|e| CollectError::Failed(anyhow::anyhow!("cannot start the {name} thread: {e}")))
        };
        let (library, sink, flag) = (self.nvml_library.clone(), NvmlToLedger(shared.clone()), stop.clone());
        spawn(
            "dcmon-nvml-xid",
            Box::new(move || {
                let mut sink = sink;
                events::run(library.as_deref(), &super::nvsmi::DEFAULT_LIBRARIES, &mut sink, &flag);
            }),
        )?;
        let (path, sink, flag) = (self.kmsg.clone(), KmsgToLedger(shared.clone()), stop.clone());
        spawn(
            "dcmon-kmsg",
            Box::new(move || {
                let mut sink = sink;
                kmsg::follow(&path, &mut sink, &flag);
            }),
        )?;
        Ok(Running { shared, stop })
    }

    fn driver_loaded(&self) -> bool {
        self.host.path(NVIDIA_MODULE).exists()
    }
}

impl Drop for GpuXidCollector {
    /// What the sources counted since the last round is saved, so a stop between rounds loses
    /// no NVML event (the kernel log is read again at the next start anyway).
    fn drop(&mut self) {
        if let Some(running) = self.running.take()
            && let Err(e) = running.shared.lock().ledger.save_if_changed()
        {
            tracing::warn!("GPU XID counts not saved: {e}");
        }
    }
}

/// Wait on `shared` until `done` holds or `deadline` passes.
fn wait_until<'a>(
    shared: &'a Shared,
    mut inner: MutexGuard<'a, Inner>,
    deadline: Instant,
    done: impl Fn(&Inner) -> bool,
) -> MutexGuard<'a, Inner> {
    while !done(&inner) {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
        inner = shared.changed.wait_timeout(inner, left).unwrap_or_else(PoisonError::into_inner).0;
    }
    inner
}

impl Collector for GpuXidCollector {
    fn name(&self) -> &'static str {
        SOURCE.name
    }

    fn wait_for_first_result(&mut self) -> Option<Duration> {
        self.first_wait = Some(FIRST_RESULT_WAIT);
        Some(FIRST_RESULT_WAIT)
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        if self.running.is_none() {
            self.running = Some(self.start()?);
        }
        let Some(running) = &self.running else { return Ok(()) };
        let shared = Arc::clone(&running.shared);
        let mut inner = shared.lock();
        if let Some(wait) = self.first_wait.take() {
            inner = wait_until(&shared, inner, Instant::now() + wait, |i| i.kmsg_caught_up && i.nvml_settled);
        }
        if inner.nvml_up == Some(false) && !self.driver_loaded() {
            drop(inner);
            self.running = None;
            return Err(CollectError::NotPresent(format!(
                "no NVIDIA driver ({} absent, NVML not loaded)",
                self.host.path(NVIDIA_MODULE).display()
            )));
        }
        inner.ledger.prune(monotonic_us());
        out.extend(inner.ledger.samples());
        inner.ledger.save_if_changed().map_err(|e| CollectError::Failed(anyhow::anyhow!(e)))
    }
}

#[cfg(test)]
mod tests;
