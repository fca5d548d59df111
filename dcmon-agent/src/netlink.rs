//! Kernel notifications over netlink, read without waiting: the sockets the collectors poll
//! once a round to learn that something changed (links, disks) instead of re-listing sysfs.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

/// A non-blocking netlink socket of `protocol` (e.g. `NETLINK_ROUTE`) and `socket_type`,
/// subscribed to the multicast `groups`. Fails where netlink is not available (a seccomp
/// filter, an old kernel).
pub fn subscribe(protocol: libc::c_int, socket_type: libc::c_int, groups: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before it is owned.
    let fd =
        unsafe { libc::socket(libc::AF_NETLINK, socket_type | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain data; all-zero is a valid value to fill in.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = u16::try_from(libc::AF_NETLINK).unwrap_or_default();
    addr.nl_groups = groups;
    let len = u32::try_from(std::mem::size_of::<libc::sockaddr_nl>()).unwrap_or_default();
    // SAFETY: `addr` is a valid sockaddr_nl of `len` bytes.
    if unsafe { libc::bind(socket.as_raw_fd(), (&raw const addr).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// What draining a socket found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Everything queued was read: this many messages.
    Messages(usize),
    /// Some may be lost or left: the queue overflowed (ENOBUFS), the socket failed or closed,
    /// or more than the limit were queued. The caller should re-list rather than trust a
    /// stale list.
    Unknown,
}

/// Reads what is queued on `socket` without waiting, at most `limit` messages, handing each
/// to `message`. `buf` is left uninitialised: zeroing it every round would cost more than the
/// reads.
pub fn drain(socket: &OwnedFd, buf: &mut [MaybeUninit<u8>], limit: usize, mut message: impl FnMut(&[u8])) -> Drained {
    let mut seen = 0;
    loop {
        // SAFETY: receives at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if let Ok(n @ 1..) = usize::try_from(n) {
            if seen == limit {
                return Drained::Unknown;
            }
            seen += 1;
            // SAFETY: recv initialised the first `n` bytes (n <= buf.len()).
            message(unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n.min(buf.len())) });
            continue;
        }
        if n == 0 {
            return Drained::Unknown;
        }
        match io::Error::last_os_error().kind() {
            io::ErrorKind::WouldBlock => return Drained::Messages(seen),
            io::ErrorKind::Interrupted => {}
            _ => return Drained::Unknown,
        }
    }
}
