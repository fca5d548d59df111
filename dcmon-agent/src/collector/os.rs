//! Load average, CPU usage and memory from /proc/loadavg, /proc/stat and /proc/meminfo.

use anyhow::Context as _;

use super::{CollectError, Collector};
use crate::batch::Sample;
use crate::host::{Host, OpenFile, served_from_kernel_memory};

/// This collector's row in the table ([`super::SOURCES`]).
pub const SOURCE: super::Source = super::Source {
    name: "os",
    switch: super::Switch::Always,
    caps: &[],
    section: None,
    build: Some(|host, _| Box::new(OsCollector::new(host.clone()))),
};

/// CPU time counters from the `cpu ` line of /proc/stat, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTicks {
    /// Ticks spent doing work: user, nice, system, irq, softirq, steal.
    pub busy: u64,
    /// All ticks: busy plus idle and iowait.
    pub total: u64,
}

impl CpuTicks {
    /// CPU usage in percent between `earlier` and `self`; `None` when no time has passed or
    /// the counters went backwards (CPU hot-unplug), so no value is better than a wrong one.
    pub fn usage_percent_since(self, earlier: CpuTicks) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        let busy = self.busy.checked_sub(earlier.busy)?;
        if total == 0 || busy > total {
            return None;
        }
        // Deltas past 2^53 (a corrupt file) round, and busy == total could come out a hair
        // above 100.
        #[allow(clippy::cast_precision_loss, reason = "a percentage needs no more than f64's precision")]
        Some((busy as f64 * 100.0 / total as f64).min(100.0))
    }
}

/// `cpu  user nice system idle iowait irq softirq steal guest guest_nice` (first line of
/// /proc/stat). Every field counts: iowait and idle are idle time; irq, softirq and steal are
/// busy. guest and guest_nice are already inside user and nice, so adding them would count
/// them twice (the kernel's own accounting, and psutil's).
///
/// Parsed here rather than with procfs-core's `KernelStats`, which needs every other line of
/// the file and parses each per-CPU line too; this needs the first line only.
pub fn parse_cpu_ticks(stat: &str) -> anyhow::Result<CpuTicks> {
    let line = stat.lines().next().unwrap_or_default();
    let fields = line
        .strip_prefix("cpu ")
        .ok_or_else(|| anyhow::anyhow!("expected the first line to start with \"cpu \", got {:?}", excerpt(line)))?;
    let mut ticks = [0u64; 8];
    let mut count = 0;
    for (slot, field) in ticks.iter_mut().zip(fields.split_whitespace()) {
        *slot = field
            .parse()
            .map_err(|_| anyhow::anyhow!("expected tick counts on the \"cpu\" line, got {:?}", excerpt(line)))?;
        count += 1;
    }
    if count < 4 {
        anyhow::bail!("expected at least 4 tick counts on the \"cpu\" line, got {:?}", excerpt(line));
    }
    let [user, nice, system, idle, iowait, irq, softirq, steal] = ticks;
    // Real counters are far from 2^64; a sum past it is a corrupt line, not a wrap.
    let sum = |counts: &[u64]| counts.iter().try_fold(0u64, |acc, &n| acc.checked_add(n));
    let (Some(busy), Some(total)) = (
        sum(&[user, nice, system, irq, softirq, steal]),
        sum(&[user, nice, system, irq, softirq, steal, idle, iowait]),
    ) else {
        anyhow::bail!("tick counts on the \"cpu\" line add up past 2^64, got {:?}", excerpt(line));
    };
    Ok(CpuTicks { busy, total })
}

/// `0.52 0.58 0.59 1/467 12345` (/proc/loadavg) into the three load samples. (procfs-core
/// parses these as f32, which turns 0.87 into 0.8700000047683716 on the wire.) A load average
/// is a finite number, never negative: anything else is a malformed file.
pub fn parse_loadavg(text: &str) -> anyhow::Result<[Sample; 3]> {
    let mut fields = text.split_whitespace().map(str::parse::<f64>);
    let mut next = || match fields.next() {
        Some(Ok(v)) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(anyhow::anyhow!(
            "expected three load averages of at least 0 such as \"0.52 0.58 0.59 ...\", got {:?}",
            excerpt(text)
        )),
    };
    Ok([
        Sample::gauge("cpu_load_1m", next()?),
        Sample::gauge("cpu_load_5m", next()?),
        Sample::gauge("cpu_load_15m", next()?),
    ])
}

