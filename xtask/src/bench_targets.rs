//! The eBPF part of `cargo xtask bench`: issue 19's cost targets, each printed as one
//! `target: ... -> met` / `-> NOT MET` line. The per-event, map-read and load-memory figures
//! come from `dcmon-agent/examples/ebpf_bench.rs json` run as a child; the per-cycle ones from
//! the cycle table of the same bench run. A missed target is a measurement, not a failure; a
//! part that could not be measured prints its error in place of its figure.

use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// Added time per event the programs may cost (ns), `kernel.bpf_stats_enabled=0`.
const EVENT_NS: f64 = 30.0;
/// A 256-CPU host's map-read round must stay under this (µs).
const ROUND_256_US: f64 = 1000.0;
/// The unit's `MemoryMax` that README's Performance section tells operators to set (MiB).
const MEMORY_MAX_MIB: f64 = 48.0;
/// Alternating rounds of each event workload: few, to keep the bench short.
const EVENT_ROUNDS: u32 = 7;
/// How long `ebpf_bench json` may take before it is killed and reported as an error.
const CHILD_LIMIT: Duration = Duration::from_secs(300);
/// Program runs per loopback packet sent and received: net_dev_xmit and netif_receive_skb.
const RUNS_PER_PACKET: f64 = 2.0;

/// What the cycle table of the same run measured: CPU ms and bytes sent per cycle (schedstat
/// medians, byte medians) and the eBPF agent's VmHWM (KiB, median).
pub struct CycleFigures {
    pub procfs_ms: f64,
    pub ebpf_ms: f64,
    pub procfs_bytes: f64,
    pub ebpf_bytes: f64,
    pub ebpf_hwm_kib: f64,
}

/// One program's own work per event from `ebpf_bench json` (ns per run, medians).
struct OwnWork {
    program: String,
    /// dcmon's less the empty program's.
    own: f64,
    ours: f64,
    empty: f64,
    /// A program that only reads the clock, less the empty one.
    clock: Option<f64>,
}

/// Why the eBPF part cannot run on this host, if it cannot.
fn skip_reason() -> Option<&'static str> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (attaching BPF programs and adding a loop device need it)");
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some("this kernel has no /sys/kernel/btf/vmlinux (the tp_btf programs need BTF)");
    }
    None
}

/// The target lines, under a heading; one line saying why when the part cannot run here.
pub fn report(workspace: &Path, cycle: &CycleFigures) -> String {
    let mut out = String::from("\n### eBPF costs against the targets (issue 19)\n\n");
    if let Some(why) = skip_reason() {
        out.push_str(&format!("eBPF part skipped: {why}.\n"));
        return out;
    }
    out.push_str(&target_lines(&ebpf_bench(workspace), cycle));
    out
}

