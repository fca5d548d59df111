//! PCIe health of GPUs, NICs, NVMe drives, accelerators and bridges from
//! /sys/bus/pci/devices/ADDR/: the AER error counts the kernel keeps per device
//! (`aer_dev_correctable`, `aer_dev_nonfatal`, `aer_dev_fatal`: the total of each always,
//! each error type once it has counted one) and the current against the maximum link speed and width, with
//! `pcie_link_degraded` 1 when the link trained below what both ends support (a GPU at x8
//! has half its bandwidth).
//!
//! The AER counts are kernel memory and the link attributes one config-space read each, so
//! this runs inline. Devices, their class, driver and maximum link speed and width are read
//! when listed, again every [`RELIST_EVERY`]; each round reads the AER files and the current
//! speed and width.

use super::attr::{RELIST_EVERY, Relist, excerpt, is_gone, round_result};
use super::{CollectError, Collector};
use crate::batch::Sample;
use crate::host::{Host, served_from_kernel_memory};

/// This collector's row in the table ([`super::SOURCES`]).
pub const SOURCE: super::Source = super::Source {
    name: "pcie",
    switch: super::Switch::Exporter { default: true },
    caps: &[],
    section: None,
    build: Some(|host, _| Box::new(PcieCollector::new(host.clone()))),
};

/// The AER files and the `severity` label of each.
pub const AER_FILES: [(&str, &str); 3] =
    [("aer_dev_correctable", "correctable"), ("aer_dev_nonfatal", "nonfatal"), ("aer_dev_fatal", "fatal")];

/// What a PCI class code (`0x030200`, the `class` file) is reported as: the `class` label, or
/// `None` for devices this family does not report.
pub fn class_name(code: u32) -> Option<&'static str> {
    match code >> 8 {
        0x0108 => Some("nvme"),
        0x0604 => Some("bridge"),
        c if c >> 8 == 0x03 => Some("gpu"),
        c if c >> 8 == 0x02 => Some("network"),
        c if c >> 8 == 0x12 => Some("accelerator"),
        _ => None,
    }
}

/// `0x030200` (`class`) into the class code.
pub fn parse_class(text: &str) -> anyhow::Result<u32> {
    let t = text.trim();
    t.strip_prefix("0x")
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or_else(|| anyhow::anyhow!("expected a class code such as \"0x030200\", got {:?}", excerpt(t)))
}

/// ```text
/// RxErr 0
/// BadTLP 3
/// ...
/// TOTAL_ERR_COR 3
/// ```
/// (`aer_dev_*`) into the count of each error type, in the file's order, and the total.
pub fn parse_aer(text: &str) -> anyhow::Result<(Vec<(String, u64)>, u64)> {
    let mut types = Vec::new();
    let mut total = None;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut words = line.split_whitespace();
        let (Some(name), Some(Ok(count)), None) = (words.next(), words.next().map(str::parse::<u64>), words.next())
        else {
            anyhow::bail!("expected \"<ErrorType> <count>\" lines, got {:?}", excerpt(line));
        };
        if name.starts_with("TOTAL_") {
            total = Some(count);
        } else {
            types.push((name.to_owned(), count));
        }
    }
    let total = total.ok_or_else(|| anyhow::anyhow!("expected a TOTAL_ERR_* line, found none"))?;
    Ok((types, total))
}

/// `16.0 GT/s PCIe` (`current_link_speed`, `max_link_speed`; `8 GT/s` before Linux 4.13) in
/// GT/s; `None` for `Unknown` (a link that is down).
pub fn parse_speed(text: &str) -> anyhow::Result<Option<f64>> {
    let t = text.trim();
    if t.starts_with("Unknown") {
        return Ok(None);
    }
    let mut words = t.split_whitespace();
    match (words.next().and_then(|n| n.parse::<f64>().ok()), words.next()) {
        (Some(gt), Some("GT/s")) if gt.is_finite() && gt >= 0.0 => Ok(Some(gt)),
        _ => {
            anyhow::bail!("expected \"<number> GT/s\" such as \"16.0 GT/s PCIe\" or \"Unknown\", got {:?}", excerpt(t))
        }
    }
}

/// A link speed (`speed`) or width file's value.
fn parse_link(text: &str, speed: bool) -> anyhow::Result<Option<f64>> {
    #[allow(clippy::cast_precision_loss, reason = "a lane count")]
    if speed { parse_speed(text) } else { parse_width(text).map(|w| Some(w as f64)) }
}

/// A link width (`16`).
pub fn parse_width(text: &str) -> anyhow::Result<u64> {
    super::attr::parse_u64(text)
}

