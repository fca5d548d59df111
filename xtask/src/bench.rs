//! `cargo xtask bench`: what dcmon-agent costs a host, side by side with node_exporter and
//! collectd measured in the same run, alternating, several rounds each.
//!
//! For each subject: CPU per cycle from /proc/PID/stat (utime+stime, all threads) and from
//! /proc/PID/task/*/schedstat (ns, threads alive at both ends), resident memory (VmRSS sampled
//! every second, median; VmHWM at the end), and bytes sent per cycle. Two floor subjects
//! (`examples/bench_floor.rs`) show what this host charges any process for the same job: waking
//! once a second, and the job itself as a bare blocking loop. Then the same for the
//! agent with 1,000 and 10,000 interfaces (veth pairs in a network namespace) and with
//! 64 loop devices (removed again afterwards, not just detached). Prints markdown tables.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use dcmon_tests::remote_write::RemoteWriteReceiver;
use dcmon_tests::{AgentConfig, loop_device, write_key};
use serde_json::json;

/// Options of `cargo xtask bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Measured seconds per run (interval 1 s: one cycle per second).
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub seconds: u64,
    /// Runs per subject, alternating.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub rounds: u32,
    /// Leave out the runs with many interfaces and loop devices (which need root).
    #[arg(long)]
    pub no_scale: bool,
    /// Another dcmon-agent binary (an earlier commit's release build) measured in the same
    /// run, alternating with this one, in both modes: the regression check for a change.
    #[arg(long, value_name = "PATH")]
    pub baseline: Option<PathBuf>,
}

/// One run's numbers.
#[derive(Debug, Clone, Copy)]
struct Run {
    cpu_ms_stat: f64,
    cpu_ms_sched: f64,
    rss_kib: f64,
    hwm_kib: f64,
    bytes_per_cycle: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    Agent,
    /// The agent (procfs) with a remote_write output beside the dcmon server.
    AgentRemoteWrite,
    /// The agent (procfs) with every collector but the tool and hardware exporters.
    AgentHostFamilies,
    AgentEbpf,
    /// The `--baseline` binary, procfs and eBPF mode.
    Baseline,
    BaselineEbpf,
    NodeExporter,
    Collectd,
    /// `examples/bench_floor.rs wake`: a process that wakes once a second and does nothing.
    FloorWake,
    /// `examples/bench_floor.rs job`: the agent's job as a bare blocking loop.
    FloorJob,
}

impl Subject {
    fn name(self) -> &'static str {
        match self {
            Subject::Agent => "dcmon-agent (procfs)",
            Subject::AgentRemoteWrite => "dcmon-agent (procfs) + remote_write (bytes: remote_write's only)",
            Subject::AgentHostFamilies => {
                "dcmon-agent (procfs) + filesystems, pressure, netstat, nic, pcie, edac, infiniband, temperature"
            }
            Subject::AgentEbpf => "dcmon-agent (eBPF)",
            Subject::Baseline => "baseline dcmon-agent (procfs)",
            Subject::BaselineEbpf => "baseline dcmon-agent (eBPF)",
            Subject::NodeExporter => "node_exporter 5 collectors, scraped 1/s",
            Subject::Collectd => "collectd cpu,memory,disk,interface,load",
            Subject::FloorWake => "floor: wake once a second, nothing else",
            Subject::FloorJob => "floor: same job as a bare blocking loop",
        }
    }
}

const KEY: &str = "dcmon_benchKeyBenchKeyBenchKeyBenchKeyBenchKe";

/// `cargo build` arguments for what the bench runs, in release: the agent, the receiver, the
/// floor and `ebpf_bench` (bench_targets), in one invocation so that their dependencies are
/// built once, with the same features.
pub(crate) const RELEASE_BUILD: [&str; 16] = [
    "build",
    "--release",
    "-p",
    "dcmon-agent",
    "-p",
    "dcmon-tests",
    "--bin",
    "dcmon-agent",
    "--bin",
    "dcmon-test-receiver",
    "-p",
    "xtask",
    "--example",
    "bench_floor",
    "--example",
    "ebpf_bench",
];

