//! Loop devices added and removed through /dev/loop-control (needs root).

use std::os::fd::AsRawFd as _;
use std::time::Duration;

/// linux/loop.h
const LOOP_CTL_ADD: libc::c_ulong = 0x4C80;
const LOOP_CTL_REMOVE: libc::c_ulong = 0x4C81;

/// How long [`remove`] retries a device that answers EBUSY.
const REMOVE_BUSY_FOR: Duration = Duration::from_secs(5);

fn loop_control(request: libc::c_ulong, n: u32) -> std::io::Result<()> {
    let ctl = std::fs::OpenOptions::new().read(true).write(true).open("/dev/loop-control")?;
    // SAFETY: both requests take the device number as an integer argument.
    let rc = unsafe { libc::ioctl(ctl.as_raw_fd(), request, libc::c_ulong::from(n)) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Delete loop device `n`, which must have no backing file (ENODEV if there is no such device).
/// udev may still hold a device it just probed or that was just detached: EBUSY is retried for
/// a few seconds.
pub fn remove(n: u32) -> std::io::Result<()> {
    let step = Duration::from_millis(100);
    let mut waited = Duration::ZERO;
    loop {
        match loop_control(LOOP_CTL_REMOVE, n) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && waited < REMOVE_BUSY_FOR => {
                std::thread::sleep(step);
                waited += step;
            }
            other => return other,
        }
    }
}

/// The numbers of the loop devices in /sys/block (`loop7` -> 7), sorted.
pub fn numbers() -> std::io::Result<Vec<u32>> {
    let mut numbers: Vec<u32> = std::fs::read_dir("/sys/block")?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_prefix("loop")?.parse().ok())
        .collect();
    numbers.sort_unstable();
    Ok(numbers)
}

/// A loop device without a backing file, removed on drop.
#[derive(Debug)]
pub struct LoopDevice(pub u32);

impl LoopDevice {
    /// The first free number from 200 up (far above the ones `losetup --find` hands out).
    pub fn add() -> Self {
        for n in 200..300 {
            match loop_control(LOOP_CTL_ADD, n) {
                Ok(()) => return Self(n),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                Err(e) => panic!("LOOP_CTL_ADD loop{n}: {e}"),
            }
        }
        panic!("no free loop device number in 200..300");
    }

    /// `loopN`, as in /sys/block.
    pub fn name(&self) -> String {
        format!("loop{}", self.0)
    }

    /// Add it again under the same number.
    pub fn readd(&self) {
        loop_control(LOOP_CTL_ADD, self.0).unwrap_or_else(|e| panic!("LOOP_CTL_ADD loop{}: {e}", self.0));
    }

    /// Remove it now (it can be added again with [`LoopDevice::readd`]).
    pub fn remove(&self) {
        remove(self.0).unwrap_or_else(|e| panic!("LOOP_CTL_REMOVE loop{}: {e}", self.0));
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        // A test that failed half-way may leave a backing file bound: unbind it first.
        let _ = std::process::Command::new("losetup")
            .args(["-d", &format!("/dev/{}", self.name())])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = loop_control(LOOP_CTL_REMOVE, self.0);
    }
}
