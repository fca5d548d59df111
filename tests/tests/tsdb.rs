//! The agent's outputs against real time-series databases (issue 16): Prometheus 2.42 with its
//! remote-write receiver and VictoriaMetrics 1.79 (Debian packages `prometheus` and
//! `victoria-metrics`; a missing binary fails the test saying so), started by each test on free
//! loopback ports (`dcmon_tests::tsdb`). What the databases hold is compared with what the dcmon
//! server stand-in (`Receiver`) got as JSON: the same batches, so the same samples.
//!
//! Every agent here runs the `gpu-server` fixture host with the fake NVML library
//! (tests/csrc/fake_nvml.c): no eBPF, no hardware, so gauges and counters are constant from
//! round to round and GPU series exist.
//!
//! The `harness_*` tests check the test support itself; the rest need the agent's remote_write
//! client, per-output outbox cursors and `/metrics` (issue 16).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dcmon_agent::agent::phase_offset;
use dcmon_tests::remote_write::WriteAnswer;
use dcmon_tests::tsdb::{STALE_NAN_BITS, free_loopback_addr};
use dcmon_tests::{
    AgentConfig, AgentProcess, Prometheus, Receiver, RemoteWriteReceiver, ScrapeJob, Series, VictoriaMetrics,
    fixture_host, wait_until, write_key,
};
use serde_json::{Value, json};

const KEY: &str = "dcmon_tsdbTestKeyTsdbTestKeyTsdbTestKeyTsdbTe";

/// The series whose values may legitimately differ between outputs. None: every output sends
/// the same stored batch, self-metrics (`dcmon_outbox_*`, `dcmon_output_*`, collector
/// durations) included, so every series is compared.
const DIFFER_PER_OUTPUT: &[&str] = &[];

/// VictoriaMetrics keeps about 13 significant decimal digits of a value (its decimal
/// encoding): values read back from it are compared within this relative difference.
const VM_RELATIVE_PRECISION: f64 = 1e-12;

/// Prometheus stores the f64 sent and answers it in a form that parses back to the same bits.
fn exact(stored: f64, sent: f64) -> bool {
    stored.to_bits() == sent.to_bits()
}

fn vm_equal(stored: f64, sent: f64) -> bool {
    stored == sent || (stored - sent).abs() <= VM_RELATIVE_PRECISION * sent.abs().max(stored.abs())
}

/// How far back VictoriaMetrics 1.79 may lose acknowledged samples when SIGKILLed: it writes
/// ingested rows to disk parts every second, but they survive a kill only some seconds later
/// (measured here: lost 2 s after `/internal/force_flush`, kept 6 s after).
const VM_SIGKILL_LOSS: Duration = Duration::from_secs(6);

/// Labels Prometheus adds to what it scrapes, and the series a scrape makes by itself.
const SCRAPE_LABELS: &[&str] = &["job", "instance"];
const SCRAPE_SERIES: &[&str] = &[
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
];

fn unix_now_f64() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn unix_now() -> i64 {
    unix_now_f64() as i64
}

/// A machine id (unique per test) whose 1 s phase is mid-second, so every round's timestamp
/// is one more than the last.
fn machine_id(test: &str) -> String {
    (0..)
        .map(|n| format!("tsdb-{test}-{n}"))
        .find(|id| (300..700).contains(&phase_offset(id, Duration::from_secs(1)).as_millis()))
        .unwrap_or_default()
}

/// One remote_write output of the agent's config.
fn rw(name: &str, url: &str) -> Value {
    json!({"name": name, "url": url, "timeout": 3, "connect_timeout": 1,
           "external_labels": {"cluster": "tsdb-test", "sink": name}})
}

/// The config of an agent on the gpu-server fixture host with the fake NVML, 1 s rounds, short
/// timeouts, sending to `server` (the Receiver) and to `remote_write`; `extra` on top.
fn config(dir: &Path, server: &str, machine: &str, remote_write: Vec<Value>, extra: Value) -> PathBuf {
    write_key(dir, KEY).expect("key");
    AgentConfig::new()
        .extend(json!({
            "server_url": server,
            "collection_interval": 1,
            "machine_id": machine,
            "api_key_file": dir.join("api_key"),
            "outbox_dir": dir.join("outbox"),
            "host_root": fixture_host("gpu-server"),
            "ebpf": "off",
            "exporters": {"ipmi": false, "apt": false, "nvme": false, "nvsmi": true},
            "nvsmi": {"nvml_library": env!("DCMON_FAKE_NVML_SO"), "nvidia_smi": "/nonexistent/nvidia-smi"},
            "retry_max_backoff": 2,
            "connect_timeout": 1,
            "upload_timeout": 3,
            "remote_write": remote_write,
        }))
        .extend(extra)
        .write(dir)
}

type Labels = BTreeMap<String, String>;
/// Series (all labels) -> samples (ts ms -> value).
type SeriesMap = BTreeMap<Labels, BTreeMap<i64, f64>>;

/// What a remote_write output with `external` labels must have stored, from the JSON batches:
/// every metric as `__name__` + its labels + `machine_id` + `external`, at the batch's
/// timestamp in ms. Batches stamped after `until` (seconds) are left out.
fn expected_from_batches(batches: &[Value], external: &[(&str, &str)], until: i64) -> SeriesMap {
    let mut out = SeriesMap::new();
    for b in batches {
        let ts = b["timestamp"].as_i64().expect("batch timestamp");
        if ts > until {
            continue;
        }
        let machine = b["machine_id"].as_str().expect("machine_id");
        for m in dcmon_tests::batch::metrics(b) {
            let name = m["name"].as_str().expect("name");
            if DIFFER_PER_OUTPUT.contains(&name) {
                continue;
            }
            assert_eq!(m["timestamp"].as_i64(), Some(ts), "a metric stamped apart from its batch: {m}");
            let mut labels: Labels = m["labels"]
                .as_object()
                .map(|l| l.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect())
                .unwrap_or_default();
            labels.insert("__name__".into(), name.into());
            labels.insert("machine_id".into(), machine.into());
            for (k, v) in external {
                labels.insert((*k).into(), (*v).into());
            }
            let value = m["value"].as_f64().expect("value");
            let prev = out.entry(labels).or_default().insert(ts * 1000, value);
            assert!(prev.is_none(), "one series twice in the batch at {ts}: {m}");
        }
    }
    out
}

/// Series read back from a database, samples stamped after `until` (seconds) left out.
fn stored(series: Vec<Series>, until: i64) -> SeriesMap {
    let mut out = SeriesMap::new();
    for s in series {
        if DIFFER_PER_OUTPUT.contains(&s.name()) {
            continue;
        }
        let samples = out.entry(s.labels).or_default();
        // A stale marker (a series the sender saw end) is not a sample of a batch.
        for (t, v) in s.samples.into_iter().filter(|(_, v)| !v.is_nan()) {
            if t <= until.saturating_mul(1000) {
                assert!(samples.insert(t, v).is_none(), "a sample stored twice at {t}");
            }
        }
    }
    out.retain(|_, s| !s.is_empty());
    out
}

