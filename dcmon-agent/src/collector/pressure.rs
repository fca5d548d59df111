//! Pressure stall information (PSI) from /proc/pressure/{cpu,memory,io}: the total time some
//! or all runnable tasks were stalled on each resource, as counters in seconds.

use super::attr::{excerpt, round_result};
use super::{CollectError, Collector};
use crate::batch::Sample;
use crate::host::{Host, OpenFile, served_from_kernel_memory};

/// This collector's row in the table ([`super::SOURCES`]).
pub const SOURCE: super::Source = super::Source {
    name: "pressure",
    switch: super::Switch::Exporter { default: true },
    caps: &[],
    section: None,
    build: Some(|host, _| Box::new(PressureCollector::new(host))),
};

/// The resources reported, each a file under /proc/pressure.
pub const RESOURCES: [&str; 3] = ["cpu", "memory", "io"];

/// The two totals of one /proc/pressure file, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pressure {
    /// Time at least one task was stalled (`some total=`).
    pub some_us: u64,
    /// Time all non-idle tasks were stalled (`full total=`); `None` where the kernel has no
    /// `full` line (cpu before Linux 5.13).
    pub full_us: Option<u64>,
}

/// ```text
/// some avg10=0.00 avg60=0.00 avg300=0.00 total=12345
/// full avg10=0.00 avg60=0.00 avg300=0.00 total=678
/// ```
/// (/proc/pressure/RESOURCE) into its two totals.
pub fn parse_pressure(text: &str) -> anyhow::Result<Pressure> {
    let (mut some, mut full) = (None, None);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut words = line.split_whitespace();
        let slot = match words.next() {
            Some("some") => &mut some,
            Some("full") => &mut full,
            _ => anyhow::bail!("expected lines starting with \"some\" or \"full\", got {:?}", excerpt(line)),
        };
        let total = words.find_map(|w| w.strip_prefix("total=")).and_then(|t| t.parse::<u64>().ok());
        *slot = Some(total.ok_or_else(|| {
            anyhow::anyhow!("expected \"total=<microseconds>\" on the line, got {:?}", excerpt(line))
        })?);
    }
    let some_us = some.ok_or_else(|| anyhow::anyhow!("expected a \"some\" line, got {:?}", excerpt(text)))?;
    Ok(Pressure { some_us, full_us: full })
}

impl Pressure {
    /// The samples of `resource`.
    pub fn samples(&self, resource: &str) -> impl Iterator<Item = Sample> {
        #[allow(clippy::cast_precision_loss, reason = "2^53 microseconds is 285 years")]
        let seconds = |us: u64| us as f64 / 1e6;
        let some = Sample::gauge("pressure_some_seconds_total", seconds(self.some_us)).label("resource", resource);
        let full = self
            .full_us
            .map(|us| Sample::gauge("pressure_full_seconds_total", seconds(us)).label("resource", resource));
        std::iter::once(some).chain(full)
    }
}

/// PSI totals of cpu, memory and io.
#[derive(Debug)]
pub struct PressureCollector {
    files: Vec<(&'static str, OpenFile)>,
    buf: String,
    inline: bool,
}

impl PressureCollector {
    /// A collector reading `host`'s /proc/pressure.
    pub fn new(host: &Host) -> Self {
        let files: Vec<_> =
            RESOURCES.iter().map(|r| (*r, OpenFile::new(host, format!("/proc/pressure/{r}")))).collect();
        let inline = served_from_kernel_memory(SOURCE.name, files.iter().map(|(_, f)| f.path()));
        Self { files, buf: String::new(), inline }
    }
}

impl Collector for PressureCollector {
    fn name(&self) -> &'static str {
        SOURCE.name
    }

