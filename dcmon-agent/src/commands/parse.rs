//! The server's answer to `GET /api/commands/{machine_id}`, read as untrusted input: capped in
//! size, checked against the schema (`{"commands": [{"id", "type", "params", "created_at"}]}`,
//! unknown fields ignored), and each command turned into an [`Action`] with every parameter
//! range-checked, or into the reason it is refused.

use serde_json::{Map, Value};

use crate::config::{CommandType, CommandsConfig};

/// The most bytes of an answer that are read; a larger one is refused whole.
pub const MAX_ANSWER_BYTES: usize = 256 * 1024;
/// The most commands taken from one answer; the rest wait for the next poll.
pub const MAX_COMMANDS_PER_POLL: usize = 64;
/// The longest command id kept (the server's ids are short integers or UUIDs).
const MAX_ID_CHARS: usize = 128;
/// Reboot delay bounds, seconds: at least a minute, so the result is posted first.
pub const REBOOT_DELAY_MIN: u64 = 60;
/// At most a day.
pub const REBOOT_DELAY_MAX: u64 = 86_400;
/// Fan zones of the Supermicro boards the raw commands are for (0: CPU, 1: peripheral).
pub const FAN_ZONES: std::ops::RangeInclusive<u8> = 0..=1;

/// A command id as the server sent it (a string or a non-negative integer), echoed back in
/// its result.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CommandId(pub Value);

impl CommandId {
    /// The id as a journal key.
    pub fn key(&self) -> String {
        match &self.0 {
            Value::String(s) => format!("s:{s}"),
            other => format!("n:{other}"),
        }
    }

    /// The id back from a journal key.
    pub fn from_key(key: &str) -> Option<Self> {
        if let Some(s) = key.strip_prefix("s:") {
            return Self::parse(&Value::String(s.to_owned()));
        }
        key.strip_prefix("n:").and_then(|n| n.parse::<u64>().ok()).map(|n| Self(Value::from(n)))
    }

    fn parse(v: &Value) -> Option<Self> {
        match v {
            Value::String(s)
                if !s.is_empty()
                    && s.chars().count() <= MAX_ID_CHARS
                    && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')) =>
            {
                Some(Self(v.clone()))
            }
            Value::Number(n) if n.is_u64() => Some(Self(v.clone())),
            _ => None,
        }
    }
}

impl std::fmt::Display for CommandId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Value::String(s) => f.write_str(s),
            other => write!(f, "{other}"),
        }
    }
}

/// The BMC fan modes of Supermicro boards (raw 0x30 0x45).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BmcMode {
    /// 0x00, automatic.
    Standard,
    /// 0x01.
    FullSpeed,
    /// 0x02.
    Optimal,
    /// 0x04.
    HeavyIo,
}

impl BmcMode {
    const ALL: [(BmcMode, &'static str, u8); 4] = [
        (BmcMode::Standard, "STANDARD", 0x00),
        (BmcMode::FullSpeed, "FULL_SPEED", 0x01),
        (BmcMode::Optimal, "OPTIMAL", 0x02),
        (BmcMode::HeavyIo, "HEAVY_IO", 0x04),
    ];

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(_, n, _)| n.eq_ignore_ascii_case(name)).map(|&(m, _, _)| m)
    }

    /// The name the server uses.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(m, _, _)| *m == self).map_or("?", |&(_, n, _)| n)
    }

    /// The byte sent to the BMC.
    pub fn byte(self) -> u8 {
        Self::ALL.iter().find(|(m, _, _)| *m == self).map_or(0, |&(_, _, b)| b)
    }

    /// The mode a BMC reported, if it is one of these.
    pub fn from_byte(b: u8) -> Option<Self> {
        Self::ALL.iter().find(|(_, _, v)| *v == b).map(|&(m, _, _)| m)
    }
}

