//! The outbox directory's lock: one agent per outbox, and the holder's pid for the message.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::path::Path;

#[derive(Debug)]
pub(super) enum LockError {
    /// Another process holds it; its pid, if the lock file says.
    InUse(Option<u32>),
    Io(std::io::Error),
}

/// Take the directory's `.lock` (an exclusive `flock`, released when the file is closed) and
/// write this process id into it, so that two agents never append to the same segments.
pub(super) fn lock_dir(dir: &Path) -> Result<File, LockError> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join(".lock");
    let mut f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .map_err(LockError::Io)?;
    if !f.metadata().map_err(LockError::Io)?.is_file() {
        return Err(LockError::Io(std::io::Error::other("not a regular file")));
    }
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::WouldBlock {
            return Err(LockError::Io(e));
        }
        let mut holder = String::new();
        let _ = (&f).take(32).read_to_string(&mut holder);
        return Err(LockError::InUse(holder.trim().parse().ok()));
    }
    f.set_len(0).map_err(LockError::Io)?;
    writeln!(f, "{}", std::process::id()).map_err(LockError::Io)?;
    Ok(f)
}
