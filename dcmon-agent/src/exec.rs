//! Running external tools (ipmitool, apt-get, nvme, nvidia-smi): the one place that spawns
//! processes.
//!
//! Every run has a timeout, a cap on how much output is kept, and kills the child (and its
//! process group, so a shell script's own children die too) on expiry, on an oversized output
//! and on drop. The program is always a path handed in by the caller (from the config), so a
//! test runs a fake script by naming it; there is no process-global switch.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How often a running child is polled for exit. Tools here run for 50 ms to minutes; 10 ms
/// costs nothing and keeps short runs short.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// stderr is only kept for error messages.
const STDERR_CAP_BYTES: usize = 16 * 1024;

/// One invocation of an external tool.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    timeout: Duration,
    max_output_bytes: usize,
}

/// What a finished tool printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything on stdout (at most the cap).
    pub stdout: Vec<u8>,
    /// The start of stderr, for messages.
    pub stderr: Vec<u8>,
}

impl Output {
    /// stderr as text, trimmed, for error messages.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).trim().to_owned()
    }
}

/// Why a tool produced no usable output.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The program does not exist (the tool is not installed).
    #[error("{program}: not found")]
    NotFound {
        /// The program path or name.
        program: String,
    },
    /// It could not be started for another reason (permissions, exec format).
    // The io::Error fields are not called `source`: the message includes them, and `{:#}`
    // would print a `source` a second time.
    #[error("{program}: cannot start: {error}")]
    Spawn {
        /// The program path or name.
        program: String,
        /// Why.
        error: std::io::Error,
    },
    /// It ran past its timeout and was killed.
    #[error("{program}: no answer within {timeout:?}; killed")]
    Timeout {
        /// The program path or name.
        program: String,
        /// The limit.
        timeout: Duration,
    },
    /// It printed more than the cap and was killed.
    #[error("{program}: more than {cap} bytes of output; killed")]
    TooMuchOutput {
        /// The program path or name.
        program: String,
        /// The cap.
        cap: usize,
    },
    /// Reading its output or waiting for it failed.
    #[error("{program}: {error}")]
    Io {
        /// The program path or name.
        program: String,
        /// Why.
        error: std::io::Error,
    },
    /// It exited unsuccessfully.
    #[error("{program}: {status}: {stderr}")]
    Status {
        /// The program path or name.
        program: String,
        /// Exit status.
        status: ExitStatus,
        /// The start of its stderr.
        stderr: String,
        /// Its stdout (some tools explain failures there).
        stdout: Vec<u8>,
    },
}

impl ExecError {
    /// True when the tool is not installed.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ExecError::NotFound { .. })
    }
}

/// Kills the child's process group and reaps it unless disarmed; covers panics and early
/// returns.
struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    fn kill(&mut self) {
        if let Some(child) = self.0.as_mut() {
            kill_group(child);
            let _ = child.wait();
        }
        self.0 = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

fn kill_group(child: &mut Child) {
    // The child leads its own process group (process_group(0) below), so -pid reaches a
    // shell script's children as well; they would otherwise keep our pipes open.
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
}

impl Cmd {
    /// `program` (a path, or a name looked up in PATH) with a 10 s timeout and a 4 MiB cap.
    pub fn new(program: impl AsRef<Path>) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            timeout: Duration::from_secs(10),
            max_output_bytes: 4 << 20,
        }
    }

    /// Append arguments.
    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Set an environment variable for the child (the rest is inherited).
    #[must_use]
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Kill the child after `timeout`.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Kill the child once stdout exceeds `bytes`.
    #[must_use]
    pub fn max_output(mut self, bytes: usize) -> Self {
        self.max_output_bytes = bytes;
        self
    }

    /// The program as shown in messages.
    pub fn program(&self) -> String {
        self.program.display().to_string()
    }

    /// Run to completion; a non-zero exit is [`ExecError::Status`].
    pub fn run(&self) -> Result<Output, ExecError> {
        let out = self.run_any_status()?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(ExecError::Status {
                program: self.program(),
                status: out.status,
                stderr: out.stderr_text(),
                stdout: out.stdout,
            })
        }
    }

    /// Run to completion, whatever the exit status.
    pub fn run_any_status(&self) -> Result<Output, ExecError> {
        let program = self.program();
        let mut command = std::process::Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let child = command.spawn().map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                ExecError::NotFound { program: program.clone() }
            } else {
                ExecError::Spawn { program: program.clone(), error }
            }
        })?;
        let child_pid = i32::try_from(child.id()).ok();
        let mut guard = KillOnDrop(Some(child));
        // A timeout too large to add to now is no deadline at all.
        let deadline = Instant::now().checked_add(self.timeout);
        let (stdout, stderr) = match guard.0.as_mut() {
            Some(c) => (c.stdout.take(), c.stderr.take()),
            None => (None, None),
        };
        // Readers on their own threads: a child blocked on a full pipe would never exit.
        let cap = self.max_output_bytes;
        let overflow = Arc::new(AtomicBool::new(false));
        let out_reader = {
            let overflow = Arc::clone(&overflow);
            std::thread::spawn(move || {
                let r = read_capped(stdout, cap);
                if matches!(&r, Ok(b) if b.len() > cap) {
                    overflow.store(true, Ordering::Release);
                }
                r
            })
        };
        let err_reader = std::thread::spawn(move || read_capped(stderr, STDERR_CAP_BYTES));

        let status = loop {
            let Some(child) = guard.0.as_mut() else {
                break None;
            };
            if overflow.load(Ordering::Acquire) {
                guard.kill();
                let _ = out_reader.join();
                let _ = err_reader.join();
                return Err(ExecError::TooMuchOutput { program, cap });
            }
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if deadline.is_some_and(|d| Instant::now() >= d) => {
                    guard.kill();
                    let _ = out_reader.join();
                    let _ = err_reader.join();
                    return Err(ExecError::Timeout { program, timeout: self.timeout });
                }
                Ok(None) => std::thread::sleep(POLL_INTERVAL),
                Err(error) => return Err(ExecError::Io { program, error }),
            }
        };
        // The child has exited and been reaped. A grandchild still holding our pipes (a
        // script's background job) would keep the readers waiting: give it a moment, then kill
        // the group. Only then: while such a member lives the group id cannot be reused, but
        // once the group is empty the id may belong to an unrelated new process group.
        guard.0 = None;
        let pipes_held = || !(out_reader.is_finished() && err_reader.is_finished());
        let grace = Instant::now() + POLL_INTERVAL * 10;
        while pipes_held() && Instant::now() < grace {
            std::thread::sleep(POLL_INTERVAL);
        }
        if let Some(pgid) = child_pid
            && pipes_held()
        {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
        let Some(status) = status else {
            return Err(ExecError::Io { program, error: std::io::Error::other("child vanished") });
        };
        let stdout = join_reader(out_reader).map_err(|error| ExecError::Io { program: program.clone(), error })?;
        if stdout.len() > cap {
            return Err(ExecError::TooMuchOutput { program, cap });
        }
        let stderr = join_reader(err_reader).unwrap_or_default();
        Ok(Output { status, stdout, stderr })
    }
}

