//! Disks coming and going on the live host, read from their /sys/block/DEV/stat files: loop
//! devices added and removed through /dev/loop-control (which needs root; CI runs as root).

use std::os::fd::AsRawFd as _;
use std::time::Duration;

use dcmon_agent::batch::Sample;
use dcmon_agent::collector::Collector;
use dcmon_agent::collector::disk::{DiskCollector, RELIST_EVERY};
use dcmon_agent::config::DeviceFilter;
use dcmon_agent::filter::PatternList;
use dcmon_agent::host::Host;

/// linux/loop.h
const LOOP_CTL_ADD: libc::c_ulong = 0x4C80;
const LOOP_CTL_REMOVE: libc::c_ulong = 0x4C81;

fn loop_control(request: libc::c_ulong, n: u32) -> std::io::Result<()> {
    let ctl = std::fs::OpenOptions::new().read(true).write(true).open("/dev/loop-control")?;
    // SAFETY: both requests take the device number as an integer argument.
    let rc = unsafe { libc::ioctl(ctl.as_raw_fd(), request, libc::c_ulong::from(n)) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// A loop device without a backing file, removed on drop.
struct LoopDevice(u32);

impl LoopDevice {
    /// The first free number from 200 up.
    fn add() -> Self {
        for n in 200..300 {
            match loop_control(LOOP_CTL_ADD, n) {
                Ok(()) => return Self(n),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                Err(e) => panic!("LOOP_CTL_ADD loop{n}: {e}"),
            }
        }
        panic!("no free loop device number in 200..300");
    }

    fn name(&self) -> String {
        format!("loop{}", self.0)
    }

    /// Add it again under the same number.
    fn readd(&self) {
        loop_control(LOOP_CTL_ADD, self.0).unwrap_or_else(|e| panic!("LOOP_CTL_ADD loop{}: {e}", self.0));
    }

    /// udev may still hold a device it just probed: EBUSY for a moment.
    fn remove(&self) {
        for _ in 0..50 {
            match loop_control(LOOP_CTL_REMOVE, self.0) {
                Ok(()) => return,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => panic!("LOOP_CTL_REMOVE loop{}: {e}", self.0),
            }
        }
        panic!("loop{} stayed busy for 5 s", self.0);
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = loop_control(LOOP_CTL_REMOVE, self.0);
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn devices(c: &mut DiskCollector) -> Vec<String> {
    let mut out: Vec<Sample> = Vec::new();
    c.collect(&mut out).unwrap_or_else(|e| panic!("collect: {e:#}"));
    out.iter().step_by(4).map(|s| s.labels[0].1.clone()).collect()
}

#[test]
fn disks_coming_and_going_are_followed() {
    if !is_root() {
        eprintln!("skipped: adding and removing loop devices needs root");
        return;
    }
    let dev = LoopDevice::add();
    let name = dev.name();
    let filter = DeviceFilter { include: PatternList::new([name.as_str()]), exclude: PatternList::default() };
    let collector = |every: Duration| DiskCollector::new(Host::default(), filter.clone()).relist_every(every);
    // One disk of this host's block devices: read from its stat file.
    let (mut slow, mut fast) = (collector(RELIST_EVERY), collector(Duration::ZERO));
    assert_eq!(devices(&mut slow), [name.as_str()]);
    assert!(slow.is_per_disk(), "one disk of several devices");
    assert_eq!(devices(&mut fast), [name.as_str()]);

    // Removed: noticed at once (its open stat file answers ENODEV), and not an error.
    dev.remove();
    assert_eq!(devices(&mut slow), Vec::<String>::new());
    assert_eq!(devices(&mut fast), Vec::<String>::new());

    // Added again: found at the next listing of /sys/block, not before.
    dev.readd();
    assert_eq!(devices(&mut slow), Vec::<String>::new(), "listed again only every {RELIST_EVERY:?}");
    assert_eq!(devices(&mut fast), [name.as_str()]);

    // Replaced under the same name between two rounds: the stale open file is reopened.
    let mut holding = collector(RELIST_EVERY);
    assert_eq!(devices(&mut holding), [name.as_str()]);
    dev.remove();
    dev.readd();
    assert_eq!(devices(&mut holding), [name.as_str()]);
    assert_eq!(devices(&mut holding), [name.as_str()]);
}
