//! The BMC's System Event Log, read incrementally, and the DCMI power reading, both through
//! ipmitool on the IPMI collector's thread ([`super::ipmi`]).
//!
//! Each IPMI read asks `sel info` (one command): the fill level, and whether entries were added
//! or deleted since the last look. Only then is `sel list` read, and only the entries after the
//! last one counted before are counted, by sensor type, event and direction. The last entry
//! counted (its record id and text) and the counts are kept in a small state file
//! (`ipmi.sel_state_file`), so a restart neither counts old entries again nor resets the
//! counters. When that entry is no longer in the log (the log was cleared, or a circular log
//! dropped its oldest entries, ours among them), every entry listed is newer than it and is
//! counted. On the first read ever, every entry already in the log is counted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::batch::Sample;

/// One `sel list` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelEntry {
    /// Record id (ipmitool prints it in hex).
    pub id: u32,
    /// Everything after the id, as printed: date, time, sensor, event, direction.
    pub text: String,
    /// The sensor type: `Temperature` of `Temperature #0x30`.
    pub sensor_type: String,
    /// `Upper Critical going high`, `Correctable ECC`; `oem` for OEM records (raw data).
    pub event: String,
    /// `Asserted`, `Deasserted`, or empty.
    pub direction: String,
}

/// ```text
///    1 | 06/08/2023 | 14:01:37 | Temperature #0x30 | Upper Critical going high | Asserted
///    2 |  Pre-Init  |0000002356| Memory #0x53 | Correctable ECC | Asserted
///   1c | 02/14/2019 | 09:38:23 | OEM record e0 | 000000 | 2b0402ffffff
/// ```
/// (`ipmitool sel list`, oldest first; `SEL has no entries` when empty). A row that is not in
/// this shape is an error naming it.
pub fn parse_sel_list(text: &str) -> Result<Vec<SelEntry>, String> {
    let mut entries = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed == "SEL has no entries" {
            continue;
        }
        let fields: Vec<&str> = line.split('|').map(str::trim).collect();
        let bad =
            || format!("ipmitool sel list: expected \"ID | DATE | TIME | SENSOR | EVENT [| DIRECTION]\", got {line:?}");
        if fields.len() < 5 {
            return Err(bad());
        }
        let id = u32::from_str_radix(fields[0], 16).map_err(|_| bad())?;
        let sensor = fields[3];
        let oem = sensor.starts_with("OEM record");
        let sensor_type = match sensor.rsplit_once(" #0x") {
            Some((t, _)) => t,
            None if oem => "OEM record",
            None => sensor,
        };
        entries.push(SelEntry {
            id,
            text: fields[1..].join(" | "),
            sensor_type: sensor_type.to_owned(),
            event: if oem { "oem".to_owned() } else { fields[4].to_owned() },
            direction: if oem { String::new() } else { fields.get(5).copied().unwrap_or_default().to_owned() },
        });
    }
    Ok(entries)
}

/// What `sel info` says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SelInfo {
    /// Entries in the log.
    pub entries: u64,
    /// Free space in bytes (`65535 bytes or more` is 65535).
    pub free_bytes: Option<u64>,
    /// Percent used (`unknown` when the free space is not known).
    pub percent_used: Option<u64>,
    /// The log overflowed (entries were dropped or refused).
    pub overflow: Option<bool>,
    /// `Last Add Time` and `Last Del Time` as printed: a change means entries came or went.
    pub changed_marks: (String, String),
}

/// ```text
/// Entries          : 3
/// Free Space       : 752 bytes
/// Percent Used     : 6%
/// Last Add Time    : 06/08/2023 14:01:37
/// Last Del Time    : Not Available
/// Overflow         : false
/// ```
/// (`ipmitool sel info`; other lines ignored). Without an `Entries` line it is an error.
pub fn parse_sel_info(text: &str) -> Result<SelInfo, String> {
    let mut info = SelInfo::default();
    let mut entries = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        let number = || value.split_whitespace().next().and_then(|n| n.trim_end_matches('%').parse::<u64>().ok());
        match key.trim() {
            "Entries" => {
                entries = Some(
                    number().ok_or_else(|| format!("ipmitool sel info: Entries is {value:?}, expected a number"))?,
                );
            }
            "Free Space" => info.free_bytes = number(),
            "Percent Used" => info.percent_used = number(),
            "Overflow" => info.overflow = Some(value == "true"),
            "Last Add Time" => info.changed_marks.0 = value.to_owned(),
            "Last Del Time" => info.changed_marks.1 = value.to_owned(),
            _ => {}
        }
    }
    info.entries = entries.ok_or_else(|| format!("ipmitool sel info: no \"Entries\" line in {text:?}"))?;
    Ok(info)
}

