//! Running a checked [`Action`]: fan control through `ipmitool raw` (the bytes logged), a
//! delayed reboot through `shutdown -r +N`, and a config update written back to the config file
//! atomically and then applied as a SIGHUP reload is.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::journal::Outcome;
use super::parse::{Action, BmcMode, FanAction, raw_get_duty, raw_get_mode, raw_set_duty, raw_set_mode};
use crate::config::{CommandsConfig, Config, Schema};
use crate::exec::Cmd;

/// How long one ipmitool or shutdown run may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// What running commands needs besides the action.
pub struct Runner {
    /// The `commands` section (program paths).
    pub config: CommandsConfig,
    /// The config file `config_update` rewrites.
    pub config_path: PathBuf,
    /// The schema the config file is validated with.
    pub schema: Schema,
    /// Asks the daemon to re-read the config (as SIGHUP does).
    pub reload: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner").field("config", &self.config).field("config_path", &self.config_path).finish()
    }
}

fn ok(message: String) -> Outcome {
    Outcome { success: true, message }
}

fn failed(message: String) -> Outcome {
    Outcome { success: false, message }
}

impl Runner {
    /// Run `action` (blocking: call from a blocking thread).
    pub fn run(&self, action: &Action) -> Outcome {
        match action {
            Action::Fan(fan) => self.fan(*fan),
            Action::Reboot { delay_minutes } => self.reboot(*delay_minutes),
            Action::ConfigUpdate { collection_interval, exporters } => {
                match self.config_update(collection_interval.as_ref(), exporters.as_ref()) {
                    Ok(message) => {
                        (self.reload)();
                        ok(message)
                    }
                    Err(message) => failed(message),
                }
            }
        }
    }