/// Fail, naming every missing or extra series and every differing sample, unless equal.
#[track_caller]
fn assert_same(what: &str, expected: &SeriesMap, got: &SeriesMap, equal: fn(f64, f64) -> bool) {
    let mut problems = Vec::new();
    for (labels, want) in expected {
        match got.get(labels) {
            None => problems.push(format!("missing series {labels:?}")),
            Some(have)
                if have.len() != want.len()
                    || want.iter().zip(have).any(|((wt, wv), (ht, hv))| wt != ht || !equal(*hv, *wv)) =>
            {
                let diff: Vec<String> = want
                    .keys()
                    .chain(have.keys())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .filter(|t| match (want.get(*t), have.get(*t)) {
                        (Some(w), Some(h)) => !equal(*h, *w),
                        _ => true,
                    })
                    .map(|t| format!("at {t}: sent {:?}, stored {:?}", want.get(t), have.get(t)))
                    .collect();
                problems.push(format!("series {labels:?}: {}", diff.join("; ")));
            }
            Some(_) => {}
        }
    }
    for labels in got.keys().filter(|l| !expected.contains_key(*l)) {
        problems.push(format!("extra series {labels:?}"));
    }
    assert!(
        problems.is_empty(),
        "{what}: {} of {} series differ:\n{}",
        problems.len(),
        expected.len(),
        problems.join("\n")
    );
}

/// Everything Prometheus stored for `machine` (raw samples, the last 15 minutes).
fn prometheus_all(prom: &Prometheus, machine: &str) -> Vec<Series> {
    prom.raw_samples(&format!("{{machine_id={machine:?}}}"), Duration::from_secs(900))
        .unwrap_or_else(|e| panic!("querying Prometheus: {e:#}\n{}", prom.log()))
}

/// Everything VictoriaMetrics stored for `machine`.
fn victoria_all(vm: &VictoriaMetrics, machine: &str, since: i64) -> Vec<Series> {
    vm.export(&format!("{{machine_id={machine:?}}}"), (since - 60) as f64)
        .unwrap_or_else(|e| panic!("exporting from VictoriaMetrics: {e:#}\n{}", vm.log()))
}

/// The newest timestamp (seconds) of `cpu_load_1m` in a set of series.
fn newest(series: &[Series]) -> Option<i64> {
    series.iter().filter(|s| s.name() == "cpu_load_1m").flat_map(|s| s.samples.iter().map(|p| p.0 / 1000)).max()
}

/// Distinct sample timestamps (seconds) of `cpu_load_1m`, with how many times each is stored.
fn cpu_load_timestamps(series: &[Series]) -> BTreeMap<i64, usize> {
    let mut out = BTreeMap::new();
    for s in series.iter().filter(|s| s.name() == "cpu_load_1m") {
        for (t, _) in s.samples.iter().filter(|(_, v)| !v.is_nan()) {
            *out.entry(t / 1000).or_insert(0) += 1;
        }
    }
    out
}