    fn may_block(&self) -> bool {
        !self.inline
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        let mut errors = Vec::new();
        let mut absent = 0;
        for (resource, file) in &mut self.files {
            match file.read_into(&mut self.buf) {
                Ok(()) => match parse_pressure(&self.buf) {
                    Ok(p) => out.extend(p.samples(resource)),
                    Err(e) => errors.push(e.context(format!("parsing {}", file.path().display()))),
                },
                // No /proc/pressure (before Linux 4.20, or CONFIG_PSI off), or PSI disabled at
                // boot (`psi=0`: the files answer EOPNOTSUPP).
                Err(e) if e.is_not_found() || e.error.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    absent += 1;
                    errors.push(e.into());
                }
                Err(e) => errors.push(e.into()),
            }
        }
        if absent == self.files.len() {
            let first = errors.into_iter().next().map(|e| format!("{e:#}")).unwrap_or_default();
            return Err(CollectError::NotPresent(format!("no pressure stall information (PSI): {first}")));
        }
        round_result(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Value;

    #[test]
    fn parses_some_and_full() {
        let text = "some avg10=98.21 avg60=96.40 avg300=94.49 total=1145880517\n\
                    full avg10=0.00 avg60=0.00 avg300=0.00 total=3947465\n";
        let p = parse_pressure(text).expect("parse");
        assert_eq!(p, Pressure { some_us: 1_145_880_517, full_us: Some(3_947_465) });
        let s: Vec<_> = p.samples("io").collect();
        assert_eq!(s[0].value, Value::Gauge(1145.880517));
        assert_eq!(s[1].value, Value::Gauge(3.947465));
        assert_eq!(s[1].labels, [("resource", "io".into())]);
        assert_eq!((s[0].name, s[1].name), ("pressure_some_seconds_total", "pressure_full_seconds_total"));
    }

    #[test]
    fn cpu_before_5_13_has_no_full_line() {
        let p = parse_pressure("some avg10=0.00 avg60=0.00 avg300=0.00 total=42\n").expect("parse");
        assert_eq!(p, Pressure { some_us: 42, full_us: None });
        assert_eq!(p.samples("cpu").count(), 1);
    }

    #[test]
    fn malformed_files_say_what_was_expected() {
        let e = parse_pressure("some avg10=0.00 total=x\n").expect_err("bad total");
        assert_eq!(e.to_string(), "expected \"total=<microseconds>\" on the line, got \"some avg10=0.00 total=x\"");
        let e = parse_pressure("partial avg10=0.00 total=1\n").expect_err("bad key");
        assert!(e.to_string().starts_with("expected lines starting with \"some\" or \"full\""), "{e}");
        let e = parse_pressure("full avg10=0.00 total=1\n").expect_err("no some");
        assert!(e.to_string().starts_with("expected a \"some\" line"), "{e}");
        assert!(parse_pressure("").is_err());
    }

    #[test]
    fn reads_this_host_or_says_it_has_no_psi() {
        let mut c = PressureCollector::new(&Host::default());
        assert!(!c.may_block(), "/proc is procfs");
        let mut out = Vec::new();
        match c.collect(&mut out) {
            Ok(()) => {
                let resources: Vec<&str> = out
                    .iter()
                    .filter(|s| s.name == "pressure_some_seconds_total")
                    .map(|s| s.labels[0].1.as_str())
                    .collect();
                assert_eq!(resources, RESOURCES);
                // The same numbers the files hold, read independently (they only grow).
                for (r, s) in RESOURCES.iter().zip(out.iter().filter(|s| s.name == "pressure_some_seconds_total")) {
                    let text = std::fs::read_to_string(format!("/proc/pressure/{r}")).expect("read");
                    let later = parse_pressure(&text).expect("parse").some_us as f64 / 1e6;
                    assert!(s.value.as_f64() <= later && s.value.as_f64() > 0.0, "{r}: {s:?} vs {later}");
                }
            }
            Err(CollectError::NotPresent(why)) => {
                assert!(!std::path::Path::new("/proc/pressure/cpu").exists(), "{why}");
            }
            Err(e) => panic!("{e:#}"),
        }
    }

    #[test]
    fn a_missing_tree_is_not_present_and_a_bad_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = PressureCollector::new(&Host::new(dir.path()));
        assert!(matches!(c.collect(&mut Vec::new()), Err(CollectError::NotPresent(_))));
        let p = dir.path().join("proc/pressure");
        std::fs::create_dir_all(&p).expect("mkdir");
        std::fs::write(p.join("cpu"), "some avg10=0.00 avg60=0.00 avg300=0.00 total=5000000\n").expect("w");
        std::fs::write(p.join("memory"), "garbage\n").expect("w");
        std::fs::write(p.join("io"), "some total=1\nfull total=2\n").expect("w");
        let mut out = Vec::new();
        let e = format!("{:#}", PressureCollector::new(&Host::new(dir.path())).collect(&mut out).expect_err("bad"));
        assert!(e.contains(&format!("parsing {}", p.join("memory").display())) && e.contains("\"garbage\""), "{e}");
        let got: Vec<(&str, f64)> = out.iter().map(|s| (s.name, s.value.as_f64())).collect();
        assert_eq!(
            got,
            [
                ("pressure_some_seconds_total", 5.0),
                ("pressure_some_seconds_total", 0.000001),
                ("pressure_full_seconds_total", 0.000002)
            ]
        );
    }
}
