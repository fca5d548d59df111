//! Unit tests of the config: parsing, errors with their positions, validation and loading.

use super::*;
use crate::collector::apt::AptConfig;
use crate::collector::ipmi::IpmiConfig;
use crate::collector::nvme::NvmeConfig;
use crate::collector::nvsmi::NvsmiConfig;
use crate::collector::schema;

fn parse(text: &str) -> Result<(Config, Vec<String>), ConfigError> {
    Config::parse(Path::new("/etc/dcmon/config.json"), text, &schema())
}

#[test]
fn spec_example_parses_to_defaults() {
    let (c, unknown) = parse(
        r#"{"server_url": "http://your-server.com:8000", "collection_interval": 30,
                "exporters": {"ipmi": true, "apt": true, "nvme": true, "nvsmi": true}}"#,
    )
    .expect("spec example");
    assert_eq!(c, Config::default());
    assert!(unknown.is_empty());
}

#[test]
fn empty_object_is_defaults() {
    assert_eq!(parse("{}").expect("empty").0, Config::default());
}

#[test]
fn unknown_keys_are_reported_not_fatal() {
    let (c, unknown) =
        parse(r#"{"collection_interval": 5, "log_file": "/x", "exporters": {"gpu2": true}}"#).expect("ok");
    assert_eq!(c.collection_interval, 5);
    assert_eq!(unknown, ["log_file", "exporters.gpu2"]);
}

#[test]
fn a_round_timeout_not_below_collector_timeout_is_a_warning_naming_both() {
    assert_eq!(parse("{}").expect("defaults").0.warnings(), Vec::<String>::new(), "the defaults are consistent");
    let (c, _) = parse(r#"{"collector_timeout": 10, "nvsmi": {"gpu_timeout": 9}, "filesystems": {"timeout": 9}}"#)
        .expect("below");
    assert_eq!(c.warnings(), Vec::<String>::new());
    let (c, _) = parse(r#"{"collector_timeout": 10, "nvsmi": {"gpu_timeout": 10}, "filesystems": {"timeout": 30}}"#)
        .expect("valid, with advice");
    let warnings = c.warnings();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings.iter().any(|w| w.starts_with("`nvsmi.gpu_timeout` (10 s) is not below `collector_timeout` (10 s)"))
    );
    assert!(
        warnings.iter().any(|w| w.starts_with("`filesystems.timeout` (30 s) is not below `collector_timeout` (10 s)"))
    );
}

#[test]
fn an_exporter_given_twice_is_an_error() {
    let err = parse(r#"{"exporters": {"apt": true, "nvme": false, "apt": false}}"#).expect_err("twice");
    let msg = err.to_string();
    assert!(msg.ends_with("line 1, column 48: field `exporters`: duplicate field `apt`"), "{msg}");
}

#[test]
fn syntax_error_names_file_line_and_column() {
    let err = parse("{\n  \"collection_interval\": 30,\n  \"server_url\": \"http://x\"\n  \"exporters\": {}\n}")
        .expect_err("missing comma");
    let msg = err.to_string();
    assert!(msg.starts_with("config /etc/dcmon/config.json: line 4, column 3:"), "{msg}");
}

#[test]
fn wrong_type_names_the_field() {
    let err = parse("{\"exporters\": {\"apt\": \"yes\"}}").expect_err("wrong type");
    let msg = err.to_string();
    assert!(msg.contains("line 1") && msg.contains("field `exporters.apt`"), "{msg}");
    assert!(msg.contains("expected a boolean"), "{msg}");
    let err = parse("{\"collection_interval\": \"30\"}").expect_err("string interval");
    assert!(err.to_string().contains("field `collection_interval`"), "{err}");
    let err = parse("{\"collection_interval\": 0.5}").expect_err("fractional interval");
    assert!(err.to_string().contains("field `collection_interval`"), "{err}");
}

#[test]
fn invalid_values_are_rejected() {
    let err = parse("{\"collection_interval\": 0}").expect_err("zero");
    assert!(err.to_string().contains("`collection_interval`: must be at least 1 second"), "{err}");
    for url in ["ftp://x", "localhost:8000", "", "http://"] {
        let err = parse(&format!("{{\"server_url\": {url:?}}}")).expect_err(url);
        assert!(err.to_string().contains("field `server_url`"), "{err}");
    }
    assert!(parse(r#"{"server_url": "https://dcmon.example/"}"#).is_ok());
    assert!(parse(r#"{"machine_id": " "}"#).is_err());
}

#[test]
fn trailing_garbage_is_an_error() {
    let err = parse("{} x").expect_err("trailing");
    assert!(err.to_string().contains("line 1, column 4"), "{err}");
}

#[test]
fn filters_keep_their_defaults_when_only_one_side_is_given() {
    let (c, _) = parse(r#"{"interfaces": {"exclude": ["lo"]}, "disks": {"include": ["vd*"]}}"#).expect("ok");
    assert!(c.interfaces.allows("veth0"));
    assert!(!c.interfaces.allows("lo"));
    assert!(c.disks.allows("vda"));
    assert!(!c.disks.allows("sda"));
}

#[test]
fn exporter_sections_parse_and_validate() {
    let (c, unknown) = parse(
        r#"{"apt": {"interval": 600}, "nvme": {"devices": ["/dev/nvme1"]},
                "ipmi": {"interface": "lanplus", "host": "10.0.0.5", "cipher_suite": 3,
                         "username": "admin", "password_file": "/etc/dcmon/bmc"},
                "nvsmi": {"nvml_library": "/opt/nv/libnvidia-ml.so.1"}}"#,
    )
    .expect("ok");
    assert!(unknown.is_empty(), "{unknown:?}");
    assert_eq!(c.section::<AptConfig>().interval, 600);
    assert_eq!(c.section::<AptConfig>().timeout, AptConfig::default().timeout);
    assert_eq!(c.section::<NvmeConfig>().devices, [PathBuf::from("/dev/nvme1")]);
    assert_eq!(c.section::<IpmiConfig>().cipher_suite, Some(3));
    assert_eq!(c.section::<IpmiConfig>().interval, 60);
    assert_eq!(c.section::<NvsmiConfig>().nvml_library.as_deref(), Some(Path::new("/opt/nv/libnvidia-ml.so.1")));
    let err = parse(r#"{"ipmi": {"interface": "lanplus"}}"#).expect_err("no host");
    assert!(err.to_string().contains("field `ipmi.host`"), "{err}");
    let err = parse(r#"{"ipmi": {"interface": "serial"}}"#).expect_err("bad interface");
    assert!(err.to_string().contains("field `ipmi.interface`"), "{err}");
    let err = parse(r#"{"apt": {"interval": 0}}"#).expect_err("zero");
    assert!(err.to_string().contains("field `apt.interval`"), "{err}");
}

/// A section is parsed from its own text; its errors still carry the file's line and
/// column, on the section's first line (which starts mid-line) and on later ones.
#[test]
fn a_type_error_in_a_section_names_the_file_line_and_column() {
    let text = "{\n  \"collection_interval\": 30, \"ipmi\": {\"interface\": \"open\",\n      \"port\": 623,\n      \"timeout\": \"soon\"}\n}";
    let err = parse(text).expect_err("a string timeout");
    assert_eq!(
        err.to_string(),
        "config /etc/dcmon/config.json: line 4, column 23: field `ipmi.timeout`: \
         invalid type: string \"soon\", expected u64"
    );
    let err = parse("{\"ebpf\": \"auto\",  \"apt\": {\"timeout\": 60, \"interval\": -1}}").expect_err("negative");
    assert_eq!(
        err.to_string(),
        "config /etc/dcmon/config.json: line 1, column 55: field `apt.interval`: \
         invalid value: integer `-1`, expected u64"
    );
    let (_, unknown) = parse("{\"apt\": {\"intervall\": 5}, \"x\": 1, \"exporters\": {\"gpu\": true}}").expect("ok");
    assert_eq!(unknown, ["apt.intervall", "x", "exporters.gpu"], "the file's order, full dotted paths");
}

/// A section given twice is refused, as the other fields are.
#[test]
fn a_section_given_twice_is_an_error() {
    let err = parse("{\"apt\": {\"interval\": 1},\n  \"apt\" : {\"interval\": 2}}").expect_err("twice");
    assert_eq!(err.to_string(), "config /etc/dcmon/config.json: line 2, column 8: duplicate field `apt`");
}

/// Sections sit behind `Config::section`; comparing, cloning and printing a config still
/// covers them (the reload path compares configs).
#[test]
fn sections_take_part_in_eq_clone_and_debug() {
    let (parsed, _) = parse(r#"{"apt": {"interval": 600}}"#).expect("ok");
    assert_ne!(parsed, Config::default());
    assert_eq!(parsed.clone(), parsed);
    assert!(format!("{parsed:?}").contains("interval: 600"), "{parsed:?}");
    let mut set = Config::default();
    set.set_section(AptConfig { interval: 600, ..AptConfig::default() });
    assert_eq!(set, parsed);
    assert_eq!(set.section::<AptConfig>().interval, 600);
    assert_eq!(*Config::default().section::<IpmiConfig>(), IpmiConfig::default());
    let bare = Config::defaults(&Schema::default());
    assert_eq!(*bare.section::<NvmeConfig>(), NvmeConfig::default(), "a section the schema lacks: its default");
    assert!(!bare.exporters.enabled("apt"));
}

#[test]
fn server_base_has_no_trailing_slash() {
    let (c, _) = parse(r#"{"server_url": "http://h:8000/"}"#).expect("ok");
    assert_eq!(c.server_base(), "http://h:8000");
}

#[test]
fn missing_default_file_means_defaults_but_named_file_must_exist() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("config.json");
    let loaded = Config::load(&p, false, &schema()).expect("defaults");
    assert!(!loaded.from_file);
    assert_eq!(loaded.config, Config::default());
    let err = Config::load(&p, true, &schema()).expect_err("must exist");
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn a_fifo_device_or_directory_config_is_refused_at_once() {
    use crate::secure_file::test_support::{mkfifo, read_without_blocking};
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = mkfifo(dir.path(), "config.json");
    let path = fifo.clone();
    let err = read_without_blocking(&fifo, move || Config::load(&path, true, &schema())).expect_err("a FIFO");
    assert_eq!(err.to_string(), format!("config {}: is a FIFO, expected a regular file", fifo.display()));
    let err = Config::load(Path::new("/dev/zero"), true, &schema()).expect_err("/dev/zero");
    assert_eq!(err.to_string(), "config /dev/zero: is a character device, expected a regular file");
    // Printed with its whole chain, the reason appears once.
    let err = Config::load(dir.path(), false, &schema()).expect_err("a directory");
    let msg = format!("{:#}", anyhow::Error::from(err));
    assert_eq!(msg, format!("config {}: is a directory, expected a regular file", dir.path().display()));
}

#[test]
fn an_oversized_config_is_refused_naming_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("config.json");
    let mut text = " ".repeat(5 << 20);
    text.push_str("{}");
    std::fs::write(&p, &text).expect("write");
    let err = Config::load(&p, true, &schema()).expect_err("5 MiB");
    assert_eq!(err.to_string(), format!("config {}: is larger than the limit of 4194304 bytes", p.display()));
}

#[test]
fn the_config_and_its_sections_must_be_objects() {
    let err = parse("[\"http://x:8000\", 5]").expect_err("an array");
    assert_eq!(
        err.to_string(),
        "config /etc/dcmon/config.json: line 1, column 1: the config must be a JSON object {...}, got sequence"
    );
    let err = parse("\n  \"http://x\"").expect_err("a string");
    assert!(err.to_string().contains("line 2, column 3: the config must be a JSON object"), "{err}");
    for section in object_sections(&schema()) {
        let err = parse(&format!("{{\"{section}\": [true, false, 1]}}")).expect_err(section);
        assert_eq!(
            err.to_string(),
            format!("config /etc/dcmon/config.json: field `{section}`: expected a JSON object {{...}}, got an array")
        );
    }
    let err = parse("").expect_err("empty");
    assert!(err.to_string().contains("line 1, column 0: EOF while parsing"), "{err}");
}

#[test]
fn every_duration_has_an_upper_bound_and_huge_values_never_panic() {
    let fields = Config::default().durations().into_iter().map(|(field, ..)| field);
    for field in fields {
        for value in [1_u64 << 63, u64::MAX, 1_000_000_000_000] {
            let json = match field.split_once('.') {
                Some((section, key)) => format!("{{\"{section}\": {{\"{key}\": {value}}}}}"),
                None => format!("{{\"{field}\": {value}}}"),
            };
            let err = std::panic::catch_unwind(|| parse(&json))
                .unwrap_or_else(|_| panic!("{json} panicked"))
                .expect_err(&json);
            let msg = err.to_string();
            assert!(msg.contains(&format!("field `{field}`: must be at most ")), "{json}: {msg}");
            assert!(msg.ends_with(&format!("got {value}")), "{json}: {msg}");
        }
    }
    let err = parse(r#"{"collection_interval": 86401}"#).expect_err("a day and a second");
    assert!(err.to_string().ends_with("must be at most 86400 seconds (1 day), got 86401"), "{err}");
    assert!(parse(r#"{"collection_interval": 86400, "outbox_max_age": 315360000}"#).is_ok());
    // One past u64 is a type error, not a panic.
    let err = parse(r#"{"upload_timeout": 18446744073709551616}"#).expect_err("2^64");
    assert!(err.to_string().contains("field `upload_timeout`"), "{err}");
}

#[test]
fn server_url_scheme_is_case_insensitive_and_query_fragment_userinfo_are_refused() {
    for ok in ["HTTP://dcmon.example:8000", "Https://dcmon.example/base/", "http://[::1]:8000"] {
        let (c, _) = parse(&format!("{{\"server_url\": {ok:?}}}")).unwrap_or_else(|e| panic!("{ok}: {e}"));
        // The scheme is kept in lower case (found by the config fuzz target: `httPs://`
        // came out of server_base as written), the rest as written.
        let (scheme, rest) = ok.split_once("://").expect("scheme");
        assert_eq!(c.server_url, format!("{}://{rest}", scheme.to_ascii_lowercase()));
        assert!(c.server_base().starts_with("http://") || c.server_base().starts_with("https://"));
    }
    for bad in ["http://h:8000/?x=1", "http://h:8000?", "http://h/#frag", "http:h:8000", "http:///x"] {
        let err = parse(&format!("{{\"server_url\": {bad:?}}}")).expect_err(bad);
        assert!(err.to_string().contains("field `server_url`"), "{bad}: {err}");
    }
    for with_password in ["http://user:hunter2@h:8000", "https://hunter2@h", "http://u:hunter2@h:99999"] {
        let err = parse(&format!("{{\"server_url\": {with_password:?}}}")).expect_err(with_password);
        let msg = err.to_string();
        assert!(msg.contains("field `server_url`"), "{msg}");
        assert!(!msg.contains("hunter2"), "the password is in the message: {msg}");
    }
    let err = parse(r#"{"server_url": "http://user:hunter2@h:8000"}"#).expect_err("userinfo");
    assert!(err.to_string().contains("must not hold a user name or password"), "{err}");
}

#[test]
fn bytes_that_are_not_utf8_are_a_parse_error() {
    let err =
        Config::parse_bytes(Path::new("c.json"), b"{\"machine_id\": \"\xff\"}", &schema()).expect_err("not UTF-8");
    assert!(err.to_string().starts_with("config c.json: line 1, column "), "{err}");
}

/// Every prefix of a full config, and the config with any one byte replaced, loads or
/// gives an error naming the file: never a panic.
#[test]
fn truncated_or_corrupted_configs_never_panic() {
    let text = br#"{"server_url": "https://dcmon.example:8443/x", "collection_interval": 15,
            "exporters": {"ipmi": false}, "disks": {"include": ["sd*"], "exclude": []},
            "apt": {"interval": 600, "timeout": 60}, "ipmi": {"interface": "lanplus", "host": "10.0.0.5"},
            "outbox_max_bytes": 1048576, "machine_id": "m1"}"#;
    let path = Path::new("fuzz.json");
    assert!(Config::parse_bytes(path, text, &schema()).is_ok());
    let check = |bytes: &[u8]| {
        let result = std::panic::catch_unwind(|| Config::parse_bytes(path, bytes, &schema()));
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => assert!(e.to_string().starts_with("config fuzz.json: "), "{e}"),
            Err(_) => panic!("panicked on {:?}", String::from_utf8_lossy(bytes)),
        }
    };
    for end in 0..text.len() {
        check(&text[..end]);
    }
    let mut corrupted = text.to_vec();
    for i in 0..text.len() {
        for replacement in [b'[', b'9', b'"', 0xff] {
            corrupted[i] = replacement;
            check(&corrupted);
        }
        corrupted[i] = text[i];
    }
}

#[test]
fn ebpf_key_parses_and_defaults_to_auto() {
    assert_eq!(Config::default().ebpf, EbpfMode::Auto);
    for (text, want) in [("auto", EbpfMode::Auto), ("on", EbpfMode::On), ("off", EbpfMode::Off)] {
        let json = format!(r#"{{"ebpf": "{text}"}}"#);
        let (config, unknown) = Config::parse(Path::new("c.json"), &json, &schema()).expect(text);
        assert_eq!(config.ebpf, want);
        assert!(unknown.is_empty());
    }
    let err =
        Config::parse(Path::new("c.json"), r#"{"ebpf": "yes"}"#, &schema()).expect_err("unknown mode").to_string();
    assert!(err.contains("ebpf") && err.contains("auto"), "{err}");
}

#[test]
fn outputs_parse_and_their_errors_name_the_output_and_field() {
    let (c, unknown) = parse(
        r#"{"dcmon_output": false, "prometheus_listen": "127.0.0.1:9101",
            "remote_write": [{"name": "prom", "url": "http://127.0.0.1:9090/api/v1/write", "colour": 1},
                             {"url": "http://vm.example:8428/api/v1/write", "external_labels": {"cluster": "a"}}]}"#,
    )
    .expect("outputs");
    assert_eq!(c.output_names(), ["prom", "vm.example:8428"]);
    assert_eq!(c.prometheus_listen, Some("127.0.0.1:9101".parse().expect("addr")));
    assert_eq!(unknown, ["remote_write.0.colour"]);
    assert_eq!(Config::default().output_names(), ["dcmon"]);

    let message = |text: &str| parse(text).expect_err(text).to_string();
    assert_eq!(
        message(r#"{"remote_write": [{"url": "http://a/"}, {"name": "x", "url": "http://b/", "timeout": 0}]}"#),
        "config /etc/dcmon/config.json: field `remote_write[1].timeout`: output \"x\": must be 1 to 3600 seconds, got 0"
    );
    let twice = message(r#"{"remote_write": [{"url": "http://a:1/"}, {"url": "http://a:1/x"}]}"#);
    assert!(twice.contains("`remote_write[1].name`") && twice.contains("\"a:1\""), "{twice}");
    let nowhere = message(r#"{"dcmon_output": false}"#);
    assert!(nowhere.contains("`dcmon_output`") && nowhere.contains("go nowhere"), "{nowhere}");
    let bad_listen = message(r#"{"prometheus_listen": "localhost"}"#);
    assert!(bad_listen.contains("prometheus_listen"), "{bad_listen}");
}

#[test]
fn commands_are_off_by_default_and_unknown_types_in_allow_name_the_field() {
    let c = parse("{}").expect("defaults").0;
    assert!(!c.commands.enabled);
    assert!(c.commands.allow.is_empty());
    assert!(c.commands.caps().is_empty());
    let (c, unknown) =
        parse(r#"{"commands": {"enabled": true, "poll_interval": 30, "allow": ["fan_control", "reboot"], "x": 1}}"#)
            .expect("commands");
    assert!(c.commands.allows(CommandType::Reboot) && !c.commands.allows(CommandType::ConfigUpdate));
    assert_eq!(c.commands.caps(), ["CAP_SYS_RAWIO", "CAP_SYS_BOOT"]);
    assert_eq!(unknown, ["commands.x"]);
    let err = parse(r#"{"commands": {"enabled": true, "allow": ["fan_control", "shell"]}}"#).expect_err("shell");
    let msg = err.to_string();
    assert!(msg.contains("field `commands.allow[1]`") && msg.contains("unknown variant `shell`"), "{msg}");
    let err = parse(r#"{"commands": {"poll_interval": 0}}"#).expect_err("zero").to_string();
    assert!(err.contains("`commands.poll_interval`") && err.contains("at least 1"), "{err}");
    let err = parse(r#"{"commands": {"poll_interval": 86401}}"#).expect_err("day").to_string();
    assert!(err.contains("`commands.poll_interval`") && err.contains("at most"), "{err}");
    let err = parse(r#"{"dcmon_output": false, "prometheus_listen": "127.0.0.1:9101", "commands": {"enabled": true}}"#)
        .expect_err("no server")
        .to_string();
    assert!(err.contains("`commands.enabled`"), "{err}");
    let err = parse(r#"{"commands": []}"#).expect_err("array").to_string();
    assert!(err.contains("`commands`"), "{err}");
}
