//! Memory errors from EDAC (/sys/devices/system/edac/mc/mcN/): correctable and uncorrectable
//! counts per memory controller, per DIMM (`dimmN/` or `rankN/`, with the DIMM's label) and,
//! on drivers that have only the older layout, per chip-select row and channel (`csrowN/`).
//! A DIMM logs correctable errors for weeks before it fails.
//!
//! The counts are kernel memory: this runs inline. Controllers and DIMMs are listed again
//! every [`RELIST_EVERY`].

use super::attr::{RELIST_EVERY, Relist, is_gone, natural_cmp, parse_u64, round_result, sorted_names};
use super::{CollectError, Collector};
use crate::batch::{Labels, Sample};
use crate::host::{Host, served_from_kernel_memory};

/// This collector's row in the table ([`super::SOURCES`]).
pub const SOURCE: super::Source = super::Source {
    name: "edac",
    switch: super::Switch::Exporter { default: true },
    caps: &[],
    section: None,
    build: Some(|host, _| Box::new(EdacCollector::new(host.clone()))),
};

const MC_DIR: &str = "/sys/devices/system/edac/mc";

/// Per controller: the file and its metric.
pub const CONTROLLER_FILES: [(&str, &str); 4] = [
    ("ce_count", "edac_correctable_errors_total"),
    ("ue_count", "edac_uncorrectable_errors_total"),
    ("ce_noinfo_count", "edac_correctable_noinfo_errors_total"),
    ("ue_noinfo_count", "edac_uncorrectable_noinfo_errors_total"),
];

/// One file to read each round: where, the metric, its labels.
#[derive(Debug)]
struct Counter {
    /// Host path, under [`MC_DIR`].
    path: String,
    metric: &'static str,
    labels: Labels,
}

/// The trailing number of `dimm12`, `csrow0`, `ch1_ce_count`.
fn index(name: &str, prefix: &str) -> Option<String> {
    let rest = name.strip_prefix(prefix)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (!digits.is_empty()).then_some(digits)
}

/// Memory controller and DIMM error counts.
#[derive(Debug)]
pub struct EdacCollector {
    host: Host,
    counters: Vec<Counter>,
    relist: Relist,
    buf: String,
    inline: bool,
}

impl EdacCollector {
    /// A collector reading `host`'s EDAC tree.
    pub fn new(host: Host) -> Self {
        let inline = served_from_kernel_memory(SOURCE.name, [host.path(MC_DIR).as_path()]);
        Self { host, counters: Vec::new(), relist: Relist::new(RELIST_EVERY), buf: String::new(), inline }
    }

    /// A label file's text, trimmed; empty when unreadable.
    fn label(&self, path: &str) -> String {
        self.host.read_to_string(path).map(|t| t.trim().to_owned()).unwrap_or_default()
    }