/// Run the benchmark.
pub fn run(workspace: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    let status = Command::new(env!("CARGO")).current_dir(workspace).args(RELEASE_BUILD).status()?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    let bin = workspace.join("target/release");
    let agent = bin.join("dcmon-agent");
    let mut subjects = vec![Subject::Agent, Subject::AgentRemoteWrite, Subject::AgentHostFamilies, Subject::AgentEbpf];
    if let Some(baseline) = &args.baseline {
        anyhow::ensure!(baseline.is_file(), "--baseline {}: no such file", baseline.display());
        subjects.extend([Subject::Baseline, Subject::BaselineEbpf]);
    }
    subjects.extend([Subject::FloorWake, Subject::FloorJob]);
    if which("prometheus-node-exporter").is_some() {
        subjects.push(Subject::NodeExporter);
    } else {
        eprintln!("node_exporter not installed (apt install prometheus-node-exporter): left out");
    }
    if which("collectd").is_some() {
        subjects.push(Subject::Collectd);
    } else {
        eprintln!("collectd not installed (apt install collectd-core): left out");
    }
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); subjects.len()];
    for round in 1..=args.rounds {
        for (i, s) in subjects.iter().enumerate() {
            eprintln!("round {round}/{}: {} for {} s", args.rounds, s.name(), args.seconds);
            let run = match s {
                Subject::Agent => measure_agent(&bin, &agent, args.seconds, None, false, Ebpf::Off)?,
                Subject::AgentRemoteWrite => measure_agent_with(&bin, &agent, args.seconds, Extra::RemoteWrite)?,
                Subject::AgentHostFamilies => measure_agent_with(&bin, &agent, args.seconds, Extra::HostFamilies)?,
                Subject::AgentEbpf => measure_agent(&bin, &agent, args.seconds, None, false, Ebpf::On)?,
                Subject::Baseline | Subject::BaselineEbpf => {
                    let baseline = args.baseline.as_deref().context("--baseline")?;
                    let ebpf = if *s == Subject::Baseline { Ebpf::Off } else { Ebpf::On };
                    measure_agent(&bin, baseline, args.seconds, None, false, ebpf)?
                }
                Subject::NodeExporter => measure_node_exporter(args.seconds)?,
                Subject::Collectd => measure_collectd(args.seconds)?,
                Subject::FloorWake | Subject::FloorJob => measure_floor(&bin, args.seconds, *s)?,
            };
            results[i].push(run);
        }
    }
    let mut out = String::new();
    out.push_str(&format!(
        "\n### Cost per 1 s cycle ({} rounds of {} s, alternating; median [min–max])\n\n",
        args.rounds, args.seconds
    ));
    out.push_str(&table(&subjects.iter().map(|s| s.name().to_owned()).collect::<Vec<_>>(), &results));
    // A subject's median of one column, if the run measured that subject.
    let column = |subject, f: fn(&Run) -> f64| {
        let runs = &results[subjects.iter().position(|s| *s == subject)?];
        Some(median(runs.iter().map(f).collect()))
    };
    if let Some(agent) = results.first() {
        // Ratios from schedstat: nanoseconds, where stat counts 10 ms ticks.
        let a = median(agent.iter().map(|r| r.cpu_ms_sched).collect());
        let peers = |s: &Subject| matches!(s, Subject::NodeExporter | Subject::Collectd);
        for (s, runs) in subjects.iter().zip(&results).filter(|(s, _)| peers(s)) {
            let p = median(runs.iter().map(|r| r.cpu_ms_sched).collect());
            let m =
                median(runs.iter().map(|r| r.rss_kib).collect()) / median(agent.iter().map(|r| r.rss_kib).collect());
            out.push_str(&format!(
                "\n{}: {:.1}x the agent's CPU per cycle, {:.1}x its resident memory",
                s.name(),
                p / a,
                m
            ));
        }
        if let (Some(wake), Some(job)) =
            (column(Subject::FloorWake, |r| r.cpu_ms_sched), column(Subject::FloorJob, |r| r.cpu_ms_sched))
        {
            out.push_str(&format!(
                "\nOn this host, waking once a second costs {wake:.3} ms and the bare job {job:.3} ms a cycle; \
                 the agent (procfs) adds {:.3} ms over the bare job.",
                a - job
            ));
        }
        out.push('\n');
    }
    if let (Some(procfs_ms), Some(ebpf_ms), Some(procfs_bytes), Some(ebpf_bytes), Some(ebpf_hwm_kib)) = (
        column(Subject::Agent, |r| r.cpu_ms_sched),
        column(Subject::AgentEbpf, |r| r.cpu_ms_sched),
        column(Subject::Agent, |r| r.bytes_per_cycle),
        column(Subject::AgentEbpf, |r| r.bytes_per_cycle),
        column(Subject::AgentEbpf, |r| r.hwm_kib),
    ) {
        wait_for_quiet_host()?;
        let cycle = crate::bench_targets::CycleFigures { procfs_ms, ebpf_ms, procfs_bytes, ebpf_bytes, ebpf_hwm_kib };
        out.push_str(&crate::bench_targets::report(workspace, &cycle));
    }
    if !args.no_scale {
        out.push_str(&scale(&bin, args)?);
    }
    println_out(&out);
    Ok(())
}

