//! `dcmon-agent check`: what this host offers and what the agent will do, for a person.
//!
//! Every line is `[ OK ]`, `[WARN]`, `[FAIL]` or `[ -- ]` (not present here, which is fine).
//! The exit code is 0 only when nothing failed: the configuration can run.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use dcmon_common::ebpf::TimedRequests;

use crate::agent::{Outcome, Scheduler};
use crate::batch::Sample;
use crate::collector;
use crate::config::EbpfMode;
use crate::host::Host;
use crate::upload::{UploadError, Uploader};

/// How long CPU usage is measured over before the round: it needs a window.
const CPU_USAGE_WINDOW: Duration = Duration::from_millis(250);

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
            for warning in l.config.warnings() {
                r.line("WARN", "config", warning);
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

    // Build the collectors and run one round exactly as the daemon does; the batch is sent
    // in the server check below.
    let (collectors, build_warnings) = logged_warnings(|| collector::build(&config));
    let collectors = match collectors {
        Ok(collectors) => collectors,
        Err(e) => {
            r.line("FAIL", "collectors", format!("{e:#}"));
            Vec::new()
        }
    };
    let left_out: Vec<(&str, String)> =
        collectors.iter().flat_map(|c| c.bpf_programs_left_out().iter().map(|(p, why)| (*p, why.clone()))).collect();
    let timing = collectors.iter().find_map(|c| c.bpf_latency_timing());
    if !collectors.is_empty() {
        let counted = |name: &str| collectors.iter().any(|c| c.name() == name && c.uses_bpf_programs());
        let (status, detail) = match (config.ebpf, counted("disk"), counted("net")) {
            (EbpfMode::Off, _, _) => (" -- ", "off in the config: disk and network I/O from procfs"),
            (_, true, true) => (" OK ", "programs load and attach: disk and network I/O counted in the kernel"),
            (_, true, false) => ("WARN", "disk I/O counted in the kernel, network I/O from procfs (why: below)"),
            (_, false, true) => ("WARN", "network I/O counted in the kernel, disk I/O from procfs (why: below)"),
            _ => ("WARN", "unavailable, procfs is used (why: the warning below)"),
        };
        r.line(status, "eBPF", detail);
        if let Some(timing) = &timing {
            let (status, detail) = latency_line(timing);
            r.line(status, "eBPF I/O latency", detail);
        }
    }
    for (program, why) in &left_out {
        r.line("WARN", &format!("eBPF program {program}"), left_out_detail(program, why, timing.as_ref()));
    }
    // Each left-out program was also logged while building; its own line above says it. Known
    // by the start alone: the log named the loss before a collector could fall back.
    let logged: Vec<String> = left_out.iter().map(|(p, _)| crate::ebpf::left_out_start(p)).collect();
    for warning in build_warnings.into_iter().filter(|w| !logged.iter().any(|l| w.starts_with(l.as_str()))) {
        r.line("WARN", "collectors", warning);
    }
    let mut scheduler = Scheduler::new(
        collectors,
        machine_id.clone().unwrap_or_default(),
        Duration::from_secs(config.collector_timeout),
    );
    tokio::time::sleep(CPU_USAGE_WINDOW).await;
    let batch = scheduler.collect(crate::agent::unix_now_secs()).await;
    for (name, outcome) in scheduler.outcomes() {
        let what = format!("collector {name}");
        match outcome {
            Outcome::Collected { samples, first } => {
                r.line(" OK ", &what, format!("{samples} samples, e.g. {}", example(first.as_ref())))
            }
            Outcome::NotPresent(why) => r.line(" -- ", &what, format!("not present: {why}")),
            Outcome::Failed(why) => r.line("FAIL", &what, why),
        }
    }

    if !config.dcmon_output {
        // The key and the server are only the dcmon output's: nothing to check without it.
        r.line(
            " -- ",
            "dcmon output",
            "off (dcmon_output: false): no API key is needed and nothing is posted to the server",
        );
        return r;
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

    if let (true, Some(key), Some(_)) = (reachable, key, machine_id) {
        // A real request: this round's batch, which the server stores like any other.
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

/// The `eBPF I/O latency` line: what is timed and from where; a warning when some or all
/// requests go untimed (`block_rq_issue` left out).
fn latency_line(timing: &crate::ebpf::LatencyTiming) -> (&'static str, String) {
    let status = if timing.timed() == TimedRequests::All { " OK " } else { "WARN" };
    (status, timing.describe())
}

/// The line of a program left out, after its name: what is lost and why. For `block_rq_issue`
/// that is not its metrics while `block_rq_complete` times what the kernel stamps itself: the
/// I/O latency line says which requests (`timing`: the disk collector's, None without one).
fn left_out_detail(program: &str, why: &str, timing: Option<&crate::ebpf::LatencyTiming>) -> String {
    format!("not loaded, {}: {why}", crate::ebpf::left_out_loss(program, timing))
}

/// Runs `f` and returns what it returned and the warnings it logged, one line each, instead
/// of logging them: the eBPF fallback says why in a warning.
fn logged_warnings<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    #[cfg(test)]
    crate::test_log::anchor();
    let buffer = SharedBuffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::WARN)
        .without_time()
        .with_level(false)
        .with_target(false)
        .with_ansi(false)
        .finish();
    let result = tracing::subscriber::with_default(subscriber, f);
    let text = buffer.0.lock().map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    (result, text.lines().map(|l| l.trim().to_owned()).filter(|l| !l.is_empty()).collect())
}

/// Log output collected in memory.
#[derive(Clone, Default)]
struct SharedBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for SharedBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut b) = self.0.lock() {
            b.extend_from_slice(bytes);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn example(sample: Option<&Sample>) -> String {
    let Some(s) = sample else {
        return "none".to_owned();
    };
    let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    let labels = if labels.is_empty() { String::new() } else { format!("{{{}}}", labels.join(",")) };
    format!("{}{labels} = {}", s.name, s.value.as_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Exporters, Loaded};

    /// Warnings logged while the collectors are built (the eBPF fallback's reason) become
    /// report lines; quieter messages stay out.
    #[test]
    fn warnings_logged_while_building_are_returned_as_lines() {
        let (value, lines) = logged_warnings(|| {
            tracing::info!("loaded");
            tracing::warn!(collector = "disk", "eBPF unavailable: {}", "no BTF");
            7
        });
        assert_eq!(value, 7);
        assert_eq!(lines, ["eBPF unavailable: no BTF collector=\"disk\""]);
    }

    /// `check` builds the collectors with `collector::build`, as `run` does: with eBPF on
    /// "auto" that includes the eBPF status collector, which the procfs-only list lacked.
    #[tokio::test]
    async fn check_reports_every_collector_the_daemon_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config {
            machine_id: Some("check-test".into()),
            api_key_file: dir.path().join("api_key"),
            // Nothing listens on the discard port; the server lines fail, which is not tested here.
            server_url: "http://127.0.0.1:9".into(),
            connect_timeout: 1,
            exporters: Exporters::none(),
            ..Config::default()
        };
        let want: Vec<&str> = collector::build(&config).expect("build").iter().map(|c| c.name()).collect();
        assert!(want.contains(&"ebpf"), "{want:?}");
        let loaded = Loaded { config, unknown_keys: Vec::new(), from_file: true };
        let report = check(Path::new("config.json"), Ok(loaded)).await;
        let reported: Vec<&str> =
            report.text.lines().filter_map(|l| l.get(7..)?.strip_prefix("collector ")?.split(':').next()).collect();
        assert_eq!(reported, want, "{}", report.text);
        assert!(report.text.contains("[ OK ] collector os: "), "{}", report.text);
    }