impl SelInfo {
    /// The fill-level metrics.
    pub fn samples(&self) -> Vec<Sample> {
        let mut s = vec![Sample::count("ipmi_sel_entries", self.entries)];
        s.extend(self.free_bytes.map(|v| Sample::count("ipmi_sel_free_bytes", v)));
        s.extend(self.percent_used.map(|v| Sample::count("ipmi_sel_used_percent", v)));
        s.extend(self.overflow.map(|v| Sample::count("ipmi_sel_overflow", u64::from(v))));
        s
    }
}

/// The DCMI power reading, in watts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DcmiPower {
    /// Instantaneous.
    pub current: f64,
    /// Minimum over the sampling period.
    pub minimum: f64,
    /// Maximum over the sampling period.
    pub maximum: f64,
    /// Average over the sampling period.
    pub average: f64,
    /// The sampling period in seconds, when printed.
    pub period_seconds: Option<f64>,
}

/// ```text
///     Instantaneous power reading:                   220 Watts
///     Minimum during sampling period:                 50 Watts
///     Maximum during sampling period:                372 Watts
///     Average power reading over sample period:      218 Watts
///     IPMI timestamp:                           Thu Jun  8 14:01:37 2023
///     Sampling period:                          00000001 Seconds.
///     Power reading state is:                   activated
/// ```
/// (`ipmitool dcmi power reading`, 1.8.18/1.8.19). `Ok(None)` when the state is `deactivated`
/// (the BMC does not measure: the numbers mean nothing); an error when a reading is missing.
pub fn parse_dcmi_power(text: &str) -> Result<Option<DcmiPower>, String> {
    let mut values: BTreeMap<&str, f64> = BTreeMap::new();
    let mut state = None;
    let mut period = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let (key, value) = (key.trim(), value.trim());
        let first = value.split_whitespace().next().unwrap_or_default();
        match key {
            "Instantaneous power reading"
            | "Minimum during sampling period"
            | "Maximum during sampling period"
            | "Average power reading over sample period" => {
                let v: f64 =
                    first.parse().ok().filter(|v: &f64| v.is_finite()).ok_or_else(|| {
                        format!("ipmitool dcmi power reading: {key} is {value:?}, expected \"N Watts\"")
                    })?;
                values.insert(key, v);
            }
            "Sampling period" => {
                let n: Option<f64> = first.parse().ok();
                period = n.map(|n| if value.contains("Milliseconds") { n / 1000.0 } else { n });
            }
            "Power reading state is" => state = Some(value.to_owned()),
            _ => {}
        }
    }
    if state.as_deref() == Some("deactivated") {
        return Ok(None);
    }
    let get = |k: &str| {
        values.get(k).copied().ok_or_else(|| format!("ipmitool dcmi power reading: no \"{k}\" line in {text:?}"))
    };
    Ok(Some(DcmiPower {
        current: get("Instantaneous power reading")?,
        minimum: get("Minimum during sampling period")?,
        maximum: get("Maximum during sampling period")?,
        average: get("Average power reading over sample period")?,
        period_seconds: period,
    }))
}

impl DcmiPower {
    /// The power metrics.
    pub fn samples(&self) -> Vec<Sample> {
        let mut s = vec![
            Sample::gauge("ipmi_dcmi_power_watts", self.current),
            Sample::gauge("ipmi_dcmi_power_minimum_watts", self.minimum),
            Sample::gauge("ipmi_dcmi_power_maximum_watts", self.maximum),
            Sample::gauge("ipmi_dcmi_power_average_watts", self.average),
        ];
        s.extend(self.period_seconds.map(|p| Sample::gauge("ipmi_dcmi_power_sampling_period_seconds", p)));
        s
    }
}