fn println_out(s: &str) {
    let _ = std::io::stdout().lock().write_all(s.as_bytes());
    let _ = std::io::stdout().lock().write_all(b"\n");
}

/// How the agent counts disk and network I/O in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ebpf {
    /// procfs only.
    Off,
    /// eBPF programs (the run fails if they cannot load: a silent fallback would mislabel it).
    On,
}

/// The exporters that read tools and hardware (apt-get, NVMe, the BMC, NVML, the kernel log):
/// off in every bench run, which measures the same job as the peers.
const TOOL_EXPORTERS: [&str; 5] = ["apt", "nvme", "ipmi", "nvsmi", "gpu_xid"];

/// The host families beside the OS collectors (sysfs and procfs reads), on in one row. With
/// [`TOOL_EXPORTERS`], every exporter of the agent's table (a test holds them equal).
const HOST_FAMILIES: [&str; 8] =
    ["filesystems", "pressure", "netstat", "nic", "pcie", "edac", "infiniband", "temperature"];

/// Every exporter switched off, but those `on` names.
fn exporters_only(on: &[&str]) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> =
        TOOL_EXPORTERS.iter().chain(&HOST_FAMILIES).map(|&name| (name.to_owned(), json!(on.contains(&name)))).collect();
    serde_json::Value::Object(map)
}

/// The agent's config: interval 1, the OS collectors only (load, CPU, memory, disks and
/// interfaces: the peers' job), outbox on disk under `dir`; `all_disks` also reports loop
/// devices.
fn agent_config(url: &str, dir: &Path, all_disks: bool, ebpf: Ebpf) -> AgentConfig {
    let config = AgentConfig::new().set("exporters", exporters_only(&[])).extend(json!({
        "collection_interval": 1, "machine_id": "bench", "server_url": url,
        "ebpf": if ebpf == Ebpf::On { "on" } else { "off" },
        "api_key_file": dir.join("api_key"), "outbox_dir": dir.join("outbox"),
    }));
    if all_disks { config.set("disks", json!({"include": ["*"], "exclude": []})) } else { config }
}