    fn list(&mut self) -> Result<(), CollectError> {
        let first = self.relist.is_first();
        self.relist.done();
        let mut counters = Vec::new();
        let exists = |p: &str| self.host.path(p).exists();
        for mc in sorted_names(&self.host, MC_DIR)? {
            let Some(controller) = index(&mc, "mc") else { continue };
            let dir = format!("{MC_DIR}/{mc}");
            for (file, metric) in CONTROLLER_FILES {
                let path = format!("{dir}/{file}");
                if exists(&path) {
                    counters.push(Counter {
                        path,
                        metric,
                        labels: vec![("controller", controller.as_str().into())].into(),
                    });
                }
            }
            let names = sorted_names(&self.host, &dir).unwrap_or_default();
            let dimms: Vec<(&String, String)> = names
                .iter()
                .filter_map(|n| index(n, "dimm").or_else(|| index(n, "rank")).map(|i| (n, i)))
                .filter(|(n, _)| exists(&format!("{dir}/{n}/dimm_ce_count")))
                .collect();
            for (name, dimm) in &dimms {
                let label = self.label(&format!("{dir}/{name}/dimm_label"));
                for (file, metric) in [
                    ("dimm_ce_count", "edac_dimm_correctable_errors_total"),
                    ("dimm_ue_count", "edac_dimm_uncorrectable_errors_total"),
                ] {
                    let path = format!("{dir}/{name}/{file}");
                    if exists(&path) {
                        let labels = vec![
                            ("controller", controller.as_str().into()),
                            ("dimm", dimm.as_str().into()),
                            ("label", label.as_str().into()),
                        ];
                        counters.push(Counter { path, metric, labels: labels.into() });
                    }
                }
            }
            if !dimms.is_empty() {
                continue;
            }
            // The older layout only: per chip-select row, correctable per channel.
            for csrow_dir in names.iter().filter(|n| index(n, "csrow").is_some()) {
                let Some(csrow) = index(csrow_dir, "csrow") else { continue };
                let row = format!("{dir}/{csrow_dir}");
                let mut files = sorted_names(&self.host, &row).unwrap_or_default();
                files.sort_by(|a, b| natural_cmp(a, b));
                for file in files.iter().filter(|f| f.starts_with("ch") && f.ends_with("_ce_count")) {
                    let Some(channel) = index(file, "ch") else { continue };
                    let label = self.label(&format!("{row}/ch{channel}_dimm_label"));
                    let labels = vec![
                        ("controller", controller.as_str().into()),
                        ("csrow", csrow.as_str().into()),
                        ("channel", channel.into()),
                        ("label", label.into()),
                    ];
                    counters.push(Counter {
                        path: format!("{row}/{file}"),
                        metric: "edac_csrow_correctable_errors_total",
                        labels: labels.into(),
                    });
                }
                let path = format!("{row}/ue_count");
                if exists(&path) {
                    let labels = vec![("controller", controller.as_str().into()), ("csrow", csrow.as_str().into())];
                    counters.push(Counter {
                        path,
                        metric: "edac_csrow_uncorrectable_errors_total",
                        labels: labels.into(),
                    });
                }
            }
        }
        self.counters = counters;
        if first && self.counters.is_empty() {
            return Err(CollectError::NotPresent("no EDAC memory controller".to_owned()));
        }
        Ok(())
    }
}