fn read_capped<R: Read>(pipe: Option<R>, cap: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    if let Some(pipe) = pipe {
        // One byte over the cap tells "exactly cap" from "more than cap".
        pipe.take(cap as u64 + 1).read_to_end(&mut buf)?;
    }
    Ok(buf)
}

fn join_reader(h: std::thread::JoinHandle<std::io::Result<Vec<u8>>>) -> std::io::Result<Vec<u8>> {
    h.join().unwrap_or_else(|_| Err(std::io::Error::other("output reader panicked")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Cmd {
        Cmd::new("/bin/sh").args(["-c", script])
    }

    #[test]
    fn captures_stdout_and_env() {
        let out = sh("echo \"$X\"; echo err >&2").env("X", "hello").run().expect("run");
        assert_eq!(out.stdout, b"hello\n");
        assert_eq!(out.stderr_text(), "err");
    }

    #[test]
    fn missing_program_is_not_found() {
        let err = Cmd::new("/nonexistent/tool").run().expect_err("missing");
        assert!(err.is_not_found(), "{err}");
        assert!(err.to_string().contains("/nonexistent/tool"), "{err}");
    }

    #[test]
    fn nonzero_exit_is_status_error_with_stderr() {
        let err = sh("echo bad thing >&2; exit 3").run().expect_err("exit 3");
        let msg = err.to_string();
        assert!(msg.contains("bad thing") && msg.contains('3'), "{msg}");
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("survived");
        // The grandchild would create the marker after 1 s unless killed with the group.
        let script = format!("(sleep 1; touch {}) & sleep 30", marker.display());
        let start = Instant::now();
        let err = sh(&script).timeout(Duration::from_millis(200)).run().expect_err("timeout");
        assert!(matches!(err, ExecError::Timeout { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1500));
        assert!(!marker.exists(), "grandchild outlived the kill");
    }

    #[test]
    fn a_background_job_holding_the_pipe_is_killed_after_exit() {
        let start = Instant::now();
        let out = sh("echo hi; sleep 30 &").timeout(Duration::from_secs(20)).run().expect("run");
        assert_eq!(out.stdout, b"hi\n");
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    }

    #[test]
    fn oversized_output_is_cut_off() {
        let err = sh("yes").max_output(1000).timeout(Duration::from_secs(5)).run().expect_err("cap");
        assert!(matches!(err, ExecError::TooMuchOutput { cap: 1000, .. }), "{err}");
        let ok = sh("printf 1234").max_output(4).run().expect("exactly the cap");
        assert_eq!(ok.stdout, b"1234");
    }

    #[test]
    fn a_timeout_too_large_for_the_clock_means_no_deadline() {
        let out = sh("echo done").timeout(Duration::MAX).run().expect("no panic, no timeout");
        assert_eq!(out.stdout, b"done\n");
        let out = sh("echo done").timeout(Duration::from_secs(u64::MAX >> 1)).run().expect("2^63 s");
        assert_eq!(out.stdout, b"done\n");
    }

    #[test]
    fn a_start_failure_says_why_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Cmd::new(dir.path()).run().expect_err("a directory is not a program");
        assert!(matches!(err, ExecError::Spawn { .. }), "{err}");
        let msg = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(msg.matches("os error").count(), 1, "{msg}");
    }
}
