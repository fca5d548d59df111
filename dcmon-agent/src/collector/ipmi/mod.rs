//! IPMI sensors through ipmitool, locally (`-I open`) or from a BMC over the network
//! (`-I lanplus`).
//!
//! ipmitool takes seconds to minutes on real BMCs, so it runs on its own thread and interval
//! (default 60 s) with its own timeout; `collect()` reports the latest finished read at once.
//! Reads use a local SDR cache (`ipmitool -S FILE`): against the ipmi_sim test BMC with 11
//! sensors, `sdr list all` sent 57 UDP packets without the cache and 21 with it (building the
//! cache with `sdr dump`: 46). `ipmitool sensor` would give thresholds too but ignores `-S` (66
//! packets every time), and `sdr elist` prints discrete sensors as text instead of their state
//! bits, so the source is `sdr list all`.
//!
//! The cache is rebuilt (`sdr dump`) when it is missing, older than `sdr_cache_max_age`, when
//! ipmitool complains about it or prints nothing usable with it, and when more sensors than
//! right after the last rebuild have no reading (a stale cache names sensors the BMC no longer
//! has).

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;

use super::background::{FirstRunWait, Refresher};
use super::ipmi_sel::{SelTracker, parse_dcmi_power, parse_sel_info, parse_sel_list};
use super::{CollectError, Collector};
use crate::batch::Sample;
use crate::config::{Limit, Section, SectionSpec, UP_TO_A_WEEK, UP_TO_AN_HOUR, YEAR};
use crate::exec::{Cmd, ExecError};
use crate::host::Host;

/// This collector's row in the table ([`super::SOURCES`]).
pub const SOURCE: super::Source = super::Source {
    name: "ipmi",
    switch: super::Switch::Exporter { default: true },
    // ipmitool's ioctls on the local BMC device.
    caps: &["CAP_SYS_RAWIO"],
    section: Some(SectionSpec::of::<IpmiConfig>()),
    build: Some(|host, config| Box::new(IpmiCollector::new(host.clone(), &config.section::<IpmiConfig>()))),
};

/// The `ipmi` section: where the BMC is and how often to ask it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct IpmiConfig {
    /// ipmitool interface: `open` (the local BMC through /dev/ipmi0), `lan` or `lanplus`.
    pub interface: String,
    /// BMC address for `lan`/`lanplus`.
    pub host: Option<String>,
    /// BMC UDP port.
    pub port: u16,
    /// BMC user.
    pub username: Option<String>,
    /// File holding the BMC password (never the password itself in the config).
    pub password_file: Option<PathBuf>,
    /// lanplus cipher suite (`-C`); without it ipmitool spends seconds probing.
    pub cipher_suite: Option<u8>,
    /// Seconds between sensor reads.
    pub interval: u64,
    /// Seconds one ipmitool run may take before it is killed.
    pub timeout: u64,
    /// The ipmitool program.
    pub ipmitool: PathBuf,
    /// Where the SDR cache lives (rebuilt when missing, stale or failing).
    pub sdr_cache: PathBuf,
    /// Seconds after which the SDR cache is rebuilt.
    pub sdr_cache_max_age: u64,
    /// Read the System Event Log (`sel info` every read, `sel list` when it changed).
    pub sel: bool,
    /// Where the last SEL entry counted and the counts are kept across restarts.
    pub sel_state_file: PathBuf,
    /// Read the DCMI power reading (`dcmi power reading`).
    pub dcmi: bool,
}

impl Default for IpmiConfig {
    fn default() -> Self {
        Self {
            interface: "open".to_owned(),
            host: None,
            port: 623,
            username: None,
            password_file: None,
            cipher_suite: None,
            interval: 60,
            timeout: 30,
            ipmitool: PathBuf::from("ipmitool"),
            sdr_cache: PathBuf::from("/var/cache/dcmon/ipmi-sdr.cache"),
            sdr_cache_max_age: 86_400,
            sel: true,
            sel_state_file: PathBuf::from("/var/lib/dcmon/ipmi-sel.state"),
            dcmi: true,
        }
    }
}

