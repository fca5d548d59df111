//! A Debian 12 system booted under its own systemd with `systemd-nspawn -b` (needs root,
//! debootstrap and systemd-container), for the tests that drive the packaged service the way an
//! operator does: `dpkg -i`, `systemctl`, `journalctl`.
//!
//! The root made by debootstrap is cached under [`CACHE_DIR`] (about 2 minutes to make, 240 MB);
//! each boot runs on a copy that is deleted with the [`Container`], so runs never change it.
//! The container shares the host's network: a server on the host's 127.0.0.1 is reachable.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where the debootstrapped roots are kept between runs on one machine.
pub const CACHE_DIR: &str = "/var/cache/dcmon-test";
/// The cached root's name: change it to make every machine build a fresh one (a different
/// suite, more packages).
pub const ROOT_VERSION: &str = "debian-bookworm-minbase-systemd-procps-v2";
const DEBOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(600);
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long an orderly poweroff may take before the container's processes are killed.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(30);

/// The cached Debian 12 root with systemd, made with debootstrap from Debian's archive the
/// first time (into a temporary directory renamed into place, so an interrupted run leaves no
/// half-made root).
pub fn debian_root() -> anyhow::Result<PathBuf> {
    let root = Path::new(CACHE_DIR).join(ROOT_VERSION);
    if root.join("usr/lib/systemd/systemd").exists() {
        return Ok(root);
    }
    std::fs::create_dir_all(CACHE_DIR)?;
    let partial = tempfile::Builder::new().prefix(".debootstrap-").tempdir_in(CACHE_DIR)?;
    let target = partial.path().join("root");
    let mut cmd = Command::new("debootstrap");
    cmd.args(["--variant=minbase", "--include=systemd,systemd-sysv,dbus,procps", "bookworm"])
        .arg(&target)
        .arg("http://deb.debian.org/debian");
    let out = run_with_timeout(&mut cmd, DEBOOTSTRAP_TIMEOUT)?;
    if !out.status.success() {
        anyhow::bail!("debootstrap failed ({}):\n{}", out.status, text(&out));
    }
    match std::fs::rename(&target, &root) {
        Ok(()) => Ok(root),
        // Another run finished first: use its root, ours goes with `partial`.
        Err(_) if root.join("usr/lib/systemd/systemd").exists() => Ok(root),
        Err(e) => Err(anyhow::anyhow!("cannot move {} to {}: {e}", target.display(), root.display())),
    }
}

/// A booted container; powered off (and, failing that, killed) and its root deleted on drop.
#[derive(Debug)]
pub struct Container {
    nspawn: Child,
    /// The container's PID 1 as the host sees it (the target of `nsenter`).
    leader: u32,
    dir: tempfile::TempDir,
    console: PathBuf,
}