/// One reported device.
#[derive(Debug)]
struct Device {
    address: String,
    driver: String,
    class: &'static str,
    /// Which of [`AER_FILES`] it has.
    aer: Vec<usize>,
    /// Whether it has the link attributes (a PCIe device, not a conventional PCI one).
    link: bool,
    /// Maximum link speed (GT/s) and width: what both ends support, fixed, so read when
    /// listed; `None` where unknown.
    max: [Option<f64>; 2],
    /// Why a maximum could not be read when listed, reported every round until listed again.
    max_error: Option<String>,
}

/// PCIe AER counts and link state.
#[derive(Debug)]
pub struct PcieCollector {
    host: Host,
    devices: Vec<Device>,
    relist: Relist,
    buf: String,
    inline: bool,
}

impl PcieCollector {
    /// A collector reading `host`'s /sys/bus/pci/devices.
    pub fn new(host: Host) -> Self {
        let inline = served_from_kernel_memory(SOURCE.name, [host.path("/sys/bus/pci/devices").as_path()]);
        Self { host, devices: Vec::new(), relist: Relist::new(RELIST_EVERY), buf: String::new(), inline }
    }

    fn list(&mut self) -> Result<(), CollectError> {
        let first = self.relist.is_first();
        self.relist.done();
        let mut addresses = self.host.dir_names("/sys/bus/pci/devices")?;
        // Fixed-width hex: text order is bus order.
        addresses.sort_unstable();
        let mut devices = Vec::new();
        for address in addresses {
            let dir = self.host.path(format!("/sys/bus/pci/devices/{address}"));
            let Ok(class) = self.host.read_to_string(format!("/sys/bus/pci/devices/{address}/class")) else { continue };
            let Some(class) = parse_class(&class).ok().and_then(class_name) else { continue };
            let aer: Vec<usize> = (0..AER_FILES.len()).filter(|&i| dir.join(AER_FILES[i].0).exists()).collect();
            let link = dir.join("current_link_speed").exists();
            if aer.is_empty() && !link {
                continue;
            }
            let driver = std::fs::read_link(dir.join("driver"))
                .ok()
                .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_default();
            let (mut max, mut max_error) = ([None, None], None);
            if link {
                for (slot, (rel, speed)) in max.iter_mut().zip([("max_link_speed", true), ("max_link_width", false)]) {
                    let rel = format!("/sys/bus/pci/devices/{address}/{rel}");
                    match self.host.read_to_string(&rel) {
                        Ok(text) => match parse_link(&text, speed) {
                            Ok(v) => *slot = v,
                            Err(e) => {
                                max_error = Some(format!("parsing {}: {e:#}", self.host.path(&rel).display()));
                            }
                        },
                        Err(e) => max_error = Some(e.to_string()),
                    }
                }
            }
            devices.push(Device { address, driver, class, aer, link, max, max_error });
        }
        self.devices = devices;
        if first && self.devices.is_empty() {
            return Err(CollectError::NotPresent(
                "no GPU, NIC, NVMe, accelerator or bridge with PCIe link or AER attributes".to_owned(),
            ));
        }
        Ok(())
    }
}

/// Reads `rel` of device `d` into `buf`; false when it could not (a device that went away
/// sets `gone`, any other failure is added to `errors`).
fn fetch(
    host: &Host,
    d: &Device,
    rel: &str,
    buf: &mut String,
    errors: &mut Vec<anyhow::Error>,
    gone: &mut bool,
) -> bool {
    match host.read_into(format!("/sys/bus/pci/devices/{}/{rel}", d.address), buf) {
        Ok(()) => true,
        Err(e) if is_gone(&e) => {
            *gone = true;
            false
        }
        Err(e) => {
            errors.push(e.into());
            false
        }
    }
}