    fn ipmi_raw(&self, args: &[String]) -> Result<String, String> {
        tracing::info!(bytes = %args.join(" "), "command: ipmitool raw");
        let out = Cmd::new(&self.config.ipmitool)
            .args(["raw"])
            .args(args)
            .timeout(TOOL_TIMEOUT)
            .max_output(4096)
            .run()
            .map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    fn fan(&self, action: FanAction) -> Outcome {
        let result = match action {
            FanAction::GetStatus => self.fan_status(),
            FanAction::SetBmcMode(mode) => {
                self.ipmi_raw(&raw_set_mode(mode)).map(|_| format!("BMC mode set to {}", mode.name()))
            }
            FanAction::SetFanSpeed { zone, speed } => {
                self.ipmi_raw(&raw_set_duty(zone, speed)).map(|_| format!("Zone {zone} speed set to {speed}%"))
            }
            FanAction::SetFanSpeeds { zone0, zone1 } => self
                .ipmi_raw(&raw_set_duty(0, zone0))
                .and_then(|_| self.ipmi_raw(&raw_set_duty(1, zone1)))
                .map(|_| format!("Zone 0 speed set to {zone0}%, zone 1 speed set to {zone1}%")),
        };
        match result {
            Ok(m) => ok(m),
            Err(m) => failed(format!("fan_control: {m}")),
        }
    }

    fn fan_status(&self) -> Result<String, String> {
        let byte = |text: &str| u8::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok();
        let mode = self.ipmi_raw(&raw_get_mode())?;
        let mode = byte(&mode).map_or_else(
            || format!("unreadable ({:?})", mode.chars().take(32).collect::<String>()),
            |b| BmcMode::from_byte(b).map_or_else(|| format!("unknown (0x{b:02x})"), |m| m.name().to_owned()),
        );
        let mut zones = Vec::new();
        for zone in super::parse::FAN_ZONES {
            let duty = self.ipmi_raw(&raw_get_duty(zone))?;
            zones
                .push(byte(&duty).map_or_else(|| format!("zone {zone}: unreadable"), |d| format!("zone {zone}: {d}%")));
        }
        Ok(format!("BMC mode {mode}; {}", zones.join(", ")))
    }

    fn reboot(&self, minutes: u64) -> Outcome {
        let when = format!("+{minutes}");
        tracing::warn!("command: reboot scheduled with {} -r {when}", self.config.shutdown.display());
        match Cmd::new(&self.config.shutdown).args(["-r", when.as_str()]).timeout(TOOL_TIMEOUT).run() {
            Ok(_) => ok(format!("Reboot scheduled in {minutes} minute(s)")),
            Err(e) => failed(format!("reboot: {e}")),
        }
    }

    /// Write the new values into the config file's text, validate the result exactly as the
    /// file is validated, and replace the file atomically.
    fn config_update(
        &self,
        interval: Option<&Value>,
        exporters: Option<&serde_json::Map<String, Value>>,
    ) -> Result<String, String> {
        let path = &self.config_path;
        let mut top = match crate::secure_file::read(path, crate::config::MAX_CONFIG_FILE_BYTES) {
            Ok((bytes, _)) => serde_json::from_slice::<serde_json::Map<String, Value>>(&bytes)
                .map_err(|e| format!("config_update: {}: {e}", path.display()))?,
            Err(e) if e.is_not_found() => serde_json::Map::new(),
            Err(e) => return Err(format!("config_update: {}: {e}", path.display())),
        };
        let mut changed = Vec::new();
        if let Some(interval) = interval {
            top.insert("collection_interval".into(), interval.clone());
            changed.push(format!("collection_interval={interval}"));
        }
        if let Some(new) = exporters {
            let entry = top.entry("exporters").or_insert_with(|| Value::Object(serde_json::Map::new()));
            let Value::Object(current) = entry else {
                return Err("config_update: the config file's `exporters` is not an object".into());
            };
            for (name, on) in new {
                current.insert(name.clone(), on.clone());
                changed.push(format!("exporters.{}={on}", name.chars().take(64).collect::<String>()));
            }
        }
        let text = serde_json::to_string_pretty(&top).map_err(|e| format!("config_update: {e}"))?;
        let (_, unknown) =
            Config::parse(path, &text, &self.schema).map_err(|e| format!("config_update refused: {e}"))?;
        if let Some(key) = unknown.iter().find(|k| k.starts_with("exporters.")) {
            return Err(format!("config_update refused: unknown exporter `{key}`"));
        }
        write_atomically(path, text.as_bytes()).map_err(|e| format!("config_update: {}: {e}", path.display()))?;
        Ok(format!("config updated ({}) and reloaded", changed.join(", ")))
    }
}

/// Temp file beside `path`, fsync, rename over `path`, fsync the directory.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".dcmon-tmp");
    let tmp = dir.join(name);
    // The file's own mode, or 0644 as install writes it (the API key lives in its own file).
    let mode =
        std::fs::metadata(path).map_or(0o644, |m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777);
    let mut file = std::fs::File::create(&tmp)?;
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CommandType;
    use std::os::unix::fs::PermissionsExt as _;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A script that appends its arguments to `log` and prints `answer`.
    fn fake(dir: &Path, name: &str, answer: &str) -> PathBuf {
        let path = dir.join(name);
        let log = dir.join(format!("{name}.log"));
        std::fs::write(&path, format!("#!/bin/sh\necho \"$*\" >> {}\necho '{answer}'\n", log.display()))
            .expect("script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    fn runner(dir: &Path) -> (Runner, Arc<AtomicUsize>) {
        let reloads = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&reloads);
        let config = CommandsConfig {
            enabled: true,
            allow: CommandType::ALL.to_vec(),
            ipmitool: fake(dir, "ipmitool", " 01"),
            shutdown: fake(dir, "shutdown", ""),
            ..CommandsConfig::default()
        };
        let runner = Runner {
            config,
            config_path: dir.join("config.json"),
            schema: crate::collector::schema(),
            reload: Box::new(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            }),
        };
        (runner, reloads)
    }

    fn log(dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    #[test]
    fn fan_commands_send_the_raw_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (r, _) = runner(dir.path());
        let out = r.run(&Action::Fan(FanAction::SetFanSpeeds { zone0: 30, zone1: 100 }));
        assert!(out.success, "{out:?}");
        let out = r.run(&Action::Fan(FanAction::SetBmcMode(BmcMode::FullSpeed)));
        assert!(out.success, "{out:?}");
        let out = r.run(&Action::Fan(FanAction::GetStatus));
        assert_eq!(out.message, "BMC mode FULL_SPEED; zone 0: 1%, zone 1: 1%");
        assert_eq!(
            log(dir.path(), "ipmitool"),
            "raw 0x30 0x70 0x66 0x01 0x00 0x1e\nraw 0x30 0x70 0x66 0x01 0x01 0x64\nraw 0x30 0x45 0x01 0x01\n\
             raw 0x30 0x45 0x00\nraw 0x30 0x70 0x66 0x00 0x00\nraw 0x30 0x70 0x66 0x00 0x01\n"
        );
    }

    #[test]
    fn a_failing_ipmitool_is_a_failed_result() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut r, _) = runner(dir.path());
        r.config.ipmitool = dir.path().join("missing");
        let out = r.run(&Action::Fan(FanAction::GetStatus));
        assert!(!out.success && out.message.contains("not found"), "{out:?}");
    }

    #[test]
    fn reboot_is_scheduled_with_the_delay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (r, _) = runner(dir.path());
        let out = r.run(&Action::Reboot { delay_minutes: 5 });
        assert!(out.success, "{out:?}");
        assert_eq!(log(dir.path(), "shutdown"), "-r +5\n");
    }

    #[test]
    fn config_update_is_validated_written_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (r, reloads) = runner(dir.path());
        std::fs::write(&r.config_path, r#"{"server_url": "http://s:8000", "exporters": {"apt": true}}"#)
            .expect("config");
        let mut exporters = serde_json::Map::new();
        exporters.insert("apt".into(), Value::Bool(false));
        let out =
            r.run(&Action::ConfigUpdate { collection_interval: Some(Value::from(60)), exporters: Some(exporters) });
        assert!(out.success, "{out:?}");
        assert_eq!(reloads.load(Ordering::SeqCst), 1);
        let loaded = Config::load(&r.config_path, true, &r.schema).expect("written config loads");
        assert_eq!(loaded.config.collection_interval, 60);
        assert!(!loaded.config.exporters.enabled("apt"));
        assert_eq!(loaded.config.server_url, "http://s:8000");

        // Invalid values are refused as the config file would be; the file is untouched.
        let before = std::fs::read(&r.config_path).expect("read");
        for (interval, exporters) in [
            (Some(Value::from(0)), None),
            (Some(Value::from("60")), None),
            (None, Some(serde_json::json!({"apt": "yes"}))),
            (None, Some(serde_json::json!({"rootkit": true}))),
        ] {
            let exporters = exporters.and_then(|e: Value| e.as_object().cloned());
            let out = r.run(&Action::ConfigUpdate { collection_interval: interval, exporters });
            assert!(!out.success && out.message.contains("refused"), "{out:?}");
        }
        assert_eq!(std::fs::read(&r.config_path).expect("read"), before);
        assert_eq!(reloads.load(Ordering::SeqCst), 1);
    }
}
