//! `dcmon-agent install` / `uninstall`: the binary, the config, the state directory and the
//! systemd unit, as idempotent steps (a second install changes nothing), each printable with
//! `--dry-run`, all under a `--root` so tests (and image builders) can install into a folder.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use crate::config::Config;

/// The unit's name, as the spec's `systemctl start dcmon-client`.
pub const UNIT_NAME: &str = "dcmon-client.service";
/// The config written on first install: the spec's default, with a switch for each exporter
/// of the collector table ([`crate::collector::SOURCES`]) at its default. The sections are
/// left out, so their defaults stay the agent's and can improve with it.
pub fn default_config_json() -> String {
    let defaults = Config::default();
    let switches: Vec<String> = defaults.exporters.iter().map(|(name, on)| format!("    \"{name}\": {on}")).collect();
    format!(
        "{{\n  \"server_url\": \"{}\",\n  \"collection_interval\": {},\n  \"exporters\": {{\n{}\n  }}\n}}\n",
        defaults.server_url,
        defaults.collection_interval,
        switches.join(",\n")
    )
}

/// Where the Debian package puts the agent, its unit and its config (dcmon-agent/debian/).
pub const PACKAGED_BINARY: &str = "/usr/bin/dcmon-agent";

/// The systemd unit for an agent installed at `binary`, reading `config_path`, as `install`
/// writes it to /etc/systemd/system.
pub fn render_unit(binary: &Path, config_path: &Path, config: &Config) -> String {
    format!(
        "# Written by `dcmon-agent install`; it is rewritten on the next install.\n\
         # Local changes belong in `systemctl edit dcmon-client`.\n{}",
        unit_body(binary, config_path, config)
    )
}

/// The unit the Debian package ships in /lib/systemd/system: the defaults' unit for
/// [`PACKAGED_BINARY`] (a test holds dcmon-agent/debian/dcmon-client.service equal to it).
pub fn packaged_unit() -> String {
    format!(
        "# Shipped by the dcmon-agent package. Local changes belong in `systemctl edit dcmon-client`;\n\
         # `dcmon-agent install` writes a unit for the current config to /etc/systemd/system instead.\n{}",
        unit_body(Path::new(PACKAGED_BINARY), Path::new(crate::config::DEFAULT_CONFIG_PATH), &Config::default())
    )
}

fn unit_body(binary: &Path, config_path: &Path, config: &Config) -> String {
    let caps = crate::collector::capabilities(config).join(" ");
    // Each sandboxing directive is kept only while every collector still works under it, eBPF
    // included (the container test, tests/tests/systemd_nspawn.rs). The syscall filter is
    // systemd's set for services plus what loading and attaching the BPF programs needs; a
    // call outside it fails with EPERM rather than killing the agent.
    // The outbox must be writable under ProtectSystem=strict; '-' tolerates a missing path.
    let mut writable = vec!["/var/lib/dcmon".to_owned()];
    if !config.outbox_dir.starts_with("/var/lib/dcmon") {
        writable.push(format!("-{}", config.outbox_dir.display()));
    }
    // The command journal, when polling is on and it lives elsewhere.
    if config.commands.enabled
        && !config.commands.journal.starts_with("/var/lib/dcmon")
        && let Some(dir) = config.commands.journal.parent().filter(|d| !d.as_os_str().is_empty())
    {
        writable.push(format!("-{}", dir.display()));
    }
    // config_update writes the config file back (temp file + rename in its directory).
    if config.commands.allows(crate::config::CommandType::ConfigUpdate)
        && let Some(dir) = config_path.parent().filter(|d| !d.as_os_str().is_empty())
    {
        writable.push(format!("-{}", dir.display()));
    }
    format!(
        "[Unit]\n\
         Description=dcmon host monitoring agent\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         \n\
         [Service]\n\
         Type=notify\n\
         NotifyAccess=main\n\
         ExecStart={binary} --config {config} run\n\
         ExecReload=/bin/kill -HUP $MAINPID\n\
         Restart=on-failure\n\
         RestartSec=5s\n\
         WatchdogSec=60s\n\
         TimeoutStopSec=15s\n\
         StateDirectory=dcmon\n\
         StateDirectoryMode=0750\n\
         ReadWritePaths={writable}\n\
         NoNewPrivileges=yes\n\
         ProtectSystem=strict\n\
         ProtectHome=yes\n\
         PrivateTmp=yes\n\
         ProtectKernelModules=yes\n\
         ProtectKernelTunables=yes\n\
         {kernel_logs}\
         ProtectControlGroups=yes\n\
         ProtectClock=yes\n\
         ProtectHostname=yes\n\
         RestrictNamespaces=yes\n\
         RestrictRealtime=yes\n\
         RestrictSUIDSGID=yes\n\
         LockPersonality=yes\n\
         MemoryDenyWriteExecute=yes\n\
         SystemCallArchitectures=native\n\
         RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK\n\
         SystemCallFilter=@system-service bpf perf_event_open\n\
         SystemCallErrorNumber=EPERM\n\
         CapabilityBoundingSet={caps}\n\
         StandardOutput=journal\n\
         StandardError=journal\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        binary = binary.display(),
        config = config_path.display(),
        writable = writable.join(" "),
        // gpu_xid reads /dev/kmsg, which ProtectKernelLogs hides.
        kernel_logs = if config.exporters.enabled("gpu_xid") { "" } else { "ProtectKernelLogs=yes\n" },
    )
}

