//! Interface changes (added, removed, renamed) from the kernel's rtnetlink link group, so the
//! eBPF network collector re-lists /sys/class/net only when something changed instead of every
//! round (a directory walk of four syscalls, against one `recv` that finds nothing).

use std::io;
use std::os::fd::OwnedFd;

use crate::netlink::{self, Drained};

/// A non-blocking `NETLINK_ROUTE` socket subscribed to `RTMGRP_LINK` in this network namespace.
#[derive(Debug)]
pub struct LinkEvents {
    socket: OwnedFd,
}

impl LinkEvents {
    /// Subscribe. Fails where netlink is not available (a seccomp filter, an old kernel).
    pub fn subscribe() -> io::Result<Self> {
        let groups = u32::try_from(libc::RTMGRP_LINK).unwrap_or_default();
        Ok(Self { socket: netlink::subscribe(libc::NETLINK_ROUTE, libc::SOCK_RAW, groups)? })
    }

    /// Whether any link changed since the last call: drains what is queued without waiting.
    /// An overflowed queue (ENOBUFS: events were lost) and any other error count as a change,
    /// so the caller re-lists rather than trusting a stale list.
    pub fn changed(&self) -> bool {
        // The messages are only counted, never read.
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 8192];
        match netlink::drain(&self.socket, &mut buf, usize::MAX, |_| {}) {
            Drained::Messages(n) => n > 0,
            Drained::Unknown => true,
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