/// Each round (second) of `cpu_load_1m` in the requests a remote-write receiver accepted, with
/// when its request arrived (once per arrival: a round sent twice is listed twice).
fn sink_arrivals(sink: &RemoteWriteReceiver) -> Vec<(i64, Instant)> {
    sink.accepted()
        .iter()
        .flat_map(|r| {
            r.series
                .iter()
                .filter(|s| s.name() == "cpu_load_1m")
                .flat_map(|s| s.samples.iter().filter(|p| !p.1.is_nan()).map(|p| (p.0 / 1000, r.at)))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Rounds a remote-write receiver accepted, with how many times each arrived.
fn sink_rounds(sink: &RemoteWriteReceiver) -> BTreeMap<i64, usize> {
    let mut m = BTreeMap::new();
    for (t, _) in sink_arrivals(sink) {
        *m.entry(t).or_insert(0) += 1;
    }
    m
}

fn batch_timestamps(receiver: &Receiver) -> Vec<i64> {
    receiver.accepted().iter().filter_map(|b| b.json["timestamp"].as_i64()).collect()
}

/// Wait until `newest()` reaches `second`, failing after `timeout` with `what` and a log.
#[track_caller]
fn wait_for_second(
    what: &str,
    second: i64,
    timeout: Duration,
    newest: impl Fn() -> Option<i64>,
    log: impl Fn() -> String,
) {
    let got = wait_until(timeout, || newest().filter(|t| *t >= second));
    assert!(
        got.is_some(),
        "{what}: no sample stamped {second} or later after {timeout:?} (newest {:?}):\n{}",
        newest(),
        log()
    );
}

/// Timestamps missing between the first and last of `ts`.
fn gaps(ts: &BTreeSet<i64>) -> Vec<i64> {
    match (ts.first(), ts.last()) {
        (Some(a), Some(b)) => (*a..=*b).filter(|t| !ts.contains(t)).collect(),
        _ => Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------
// The harness itself.

#[test]
fn harness_prometheus_scrapes_itself_remote_writes_and_survives_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = RemoteWriteReceiver::start().expect("remote-write receiver");
    let job = ScrapeJob { job: "self".into(), target: "{{self}}".into(), interval: Duration::from_millis(500) };
    let extra = format!("remote_write:\n  - url: {:?}\n    remote_timeout: 5s\n", sink.url());
    let mut prom = Prometheus::start_with(dir.path(), &[job], &extra);
    let started = unix_now_f64();
    let first = wait_until(Duration::from_secs(20), || prom_build_info(&prom).filter(|s| s.samples.len() >= 3))
        .unwrap_or_else(|| panic!("prometheus_build_info not scraped 3 times in 20 s:\n{}", prom.log()));
    assert_eq!(first.labels["job"], "self");
    assert!(first.labels["version"].starts_with("2."), "{first:?}");
    assert!(first.samples.iter().all(|(_, v)| *v == 1.0), "{first:?}");
    let series = prom.series("prometheus_build_info", started - 60.0, unix_now_f64() + 1.0).expect("series");
    assert_eq!(series, vec![first.labels.clone()]);
    let range = prom
        .query_range("prometheus_build_info", started, unix_now_f64(), Duration::from_secs(1))
        .expect("query_range");
    assert_eq!(range.len(), 1);
    assert!(!range[0].samples.is_empty());
    assert!(prom.query("no_such_metric", None).expect("query").is_empty());
    assert!(prom.query("rate(", None).is_err(), "a syntax error is an error");

    // The remote-write receiver decodes what a real Prometheus sends: the same samples.
    let sent = wait_until(Duration::from_secs(20), || {
        let got: Vec<Series> = sink
            .accepted()
            .into_iter()
            .flat_map(|r| r.series)
            .filter(|s| s.name() == "prometheus_build_info")
            .collect();
        (got.len() >= 2).then_some(got)
    })
    .unwrap_or_else(|| panic!("Prometheus did not remote-write prometheus_build_info:\n{}", prom.log()));
    assert!(sink.seen().iter().all(|r| r.decode_error.is_none()), "{:?}", sink.seen());
    assert!(sink.seen().iter().all(|r| r.headers.get("content-encoding").map(String::as_str) == Some("snappy")));
    let stored: BTreeSet<(i64, u64)> = first.samples.iter().map(|(t, v)| (*t, v.to_bits())).collect();
    for s in &sent {
        assert_eq!(s.labels, first.labels, "remote-written labels");
        for (t, v) in &s.samples {
            assert!(stored.contains(&(*t, v.to_bits())) || *t > first.samples.last().expect("samples").0, "{t} {v}");
        }
    }

    // SIGKILL, then the same storage and port: the samples written before are still there.
    let before = prom_build_info(&prom).expect("samples").samples;
    let pid = prom.pid().expect("running");
    prom.kill();
    assert!(!Path::new(&format!("/proc/{pid}")).exists() || proc_is_zombie_or_gone(pid), "not killed");
    assert!(prom.query("up", None).is_err(), "answers while killed");
    prom.restart();
    let after = prom_build_info(&prom).expect("samples after restart").samples;
    for s in &before {
        assert!(after.contains(s), "sample {s:?} lost across kill -9 and restart");
    }
}

fn proc_is_zombie_or_gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z "))
}

fn prom_build_info(prom: &Prometheus) -> Option<Series> {
    prom.raw_samples("prometheus_build_info", Duration::from_secs(600)).ok()?.into_iter().next()
}

#[test]
fn harness_victoria_metrics_imports_exports_and_survives_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut vm = VictoriaMetrics::start(dir.path());
    let now_ms = unix_now() * 1000;
    // VictoriaMetrics stores a value as a decimal of about 13 significant digits (with an
    // exponent shared by a block of one series), so values that need more come back rounded:
    // each value its own series, compared within [`VM_RELATIVE_PRECISION`].
    let values = [12.48, 6.520352247073754, 1_081_901_834_240.0, 0.1, 123.45, 1e-7, 33.0];
    let text: String = values
        .iter()
        .enumerate()
        .map(|(i, v)| format!("harness_metric{{a=\"b\",n=\"{i}\"}} {v:?} {}\n", now_ms - 10_000 + i as i64 * 1000))
        .collect();
    vm.import_prometheus(&text).expect("import");
    vm.import_prometheus("harness_other 5\n").expect("import without a timestamp");
    let read =
        |vm: &VictoriaMetrics| vm.export("{__name__=~\"harness_.*\"}", (now_ms / 1000 - 60) as f64).expect("export");
    let started = Instant::now();
    let got = wait_until(Duration::from_secs(10), || Some(read(&vm)).filter(|g| g.len() == values.len() + 1))
        .unwrap_or_else(|| panic!("not all exported after 10 s: {:?}", read(&vm)));
    eprintln!("victoria-metrics: imported samples exported after {:.1?}", started.elapsed());
    for (i, v) in values.iter().enumerate() {
        let labels: Labels = [("__name__", "harness_metric"), ("a", "b"), ("n", &i.to_string())]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into();
        let s = got.iter().find(|s| s.labels == labels).unwrap_or_else(|| panic!("{labels:?} not exported: {got:?}"));
        assert_eq!(s.samples.len(), 1, "{s:?}");
        assert_eq!(s.samples[0].0, now_ms - 10_000 + i as i64 * 1000);
        assert!(vm_equal(s.samples[0].1, *v), "exported {} for {v}", s.samples[0].1);
    }
    assert_eq!(got.iter().find(|s| s.name() == "harness_other").map(|s| s.samples[0].1), Some(5.0));
    assert!(!vm_equal(6.5203522, 6.520352247073754), "the tolerance is not that loose");
    assert!(vm.export("{__name__=\"nothing_here\"}", 0.0).expect("export").is_empty());

    // Data survives SIGKILL once VictoriaMetrics has written it out (1.79 makes what it
    // acknowledged durable within a few seconds: a SIGKILL right after a write loses it, see
    // VM_SIGKILL_LOSS); a restart serves it on the same port.
    vm.flush().expect("flush");
    std::thread::sleep(VM_SIGKILL_LOSS);
    let url = vm.url();
    vm.kill();
    assert!(vm.flush().is_err(), "answers while killed");
    vm.restart();
    assert_eq!(vm.url(), url);
    assert_eq!(read(&vm), got, "lost across kill -9 and restart:\n{}", vm.log());
}

#[test]
fn harness_missing_binary_message_names_the_package() {
    let err = std::panic::catch_unwind(|| {
        let _ = dcmon_tests::tsdb::require_binary("/nonexistent/prometheus", "prometheus");
    })
    .expect_err("a missing binary fails");
    let text = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(text.contains("apt-get install prometheus"), "{text}");
}

#[test]
fn harness_stale_markers_are_not_read_back_as_samples() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prom = Prometheus::start(dir.path());
    let vm = VictoriaMetrics::start(dir.path());
    let now_ms = unix_now() * 1000;
    let labels: Labels =
        [("__name__", "harness_stale"), ("machine_id", "stale-test")].map(|(k, v)| (k.to_owned(), v.to_owned())).into();
    let series = vec![Series {
        labels: labels.clone(),
        samples: vec![(now_ms - 3000, 1.5), (now_ms - 2000, 2.5), (now_ms - 1000, f64::from_bits(STALE_NAN_BITS))],
    }];
    for addr in [prom.addr(), vm.addr()] {
        let (status, answer) = dcmon_tests::remote_write::push(addr, "/api/v1/write", &series).expect("push");
        assert!((200..300).contains(&status), "{addr}: {status} {answer}");
    }
    let want: SeriesMap = [(labels, BTreeMap::from([(now_ms - 3000, 1.5), (now_ms - 2000, 2.5)]))].into();
    assert_same("Prometheus", &want, &stored(prometheus_all(&prom, "stale-test"), i64::MAX / 1000), exact);
    let in_vm = wait_until(Duration::from_secs(10), || {
        Some(stored(victoria_all(&vm, "stale-test", now_ms / 1000), i64::MAX / 1000)).filter(|m| !m.is_empty())
    })
    .unwrap_or_default();
    assert_same("VictoriaMetrics", &want, &in_vm, vm_equal);
}

/// The agent's JSON batches as remote-write series (what the agent's remote_write must send).
fn batches_as_series(batches: &[Value], external: &[(&str, &str)]) -> Vec<Series> {
    expected_from_batches(batches, external, i64::MAX)
        .into_iter()
        .map(|(labels, samples)| Series { labels, samples: samples.into_iter().collect() })
        .collect()
}

/// The comparison the agent tests make, on batches this test writes to both databases itself
/// (the agent's dcmon output only, which works without issue 16): equal when written as sent,
/// and a changed value, a missing series and an extra one are each caught.
#[test]
fn harness_comparison_holds_for_batches_written_by_the_test_and_catches_differences() {
    let machine = machine_id("harness");
    let dir = tempfile::tempdir().expect("tempdir");
    let receiver = Receiver::start(&[(KEY, &machine)]).expect("receiver");
    let prom = Prometheus::start(dir.path());
    let vm = VictoriaMetrics::start(dir.path());
    let cfg = config(dir.path(), &receiver.url(), &machine, vec![], json!({}));
    let started = unix_now();
    let agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("agent");
    let got = receiver.wait_for_accepted(3, ARRIVAL);
    assert!(got.len() >= 3, "{}", agent.stderr());
    drop(agent);
    let batches: Vec<Value> = got.into_iter().map(|a| a.json).collect();
    let cut = batches[2]["timestamp"].as_i64().expect("ts");
    let external = [("cluster", "tsdb-test"), ("sink", "harness")];
    let series = batches_as_series(&batches[..3], &external);
    let (status, answer) = dcmon_tests::remote_write::push(prom.addr(), "/api/v1/write", &series).expect("push");
    assert!((200..300).contains(&status), "Prometheus: {status} {answer}");
    let (status, answer) = dcmon_tests::remote_write::push(vm.addr(), "/api/v1/write", &series).expect("push");
    assert!((200..300).contains(&status), "VictoriaMetrics: {status} {answer}");
    let want = expected_from_batches(&batches, &external, cut);
    assert!(want.keys().any(|l| l["__name__"] == "gpu_power_draw"), "GPU series from the fake NVML");
    let in_prom = stored(prometheus_all(&prom, &machine), cut);
    assert_same("Prometheus", &want, &in_prom, exact);
    let in_vm = wait_until(Duration::from_secs(10), || {
        Some(stored(victoria_all(&vm, &machine, started), cut)).filter(|m| m.len() == want.len())
    })
    .unwrap_or_else(|| stored(victoria_all(&vm, &machine, started), cut));
    assert_same("VictoriaMetrics", &want, &in_vm, vm_equal);

    let fails = |got: &SeriesMap| std::panic::catch_unwind(|| assert_same("x", &want, got, exact)).is_err();
    let mut changed = in_prom.clone();
    let first = changed.values_mut().next().expect("a series");
    let v = first.values_mut().next().expect("a sample");
    *v = f64::from_bits(v.to_bits() ^ 1);
    assert!(fails(&changed), "a value one bit off is caught");
    let mut missing = in_prom.clone();
    missing.pop_last();
    assert!(fails(&missing), "a missing series is caught");
    let mut extra = in_prom.clone();
    let mut labels = extra.keys().next().expect("a series").clone();
    labels.insert("extra".into(), "1".into());
    extra.insert(labels, BTreeMap::from([(cut * 1000, 1.0)]));
    assert!(fails(&extra), "an extra series is caught");
    let mut late = in_prom;
    late.values_mut().next().expect("a series").insert(cut * 1000 + 1, 1.0);
    assert!(fails(&late), "an extra sample is caught");
}

// ---------------------------------------------------------------------------------------
// The agent's outputs. These need issue 16's remote_write client, per-output cursors and
// /metrics in the agent.

/// How long an output may take to show a round in the tests below (1 s rounds).
const ARRIVAL: Duration = Duration::from_secs(20);

#[test]
fn remote_write_stores_every_series_label_and_value_the_dcmon_output_got() {
    let machine = machine_id("exact");
    let dir = tempfile::tempdir().expect("tempdir");
    let receiver = Receiver::start(&[(KEY, &machine)]).expect("receiver");
    let prom = Prometheus::start(dir.path());
    let vm = VictoriaMetrics::start(dir.path());
    let cfg = config(
        dir.path(),
        &receiver.url(),
        &machine,
        vec![rw("prometheus", &prom.remote_write_url()), rw("victoria", &vm.remote_write_url())],
        json!({}),
    );
    let started = unix_now();
    let agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("agent");
    let batches = receiver.wait_for_accepted(6, ARRIVAL);
    assert!(batches.len() >= 6, "the dcmon output got {} batches:\n{}", batches.len(), agent.stderr());
    let cut = batches[5].json["timestamp"].as_i64().expect("timestamp");
    let log = || format!("agent:\n{}\nprometheus:\n{}\nvictoria-metrics:\n{}", agent.stderr(), prom.log(), vm.log());
    wait_for_second("prometheus", cut, ARRIVAL, || newest(&prometheus_all(&prom, &machine)), log);
    wait_for_second("victoria-metrics", cut, ARRIVAL, || newest(&victoria_all(&vm, &machine, started)), log);
    drop(agent);

    let batches: Vec<Value> = receiver.accepted().into_iter().map(|a| a.json).collect();
    let gpu = expected_from_batches(&batches, &[], cut).keys().filter(|l| l["__name__"].starts_with("gpu_")).count();
    assert!(gpu >= 20, "the fake NVML's GPUs are in the batches ({gpu} gpu series)");
    let for_prom = expected_from_batches(&batches, &[("cluster", "tsdb-test"), ("sink", "prometheus")], cut);
    let for_vm = expected_from_batches(&batches, &[("cluster", "tsdb-test"), ("sink", "victoria")], cut);
    assert_same("Prometheus (raw samples)", &for_prom, &stored(prometheus_all(&prom, &machine), cut), exact);
    assert_same(
        "VictoriaMetrics (/api/v1/export)",
        &for_vm,
        &stored(victoria_all(&vm, &machine, started), cut),
        vm_equal,
    );

    // The series endpoint and query_range see the same set of series.
    let names: BTreeSet<Labels> = prom
        .series(&format!("{{machine_id={machine:?}}}"), (started - 60) as f64, unix_now_f64())
        .expect("series")
        .into_iter()
        .collect();
    assert_eq!(names, for_prom.keys().cloned().collect::<BTreeSet<_>>(), "/api/v1/series");
    let first_ts = *for_prom.values().flat_map(|s| s.keys()).min().expect("samples") / 1000;
    let ranged = prom
        .query_range(
            &format!("cpu_load_1m{{machine_id={machine:?}}}"),
            first_ts as f64,
            cut as f64,
            Duration::from_secs(1),
        )
        .expect("query_range");
    let load = dcmon_tests::batch::find(&batches[0], "cpu_load_1m", "").and_then(|v| v.as_f64()).expect("cpu_load_1m");
    assert_eq!(ranged.len(), 1);
    assert!(ranged[0].samples.len() >= 5 && ranged[0].samples.iter().all(|(_, v)| *v == load), "{ranged:?}");
    eprintln!(
        "exact: {} batches up to {cut}, {} series each ({gpu} GPU), equal in Prometheus and VictoriaMetrics",
        batches.iter().filter(|b| b["timestamp"].as_i64() <= Some(cut)).count(),
        for_prom.len()
    );
}

#[test]
fn databases_killed_for_30s_get_every_sample_of_the_outage_once() {
    let machine = machine_id("outage");
    let dir = tempfile::tempdir().expect("tempdir");
    let receiver = Receiver::start(&[(KEY, &machine)]).expect("receiver");
    let mut prom = Prometheus::start(dir.path());
    let mut vm = VictoriaMetrics::start(dir.path());
    let cfg = config(
        dir.path(),
        &receiver.url(),
        &machine,
        vec![rw("prometheus", &prom.remote_write_url()), rw("victoria", &vm.remote_write_url())],
        json!({}),
    );
    let started = unix_now();
    let agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("agent");
    let first = receiver.wait_for_accepted(3, ARRIVAL);
    assert!(first.len() >= 3, "{}", agent.stderr());
    let t0 = first[2].json["timestamp"].as_i64().expect("ts");
    wait_for_second("prometheus", t0, ARRIVAL, || newest(&prometheus_all(&prom, &machine)), || agent.stderr());
    wait_for_second(
        "victoria-metrics",
        t0,
        ARRIVAL,
        || newest(&victoria_all(&vm, &machine, started)),
        || agent.stderr(),
    );

    // VictoriaMetrics 1.79 can lose what it acknowledged in the VM_SIGKILL_LOSS before a
    // SIGKILL: that is the database's loss, not the agent's (which got a 2xx); counted below.
    // Rounds stamped after `kill_at` were collected after the kill (a round is collected
    // 0.3 to 0.7 s into its second); the round stamped `kill_at` may have been acknowledged
    // just before it.
    let kill_at = unix_now();
    vm.kill();
    prom.kill();
    std::thread::sleep(Duration::from_secs(30));
    let back_at = unix_now();
    prom.restart();
    vm.restart();
    let until = back_at + 3;
    let log = || format!("agent:\n{}\nprometheus:\n{}\nvictoria-metrics:\n{}", agent.stderr(), prom.log(), vm.log());
    let caught_up = Instant::now();
    wait_for_second(
        "prometheus after the outage",
        until,
        Duration::from_secs(40),
        || newest(&prometheus_all(&prom, &machine)),
        log,
    );
    let prom_took = caught_up.elapsed();
    wait_for_second(
        "victoria-metrics after the outage",
        until,
        Duration::from_secs(40),
        || newest(&victoria_all(&vm, &machine, started)),
        log,
    );
    let sent: BTreeSet<i64> = batch_timestamps(&receiver).into_iter().filter(|t| *t <= until).collect();
    assert!(gaps(&sent).is_empty(), "the dcmon output missed rounds: {:?}", gaps(&sent));
    let outage: Vec<i64> = sent.iter().copied().filter(|t| (kill_at..back_at).contains(t)).collect();
    assert!(outage.len() >= 28, "rounds during the 30 s outage: {outage:?}");

    let in_prom = cpu_load_timestamps(&prometheus_all(&prom, &machine));
    let in_vm = cpu_load_timestamps(&victoria_all(&vm, &machine, started));
    for (what, got) in [("prometheus", &in_prom), ("victoria-metrics", &in_vm)] {
        let missing: Vec<i64> = sent.iter().copied().filter(|t| *t > kill_at && !got.contains_key(t)).collect();
        assert!(missing.is_empty(), "{what}: rounds of the outage and after it missing: {missing:?}");
        let twice: Vec<(&i64, &usize)> = got.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "{what}: rounds stored more than once: {twice:?}");
        let extra: Vec<&i64> = got.keys().filter(|t| **t <= until && !sent.contains(t)).collect();
        assert!(extra.is_empty(), "{what}: rounds the dcmon output never got: {extra:?}");
    }
    let prom_missing: Vec<i64> = sent.iter().copied().filter(|t| !in_prom.contains_key(t)).collect();
    assert!(prom_missing.is_empty(), "prometheus (WAL written before the answer) lost {prom_missing:?}");
    let vm_lost: Vec<i64> = sent.iter().copied().filter(|t| *t <= kill_at && !in_vm.contains_key(t)).collect();
    let window = VM_SIGKILL_LOSS.as_secs() as i64 + 1;
    assert!(
        vm_lost.iter().all(|t| *t >= kill_at - window),
        "victoria-metrics lost rounds older than its own {window} s before the SIGKILL at {kill_at}: {vm_lost:?}"
    );
    // Whole series, not only cpu_load_1m: everything from the kill on equals the batches.
    let batches: Vec<Value> = receiver.accepted().into_iter().map(|a| a.json).collect();
    let mut want = expected_from_batches(&batches, &[("cluster", "tsdb-test"), ("sink", "prometheus")], until);
    let mut got = stored(prometheus_all(&prom, &machine), until);
    for m in [&mut want, &mut got] {
        for s in m.values_mut() {
            s.retain(|t, _| *t > kill_at * 1000);
        }
        m.retain(|_, s| !s.is_empty());
    }
    assert_same("Prometheus, from the kill on", &want, &got, exact);
    eprintln!(
        "database outage: {} rounds during 30 s, all in Prometheus and VictoriaMetrics once; Prometheus caught up \
         {prom_took:.1?} after its restart; VictoriaMetrics lost {} acknowledged round(s) to its own SIGKILL",
        outage.len(),
        vm_lost.len()
    );
}