/// What is kept across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    /// The last entry counted: its record id and text.
    last: Option<(u32, String)>,
    /// (sensor type, event, direction) -> entries counted.
    counts: Vec<(String, String, String, u64)>,
}

/// The counts so far and where counting stopped; lives on the IPMI thread.
#[derive(Debug)]
pub struct SelTracker {
    path: PathBuf,
    last: Option<(u32, String)>,
    counts: BTreeMap<(String, String, String), u64>,
    /// `sel info`'s entries and marks at the last listing.
    listed_at: Option<(u64, (String, String))>,
}

impl SelTracker {
    /// A tracker that keeps its state in `path`; a missing file is a first start, an unreadable
    /// or corrupt one is logged, naming it, and counting starts afresh.
    pub fn load(path: &Path) -> Self {
        let state = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice::<State>(&bytes).unwrap_or_else(|e| {
                tracing::warn!(
                    "{}: not an IPMI SEL state file ({e}); counting the SEL's entries afresh",
                    path.display()
                );
                State::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => {
                tracing::warn!("cannot read {}: {e}; counting the SEL's entries afresh", path.display());
                State::default()
            }
        };
        Self {
            path: path.to_owned(),
            last: state.last,
            counts: state.counts.into_iter().map(|(t, e, d, n)| ((t, e, d), n)).collect(),
            listed_at: None,
        }
    }

    /// Whether `sel list` must be read after this `sel info`.
    pub fn needs_listing(&self, info: &SelInfo) -> bool {
        self.listed_at.as_ref().is_none_or(|(n, marks)| *n != info.entries || *marks != info.changed_marks)
    }

    /// Count the entries of `list` after the last one counted, and save the state when it
    /// changed. Returns how many were new.
    pub fn update(&mut self, info: &SelInfo, list: &[SelEntry]) -> Result<usize, String> {
        let start = match &self.last {
            Some((id, text)) => list.iter().position(|e| e.id == *id && e.text == *text).map_or(0, |p| p + 1),
            None => 0,
        };
        let new = &list[start.min(list.len())..];
        for e in new {
            *self.counts.entry((e.sensor_type.clone(), e.event.clone(), e.direction.clone())).or_insert(0) += 1;
        }
        let last = list.last().map(|e| (e.id, e.text.clone()));
        self.listed_at = Some((info.entries, info.changed_marks.clone()));
        if last != self.last || !new.is_empty() {
            self.last = last;
            self.save()?;
        }
        Ok(new.len())
    }

    fn save(&self) -> Result<(), String> {
        let state = State {
            last: self.last.clone(),
            counts: self.counts.iter().map(|((t, e, d), n)| (t.clone(), e.clone(), d.clone(), *n)).collect(),
        };
        let bytes = serde_json::to_vec(&state).map_err(|e| format!("IPMI SEL state: {e}"))?;
        crate::secure_file::write_replacing(&self.path, &bytes)
    }

    /// `ipmi_sel_events_total` per sensor type, event and direction.
    pub fn samples(&self) -> Vec<Sample> {
        self.counts
            .iter()
            .map(|((t, e, d), n)| {
                Sample::count("ipmi_sel_events_total", *n)
                    .label("sensor_type", t.as_str())
                    .label("event", e.as_str())
                    .label("direction", d.as_str())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from ipmitool 1.8.19 against ipmi_sim (entries added with `sel add`).
    const SIM_SEL_LIST: &str = "   1 |  Pre-Init  |0000002356| Temperature #0x30 | Upper Critical going high | Asserted
   2 |  Pre-Init  |0000002356| Memory #0x53 | Correctable ECC | Asserted
   3 |  Pre-Init  |0000002356| Power Supply #0x61 | Failure detected | Asserted
";
    /// Rows in the shapes of real BMCs' logs (dates, hex ids above 9, OEM records, deasserts).
    const BMC_SEL_LIST: &str = "   a | 06/08/2023 | 14:01:37 | Memory #0x53 | Correctable ECC | Asserted
   b | 06/08/2023 | 14:02:10 | Temperature #0x30 | Upper Critical going high | Deasserted
  1c | 02/14/2019 | 09:38:23 | OEM record e0 | 000000 | 2b0402ffffff
  1d | 02/14/2019 | 09:40:00 | Power Unit #0x01 | Power off/down | Asserted
";
    const SIM_SEL_INFO: &str = "SEL Information
Version          : 1.5 (v1.5, v2 compliant)
Entries          : 3
Free Space       : 752 bytes 
Percent Used     : 6%
Last Add Time    : S+ 00:39:16
Last Del Time    : Not Available
Overflow         : false
Supported Cmds   : 'Delete' 'Reserve' 
";
    /// A Dell iDRAC's `sel info` (free space past 64 KiB).
    const BMC_SEL_INFO: &str = "SEL Information
Version          : 1.5 (v1.5, v2 compliant)
Entries          : 1024
Free Space       : 65535 bytes or more
Percent Used     : unknown
Last Add Time    : 06/08/2023 14:01:37
Last Del Time    : 01/01/2023 00:00:00
Overflow         : true
Supported Cmds   : 'Reserve' 'Get Alloc Info'
# of Alloc Units : 3639
Alloc Unit Size  : 18
# Free Units     : 2615
Largest Free Blk : 2615
Max Record Size  : 18
";
    /// ipmitool 1.8.19 on a Dell PowerEdge.
    const DCMI_POWER: &str = "

    Instantaneous power reading:                   168 Watts
    Minimum during sampling period:                 16 Watts
    Maximum during sampling period:                348 Watts
    Average power reading over sample period:      168 Watts
    IPMI timestamp:                           Thu Aug 31 08:08:53 2023
    Sampling period:                          00000001 Seconds.
    Power reading state is:                   activated


";

    #[test]
    fn sel_lists_parse() {
        let l = parse_sel_list(SIM_SEL_LIST).expect("sim");
        assert_eq!(l.len(), 3);
        assert_eq!(
            (l[0].id, l[0].sensor_type.as_str(), l[0].event.as_str(), l[0].direction.as_str()),
            (1, "Temperature", "Upper Critical going high", "Asserted")
        );
        assert_eq!(l[2].sensor_type, "Power Supply");
        let l = parse_sel_list(BMC_SEL_LIST).expect("bmc");
        let ids: Vec<u32> = l.iter().map(|e| e.id).collect();
        assert_eq!(ids, [10, 11, 0x1c, 0x1d]);
        assert_eq!(l[1].direction, "Deasserted");
        assert_eq!(
            (l[2].sensor_type.as_str(), l[2].event.as_str(), l[2].direction.as_str()),
            ("OEM record", "oem", "")
        );
        assert_eq!(l[3].event, "Power off/down");
        assert_eq!(parse_sel_list("SEL has no entries\n"), Ok(vec![]));
        let e = parse_sel_list("   1 | only | three\n").expect_err("short");
        assert!(e.contains("ipmitool sel list: expected") && e.contains("only"), "{e}");
        assert!(parse_sel_list("  zz | a | b | c | d | e\n").is_err());
    }

    #[test]
    fn sel_info_parses() {
        let i = parse_sel_info(SIM_SEL_INFO).expect("sim");
        assert_eq!((i.entries, i.free_bytes, i.percent_used, i.overflow), (3, Some(752), Some(6), Some(false)));
        assert_eq!(i.changed_marks, ("S+ 00:39:16".to_owned(), "Not Available".to_owned()));
        let i = parse_sel_info(BMC_SEL_INFO).expect("bmc");
        assert_eq!((i.entries, i.free_bytes, i.percent_used, i.overflow), (1024, Some(65535), None, Some(true)));
        let names: Vec<&str> = i.samples().iter().map(|s| s.name).collect();
        assert_eq!(names, ["ipmi_sel_entries", "ipmi_sel_free_bytes", "ipmi_sel_overflow"]);
        let e = parse_sel_info("Could not open device\n").expect_err("no entries");
        assert!(e.contains("no \"Entries\" line"), "{e}");
        assert!(parse_sel_info("Entries : many\n").expect_err("nan").contains("expected a number"));
    }

    #[test]
    fn dcmi_power_parses() {
        let p = parse_dcmi_power(DCMI_POWER).expect("ok").expect("activated");
        assert_eq!(
            p,
            DcmiPower { current: 168.0, minimum: 16.0, maximum: 348.0, average: 168.0, period_seconds: Some(1.0) }
        );
        let names: Vec<&str> = p.samples().iter().map(|s| s.name).collect();
        assert_eq!(names.len(), 5);
        let off = DCMI_POWER.replace("activated", "deactivated");
        assert_eq!(parse_dcmi_power(&off), Ok(None));
        let e = parse_dcmi_power(&DCMI_POWER.replace("   168 Watts\n    Min", "   n/a\n    Min")).expect_err("bad");
        assert!(e.contains("Instantaneous power reading") && e.contains("expected \"N Watts\""), "{e}");
        let e = parse_dcmi_power("DCMI request failed because: Invalid command (c1)\n").expect_err("none");
        assert!(e.contains("no \"Instantaneous power reading\" line"), "{e}");
    }

    fn counts(t: &SelTracker) -> Vec<(String, u64)> {
        t.samples()
            .iter()
            .map(|s| (s.labels.iter().map(|(_, v)| v.as_str()).collect::<Vec<_>>().join("/"), s.value.as_f64() as u64))
            .collect()
    }

    #[test]
    fn counts_only_new_entries_across_restarts_clears_and_wraps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/ipmi-sel.state");
        let info = |n: u64, add: &str| SelInfo {
            entries: n,
            changed_marks: (add.into(), String::new()),
            ..SelInfo::default()
        };
        let sim = parse_sel_list(SIM_SEL_LIST).expect("sim");
        let mut t = SelTracker::load(&path);
        assert!(t.needs_listing(&info(3, "a")));
        assert_eq!(t.update(&info(3, "a"), &sim), Ok(3), "first read counts what is there");
        assert!(!t.needs_listing(&info(3, "a")), "nothing changed: no listing");
        assert!(t.needs_listing(&info(3, "b")), "same count, new add time (a delete and an add)");
        assert_eq!(t.update(&info(3, "a"), &sim), Ok(0));
        // A restart: the state file says where counting stopped.
        let mut t = SelTracker::load(&path);
        let mut more = sim.clone();
        more.push(SelEntry {
            id: 4,
            text: "x".into(),
            sensor_type: "Memory".into(),
            event: "Correctable ECC".into(),
            direction: "Asserted".into(),
        });
        assert_eq!(t.update(&info(4, "b"), &more), Ok(1));
        assert_eq!(
            counts(&t),
            [
                ("Memory/Correctable ECC/Asserted".to_owned(), 2),
                ("Power Supply/Failure detected/Asserted".to_owned(), 1),
                ("Temperature/Upper Critical going high/Asserted".to_owned(), 1),
            ]
        );
        // Cleared, then one entry that reuses id 1 with other text: counted.
        let cleared = vec![SelEntry { id: 1, text: "later".into(), ..more[0].clone() }];
        assert_eq!(t.update(&info(1, "c"), &cleared), Ok(1));
        // A circular log that dropped the oldest entries, ours among them: all listed are new.
        let wrapped = parse_sel_list(BMC_SEL_LIST).expect("bmc");
        assert_eq!(t.update(&info(4, "d"), &wrapped), Ok(4));
        assert_eq!(t.update(&info(4, "d"), &wrapped), Ok(0));
        // An empty log: nothing new, and the next entries all count.
        assert_eq!(t.update(&info(0, "e"), &[]), Ok(0));
        assert_eq!(t.update(&info(1, "f"), &wrapped[..1]), Ok(1));
        // A corrupt state file starts afresh.
        std::fs::write(&path, "{garbage").expect("write");
        let t = SelTracker::load(&path);
        assert!(t.samples().is_empty());
    }
}