impl Section for IpmiConfig {
    fn durations(&self) -> Vec<(&'static str, u64, Limit)> {
        vec![
            ("ipmi.interval", self.interval, UP_TO_A_WEEK),
            ("ipmi.timeout", self.timeout, UP_TO_AN_HOUR),
            ("ipmi.sdr_cache_max_age", self.sdr_cache_max_age, Limit(YEAR, "365 days")),
        ]
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        match self.interface.as_str() {
            "open" => Ok(()),
            "lan" | "lanplus" if self.host.as_deref().is_some_and(|h| !h.trim().is_empty()) => Ok(()),
            "lan" | "lanplus" => Err(("ipmi.host", format!("interface {:?} needs the BMC address", self.interface))),
            other => Err(("ipmi.interface", format!("expected \"open\", \"lan\" or \"lanplus\", got {other:?}"))),
        }
    }
}

/// How long the first round waits for the first read (below the 10 s collector timeout).
const FIRST_READ_WAIT: Duration = Duration::from_secs(6);
/// Device nodes of the local BMC driver (ipmi_devintf), any of which `-I open` can use.
const LOCAL_DEVICES: [&str; 3] = ["/dev/ipmi0", "/dev/ipmi/0", "/dev/ipmidev/0"];
/// A BMC with 500 sensors prints about 30 KiB.
const MAX_OUTPUT_BYTES: usize = 4 << 20;

/// What one sensor row means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `ipmi_temperature_celsius`.
    Temperature,
    /// `ipmi_power_watts`.
    Power,
    /// `ipmi_speed_rpm`.
    Speed,
    /// `ipmi_volts`.
    Volts,
    /// `ipmi_amps`.
    Amps,
    /// `ipmi_sensor_state`: a discrete sensor's state bits.
    State,
}

impl Kind {
    fn metric(self) -> &'static str {
        match self {
            Kind::Temperature => "ipmi_temperature_celsius",
            Kind::Power => "ipmi_power_watts",
            Kind::Speed => "ipmi_speed_rpm",
            Kind::Volts => "ipmi_volts",
            Kind::Amps => "ipmi_amps",
            Kind::State => "ipmi_sensor_state",
        }
    }
}

/// One usable sensor reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Sensor name as the BMC reports it (not unique on real BMCs).
    pub sensor: String,
    /// Row position in the SDR list: tells duplicate names apart, stable while the SDR
    /// repository is unchanged.
    pub id: usize,
    /// What it measures.
    pub kind: Kind,
    /// Value in the metric's unit.
    pub value: f64,
}

impl Reading {
    fn sample(&self) -> Sample {
        Sample::gauge(self.kind.metric(), self.value)
            .label("sensor", self.sensor.as_str())
            .label("id", self.id.to_string())
    }
}

/// What `sdr list` printed: the readings, and how many sensors had none.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SdrList {
    /// Sensors with a usable reading.
    pub readings: Vec<Reading>,
    /// Rows in sensor format whose reading was absent (`no reading`, `na`, `disabled`).
    pub unreadable: usize,
    /// Rows in sensor format, usable or not.
    pub rows: usize,
}

