//! Unit tests of the IPMI collector: the SDR list parser, the reader against captured and
//! scripted ipmitool output (cache rebuilds, SEL and DCMI), and the collector.

use super::*;

/// Captured from `ipmitool -I lanplus ... -S cache sdr list all` against ipmi_sim.
const SIM_SDR_LIST: &str = "\
CPU Temp         | 48 degrees C      | ok
FAN1             | 5400 RPM          | ok
PSU1 Power       | 360 Watts         | ok
12V              | 12 Volts          | ok
PSU1 Current     | 2.50 Amps         | ok
Intrusion        | 0x01              | ok
Temp             | 41 degrees C      | ok
Temp             | 43 degrees C      | ok
Inlet            | -10 degrees C     | ok
Missing          | no reading        | ns
";

/// Rows in the shapes real server BMCs print (Supermicro/Dell style): locator records,
/// percent and CFM units, `na`, disabled sensors, Fahrenheit, duplicate names.
const BMC_SDR_LIST: &str = "\
CPU1 Temp        | 41 degrees C      | ok
Inlet Temp       | 75 degrees F      | ok
FAN1             | na                | ns
FAN2             | 8400 RPM          | ok
PS1 Status       | 0x01              | ok
PS2 Status       | 0x00              | ok
Pwr Consumption  | 238 Watts         | ok
Current 1        | 0.60 Amps         | ok
Voltage 1        | 230 Volts         | ok
Airflow          | 43.20 CFM         | ok
CPU Usage        | 12 percent        | ok
Intrusion        | disabled          | ns
Temp             | -7 degrees C      | ok
Temp             | 29 degrees C      | ok
BMC              | Dynamic MC @ 20h  | ok
garbage line without fields
";

fn find<'a>(l: &'a SdrList, sensor: &str) -> Vec<&'a Reading> {
    l.readings.iter().filter(|r| r.sensor == sensor).collect()
}

#[test]
fn sim_list_parses_every_kind() {
    let l = parse_sdr_list(SIM_SDR_LIST);
    assert_eq!(l.rows, 10);
    assert_eq!(l.unreadable, 1);
    let one = |s: &str| {
        let r = find(&l, s);
        assert_eq!(r.len(), 1, "{s}");
        (r[0].kind, r[0].value)
    };
    assert_eq!(one("CPU Temp"), (Kind::Temperature, 48.0));
    assert_eq!(one("FAN1"), (Kind::Speed, 5400.0));
    assert_eq!(one("PSU1 Power"), (Kind::Power, 360.0));
    assert_eq!(one("12V"), (Kind::Volts, 12.0));
    assert_eq!(one("PSU1 Current"), (Kind::Amps, 2.5));
    assert_eq!(one("Intrusion"), (Kind::State, 1.0));
    assert_eq!(one("Inlet"), (Kind::Temperature, -10.0));
    assert!(find(&l, "Missing").is_empty());
    let temps = find(&l, "Temp");
    assert_eq!(temps.len(), 2);
    assert_ne!(temps[0].id, temps[1].id);
    assert_eq!((temps[0].value, temps[1].value), (41.0, 43.0));
}

#[test]
fn real_bmc_shapes() {
    let l = parse_sdr_list(BMC_SDR_LIST);
    assert_eq!(l.rows, 15, "locator record counts as a row, garbage does not");
    assert_eq!(l.unreadable, 2, "na and disabled");
    let inlet = find(&l, "Inlet Temp")[0];
    assert!((inlet.value - 23.888_888).abs() < 1e-3, "{}", inlet.value);
    assert_eq!(find(&l, "PS2 Status")[0].value, 0.0);
    assert!(find(&l, "FAN1").is_empty());
    assert!(find(&l, "Airflow").is_empty() && find(&l, "CPU Usage").is_empty());
    assert!(find(&l, "BMC").is_empty());
    let temps: Vec<f64> = find(&l, "Temp").iter().map(|r| r.value).collect();
    assert_eq!(temps, [-7.0, 29.0]);
    let ids: Vec<usize> = find(&l, "Temp").iter().map(|r| r.id).collect();
    assert_eq!(ids, [12, 13]);
    assert_eq!(l.readings.len(), 10);
}