/// Where and how to install.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// Filesystem root to install under (`/` for the real system).
    pub root: PathBuf,
    /// Installation prefix; the binary goes to `<prefix>/bin/dcmon-agent`.
    pub prefix: PathBuf,
    /// The config path the unit passes to the agent (as seen on the installed system).
    pub config_path: PathBuf,
    /// The binary to install (normally the running one).
    pub source_binary: PathBuf,
    /// Print the steps, do nothing.
    pub dry_run: bool,
}

impl InstallOptions {
    fn under_root(&self, p: &Path) -> PathBuf {
        self.root.join(p.strip_prefix("/").unwrap_or(p))
    }

    fn installed_binary(&self) -> PathBuf {
        self.prefix.join("bin/dcmon-agent")
    }

    fn systemd_running(&self) -> bool {
        self.root == Path::new("/") && Path::new("/run/systemd/system").is_dir()
    }
}

/// One step of an install or uninstall.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Dir { path: PathBuf, mode: u32 },
    File { path: PathBuf, contents: Vec<u8>, mode: u32, keep_existing: bool },
    Remove { path: PathBuf },
    RemoveTree { path: PathBuf },
    Run { argv: Vec<String> },
}

/// What happened (or, with `--dry-run`, would happen): one line per step.
pub type Report = Vec<String>;

/// Install the agent (see the module docs). `config` is the config the unit is rendered for
/// (the existing one at `config_path`, or the defaults).
pub fn install(opts: &InstallOptions, config: &Config) -> anyhow::Result<Report> {
    let binary = std::fs::read(&opts.source_binary)
        .map_err(|e| anyhow::anyhow!("cannot read the agent binary {}: {e}", opts.source_binary.display()))?;
    let config_dir = opts.config_path.parent().unwrap_or(Path::new("/etc/dcmon")).to_owned();
    let unit_path = PathBuf::from("/etc/systemd/system").join(UNIT_NAME);
    let unit = render_unit(&opts.installed_binary(), &opts.config_path, config);
    let unit_changed = std::fs::read(opts.under_root(&unit_path)).ok().as_deref() != Some(unit.as_bytes());
    let mut steps = vec![
        Step::Dir { path: opts.prefix.join("bin"), mode: 0o755 },
        Step::File { path: opts.installed_binary(), contents: binary, mode: 0o755, keep_existing: false },
        Step::Dir { path: config_dir, mode: 0o755 },
        Step::File {
            path: opts.config_path.clone(),
            contents: default_config_json().into_bytes(),
            mode: 0o644,
            keep_existing: true,
        },
        Step::Dir { path: PathBuf::from("/var/lib/dcmon"), mode: 0o750 },
        Step::Dir { path: PathBuf::from("/etc/systemd/system"), mode: 0o755 },
        Step::File { path: unit_path, contents: unit.into_bytes(), mode: 0o644, keep_existing: false },
    ];
    let mut report = Report::new();
    if opts.systemd_running() {
        if unit_changed {
            steps.push(Step::Run { argv: vec!["systemctl".into(), "daemon-reload".into()] });
        }
        let enabled = std::process::Command::new("systemctl")
            .args(["is-enabled", "--quiet", UNIT_NAME])
            .status()
            .is_ok_and(|s| s.success());
        if !enabled {
            steps.push(Step::Run { argv: vec!["systemctl".into(), "enable".into(), UNIT_NAME.into()] });
        }
        run_steps(opts, &steps, &mut report)?;
    } else {
        run_steps(opts, &steps, &mut report)?;
        report.push(format!(
            "systemd is not running here: on the target system run `systemctl daemon-reload && systemctl enable --now {UNIT_NAME}`"
        ));
    }
    report.push(format!(
        "next: set the API key (dcmon-agent register --server URL, or echo 'YOUR_API_KEY' | sudo tee /etc/dcmon/api_key > /dev/null && sudo chmod 600 /etc/dcmon/api_key), then `systemctl start {UNIT_NAME}`"
    ));
    Ok(report)
}

