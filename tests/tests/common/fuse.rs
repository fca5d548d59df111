//! A FUSE file whose daemon hangs, mounted over a regular file: a hung lxcfs where a procfs
//! file should be. The daemon, a thread of the test, answers the kernel's requests (the file's
//! attributes, an open) but never a read; and once it has told statfs its filesystem type (the
//! agent's check when it builds its collectors), it stops reading requests at all, so every
//! later one (an open) waits, queued and unread, until [`HungFuseFile`] is dropped. A request
//! left queued can be abandoned (a signal takes it back); one the daemon has read cannot (the
//! kernel waits for its answer even when the process is killed), and neither can the flush of
//! an open FUSE file at exit: an agent that opened the file before the daemon hung cannot exit
//! until the daemon answers or the connection is aborted.
//!
//! Needs root and /dev/fuse; the test fails, saying why, without them.

use std::io::{Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

// Opcodes and flags of include/uapi/linux/fuse.h.
const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_GETATTR: u32 = 3;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_STATFS: u32 = 17;
const FUSE_RELEASE: u32 = 18;
const FUSE_FLUSH: u32 = 25;
const FUSE_INIT: u32 = 26;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_BATCH_FORGET: u32 = 42;
const FOPEN_DIRECT_IO: u32 = 1;
/// `sizeof(struct fuse_in_header)`.
const IN_HEADER: usize = 40;

/// See the module docs. Dropping it answers every request, the held ones and those to come,
/// with EIO, and detaches the mount.
#[derive(Debug)]
pub struct HungFuseFile {
    target: PathBuf,
    dev: Arc<std::fs::File>,
    state: Arc<(Mutex<State>, Condvar)>,
}

#[derive(Debug, Default)]
struct State {
    /// Statfs was answered: stop reading requests.
    hung: bool,
    /// The test is over: answer everything.
    released: bool,
    /// How many STATFS requests were answered.
    statfs: u32,
    /// The READ requests read and never answered.
    held_reads: Vec<u64>,
}

impl HungFuseFile {
    /// Mounts the hung file over the regular file `target` (needs root and /dev/fuse; the
    /// test fails, saying why, where it cannot be mounted).
    pub fn mount(target: &Path) -> Self {
        let dev = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/fuse")
                .unwrap_or_else(|e| panic!("cannot open /dev/fuse (is the fuse module loaded?): {e}")),
        );
        // SAFETY: plain getters.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let options = format!("fd={},rootmode=100444,user_id={uid},group_id={gid}", dev.as_raw_fd());
        let c = |s: &[u8]| std::ffi::CString::new(s).expect("no NUL");
        let (source, target_c, fstype, data) =
            (c(b"dcmon-hung-fuse"), c(target.as_os_str().as_bytes()), c(b"fuse"), c(options.as_bytes()));
        // SAFETY: valid NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target_c.as_ptr(),
                fstype.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                data.as_ptr().cast(),
            )
        };
        assert!(rc == 0, "cannot mount FUSE on {}: {}", target.display(), std::io::Error::last_os_error());
        let state = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let (served, read_from) = (Arc::clone(&state), Arc::clone(&dev));
        std::thread::spawn(move || serve(&read_from, &served));
        Self { target: target.to_owned(), dev, state }
    }

    /// How many times the file's filesystem was asked for (statfs).
    pub fn statfs_answered(&self) -> u32 {
        self.state.0.lock().expect("state").statfs
    }
}