/// A `fan_control` command's `action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FanAction {
    /// `get_status`: the BMC mode and each zone's duty.
    GetStatus,
    /// `set_bmc_mode` with `mode`.
    SetBmcMode(BmcMode),
    /// `set_fan_speed` with `zone` and `speed` (percent).
    SetFanSpeed {
        /// Zone 0 or 1.
        zone: u8,
        /// Duty, 0-100.
        speed: u8,
    },
    /// `set_fan_speeds` with `zone0_speed` and `zone1_speed`.
    SetFanSpeeds {
        /// Zone 0's duty.
        zone0: u8,
        /// Zone 1's duty.
        zone1: u8,
    },
}

/// The `ipmitool raw` arguments that read the BMC fan mode.
pub fn raw_get_mode() -> Vec<String> {
    hex(&[0x30, 0x45, 0x00])
}

/// The arguments that set the BMC fan mode.
pub fn raw_set_mode(mode: BmcMode) -> Vec<String> {
    hex(&[0x30, 0x45, 0x01, mode.byte()])
}

/// The arguments that read a zone's duty.
pub fn raw_get_duty(zone: u8) -> Vec<String> {
    hex(&[0x30, 0x70, 0x66, 0x00, zone])
}

/// The arguments that set a zone's duty (range-checked by the caller: [`parse_fan`]).
pub fn raw_set_duty(zone: u8, duty: u8) -> Vec<String> {
    hex(&[0x30, 0x70, 0x66, 0x01, zone, duty])
}

fn hex(bytes: &[u8]) -> Vec<String> {
    bytes.iter().map(|b| format!("0x{b:02x}")).collect()
}

/// A checked command, ready to run.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Fan control through `ipmitool raw`.
    Fan(FanAction),
    /// Reboot after `delay_minutes` (at least 1).
    Reboot {
        /// `shutdown -r +N`.
        delay_minutes: u64,
    },
    /// New `collection_interval` and exporter switches, still to be validated as a config
    /// file is (by writing them into the file's text and parsing that).
    ConfigUpdate {
        /// The new interval, if given.
        collection_interval: Option<Value>,
        /// The new switches, if given (a JSON object).
        exporters: Option<Map<String, Value>>,
    },
}

impl Action {
    /// The command type it belongs to.
    pub fn kind(&self) -> CommandType {
        match self {
            Action::Fan(_) => CommandType::FanControl,
            Action::Reboot { .. } => CommandType::Reboot,
            Action::ConfigUpdate { .. } => CommandType::ConfigUpdate,
        }
    }
}

/// One command of an answer: its id and what to do, or why it is refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// The server's id.
    pub id: CommandId,
    /// The type as sent (for logs and results; at most 64 characters).
    pub type_name: String,
    /// The checked action, or the reason for refusing it.
    pub action: Result<Action, String>,
}

/// What one poll's answer held.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Parsed {
    /// The commands with a usable id, in the answer's order.
    pub commands: Vec<Received>,
    /// Commands skipped because they had no usable id (nothing to post a result for).
    pub without_id: usize,
}

/// Read an answer body. An oversized or malformed answer is an error (nothing is run).
pub fn parse_answer(body: &[u8], config: &CommandsConfig) -> Result<Parsed, String> {
    if body.len() > MAX_ANSWER_BYTES {
        return Err(format!("answer of more than {MAX_ANSWER_BYTES} bytes refused"));
    }
    let top: Value = serde_json::from_slice(body).map_err(|e| format!("answer is not JSON: {e}"))?;
    let list = match top.get("commands") {
        Some(Value::Array(list)) => list,
        Some(_) => return Err("answer's `commands` is not a list".into()),
        None => return Err("answer has no `commands` list".into()),
    };
    let mut parsed = Parsed::default();
    for entry in list.iter().take(MAX_COMMANDS_PER_POLL) {
        let Some(id) = entry.get("id").and_then(CommandId::parse) else {
            parsed.without_id += 1;
            continue;
        };
        let type_name = match entry.get("type") {
            Some(Value::String(s)) => s.chars().take(64).collect(),
            _ => String::new(),
        };
        let action = check(&type_name, entry.get("params"), config);
        parsed.commands.push(Received { id, type_name, action });
    }
    Ok(parsed)
}