/// The start of a line for an error message.
fn excerpt(text: &str) -> &str {
    let line = text.lines().next().unwrap_or_default();
    match line.char_indices().nth(120) {
        Some((i, _)) => &line[..i],
        None => line,
    }
}

/// Why /proc/meminfo could not be used.
#[derive(Debug, thiserror::Error)]
pub enum MeminfoError {
    /// A field the memory samples need is absent.
    #[error("no {0} line")]
    Missing(&'static str),
    /// A field is not `<number> kB`.
    #[error("field {field}: expected a number of kB, got {got:?}")]
    Value {
        /// The field name.
        field: &'static str,
        /// What was there (truncated).
        got: String,
    },
}

/// `MemTotal:  8136412 kB` ... (/proc/meminfo) into the four memory samples. `used` is
/// total minus available, the memory that cannot be reclaimed without swapping (what `free`
/// shows as used since procps 3.3.10).
///
/// Parsed by hand rather than with procfs-core's `Meminfo`, which hashes all ~55 lines into a
/// map every call: 157k instructions a cycle, a third of the agent's userspace work, where the
/// five fields needed come first and take a few thousand.
pub fn parse_meminfo(text: &str) -> Result<[Sample; 4], MeminfoError> {
    const FIELDS: [&str; 5] = ["MemTotal", "MemFree", "MemAvailable", "Buffers", "Cached"];
    let mut values: [Option<u64>; 5] = [None; 5];
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else { continue };
        let Some(i) = FIELDS.iter().position(|f| *f == key) else { continue };
        let mut words = rest.split_whitespace();
        let bytes = match (words.next().and_then(|n| n.parse::<u64>().ok()), words.next(), words.next()) {
            (Some(n), Some("kB"), None) => n.checked_mul(1024),
            (Some(n), None, None) => Some(n),
            _ => None,
        };
        values[i] =
            Some(bytes.ok_or_else(|| MeminfoError::Value {
                field: FIELDS[i],
                got: rest.trim().chars().take(40).collect(),
            })?);
        if values.iter().all(Option::is_some) {
            break;
        }
    }
    let get = |i: usize| values[i].ok_or(MeminfoError::Missing(FIELDS[i]));
    let total = get(0)?;
    // Kernels before 3.14 have no MemAvailable; free + buffers + cache is what tools used then.
    let available = match values[2] {
        Some(a) => a,
        None => get(1)?.saturating_add(get(3)?).saturating_add(get(4)?),
    }
    .min(total);
    let used = total - available;
    #[allow(clippy::cast_precision_loss, reason = "memory sizes are far below 2^52")]
    // used <= total, so anything over 100 is the rounding of the product: cut it off.
    let used_percent = (used as f64 * 100.0 / total as f64).min(100.0);
    Ok([
        Sample::count("memory_total_bytes", total),
        Sample::count("memory_available_bytes", available),
        Sample::count("memory_used_bytes", used),
        // NaN when MemTotal is 0 (a broken fixture); the batch drops and counts it.
        Sample::gauge("memory_usage_percent", used_percent),
    ])
}

/// Load, CPU usage and memory.
#[derive(Debug)]
pub struct OsCollector {
    stat: OpenFile,
    loadavg: OpenFile,
    meminfo: OpenFile,
    buf: String,
    prev_cpu: Option<CpuTicks>,
    /// Whether the files are all on procfs (see [`served_from_kernel_memory`]).
    inline: bool,
}

impl OsCollector {
    /// Takes the first CPU sample now, so that the first collection already reports
    /// `cpu_usage_percent`.
    pub fn new(host: Host) -> Self {
        let mut c = Self {
            stat: OpenFile::new(&host, "/proc/stat"),
            loadavg: OpenFile::new(&host, "/proc/loadavg"),
            meminfo: OpenFile::new(&host, "/proc/meminfo"),
            buf: String::new(),
            prev_cpu: None,
            inline: false,
        };
        c.inline = served_from_kernel_memory(SOURCE.name, [c.stat.path(), c.loadavg.path(), c.meminfo.path()]);
        c.prev_cpu = c.read_cpu().ok();
        c
    }

