//! Helpers shared by the test files that need real devices.
#![allow(dead_code)] // each test file uses its own part

use std::os::fd::AsRawFd as _;
use std::time::Duration;

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
pub struct LoopDevice(pub u32);

impl LoopDevice {
    /// The first free number from 200 up.
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

    pub fn name(&self) -> String {
        format!("loop{}", self.0)
    }

    /// Add it again under the same number.
    pub fn readd(&self) {
        loop_control(LOOP_CTL_ADD, self.0).unwrap_or_else(|e| panic!("LOOP_CTL_ADD loop{}: {e}", self.0));
    }

    /// udev may still hold a device it just probed: EBUSY for a moment.
    pub fn remove(&self) {
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
        // A test that failed half-way may leave a backing file bound: unbind it first.
        let _ = std::process::Command::new("losetup")
            .args(["-d", &format!("/dev/{}", self.name())])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = loop_control(LOOP_CTL_REMOVE, self.0);
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
