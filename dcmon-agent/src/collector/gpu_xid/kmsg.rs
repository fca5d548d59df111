//! The kernel log's XID lines: /dev/kmsg records parsed, and the reader that follows the log
//! on its own thread from the start of the ring buffer.
//!
//! A /dev/kmsg read returns one record, `prio,seq,usec,flags;message`, then continuation lines
//! (` KEY=VALUE`) that start with a space. The NVIDIA driver writes an XID as
//! `NVRM: Xid (PCI:0000:18:00): 79, pid=1234, name=python, GPU has fallen off the bus.`:
//! older drivers without `pid=`/`name=`, or with `pid='<unknown>', name=<unknown>`, older
//! still without `PCI:`; NVSwitch errors are `SXid` and are not GPU XIDs.

use std::io::{ErrorKind, Read as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::ledger::PciAddr;

/// One /dev/kmsg record's header and text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KmsgRecord<'a> {
    /// Sequence number, unique and increasing within a boot.
    pub seq: u64,
    /// Microseconds since boot when it was logged.
    pub ts_us: u64,
    /// The text (non-printable bytes escaped as `\xNN` by the kernel).
    pub message: &'a str,
}

/// `6,1234,5678901234,-;NVRM: Xid …` (a continuation line, starting with a space, is `None`).
pub fn parse_record(line: &str) -> Option<KmsgRecord<'_>> {
    let (header, message) = line.split_once(';')?;
    let mut fields = header.split(',');
    let _priority: u32 = fields.next()?.parse().ok()?;
    let seq = fields.next()?.parse().ok()?;
    let ts_us = fields.next()?.parse().ok()?;
    Some(KmsgRecord { seq, ts_us, message })
}

/// An XID the driver logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XidLine {
    /// The GPU.
    pub gpu: PciAddr,
    /// The XID code.
    pub xid: u32,
}

/// The XID in `message`, if it is an `NVRM: Xid (ADDRESS): CODE, …` line.
pub fn parse_xid(message: &str) -> Option<XidLine> {
    let rest = &message[message.find("NVRM: Xid (")? + "NVRM: Xid (".len()..];
    let (address, rest) = rest.split_once("): ")?;
    let gpu = PciAddr::parse(address)?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let after = rest[digits..].chars().next();
    if digits == 0 || !matches!(after, None | Some(',' | ' ' | '\n')) {
        return None;
    }
    Some(XidLine { gpu, xid: rest[..digits].parse().ok()? })
}

/// Room for one record: the kernel refuses (EINVAL) a read into a buffer smaller than the next
/// record, and records with their continuation lines stay under 8 KiB.
const READ_BUFFER: usize = 16 * 1024;

/// How often a reader at the end of a regular file or a FIFO without a writer (tests) looks
/// again; /dev/kmsg itself is waited on with poll(2).
const FOLLOW_EVERY: Duration = Duration::from_millis(100);

/// How long one poll(2) waits before the stop flag is looked at again.
pub(super) const POLL_TIMEOUT_MS: i32 = 5000;

/// What the reader reports.
pub trait KmsgSink {
    /// An XID line: the record's sequence number, the XID, the record's kernel timestamp, and
    /// whether the reader had reached the end of the ring before (it follows the log live).
    fn xid(&mut self, seq: u64, line: XidLine, ts_us: u64, live: bool);
    /// The ring has been read to its end (or cannot be read): every later line is live.
    fn caught_up(&mut self);
}

/// Read `path` (/dev/kmsg) from its start, then follow it, until `stop` is set or the sink's
/// owner is gone. A missing or denied log is one warning; records overwritten before they were
/// read (EPIPE) are skipped with a count in the log.
pub fn follow(path: &Path, sink: &mut impl KmsgSink, stop: &AtomicBool) {
    let mut file = match std::fs::File::options().read(true).custom_flags(libc::O_NONBLOCK).open(path) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(
                "cannot read the kernel log {}: {e}; GPU XIDs are counted from NVML events only",
                path.display()
            );
            sink.caught_up();
            return;
        }
    };
    let mut buf = vec![0u8; READ_BUFFER];
    let mut pending: Vec<u8> = Vec::new();
    let mut live = false;
    let mut overwritten = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let at_end = match file.read(&mut buf) {
            Ok(0) => {
                std::thread::sleep(FOLLOW_EVERY);
                true
            }
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                take_lines(&mut pending, |line| {
                    if let Some(record) = parse_record(line)
                        && let Some(xid) = parse_xid(record.message)
                    {
                        sink.xid(record.seq, xid, record.ts_us, live);
                    }
                });
                false
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                // At the ring's end: say so before waiting, or the first round would wait for
                // the next record or the poll timeout.
                if !live {
                    live = true;
                    sink.caught_up();
                }
                let mut fd = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&raw mut fd, 1, POLL_TIMEOUT_MS) };
                true
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => false,
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                // The ring wrapped past the next record; the next read starts at the oldest left.
                overwritten += 1;
                tracing::debug!("{}: records overwritten before they were read ({overwritten} times)", path.display());
                false
            }
            Err(e) => {
                tracing::warn!(
                    "reading the kernel log {}: {e}; GPU XIDs are counted from NVML events only",
                    path.display()
                );
                sink.caught_up();
                return;
            }
        };
        if at_end && !live {
            live = true;
            sink.caught_up();
        }
    }
}

/// Hand each complete line of `pending` to `line` (continuation lines included; a line that is
/// not UTF-8 is skipped) and keep the incomplete rest.
fn take_lines(pending: &mut Vec<u8>, mut line: impl FnMut(&str)) {
    let Some(last_newline) = pending.iter().rposition(|&b| b == b'\n') else { return };
    for l in pending[..last_newline].split(|&b| b == b'\n') {
        if let Ok(text) = std::str::from_utf8(l) {
            line(text);
        }
    }
    pending.drain(..=last_newline);
}