impl Container {
    /// Copy `base` and boot the copy with systemd-nspawn's `options` added; returns once
    /// systemd says the system is up.
    pub fn boot(base: &Path, options: &[&str]) -> anyhow::Result<Self> {
        let dir =
            tempfile::Builder::new().prefix(".run-").tempdir_in(base.parent().unwrap_or(Path::new("/var/tmp")))?;
        let copy = Command::new("cp").arg("-a").arg(base).arg(dir.path().join("root")).output()?;
        if !copy.status.success() {
            anyhow::bail!("cannot copy {}: {}", base.display(), text(&copy));
        }
        let console = dir.path().join("console.log");
        let log = std::fs::File::create(&console)?;
        let nspawn = Command::new("systemd-nspawn")
            // No machined on the host to register with, and no scope of its own: the
            // container's cgroup is under this test's.
            .args(["--register=no", "--keep-unit", "--quiet", "-b"])
            .args(options)
            .arg("-D")
            .arg(dir.path().join("root"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut container = Self { nspawn, leader: 0, dir, console };
        let pid = container.nspawn.id();
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if let Some(status) = container.nspawn.try_wait()? {
                anyhow::bail!("systemd-nspawn exited ({status}) while booting:\n{}", container.console_log());
            }
            // nspawn's first child only sets the container up and exits; PID 1 is the child that
            // runs systemd.
            match container_init(pid) {
                Some(init) => container.leader = init,
                None if Instant::now() > deadline => {
                    anyhow::bail!("systemd-nspawn started no container:\n{}", container.console_log())
                }
                None => {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            let answer = container.exec(&["systemctl", "is-system-running"])?;
            let state = String::from_utf8_lossy(&answer.stdout).trim().to_owned();
            match state.as_str() {
                "running" => return Ok(container),
                "degraded" => {
                    let failed = container.exec(&["systemctl", "--failed", "--no-legend"])?;
                    anyhow::bail!("the container booted degraded:\n{}", text(&failed));
                }
                _ if Instant::now() > deadline => {
                    anyhow::bail!(
                        "not booted after {BOOT_TIMEOUT:?} (PID 1 {}: {}):\n{}",
                        container.leader,
                        text(&answer),
                        container.console_log()
                    )
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// The container's root directory as the host sees it (to put files in and look at them).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// A path inside the container, as the host sees it.
    pub fn path(&self, inside: &str) -> PathBuf {
        self.root().join(inside.trim_start_matches('/'))
    }

    /// The container's PID 1 as the host sees it.
    pub fn leader(&self) -> u32 {
        self.leader
    }

    /// Run `argv` inside the container (all its namespaces), 60 s at most.
    pub fn exec(&self, argv: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t").arg(self.leader.to_string()).arg("-a").arg("--").args(argv);
        // A clean environment, as a login shell in the container would have.
        cmd.env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C.UTF-8");
        run_with_timeout(&mut cmd, Duration::from_secs(60))
            .map_err(|e| anyhow::anyhow!("`{}` in the container: {e}", argv.join(" ")))
    }

    /// Run `argv` inside the container and fail unless it exits 0; returns stdout and stderr.
    pub fn ok(&self, argv: &[&str]) -> anyhow::Result<String> {
        let out = self.exec(argv)?;
        if !out.status.success() {
            anyhow::bail!("`{}` in the container failed ({}):\n{}", argv.join(" "), out.status, text(&out));
        }
        Ok(text(&out))
    }

    /// What systemd-nspawn and the container's console printed so far.
    pub fn console_log(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Power the container off, killing it if it does not stop in time; true if it stopped by
    /// itself.
    pub fn poweroff(&mut self) -> bool {
        if matches!(self.nspawn.try_wait(), Ok(Some(_))) {
            return true;
        }
        // systemd-nspawn turns SIGTERM into an orderly shutdown of the container's systemd.
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(self.nspawn.id() as libc::pid_t, libc::SIGTERM) };
        let stopped = crate::wait_until(POWEROFF_TIMEOUT, || self.nspawn.try_wait().ok().flatten()).is_some();
        if !stopped {
            // Killing the PID namespace's init kills every process in it.
            // SAFETY: plain kill(2); at worst the process is already gone.
            unsafe { libc::kill(self.leader as libc::pid_t, libc::SIGKILL) };
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        }
        stopped
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.poweroff();
    }
}

/// The child of systemd-nspawn `nspawn` that runs systemd: the container's PID 1.
fn container_init(nspawn: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{nspawn}/task/{nspawn}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .find(|c| std::fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|comm| comm.trim() == "systemd"))
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    wait_with_timeout(child, timeout)
}

/// Wait for `child`, reading its output on threads (a full pipe must not block it); kill it
/// after `timeout`.
fn wait_with_timeout(mut child: Child, timeout: Duration) -> anyhow::Result<Output> {
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let status = match crate::wait_until(timeout, || child.try_wait().ok().flatten()) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("timed out after {timeout:?}");
        }
    };
    Ok(Output { status, stdout: stdout.join().unwrap_or_default(), stderr: stderr.join().unwrap_or_default() })
}