fn scale(bin: &Path, args: &BenchArgs) -> anyhow::Result<String> {
    let mut names = Vec::new();
    let mut results = Vec::new();
    let seconds = args.seconds;
    for n in [1_000usize, 10_000] {
        let ns = format!("dcmon-bench-{n}");
        let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
        run_ok(Command::new("ip").args(["netns", "add", &ns]))?;
        // veth pairs, as this kernel has no dummy driver; named so the default filter keeps them.
        let batch: String =
            std::iter::once("link set lo up\n".to_owned())
                .chain((0..n / 2).map(|i| {
                    format!("link add ea{i} type veth peer name eb{i}\nlink set ea{i} up\nlink set eb{i} up\n")
                }))
                .collect();
        let mut child = Command::new("ip").args(["-n", &ns, "-batch", "-"]).stdin(Stdio::piped()).spawn()?;
        child.stdin.take().context("stdin")?.write_all(batch.as_bytes())?;
        if !child.wait()?.success() {
            bail!("creating {n} veth interfaces in {ns} failed");
        }
        for (ebpf, mode) in [(Ebpf::Off, "procfs"), (Ebpf::On, "eBPF")] {
            eprintln!("scale: {n} interfaces, {mode}, for {seconds} s");
            let run = measure_agent(bin, &bin.join("dcmon-agent"), seconds, Some(&ns), false, ebpf);
            names.push(format!("dcmon-agent ({mode}), {n} interfaces"));
            match run {
                Ok(r) => results.push(vec![r]),
                Err(e) => {
                    let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
                    return Err(e);
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
    }
    // 64 loop devices, reported (the default filter leaves loop devices out).
    let loops_before = loop_device::numbers().context("listing /sys/block")?;
    let dir = scratch_dir("dcmon-bench-loops")?;
    let mut loops = Vec::new();
    for i in 0..64 {
        let img = dir.path().join(format!("img{i}"));
        std::fs::write(&img, vec![0u8; 1 << 20])?;
        let out = Command::new("losetup").args(["--find", "--show"]).arg(&img).output()?;
        if !out.status.success() {
            break;
        }
        loops.push(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    }
    let mut runs = Vec::new();
    for (ebpf, mode) in [(Ebpf::Off, "procfs"), (Ebpf::On, "eBPF")] {
        eprintln!("scale: {} loop devices, {mode}, for {seconds} s", loops.len());
        runs.push((mode, measure_agent(bin, &bin.join("dcmon-agent"), seconds, None, true, ebpf)));
    }
    for l in &loops {
        let _ = Command::new("losetup").args(["-d", l]).status();
    }
    drop(dir);
    // Detached loop devices stay listed in /proc/diskstats and /sys/block, and every later
    // measurement on this host would pay for them: remove the ones this run added.
    let added: Vec<u32> = loop_device::numbers()
        .context("listing /sys/block")?
        .into_iter()
        .filter(|n| !loops_before.contains(n))
        .collect();
    if let Err(e) = remove_loop_devices(&added) {
        eprintln!("warning: {e:#}");
    }
    for (mode, run) in runs {
        names.push(format!("dcmon-agent ({mode}), {} more loop disks reported", loops.len()));
        results.push(vec![run?]);
    }
    Ok(format!("\n### Scale (1 run of {seconds} s each)\n\n{}", table(&names, &results)))
}

/// Delete loop devices `numbers` (detached, so without a backing file).
fn remove_loop_devices(numbers: &[u32]) -> anyhow::Result<()> {
    let failed: Vec<String> = numbers
        .iter()
        .filter_map(|&n| match loop_device::remove(n) {
            Ok(()) => None,
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => None,
            Err(e) => Some(format!("loop{n}: {e}")),
        })
        .collect();
    if !failed.is_empty() {
        bail!("removing the loop devices this run added: {}", failed.join(", "));
    }
    if !numbers.is_empty() {
        eprintln!("removed the {} loop devices this run added", numbers.len());
    }
    Ok(())
}

fn table(names: &[String], results: &[Vec<Run>]) -> String {
    let mut t = String::from(
        "| subject | CPU ms/cycle (stat) | CPU ms/cycle (schedstat) | VmRSS MiB | VmHWM MiB | bytes sent/cycle |\n|---|---|---|---|---|---|\n",
    );
    for (name, runs) in names.iter().zip(results) {
        let col = |f: fn(&Run) -> f64, scale: f64, prec: usize| {
            let v: Vec<f64> = runs.iter().map(|r| f(r) / scale).collect();
            let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
            if v.len() > 1 {
                format!("{:.prec$} [{:.prec$}–{:.prec$}]", median(v.clone()), lo, hi)
            } else {
                format!("{:.prec$}", median(v))
            }
        };
        t.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} |\n",
            col(|r| r.cpu_ms_stat, 1.0, 3),
            col(|r| r.cpu_ms_sched, 1.0, 3),
            col(|r| r.rss_kib, 1024.0, 1),
            col(|r| r.hwm_kib, 1024.0, 1),
            col(|r| r.bytes_per_cycle, 1.0, 0),
        ));
    }
    t
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(cmd)).find(|p| p.is_file())
}

