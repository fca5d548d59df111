//! `dcmon-agent`: argument parsing and wiring only; the work lives in the library.

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use dcmon_agent::agent::{self, BatchClock, Control, Daemon, OutputTask, Scheduler, SystemClock};
use dcmon_agent::collector::EbpfSettings;
use dcmon_agent::commands::{CommandStats, Journal, Poller, PollerParts, Runner, SharedJournal};
use dcmon_agent::config::{self, Config, ConfigError, Loaded};
use dcmon_agent::deliver::DeliveryPolicy;
use dcmon_agent::host::Host;
use dcmon_agent::install::{self, InstallOptions};
use dcmon_agent::notify::Notifier;
use dcmon_agent::outbox::{Outbox, OutboxLimits, SharedOutbox};
use dcmon_agent::output::metrics_endpoint::{LatestRound, Limits, MetricsEndpoint};
use dcmon_agent::output::remote_write::RemoteWriteClient;
use dcmon_agent::upload::Uploader;
use dcmon_agent::{api_key, check, collector, register};
use tokio::sync::mpsc;

// An option for the static (musl) build, whose own malloc costs more CPU a cycle (README, Install).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long `once` waits between the two CPU samples that `cpu_usage_percent` needs.
const ONCE_CPU_WINDOW: Duration = Duration::from_millis(250);
/// How long a reload may spend reading the config and key files. They are read on a blocking
/// thread, because a regular file on a hung FUSE or lxcfs mount blocks in read(2), and the
/// daemon goes on answering signals meanwhile.
const RELOAD_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long exiting waits for blocking threads (a collector stuck in a device read, a file read
/// on a hung mount) before leaving them behind.
const EXIT_WAIT_FOR_THREADS: Duration = Duration::from_secs(1);

/// `--version`: version, commit, and whether the eBPF object is built in (it always is: the
/// committed object is embedded with include_bytes, see `ebpf::load::OBJECT`).
const VERSION: &str =
    concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("DCMON_GIT_COMMIT"), ", eBPF object: embedded)");

#[derive(Debug, Parser)]
#[command(name = "dcmon-agent", version = VERSION, about = "dcmon host monitoring agent")]
struct Cli {
    /// Config file (default /etc/dcmon/config.json; a missing default file means defaults).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "info", value_name = "LEVEL")]
    log_level: tracing::Level,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: collect every interval and upload to the server (SIGHUP reloads the config).
    Run,
    /// Collect one batch and print it as JSON on stdout (no server or API key needed).
    Once,
    /// Report what this host offers and whether the configuration can run (exit 0 if it can).
    Check,
    /// Ask the server for this machine's API key and write it to the api_key_file (mode 0600).
    Register {
        /// Server base URL (default: the config's server_url).
        #[arg(long, value_name = "URL")]
        server: Option<String>,
        /// Replace an existing key file.
        #[arg(long)]
        force: bool,
    },
    /// Install the binary, config, state directory and systemd unit (idempotent).
    Install(InstallArgs),
    /// Remove the binary and unit; config, key and outbox stay unless --purge.
    Uninstall {
        #[command(flatten)]
        args: InstallArgs,
        /// Also remove /etc/dcmon (config and key) and /var/lib/dcmon (unsent batches).
        #[arg(long)]
        purge: bool,
    },
}

#[derive(Debug, clap::Args)]
struct InstallArgs {
    /// Installation prefix: the binary goes to PREFIX/bin/dcmon-agent.
    #[arg(long, default_value = "/usr/local", value_name = "PATH")]
    prefix: PathBuf,
    /// Install under this directory instead of / (for tests and image builds).
    #[arg(long, default_value = "/", value_name = "DIR")]
    root: PathBuf,
    /// Print every action without doing it.
    #[arg(long)]
    dry_run: bool,
}

/// Exit code for a config or key problem the operator must fix (sysexits EX_CONFIG).
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(cli.log_level)
        .with_target(false)
        // Colour codes only for people at a terminal, not in the journal or a log file.
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let (path, explicit) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(config::DEFAULT_CONFIG_PATH), false),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().max_blocking_threads(8).build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = run_command(&runtime, cli.command, &path, explicit);
    // Dropping the runtime would wait for every blocking thread, a hung one included.
    runtime.shutdown_timeout(EXIT_WAIT_FOR_THREADS);
    code
}