    fn read_cpu(&mut self) -> anyhow::Result<CpuTicks> {
        self.stat.read_into(&mut self.buf)?;
        parse_cpu_ticks(&self.buf).with_context(|| format!("parsing {}", self.stat.path().display()))
    }

    fn collect_load(&mut self, out: &mut Vec<Sample>) -> anyhow::Result<()> {
        self.loadavg.read_into(&mut self.buf)?;
        let samples = parse_loadavg(&self.buf).with_context(|| format!("parsing {}", self.loadavg.path().display()))?;
        out.extend(samples);
        Ok(())
    }

    fn collect_cpu(&mut self, out: &mut Vec<Sample>) -> anyhow::Result<()> {
        let now = self.read_cpu()?;
        if let Some(pct) = self.prev_cpu.and_then(|prev| now.usage_percent_since(prev)) {
            out.push(Sample::gauge("cpu_usage_percent", pct));
        }
        self.prev_cpu = Some(now);
        Ok(())
    }

    fn collect_memory(&mut self, out: &mut Vec<Sample>) -> anyhow::Result<()> {
        self.meminfo.read_into(&mut self.buf)?;
        let samples = parse_meminfo(&self.buf).with_context(|| format!("parsing {}", self.meminfo.path().display()))?;
        out.extend(samples);
        Ok(())
    }
}

