//! systemd readiness and watchdog notifications (`sd_notify`), without libsystemd.
//!
//! With `Type=notify` systemd waits for `READY=1`; with `WatchdogSec=` it restarts the service
//! when `WATCHDOG=1` stops arriving. Outside systemd (`NOTIFY_SOCKET` unset) every call is a
//! no-op.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A connection to systemd's notification socket, if the agent runs under systemd.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Read `NOTIFY_SOCKET` and `WATCHDOG_USEC` from the environment.
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let addr = socket_addr(path.as_encoded_bytes())?;
            let sock = UnixDatagram::unbound().ok()?;
            Some((sock, addr))
        });
        // WATCHDOG_PID, when set, says which process the watchdog is meant for.
        let for_us = std::env::var("WATCHDOG_PID").map_or(true, |p| p.trim() == std::process::id().to_string());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&us| us > 0 && for_us)
            .map(Duration::from_micros);
        Self { socket, watchdog }
    }

    /// How often to ping the watchdog (half its timeout, as systemd recommends), if enabled.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    /// Send one notification such as `READY=1`. Failures are logged at debug level: a lost
    /// notification must never stop the agent.
    pub fn notify(&self, state: &str) {
        if let Some((sock, addr)) = &self.socket
            && let Err(e) = sock.send_to_addr(state.as_bytes(), addr)
        {
            tracing::debug!("sd_notify {state:?}: {e}");
        }
    }
}

fn socket_addr(path: &[u8]) -> Option<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt as _;
    use std::os::unix::ffi::OsStrExt as _;
    match path.strip_prefix(b"@") {
        // A leading '@' names a socket in the abstract namespace.
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name).ok(),
        None => std::os::unix::net::SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(path)).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).expect("bind");
        let addr = socket_addr(path.as_os_str().as_encoded_bytes()).expect("addr");
        let n = Notifier {
            socket: Some((UnixDatagram::unbound().expect("sock"), addr)),
            watchdog: Some(Duration::from_secs(10)),
        };
        n.notify("READY=1");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"READY=1");
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(5)));
    }

    #[test]
    fn abstract_socket_names_are_understood() {
        let name = format!("dcmon-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt as _;
        let server_addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let server = UnixDatagram::bind_addr(&server_addr).expect("bind");
        let addr = socket_addr(format!("@{name}").as_bytes()).expect("addr");
        let n = Notifier { socket: Some((UnixDatagram::unbound().expect("sock"), addr)), watchdog: None };
        n.notify("WATCHDOG=1");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }
}
