//! The agent under test: its binary, a process running it, and the files it is started with.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::wait_until;

/// The `dcmon-agent` binary under test: `$DCMON_AGENT_BIN`, else the one cargo built next to
/// this test executable. `cargo test --workspace` builds it (the dcmon-agent package has
/// integration tests of its own); `cargo test -p dcmon-tests` alone does not.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DCMON_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test-exe> -> target/<profile>/dcmon-agent
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).map(PathBuf::from).unwrap_or_default();
    let bin = profile_dir.join("dcmon-agent");
    assert!(
        bin.exists(),
        "{} not found: run the tests with `cargo test --workspace` (it builds the agent), build it first \
         with `cargo build -p dcmon-agent`, or set DCMON_AGENT_BIN",
        bin.display()
    );
    bin
}

/// A running `dcmon-agent` with its stderr captured to a file; killed when dropped.
#[derive(Debug)]
pub struct AgentProcess {
    child: std::process::Child,
    stderr_path: PathBuf,
}

impl AgentProcess {
    /// Start `dcmon-agent --config CONFIG ARGS...`; stderr goes to `<dir>/agent.stderr`,
    /// stdout to `<dir>/agent.stdout`.
    pub fn start(dir: &Path, config: &Path, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_env(dir, config, args, &[])
    }

    /// [`AgentProcess::start`] with extra environment variables.
    pub fn start_with_env(
        dir: &Path,
        config: &Path,
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> anyhow::Result<Self> {
        let stderr_path = dir.join("agent.stderr");
        let child = std::process::Command::new(agent_bin())
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .arg("--config")
            .arg(config)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(dir.join("agent.stdout"))?)
            .stderr(std::fs::File::create(&stderr_path)?)
            .spawn()?;
        Ok(Self { child, stderr_path })
    }

    /// Everything the agent logged so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send a signal (e.g. "TERM") with kill(1) and wait up to `timeout` for the exit.
    pub fn signal_and_wait(&mut self, signal: &str, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = std::process::Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status();
        wait_until(timeout, || self.try_wait())
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long `once` may take before the test calls it hung (it takes well under a second).
const ONCE_DEADLINE: Duration = Duration::from_secs(20);

/// `dcmon-agent --config CONFIG once` in `dir`, under a deadline (it must not hang): its
/// stdout (the batch) and stderr (the log). Fails the test if it fails, with the log.
#[track_caller]
pub fn run_once(dir: &Path, config: &Path) -> (String, String) {
    let mut agent = AgentProcess::start(dir, config, &["once"]).unwrap_or_else(|e| panic!("starting once: {e:#}"));
    let started = std::time::Instant::now();
    let status = wait_until(ONCE_DEADLINE, || agent.try_wait());
    let log = agent.stderr();
    let status = status.unwrap_or_else(|| panic!("`once` still running after {ONCE_DEADLINE:?}:\n{log}"));
    assert!(status.success(), "`once` failed ({status}) after {:?}:\n{log}", started.elapsed());
    let stdout_path = dir.join("agent.stdout");
    let stdout =
        std::fs::read_to_string(&stdout_path).unwrap_or_else(|e| panic!("reading {}: {e}", stdout_path.display()));
    (stdout, log)
}

/// Write `key` to `<dir>/api_key` with mode 0600 and return the path.
pub fn write_key(dir: &Path, key: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("api_key");
    std::fs::write(&p, format!("{key}\n"))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
    Ok(p)
}

/// The config file of an agent under test, built key by key. The keys are the agent's own
/// (README, Configuration); anything not set keeps the agent's default.
#[derive(Debug, Clone, Default)]
pub struct AgentConfig(Map<String, Value>);

impl AgentConfig {
    /// No keys: every setting at the agent's default.
    pub fn new() -> Self {
        Self::default()
    }

    /// The hardware exporters (IPMI, apt, NVMe, nvidia-smi, GPU XIDs) off, so a test sees the
    /// OS collectors of its host root alone, whatever devices this machine has.
    pub fn without_exporters() -> Self {
        Self::new()
            .set("exporters", json!({"ipmi": false, "apt": false, "nvme": false, "nvsmi": false, "gpu_xid": false}))
    }

    /// Set `key` (replacing what was there).
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.0.insert(key.to_owned(), value.into());
        self
    }

    /// Set every key of the JSON object `settings`.
    #[track_caller]
    pub fn extend(mut self, settings: Value) -> Self {
        let Value::Object(settings) = settings else { panic!("AgentConfig::extend takes an object, got {settings}") };
        self.0.extend(settings);
        self
    }

    /// The config file's text.
    pub fn to_json(&self) -> String {
        Value::Object(self.0.clone()).to_string()
    }

    /// Write it to `<dir>/config.json` and return that path.
    #[track_caller]
    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("config.json");
        std::fs::write(&path, self.to_json()).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }
}
