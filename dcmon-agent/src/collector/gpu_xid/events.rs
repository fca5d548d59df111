//! NVML's XID events on one long-lived thread: NVML loaded, the GPUs enumerated (their labels),
//! an event set registered for `nvmlEventTypeXidCriticalError` on each, then a blocking
//! `nvmlEventSetWait_v2` with a timeout in a loop: the thread sleeps in the driver until an
//! event comes, and collection never waits on it.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::event::EventSet;

use super::ledger::{GpuIdentity, PciAddr};

/// The first wait is short, so a one-shot run learns soon that no event is pending.
const FIRST_WAIT_MS: u32 = 100;
/// Then each wait sleeps this long at most before the stop flag is looked at again.
const WAIT_MS: u32 = 5000;
/// After a failed wait (a GPU lost), the next one comes after this, doubling up to the cap.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(60);

/// What the event thread reports.
pub trait NvmlSink {
    /// The GPUs NVML enumerates, with the labels the NVIDIA collector gives them.
    fn gpus(&mut self, gpus: Vec<GpuIdentity>);
    /// An XID event on `gpu`.
    fn xid(&mut self, gpu: PciAddr, xid: u32);
    /// No event was pending (the first wait timed out), or NVML cannot deliver events.
    fn settled(&mut self);
}

/// Load NVML (`library`, else the driver's default names), register every GPU for XID events
/// and report them to `sink` until `stop` is set. NVML missing is one info line; the thread
/// then ends and the kernel log is the only source.
pub fn run(library: Option<&Path>, default_libraries: &[&str], sink: &mut impl NvmlSink, stop: &AtomicBool) {
    let nvml = match init(library, default_libraries) {
        Ok(nvml) => nvml,
        Err(why) => {
            tracing::info!("NVML unavailable for XID events ({why}); GPU XIDs are counted from the kernel log only");
            sink.settled();
            return;
        }
    };
    match register(&nvml, sink) {
        Ok((set, handles)) if !handles.is_empty() => wait_loop(&set, &handles, sink, stop),
        Ok(_) => sink.settled(),
        Err(e) => {
            tracing::warn!("NVML XID events: {e}; GPU XIDs are counted from the kernel log only");
            sink.settled();
        }
    }
    // nvml-wrapper's Drop calls nvmlShutdown and panics when the library lacks it.
    if nvml.lib().nvmlShutdown.is_ok() {
        if let Err(e) = nvml.shutdown() {
            tracing::debug!("nvmlShutdown: {e}");
        }
    } else {
        std::mem::forget(nvml);
    }
}

fn init(library: Option<&Path>, default_libraries: &[&str]) -> Result<Nvml, String> {
    let candidates: Vec<&OsStr> = match library {
        Some(p) => vec![p.as_os_str()],
        None => default_libraries.iter().map(OsStr::new).collect(),
    };
    let mut why = Vec::new();
    for lib in candidates {
        match Nvml::builder().lib_path(lib).init() {
            Ok(nvml) => return Ok(nvml),
            Err(e) => why.push(format!("{}: {e}", lib.to_string_lossy())),
        }
    }
    Err(why.join("; "))
}

/// NVML's device handles → the GPUs' addresses.
type Handles = HashMap<usize, PciAddr>;

/// Enumerate the GPUs (reported to `sink`) and register those that support XID events in one
/// set. A GPU that cannot be read or registered is logged and left out; the rest go on.
fn register<'n>(nvml: &'n Nvml, sink: &mut impl NvmlSink) -> Result<(EventSet<'n>, Handles), NvmlError> {
    let mut set = nvml.create_event_set()?;
    let mut handles = Handles::new();
    let mut registered: Vec<u32> = Vec::new();
    let mut gpus = Vec::new();
    for index in 0..nvml.device_count()? {
        let dev = match nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("NVML XID events: GPU {index}: {e}");
                continue;
            }
        };
        let identity = dev
            .pci_info()
            .map(|p| p.bus_id)
            .and_then(|bus_id| Ok(GpuIdentity { index, model: dev.name()?, bus_id, uuid: dev.uuid()? }));
        let (identity, addr) = match identity.map(|g| (PciAddr::parse(&g.bus_id), g)) {
            Ok((Some(addr), g)) => (g, addr),
            Ok((None, g)) => {
                tracing::warn!("NVML XID events: GPU {index}: bus id {:?} is not a PCI address", g.bus_id);
                continue;
            }
            Err(e) => {
                tracing::warn!("NVML XID events: GPU {index}: {e}");
                continue;
            }
        };
        gpus.push(identity);
        match dev.supported_event_types() {
            Ok(types) if types.contains(EventTypes::CRITICAL_XID_ERROR) => {}
            Ok(_) | Err(NvmlError::NotSupported) => {
                tracing::info!("NVML XID events: GPU {index} ({addr}) does not deliver them");
                continue;
            }
            Err(e) => {
                tracing::warn!("NVML XID events: GPU {index} ({addr}): {e}");
                continue;
            }
        }
        set = match dev.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(set) => set,
            Err(e) => {
                // nvml-wrapper frees the set on a failed registration: start a new one with the
                // GPUs registered so far.
                tracing::warn!("NVML XID events: GPU {index} ({addr}): {}", e.error);
                let mut fresh = nvml.create_event_set()?;
                for &again in &registered {
                    let dev = nvml.device_by_index(again)?;
                    fresh = dev.register_events(EventTypes::CRITICAL_XID_ERROR, fresh).map_err(|e| e.error)?;
                }
                set = fresh;
                continue;
            }
        };
        registered.push(index);
        // SAFETY: the handle is only compared with the handles of delivered events.
        handles.insert(unsafe { dev.handle() } as usize, addr);
    }
    sink.gpus(gpus);
    Ok((set, handles))
}

fn wait_loop(set: &EventSet<'_>, handles: &Handles, sink: &mut impl NvmlSink, stop: &AtomicBool) {
    let mut settled = false;
    let mut retry = RETRY_FIRST;
    while !stop.load(Ordering::Relaxed) {
        match set.wait(if settled { WAIT_MS } else { FIRST_WAIT_MS }) {
            Ok(event) => {
                retry = RETRY_FIRST;
                // SAFETY: compared with the registered handles only.
                let gpu = handles.get(&(unsafe { event.device.handle() } as usize));
                match (gpu, event.event_data) {
                    (Some(&gpu), Some(XidError::Value(xid))) => match u32::try_from(xid) {
                        Ok(xid) => sink.xid(gpu, xid),
                        Err(_) => tracing::debug!("NVML XID event with code {xid} out of range"),
                    },
                    // 999: NVML could not tell which XID; the kernel log line has it.
                    (_, Some(XidError::Unknown)) => tracing::debug!("NVML XID event of an unknown XID"),
                    (_, _) => tracing::debug!("NVML event {:?} of an unregistered GPU", event.event_type),
                }
            }
            Err(NvmlError::Timeout) => {
                if !settled {
                    settled = true;
                    sink.settled();
                }
            }
            Err(e) => {
                tracing::warn!("NVML XID event wait: {e}; trying again in {retry:?}");
                if !settled {
                    settled = true;
                    sink.settled();
                }
                std::thread::sleep(retry);
                retry = (retry * 2).min(RETRY_CAP);
            }
        }
    }
}