impl Drop for HungFuseFile {
    fn drop(&mut self) {
        let (lock, wake) = &*self.state;
        let held = {
            let mut s = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            s.released = true;
            std::mem::take(&mut s.held_reads)
        };
        for unique in held {
            answer(&self.dev, unique, Err(libc::EIO));
        }
        wake.notify_all();
        let target = std::ffi::CString::new(self.target.as_os_str().as_bytes()).expect("no NUL");
        // SAFETY: a valid NUL-terminated path. Detached: the file may still be open.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// The daemon: answers requests (reads aside) until statfs is answered, then waits for the
/// release.
fn serve(dev: &std::fs::File, state: &(Mutex<State>, Condvar)) {
    let (lock, wake) = state;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let released = {
            let mut s = lock.lock().expect("state");
            while s.hung && !s.released {
                s = wake.wait(s).expect("state");
            }
            s.released
        };
        let n = match (&*dev).read(&mut buf) {
            Ok(n) => n,
            // ENOENT: the request was interrupted before it was read.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::ENOENT)) => continue,
            // ENODEV: unmounted.
            Err(_) => return,
        };
        if n < IN_HEADER {
            continue;
        }
        let u32_at = |at: usize| u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
        let opcode = u32_at(4);
        let unique = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
        let reply: Result<Vec<u8>, i32> = match opcode {
            FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT => continue,
            FUSE_INIT => Ok(init_out(u32_at(IN_HEADER + 8))),
            _ if released => Err(libc::EIO),
            FUSE_GETATTR => Ok(attr_out()),
            FUSE_STATFS => {
                let mut s = lock.lock().expect("state");
                s.statfs += 1;
                s.hung = true;
                Ok(statfs_out())
            }
            FUSE_READ => {
                let mut s = lock.lock().expect("state");
                if s.released {
                    Err(libc::EIO)
                } else {
                    s.held_reads.push(unique);
                    continue;
                }
            }
            FUSE_OPEN => {
                let mut out = 1u64.to_le_bytes().to_vec();
                out.extend(FOPEN_DIRECT_IO.to_le_bytes());
                out.extend(0u32.to_le_bytes());
                Ok(out)
            }
            FUSE_FLUSH | FUSE_RELEASE => Ok(Vec::new()),
            FUSE_LOOKUP => Err(libc::ENOENT),
            _ => Err(libc::ENOSYS),
        };
        answer(dev, unique, reply);
    }
}

/// Writes the answer to request `unique`: a body, or an errno.
fn answer(dev: &std::fs::File, unique: u64, reply: Result<Vec<u8>, i32>) {
    let (error, body) = match reply {
        Ok(body) => (0, body),
        Err(errno) => (-errno, Vec::new()),
    };
    let len = u32::try_from(16 + body.len()).expect("small reply");
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend(len.to_le_bytes());
    out.extend(error.to_le_bytes());
    out.extend(unique.to_le_bytes());
    out.extend(body);
    // A request interrupted meanwhile is answered with ENOENT: nothing to do.
    let _ = (&*dev).write(&out);
}

/// `struct fuse_init_out`, protocol 7.31, no optional features.
fn init_out(max_readahead: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    for v in [7u32, 31, max_readahead, 0] {
        out.extend(v.to_le_bytes());
    }
    out.extend(16u16.to_le_bytes()); // max_background
    out.extend(12u16.to_le_bytes()); // congestion_threshold
    out.extend(4096u32.to_le_bytes()); // max_write
    out.extend(1u32.to_le_bytes()); // time_gran
    out.resize(64, 0);
    out
}

/// `struct fuse_attr_out` of the root, a 4 KiB read-only regular file, valid for an hour.
fn attr_out() -> Vec<u8> {
    // SAFETY: plain getters.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let mut out = Vec::with_capacity(104);
    out.extend(3600u64.to_le_bytes()); // attr_valid
    out.extend([0u8; 8]); // attr_valid_nsec, dummy
    for v in [1u64, 4096, 8, 0, 0, 0] {
        // ino, size, blocks, atime, mtime, ctime
        out.extend(v.to_le_bytes());
    }
    for v in [0u32, 0, 0, 0o100_444, 1, uid, gid, 0, 4096, 0] {
        // atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags
        out.extend(v.to_le_bytes());
    }
    out
}

/// `struct fuse_statfs_out`.
fn statfs_out() -> Vec<u8> {
    let mut out = vec![0u8; 40]; // blocks, bfree, bavail, files, ffree
    for v in [4096u32, 255, 4096] {
        // bsize, namelen, frsize
        out.extend(v.to_le_bytes());
    }
    out.resize(80, 0);
    out
}

/// `source` bind-mounted over `target` until dropped: a real procfs file in a fixture tree.
#[derive(Debug)]
pub struct BindMount(std::ffi::CString);

impl BindMount {
    /// Bind `source` over `target` (needs root; the test fails, saying why, where it cannot).
    pub fn new(source: &Path, target: &Path) -> Self {
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).expect("no NUL");
        let (source_c, target_c) = (c(source), c(target));
        // SAFETY: valid NUL-terminated paths; a bind mount takes no type or data.
        let rc = unsafe {
            libc::mount(source_c.as_ptr(), target_c.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null())
        };
        assert!(
            rc == 0,
            "cannot bind {} on {}: {}",
            source.display(),
            target.display(),
            std::io::Error::last_os_error()
        );
        Self(target_c)
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
    }
}
