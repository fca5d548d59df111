//! NVMe SMART/Health per controller, read with the NVMe admin ioctl (Get Log Page 0x02), or
//! through `nvme smart-log -o json` when the ioctl is not permitted.

use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{CollectError, Collector};
use crate::batch::Sample;
use crate::config::{Limit, Section, SectionSpec, UP_TO_AN_HOUR};
use crate::exec::Cmd;
use crate::host::Host;

/// This collector's row in the table ([`super::SOURCES`]).
pub const SOURCE: super::Source = super::Source {
    name: "nvme",
    switch: super::Switch::Exporter { default: true },
    // The NVMe admin ioctl that reads the SMART log.
    caps: &["CAP_SYS_ADMIN"],
    section: Some(SectionSpec::of::<NvmeConfig>()),
    build: Some(|host, config| Box::new(NvmeCollector::new(host.clone(), &config.section::<NvmeConfig>()))),
};

/// The `nvme` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct NvmeConfig {
    /// Controller device nodes (`/dev/nvme0`); empty means every controller in /sys/class/nvme.
    pub devices: Vec<PathBuf>,
    /// The nvme-cli program, used when the admin ioctl is not permitted.
    pub nvme_cli: PathBuf,
    /// Seconds one nvme-cli run may take.
    pub timeout: u64,
}

impl Default for NvmeConfig {
    fn default() -> Self {
        Self { devices: Vec::new(), nvme_cli: PathBuf::from("nvme"), timeout: 5 }
    }
}

impl Section for NvmeConfig {
    fn durations(&self) -> Vec<(&'static str, u64, Limit)> {
        vec![("nvme.timeout", self.timeout, UP_TO_AN_HOUR)]
    }
}

/// Size of the SMART / Health Information log page.
pub const SMART_LOG_BYTES: usize = 512;
/// Kelvin to Celsius in hundredths (NVMe reports whole Kelvin); integer arithmetic first so
/// 358 K prints as 84.85, not 84.85000000000002.
const KELVIN_OFFSET_CENTI: i32 = 27_315;

/// The fields of the SMART / Health Information log that are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmartLog {
    /// Critical Warning bit field (byte 0).
    pub critical_warning: u8,
    /// Composite Temperature in Kelvin (bytes 1-2).
    pub temperature_kelvin: u16,
    /// Available Spare, percent of the spare capacity left (byte 3).
    pub available_spare_pct: u8,
    /// Percentage Used, vendor estimate of life used; may exceed 100 (byte 5).
    pub percentage_used_pct: u8,
    /// Data Units Read, thousands of 512-byte units (bytes 32-47).
    pub data_units_read: u128,
    /// Data Units Written (bytes 48-63).
    pub data_units_written: u128,
    /// Power On Hours (bytes 128-143).
    pub power_on_hours: u128,
    /// Unsafe Shutdowns (bytes 144-159).
    pub unsafe_shutdowns: u128,
    /// Media and Data Integrity Errors (bytes 160-175).
    pub media_errors: u128,
    /// Number of Error Information Log Entries over the controller's life (bytes 176-191):
    /// the entries the Error Information log page (0x01) has held, not the ones it still holds.
    pub error_log_entries: u128,
    /// Warning Composite Temperature Time: minutes the composite temperature was at or above
    /// the warning threshold (WCTEMP) and below the critical one (bytes 192-195).
    pub warning_temp_minutes: u32,
    /// Critical Composite Temperature Time: minutes at or above the critical threshold
    /// (CCTEMP) (bytes 196-199).
    pub critical_temp_minutes: u32,
}

fn counter(name: &'static str, v: u128) -> Sample {
    match u64::try_from(v) {
        Ok(v) => Sample::count(name, v),
        // Above 2^64 (not seen on real drives yet, but the field is 128 bits): the wire has
        // f64 anyway, so keep the magnitude rather than wrapping or saturating.
        #[allow(clippy::cast_precision_loss, reason = "the server stores f64")]
        Err(_) => Sample::gauge(name, v as f64),
    }
}