/// ```text
/// CPU Temp         | 48 degrees C      | ok
/// Intrusion        | 0x01              | ok
/// Missing          | no reading        | ns
/// ```
/// (`ipmitool sdr list all`; analog rows are "value unit", discrete rows the state bits in hex).
/// Rows with units this agent does not report (percent, CFM, unspecified) and locator records
/// ("Dynamic MC @ 20h") are counted as rows but give no reading.
pub fn parse_sdr_list(text: &str) -> SdrList {
    let mut list = SdrList::default();
    for line in text.lines() {
        let mut fields = line.split('|').map(str::trim);
        let (Some(name), Some(value), Some(_status), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if name.is_empty() {
            continue;
        }
        let id = list.rows;
        list.rows += 1;
        match parse_value(value) {
            Some((kind, value)) => list.readings.push(Reading { sensor: name.to_owned(), id, kind, value }),
            None if is_absent(value) => list.unreadable += 1,
            None => {}
        }
    }
    list
}

fn is_absent(value: &str) -> bool {
    let v = value.to_ascii_lowercase();
    v.is_empty() || v == "na" || v == "no reading" || v == "disabled" || v == "not readable"
}

fn parse_value(value: &str) -> Option<(Kind, f64)> {
    if let Some(hex) = value.strip_prefix("0x") {
        let bits = u32::from_str_radix(hex, 16).ok()?;
        return Some((Kind::State, f64::from(bits)));
    }
    let (number, unit) = value.split_once(' ')?;
    let v: f64 = number.parse().ok()?;
    if !v.is_finite() {
        return None;
    }
    let kind_value = match unit.trim() {
        "degrees C" => (Kind::Temperature, v),
        "degrees F" => (Kind::Temperature, (v - 32.0) * 5.0 / 9.0),
        "Watts" => (Kind::Power, v),
        "RPM" => (Kind::Speed, v),
        "Volts" => (Kind::Volts, v),
        "Amps" => (Kind::Amps, v),
        _ => return None,
    };
    // A huge Fahrenheit value converts to infinity.
    Some(kind_value).filter(|(_, v)| v.is_finite())
}

/// Why a read produced nothing (cloneable: cached and reported every round).
#[derive(Debug, Clone, PartialEq, Eq)]
enum ReadError {
    NotPresent(String),
    Failed(String),
}

/// The ipmitool invocations and the cache bookkeeping; lives on the refresh thread.
#[derive(Debug)]
struct Reader {
    base: Cmd,
    cache: PathBuf,
    cache_max_age: Duration,
    /// Unreadable sensors right after the last rebuild.
    unreadable_after_rebuild: Option<usize>,
    /// Rebuild before the next read.
    rebuild: bool,
    /// The SEL, while it is read: its state file, and the tracker once loaded.
    sel: Option<(PathBuf, Option<SelTracker>)>,
    /// Whether the DCMI power reading is asked for.
    dcmi: bool,
    /// Which of SEL and DCMI have answered once (a source that never did is given up on at
    /// its first failure: the BMC does not have it).
    sel_worked: bool,
    dcmi_worked: bool,
    /// The last SEL or DCMI failure logged, so a repeated one is logged once.
    last_extra_error: Option<String>,
}

/// One read: the sensors, then the SEL and DCMI metrics.
#[derive(Debug, Clone, Default)]
pub struct IpmiRead {
    /// The sensors with a reading.
    pub readings: Vec<Reading>,
    /// SEL fill level and event counts, DCMI power.
    pub extra: Vec<Sample>,
}

impl Reader {
    fn cache_is_stale(&self) -> bool {
        let age = std::fs::metadata(&self.cache)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok());
        age.is_none_or(|a| a >= self.cache_max_age)
    }

    fn dump_cache(&self) -> Result<(), ReadError> {
        if let Some(dir) = self.cache.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| ReadError::Failed(format!("cannot create {}: {e}", dir.display())))?;
        }
        // Dump to a temporary name and rename, so a dump killed half-way never leaves a
        // truncated cache for the next read.
        let mut tmp = self.cache.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        self.base
            .clone()
            .args([std::ffi::OsStr::new("sdr"), "dump".as_ref(), tmp.as_os_str()])
            .run()
            .map_err(exec_error)?;
        std::fs::rename(&tmp, &self.cache)
            .map_err(|e| ReadError::Failed(format!("cannot move {} to {}: {e}", tmp.display(), self.cache.display())))
    }

    fn list(&self) -> Result<(SdrList, String), ReadError> {
        let out = self
            .base
            .clone()
            .args([std::ffi::OsStr::new("-S"), self.cache.as_os_str(), "sdr".as_ref(), "list".as_ref(), "all".as_ref()])
            .run()
            .map_err(exec_error)?;
        Ok((parse_sdr_list(&String::from_utf8_lossy(&out.stdout)), out.stderr_text()))
    }

    fn run_text(&self, args: &[&str]) -> Result<String, String> {
        let out = self.base.clone().args(args.iter().copied()).run().map_err(|e| format!("{e:#}"))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn read_sel(&mut self) -> Result<Vec<Sample>, String> {
        let program = self.base.program().to_owned();
        let info = parse_sel_info(&self.run_text(&["sel", "info"])?)?;
        let mut out = info.samples();
        let Some((path, tracker)) = &mut self.sel else { return Ok(out) };
        let tracker = tracker.get_or_insert_with(|| SelTracker::load(path));
        if tracker.needs_listing(&info) {
            let text = self.base.clone().args(["sel", "list"]).run().map_err(|e| format!("{e:#}"))?;
            let list = parse_sel_list(&String::from_utf8_lossy(&text.stdout)).map_err(|e| format!("{program}: {e}"))?;
            let Some((_, Some(tracker))) = &mut self.sel else { return Ok(out) };
            if let Err(e) = tracker.update(&info, &list) {
                tracing::warn!("IPMI SEL counts not saved: {e}");
            }
        }
        if let Some((_, Some(tracker))) = &self.sel {
            out.extend(tracker.samples());
        }
        Ok(out)
    }

    fn read_dcmi(&self) -> Result<Vec<Sample>, String> {
        let text = self.run_text(&["dcmi", "power", "reading"])?;
        Ok(parse_dcmi_power(&text)?.map(|p| p.samples()).unwrap_or_default())
    }

    /// A SEL or DCMI failure: the source is given up on when it never answered, else logged
    /// (once while it repeats) and tried again next read.
    fn extra_failed(&mut self, what: &str, worked: bool, e: &str) -> bool {
        if !worked {
            tracing::info!("IPMI {what} not available from this BMC ({e}); not asked again");
            return false;
        }
        let msg = format!("IPMI {what}: {e}");
        if self.last_extra_error.as_deref() != Some(msg.as_str()) {
            tracing::warn!("{msg}");
            self.last_extra_error = Some(msg);
        }
        true
    }

    fn read_extra(&mut self) -> Vec<Sample> {
        let mut out = Vec::new();
        if self.sel.is_some() {
            match self.read_sel() {
                Ok(s) => {
                    out.extend(s);
                    self.sel_worked = true;
                }
                Err(e) => {
                    if !self.extra_failed("System Event Log", self.sel_worked, &e) {
                        self.sel = None;
                    }
                }
            }
        }
        if self.dcmi {
            match self.read_dcmi() {
                Ok(s) => {
                    out.extend(s);
                    self.dcmi_worked = true;
                }
                Err(e) => self.dcmi = self.extra_failed("DCMI power reading", self.dcmi_worked, &e),
            }
        }
        out
    }

    fn read(&mut self) -> Result<IpmiRead, ReadError> {
        let readings = self.read_sensors()?;
        Ok(IpmiRead { readings, extra: self.read_extra() })
    }

    fn read_sensors(&mut self) -> Result<Vec<Reading>, ReadError> {
        let mut rebuilt = false;
        if self.rebuild || self.cache_is_stale() {
            self.dump_cache()?;
            self.rebuild = false;
            rebuilt = true;
        }
        let (mut list, mut stderr) = self.list()?;
        // ipmitool exits 0 with an unreadable cache, printing nothing (or falling back to the
        // BMC) and complaining on stderr.
        let cache_failed = list.rows == 0 || stderr.contains("SDR cache") || stderr.contains("sdr header");
        if cache_failed && !rebuilt {
            tracing::info!(cache = %self.cache.display(), "SDR cache unusable ({stderr}); rebuilding");
            self.dump_cache()?;
            rebuilt = true;
            (list, stderr) = self.list()?;
        }
        if list.rows == 0 {
            return Err(ReadError::Failed(format!(
                "{}: no sensors in `sdr list` output{}",
                self.base.program(),
                if stderr.is_empty() { String::new() } else { format!(" ({stderr})") }
            )));
        }
        if rebuilt {
            self.unreadable_after_rebuild = Some(list.unreadable);
        } else if self.unreadable_after_rebuild.is_some_and(|n| list.unreadable > n) {
            // More sensors without a reading than after the last rebuild: the cache may name
            // sensors the BMC no longer has. Report this read, rebuild before the next.
            self.rebuild = true;
        }
        Ok(list.readings)
    }
}

