//! The `commands` section: whether this host polls the dcmon server for commands, how often,
//! and which command types it runs. Off by default; `reboot` runs only when listed.

use serde::Deserialize;

/// A command type the dcmon server may queue (the original client's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandType {
    /// Read fan status, set the BMC fan mode, set fan duty per zone (Supermicro raw commands).
    FanControl,
    /// A delayed reboot.
    Reboot,
    /// Change `collection_interval` and the `exporters` map.
    ConfigUpdate,
}

impl CommandType {
    /// Every type, in the order the README lists them.
    pub const ALL: [CommandType; 3] = [CommandType::FanControl, CommandType::Reboot, CommandType::ConfigUpdate];

    /// The name the server uses.
    pub fn name(self) -> &'static str {
        match self {
            CommandType::FanControl => "fan_control",
            CommandType::Reboot => "reboot",
            CommandType::ConfigUpdate => "config_update",
        }
    }

    /// The type named `name`, if it is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The capabilities this type needs beyond the collectors' (for the unit's bounding set).
    pub fn caps(self) -> &'static [&'static str] {
        match self {
            // ipmitool's ioctls on /dev/ipmi0, as the ipmi collector.
            CommandType::FanControl => &["CAP_SYS_RAWIO"],
            // shutdown/systemctl ask systemd over D-Bus; as root that needs no capability in
            // the agent's own set, but a direct reboot(2) fallback needs CAP_SYS_BOOT.
            CommandType::Reboot => &["CAP_SYS_BOOT"],
            // Writes the config file: /etc/dcmon must be writable (ReadWritePaths), no capability.
            CommandType::ConfigUpdate => &[],
        }
    }
}

/// The `commands` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct CommandsConfig {
    /// Poll the server for commands at all.
    pub enabled: bool,
    /// Seconds between polls.
    pub poll_interval: u64,
    /// The command types this host runs; every other type is refused with a failed result.
    pub allow: Vec<CommandType>,
    /// The journal of command ids seen and results not yet delivered (at most once).
    pub journal: std::path::PathBuf,
    /// The program that schedules a reboot (`shutdown`, run as `shutdown -r +MINUTES`).
    pub shutdown: std::path::PathBuf,
    /// The program that runs `ipmitool raw` for fan control.
    pub ipmitool: std::path::PathBuf,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            poll_interval: 60,
            allow: Vec::new(),
            journal: "/var/lib/dcmon/commands.journal".into(),
            shutdown: "shutdown".into(),
            ipmitool: "ipmitool".into(),
        }
    }
}

impl CommandsConfig {
    /// Whether the agent polls and may run `kind`.
    pub fn allows(&self, kind: CommandType) -> bool {
        self.enabled && self.allow.contains(&kind)
    }

    /// The capabilities the allowed types need (none when polling is off).
    pub fn caps(&self) -> Vec<&'static str> {
        let mut caps: Vec<&'static str> = Vec::new();
        for kind in CommandType::ALL.into_iter().filter(|&k| self.allows(k)) {
            for cap in kind.caps() {
                if !caps.contains(cap) {
                    caps.push(cap);
                }
            }
        }
        caps
    }
}