impl SmartLog {
    /// The metrics of one controller.
    pub fn samples(&self, device: &str, model: &str) -> Vec<Sample> {
        let s = [
            Sample::gauge(
                "nvme_temperature_celsius",
                f64::from(i32::from(self.temperature_kelvin) * 100 - KELVIN_OFFSET_CENTI) / 100.0,
            ),
            Sample::gauge("nvme_available_spare_ratio", f64::from(self.available_spare_pct) / 100.0),
            Sample::gauge("nvme_percentage_used_ratio", f64::from(self.percentage_used_pct) / 100.0),
            Sample::count("nvme_critical_warning_total", u64::from(self.critical_warning)),
            counter("nvme_power_on_hours_total", self.power_on_hours),
            counter("nvme_media_errors_total", self.media_errors),
            counter("nvme_unsafe_shutdowns_total", self.unsafe_shutdowns),
            counter("nvme_data_units_read_total", self.data_units_read),
            counter("nvme_data_units_written_total", self.data_units_written),
            counter("nvme_error_log_entries_total", self.error_log_entries),
            Sample::count("nvme_warning_temperature_seconds_total", u64::from(self.warning_temp_minutes) * 60),
            Sample::count("nvme_critical_temperature_seconds_total", u64::from(self.critical_temp_minutes) * 60),
        ];
        s.into_iter().map(|s| s.label("device", device).label("model", model)).collect()
    }
}

/// The SMART / Health log page as the controller returns it (NVMe Base Specification,
/// "SMART / Health Information (Log Identifier 02h)"); little-endian throughout:
/// ```text
/// 00: crit_warn | 01-02: temp K | 03: spare% | 04: spare thresh% | 05: used% | ...
/// 32: data units read (16 bytes) | 48: written | ... | 128: power on hours | 144: unsafe
/// shutdowns | 160: media errors | 176: error log entries | 192: warning temp time (4 bytes,
/// minutes) | 196: critical temp time (4 bytes, minutes) | ...
/// ```
pub fn parse_smart_log(page: &[u8]) -> Result<SmartLog, String> {
    if page.len() < SMART_LOG_BYTES {
        return Err(format!("SMART log is {} bytes, expected {SMART_LOG_BYTES}", page.len()));
    }
    let u128_at = |off: usize| -> Result<u128, String> {
        page.get(off..off + 16)
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .map(u128::from_le_bytes)
            .ok_or_else(|| format!("SMART log too short for the counter at byte {off}"))
    };
    let byte = |off: usize| page.get(off).copied().unwrap_or(0);
    let u32_at = |off: usize| u32::from_le_bytes([byte(off), byte(off + 1), byte(off + 2), byte(off + 3)]);
    Ok(SmartLog {
        critical_warning: byte(0),
        temperature_kelvin: u16::from_le_bytes([byte(1), byte(2)]),
        available_spare_pct: byte(3),
        percentage_used_pct: byte(5),
        data_units_read: u128_at(32)?,
        data_units_written: u128_at(48)?,
        power_on_hours: u128_at(128)?,
        unsafe_shutdowns: u128_at(144)?,
        media_errors: u128_at(160)?,
        error_log_entries: u128_at(176)?,
        warning_temp_minutes: u32_at(192),
        critical_temp_minutes: u32_at(196),
    })
}