impl Collector for EdacCollector {
    fn name(&self) -> &'static str {
        SOURCE.name
    }

    fn may_block(&self) -> bool {
        !self.inline
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        if self.relist.is_due() {
            self.list()?;
        }
        let mut errors = Vec::new();
        let mut gone = false;
        for c in &self.counters {
            match self.host.read_into(&c.path, &mut self.buf) {
                Ok(()) => match parse_u64(&self.buf) {
                    Ok(v) => out.push(Sample {
                        name: c.metric,
                        value: crate::batch::Value::Count(v),
                        labels: c.labels.clone(),
                    }),
                    Err(e) => errors.push(e.context(format!("parsing {}", self.host.path(&c.path).display()))),
                },
                Err(e) if is_gone(&e) => gone = true,
                Err(e) => errors.push(e.into()),
            }
        }
        if gone || !errors.is_empty() {
            self.relist.soon();
        }
        round_result(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Value;

    fn write(root: &std::path::Path, files: &[(&str, &str)]) {
        for (rel, text) in files {
            let p = root.join("sys/devices/system/edac/mc").join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, format!("{text}\n")).expect("write");
        }
    }

    fn got(out: &[Sample]) -> Vec<(&str, Value, Vec<String>)> {
        out.iter().map(|s| (s.name, s.value, s.labels.iter().map(|(_, v)| v.to_string()).collect())).collect()
    }

    #[test]
    fn controllers_and_dimms_with_their_labels() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            &[
                ("mc0/ce_count", "7"),
                ("mc0/ue_count", "1"),
                ("mc0/ce_noinfo_count", "2"),
                ("mc0/ue_noinfo_count", "0"),
                ("mc0/dimm0/dimm_label", "CPU_SrcID#0_MC#0_Chan#0_DIMM#0"),
                ("mc0/dimm0/dimm_ce_count", "5"),
                ("mc0/dimm0/dimm_ue_count", "1"),
                ("mc0/dimm10/dimm_label", "CPU_SrcID#0_MC#0_Chan#5_DIMM#0"),
                ("mc0/dimm10/dimm_ce_count", "0"),
                ("mc0/dimm10/dimm_ue_count", "0"),
                ("mc0/dimm2/dimm_ce_count", "0"),
                ("mc0/dimm2/dimm_ue_count", "0"),
                // Ignored: dimm directories exist.
                ("mc0/csrow0/ch0_ce_count", "9"),
            ],
        );
        let mut out = Vec::new();
        EdacCollector::new(Host::new(dir.path())).collect(&mut out).expect("collect");
        let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            got(&out),
            [
                ("edac_correctable_errors_total", Value::Count(7), s(&["0"])),
                ("edac_uncorrectable_errors_total", Value::Count(1), s(&["0"])),
                ("edac_correctable_noinfo_errors_total", Value::Count(2), s(&["0"])),
                ("edac_uncorrectable_noinfo_errors_total", Value::Count(0), s(&["0"])),
                (
                    "edac_dimm_correctable_errors_total",
                    Value::Count(5),
                    s(&["0", "0", "CPU_SrcID#0_MC#0_Chan#0_DIMM#0"])
                ),
                (
                    "edac_dimm_uncorrectable_errors_total",
                    Value::Count(1),
                    s(&["0", "0", "CPU_SrcID#0_MC#0_Chan#0_DIMM#0"])
                ),
                ("edac_dimm_correctable_errors_total", Value::Count(0), s(&["0", "2", ""])),
                ("edac_dimm_uncorrectable_errors_total", Value::Count(0), s(&["0", "2", ""])),
                (
                    "edac_dimm_correctable_errors_total",
                    Value::Count(0),
                    s(&["0", "10", "CPU_SrcID#0_MC#0_Chan#5_DIMM#0"])
                ),
                (
                    "edac_dimm_uncorrectable_errors_total",
                    Value::Count(0),
                    s(&["0", "10", "CPU_SrcID#0_MC#0_Chan#5_DIMM#0"])
                ),
            ]
        );
    }

    #[test]
    fn csrows_where_there_are_no_dimm_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            &[
                ("mc1/ce_count", "3"),
                ("mc1/ue_count", "0"),
                ("mc1/csrow0/ce_count", "3"),
                ("mc1/csrow0/ue_count", "0"),
                ("mc1/csrow0/ch0_ce_count", "1"),
                ("mc1/csrow0/ch0_dimm_label", "DIMM_A1"),
                ("mc1/csrow0/ch1_ce_count", "2"),
                ("mc1/csrow0/ch1_dimm_label", "DIMM_B1"),
            ],
        );
        let mut out = Vec::new();
        EdacCollector::new(Host::new(dir.path())).collect(&mut out).expect("collect");
        let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            got(&out),
            [
                ("edac_correctable_errors_total", Value::Count(3), s(&["1"])),
                ("edac_uncorrectable_errors_total", Value::Count(0), s(&["1"])),
                ("edac_csrow_correctable_errors_total", Value::Count(1), s(&["1", "0", "0", "DIMM_A1"])),
                ("edac_csrow_correctable_errors_total", Value::Count(2), s(&["1", "0", "1", "DIMM_B1"])),
                ("edac_csrow_uncorrectable_errors_total", Value::Count(0), s(&["1", "0"])),
            ]
        );
        assert_eq!(
            out[2].labels.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            ["controller", "csrow", "channel", "label"]
        );
    }

    #[test]
    fn absent_is_not_present_and_bad_counts_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = EdacCollector::new(Host::new(dir.path()));
        assert!(matches!(c.collect(&mut Vec::new()), Err(CollectError::NotPresent(_))));
        write(dir.path(), &[("mc0/ce_count", "-3"), ("mc0/ue_count", "0")]);
        let mut out = Vec::new();
        let e = format!("{:#}", EdacCollector::new(Host::new(dir.path())).collect(&mut out).expect_err("bad"));
        let path = dir.path().join("sys/devices/system/edac/mc/mc0/ce_count");
        assert_eq!(e, format!("parsing {}: expected an unsigned integer, got \"-3\"", path.display()));
        assert_eq!(out.len(), 1, "ue_count still reported");
    }
}