#[test]
fn nan_and_inf_readings_are_skipped() {
    let l = parse_sdr_list("A | nan degrees C | ok\nB | inf Watts | ok\nC | 0xzz | ok\n");
    assert!(l.readings.is_empty());
    assert_eq!(l.rows, 3);
}

#[test]
fn samples_carry_sensor_and_id() {
    let l = parse_sdr_list(SIM_SDR_LIST);
    let s = l.readings[6].sample();
    assert_eq!(s.name, "ipmi_temperature_celsius");
    assert_eq!(s.labels, [("sensor", "Temp".into()), ("id", "6".into())]);
}

/// A fake ipmitool: `sdr dump FILE` logs "dump" and writes FILE; `-S FILE sdr list all`
/// logs "list" and prints the file `list` beside the script.
fn fake_ipmitool(dir: &std::path::Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let script = dir.join("ipmitool");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nd={d}\nfor a in \"$@\"; do last=\"$a\"; done\n\
             case \"$*\" in\n\
             *'sdr dump'*) echo dump >> $d/calls; echo cache > \"$last\";;\n\
             *'sdr list all'*) echo list >> $d/calls; cat $d/list;;\n\
             *'sel info'*) echo sel-info >> $d/calls; cat $d/sel-info;;\n\
             *'sel list'*) echo sel-list >> $d/calls; cat $d/sel-list;;\n\
             *'dcmi power reading'*) echo dcmi >> $d/calls; cat $d/dcmi || exit 1;;\n\
             esac\n",
            d = dir.display()
        ),
    )
    .expect("write");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    script
}

#[test]
fn cache_is_rebuilt_when_missing_stale_or_sensors_go_unreadable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mut reader = Reader {
        base: Cmd::new(fake_ipmitool(d)),
        cache: d.join("cache/sdr"),
        cache_max_age: Duration::from_secs(3600),
        unreadable_after_rebuild: None,
        rebuild: false,
        sel: None,
        dcmi: false,
        sel_worked: false,
        dcmi_worked: false,
        last_extra_error: None,
    };
    let calls = || std::fs::read_to_string(d.join("calls")).unwrap_or_default();
    std::fs::write(d.join("list"), "A | 1 Volts | ok\nB | no reading | ns\n").expect("w");
    // Missing cache: dump, then list.
    assert_eq!(reader.read().expect("read").readings.len(), 1);
    assert_eq!(calls(), "dump\nlist\n");
    // Fresh cache, same unreadable count: list only.
    reader.read().expect("read");
    assert_eq!(calls(), "dump\nlist\nlist\n");
    // A sensor goes unreadable: this read is reported, the next one rebuilds first.
    std::fs::write(d.join("list"), "A | na | ns\nB | no reading | ns\n").expect("w");
    assert!(reader.read().expect("read").readings.is_empty());
    assert_eq!(calls(), "dump\nlist\nlist\nlist\n");
    reader.read().expect("read");
    assert_eq!(calls(), "dump\nlist\nlist\nlist\ndump\nlist\n");
    // Still two unreadable after the rebuild: that is the new normal, no more rebuilds.
    reader.read().expect("read");
    assert_eq!(calls(), "dump\nlist\nlist\nlist\ndump\nlist\nlist\n");
    // Output without a single sensor row: rebuild once and retry, then fail.
    std::fs::write(d.join("list"), "").expect("w");
    let err = reader.read().expect_err("no rows");
    assert!(matches!(&err, ReadError::Failed(m) if m.contains("no sensors")), "{err:?}");
    assert!(calls().ends_with("list\ndump\nlist\n"), "{}", calls());
    // Stale by age.
    reader.cache_max_age = Duration::from_millis(1);
    std::fs::write(d.join("list"), "A | 1 Volts | ok\n").expect("w");
    std::fs::remove_file(d.join("calls")).expect("rm");
    std::thread::sleep(Duration::from_millis(20));
    reader.read().expect("read");
    assert_eq!(calls(), "dump\nlist\n");
}

#[test]
fn no_local_bmc_is_not_present() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = IpmiCollector::new(Host::new(dir.path()), &IpmiConfig::default());
    let err = c.collect(&mut Vec::new()).expect_err("absent");
    assert!(matches!(&err, CollectError::NotPresent(w) if w.contains("ipmi0")), "{err}");
}

