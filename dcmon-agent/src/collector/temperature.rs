//! Temperatures without a BMC: hwmon sensors (/sys/class/hwmon/hwmonN/tempM_input, with the
//! chip's `name` and the sensor's `tempM_label`) and thermal zones
//! (/sys/class/thermal/thermal_zoneN/temp with its `type`), in °C.
//!
//! Runs on its own thread under the collector timeout: a sensor read goes to the driver,
//! which may talk to a chip over I2C/SMBus or run an ACPI method, milliseconds each and
//! unbounded when the bus hangs. Chips, sensors, zones and the sensors' fixed thresholds
//! (`tempM_max`, `tempM_crit`) are read when listed, every [`RELIST_EVERY`].

use super::attr::{RELIST_EVERY, Relist, index_of, is_gone, is_no_value, parse_i64, round_result, sorted_names};
use super::{CollectError, Collector};
use crate::batch::{Labels, Sample};
use crate::host::Host;

/// This collector's row in the table ([`super::SOURCES`]).
pub const SOURCE: super::Source = super::Source {
    name: "temperature",
    switch: super::Switch::Exporter { default: true },
    caps: &[],
    section: None,
    build: Some(|host, _| Box::new(TemperatureCollector::new(host.clone()))),
};

/// Millidegrees Celsius (`45000`) in °C.
pub fn parse_millidegrees(text: &str) -> anyhow::Result<f64> {
    #[allow(clippy::cast_precision_loss, reason = "temperatures are far below 2^53 millidegrees")]
    parse_i64(text).map(|m| m as f64 / 1000.0)
}

/// One temperature to read each round.
#[derive(Debug)]
struct Sensor {
    /// Host path of the value file.
    path: String,
    metric: &'static str,
    labels: Labels,
}

/// hwmon and thermal zone temperatures.
#[derive(Debug)]
pub struct TemperatureCollector {
    host: Host,
    sensors: Vec<Sensor>,
    /// Thresholds read when listed: they are settings of the chip, not readings.
    thresholds: Vec<Sample>,
    relist: Relist,
    buf: String,
}

impl TemperatureCollector {
    /// A collector reading `host`'s /sys/class/hwmon and /sys/class/thermal.
    pub fn new(host: Host) -> Self {
        Self {
            host,
            sensors: Vec::new(),
            thresholds: Vec::new(),
            relist: Relist::new(RELIST_EVERY),
            buf: String::new(),
        }
    }

    fn text(&self, path: &str) -> Option<String> {
        self.host.read_to_string(path).ok().map(|t| t.trim().to_owned())
    }

    fn list(&mut self) -> Result<(), CollectError> {
        let first = self.relist.is_first();
        self.relist.done();
        let (hwmon, thermal) =
            (sorted_names(&self.host, "/sys/class/hwmon"), sorted_names(&self.host, "/sys/class/thermal"));
        if let (Err(e), Err(_)) = (&hwmon, &thermal) {
            return Err(CollectError::NotPresent(format!("no hwmon or thermal class: {e}")));
        }
        let (mut sensors, mut thresholds) = (Vec::new(), Vec::new());
        for chip_dir in hwmon.unwrap_or_default() {
            // Drivers before Linux 3.x kept the attributes in the device directory.
            let dir = [format!("/sys/class/hwmon/{chip_dir}"), format!("/sys/class/hwmon/{chip_dir}/device")]
                .into_iter()
                .find(|d| self.host.path(format!("{d}/name")).exists());
            let Some(dir) = dir else { continue };
            let chip = self.text(&format!("{dir}/name")).unwrap_or_default();
            // The device the chip belongs to tells two chips of one driver apart
            // (coretemp.0 and coretemp.1, one nvme per drive); hwmonN numbers change at boot.
            let device = std::fs::read_link(self.host.path(format!("/sys/class/hwmon/{chip_dir}/device")))
                .ok()
                .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| chip_dir.clone());
            let files = sorted_names(&self.host, &dir).unwrap_or_default();
            for file in &files {
                let Some(n) = file.strip_prefix("temp").and_then(|r| r.strip_suffix("_input")) else { continue };
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    continue;
                }
                let sensor = self.text(&format!("{dir}/temp{n}_label")).unwrap_or_else(|| format!("temp{n}"));
                let labels: Labels =
                    vec![("chip", chip.as_str().into()), ("sensor", sensor.into()), ("device", device.as_str().into())]
                        .into();
                for (suffix, metric) in
                    [("max", "hwmon_temperature_max_celsius"), ("crit", "hwmon_temperature_critical_celsius")]
                {
                    let value = self.text(&format!("{dir}/temp{n}_{suffix}")).and_then(|t| parse_millidegrees(&t).ok());
                    if let Some(v) = value {
                        thresholds.push(Sample {
                            name: metric,
                            value: crate::batch::Value::Gauge(v),
                            labels: labels.clone(),
                        });
                    }
                }
                sensors.push(Sensor { path: format!("{dir}/{file}"), metric: "hwmon_temperature_celsius", labels });
            }
        }
        for zone in thermal.unwrap_or_default() {
            let Some(n) = index_of(&zone, "thermal_zone") else { continue };
            let dir = format!("/sys/class/thermal/{zone}");
            let kind = self.text(&format!("{dir}/type")).unwrap_or_default();
            let labels = vec![("zone", n.into()), ("type", kind.into())];
            sensors.push(Sensor {
                path: format!("{dir}/temp"),
                metric: "thermal_zone_temperature_celsius",
                labels: labels.into(),
            });
        }
        self.sensors = sensors;
        self.thresholds = thresholds;
        if first && self.sensors.is_empty() {
            return Err(CollectError::NotPresent("no hwmon temperature sensor or thermal zone".to_owned()));
        }
        Ok(())
    }
}