impl Collector for OsCollector {
    fn name(&self) -> &'static str {
        SOURCE.name
    }

    /// Not when its files are on procfs: the kernel serves them from memory.
    fn may_block(&self) -> bool {
        !self.inline
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        // Each file is independent: a failure in one must not hide the others.
        let results = [self.collect_load(out), self.collect_cpu(out), self.collect_memory(out)];
        let mut errors = results.into_iter().filter_map(Result::err);
        match errors.next() {
            None => Ok(()),
            Some(first) => {
                let rest: Vec<String> = errors.map(|e| format!("{e:#}")).collect();
                Err(if rest.is_empty() { first } else { first.context(rest.join("; ")) }.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Fuzz finding: equal busy and total deltas past 2^53 gave 100.00000000000001.
    #[test]
    fn huge_equal_deltas_are_exactly_100_percent() {
        let earlier = CpuTicks { busy: 3, total: 3 };
        let later = CpuTicks { busy: 800_000_007_374_674_407, total: 800_000_007_374_674_407 };
        assert_eq!(later.usage_percent_since(earlier), Some(100.0));
    }

    use super::*;
    use std::path::Path;

    #[test]
    fn cpu_usage_counts_every_field() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let a = parse_cpu_ticks("cpu  100 0 50 800 40 5 5 0 30 0\n").expect("a");
        let b = parse_cpu_ticks("cpu  160 0 70 900 80 10 10 10 60 0\n").expect("b");
        assert_eq!(a, CpuTicks { busy: 160, total: 1000 });
        // busy delta: 60 user + 20 system + 5 irq + 5 softirq + 10 steal = 100;
        // idle delta: 100 idle + 40 iowait = 140; guest is inside user and not added again.
        assert_eq!(b.usage_percent_since(a), Some(100.0 * 100.0 / 240.0));
        assert_eq!(a.usage_percent_since(a), None, "no time passed");
        assert_eq!(a.usage_percent_since(b), None, "counters went backwards");
    }

    #[test]
    fn loadavg_keeps_decimal_values_exact() {
        let s = parse_loadavg("0.87 0.38 0.17 1/467 12345\n").expect("loadavg");
        assert_eq!(s.map(|s| s.value), [0.87, 0.38, 0.17].map(crate::batch::Value::Gauge));
    }

    #[test]
    fn old_kernel_cpu_line_with_four_fields() {
        let t = parse_cpu_ticks("cpu  10 20 30 40\n").expect("short line");
        assert_eq!(t, CpuTicks { busy: 60, total: 100 });
    }

    #[test]
    fn meminfo_without_memavailable_uses_free_buffers_cached() {
        let text = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 50 kB\nCached: 250 kB\nSwapCached: 0 kB\n\
                    Active: 0 kB\nInactive: 0 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\nDirty: 0 kB\n\
                    Writeback: 0 kB\nMapped: 0 kB\nSlab: 0 kB\nCommitLimit: 0 kB\nCommitted_AS: 0 kB\n\
                    VmallocTotal: 0 kB\nVmallocUsed: 0 kB\nVmallocChunk: 0 kB\nAnonPages: 0 kB\nShmem: 0 kB\n\
                    KernelStack: 0 kB\nPageTables: 0 kB\nNFS_Unstable: 0 kB\nBounce: 0 kB\nWritebackTmp: 0 kB\n";
        match parse_meminfo(text) {
            Ok(s) => {
                assert_eq!(s[1].value, crate::batch::Value::Count(400 * 1024));
                assert_eq!(s[2].value, crate::batch::Value::Count(600 * 1024));
            }
            Err(e) => panic!("old meminfo should parse: {e}"),
        }
    }

    /// Each error says what was expected and quotes what was there.
    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let loadavg = |got: &str| {
            format!("expected three load averages of at least 0 such as \"0.52 0.58 0.59 ...\", got {got:?}")
        };
        assert_eq!(parse_loadavg("not a loadavg").expect_err("words").to_string(), loadavg("not a loadavg"));
        assert_eq!(parse_loadavg("0.5 0.4\n").expect_err("two fields").to_string(), loadavg("0.5 0.4"));
        assert_eq!(
            parse_cpu_ticks("cpu  x y z 1\n").expect_err("words").to_string(),
            "expected tick counts on the \"cpu\" line, got \"cpu  x y z 1\""
        );
        assert_eq!(
            parse_cpu_ticks("cpu  1 2 3\n").expect_err("three fields").to_string(),
            "expected at least 4 tick counts on the \"cpu\" line, got \"cpu  1 2 3\""
        );
        assert_eq!(
            parse_cpu_ticks("intr 1 2 3 4\n").expect_err("another line").to_string(),
            "expected the first line to start with \"cpu \", got \"intr 1 2 3 4\""
        );
        assert_eq!(
            parse_meminfo("MemTotal: lots\n").expect_err("a word").to_string(),
            "field MemTotal: expected a number of kB, got \"lots\""
        );
    }

    #[test]
    fn meminfo_errors_name_the_field() {
        let e = parse_meminfo("MemTotal: 12 MB\nMemAvailable: 1 kB\n").expect_err("unit");
        assert_eq!(e.to_string(), "field MemTotal: expected a number of kB, got \"12 MB\"");
        let e = parse_meminfo("MemFree: 1 kB\nMemAvailable: 1 kB\n").expect_err("no total");
        assert_eq!(e.to_string(), "no MemTotal line");
        let e = parse_meminfo("MemTotal: 10 kB\nMemFree: 1 kB\n").expect_err("nothing to compute available from");
        assert_eq!(e.to_string(), "no Buffers line");
    }

    /// Real /proc is read inline; a fixture tree (ext4 or tmpfs, like a FUSE mount: not kernel
    /// memory) is read on a thread under the collector timeout.
    #[test]
    fn reads_inline_only_from_procfs() {
        assert!(!OsCollector::new(Host::default()).may_block(), "/proc is procfs");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("proc")).expect("mkdir");
        for (name, text) in [("stat", "cpu  1 2 3 4\n"), ("loadavg", "0.1 0.2 0.3 1/2 3\n"), ("meminfo", "")] {
            std::fs::write(dir.path().join("proc").join(name), text).expect("write");
        }
        assert!(OsCollector::new(Host::new(dir.path())).may_block(), "a fixture tree is not procfs");
    }

    #[test]
    fn meminfo_matches_procfs_core_on_this_host() {
        use procfs_core::FromRead as _;
        let text = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
        let reference = procfs_core::Meminfo::from_read(text.as_bytes()).expect("procfs-core");
        let s = parse_meminfo(&text).expect("parse");
        assert_eq!(s[0].value, crate::batch::Value::Count(reference.mem_total));
        let available = reference.mem_available.expect("MemAvailable since 3.14").min(reference.mem_total);
        assert_eq!(s[1].value, crate::batch::Value::Count(available));
    }

    /// A fake /proc under a host root, holding `loadavg` and this host's stat and meminfo.
    fn fake_proc(loadavg: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("proc")).expect("mkdir");
        std::fs::write(root.path().join("proc/loadavg"), loadavg).expect("write");
        for f in ["stat", "meminfo"] {
            std::fs::copy(Path::new("/proc").join(f), root.path().join("proc").join(f)).expect("copy");
        }
        root
    }

    #[test]
    fn negative_or_not_finite_load_is_malformed_naming_the_file() {
        for bad in ["-1.0 0.5 0.5 1/2 3\n", "0.5 -0.01 0.5 1/2 3\n", "0.5 0.5 NaN 1/2 3\n", "inf 0.5 0.5 1/2 3\n"] {
            let root = fake_proc(bad);
            let mut c = OsCollector::new(Host::new(root.path()));
            let mut out = Vec::new();
            let err = c.collect(&mut out).expect_err(bad);
            let msg = format!("{err:#}");
            let path = root.path().join("proc/loadavg");
            assert!(msg.contains(&format!("parsing {}", path.display())), "{bad}: {msg}");
            assert!(msg.contains("at least 0"), "{bad}: {msg}");
            assert!(!out.iter().any(|s| s.name.starts_with("cpu_load")), "{bad}: {out:?}");
            assert!(out.iter().any(|s| s.name == "memory_total_bytes"), "the other files are still read");
        }
        let root = fake_proc("0.00 0.01 2.50 1/2 3\n");
        let mut out = Vec::new();
        OsCollector::new(Host::new(root.path())).collect(&mut out).expect("a zero load is fine");
        assert_eq!(out.iter().filter(|s| s.name.starts_with("cpu_load")).count(), 3);
    }

    #[test]
    fn an_unreadable_file_says_why_once() {
        let root = fake_proc("0.5 0.5 0.5 1/2 3\n");
        std::fs::remove_file(root.path().join("proc/loadavg")).expect("rm");
        std::fs::create_dir(root.path().join("proc/loadavg")).expect("a directory where the file was");
        let err = OsCollector::new(Host::new(root.path())).collect(&mut Vec::new()).expect_err("a directory");
        let msg = format!("{err:#}");
        assert_eq!(msg.matches("directory").count(), 1, "{msg}");
        assert!(msg.contains("proc/loadavg"), "{msg}");
    }

    #[test]
    fn a_fully_busy_interval_is_100_percent() {
        let a = CpuTicks { busy: 100, total: 1000 };
        let b = CpuTicks { busy: 300, total: 1200 };
        assert_eq!(b.usage_percent_since(a), Some(100.0));
        let half = CpuTicks { busy: 400, total: 1400 };
        assert_eq!(half.usage_percent_since(b), Some(50.0));
    }

    #[test]
    fn idle_going_backwards_never_gives_more_than_100_percent() {
        // busy +100 but idle -60 (an iowait counter that stepped back): total grew by 40 only.
        let a = CpuTicks { busy: 100, total: 1000 };
        let b = CpuTicks { busy: 200, total: 1040 };
        assert_eq!(b.usage_percent_since(a), None);
        // Busy going backwards with total growing is no value either.
        assert_eq!(CpuTicks { busy: 50, total: 1100 }.usage_percent_since(a), None);
    }

    #[test]
    fn meminfo_values_without_a_unit_are_bytes() {
        let s = parse_meminfo("MemTotal: 1000\nMemFree: 10\nMemAvailable: 400\nBuffers: 0\nCached: 0\n")
            .expect("unitless values");
        let values: Vec<_> = s.iter().map(|s| s.value).collect();
        use crate::batch::Value::{Count, Gauge};
        assert_eq!(values, [Count(1000), Count(400), Count(600), Gauge(60.0)]);
        // Mixed with kB lines, each line is read in its own unit.
        let s = parse_meminfo("MemTotal: 2 kB\nMemAvailable: 1024\n").expect("mixed");
        assert_eq!((s[0].value, s[1].value), (Count(2048), Count(1024)));
    }

    #[test]
    fn cpu_line_errors_quote_the_line() {
        let e = parse_cpu_ticks("cpu  x y z 1\n").expect_err("not numbers");
        assert_eq!(e.to_string(), "expected tick counts on the \"cpu\" line, got \"cpu  x y z 1\"");
        let e = parse_cpu_ticks("cpu  1 2 3\ncpu0 1 2 3 4\n").expect_err("too few");
        assert_eq!(e.to_string(), "expected at least 4 tick counts on the \"cpu\" line, got \"cpu  1 2 3\"");
        let e = parse_cpu_ticks("intr 1 2 3 4\n").expect_err("not the cpu line");
        assert_eq!(e.to_string(), "expected the first line to start with \"cpu \", got \"intr 1 2 3 4\"");
        // A long line is cut to its first 120 characters.
        let long = format!("cpu  {}", "9".repeat(200) + "x");
        let e = parse_cpu_ticks(&long).expect_err("not a number").to_string();
        assert!(e.contains(&format!("\"{}\"", &long[..120])), "{e}");
        assert!(!e.contains(&long[..121]), "{e}");
    }

    /// A host tree with the three files this collector reads.
    fn os_host(stat: &str, loadavg: &str, meminfo: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("proc")).expect("mkdir");
        for (name, text) in [("stat", stat), ("loadavg", loadavg), ("meminfo", meminfo)] {
            std::fs::write(dir.path().join("proc").join(name), text).expect("write");
        }
        dir
    }

    #[test]
    fn collect_errors_name_each_file_and_quote_what_was_there() {
        const STAT: &str = "cpu  1 2 3 4 5 6 7 8 0 0\n";
        const MEMINFO: &str = "MemTotal: 1000 kB\nMemAvailable: 400 kB\n";
        let dir = os_host(STAT, "garbage here\n", MEMINFO);
        let mut c = OsCollector::new(Host::new(dir.path()));
        let mut out = Vec::new();
        let e = format!("{:#}", c.collect(&mut out).expect_err("bad loadavg"));
        let loadavg = dir.path().join("proc/loadavg");
        assert!(e.contains(&format!("parsing {}", loadavg.display())) && e.contains("\"garbage here\""), "{e}");
        // The other files still gave their samples.
        let names: Vec<_> = out.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            ["memory_total_bytes", "memory_available_bytes", "memory_used_bytes", "memory_usage_percent"]
        );

        let dir = os_host("intr 5 6\n", "0.5 0.4 0.3 1/2 3\n", "MemTotal: 12 MB\n");
        let mut c = OsCollector::new(Host::new(dir.path()));
        let e = format!("{:#}", c.collect(&mut Vec::new()).expect_err("bad stat and meminfo"));
        let (stat, meminfo) = (dir.path().join("proc/stat"), dir.path().join("proc/meminfo"));
        assert!(e.contains(&format!("parsing {}", stat.display())) && e.contains("\"intr 5 6\""), "{e}");
        assert!(e.contains(&format!("parsing {}", meminfo.display())) && e.contains("\"12 MB\""), "{e}");
    }

    /// Found by the `proc_loadavg` fuzz target: a number too large for f64 parses as infinity.
    #[test]
    fn loadavg_out_of_range_is_an_error_not_infinity() {
        let e = parse_loadavg("\r\r\r1\r11010E10013010\r0413 8 8841182\n").expect_err("infinite load");
        assert!(e.to_string().contains("expected three load averages"), "{e}");
        for text in ["inf 0.1 0.1 1/2 3\n", "0.1 NaN 0.1 1/2 3\n", "0.1 0.1 1e999 1/2 3\n"] {
            let e = parse_loadavg(text).expect_err(text).to_string();
            assert!(
                e.starts_with("expected three load averages") && e.ends_with(&format!("{:?}", text.trim_end())),
                "{e}"
            );
        }
    }

    #[test]
    fn tick_counts_that_overflow_when_added_are_an_error() {
        let e = parse_cpu_ticks("cpu  18446744073709551615 1 0 0\n").expect_err("busy overflows");
        assert!(e.to_string().contains("\"cpu  18446744073709551615 1 0 0\""), "{e}");
        let e = parse_cpu_ticks("cpu  1 0 0 18446744073709551615\n").expect_err("total overflows");
        assert_eq!(
            e.to_string(),
            "tick counts on the \"cpu\" line add up past 2^64, got \"cpu  1 0 0 18446744073709551615\""
        );
    }

    #[test]
    fn all_memory_used_on_a_huge_total_is_100_percent_not_more() {
        // Found by the proc_meminfo fuzz target: used * 100 / total rounded to 100.00000000000001.
        let s = parse_meminfo("MemTotal: 11958905849172840 kB\nMemAvailable: 00 kB\nB):   ").expect("parses");
        assert_eq!(s[3].value, crate::batch::Value::Gauge(100.0), "{s:?}");
    }
}