fn run_ok(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("{cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// A scratch directory, removed when dropped. Under /var/tmp, which is disk-backed where /tmp
/// may be tmpfs: the outbox cost must be the real one.
fn scratch_dir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .with_context(|| format!("creating /var/tmp/{prefix}*"))
}

/// A child process killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn in_netns(ns: Option<&str>, program: &Path) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// A dcmon-test-receiver for `seconds` (plus margin), its URL, and the bytes of the batches it
/// has accepted so far.
fn start_receiver(bin: &Path, ns: Option<&str>, seconds: u64) -> anyhow::Result<(Guard, String, Arc<AtomicU64>)> {
    let mut receiver = Guard(
        in_netns(ns, &bin.join("dcmon-test-receiver"))
            .args([KEY, "bench", &(seconds + 30).to_string()])
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let mut lines = BufReader::new(receiver.0.stdout.take().context("receiver stdout")?).lines();
    let url = lines.next().context("receiver printed no URL")??;
    // Count bytes of accepted batches as they arrive.
    let bytes = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&bytes);
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Some(b) =
                line.strip_suffix(" bytes").and_then(|l| l.rsplit(' ').next()).and_then(|n| n.parse::<u64>().ok())
            {
                counter.fetch_add(b, Ordering::Relaxed);
            }
        }
    });
    Ok((receiver, url, bytes))
}

/// `agent` (this build's dcmon-agent or a `--baseline`) posting to a receiver from `bin`.
fn measure_agent(
    bin: &Path,
    agent: &Path,
    seconds: u64,
    ns: Option<&str>,
    all_disks: bool,
    ebpf: Ebpf,
) -> anyhow::Result<Run> {
    wait_for_quiet_host()?;
    let dir = scratch_dir("dcmon-bench-agent")?;
    let (receiver, url, bytes) = start_receiver(bin, ns, seconds)?;
    write_key(dir.path(), KEY)?;
    let config = agent_config(&url, dir.path(), all_disks, ebpf).write(dir.path());
    let agent = Guard(in_netns(ns, agent).arg("--config").arg(config).args(["--log-level", "warn", "run"]).spawn()?);
    // With `ip netns exec` the agent is a child of ip's exec: same pid.
    let run = measure_process(agent.0.id(), seconds, || bytes.load(Ordering::Relaxed));
    drop(agent);
    drop(receiver);
    run
}

/// What a [`measure_agent_with`] run adds to the agent's (procfs) job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Extra {
    /// A remote_write output beside the dcmon server, to a receiver in this process; the bytes
    /// counted are remote_write's, to set beside the JSON row's.
    RemoteWrite,
    /// Every collector but the tool and hardware exporters ([`TOOL_EXPORTERS`]).
    HostFamilies,
}

/// The agent (procfs) doing its job plus `extra`.
fn measure_agent_with(bin: &Path, agent: &Path, seconds: u64, extra: Extra) -> anyhow::Result<Run> {
    wait_for_quiet_host()?;
    let dir = scratch_dir("dcmon-bench-agent")?;
    let (receiver, url, json_bytes) = start_receiver(bin, None, seconds)?;
    let remote_write = RemoteWriteReceiver::start()?;
    write_key(dir.path(), KEY)?;
    let config = agent_config(&url, dir.path(), false, Ebpf::Off);
    let config = match extra {
        Extra::RemoteWrite => config.set("remote_write", json!([{"name": "bench", "url": remote_write.url()}])),
        Extra::HostFamilies => config.set("exporters", exporters_only(&HOST_FAMILIES)),
    }
    .write(dir.path());
    let agent = Guard(Command::new(agent).arg("--config").arg(config).args(["--log-level", "warn", "run"]).spawn()?);
    let sent = || match extra {
        Extra::RemoteWrite => remote_write.accepted().iter().map(|r| r.bytes as u64).sum(),
        Extra::HostFamilies => json_bytes.load(Ordering::Relaxed),
    };
    let run = measure_process(agent.0.id(), seconds, sent);
    drop(agent);
    drop(receiver);
    run
}

/// A floor subject; the job posts to a receiver like the agent's, waking posts nothing.
fn measure_floor(bin: &Path, seconds: u64, subject: Subject) -> anyhow::Result<Run> {
    wait_for_quiet_host()?;
    let mut cmd = Command::new(bin.join("examples/bench_floor"));
    if subject != Subject::FloorJob {
        let child = Guard(cmd.arg("wake").spawn()?);
        return measure_process(child.0.id(), seconds, || 0);
    }
    let dir = scratch_dir("dcmon-bench-floor")?;
    let (receiver, url, bytes) = start_receiver(bin, None, seconds)?;
    let addr = url.strip_prefix("http://").context("receiver URL")?;
    let child = Guard(cmd.args(["job", addr, KEY]).arg(dir.path()).spawn()?);
    let run = measure_process(child.0.id(), seconds, || bytes.load(Ordering::Relaxed));
    drop(child);
    drop(receiver);
    run
}