/// The action of a command of type `type_name` with `params`, or why it is refused.
pub fn check(type_name: &str, params: Option<&Value>, config: &CommandsConfig) -> Result<Action, String> {
    let Some(kind) = CommandType::from_name(type_name) else {
        return Err(format!("unknown command type {type_name:?}"));
    };
    if !config.allows(kind) {
        return Err(format!("command type {type_name} is not in this host's commands.allow"));
    }
    let empty = Map::new();
    let params = match params {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(m)) => m,
        Some(_) => return Err("params is not an object".into()),
    };
    match kind {
        CommandType::FanControl => parse_fan(params).map(Action::Fan),
        CommandType::Reboot => parse_reboot(params),
        CommandType::ConfigUpdate => parse_config_update(params),
    }
}

fn int_param(params: &Map<String, Value>, name: &str, range: std::ops::RangeInclusive<u64>) -> Result<u64, String> {
    let v = params.get(name).ok_or_else(|| format!("missing parameter `{name}`"))?;
    let n = v.as_u64().ok_or_else(|| format!("parameter `{name}` is not a non-negative integer"))?;
    if !range.contains(&n) {
        return Err(format!("parameter `{name}` must be {}-{}, got {n}", range.start(), range.end()));
    }
    Ok(n)
}

fn small(params: &Map<String, Value>, name: &str, range: std::ops::RangeInclusive<u8>) -> Result<u8, String> {
    let n = int_param(params, name, u64::from(*range.start())..=u64::from(*range.end()))?;
    u8::try_from(n).map_err(|_| format!("parameter `{name}` out of range"))
}

/// A `fan_control` command's parameters, every one range-checked.
pub fn parse_fan(params: &Map<String, Value>) -> Result<FanAction, String> {
    let action = params.get("action").and_then(Value::as_str).ok_or("missing parameter `action`")?;
    match action {
        "get_status" => Ok(FanAction::GetStatus),
        "set_bmc_mode" => {
            let mode = params.get("mode").and_then(Value::as_str).ok_or("missing parameter `mode`")?;
            BmcMode::from_name(mode).map(FanAction::SetBmcMode).ok_or_else(|| {
                let names: Vec<&str> = BmcMode::ALL.iter().map(|(_, n, _)| *n).collect();
                format!("parameter `mode` must be one of {}, got {:?}", names.join(", "), truncate(mode))
            })
        }
        "set_fan_speed" => Ok(FanAction::SetFanSpeed {
            zone: small(params, "zone", FAN_ZONES)?,
            speed: small(params, "speed", 0..=100)?,
        }),
        "set_fan_speeds" => Ok(FanAction::SetFanSpeeds {
            zone0: small(params, "zone0_speed", 0..=100)?,
            zone1: small(params, "zone1_speed", 0..=100)?,
        }),
        other => Err(format!(
            "unknown fan_control action {:?} (get_status, set_bmc_mode, set_fan_speed, set_fan_speeds)",
            truncate(other)
        )),
    }
}

fn parse_reboot(params: &Map<String, Value>) -> Result<Action, String> {
    if let Some(other) = params.keys().find(|k| *k != "delay") {
        return Err(format!("reboot takes only `delay`, got `{}`", truncate(other)));
    }
    let delay = if params.contains_key("delay") {
        int_param(params, "delay", REBOOT_DELAY_MIN..=REBOOT_DELAY_MAX)?
    } else {
        REBOOT_DELAY_MIN
    };
    Ok(Action::Reboot { delay_minutes: delay.div_ceil(60) })
}

fn parse_config_update(params: &Map<String, Value>) -> Result<Action, String> {
    if let Some(other) = params.keys().find(|k| !matches!(k.as_str(), "collection_interval" | "exporters")) {
        return Err(format!(
            "config_update may change only `collection_interval` and `exporters`, got `{}`",
            truncate(other)
        ));
    }
    let exporters = match params.get("exporters") {
        None => None,
        Some(Value::Object(m)) => Some(m.clone()),
        Some(_) => return Err("parameter `exporters` is not an object".into()),
    };
    let collection_interval = params.get("collection_interval").cloned();
    if collection_interval.is_none() && exporters.is_none() {
        return Err("config_update changes nothing".into());
    }
    Ok(Action::ConfigUpdate { collection_interval, exporters })
}

