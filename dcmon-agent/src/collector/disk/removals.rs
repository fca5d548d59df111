//! Whole disks removed, from the kernel's uevents, so the eBPF disk collector notices a removed
//! idle disk (one whose files it no longer reads every round) with one `recv` that usually
//! finds nothing, instead of a read of /sys/block a round (a directory walk of four syscalls
//! that costs as much as a dozen disk files).

use std::io;
use std::os::fd::OwnedFd;

use crate::netlink::{self, Drained};

/// The kernel's uevent multicast group (udev's own re-broadcasts are group 2).
const KERNEL_GROUP: u32 = 1;

/// At most this many messages are drained in a round: past it the round stops and says "maybe
/// removed", so a storm of other devices' events costs a listing, not unbounded reads.
const MAX_MESSAGES: usize = 256;

/// A non-blocking `NETLINK_KOBJECT_UEVENT` socket subscribed to the kernel's uevents.
#[derive(Debug)]
pub struct DiskRemovals {
    socket: OwnedFd,
}

impl DiskRemovals {
    /// Subscribe. Fails where netlink is not available (a seccomp filter, an old kernel).
    pub fn subscribe() -> io::Result<Self> {
        Ok(Self { socket: netlink::subscribe(libc::NETLINK_KOBJECT_UEVENT, libc::SOCK_DGRAM, KERNEL_GROUP)? })
    }

    /// Whether a whole disk may have been removed since the last call: drains what is queued
    /// without waiting. A removal of a disk, an overflowed queue (ENOBUFS: events were lost),
    /// more than [`MAX_MESSAGES`] and any other error all say yes, so the caller re-lists
    /// rather than trusting a stale list.
    pub fn removed(&self) -> bool {
        // A uevent is at most 2 KiB of text (the kernel's UEVENT_BUFFER_SIZE) and its header.
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut removed = false;
        match netlink::drain(&self.socket, &mut buf, MAX_MESSAGES, |m| removed |= is_disk_removal(m)) {
            Drained::Messages(_) => removed,
            Drained::Unknown => true,
        }
    }
}

/// Whether a kernel uevent (`ACTION@DEVPATH\0KEY=VALUE\0...`) reports a whole disk removed.
fn is_disk_removal(message: &[u8]) -> bool {
    let mut fields = message.split(|&b| b == 0);
    if !fields.next().is_some_and(|head| head.starts_with(b"remove@")) {
        return false;
    }
    let (mut block, mut disk) = (false, false);
    for field in fields {
        block |= field == b"SUBSYSTEM=block";
        disk |= field == b"DEVTYPE=disk";
    }
    block && disk
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_whole_disk_removed_counts() {
        let event = |head: &str, fields: &[&str]| {
            let mut m = head.as_bytes().to_vec();
            for f in fields {
                m.push(0);
                m.extend_from_slice(f.as_bytes());
            }
            m.push(0);
            m
        };
        let disk = ["ACTION=remove", "DEVPATH=/devices/virtual/block/loop9", "SUBSYSTEM=block", "DEVTYPE=disk"];
        assert!(is_disk_removal(&event("remove@/devices/virtual/block/loop9", &disk)));
        assert!(!is_disk_removal(&event("add@/devices/virtual/block/loop9", &disk)), "added");
        let part = ["ACTION=remove", "SUBSYSTEM=block", "DEVTYPE=partition"];
        assert!(!is_disk_removal(&event("remove@/devices/virtual/block/loop9/loop9p1", &part)), "a partition");
        let bdi = ["ACTION=remove", "SUBSYSTEM=bdi"];
        assert!(!is_disk_removal(&event("remove@/devices/virtual/bdi/7:9", &bdi)), "another subsystem");
        assert!(!is_disk_removal(b""));
    }

    #[test]
    fn quiet_until_a_disk_is_removed() {
        let removals = DiskRemovals::subscribe().expect("uevent socket");
        // Whatever happened before: drain it.
        let _ = removals.removed();
        assert!(!removals.removed(), "no disk removed");
        dcmon_tests::require_root("adding and removing a loop device");
        let dev = dcmon_tests::loop_device::LoopDevice::add();
        let _ = std::process::Command::new("udevadm").arg("settle").status();
        assert!(!removals.removed(), "{} added, none removed", dev.name());
        dev.remove();
        assert!(removals.removed(), "removing {} was not seen", dev.name());
        assert!(!removals.removed(), "the events were drained");
    }
}