    /// Without block_rq_issue the line says what is still timed and why the rest is not,
    /// where it used to name the issue-time path as if every request were timed.
    #[test]
    fn the_latency_line_says_what_is_timed_without_the_issue_program() {
        use crate::ebpf::LatencyTiming;
        use dcmon_common::ebpf::IssueStamps;
        let why = "a tracepoint the programs need is missing in this kernel: program block_rq_issue";
        let timing = |stamps, issue_left_out: Option<&str>| LatencyTiming {
            stamps,
            complete_left_out: None,
            issue_left_out: issue_left_out.map(str::to_owned),
        };
        let (status, text) = latency_line(&timing(IssueStamps::Kernel, None));
        assert_eq!((status, text), (" OK ", format!("issue times from {}", IssueStamps::Kernel.describe())));
        for stamps in [IssueStamps::Kernel, IssueStamps::KernelAtCompletion] {
            let (status, text) = latency_line(&timing(stamps, Some(why)));
            assert_eq!(status, "WARN", "{stamps:?}");
            assert_eq!(
                text,
                format!(
                    "only requests the kernel stamps itself are timed (io_start_time_ns, on queues with \
                     QUEUE_FLAG_STATS, which writeback throttling turns on); those of other queues are not, as \
                     block_rq_issue did not load: {why}"
                ),
                "{stamps:?}"
            );
        }
        let (status, text) = latency_line(&timing(IssueStamps::Table, Some(why)));
        assert_eq!(status, "WARN");
        assert!(text.starts_with("not timed: "), "{text}");
        assert!(text.ends_with(&format!("which block_rq_issue fills, and it did not load: {why}")), "{text}");
        // The table path with every program is timed as ever.
        assert_eq!(latency_line(&timing(IssueStamps::Table, None)).0, " OK ");
    }