#[test]
fn out_of_bounds_400_for_old_samples_does_not_block_the_queue() {
    let machine = machine_id("bounds");
    let dir = tempfile::tempdir().expect("tempdir");
    let receiver = Receiver::start(&[(KEY, &machine)]).expect("receiver");
    let sink = RemoteWriteReceiver::start().expect("remote-write receiver");
    let cfg = config(dir.path(), &receiver.url(), &machine, vec![rw("sink", &sink.url())], json!({}));
    let agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("agent");
    assert!(wait_until(ARRIVAL, || (sink.accepted().len() >= 2).then_some(())).is_some(), "{}", agent.stderr());
    // A receiver outage builds a backlog; when it comes back, it refuses the old samples
    // with 400 "out of bounds" (as Prometheus does past its head block) and takes new ones.
    sink.set_answer(WriteAnswer::Status(503));
    std::thread::sleep(Duration::from_secs(8));
    let cutoff = unix_now();
    sink.set_answer(WriteAnswer::RejectOlderThan(cutoff * 1000));
    let back = Instant::now();
    let new_arrived = wait_until(ARRIVAL, || sink_rounds(&sink).into_keys().find(|t| *t >= cutoff + 2));
    let took = back.elapsed();
    assert!(
        new_arrived.is_some(),
        "no sample newer than the cutoff arrived: the 400s block the queue:\n{}",
        agent.stderr()
    );
    // A few more rounds, then: every round from the cutoff on arrived once, except rounds sent
    // in one request with an old sample (refused whole, as Prometheus refuses a request).
    std::thread::sleep(Duration::from_secs(3));
    let seen = sink.seen();
    let refused = seen.iter().filter(|r| r.status == 400).count();
    assert!(refused >= 1, "the backlog was never refused (nothing was old?)");
    let refused_rounds: BTreeSet<i64> = seen
        .iter()
        .filter(|r| r.status == 400)
        .flat_map(|r| {
            r.series.iter().filter(|s| s.name() == "cpu_load_1m").flat_map(|s| s.samples.iter().map(|p| p.0 / 1000))
        })
        .collect();
    let after: BTreeMap<i64, usize> = sink_rounds(&sink).into_iter().filter(|(t, _)| *t >= cutoff).collect();
    let last = *after.keys().last().expect("rounds after the cutoff");
    let lost: Vec<i64> = (cutoff..=last).filter(|t| !after.contains_key(t) && !refused_rounds.contains(t)).collect();
    assert!(lost.is_empty(), "rounds after the cutoff {cutoff} neither delivered nor refused: {lost:?}");
    let first_new = *after.keys().next().expect("a round");
    let after_first: BTreeSet<i64> = after.keys().copied().collect();
    assert!(gaps(&after_first).is_empty(), "gaps after the first new round {first_new}: {:?}", gaps(&after_first));
    assert!(after.values().all(|n| *n == 1), "sent twice: {after:?}");
    // No refused request is sent again (a poison request retried forever would show here).
    let refused_bodies: Vec<String> =
        seen.iter().filter(|r| r.status == 400).map(|r| format!("{:?}", r.series)).collect();
    let distinct: BTreeSet<&String> = refused_bodies.iter().collect();
    let refused_at: Vec<Option<i64>> = seen.iter().filter(|r| r.status == 400).map(|r| r.min_ts()).collect();
    assert_eq!(
        refused_bodies.len(),
        distinct.len(),
        "a refused request was sent again (oldest samples {refused_at:?})"
    );
    eprintln!(
        "out of bounds: {refused} old requests refused with 400, new samples arrived {took:.1?} after the receiver came back"
    );
}

