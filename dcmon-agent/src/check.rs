//! `dcmon-agent check`: what this host offers and what the agent will do, for a person.
//!
//! Every line is `[ OK ]`, `[WARN]`, `[FAIL]` or `[ -- ]` (not present here, which is fine).
//! The exit code is 0 only when nothing failed: the configuration can run.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

use crate::batch::{Batch, Sample};
use crate::collector::{self, CollectError};
use crate::host::Host;
use crate::upload::{UploadError, Uploader};

/// The report and whether the configuration can run.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Human-readable lines.
    pub text: String,
    /// False when any line is a failure.
    pub ok: bool,
}

impl CheckReport {
    fn line(&mut self, status: &str, what: &str, detail: impl std::fmt::Display) {
        let _ = writeln!(self.text, "[{status}] {what}: {detail}");
        if status == "FAIL" {
            self.ok = false;
        }
    }
}

/// Run every check against `config` (already loaded from `config_path`, or `Err` with why not).
pub async fn check(
    config_path: &Path,
    loaded: Result<crate::config::Loaded, crate::config::ConfigError>,
) -> CheckReport {
    let mut r = CheckReport { text: String::new(), ok: true };
    let config = match loaded {
        Ok(l) => {
            if l.from_file {
                r.line(" OK ", "config", format!("{} is valid", config_path.display()));
            } else {
                r.line("WARN", "config", format!("{} not found: using the defaults", config_path.display()));
            }
            for key in &l.unknown_keys {
                r.line("WARN", "config", format!("unknown key `{key}` is ignored"));
            }
            l.config
        }
        Err(e) => {
            r.line("FAIL", "config", e);
            return r;
        }
    };

    let host = Host::new(&config.host_root);
    let machine_id = config.machine_id.clone().or_else(|| host.machine_id());
    match &machine_id {
        Some(id) => r.line(" OK ", "machine id", id),
        None => r.line(
            "FAIL",
            "machine id",
            "no /etc/machine-id or /var/lib/dbus/machine-id; set `machine_id` in the config",
        ),
    }

    let ebpf = match config.ebpf {
        crate::ebpf::EbpfMode::Off => (" -- ", "off in the config: disk and network I/O from procfs".to_owned()),
        mode => {
            match crate::ebpf::collect::own_netns(&host).and_then(|ns| Ok(crate::ebpf::Probes::attach(Some(ns))?)) {
                Ok(_probes) => {
                    (" OK ", "programs load and attach: disk and network I/O counted in the kernel".to_owned())
                }
                Err(e) if mode == crate::ebpf::EbpfMode::On => ("FAIL", format!("config says \"on\" but: {e:#}")),
                Err(e) => ("WARN", format!("unavailable, procfs will be used: {e:#}")),
            }
        }
    };
    r.line(ebpf.0, "eBPF", ebpf.1);

    // Collect one round exactly as the daemon would, and keep the samples for the server check.
    let mut samples = Vec::new();
    let mut collectors = collector::from_config(&config);
    tokio::time::sleep(Duration::from_millis(250)).await; // CPU usage needs a window
    for c in &mut collectors {
        let start = samples.len();
        let result = c.collect(&mut samples);
        let got: &[Sample] = &samples[start..];
        match result {
            Ok(()) => r.line(
                " OK ",
                &format!("collector {}", c.name()),
                format!("{} samples, e.g. {}", got.len(), example(got)),
            ),
            Err(CollectError::NotPresent(why)) => {
                r.line(" -- ", &format!("collector {}", c.name()), format!("not present: {why}"))
            }
            Err(CollectError::Failed(e)) => r.line("FAIL", &format!("collector {}", c.name()), format!("{e:#}")),
        }
    }

    let key = match crate::api_key::load(&config.api_key_file) {
        Ok((key, warning)) => {
            match warning {
                Some(w) => r.line("WARN", "API key", w),
                None => r.line(" OK ", "API key", format!("{} present, mode 0600", config.api_key_file.display())),
            }
            Some(key)
        }
        Err(e) => {
            r.line("FAIL", "API key", e);
            None
        }
    };

    let health_url = format!("{}/health", config.server_base());
    let client = crate::upload::client_builder(config.ca_file.as_ref()).and_then(|builder| {
        Ok(builder
            .connect_timeout(Duration::from_secs(config.connect_timeout))
            .timeout(Duration::from_secs(config.upload_timeout))
            .build()?)
    });
    let reachable = match client {
        Ok(client) => match client.get(&health_url).send().await {
            Ok(resp) => {
                let status = resp.status();
                r.line(
                    if status.is_success() { " OK " } else { "WARN" },
                    "server",
                    format!("{health_url} answered {status}"),
                );
                true
            }
            Err(e) => {
                r.line("FAIL", "server", format!("cannot reach {health_url}: {}", crate::upload::error_chain(&e)));
                false
            }
        },
        Err(e) => {
            r.line("FAIL", "server", format!("cannot build the HTTP client: {e}"));
            false
        }
    };

    if let (true, Some(key), Some(id)) = (reachable, key, machine_id) {
        // A real request: this round's batch, which the server stores like any other.
        let mut batch = Batch::new(id, crate::agent::unix_now_secs());
        batch.extend(samples);
        let uploader = Uploader::new(
            config.server_base(),
            key,
            Duration::from_secs(config.connect_timeout),
            Duration::from_secs(config.upload_timeout),
            config.ca_file.as_ref(),
        );
        match uploader {
            Ok(mut u) => match u.send(Bytes::from(batch.to_json())).await {
                Ok(d) => r.line(
                    " OK ",
                    "key accepted",
                    format!("the server stored a batch of {} metrics", d.metrics_count.unwrap_or(0)),
                ),
                Err(e @ UploadError::Status { .. }) => r.line("FAIL", "key accepted", e),
                Err(e) => r.line("FAIL", "key accepted", e),
            },
            Err(e) => r.line("FAIL", "key accepted", e),
        }
    }
    r
}

fn example(samples: &[Sample]) -> String {
    let Some(s) = samples.first() else {
        return "none".to_owned();
    };
    let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    let labels = if labels.is_empty() { String::new() } else { format!("{{{}}}", labels.join(",")) };
    format!("{}{labels} = {}", s.name, s.value.as_f64())
}