fn run_command(runtime: &tokio::runtime::Runtime, command: Command, path: &Path, explicit: bool) -> ExitCode {
    match command {
        Command::Check => {
            let report = runtime.block_on(check::check(path, Config::load(path, explicit, &collector::schema())));
            let _ = std::io::stdout().lock().write_all(report.text.as_bytes());
            return if report.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE };
        }
        Command::Install(args) => return print_report(install_cmd(&args, path, explicit)),
        Command::Uninstall { args, purge } => {
            let opts = install_options(&args, path, explicit);
            return print_report(opts.and_then(|o| install::uninstall(&o, purge)));
        }
        _ => {}
    }

    let config = match load_config(path, explicit) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = match command {
        Command::Once => runtime.block_on(once(&config)),
        Command::Run => runtime.block_on(run(config, path, explicit)),
        Command::Register { server, force } => runtime.block_on(register_cmd(&config, server, force)).map(|line| {
            let _ = writeln!(std::io::stdout().lock(), "{line}");
        }),
        Command::Check | Command::Install(_) | Command::Uninstall { .. } => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// Load the config and log its warnings.
fn load_config(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
    let Loaded { config, unknown_keys, from_file } = Config::load(path, explicit, &collector::schema())?;
    for key in &unknown_keys {
        tracing::warn!("config {}: unknown key `{key}` ignored", path.display());
    }
    for warning in config.warnings() {
        tracing::warn!("config {}: {warning}", path.display());
    }
    if !from_file {
        tracing::info!("config {} not found: using defaults", path.display());
    }
    Ok(config)
}

fn print_report(report: anyhow::Result<install::Report>) -> ExitCode {
    match report {
        Ok(lines) => {
            let mut out = std::io::stdout().lock();
            for l in lines {
                let _ = writeln!(out, "{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn install_options(args: &InstallArgs, config_path: &Path, _explicit: bool) -> anyhow::Result<InstallOptions> {
    Ok(InstallOptions {
        root: args.root.clone(),
        prefix: args.prefix.clone(),
        config_path: config_path.to_owned(),
        source_binary: std::env::current_exe().map_err(|e| anyhow::anyhow!("cannot find the running binary: {e}"))?,
        dry_run: args.dry_run,
    })
}

fn install_cmd(args: &InstallArgs, config_path: &Path, explicit: bool) -> anyhow::Result<install::Report> {
    let opts = install_options(args, config_path, explicit)?;
    // Render the unit for the operator's config when there is one (it decides the capabilities).
    let on_target = args.root.join(config_path.strip_prefix("/").unwrap_or(config_path));
    let config = Config::load(&on_target, false, &collector::schema())?.config;
    install::install(&opts, &config)
}

fn machine_id(config: &Config) -> anyhow::Result<String> {
    if let Some(id) = &config.machine_id {
        return Ok(id.trim().to_owned());
    }
    let host = Host::new(&config.host_root);
    host.machine_id().ok_or_else(|| {
        anyhow::anyhow!(
            "no machine id: {} and {} are missing or empty; set `machine_id` in the config",
            host.path("/etc/machine-id").display(),
            host.path("/var/lib/dbus/machine-id").display()
        )
    })
}

async fn once(config: &Config) -> anyhow::Result<()> {
    let machine_id = machine_id(config)?;
    let mut collectors = collector::build(config)?;
    // The one batch a newcomer sees should be complete: slow background sources (apt-get)
    // are waited for up to their own timeout, and the round is given that long.
    let slowest = collectors.iter_mut().filter_map(|c| c.wait_for_first_result()).max().unwrap_or_default();
    let round_timeout = Duration::from_secs(config.collector_timeout).max(slowest.saturating_add(ONCE_CPU_WINDOW));
    let mut scheduler = Scheduler::new(collectors, machine_id, round_timeout);
    tokio::time::sleep(ONCE_CPU_WINDOW).await;
    let batch = scheduler.collect(agent::unix_now_secs()).await;
    let mut out = batch.to_json_pretty();
    out.push(b'\n');
    std::io::stdout().lock().write_all(&out)?;
    Ok(())
}

async fn register_cmd(config: &Config, server: Option<String>, force: bool) -> anyhow::Result<String> {
    let machine_id = machine_id(config)?;
    let server = server.map_or_else(|| config.server_base().to_owned(), |s| s.trim().trim_end_matches('/').to_owned());
    config::check_server_url(&server).map_err(|why| anyhow::anyhow!("--server: {why}"))?;
    let host = Host::new(&config.host_root);
    let hostname = host.read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    register::register(
        &server,
        &machine_id,
        &hostname,
        &config.api_key_file,
        force,
        Duration::from_secs(config.upload_timeout),
        config.ca_file.as_ref(),
    )
    .await
}

/// The config at `path` and the API key it names (when the dcmon output is on), read on a
/// blocking thread under
/// [`RELOAD_READ_TIMEOUT`]; a shutdown request meanwhile ends the wait (`Ok(None)`).
async fn read_config_and_key(
    path: &Path,
    explicit: bool,
    control: &mut mpsc::Receiver<Control>,
) -> anyhow::Result<Option<(Config, Secrets)>> {
    let thread_path = path.to_owned();
    let read = tokio::task::spawn_blocking(move || -> anyhow::Result<(Config, Secrets)> {
        let config = load_config(&thread_path, explicit)?;
        let secrets = load_secrets(&config)?;
        Ok((config, secrets))
    });
    let timeout = tokio::time::sleep(RELOAD_READ_TIMEOUT);
    tokio::pin!(read, timeout);
    loop {
        tokio::select! {
            done = &mut read => {
                return done.map_err(|e| anyhow::anyhow!("reading the config failed: {e}"))?.map(Some);
            }
            () = &mut timeout => anyhow::bail!(
                "reading {} and its secret files took more than {RELOAD_READ_TIMEOUT:?} (a hung filesystem?)",
                path.display()
            ),
            c = control.recv() => match c {
                Some(Control::Reload) => tracing::info!("SIGHUP: a reload is already in progress"),
                Some(Control::Shutdown) | None => return Ok(None),
            },
        }
    }
}

/// What the outputs read from secret files: read together, on a blocking thread at a reload,
/// since a file on a hung filesystem blocks in read(2).
struct Secrets {
    /// The API key; `None` when the dcmon output is off (`dcmon_output: false`): only the
    /// dcmon server takes it.
    key: Option<api_key::ApiKey>,
    /// A client per remote_write entry, its credential files read.
    remote_write: Vec<RemoteWriteClient>,
}

/// The secrets `config` names, with permission warnings logged.
fn load_secrets(config: &Config) -> anyhow::Result<Secrets> {
    let key = if config.dcmon_output {
        let (key, warning) = api_key::load(&config.api_key_file)?;
        if let Some(w) = warning {
            tracing::warn!("{w}");
        }
        Some(key)
    } else {
        None
    };
    let remote_write = config.remote_write.iter().map(RemoteWriteClient::new).collect::<Result<_, _>>()?;
    Ok(Secrets { key, remote_write })
}

/// What the remote commands keep across reloads: the journal (opened when polling is first
/// on), the counters, and how a `config_update` asks for a reload.
struct RemoteCommands {
    journal: Option<(PathBuf, SharedJournal)>,
    stats: Arc<CommandStats>,
    config_path: PathBuf,
    reload: mpsc::Sender<Control>,
}

impl RemoteCommands {
    /// The poll task for `config` (whose `commands.enabled` is true).
    fn poller(
        &mut self,
        config: &Config,
        key: &api_key::ApiKey,
        machine_id: &str,
        policy: DeliveryPolicy,
    ) -> anyhow::Result<Poller> {
        let path = &config.commands.journal;
        let journal = match &self.journal {
            Some((open, journal)) if open == path => journal.clone(),
            _ => {
                let journal = Arc::new(std::sync::Mutex::new(Journal::open(path).map_err(anyhow::Error::msg)?));
                self.journal = Some((path.clone(), journal.clone()));
                journal
            }
        };
        let reload = self.reload.clone();
        let runner = Runner {
            config: config.commands.clone(),
            config_path: self.config_path.clone(),
            schema: collector::schema(),
            reload: Box::new(move || {
                if reload.try_send(Control::Reload).is_err() {
                    tracing::warn!("config_update: a reload is already pending");
                }
            }),
        };
        Poller::new(PollerParts {
            server_base: config.server_base(),
            ca: config.ca_file.as_ref(),
            key,
            machine_id,
            timeouts: (Duration::from_secs(config.connect_timeout), Duration::from_secs(config.upload_timeout)),
            policy,
            journal,
            stats: self.stats.clone(),
            runner,
        })
    }
}

/// The machine id and daemon settings for `config` and its `secrets`, sharing `outbox`.
fn prepare(
    config: &Config,
    secrets: Secrets,
    outbox: &SharedOutbox,
    remote: &mut RemoteCommands,
) -> anyhow::Result<(String, Daemon)> {
    let Secrets { key, remote_write } = secrets;
    let machine_id = machine_id(config)?;
    let mut outputs = Vec::new();
    let policy = DeliveryPolicy {
        backoff_base: Duration::from_secs(1),
        backoff_max: Duration::from_secs(config.retry_max_backoff),
        auth_retry: Duration::from_secs(config.auth_retry_interval),
        catchup_batches_per_sec: config.catchup_batches_per_second,
        api_key_file: config.api_key_file.clone(),
    };
    let mut poller = None;
    match key {
        Some(key) if config.dcmon_output => {
            if config.commands.enabled {
                // Without a readable journal no command may run (at most once); collection goes on.
                match remote.poller(config, &key, &machine_id, policy.clone()) {
                    Ok(p) => poller = Some(p),
                    Err(e) => tracing::error!("remote commands are off: {e:#}"),
                }
            }
            let uploader = Uploader::new(
                config.server_base(),
                key,
                Duration::from_secs(config.connect_timeout),
                Duration::from_secs(config.upload_timeout),
                config.ca_file.as_ref(),
            )?;
            tracing::info!(
                url = uploader.metrics_url(),
                machine_id,
                interval_secs = config.collection_interval,
                "dcmon-agent {VERSION} collecting"
            );
            outputs.push(OutputTask::dcmon(uploader));
        }
        _ => tracing::info!(
            machine_id,
            interval_secs = config.collection_interval,
            "dcmon-agent {VERSION} collecting; the dcmon output is off (dcmon_output: false)"
        ),
    }
    for client in remote_write {
        tracing::info!(output = client.output(), "remote_write output on");
        outputs.push(OutputTask::remote_write(client));
    }
    let daemon = Daemon {
        interval: config.interval(),
        phase: agent::phase_offset(&machine_id, config.interval()),
        outbox: outbox.clone(),
        outputs,
        policy,
        commands: poller,
    };
    Ok((machine_id, daemon))
}

async fn run(mut config: Config, config_path: &Path, explicit: bool) -> anyhow::Result<()> {
    let limits =
        |c: &Config| OutboxLimits { max_bytes: c.outbox_max_bytes, max_age: Duration::from_secs(c.outbox_max_age) };
    // Two agents on one outbox would send every batch twice: refuse to start instead.
    let outbox = Outbox::open_exclusive(&config.outbox_dir, limits(&config), agent::unix_now_secs())?;
    let outbox = SharedOutbox::new(outbox);
    // At start no signal handler is installed yet, so SIGTERM still ends a read that hangs.
    let secrets = load_secrets(&config)?;
    // The daemon loop's requests: signals (installed below) and a config_update's reload.
    let (control_tx, mut control) = mpsc::channel(4);
    let mut remote = RemoteCommands {
        journal: None,
        stats: Arc::new(CommandStats::default()),
        config_path: config_path.to_owned(),
        reload: control_tx.clone(),
    };
    let (machine_id, mut daemon) = prepare(&config, secrets, &outbox, &mut remote)?;
    let timeout = |c: &Config| Duration::from_secs(c.collector_timeout);
    let mut scheduler = Scheduler::new(collector::build(&config)?, machine_id, timeout(&config));
    // Kept across reloads: batch timestamps must keep increasing whatever the config.
    let mut clock = BatchClock::new(Arc::new(SystemClock));
    // A scrape reads the latest round; an address that cannot be bound stops the start.
    let latest = LatestRound::new();
    let mut endpoint = config
        .prometheus_listen
        .map(|addr| MetricsEndpoint::bind(addr, latest.clone(), Limits::default()))
        .transpose()?;
    let notifier = Notifier::from_env();
    control_from_signals(control_tx)?;
    tracing::info!(config = %config_path.display(), "dcmon-agent {VERSION} started");
    notifier.notify("READY=1");
    loop {
        match agent::run(&mut scheduler, &daemon, &mut clock, &mut control, &notifier, &latest).await {
            Control::Shutdown => break,
            Control::Reload => {
                notifier.notify("RELOADING=1");
                tracing::info!("SIGHUP: reloading {}", config_path.display());
                let read = match read_config_and_key(config_path, explicit, &mut control).await {
                    Ok(Some(read)) => Ok(read),
                    Ok(None) => break,
                    Err(e) => Err(e),
                };
                let reloaded = read.and_then(|(new, secrets)| {
                    let (machine_id, new_daemon) = prepare(&new, secrets, &outbox, &mut remote)?;
                    // Unchanged eBPF settings keep the loaded programs and the collectors'
                    // baselines: no BPF load (a BTF parse, and a chance of failing) per reload.
                    let collectors =
                        if EbpfSettings::of(&new) == EbpfSettings::of(&config) && scheduler.has_bpf_programs() {
                            tracing::debug!("eBPF settings unchanged: keeping the loaded BPF programs");
                            collector::rebuild(&new, scheduler.take_bpf_collectors())
                        } else {
                            collector::build(&new)?
                        };
                    Ok((Scheduler::new(collectors, machine_id, timeout(&new)), new_daemon, new))
                });
                match reloaded {
                    Ok((new_scheduler, new_daemon, new)) => {
                        if new.outbox_dir != config.outbox_dir {
                            tracing::warn!("outbox_dir changed: it takes effect at the next restart");
                        }
                        outbox.lock().set_limits(limits(&new));
                        // Against what is served, not the old config: a bind that failed retries.
                        endpoint = reconfigure_endpoint(endpoint, new.prometheus_listen, &latest).await;
                        (scheduler, daemon, config) = (new_scheduler, new_daemon, new);
                        tracing::info!("config reloaded");
                    }
                    Err(e) => {
                        tracing::error!("config reload rejected, keeping the running config: {e:#}")
                    }
                }
                notifier.notify("READY=1");
            }
        }
    }
    notifier.notify("STOPPING=1");
    if let Some(endpoint) = endpoint {
        endpoint.stop().await;
    }
    clock.report_at_exit();
    agent::report_outbox_at_exit(&outbox);
    tracing::info!("stopped");
    Ok(())
}

/// The `/metrics` endpoint for a reloaded `prometheus_listen`: kept when it serves that
/// address, else moved there; on a bind failure the error is logged and the one serving, if
/// any, stays (the next reload tries again).
async fn reconfigure_endpoint(
    current: Option<MetricsEndpoint>,
    wanted: Option<std::net::SocketAddr>,
    latest: &LatestRound,
) -> Option<MetricsEndpoint> {
    let (endpoint, error) = MetricsEndpoint::reconfigure(current, wanted, latest, Limits::default()).await;
    if let Some(e) = error {
        match &endpoint {
            Some(ep) => tracing::error!("{e}; still serving http://{}/metrics", ep.local_addr()),
            None => tracing::error!("{e}; not serving /metrics"),
        }
    }
    endpoint
}

/// SIGTERM and SIGINT stop the daemon, SIGHUP reloads its config: forwarded to `tx`, whose
/// receiver the daemon loop reads (a `config_update` command sends its reload there too).
fn control_from_signals(tx: mpsc::Sender<Control>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            let c = tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM received"); Control::Shutdown }
                _ = int.recv() => { tracing::info!("SIGINT received"); Control::Shutdown }
                _ = hup.recv() => Control::Reload,
            };
            if tx.send(c).await.is_err() || c == Control::Shutdown {
                return;
            }
        }
    });
    Ok(())
}