/// The target lines from `ebpf_bench json`'s figures (or why it gave none) and the cycle table's.
fn target_lines(figures: &anyhow::Result<Value>, cycle: &CycleFigures) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Per event: `ebpf_bench json --rounds {EVENT_ROUNDS}` (release build), dcmon's programs attached, empty \
         tp_btf programs on the same tracepoints, and none, in {EVENT_ROUNDS} alternating rounds with \
         kernel.bpf_stats_enabled=0, the median of the rounds' differences [min–max] (packets: the sending \
         thread's CPU time, which the loopback receive is charged to; reads: wall time); in-kernel time from a separate pass with bpf_stats on; own work: dcmon's \
         programs and an empty tp_btf program on the same tracepoints in {EVENT_ROUNDS} alternating rounds with \
         bpf_stats on, the difference of their median ns per run (what the stats' clock reads and the program \
         entry cost is in both); one clock read: a program that only calls bpf_ktime_get_ns, less the empty one \
         (the completion reads the clock once, and so does the issue program where the kernel does not stamp the \
         request itself: README, I/O latency histograms).\n\n"
    ));
    let part = |name: &str| -> anyhow::Result<&Value> {
        let f = figures.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let v = f.get(name).with_context(|| format!("ebpf_bench json has no `{name}`"))?;
        if let Some(e) = v.get("error").and_then(Value::as_str) {
            bail!("{e}");
        }
        Ok(v)
    };
    out += &line(
        format!("<={EVENT_NS:.0} ns added per packet event"),
        part("events").and_then(|e| {
            let (median, lo, hi) = added(e, "packet", "added_ns")?;
            let per = |ns: f64| ns / RUNS_PER_PACKET;
            let mut text = format!(
                "measured {:.0} ns [{:.0}–{:.0}] ({median:.0} ns [{lo:.0}–{hi:.0}] of CPU time per loopback UDP packet \
                 sent and received, {RUNS_PER_PACKET:.0} program runs)",
                per(median),
                per(lo),
                per(hi)
            );
            text += &empty_share(e, "packet", median, per)?;
            Ok((text, per(median) <= EVENT_NS))
        }),
    );
    out += &line(
        format!("<={EVENT_NS:.0} ns added per I/O completion"),
        part("events").and_then(|e| {
            let (median, lo, hi) = added(e, "read", "added_ns")?;
            let mut text = format!(
                "measured {median:.0} ns [{lo:.0}–{hi:.0}] per 4 KiB O_DIRECT loop-device read (its issue and \
                 completion, wall time)"
            );
            text += &empty_share(e, "read", median, |ns| ns)?;
            Ok((text, median <= EVENT_NS))
        }),
    );
    if let Ok(e) = part("events") {
        let programs = e.get("in_kernel").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        let each: Vec<String> = programs
            .iter()
            .filter_map(|p| {
                let (runs, ns) = (p.get("runs")?.as_u64()?, p.get("ns")?.as_u64()?);
                if runs == 0 {
                    return None; // a program these workloads do not trigger
                }
                Some(format!(
                    "{} {:.1} ns/run ({runs} runs)",
                    p.get("program")?.as_str()?,
                    ns as f64 / runs.max(1) as f64
                ))
            })
            .collect();
        out.push_str(&format!("in kernel (bpf_stats on, separate pass): {}\n", each.join(", ")));
    }
    let own = |programs: &[&str]| -> anyhow::Result<Vec<OwnWork>> {
        let list = part("events")?.get("own_work").and_then(Value::as_array).context("events: no `own_work`")?;
        programs
            .iter()
            .map(|&program| {
                let w = list
                    .iter()
                    .find(|w| w.get("program").and_then(Value::as_str) == Some(program))
                    .with_context(|| format!("own_work: no `{program}`"))?;
                let num =
                    |k: &str| w.get(k).and_then(Value::as_f64).with_context(|| format!("own_work {program}: no `{k}`"));
                Ok(OwnWork {
                    program: program.to_owned(),
                    own: num("own_ns")?,
                    ours: num("ours_ns")?,
                    empty: num("empty_ns")?,
                    // Absent from an older ebpf_bench's output: then not printed.
                    clock: w.get("clock_ns").and_then(Value::as_f64),
                })
            })
            .collect()
    };
    let own_line = |work: Vec<OwnWork>, clock_note: bool| {
        let each: Vec<String> = work
            .iter()
            .map(|w| {
                let mut s =
                    format!("{} {:.1} ns ({:.1} less an empty program's {:.1}", w.program, w.own, w.ours, w.empty);
                if let (true, Some(clock)) = (clock_note, w.clock) {
                    s += &format!("; a clock read alone {clock:.1} ns");
                }
                s + ")"
            })
            .collect();
        let worst = work.iter().map(|w| w.own).fold(f64::MIN, f64::max);
        (each.join(", "), worst <= EVENT_NS)
    };
    out += &line(
        format!("<={EVENT_NS:.0} ns of the programs' own work per packet event"),
        own(&["netif_receive_skb", "net_dev_xmit"]).map(|w| own_line(w, false)),
    );
    out += &line(
        format!("<={EVENT_NS:.0} ns of the programs' own work per I/O"),
        own(&["block_rq_issue", "block_rq_complete"]).map(|w| own_line(w, true)),
    );
    out += &line(
        "eBPF CPU/cycle <= procfs".to_owned(),
        Ok((
            // The bytes say why: the eBPF mode sends what procfs cannot (README, Performance:
            // the counters alone cost what procfs costs; the rest grows with the batch).
            format!(
                "{:.3} vs {:.3} ms (schedstat medians of the table above), sending {:.1} vs {:.1} KB a cycle",
                cycle.ebpf_ms,
                cycle.procfs_ms,
                cycle.ebpf_bytes / 1000.0,
                cycle.procfs_bytes / 1000.0
            ),
            cycle.ebpf_ms <= cycle.procfs_ms,
        )),
    );
    out += &line(
        format!("256-CPU map-read round < {:.0} ms", ROUND_256_US / 1000.0),
        part("reads").and_then(|r| {
            let num = |k: &str| r.get(k).and_then(Value::as_f64).with_context(|| format!("reads: no `{k}`"));
            let round_256_us = (num("shared_ns")? + num("per_cpu_256_ns")?) / 1e3;
            Ok((
                format!(
                    "{round_256_us:.0} us (16 disks, 32 interfaces; the per-CPU counters summed from mapped arrays \
                     sized for 256 CPU ids {:.0} us after evicting the caches, {:.0} us in cache; the shared arrays \
                     {:.0} us; all measured); at this host's {} CPUs measured {:.0} us",
                    num("per_cpu_256_ns")? / 1e3,
                    num("per_cpu_256_warm_ns")? / 1e3,
                    num("shared_ns")? / 1e3,
                    num("cpus")?,
                    num("round_here_ns")? / 1e3
                ),
                round_256_us < ROUND_256_US,
            ))
        }),
    );
    // The peak is the table's; the attach alone is its breakdown, shown as an error if missing.
    let attach = part("memory")
        .and_then(|m| m.get("attach").and_then(Value::as_f64).context("memory: no `attach` step"))
        .map_or_else(|e| format!("ERROR, not measured: {e:#}"), |kib| format!("{:.1} MiB", kib / 1024.0));
    out += &line(
        format!("eBPF start-up peak under MemoryMax={MEMORY_MAX_MIB:.0}M (README)"),
        Ok((
            format!(
                "VmHWM {:.1} MiB (the eBPF agent above); the attach alone in a fresh process {attach}",
                cycle.ebpf_hwm_kib / 1024.0
            ),
            cycle.ebpf_hwm_kib / 1024.0 < MEMORY_MAX_MIB,
        )),
    );
    out
}