/// One field of nvme-cli's JSON as an integer: nvme-cli 2.3 prints 128-bit counters as strings
/// (`"12345"`), 2.4+ as numbers, 1.x as floats (`12345.000000`); `-H` turns some fields into
/// objects with a `value` member.
fn json_uint(obj: &serde_json::Map<String, serde_json::Value>, key: &str) -> Result<u128, String> {
    use serde_json::Value;
    let v = obj.get(key).ok_or_else(|| format!("nvme-cli JSON has no field {key:?}"))?;
    let v = match v {
        Value::Object(inner) => {
            inner.get("value").ok_or_else(|| format!("nvme-cli JSON field {key:?} is an object without \"value\""))?
        }
        other => other,
    };
    let bad = || format!("nvme-cli JSON field {key:?}: expected a non-negative integer, got {v}");
    match v {
        Value::String(s) => s.trim().parse::<u128>().map_err(|_| bad()),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                Ok(u128::from(u))
            } else {
                // Floats (nvme-cli 1.x) and integers beyond u64 (which serde_json reads as
                // f64): exact up to 2^53, the magnitude beyond.
                let f = n.as_f64().ok_or_else(bad)?;
                if f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f < 3.4e38 {
                    #[allow(
                        clippy::cast_possible_truncation,
                        clippy::cast_sign_loss,
                        reason = "checked: finite, non-negative, integral, below 2^128"
                    )]
                    Ok(f as u128)
                } else {
                    Err(bad())
                }
            }
        }
        _ => Err(bad()),
    }
}

fn json_narrow<T: TryFrom<u128>>(
    obj: &serde_json::Map<String, serde_json::Value>,
    key: &str,
    max: &str,
) -> Result<T, String> {
    let v = json_uint(obj, key)?;
    T::try_from(v).map_err(|_| format!("nvme-cli JSON field {key:?}: {v} is above {max}"))
}

/// ```text
/// {"critical_warning":2,"temperature":358,"avail_spare":97,"percent_used":3,
///  "data_units_read":"18446744073709551621",...,"power_on_hours":"12345",...}
/// ```
/// (`nvme smart-log DEV -o json`, any nvme-cli version; temperature in Kelvin).
pub fn parse_smart_log_json(text: &str) -> Result<SmartLog, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("nvme-cli output is not JSON: {e}"))?;
    let obj = v.as_object().ok_or_else(|| "nvme-cli JSON is not an object".to_owned())?;
    Ok(SmartLog {
        critical_warning: json_narrow(obj, "critical_warning", "255")?,
        temperature_kelvin: json_narrow(obj, "temperature", "65535")?,
        available_spare_pct: json_narrow(obj, "avail_spare", "255")?,
        percentage_used_pct: json_narrow(obj, "percent_used", "255")?,
        data_units_read: json_uint(obj, "data_units_read")?,
        data_units_written: json_uint(obj, "data_units_written")?,
        power_on_hours: json_uint(obj, "power_on_hours")?,
        unsafe_shutdowns: json_uint(obj, "unsafe_shutdowns")?,
        media_errors: json_uint(obj, "media_errors")?,
        error_log_entries: json_uint(obj, "num_err_log_entries")?,
        warning_temp_minutes: json_narrow(obj, "warning_temp_time", "4294967295")?,
        critical_temp_minutes: json_narrow(obj, "critical_comp_time", "4294967295")?,
    })
}

/// `struct nvme_passthru_cmd` from <linux/nvme_ioctl.h> (72 bytes).
#[repr(C)]
#[derive(Debug, Default)]
struct NvmePassthruCmd {
    opcode: u8,
    flags: u8,
    rsvd1: u16,
    nsid: u32,
    cdw2: u32,
    cdw3: u32,
    metadata: u64,
    addr: u64,
    metadata_len: u32,
    data_len: u32,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
    cdw13: u32,
    cdw14: u32,
    cdw15: u32,
    timeout_ms: u32,
    result: u32,
}
const _: () = assert!(std::mem::size_of::<NvmePassthruCmd>() == 72);

/// `_IOWR('N', 0x41, struct nvme_admin_cmd)`.
const NVME_IOCTL_ADMIN_CMD: libc::c_ulong = 0xC048_4E41;
const ADMIN_GET_LOG_PAGE: u8 = 0x02;
const LOG_SMART: u32 = 0x02;
const NSID_ALL: u32 = 0xFFFF_FFFF;

/// How reading the log through the ioctl went.
#[derive(Debug)]
enum IoctlError {
    /// Not allowed (no CAP_SYS_ADMIN, device permissions): try nvme-cli.
    Denied(std::io::Error),
    /// Anything else: report it.
    Other(String),
}