fn measure_node_exporter(seconds: u64) -> anyhow::Result<Run> {
    wait_for_quiet_host()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let ne = Guard(
        Command::new("prometheus-node-exporter")
            .args([
                "--collector.disable-defaults",
                "--collector.loadavg",
                "--collector.meminfo",
                "--collector.cpu",
                "--collector.diskstats",
                "--collector.netdev",
                &format!("--web.listen-address=127.0.0.1:{port}"),
            ])
            .stderr(Stdio::null())
            .spawn()?,
    );
    std::thread::sleep(Duration::from_millis(500));
    let bytes = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (b, s) = (Arc::clone(&bytes), Arc::clone(&stop));
    // The scraper: one GET /metrics per second, like a Prometheus server would.
    let scraper = std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            let start = Instant::now();
            if let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)) {
                let _ = conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
                let mut body = Vec::new();
                let _ = conn.read_to_end(&mut body);
                b.fetch_add(body.len() as u64, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_secs(1).saturating_sub(start.elapsed()));
        }
    });
    let run = measure_process(ne.0.id(), seconds, || bytes.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    let _ = scraper.join();
    run
}

fn measure_collectd(seconds: u64) -> anyhow::Result<Run> {
    wait_for_quiet_host()?;
    let dir = scratch_dir("dcmon-bench-collectd")?;
    let conf = dir.path().join("collectd.conf");
    std::fs::write(
        &conf,
        format!(
            "Interval 1\nFQDNLookup false\nBaseDir \"{d}\"\nPIDFile \"{d}/collectd.pid\"\nPluginDir \"/usr/lib/collectd\"\n\
             LoadPlugin cpu\nLoadPlugin memory\nLoadPlugin disk\nLoadPlugin interface\nLoadPlugin load\n",
            d = dir.path().display()
        ),
    )?;
    let cd = Guard(
        Command::new("collectd").arg("-f").arg("-C").arg(&conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?,
    );
    // No write plugin: collectd reads and aggregates but sends nothing.
    let run = measure_process(cd.0.id(), seconds, || 0);
    drop(cd);
    run
}

/// Host CPU busy fraction below which a measurement may start.
const QUIET_BUSY: f64 = 0.10;
/// How long to wait for that before measuring anyway (with a warning).
const QUIET_WAIT: Duration = Duration::from_secs(180);

/// Wait until the host's CPUs are at most [`QUIET_BUSY`] busy over half a second. The kernel
/// finishes some of the bench's own set-up and tear-down in the background: deleting a network
/// namespace with 10,000 veth interfaces keeps a kworker busy for a long while (README,
/// Performance), and a subject measured meanwhile loses cycles to it.
fn wait_for_quiet_host() -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let before = cpu_times()?;
        std::thread::sleep(Duration::from_millis(500));
        let after = cpu_times()?;
        let (busy, total) = (after.0.saturating_sub(before.0), after.1.saturating_sub(before.1));
        let fraction = if total == 0 { 0.0 } else { busy as f64 / total as f64 };
        if fraction <= QUIET_BUSY {
            if start.elapsed() > Duration::from_secs(2) {
                eprintln!("waited {:.0} s for the host to go quiet", start.elapsed().as_secs_f64());
            }
            return Ok(());
        }
        if start.elapsed() >= QUIET_WAIT {
            eprintln!(
                "warning: the host is still {:.0}% busy after {} s; measuring anyway",
                fraction * 100.0,
                QUIET_WAIT.as_secs()
            );
            return Ok(());
        }
    }
}