#[test]
fn agent_kill_9_loses_nothing_in_any_output() {
    let machine = machine_id("kill9");
    let dir = tempfile::tempdir().expect("tempdir");
    let receiver = Receiver::start(&[(KEY, &machine)]).expect("receiver");
    let prom = Prometheus::start(dir.path());
    let sink = RemoteWriteReceiver::start().expect("remote-write receiver");
    let cfg = config(
        dir.path(),
        &receiver.url(),
        &machine,
        vec![rw("prometheus", &prom.remote_write_url()), rw("sink", &sink.url())],
        json!({}),
    );
    let mut agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("agent");
    assert!(receiver.wait_for_accepted(2, ARRIVAL).len() >= 2, "{}", agent.stderr());
    // A backlog in two outputs when the agent dies: the dcmon server and the sink are down.
    receiver.force_status(Some(503));
    sink.set_answer(WriteAnswer::Status(503));
    std::thread::sleep(Duration::from_secs(4));
    assert!(agent.signal_and_wait("KILL", Duration::from_secs(5)).is_some());
    let killed_at = unix_now();
    let stored_at_kill: Vec<i64> =
        dcmon_agent::outbox::inspect(&dir.path().join("outbox")).expect("outbox").iter().map(|b| b.timestamp).collect();
    std::thread::sleep(Duration::from_secs(2));
    let restart_dir = dir.path().join("restart");
    std::fs::create_dir(&restart_dir).expect("mkdir");
    let agent = AgentProcess::start(&restart_dir, &cfg, &["run"]).expect("restart");
    receiver.force_status(None);
    sink.set_answer(WriteAnswer::Accept);
    let until = killed_at + 6;
    let log = || {
        format!(
            "first run:\n{}\nrestart:\n{}",
            std::fs::read_to_string(dir.path().join("agent.stderr")).unwrap_or_default(),
            agent.stderr()
        )
    };
    wait_for_second("dcmon output", until, ARRIVAL, || batch_timestamps(&receiver).into_iter().max(), log);
    wait_for_second("prometheus", until, ARRIVAL, || newest(&prometheus_all(&prom, &machine)), log);
    wait_for_second("sink", until, ARRIVAL, || sink_rounds(&sink).keys().max().copied(), log);

    // Every round the agent collected (the dcmon output's view, the outbox at the kill) is in
    // every output; the rounds while it was dead were never collected.
    let dcmon: BTreeSet<i64> = batch_timestamps(&receiver).into_iter().filter(|t| *t <= until).collect();
    let prom_ts: BTreeSet<i64> =
        cpu_load_timestamps(&prometheus_all(&prom, &machine)).into_keys().filter(|t| *t <= until).collect();
    let sink_counts = sink_rounds(&sink);
    let sink_set: BTreeSet<i64> = sink_counts.keys().copied().filter(|t| *t <= until).collect();
    for t in &stored_at_kill {
        for (what, got) in [("dcmon", &dcmon), ("prometheus", &prom_ts), ("sink", &sink_set)] {
            assert!(got.contains(t), "{what}: round {t}, in the outbox at the kill, lost");
        }
    }
    assert_eq!(prom_ts, dcmon, "prometheus and the dcmon output got different rounds");
    assert_eq!(sink_set, dcmon, "the sink and the dcmon output got different rounds");
    let resent: Vec<(&i64, &usize)> = sink_counts.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "kill -9: {} rounds in the outbox at the kill, all delivered to 3 outputs; {} round(s) sent twice to the sink \
         (acknowledged just before the kill): {resent:?}",
        stored_at_kill.len(),
        resent.len()
    );
}