/// Read the SMART log of the controller at `dev` with the admin ioctl.
fn read_smart_log_ioctl(dev: &Path) -> Result<[u8; SMART_LOG_BYTES], IoctlError> {
    let denied = |e: &std::io::Error| matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES));
    let file = std::fs::File::open(dev).map_err(|e| {
        if denied(&e) {
            IoctlError::Denied(e)
        } else {
            IoctlError::Other(format!("cannot open {}: {e}", dev.display()))
        }
    })?;
    let mut page = [0u8; SMART_LOG_BYTES];
    let numd = u32::try_from(SMART_LOG_BYTES / 4 - 1).unwrap_or(0);
    let mut cmd = NvmePassthruCmd {
        opcode: ADMIN_GET_LOG_PAGE,
        nsid: NSID_ALL,
        addr: page.as_mut_ptr() as u64,
        data_len: u32::try_from(SMART_LOG_BYTES).unwrap_or(0),
        // NUMDL (dwords - 1) in bits 31:16, log id in 7:0; RAE 0.
        cdw10: (numd << 16) | LOG_SMART,
        ..NvmePassthruCmd::default()
    };
    // SAFETY: `cmd` matches struct nvme_passthru_cmd (size asserted above) and points at
    // `page`, which is valid for `data_len` bytes and outlives the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), NVME_IOCTL_ADMIN_CMD as _, std::ptr::from_mut(&mut cmd)) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return Err(if denied(&e) {
            IoctlError::Denied(e)
        } else {
            IoctlError::Other(format!("{}: NVMe admin ioctl (Get Log Page 0x02): {e}", dev.display()))
        });
    }
    if rc > 0 {
        return Err(IoctlError::Other(format!("{}: Get Log Page 0x02 failed with NVMe status {rc:#x}", dev.display())));
    }
    Ok(page)
}

/// One controller to read.
#[derive(Debug, Clone)]
struct Controller {
    /// `nvme0`.
    name: String,
    /// `/dev/nvme0` (under the host root when discovered).
    dev: PathBuf,
    /// Set once the ioctl was denied, so later rounds go straight to nvme-cli.
    use_cli: bool,
}

/// The NVMe collector.
#[derive(Debug)]
pub struct NvmeCollector {
    host: Host,
    configured: Vec<PathBuf>,
    nvme_cli: PathBuf,
    timeout: Duration,
    controllers: Option<Vec<Controller>>,
}

fn is_controller_name(name: &str) -> bool {
    name.strip_prefix("nvme").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

impl NvmeCollector {
    /// A collector for `host` with the `nvme` config section.
    pub fn new(host: Host, config: &NvmeConfig) -> Self {
        Self {
            host,
            configured: config.devices.clone(),
            nvme_cli: config.nvme_cli.clone(),
            timeout: Duration::from_secs(config.timeout),
            controllers: None,
        }
    }

    fn discover(&self) -> Result<Vec<Controller>, CollectError> {
        if !self.configured.is_empty() {
            return Ok(self
                .configured
                .iter()
                .map(|dev| Controller {
                    name: dev
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| dev.display().to_string()),
                    dev: dev.clone(),
                    use_cli: false,
                })
                .collect());
        }
        let class = self.host.path("/sys/class/nvme");
        let entries = match std::fs::read_dir(&class) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CollectError::NotPresent(format!("no {}: no NVMe driver or controller", class.display())));
            }
            Err(e) => {
                return Err(anyhow::anyhow!("cannot list {}: {e}", class.display()).into());
            }
        };
        let mut found: Vec<Controller> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| is_controller_name(n))
            .map(|name| Controller { dev: self.host.path(format!("/dev/{name}")), name, use_cli: false })
            .collect();
        if found.is_empty() {
            return Err(CollectError::NotPresent(format!("no NVMe controllers in {}", class.display())));
        }
        found.sort_by_key(|c| {
            (
                c.name.len(),
                c.name.clone(), // nvme2 before nvme10
            )
        });
        Ok(found)
    }

    fn model(&self, name: &str) -> String {
        self.host
            .read_to_string(format!("/sys/class/nvme/{name}/model"))
            .map(|m| m.trim().to_owned())
            .unwrap_or_default()
    }

    fn read_cli(&self, dev: &Path) -> anyhow::Result<SmartLog> {
        let out = Cmd::new(&self.nvme_cli)
            .args([
                std::ffi::OsStr::new("smart-log"),
                dev.as_os_str(),
                std::ffi::OsStr::new("-o"),
                std::ffi::OsStr::new("json"),
            ])
            .timeout(self.timeout)
            .max_output(1 << 20)
            .run()?;
        parse_smart_log_json(&String::from_utf8_lossy(&out.stdout))
            .map_err(|e| anyhow::anyhow!("{} smart-log {}: {e}", self.nvme_cli.display(), dev.display()))
    }
}