impl Collector for TemperatureCollector {
    fn name(&self) -> &'static str {
        SOURCE.name
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        if self.relist.is_due() {
            self.list()?;
        }
        let mut errors = Vec::new();
        let mut gone = false;
        for s in &self.sensors {
            match self.host.read_into(&s.path, &mut self.buf) {
                Ok(()) => match parse_millidegrees(&self.buf) {
                    Ok(v) => out.push(Sample {
                        name: s.metric,
                        value: crate::batch::Value::Gauge(v),
                        labels: s.labels.clone(),
                    }),
                    Err(e) => errors.push(e.context(format!("parsing {}", self.host.path(&s.path).display()))),
                },
                Err(e) if is_gone(&e) => gone = true,
                // A sensor that is not ready, or a zone whose firmware method failed: no reading.
                Err(e) if is_no_value(&e) => {}
                Err(e) => errors.push(e.into()),
            }
        }
        out.extend(self.thresholds.iter().cloned());
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
            let p = root.join("sys/class").join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, format!("{text}\n")).expect("write");
        }
    }

    #[test]
    fn hwmon_sensors_thresholds_and_thermal_zones() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            &[
                ("hwmon/hwmon0/name", "coretemp"),
                ("hwmon/hwmon0/temp1_input", "45000"),
                ("hwmon/hwmon0/temp1_label", "Package id 0"),
                ("hwmon/hwmon0/temp1_crit", "100000"),
                ("hwmon/hwmon0/temp2_input", "-1500"),
                ("hwmon/hwmon1/name", "nvme"),
                ("hwmon/hwmon1/temp1_input", "38850"),
                ("hwmon/hwmon1/temp1_label", "Composite"),
                ("hwmon/hwmon1/temp1_max", "84850"),
                ("thermal/thermal_zone0/type", "x86_pkg_temp"),
                ("thermal/thermal_zone0/temp", "46000"),
                ("thermal/cooling_device0/type", "Processor"),
            ],
        );
        let mut out = Vec::new();
        TemperatureCollector::new(Host::new(dir.path())).collect(&mut out).expect("collect");
        let got: Vec<(&str, Value, Vec<&str>)> =
            out.iter().map(|s| (s.name, s.value, s.labels.iter().map(|(_, v)| v.as_str()).collect())).collect();
        assert_eq!(
            got,
            [
                ("hwmon_temperature_celsius", Value::Gauge(45.0), vec!["coretemp", "Package id 0", "hwmon0"]),
                ("hwmon_temperature_celsius", Value::Gauge(-1.5), vec!["coretemp", "temp2", "hwmon0"]),
                ("hwmon_temperature_celsius", Value::Gauge(38.85), vec!["nvme", "Composite", "hwmon1"]),
                ("thermal_zone_temperature_celsius", Value::Gauge(46.0), vec!["0", "x86_pkg_temp"]),
                ("hwmon_temperature_critical_celsius", Value::Gauge(100.0), vec!["coretemp", "Package id 0", "hwmon0"]),
                ("hwmon_temperature_max_celsius", Value::Gauge(84.85), vec!["nvme", "Composite", "hwmon1"]),
            ]
        );
        assert_eq!(out[0].labels.iter().map(|(k, _)| *k).collect::<Vec<_>>(), ["chip", "sensor", "device"]);
    }

    #[test]
    fn absent_is_not_present_and_a_bad_reading_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = TemperatureCollector::new(Host::new(dir.path()));
        assert!(matches!(c.collect(&mut Vec::new()), Err(CollectError::NotPresent(_))));
        std::fs::create_dir_all(dir.path().join("sys/class/thermal")).expect("mkdir");
        let mut c = TemperatureCollector::new(Host::new(dir.path()));
        assert!(matches!(c.collect(&mut Vec::new()), Err(CollectError::NotPresent(_))), "no zone");
        write(dir.path(), &[("hwmon/hwmon3/name", "k10temp"), ("hwmon/hwmon3/temp1_input", "hot")]);
        let e = TemperatureCollector::new(Host::new(dir.path())).collect(&mut Vec::new()).expect_err("bad");
        let path = dir.path().join("sys/class/hwmon/hwmon3/temp1_input");
        assert_eq!(format!("{e:#}"), format!("parsing {}: expected an integer, got \"hot\"", path.display()));
    }

    #[test]
    fn this_hosts_sensors_or_none() {
        let mut out = Vec::new();
        match TemperatureCollector::new(Host::default()).collect(&mut out) {
            Ok(()) => {
                let zones = out.iter().filter(|s| s.name == "thermal_zone_temperature_celsius").count();
                let listed = std::fs::read_dir("/sys/class/thermal")
                    .map(|d| {
                        d.filter_map(Result::ok)
                            .filter(|e| e.file_name().to_string_lossy().starts_with("thermal_zone"))
                            .count()
                    })
                    .unwrap_or(0);
                assert!(zones <= listed, "{zones} of {listed}");
                assert!(out.iter().all(|s| s.value.as_f64() > -50.0 && s.value.as_f64() < 200.0), "{out:?}");
            }
            Err(CollectError::NotPresent(why)) => {
                let has = |d: &str, prefix: &str| {
                    std::fs::read_dir(d).is_ok_and(|d| {
                        d.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().starts_with(prefix))
                    })
                };
                assert!(!has("/sys/class/thermal", "thermal_zone") && !has("/sys/class/hwmon", "hwmon"), "{why}");
            }
            Err(e) => panic!("{e:#}"),
        }
    }
}