#[test]
fn prometheus_scrape_of_metrics_equals_the_batch() {
    let machine = machine_id("scrape");
    let dir = tempfile::tempdir().expect("tempdir");
    let receiver = Receiver::start(&[(KEY, &machine)]).expect("receiver");
    let listen = free_loopback_addr();
    let job = ScrapeJob { job: "dcmon".into(), target: listen.to_string(), interval: Duration::from_secs(1) };
    let prom = Prometheus::start_with_scrapes(dir.path(), &[job]);
    let cfg = config(dir.path(), &receiver.url(), &machine, vec![], json!({"prometheus_listen": listen.to_string()}));
    let agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("agent");
    let up = wait_until(ARRIVAL, || {
        let s = prom.raw_samples("up{job=\"dcmon\"}", Duration::from_secs(300)).ok()?;
        let ok = s.first()?.samples.iter().filter(|(_, v)| *v == 1.0).count();
        (ok >= 3).then_some(ok)
    });
    assert!(
        up.is_some(),
        "Prometheus could not scrape the agent's /metrics at {listen} 3 times:\n{}\n{}",
        prom.raw_samples("up", Duration::from_secs(300)).map(|s| format!("{s:?}")).unwrap_or_default(),
        agent.stderr()
    );
    let scraped = prom.query("{job=\"dcmon\"}", None).expect("query");
    let batches: Vec<Value> = receiver.accepted().into_iter().map(|a| a.json).collect();
    drop(agent);
    // Every value a series had in the batches (machine_id aside: /metrics may or may not carry it).
    let mut in_batches: BTreeMap<Labels, BTreeSet<u64>> = BTreeMap::new();
    for (labels, samples) in expected_from_batches(&batches, &[], i64::MAX) {
        let mut labels = labels;
        labels.remove("machine_id");
        in_batches.entry(labels).or_default().extend(samples.values().map(|v| v.to_bits()));
    }
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for s in scraped.iter().filter(|s| !SCRAPE_SERIES.contains(&s.name())) {
        let mut labels = s.labels.clone();
        for l in SCRAPE_LABELS.iter().chain(&["machine_id"]) {
            labels.remove(*l);
        }
        let value = s.samples[0].1;
        match in_batches.get(&labels) {
            None => problems.push(format!("scraped {labels:?} = {value}, in no batch")),
            // A constant series (the fixture host's) must be scraped as that constant; one
            // that changes from round to round as one round's value.
            Some(values) if !values.contains(&value.to_bits()) => {
                problems.push(format!("scraped {labels:?} = {value}, the batches had {values:?}"))
            }
            Some(_) => {}
        }
        seen.insert(labels);
    }
    let last =
        batches.last().map(|b| expected_from_batches(std::slice::from_ref(b), &[], i64::MAX)).unwrap_or_default();
    for labels in last.keys() {
        let mut labels = labels.clone();
        labels.remove("machine_id");
        if !seen.contains(&labels) {
            problems.push(format!("in the last batch, not scraped: {labels:?}"));
        }
    }
    assert!(problems.is_empty(), "/metrics against the batches:\n{}", problems.join("\n"));
    let constant = in_batches.values().filter(|v| v.len() == 1).count();
    eprintln!(
        "scrape: {} series scraped, equal to the batches ({constant} constant across {} rounds)",
        seen.len(),
        batches.len()
    );
}