impl Collector for PcieCollector {
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
        let (host, buf) = (&self.host, &mut self.buf);
        for d in &self.devices {
            let labelled = |s: Sample| {
                s.label("address", d.address.as_str()).label("driver", d.driver.as_str()).label("class", d.class)
            };
            let named = |rel: &str, e: anyhow::Error| {
                e.context(format!(
                    "parsing {}",
                    host.path(format!("/sys/bus/pci/devices/{}/{rel}", d.address)).display()
                ))
            };
            for &i in &d.aer {
                let (file, severity) = AER_FILES[i];
                if !fetch(host, d, file, buf, &mut errors, &mut gone) {
                    continue;
                }
                match parse_aer(buf) {
                    Ok((types, total)) => {
                        out.push(labelled(Sample::count("pcie_aer_errors_total", total)).label("severity", severity));
                        // Per type only what happened: about 44 error types a device, nearly
                        // all 0, on dozens of devices (every bridge) would be thousands of
                        // series. A type's series appears with its first error; absent is 0.
                        out.extend(types.into_iter().filter(|(_, n)| *n > 0).map(|(t, n)| {
                            labelled(Sample::count("pcie_aer_errors_by_type_total", n))
                                .label("severity", severity)
                                .label("type", t)
                        }));
                    }
                    Err(e) => errors.push(named(file, e)),
                }
            }
            if !d.link {
                continue;
            }
            let mut current = [None, None];
            for (slot, (rel, speed)) in
                current.iter_mut().zip([("current_link_speed", true), ("current_link_width", false)])
            {
                if !fetch(host, d, rel, buf, &mut errors, &mut gone) {
                    continue;
                }
                match parse_link(buf, speed) {
                    Ok(v) => *slot = v,
                    Err(e) => errors.push(named(rel, e)),
                }
            }
            if let Some(e) = &d.max_error {
                errors.push(anyhow::anyhow!("{e}"));
            }
            let [speed, width] = current;
            let [max_speed, max_width] = d.max;
            for (metric, v) in [
                ("pcie_link_speed_gt_per_second", speed),
                ("pcie_link_max_speed_gt_per_second", max_speed),
                ("pcie_link_width_lanes", width),
                ("pcie_link_max_width_lanes", max_width),
            ] {
                out.extend(v.map(|v| labelled(Sample::gauge(metric, v))));
            }
            let below = |now: Option<f64>, max: Option<f64>| now.zip(max).map(|(n, m)| n < m);
            if let Some(degraded) = match (below(speed, max_speed), below(width, max_width)) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(false) || b.unwrap_or(false)),
            } {
                out.push(labelled(Sample::count("pcie_link_degraded", u64::from(degraded))));
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

    #[test]
    fn classes_reported() {
        let names: Vec<Option<&str>> =
            [0x030200, 0x030000, 0x020000, 0x020700, 0x010802, 0x060400, 0x120000, 0x010000, 0x060000, 0x0c0330]
                .into_iter()
                .map(class_name)
                .collect();
        assert_eq!(
            names,
            [
                Some("gpu"),
                Some("gpu"),
                Some("network"),
                Some("network"),
                Some("nvme"),
                Some("bridge"),
                Some("accelerator"),
                None,
                None,
                None
            ]
        );
        assert_eq!(parse_class("0x030200\n").expect("class"), 0x030200);
        assert_eq!(
            parse_class("VGA\n").expect_err("text").to_string(),
            "expected a class code such as \"0x030200\", got \"VGA\""
        );
    }

    #[test]
    fn aer_speed_and_width_parse() {
        let (types, total) = parse_aer("RxErr 2\nBadTLP 3\nBadDLLP 0\nTOTAL_ERR_COR 5\n").expect("aer");
        assert_eq!(types, [("RxErr".to_owned(), 2), ("BadTLP".to_owned(), 3), ("BadDLLP".to_owned(), 0)]);
        assert_eq!(total, 5);
        assert_eq!(
            parse_aer("RxErr two\n").expect_err("bad").to_string(),
            "expected \"<ErrorType> <count>\" lines, got \"RxErr two\""
        );
        assert_eq!(
            parse_aer("RxErr 1\n").expect_err("no total").to_string(),
            "expected a TOTAL_ERR_* line, found none"
        );
        assert_eq!(parse_speed("16.0 GT/s PCIe\n").expect("speed"), Some(16.0));
        assert_eq!(parse_speed("8 GT/s\n").expect("old format"), Some(8.0));
        assert_eq!(parse_speed("2.5 GT/s PCIe\n").expect("gen1"), Some(2.5));
        assert_eq!(parse_speed("Unknown\n").expect("down"), None);
        assert!(parse_speed("fast\n").expect_err("bad").to_string().contains("\"fast\""));
        assert_eq!(parse_width("16\n").expect("width"), 16);
    }

    #[test]
    fn nothing_reportable_is_not_present() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = PcieCollector::new(Host::new(dir.path()));
        assert!(matches!(c.collect(&mut Vec::new()), Err(CollectError::NotPresent(_))));
        // A conventional PCI NIC (a VM's virtio-net): no link and no AER attributes.
        let dev = dir.path().join("sys/bus/pci/devices/0000:00:03.0");
        std::fs::create_dir_all(&dev).expect("mkdir");
        std::fs::write(dev.join("class"), "0x020000\n").expect("write");
        let mut c = PcieCollector::new(Host::new(dir.path()));
        assert!(matches!(c.collect(&mut Vec::new()), Err(CollectError::NotPresent(_))));
    }

    #[test]
    fn a_bad_file_is_named_and_the_rest_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = dir.path().join("sys/bus/pci/devices/0000:17:00.0");
        std::fs::create_dir_all(&dev).expect("mkdir");
        for (f, t) in [
            ("class", "0x030200"),
            ("aer_dev_correctable", "RxErr 1\nTOTAL_ERR_COR 1"),
            ("aer_dev_fatal", "Undefined 0\nDLP x\nTOTAL_ERR_FATAL 0"),
            ("current_link_speed", "16.0 GT/s PCIe"),
            ("max_link_speed", "32.0 GT/s PCIe"),
            ("current_link_width", "16"),
            ("max_link_width", "16"),
        ] {
            std::fs::write(dev.join(f), format!("{t}\n")).expect("write");
        }
        let mut out = Vec::new();
        let e = format!("{:#}", PcieCollector::new(Host::new(dir.path())).collect(&mut out).expect_err("bad"));
        assert_eq!(
            e,
            format!(
                "parsing {}: expected \"<ErrorType> <count>\" lines, got \"DLP x\"",
                dev.join("aer_dev_fatal").display()
            )
        );
        let got: Vec<(&str, Value)> = out.iter().map(|s| (s.name, s.value)).collect();
        assert_eq!(
            got,
            [
                ("pcie_aer_errors_total", Value::Count(1)),
                ("pcie_aer_errors_by_type_total", Value::Count(1)),
                ("pcie_link_speed_gt_per_second", Value::Gauge(16.0)),
                ("pcie_link_max_speed_gt_per_second", Value::Gauge(32.0)),
                ("pcie_link_width_lanes", Value::Gauge(16.0)),
                ("pcie_link_max_width_lanes", Value::Gauge(16.0)),
                ("pcie_link_degraded", Value::Count(1)),
            ]
        );
        let l = |k: &'static str, v: &str| (k, v.into());
        let device = [l("address", "0000:17:00.0"), l("driver", ""), l("class", "gpu")];
        assert_eq!(out[2].labels, device);
        assert_eq!(out[1].labels[3..], [l("severity", "correctable"), l("type", "RxErr")]);
    }

    #[test]
    fn a_bad_maximum_read_when_listed_fails_every_round() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = dir.path().join("sys/bus/pci/devices/0000:5e:00.0");
        std::fs::create_dir_all(&dev).expect("mkdir");
        for (f, t) in [
            ("class", "0x010802"),
            ("current_link_speed", "16.0 GT/s PCIe"),
            ("max_link_speed", "sixteen"),
            ("current_link_width", "4"),
            ("max_link_width", "4"),
        ] {
            std::fs::write(dev.join(f), format!("{t}\n")).expect("write");
        }
        let mut c = PcieCollector::new(Host::new(dir.path()));
        for _ in 0..2 {
            let mut out = Vec::new();
            let e = format!("{:#}", c.collect(&mut out).expect_err("bad max"));
            assert!(e.starts_with(&format!("parsing {}: expected", dev.join("max_link_speed").display())), "{e}");
            let names: Vec<&str> = out.iter().map(|s| s.name).collect();
            assert_eq!(
                names,
                [
                    "pcie_link_speed_gt_per_second",
                    "pcie_link_width_lanes",
                    "pcie_link_max_width_lanes",
                    "pcie_link_degraded"
                ]
            );
            assert_eq!(out[3].value, Value::Count(0), "width 4 of 4; speed unknown against its maximum");
        }
    }

    #[test]
    fn this_hosts_pci_devices_or_none() {
        let mut c = PcieCollector::new(Host::default());
        let mut out = Vec::new();
        match c.collect(&mut out) {
            Ok(()) => {
                for s in out.iter().filter(|s| s.name == "pcie_link_width_lanes") {
                    let address = &s.labels[0].1;
                    let text = std::fs::read_to_string(format!("/sys/bus/pci/devices/{address}/current_link_width"))
                        .expect("width");
                    assert_eq!(s.value, Value::Gauge(text.trim().parse().expect("number")), "{address}");
                }
            }
            Err(CollectError::NotPresent(why)) => {
                // Then no device of a reported class has the attributes (a VM's virtio devices).
                for entry in std::fs::read_dir("/sys/bus/pci/devices").expect("/sys/bus/pci/devices") {
                    let dir = entry.expect("entry").path();
                    let class = std::fs::read_to_string(dir.join("class")).expect("class");
                    let has = dir.join("current_link_speed").exists() || dir.join("aer_dev_fatal").exists();
                    assert!(
                        !(has && parse_class(&class).ok().and_then(class_name).is_some()),
                        "{why}: {}",
                        dir.display()
                    );
                }
            }
            Err(e) => panic!("{e:#}"),
        }
    }
}