/// One target line: the measured figure and whether it meets the target, or why it was not measured.
fn line(target: String, measured: anyhow::Result<(String, bool)>) -> String {
    match measured {
        Ok((measured, met)) => format!("target: {target}: {measured} -> {}\n", if met { "met" } else { "NOT MET" }),
        Err(e) => format!("target: {target}: ERROR, not measured: {e:#}\n"),
    }
}

/// What empty programs on the same tracepoints add in `workload` (`added_empty_ns`), and so
/// dcmon's own share of the `added` median, per program run (`per`); nothing when an older
/// ebpf_bench did not measure it.
fn empty_share(events: &Value, workload: &str, added_median: f64, per: impl Fn(f64) -> f64) -> anyhow::Result<String> {
    if events.get(workload).and_then(|w| w.get("added_empty_ns")).is_none() {
        return Ok(String::new());
    }
    let (empty, lo, hi) = added(events, workload, "added_empty_ns")?;
    Ok(format!(
        "; an empty tp_btf program on each of the same tracepoints adds {:.0} ns [{:.0}–{:.0}], so dcmon's own share \
         is {:.0} ns",
        per(empty),
        per(lo),
        per(hi),
        per(added_median - empty)
    ))
}

/// A workload's `key` ns per event (`added_ns`, `added_empty_ns`): the median of the rounds'
/// differences, their min and max.
fn added(events: &Value, workload: &str, key: &str) -> anyhow::Result<(f64, f64, f64)> {
    let mut v: Vec<f64> = events
        .get(workload)
        .and_then(|w| w.get(key))
        .and_then(Value::as_array)
        .with_context(|| format!("events: no `{workload}.{key}`"))?
        .iter()
        .map(|x| x.as_f64().context("events: a round's added ns is not a number"))
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(!v.is_empty(), "events: `{workload}` has no rounds");
    v.sort_by(f64::total_cmp);
    Ok((v[v.len() / 2], v[0], v[v.len() - 1]))
}