#[test]
fn per_output_cursors_are_independent() {
    let machine = machine_id("cursors");
    let dir = tempfile::tempdir().expect("tempdir");
    let receiver = Receiver::start(&[(KEY, &machine)]).expect("receiver");
    let sink = RemoteWriteReceiver::start().expect("remote-write receiver");
    let cfg = config(dir.path(), &receiver.url(), &machine, vec![rw("sink", &sink.url())], json!({}));
    let agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("agent");
    assert!(receiver.wait_for_accepted(2, ARRIVAL).len() >= 2, "{}", agent.stderr());
    assert!(wait_until(ARRIVAL, || (sink.accepted().len() >= 2).then_some(())).is_some(), "{}", agent.stderr());
    // Wall clock of an Instant, to compare arrival with the round's timestamp.
    let (ref_instant, ref_wall) = (Instant::now(), unix_now_f64());
    let wall = |at: Instant| {
        ref_wall + at.duration_since(ref_instant).as_secs_f64()
            - ref_instant.saturating_duration_since(at).as_secs_f64()
    };

    // Phase 1: the dcmon server answers 503 for 10 s; remote_write must stay on time.
    receiver.force_status(Some(503));
    let down = unix_now();
    std::thread::sleep(Duration::from_secs(10));
    let up = unix_now();
    receiver.force_status(None);
    let arrivals = sink_arrivals(&sink);
    let rw_lags: Vec<f64> =
        arrivals.iter().filter(|(t, _)| (down..up).contains(t)).map(|(t, at)| wall(*at) - *t as f64).collect();
    let rw_rounds: BTreeSet<i64> = arrivals.iter().map(|(t, _)| *t).filter(|t| (down..up).contains(t)).collect();
    // The dcmon output catches up first (its retry backoff and the backlog's pace), so that
    // phase 2 measures only the effect of remote_write being down.
    let now = unix_now();
    wait_for_second(
        "dcmon output after its outage",
        now,
        ARRIVAL,
        || batch_timestamps(&receiver).into_iter().max(),
        || agent.stderr(),
    );
    // Phase 2: the reverse: remote_write answers 503 for 10 s; the dcmon output stays on time.
    sink.set_answer(WriteAnswer::Status(503));
    let rw_down = unix_now();
    std::thread::sleep(Duration::from_secs(10));
    let rw_up = unix_now();
    sink.set_answer(WriteAnswer::Accept);
    let dcmon_lags: Vec<f64> = receiver
        .accepted()
        .iter()
        .filter_map(|b| Some((wall(b.at), b.json["timestamp"].as_i64()? as f64)))
        .filter(|(_, ts)| (rw_down as f64..rw_up as f64).contains(ts))
        .map(|(at, ts)| at - ts)
        .collect();
    // Both catch up afterwards.
    let until = rw_up + 3;
    wait_for_second(
        "dcmon output",
        until,
        ARRIVAL,
        || batch_timestamps(&receiver).into_iter().max(),
        || agent.stderr(),
    );
    wait_for_second("sink", until, ARRIVAL, || sink_rounds(&sink).keys().max().copied(), || agent.stderr());
    let dcmon_all: BTreeSet<i64> = batch_timestamps(&receiver).into_iter().filter(|t| *t <= until).collect();
    let sink_all: BTreeSet<i64> = sink_rounds(&sink).into_keys().filter(|t| *t <= until).collect();
    assert!(gaps(&dcmon_all).is_empty(), "dcmon output lost rounds: {:?}", gaps(&dcmon_all));
    assert!(gaps(&sink_all).is_empty(), "remote_write lost rounds: {:?}", gaps(&sink_all));

    let max = |v: &[f64]| v.iter().copied().fold(0.0f64, f64::max);
    let mean = |v: &[f64]| if v.is_empty() { f64::NAN } else { v.iter().sum::<f64>() / v.len() as f64 };
    eprintln!(
        "cursors: dcmon down {}s: remote_write lag mean {:.2}s max {:.2}s over {} rounds; remote_write down {}s: \
         dcmon lag mean {:.2}s max {:.2}s over {} rounds",
        up - down,
        mean(&rw_lags),
        max(&rw_lags),
        rw_lags.len(),
        rw_up - rw_down,
        mean(&dcmon_lags),
        max(&dcmon_lags),
        dcmon_lags.len()
    );
    assert!(rw_rounds.len() >= 9, "remote_write rounds while the dcmon server was down: {rw_rounds:?}");
    assert!(max(&rw_lags) < 3.0, "remote_write fell behind while the dcmon server was down: {rw_lags:?}");
    assert!(dcmon_lags.len() >= 9, "dcmon rounds while remote_write was down: {dcmon_lags:?}");
    assert!(max(&dcmon_lags) < 3.0, "the dcmon output fell behind while remote_write was down: {dcmon_lags:?}");
}

// ---------------------------------------------------------------------------------------
// The Grafana dashboard (dashboards/dcmon.json).

/// Metrics the dashboard may use that issue 16 adds (not yet in README's Metrics table).
const NEW_METRICS: &[&str] = &["dcmon_output_lag_seconds", "dcmon_output_batches_sent_total"];

/// Metrics the dashboard must show (the fleet row and the host row of issue 16).
const DASHBOARD_MUST_SHOW: &[&str] = &[
    "dcmon_collector_success",
    "cpu_load_1m",
    "cpu_usage_percent",
    "memory_usage_percent",
    "memory_used_bytes",
    "dcmon_outbox_batches",
    "dcmon_output_lag_seconds",
    "disk_read_bytes_total",
    "disk_write_bytes_total",
    "network_receive_bytes_total",
    "network_transmit_bytes_total",
    "gpu_temperature",
    "gpu_power_draw",
    "gpu_utilization_gpu",
];

fn dashboard() -> Value {
    let path = dcmon_tests::workspace_root().join("dashboards/dcmon.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every panel, rows' nested panels included.
fn panels(dash: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        out.push(p.clone());
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested.iter().cloned());
        }
    }
    out
}

/// (panel title, PromQL) of every target.
fn targets(dash: &Value) -> Vec<(String, String)> {
    panels(dash)
        .iter()
        .filter(|p| p["type"] != "row")
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_owned();
            p["targets"].as_array().cloned().unwrap_or_default().into_iter().map(move |t| {
                (title.clone(), t["expr"].as_str().unwrap_or_else(|| panic!("a target without expr: {t}")).to_owned())
            })
        })
        .collect()
}

/// The metric names in README's Metrics table.
fn readme_metrics() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(dcmon_tests::workspace_root().join("README.md")).expect("README");
    let table = readme.split("## Metrics").nth(1).expect("a Metrics section").split("\n## ").next().unwrap_or_default();
    table
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .flat_map(|l| l.split(" |").next().unwrap_or_default().split('`').map(str::to_owned).collect::<Vec<_>>())
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        .collect()
}

