//! The outbox directory's lock: one agent per outbox, and the holder's pid for the message.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(super) enum LockError {
    /// Another process holds it; its pid, if the lock file says.
    InUse(Option<u32>),
    Io(std::io::Error),
}

/// How long a lock held elsewhere is waited for before the outbox is reported in use. The
/// holder can be this very process for a moment: a child process being started holds a copy of
/// every descriptor until it execs, so a lock closed by this process is still held by the
/// child's copy until then. An agent being restarted may also still be exiting.
const LOCK_WAIT: Duration = Duration::from_secs(1);
/// How often the lock is tried again meanwhile.
const LOCK_RETRY: Duration = Duration::from_millis(10);

/// Take the directory's `.lock` (an exclusive `flock`, by [`File::try_lock`], released when the
/// file is closed) and write this process id into it, so that two agents never append to the
/// same segments.
pub(super) fn lock_dir(dir: &Path) -> Result<File, LockError> {
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
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match f.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => std::thread::sleep(LOCK_RETRY),
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = (&f).take(32).read_to_string(&mut holder);
                return Err(LockError::InUse(holder.trim().parse().ok()));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(LockError::Io(e)),
        }
    }
    f.set_len(0).map_err(LockError::Io)?;
    writeln!(f, "{}", std::process::id()).map_err(LockError::Io)?;
    Ok(f)
}
