//! `dcmon-agent`: argument parsing and wiring only; the work lives in the library.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use dcmon_agent::agent::{self, Scheduler};
use dcmon_agent::config::{self, Config};
use dcmon_agent::host::Host;
use dcmon_agent::upload::Uploader;
use dcmon_agent::{api_key, collector};

/// How long `once` waits between the two CPU samples that `cpu_usage_percent` needs.
const ONCE_CPU_WINDOW: Duration = Duration::from_millis(250);

#[derive(Debug, Parser)]
#[command(name = "dcmon-agent", version, about = "dcmon host monitoring agent")]
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
    /// Run the agent: collect every interval and upload to the server.
    Run,
    /// Collect one batch and print it as JSON on stdout (no server or API key needed).
    Once,
}

/// Exit code for a config or key problem the operator must fix (sysexits EX_CONFIG).
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(cli.log_level)
        .with_target(false)
        .init();

    let (path, explicit) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(config::DEFAULT_CONFIG_PATH), false),
    };
    let loaded = match Config::load(&path, explicit) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    for key in &loaded.unknown_keys {
        tracing::warn!("config {}: unknown key `{key}` ignored", path.display());
    }
    if !loaded.from_file {
        tracing::info!("config {} not found: using defaults", path.display());
    }
    let config = loaded.config;

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(8)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Once => runtime.block_on(once(&config)),
        Command::Run => runtime.block_on(run(&config, &path)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
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
    let mut scheduler = Scheduler::new(
        collector::build(config)?,
        machine_id,
        Duration::from_secs(config.collector_timeout),
    );
    tokio::time::sleep(ONCE_CPU_WINDOW).await;
    let batch = scheduler.collect(agent::unix_now_secs()).await;
    let mut out = batch.to_json_pretty();
    out.push(b'\n');
    std::io::stdout().lock().write_all(&out)?;
    Ok(())
}

async fn run(config: &Config, config_path: &std::path::Path) -> anyhow::Result<()> {
    let machine_id = machine_id(config)?;
    let (key, warning) = api_key::load(&config.api_key_file)?;
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    let uploader = Uploader::new(
        config.server_base(),
        key,
        Duration::from_secs(config.connect_timeout),
        Duration::from_secs(config.upload_timeout),
    )?;
    tracing::info!(
        config = %config_path.display(),
        url = uploader.metrics_url(),
        machine_id,
        interval_secs = config.collection_interval,
        "dcmon-agent {} starting",
        env!("CARGO_PKG_VERSION")
    );
    let scheduler = Scheduler::new(
        collector::build(config)?,
        machine_id,
        Duration::from_secs(config.collector_timeout),
    );
    // The first batch comes one second after start (CPU usage needs two samples), then every interval.
    let first_delay = Duration::from_secs(1).min(config.interval());
    agent::run(
        scheduler,
        uploader,
        config.interval(),
        first_delay,
        shutdown_signal(),
    )
    .await;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("cannot install signal handlers ({e}); stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}