/// Identifiers in a PromQL expression that look like the agent's metric names.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const PREFIXES: &[&str] = &["cpu_", "memory_", "disk_", "network_", "gpu_", "dcmon_", "nvme_", "ipmi_", "apt_"];
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| PREFIXES.iter().any(|p| w.starts_with(p)))
        .map(str::to_owned)
        .collect()
}

/// The expression as Grafana sends it: template variables replaced.
fn substitute(expr: &str, machine: &str) -> String {
    expr.replace("${machine_id}", machine)
        .replace("$machine_id", machine)
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
        .replace("${topn}", "10")
        .replace("$topn", "10")
}

#[test]
fn dashboard_is_importable_and_uses_only_the_agents_metrics() {
    let dash = dashboard();
    let inputs = dash["__inputs"].as_array().expect("__inputs (an exported dashboard)");
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus" && i["type"] == "datasource"),
        "{inputs:?}"
    );
    let vars = dash["templating"]["list"].as_array().expect("templating");
    let machine = vars.iter().find(|v| v["name"] == "machine_id").expect("a machine_id variable");
    assert_eq!(machine["type"], "query");
    assert_eq!(machine["definition"], "label_values(cpu_load_1m, machine_id)");
    assert_eq!(machine["query"]["query"], "label_values(cpu_load_1m, machine_id)");
    let mut ids = BTreeSet::new();
    for p in panels(&dash) {
        assert!(ids.insert(p["id"].as_i64().expect("panel id")), "panel id twice: {p}");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {}", p["title"]);
        let ts = p["targets"].as_array().unwrap_or_else(|| panic!("panel {} has no targets", p["title"]));
        assert!(!ts.is_empty(), "panel {} has no targets", p["title"]);
        for t in ts {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "a target of {}", p["title"]);
        }
    }
    let known = readme_metrics();
    assert!(known.contains("cpu_load_1m") && known.contains("dcmon_outbox_batches") && known.len() > 40, "{known:?}");
    let mut used = BTreeSet::new();
    for (title, expr) in targets(&dash) {
        for name in metric_names(&expr) {
            assert!(
                known.contains(&name) || NEW_METRICS.contains(&name.as_str()),
                "panel {title:?} uses {name}, which is not in README's Metrics table"
            );
            used.insert(name);
        }
    }
    let missing: Vec<&&str> = DASHBOARD_MUST_SHOW.iter().filter(|m| !used.contains(**m)).collect();
    assert!(missing.is_empty(), "the dashboard does not show {missing:?}");
    let host_panels = targets(&dash).iter().filter(|(_, e)| e.contains("$machine_id")).count();
    assert!(host_panels >= 15, "host-row targets filtered by $machine_id: {host_panels}");
}

#[test]
fn dashboard_queries_all_return_data_from_the_agents_remote_write() {
    let machine = machine_id("dashboard");
    let dir = tempfile::tempdir().expect("tempdir");
    let receiver = Receiver::start(&[(KEY, &machine)]).expect("receiver");
    let prom = Prometheus::start(dir.path());
    // The live host (real disks, interfaces and a changing /proc/stat, so cpu_usage_percent
    // and the rates exist) with the fake NVML's two GPUs.
    let cfg = config(
        dir.path(),
        &receiver.url(),
        &machine,
        vec![rw("prometheus", &prom.remote_write_url())],
        json!({"host_root": "/"}),
    );
    let agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("agent");
    // rate() needs two samples in its window; six rounds leave room.
    let rounds = wait_until(ARRIVAL + Duration::from_secs(10), || {
        let n = prom.raw_samples(&format!("cpu_load_1m{{machine_id={machine:?}}}"), Duration::from_secs(300)).ok()?;
        let n = n.first()?.samples.len();
        (n >= 6).then_some(n)
    });
    assert!(rounds.is_some(), "no 6 rounds in Prometheus:\n{}\n{}", agent.stderr(), prom.log());
    // The machine_id variable: label_values(cpu_load_1m, machine_id) is a series lookup.
    let hosts: BTreeSet<String> = prom
        .series("cpu_load_1m", unix_now_f64() - 300.0, unix_now_f64())
        .expect("series")
        .into_iter()
        .filter_map(|l| l.get("machine_id").cloned())
        .collect();
    assert_eq!(hosts, BTreeSet::from([machine.clone()]));
    let (asked, problems) = dashboard_problems(&prom, &machine, |_| true);
    drop(agent);
    assert!(problems.is_empty(), "{} of {asked} dashboard queries failed:\n{}", problems.len(), problems.join("\n"));
    eprintln!("dashboard: {asked} queries, each with data");
}

/// Run every target of the dashboard (`which` of them) against `prom` for `machine`: how many
/// ran, and each one that errs or has no data.
fn dashboard_problems(prom: &Prometheus, machine: &str, which: impl Fn(&str) -> bool) -> (usize, Vec<String>) {
    let dash = dashboard();
    let mut problems = Vec::new();
    let mut asked = 0;
    for (title, expr) in targets(&dash).iter().filter(|(_, e)| which(e)) {
        let q = substitute(expr, machine);
        assert!(!q.contains('$'), "a template variable left in {q:?} (panel {title:?})");
        asked += 1;
        match prom.query(&q, None) {
            Err(e) => problems.push(format!("panel {title:?}: {q}: {e:#}")),
            Ok(r) if r.is_empty() => problems.push(format!("panel {title:?}: {q}: no data")),
            Ok(_) => {}
        }
    }
    (asked, problems)
}

/// The dashboard's queries on the agent's batches as the test writes them to Prometheus (the
/// dcmon output only, which works without issue 16): every target but those on the metrics
/// issue 16 adds has data.
#[test]
fn dashboard_queries_have_data_on_batches_written_by_the_test() {
    let machine = machine_id("dashboard-harness");
    let dir = tempfile::tempdir().expect("tempdir");
    let receiver = Receiver::start(&[(KEY, &machine)]).expect("receiver");
    let prom = Prometheus::start(dir.path());
    let cfg = config(dir.path(), &receiver.url(), &machine, vec![], json!({"host_root": "/"}));
    let agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("agent");
    let got = receiver.wait_for_accepted(4, ARRIVAL);
    assert!(got.len() >= 4, "{}", agent.stderr());
    drop(agent);
    let batches: Vec<Value> = got.into_iter().map(|a| a.json).collect();
    let (status, answer) =
        dcmon_tests::remote_write::push(prom.addr(), "/api/v1/write", &batches_as_series(&batches, &[])).expect("push");
    assert!((200..300).contains(&status), "{status} {answer}");
    let (asked, problems) = dashboard_problems(&prom, &machine, |e| !NEW_METRICS.iter().any(|m| e.contains(m)));
    assert!(problems.is_empty(), "{} of {asked} dashboard queries failed:\n{}", problems.len(), problems.join("\n"));
    assert!(asked >= 25, "queries run: {asked}");
    eprintln!("dashboard on batches written by the test: {asked} queries, each with data");
}