/// Remove what install put in place. Config, key and outbox stay unless `purge`.
pub fn uninstall(opts: &InstallOptions, purge: bool) -> anyhow::Result<Report> {
    let mut steps = Vec::new();
    if opts.systemd_running() {
        steps.push(Step::Run { argv: vec!["systemctl".into(), "disable".into(), "--now".into(), UNIT_NAME.into()] });
    }
    steps.push(Step::Remove { path: PathBuf::from("/etc/systemd/system").join(UNIT_NAME) });
    if opts.systemd_running() {
        steps.push(Step::Run { argv: vec!["systemctl".into(), "daemon-reload".into()] });
    }
    steps.push(Step::Remove { path: opts.installed_binary() });
    let config_dir = opts.config_path.parent().unwrap_or(Path::new("/etc/dcmon")).to_owned();
    if purge {
        steps.push(Step::RemoveTree { path: config_dir.clone() });
        steps.push(Step::RemoveTree { path: PathBuf::from("/var/lib/dcmon") });
    }
    let mut report = Report::new();
    run_steps(opts, &steps, &mut report)?;
    if !purge {
        report.push(format!(
            "kept {} (config and API key) and /var/lib/dcmon (unsent batches); `uninstall --purge` removes them",
            config_dir.display()
        ));
    }
    Ok(report)
}

fn run_steps(opts: &InstallOptions, steps: &[Step], report: &mut Report) -> anyhow::Result<()> {
    let would = if opts.dry_run { "would " } else { "" };
    for step in steps {
        match step {
            Step::Dir { path, mode } => {
                let real = opts.under_root(path);
                if real.is_dir() {
                    report.push(format!("unchanged: directory {}", path.display()));
                    continue;
                }
                report.push(format!("{would}create directory {} (mode {mode:04o})", path.display()));
                if !opts.dry_run {
                    std::fs::create_dir_all(&real)
                        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", real.display()))?;
                    set_mode(&real, *mode)?;
                }
            }
            Step::File { path, contents, mode, keep_existing } => {
                let real = opts.under_root(path);
                match std::fs::read(&real) {
                    Ok(_) if *keep_existing => {
                        report.push(format!("unchanged: {} exists and is kept", path.display()));
                        continue;
                    }
                    Ok(existing) if existing == *contents && file_mode(&real) == Some(*mode) => {
                        report.push(format!("unchanged: {}", path.display()));
                        continue;
                    }
                    Ok(_) => report.push(format!("{would}update {} (mode {mode:04o})", path.display())),
                    Err(_) => report.push(format!("{would}write {} (mode {mode:04o})", path.display())),
                }
                if !opts.dry_run {
                    write_atomically(&real, contents, *mode)?;
                }
            }
            Step::Remove { path } => {
                let real = opts.under_root(path);
                if !real.exists() {
                    report.push(format!("unchanged: {} is not there", path.display()));
                    continue;
                }
                report.push(format!("{would}remove {}", path.display()));
                if !opts.dry_run {
                    std::fs::remove_file(&real)
                        .map_err(|e| anyhow::anyhow!("cannot remove {}: {e}", real.display()))?;
                }
            }
            Step::RemoveTree { path } => {
                let real = opts.under_root(path);
                if !real.exists() {
                    report.push(format!("unchanged: {} is not there", path.display()));
                    continue;
                }
                report.push(format!("{would}remove {} and everything in it", path.display()));
                if !opts.dry_run {
                    std::fs::remove_dir_all(&real)
                        .map_err(|e| anyhow::anyhow!("cannot remove {}: {e}", real.display()))?;
                }
            }
            Step::Run { argv } => {
                report.push(format!("{would}run {}", argv.join(" ")));
                if !opts.dry_run {
                    let status = std::process::Command::new(&argv[0])
                        .args(&argv[1..])
                        .status()
                        .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", argv[0]))?;
                    if !status.success() {
                        anyhow::bail!("`{}` failed with {status}", argv.join(" "));
                    }
                }
            }
        }
    }
    Ok(())
}

fn file_mode(p: &Path) -> Option<u32> {
    std::fs::metadata(p).ok().map(|m| m.permissions().mode() & 0o7777)
}