fn exec_error(e: ExecError) -> ReadError {
    if e.is_not_found() {
        ReadError::NotPresent(format!("cannot read IPMI sensors: {e}"))
    } else {
        ReadError::Failed(e.to_string())
    }
}

/// The IPMI collector.
#[derive(Debug)]
pub struct IpmiCollector {
    host: Host,
    local: bool,
    interval: Duration,
    /// One read runs ipmitool up to three times (the SDR cache check, a rebuild, the read).
    read_limit: Duration,
    first_wait: FirstRunWait,
    reader: Option<Reader>,
    refresher: Option<Refresher<Result<IpmiRead, ReadError>>>,
    last_trigger: Option<Instant>,
}

impl IpmiCollector {
    /// A collector with the `ipmi` config section; `host` locates the local BMC device.
    pub fn new(host: Host, config: &IpmiConfig) -> Self {
        let timeout = Duration::from_secs(config.timeout);
        let mut base = Cmd::new(&config.ipmitool)
            .timeout(timeout)
            .max_output(MAX_OUTPUT_BYTES)
            .env("LANG", "C")
            .env("LC_ALL", "C")
            .args(["-I", config.interface.as_str()]);
        if let Some(h) = &config.host {
            base = base.args(["-H", h.as_str()]);
        }
        if config.interface != "open" {
            base = base.args(["-p".to_owned(), config.port.to_string()]);
        }
        if let Some(u) = &config.username {
            base = base.args(["-U", u.as_str()]);
        }
        if let Some(f) = &config.password_file {
            // -f reads the password from the file: it never appears in the process list.
            base = base.args([std::ffi::OsStr::new("-f"), f.as_os_str()]);
        }
        if let Some(c) = config.cipher_suite {
            base = base.args(["-C".to_owned(), c.to_string()]);
        }
        Self {
            host,
            local: config.interface == "open",
            interval: Duration::from_secs(config.interval),
            read_limit: timeout.saturating_mul(3),
            first_wait: FirstRunWait::usual(FIRST_READ_WAIT.min(timeout.saturating_mul(3))),
            reader: Some(Reader {
                base,
                cache: config.sdr_cache.clone(),
                cache_max_age: Duration::from_secs(config.sdr_cache_max_age),
                unreadable_after_rebuild: None,
                rebuild: false,
                sel: config.sel.then(|| (config.sel_state_file.clone(), None)),
                dcmi: config.dcmi,
                sel_worked: false,
                dcmi_worked: false,
                last_extra_error: None,
            }),
            refresher: None,
            last_trigger: None,
        }
    }