#[test]
fn missing_ipmitool_is_not_present() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("dev")).expect("mkdir");
    std::fs::write(dir.path().join("dev/ipmi0"), "").expect("touch");
    let config = IpmiConfig {
        ipmitool: "/nonexistent/ipmitool".into(),
        sdr_cache: dir.path().join("cache/sdr"),
        ..IpmiConfig::default()
    };
    let mut c = IpmiCollector::new(Host::new(dir.path()), &config);
    let err = c.collect(&mut Vec::new()).expect_err("absent");
    assert!(matches!(&err, CollectError::NotPresent(w) if w.contains("/nonexistent/ipmitool")), "{err}");
}

#[test]
fn a_fahrenheit_reading_too_large_to_convert_is_no_reading() {
    let list = parse_sdr_list("Inlet | -1.7e308 degrees F | ok\nOutlet | 1e308 degrees F | ok\n");
    assert_eq!((list.rows, list.readings), (2, vec![]));
}

/// SEL and DCMI through the reader with captured ipmitool output: DCMI power reported,
/// the SEL listed only when `sel info` changed, and a BMC without DCMI asked once.
#[test]
fn sel_and_dcmi_through_the_reader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mut reader = Reader {
        base: Cmd::new(fake_ipmitool(d)),
        cache: d.join("cache/sdr"),
        cache_max_age: Duration::from_secs(3600),
        unreadable_after_rebuild: None,
        rebuild: false,
        sel: Some((d.join("sel.state"), None)),
        dcmi: true,
        sel_worked: false,
        dcmi_worked: false,
        last_extra_error: None,
    };
    std::fs::write(d.join("list"), "A | 1 Volts | ok\n").expect("w");
    std::fs::write(d.join("sel-info"), "Entries          : 1\nFree Space       : 784 bytes\nPercent Used     : 2%\nLast Add Time    : 06/08/2023 14:01:37\n").expect("w");
    std::fs::write(d.join("sel-list"), "   1 | 06/08/2023 | 14:01:37 | Memory #0x53 | Correctable ECC | Asserted\n")
        .expect("w");
    std::fs::write(d.join("dcmi"), "    Instantaneous power reading:                   168 Watts\n    Minimum during sampling period:                 16 Watts\n    Maximum during sampling period:                348 Watts\n    Average power reading over sample period:      168 Watts\n    Sampling period:                          00000001 Seconds.\n    Power reading state is:                   activated\n").expect("w");
    let calls = || std::fs::read_to_string(d.join("calls")).unwrap_or_default();
    let value = |r: &IpmiRead, name: &str| r.extra.iter().find(|s| s.name == name).map(|s| s.value.as_f64());
    let r = reader.read().expect("read");
    assert_eq!(value(&r, "ipmi_dcmi_power_watts"), Some(168.0));
    assert_eq!(value(&r, "ipmi_dcmi_power_maximum_watts"), Some(348.0));
    assert_eq!(value(&r, "ipmi_sel_events_total"), Some(1.0));
    assert_eq!(value(&r, "ipmi_sel_free_bytes"), Some(784.0));
    assert_eq!(calls(), "dump\nlist\nsel-info\nsel-list\ndcmi\n");
    // Unchanged `sel info`: no listing, the count stays.
    let r = reader.read().expect("read");
    assert_eq!(value(&r, "ipmi_sel_events_total"), Some(1.0));
    assert_eq!(calls(), "dump\nlist\nsel-info\nsel-list\ndcmi\nlist\nsel-info\ndcmi\n");
    // A BMC without DCMI (ipmitool exits 1): asked once, never again, nothing sent.
    let mut fresh = Reader { dcmi: true, dcmi_worked: false, sel: None, ..reader };
    std::fs::remove_file(d.join("dcmi")).expect("rm");
    std::fs::remove_file(d.join("calls")).expect("rm");
    assert_eq!(fresh.read().expect("read").extra, vec![]);
    assert_eq!(fresh.read().expect("read").extra, vec![]);
    assert_eq!(calls(), "list\ndcmi\nlist\n");
}