/// `cargo` as a shell runs it: without the variables `cargo run` set for xtask itself. Build
/// scripts such as ring's rerun when `CARGO_MANIFEST_DIR` or `CARGO_PKG_NAME` differ from the
/// build before, so with them the debug build `cargo test` made would be rebuilt here.
fn shell_cargo() -> Command {
    let mut cmd = Command::new(env!("CARGO"));
    for (var, _) in std::env::vars_os() {
        let set_by_cargo_run = var.to_str().is_some_and(|v| {
            v.starts_with("CARGO_PKG_")
                || matches!(
                    v,
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_MANIFEST_LINKS"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_BIN_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                )
        });
        if set_by_cargo_run {
            cmd.env_remove(var);
        }
    }
    cmd
}

/// Builds `ebpf_bench` in release, as the agent is built (the bench's release build already
/// made it, so this compiles nothing): the round's shared arrays are read as memory, which a
/// debug build reads ~20 times slower than the release agent (README, Performance). Then runs
/// `ebpf_bench json`, its stderr passed through.
fn ebpf_bench(workspace: &Path) -> anyhow::Result<Value> {
    let status = shell_cargo()
        .current_dir(workspace)
        .args(crate::bench::RELEASE_BUILD)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release --example ebpf_bench failed");
    }
    let exe = workspace.join("target/release/examples/ebpf_bench");
    eprintln!("eBPF costs: {} json --rounds {EVENT_ROUNDS}", exe.display());
    let mut child = Command::new(&exe)
        .args(["json", "--rounds", &EVENT_ROUNDS.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let mut stdout = child.stdout.take().context("ebpf_bench stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).map(|_| s)
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > CHILD_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("ebpf_bench json ran over {} s and was killed", CHILD_LIMIT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = reader.join().map_err(|_| anyhow::anyhow!("ebpf_bench stdout reader panicked"))??;
    if !status.success() {
        bail!("ebpf_bench json failed ({status}); its stderr is above");
    }
    serde_json::from_str(text.trim()).with_context(|| format!("ebpf_bench json printed no JSON object: {text:?}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cycle(ebpf_ms: f64) -> CycleFigures {
        CycleFigures {
            procfs_ms: 0.34,
            ebpf_ms,
            procfs_bytes: 2900.0,
            ebpf_bytes: 13_340.0,
            ebpf_hwm_kib: 24.0 * 1024.0,
        }
    }

    fn lines(out: &str) -> Vec<&str> {
        out.lines().filter(|l| l.starts_with("target: ") || l.starts_with("in kernel")).collect()
    }

    #[test]
    fn each_target_is_set_against_its_figure() {
        let figures = json!({
            "rounds": 3,
            "events": {
                "packet": {"added_ns": [90.0, 40.0, 50.0], "added_empty_ns": [30.0, 20.0, 36.0]},
                "read": {"added_ns": [20.0, -5.0, 29.0]},
                "in_kernel": [{"program": "netif_receive_skb", "runs": 200, "ns": 14000}, {"program": "kfree_skb", "runs": 0, "ns": 0}],
                "own_work": [
                    {"program": "netif_receive_skb", "empty_ns": 55.0, "ours_ns": 69.5, "own_ns": 14.5, "clock_ns": 36.0},
                    {"program": "net_dev_xmit", "empty_ns": 54.0, "ours_ns": 68.0, "own_ns": 14.0},
                    {"program": "block_rq_issue", "empty_ns": 56.0, "ours_ns": 130.0, "own_ns": 74.0, "clock_ns": 38.0},
                    {"program": "block_rq_complete", "empty_ns": 56.5, "ours_ns": 160.0, "own_ns": 103.5},
                ],
            },
            "reads": {"cpus": 2, "shared_ns": 60000.0, "per_cpu_256_ns": 1_000_000.0, "round_here_ns": 80000.0,
                      "per_cpu_256_warm_ns": 700_000.0},
            "memory": {"nothing": 2000, "attach": 21504},
        });
        let out = target_lines(&Ok(figures), &cycle(0.58));
        assert_eq!(
            lines(&out),
            [
                "target: <=30 ns added per packet event: measured 25 ns [20–45] (50 ns [40–90] of CPU time per \
                 loopback UDP packet sent and received, 2 program runs); an empty tp_btf program on each of the same \
                 tracepoints adds 15 ns [10–18], so dcmon's own share is 10 ns -> met",
                "target: <=30 ns added per I/O completion: measured 20 ns [-5–29] per 4 KiB O_DIRECT loop-device \
                 read (its issue and completion, wall time) -> met",
                "in kernel (bpf_stats on, separate pass): netif_receive_skb 70.0 ns/run (200 runs)",
                "target: <=30 ns of the programs' own work per packet event: netif_receive_skb 14.5 ns (69.5 less \
                 an empty program's 55.0), net_dev_xmit 14.0 ns (68.0 less an empty program's 54.0) -> met",
                "target: <=30 ns of the programs' own work per I/O: block_rq_issue 74.0 ns (130.0 less an empty \
                 program's 56.0; a clock read alone 38.0 ns), block_rq_complete 103.5 ns (160.0 less an \
                 empty program's 56.5) -> NOT MET",
                "target: eBPF CPU/cycle <= procfs: 0.580 vs 0.340 ms (schedstat medians of the table above), sending 13.3 vs 2.9 \
                 KB a cycle -> NOT MET",
                "target: 256-CPU map-read round < 1 ms: 1060 us (16 disks, 32 interfaces; the per-CPU counters summed \
                 from mapped arrays sized for 256 CPU ids 1000 us after evicting the caches, 700 us in cache; the \
                 shared arrays 60 us; all measured); at this host's 2 CPUs measured 80 us -> NOT MET",
                "target: eBPF start-up peak under MemoryMax=48M (README): VmHWM 24.0 MiB (the eBPF agent above); \
                 the attach alone in a fresh process 21.0 MiB -> met",
            ]
        );
    }

    #[test]
    fn the_inner_cargo_runs_without_what_cargo_run_set_for_xtask() {
        // cargo sets these for the test process as `cargo run` does for xtask.
        assert!(std::env::var_os("CARGO_PKG_NAME").is_some() && std::env::var_os("CARGO_MANIFEST_DIR").is_some());
        let cmd = shell_cargo();
        let removed: Vec<_> = cmd.get_envs().filter(|(_, v)| v.is_none()).map(|(k, _)| k.to_owned()).collect();
        for var in ["CARGO_PKG_NAME", "CARGO_PKG_VERSION_MAJOR", "CARGO_MANIFEST_DIR"] {
            assert!(removed.iter().any(|k| k == var), "{var} not removed: {removed:?}");
        }
        assert!(!removed.iter().any(|k| k == "PATH" || k == "CARGO_HOME"), "{removed:?}");
    }

    #[test]
    fn a_part_that_failed_prints_its_error_and_the_others_stand() {
        let figures = json!({
            "rounds": 3,
            "events": {"error": "attaching: permission denied"},
            "reads": {"error": "BPF_MAP_CREATE: EPERM"},
            "memory": {"attach": 30720},
        });
        let out = target_lines(&Ok(figures), &cycle(0.30));
        let l = lines(&out);
        assert_eq!(l[0], "target: <=30 ns added per packet event: ERROR, not measured: attaching: permission denied");
        assert_eq!(l[1], "target: <=30 ns added per I/O completion: ERROR, not measured: attaching: permission denied");
        assert_eq!(
            l[2],
            "target: <=30 ns of the programs' own work per packet event: ERROR, not measured: attaching: permission \
             denied"
        );
        assert_eq!(
            l[3],
            "target: <=30 ns of the programs' own work per I/O: ERROR, not measured: attaching: permission denied"
        );
        assert_eq!(
            l[4],
            "target: eBPF CPU/cycle <= procfs: 0.300 vs 0.340 ms (schedstat medians of the table above), sending \
             13.3 vs 2.9 KB a cycle -> met"
        );
        assert_eq!(l[5], "target: 256-CPU map-read round < 1 ms: ERROR, not measured: BPF_MAP_CREATE: EPERM");
        assert!(l[6].ends_with("the attach alone in a fresh process 30.0 MiB -> met"), "{}", l[6]);
        assert_eq!(l.len(), 7, "{out}");

        let out = target_lines(&Err(anyhow::anyhow!("ebpf_bench json failed (exit status: 1)")), &cycle(0.30));
        let errors = lines(&out).iter().filter(|l| l.contains("ERROR, not measured: ebpf_bench json failed")).count();
        assert_eq!(errors, 6, "every ebpf_bench figure says why it is missing: {out}");
        assert!(
            out.contains(
                "VmHWM 24.0 MiB (the eBPF agent above); the attach alone in a fresh process ERROR, not measured"
            ),
            "the table's peak stands without the breakdown: {out}"
        );
    }
}