fn set_mode(p: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| anyhow::anyhow!("cannot set mode {mode:04o} on {}: {e}", p.display()))
}

/// Write via a temporary file and rename, so a running binary or a unit is never half-written.
fn write_atomically(p: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = p.with_extension("dcmon-new");
    std::fs::write(&tmp, contents).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    set_mode(&tmp, mode)?;
    std::fs::rename(&tmp, p).map_err(|e| anyhow::anyhow!("cannot move {} to {}: {e}", tmp.display(), p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::capabilities;

    #[test]
    fn capability_set_follows_the_enabled_collectors() {
        let unit_for =
            |c: &Config| render_unit(Path::new("/usr/local/bin/dcmon-agent"), Path::new("/etc/dcmon/config.json"), c);
        let mut c = Config::default();
        assert_eq!(
            capabilities(&c),
            ["CAP_BPF", "CAP_PERFMON", "CAP_DAC_READ_SEARCH", "CAP_SYS_ADMIN", "CAP_SYS_RAWIO", "CAP_SYSLOG"],
            "defaults: eBPF auto, NVMe, IPMI and GPU XIDs on"
        );
        c.exporters.set("nvme", false);
        c.exporters.set("ipmi", false);
        c.exporters.set("gpu_xid", false);
        assert!(unit_for(&c).contains("\nCapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_DAC_READ_SEARCH\n"));
        c.ebpf = crate::config::EbpfMode::On;
        assert!(unit_for(&c).contains("\nCapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_DAC_READ_SEARCH\n"));
        c.ebpf = crate::config::EbpfMode::Off;
        let unit = unit_for(&c);
        assert!(unit.contains("\nCapabilityBoundingSet=\n"), "no collector needs a capability: drop all: {unit}");
        assert!(unit.contains("\nProtectKernelLogs=yes\n"), "no kernel log reader: hidden: {unit}");
        c.exporters.set("gpu_xid", true);
        assert!(!unit_for(&c).contains("ProtectKernelLogs"), "gpu_xid reads /dev/kmsg");
        c.exporters.set("gpu_xid", false);
        c.exporters.set("ipmi", true);
        assert!(unit_for(&c).contains("\nCapabilityBoundingSet=CAP_SYS_RAWIO\n"));
        assert!(unit.contains("\nExecStart=/usr/local/bin/dcmon-agent --config /etc/dcmon/config.json run\n"));
    }

    /// Every combination of exporters and eBPF modes: the unit keeps exactly what the enabled
    /// collectors need (eBPF: loading and reading the programs; nvme: the admin ioctl; ipmi:
    /// the BMC device; gpu_xid: the kernel log), nothing for apt and nvsmi, in one stable order.
    #[test]
    fn the_unit_bounding_set_is_derived_from_the_table_for_every_combination() {
        use crate::config::EbpfMode;
        let names: Vec<&str> = Config::default().exporters.iter().map(|(name, _)| name).collect();
        assert_eq!(
            names,
            [
                "filesystems",
                "pressure",
                "netstat",
                "nic",
                "pcie",
                "edac",
                "infiniband",
                "temperature",
                "apt",
                "nvme",
                "ipmi",
                "nvsmi",
                "gpu_xid"
            ],
            "the exporters, in table order"
        );
        for ebpf in [EbpfMode::Auto, EbpfMode::On, EbpfMode::Off] {
            for combination in 0..1_u32 << names.len() {
                let mut c = Config { ebpf, exporters: crate::config::Exporters::none(), ..Config::default() };
                for (bit, name) in names.iter().enumerate() {
                    c.exporters.set(name, combination & 1 << bit != 0);
                }
                let mut want = Vec::new();
                if ebpf != EbpfMode::Off {
                    want.extend(["CAP_BPF", "CAP_PERFMON", "CAP_DAC_READ_SEARCH"]);
                }
                if c.exporters.enabled("nvme") {
                    want.push("CAP_SYS_ADMIN");
                }
                if c.exporters.enabled("ipmi") {
                    want.push("CAP_SYS_RAWIO");
                }
                if c.exporters.enabled("gpu_xid") {
                    want.push("CAP_SYSLOG");
                }
                let unit = render_unit(Path::new("/usr/bin/dcmon-agent"), Path::new("/etc/dcmon/config.json"), &c);
                let line = format!("\nCapabilityBoundingSet={}\n", want.join(" "));
                assert!(unit.contains(&line), "{ebpf:?} {:?}: want {line:?} in\n{unit}", c.exporters);
            }
        }
    }

    /// The config `install` writes is the agent's defaults, with every exporter of the table
    /// switched as its default, and nothing this agent would warn about.
    #[test]
    fn the_default_config_has_every_exporter_of_the_table() {
        let text = default_config_json();
        let (parsed, unknown) = Config::parse(Path::new("default.json"), &text, &crate::collector::schema())
            .expect("the default config parses");
        assert_eq!(parsed, Config::default());
        assert!(unknown.is_empty(), "{unknown:?}");
        let written: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        let exporters = written["exporters"].as_object().expect("an exporters map");
        for source in crate::collector::SOURCES {
            let want = match source.switch {
                crate::collector::Switch::Exporter { default } => Some(serde_json::Value::Bool(default)),
                _ => None,
            };
            assert_eq!(exporters.get(source.name), want.as_ref(), "{}:\n{text}", source.name);
        }
        let in_table =
            crate::collector::SOURCES.iter().filter(|s| matches!(s.switch, crate::collector::Switch::Exporter { .. }));
        assert_eq!(exporters.len(), in_table.count(), "{text}");
        assert_eq!(written["server_url"], "http://your-server.com:8000");
        assert_eq!(written["collection_interval"], 30);
    }

    /// The Debian package's unit and conffile are the files this module renders (regenerate
    /// them with `DCMON_BLESS=1 cargo test -p dcmon-agent --lib install`).
    #[test]
    fn the_packaged_files_are_what_install_renders() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("debian");
        for (file, want) in [("dcmon-client.service", packaged_unit()), ("config.json", default_config_json())] {
            let path = dir.join(file);
            if std::env::var("DCMON_BLESS").is_ok_and(|v| v == "1") {
                std::fs::write(&path, &want).expect("bless");
            }
            let have = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(have, want, "{} is stale: rerun with DCMON_BLESS=1", path.display());
        }
        assert!(packaged_unit().contains("\nExecStart=/usr/bin/dcmon-agent --config /etc/dcmon/config.json run\n"));
    }

    #[test]
    fn outbox_outside_var_lib_is_made_writable() {
        let c = Config { outbox_dir: "/srv/dcmon-outbox".into(), ..Config::default() };
        let unit = render_unit(Path::new("/usr/local/bin/dcmon-agent"), Path::new("/etc/dcmon/config.json"), &c);
        assert!(unit.contains("\nReadWritePaths=/var/lib/dcmon -/srv/dcmon-outbox\n"), "{unit}");
    }

    /// Remote commands grow the bounding set only for the types allowed, and only while
    /// polling is on; config_update makes the config's folder writable.
    #[test]
    fn remote_commands_grow_the_unit_only_for_allowed_types() {
        use crate::config::{CommandType, CommandsConfig, EbpfMode};
        let mut c = Config { ebpf: EbpfMode::Off, ..Config::default() };
        for name in ["nvme", "ipmi", "gpu_xid"] {
            c.exporters.set(name, false);
        }
        let unit_for =
            |c: &Config| render_unit(Path::new("/usr/local/bin/dcmon-agent"), Path::new("/etc/dcmon/config.json"), c);
        let all = CommandsConfig { allow: CommandType::ALL.to_vec(), ..CommandsConfig::default() };
        c.commands = all.clone();
        let unit = unit_for(&c);
        assert!(unit.contains("\nCapabilityBoundingSet=\n"), "listed but not enabled: nothing: {unit}");
        assert!(unit.contains("\nReadWritePaths=/var/lib/dcmon\n"), "{unit}");
        c.commands = CommandsConfig { enabled: true, allow: vec![CommandType::FanControl], ..all.clone() };
        assert!(unit_for(&c).contains("\nCapabilityBoundingSet=CAP_SYS_RAWIO\n"));
        c.commands.allow.push(CommandType::Reboot);
        assert!(unit_for(&c).contains("\nCapabilityBoundingSet=CAP_SYS_RAWIO CAP_SYS_BOOT\n"));
        c.commands = CommandsConfig { enabled: true, allow: vec![CommandType::ConfigUpdate], ..all };
        let unit = unit_for(&c);
        assert!(unit.contains("\nCapabilityBoundingSet=\n"), "{unit}");
        assert!(unit.contains("\nReadWritePaths=/var/lib/dcmon -/etc/dcmon\n"), "{unit}");
        c.commands.journal = "/srv/dcmon/commands.journal".into();
        assert!(unit_for(&c).contains("\nReadWritePaths=/var/lib/dcmon -/srv/dcmon -/etc/dcmon\n"));
    }
}