/// At most 64 characters of untrusted text, for messages.
fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn all_allowed() -> CommandsConfig {
        CommandsConfig { enabled: true, allow: CommandType::ALL.to_vec(), ..CommandsConfig::default() }
    }

    fn one(v: Value, config: &CommandsConfig) -> Result<Action, String> {
        let body = serde_json::to_vec(&json!({"commands": [v], "count": 1, "timestamp": 5})).expect("json");
        let parsed = parse_answer(&body, config).expect("answer");
        assert_eq!(parsed.commands.len(), 1);
        parsed.commands[0].action.clone()
    }

    #[test]
    fn fan_actions_and_their_raw_bytes() {
        let c = all_allowed();
        let cmd = |params: Value| one(json!({"id": 7, "type": "fan_control", "params": params, "x": 1}), &c);
        assert_eq!(cmd(json!({"action": "get_status"})), Ok(Action::Fan(FanAction::GetStatus)));
        assert_eq!(
            cmd(json!({"action": "set_bmc_mode", "mode": "full_speed"})),
            Ok(Action::Fan(FanAction::SetBmcMode(BmcMode::FullSpeed)))
        );
        assert_eq!(
            cmd(json!({"action": "set_fan_speed", "zone": 1, "speed": 100})),
            Ok(Action::Fan(FanAction::SetFanSpeed { zone: 1, speed: 100 }))
        );
        assert_eq!(
            cmd(json!({"action": "set_fan_speeds", "zone0_speed": 0, "zone1_speed": 55})),
            Ok(Action::Fan(FanAction::SetFanSpeeds { zone0: 0, zone1: 55 }))
        );
        assert_eq!(raw_set_duty(1, 100), ["0x30", "0x70", "0x66", "0x01", "0x01", "0x64"]);
        assert_eq!(raw_set_mode(BmcMode::HeavyIo), ["0x30", "0x45", "0x01", "0x04"]);
        assert_eq!(raw_get_duty(0), ["0x30", "0x70", "0x66", "0x00", "0x00"]);
        assert_eq!(raw_get_mode(), ["0x30", "0x45", "0x00"]);
    }

    #[test]
    fn bad_fan_parameters_are_refused_with_the_reason() {
        let c = all_allowed();
        let cmd =
            |params: Value| one(json!({"id": "a", "type": "fan_control", "params": params}), &c).expect_err("bad");
        assert!(cmd(json!({"action": "set_fan_speed", "zone": 2, "speed": 50})).contains("`zone` must be 0-1"));
        assert!(cmd(json!({"action": "set_fan_speed", "zone": 0, "speed": 101})).contains("`speed` must be 0-100"));
        assert!(cmd(json!({"action": "set_fan_speed", "zone": 0, "speed": -1})).contains("non-negative integer"));
        assert!(cmd(json!({"action": "set_fan_speed", "zone": 0, "speed": 5.5})).contains("non-negative integer"));
        assert!(cmd(json!({"action": "set_fan_speed", "zone": 0})).contains("missing parameter `speed`"));
        assert!(cmd(json!({"action": "set_bmc_mode", "mode": "turbo"})).contains("`mode` must be one of"));
        assert!(cmd(json!({"action": "rm -rf"})).contains("unknown fan_control action"));
        assert!(cmd(json!({})).contains("missing parameter `action`"));
        let not_object = one(json!({"id": 1, "type": "fan_control", "params": [1]}), &c).expect_err("list");
        assert!(not_object.contains("not an object"), "{not_object}");
    }

    #[test]
    fn reboot_delay_is_bounded_and_rounded_up_to_minutes() {
        let c = all_allowed();
        let cmd = |params: Value| one(json!({"id": 1, "type": "reboot", "params": params}), &c);
        assert_eq!(cmd(json!({})), Ok(Action::Reboot { delay_minutes: 1 }));
        assert_eq!(cmd(json!({"delay": 61})), Ok(Action::Reboot { delay_minutes: 2 }));
        assert_eq!(cmd(json!({"delay": 86_400})), Ok(Action::Reboot { delay_minutes: 1440 }));
        assert!(cmd(json!({"delay": 0})).expect_err("now").contains("must be 60-86400"));
        assert!(cmd(json!({"delay": 86_401})).expect_err("late").contains("must be 60-86400"));
        assert!(cmd(json!({"delay": 60, "force": true})).expect_err("extra").contains("only `delay`"));
    }

    #[test]
    fn config_update_takes_only_the_interval_and_exporters() {
        let c = all_allowed();
        let cmd = |params: Value| one(json!({"id": 1, "type": "config_update", "params": params}), &c);
        assert!(matches!(cmd(json!({"collection_interval": 60})), Ok(Action::ConfigUpdate { .. })));
        assert!(cmd(json!({"server_url": "http://evil"})).expect_err("url").contains("`server_url`"));
        assert!(cmd(json!({})).expect_err("empty").contains("changes nothing"));
        assert!(cmd(json!({"exporters": true})).expect_err("bool").contains("not an object"));
    }

    #[test]
    fn types_not_allowed_or_unknown_are_refused() {
        let fan_only = CommandsConfig { enabled: true, allow: vec![CommandType::FanControl], ..Default::default() };
        let reboot = one(json!({"id": 1, "type": "reboot"}), &fan_only).expect_err("not allowed");
        assert!(reboot.contains("not in this host's commands.allow"), "{reboot}");
        let unknown = one(json!({"id": 1, "type": "shell", "params": {"cmd": "id"}}), &fan_only).expect_err("unknown");
        assert!(unknown.contains("unknown command type \"shell\""), "{unknown}");
        let off = CommandsConfig { enabled: false, ..all_allowed() };
        assert!(one(json!({"id": 1, "type": "fan_control", "params": {"action": "get_status"}}), &off).is_err());
    }

    #[test]
    fn garbage_and_oversized_answers_are_errors_without_panic() {
        let c = all_allowed();
        for body in
            [&b""[..], b"null", b"[]", b"{\"commands\": 5}", b"{\"x\": []}", b"\xff\xfe", b"{\"commands\": [1, "]
        {
            assert!(parse_answer(body, &c).is_err(), "{}", String::from_utf8_lossy(body));
        }
        let big = vec![b' '; MAX_ANSWER_BYTES + 1];
        assert!(parse_answer(&big, &c).expect_err("big").contains("more than"));
        // Entries without a usable id are skipped and counted; the others kept.
        let body = json!({"commands": [1, {"type": "reboot"}, {"id": -3}, {"id": "a b"}, {"id": "ok", "type": 5}]});
        let parsed = parse_answer(body.to_string().as_bytes(), &c).expect("answer");
        assert_eq!(parsed.without_id, 4);
        assert_eq!(parsed.commands.len(), 1);
        assert!(parsed.commands[0].action.as_ref().expect_err("no type").contains("unknown command type"));
        let many: Vec<Value> = (0..1000).map(|i| json!({"id": i, "type": "reboot"})).collect();
        let parsed = parse_answer(json!({"commands": many}).to_string().as_bytes(), &c).expect("many");
        assert_eq!(parsed.commands.len(), MAX_COMMANDS_PER_POLL);
    }

    #[test]
    fn ids_round_trip_through_journal_keys() {
        for id in [json!(42), json!("a-b_c.1:2")] {
            let id = CommandId::parse(&id).expect("id");
            assert_eq!(CommandId::from_key(&id.key()), Some(id));
        }
        assert_eq!(CommandId::from_key("s:a b"), None);
        assert_eq!(CommandId::from_key("x:1"), None);
    }
}