/// All CPUs' (busy, total) time from /proc/stat's `cpu` line, in clock ticks. Busy is user,
/// nice, system, irq and softirq; idle, iowait and steal are not.
fn cpu_times() -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .context("/proc/stat: no `cpu` line first")?
        .split_whitespace()
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("/proc/stat: `cpu` line fields are not numbers")?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = fields[..] else {
        bail!("/proc/stat: `cpu` line has fewer than 8 fields");
    };
    Ok((user + nice + system + irq + softirq, user + nice + system + idle + iowait + irq + softirq + steal))
}

/// Warm up 3 s, then measure `seconds` of process `pid`.
fn measure_process(pid: u32, seconds: u64, sent_bytes: impl Fn() -> u64) -> anyhow::Result<Run> {
    std::thread::sleep(Duration::from_secs(3));
    let ticks_per_sec = clock_ticks()?;
    let (t0, s0, b0) = (stat_ticks(pid)?, schedstat_ns(pid), sent_bytes());
    let rss = Arc::new(Mutex::new(Vec::new()));
    for _ in 0..seconds {
        std::thread::sleep(Duration::from_secs(1));
        if let Some(kib) = status_kib(pid, "VmRSS:") {
            rss.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.push(kib);
        }
    }
    let (t1, s1, b1) = (stat_ticks(pid)?, schedstat_ns(pid), sent_bytes());
    let hwm = status_kib(pid, "VmHWM:").unwrap_or(f64::NAN);
    let cycles = seconds as f64;
    let rss = rss.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    Ok(Run {
        cpu_ms_stat: (t1 - t0) as f64 * 1000.0 / ticks_per_sec / cycles,
        cpu_ms_sched: s1.saturating_sub(s0) as f64 / 1e6 / cycles,
        rss_kib: median(rss),
        hwm_kib: hwm,
        bytes_per_cycle: (b1 - b0) as f64 / cycles,
    })
}

fn clock_ticks() -> anyhow::Result<f64> {
    let out = Command::new("getconf").arg("CLK_TCK").output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse::<f64>()?)
}

/// utime + stime of the whole process (all threads, dead ones included), in clock ticks.
fn stat_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("process {pid} gone"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0))
}

/// Run time in ns of the threads alive now, summed (threads that exited are not counted).
fn schedstat_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
                .sum()
        })
        .unwrap_or(0)
}

fn status_kib(pid: u32, field: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use dcmon_agent::config::EbpfMode;
    use dcmon_agent::config::{Config, Exporters};

    use super::*;

    #[test]
    fn the_bench_knows_every_exporter_of_the_table() {
        let mut table: Vec<&str> = dcmon_agent::collector::schema().exporters.iter().map(|&(name, _)| name).collect();
        let mut known: Vec<&str> = TOOL_EXPORTERS.iter().chain(&HOST_FAMILIES).copied().collect();
        table.sort_unstable();
        known.sort_unstable();
        assert_eq!(known, table, "TOOL_EXPORTERS and HOST_FAMILIES against collector::SOURCES");
    }

    #[test]
    fn the_agent_reads_the_bench_config_as_meant() {
        let dir = Path::new("/var/tmp/dcmon-bench-agent");
        for (ebpf, mode) in [(Ebpf::On, EbpfMode::On), (Ebpf::Off, EbpfMode::Off)] {
            let text = agent_config("http://127.0.0.1:9", dir, true, ebpf).to_json();
            let (config, warnings) =
                Config::parse_bytes(Path::new("bench.json"), text.as_bytes(), &dcmon_agent::collector::schema())
                    .unwrap_or_else(|e| panic!("{e}: {text}"));
            assert!(warnings.is_empty(), "{warnings:?}");
            assert_eq!(config.ebpf, mode);
            assert_eq!(config.collection_interval, 1);
            assert_eq!(config.server_url, "http://127.0.0.1:9");
            assert_eq!((config.api_key_file, config.outbox_dir), (dir.join("api_key"), dir.join("outbox")));
            assert_eq!(config.exporters, Exporters::none());
            assert!(config.disks.include.matches("loop7"), "all disks reported: {text}");
        }
        let text = agent_config("http://127.0.0.1:9", dir, false, Ebpf::Off).to_json();
        let (config, _) =
            Config::parse_bytes(Path::new("bench.json"), text.as_bytes(), &dcmon_agent::collector::schema())
                .expect("parses");
        assert_eq!(config.disks, dcmon_agent::config::DeviceFilter::default_disks());
    }
}