impl Collector for NvmeCollector {
    fn name(&self) -> &'static str {
        SOURCE.name
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), CollectError> {
        let mut controllers = match self.controllers.take() {
            Some(c) => c,
            None => self.discover()?,
        };
        let mut errors = Vec::new();
        for c in &mut controllers {
            let log = if c.use_cli {
                self.read_cli(&c.dev)
            } else {
                match read_smart_log_ioctl(&c.dev) {
                    Ok(page) => parse_smart_log(&page).map_err(|e| anyhow::anyhow!("{}: {e}", c.dev.display())),
                    Err(IoctlError::Denied(e)) => {
                        tracing::info!(
                            device = %c.dev.display(),
                            "NVMe admin ioctl not permitted ({e}); using {}",
                            self.nvme_cli.display()
                        );
                        c.use_cli = true;
                        self.read_cli(&c.dev)
                    }
                    Err(IoctlError::Other(e)) => Err(anyhow::anyhow!(e)),
                }
            };
            match log {
                Ok(log) => out.extend(log.samples(&c.name, &self.model(&c.name))),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        // Discovery is kept: controllers come and go with hot-plug rarely, and a new one is
        // picked up when the agent restarts.
        self.controllers = Some(controllers);
        if errors.is_empty() { Ok(()) } else { Err(anyhow::anyhow!("NVMe SMART log: {}", errors.join("; ")).into()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_names() {
        assert!(is_controller_name("nvme0"));
        assert!(is_controller_name("nvme12"));
        assert!(!is_controller_name("nvme"));
        assert!(!is_controller_name("nvme0n1"));
        assert!(!is_controller_name("nvme-subsys0"));
    }

    #[test]
    fn short_page_is_an_error() {
        let e = parse_smart_log(&[0u8; 100]).expect_err("short");
        assert!(e.contains("100 bytes") && e.contains("512"), "{e}");
    }

    #[test]
    fn no_sysfs_class_is_not_present() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = NvmeCollector::new(Host::new(dir.path()), &NvmeConfig::default());
        assert!(matches!(c.collect(&mut Vec::new()), Err(CollectError::NotPresent(_))));
        std::fs::create_dir_all(dir.path().join("sys/class/nvme")).expect("mkdir");
        let mut c = NvmeCollector::new(Host::new(dir.path()), &NvmeConfig::default());
        assert!(matches!(c.collect(&mut Vec::new()), Err(CollectError::NotPresent(_))));
    }

    #[test]
    fn a_regular_file_is_not_an_nvme_device() {
        // The real ioctl on a non-NVMe fd fails with ENOTTY: an error naming the device.
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = dir.path().join("nvme7");
        std::fs::write(&dev, [0u8; 16]).expect("write");
        let config = NvmeConfig { devices: vec![dev.clone()], ..NvmeConfig::default() };
        let mut c = NvmeCollector::new(Host::new(dir.path()), &config);
        let err = c.collect(&mut Vec::new()).expect_err("not nvme");
        assert!(err.to_string().contains("NVMe"), "{err}");
        assert!(format!("{err:#}").contains("nvme7"), "{err:#}");
    }
}