    fn local_device(&self) -> Option<PathBuf> {
        LOCAL_DEVICES.iter().map(|d| self.host.path(d)).find(|p| p.exists())
    }
}

impl Collector for IpmiCollector {
    fn name(&self) -> &'static str {
        SOURCE.name
    }

    fn wait_for_first_result(&mut self) -> Option<Duration> {
        self.first_wait.patient = self.read_limit;
        Some(self.read_limit)
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        if self.refresher.is_none() {
            if self.local && self.local_device().is_none() {
                return Err(CollectError::NotPresent(format!(
                    "no local BMC: none of {} exists (load ipmi_si and ipmi_devintf, or set \
                     ipmi.interface to lanplus for a remote BMC)",
                    LOCAL_DEVICES
                        .iter()
                        .map(|d| self.host.path(d).display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            let Some(mut reader) = self.reader.take() else {
                return Err(anyhow::anyhow!("IPMI reader thread is gone").into());
            };
            let r = Refresher::spawn("dcmon-ipmi", move || reader.read())
                .map_err(|e| anyhow::anyhow!("cannot start the IPMI thread: {e}"))?;
            self.refresher = Some(r);
        }
        let Some(refresher) = &self.refresher else {
            return Ok(());
        };
        let first = self.last_trigger.is_none();
        if self.last_trigger.is_none_or(|t| t.elapsed() >= self.interval) && refresher.trigger() {
            self.last_trigger = Some(Instant::now());
        }
        if first {
            refresher.wait_first(self.first_wait, "ipmitool (reading the sensors)");
        }
        match refresher.latest() {
            Some(Ok(read)) => {
                out.extend(read.readings.iter().map(Reading::sample));
                out.extend(read.extra.iter().cloned());
            }
            Some(Err(ReadError::NotPresent(why))) => return Err(CollectError::NotPresent(why)),
            Some(Err(ReadError::Failed(why))) => return Err(anyhow::anyhow!(why).into()),
            None => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
