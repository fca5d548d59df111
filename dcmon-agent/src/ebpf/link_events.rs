//! Interface changes (added, removed, renamed) from the kernel's rtnetlink link group, so the
//! eBPF network collector re-lists /sys/class/net only when something changed instead of every
//! round (a directory walk of four syscalls, against one `recv` that finds nothing).

use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

/// A non-blocking `NETLINK_ROUTE` socket subscribed to `RTMGRP_LINK` in this network namespace.
#[derive(Debug)]
pub struct LinkEvents {
    socket: OwnedFd,
}

impl LinkEvents {
    /// Subscribe. Fails where netlink is not available (a seccomp filter, an old kernel).
    pub fn subscribe() -> io::Result<Self> {
        // SAFETY: plain socket(2); the result is checked before it is owned.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor owned by nothing else.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value to fill in.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = u16::try_from(libc::AF_NETLINK).unwrap_or_default();
        addr.nl_groups = u32::try_from(libc::RTMGRP_LINK).unwrap_or_default();
        let len = u32::try_from(std::mem::size_of::<libc::sockaddr_nl>()).unwrap_or_default();
        // SAFETY: `addr` is a valid sockaddr_nl of `len` bytes.
        if unsafe { libc::bind(socket.as_raw_fd(), (&raw const addr).cast(), len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { socket })
    }

    /// Whether any link changed since the last call: drains what is queued without waiting.
    /// An overflowed queue (ENOBUFS: events were lost) and any other error count as a change,
    /// so the caller re-lists rather than trusting a stale list.
    pub fn changed(&self) -> bool {
        // Left uninitialised: the messages are only counted, never read, and zeroing 8 KiB
        // every round was the largest part of the network collector's own work.
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 8192];
        let mut changed = false;
        loop {
            // SAFETY: receives at most `buf.len()` bytes into `buf`.
            let n = unsafe { libc::recv(self.socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                changed = true;
                continue;
            }
            if n == 0 {
                return true;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return changed,
                io::ErrorKind::Interrupted => {}
                _ => return true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_until_a_link_changes() {
        let events = LinkEvents::subscribe().expect("rtnetlink socket");
        // Whatever happened before: drain it.
        let _ = events.changed();
        assert!(!events.changed(), "no link changed");
        dcmon_tests::require_root("adding a veth pair");
        let pid = std::process::id() % 100_000;
        let (name, peer) = (format!("dcle{pid}"), format!("dclf{pid}"));
        let ip = |args: &[&str]| std::process::Command::new("ip").args(args).status().is_ok_and(|s| s.success());
        assert!(ip(&["link", "add", &name, "type", "veth", "peer", "name", &peer]), "ip link add {name}");
        assert!(ip(&["link", "del", &name]), "ip link del {name}");
        assert!(events.changed(), "adding and removing {name} was not seen");
        assert!(!events.changed(), "the events were drained");
    }
}