    /// A program's line says what is lost without it: for block_rq_issue, while
    /// block_rq_complete is attached, the latency of requests the kernel does not stamp (all of
    /// it on the stamp-table path), where it said "its metrics are absent" while the completion
    /// still sent the histograms of the kernel-stamped requests.
    #[test]
    fn the_line_of_a_program_left_out_says_what_is_lost() {
        use crate::ebpf::LatencyTiming;
        use dcmon_common::ebpf::IssueStamps;
        let why = "a tracepoint the programs need is missing in this kernel: program block_rq_issue";
        let timing = |stamps, complete_left_out: Option<&str>| LatencyTiming {
            stamps,
            complete_left_out: complete_left_out.map(str::to_owned),
            issue_left_out: Some(why.to_owned()),
        };
        for stamps in [IssueStamps::Kernel, IssueStamps::KernelAtCompletion] {
            assert_eq!(
                left_out_detail("block_rq_issue", why, Some(&timing(stamps, None))),
                format!(
                    "not loaded, the latency of requests the kernel does not stamp itself is not measured (see the \
                     I/O latency line): {why}"
                ),
                "{stamps:?}"
            );
        }
        assert_eq!(
            left_out_detail("block_rq_issue", why, Some(&timing(IssueStamps::Table, None))),
            format!("not loaded, no I/O latency is measured (see the I/O latency line): {why}")
        );
        // Without the completion program (or a collector reading them) the latency metrics are
        // absent, as every other program's metrics are without it.
        let generic = |why: &str| format!("not loaded, its metrics are absent: {why}");
        let no_complete = timing(IssueStamps::Kernel, Some("no such tracepoint"));
        assert_eq!(left_out_detail("block_rq_issue", why, Some(&no_complete)), generic(why));
        assert_eq!(left_out_detail("block_rq_issue", why, None), generic(why));
        for (program, _) in dcmon_common::ebpf::PROGRAMS.iter().filter(|(p, _)| *p != "block_rq_issue") {
            for t in [None, Some(&timing(IssueStamps::Kernel, None)), Some(&timing(IssueStamps::Table, None))] {
                assert_eq!(left_out_detail(program, "x", t), generic("x"), "{program}");
            }
        }
    }

    #[tokio::test]
    async fn check_shows_the_configs_warnings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut config, _) = Config::parse(
            Path::new("config.json"),
            r#"{"collector_timeout": 5, "filesystems": {"timeout": 5}}"#,
            &collector::schema(),
        )
        .expect("valid");
        config.machine_id = Some("check-test".into());
        config.api_key_file = dir.path().join("api_key");
        config.server_url = "http://127.0.0.1:9".into();
        config.connect_timeout = 1;
        config.exporters = Exporters::none();
        let loaded = Loaded { config, unknown_keys: Vec::new(), from_file: true };
        let report = check(Path::new("config.json"), Ok(loaded)).await;
        assert!(
            report.text.contains(
                "[WARN] config: `filesystems.timeout` (5 s) is not below `collector_timeout` (5 s): the round is cut"
            ),
            "{}",
            report.text
        );
    }
}
