//! Remote commands with the real agent binary against the test receiver's command endpoints:
//! each type run against fakes that record what they were asked (an ipmitool and a shutdown
//! stand-in named in the config), refusals posted as failed results, at most once across a
//! results outage and kill -9, and garbage answers survived.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dcmon_tests::{AgentConfig, AgentProcess, Receiver, wait_until, write_key};
use serde_json::{Value, json};

const KEY: &str = "dcmon_commandsKeyCommandsKeyCommandsKeyComma";
const MACHINE: &str = "commands-test-machine";
const WAIT: Duration = Duration::from_secs(20);

/// A fake tool that appends its arguments to `<name>.log` and prints `answer`.
fn fake(dir: &Path, name: &str, answer: &str) -> PathBuf {
    let path = dir.join(name);
    let log = dir.join(format!("{name}.log"));
    std::fs::write(&path, format!("#!/bin/sh\necho \"$*\" >> {}\necho '{answer}'\n", log.display())).expect("fake");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn calls(dir: &Path, name: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default().lines().map(str::to_owned).collect()
}

fn set_up(allow: &[&str]) -> (Receiver, tempfile::TempDir, PathBuf) {
    let receiver = Receiver::start(&[(KEY, MACHINE)]).expect("receiver");
    let dir = tempfile::tempdir().expect("tempdir");
    write_key(dir.path(), KEY).expect("key");
    let d = dir.path();
    let cfg = AgentConfig::without_exporters()
        .extend(json!({
            "server_url": receiver.url(),
            "collection_interval": 1,
            "machine_id": MACHINE,
            "api_key_file": d.join("api_key"),
            "outbox_dir": d.join("outbox"),
            "retry_max_backoff": 1,
            "connect_timeout": 1,
            "upload_timeout": 3,
            "commands": {
                "enabled": true,
                "poll_interval": 1,
                "allow": allow,
                "journal": d.join("commands.journal"),
                "ipmitool": fake(d, "ipmitool", " 02"),
                "shutdown": fake(d, "shutdown", ""),
            },
        }))
        .write(d);
    (receiver, dir, cfg)
}

fn result_of(results: &[Value], id: u64) -> Value {
    let found: Vec<&Value> = results.iter().filter(|r| r["command_id"] == id).collect();
    assert!(!found.is_empty(), "no result for command {id}: {results:?}");
    found[0]["result"].clone()
}

#[test]
fn every_type_runs_once_and_refusals_get_failed_results() {
    let (receiver, dir, cfg) = set_up(&["fan_control", "reboot", "config_update"]);
    let d = dir.path();
    receiver.queue_command(
        MACHINE,
        json!(1),
        "fan_control",
        json!({"action": "set_fan_speed", "zone": 1, "speed": 40}),
    );
    receiver.queue_command(MACHINE, json!(2), "reboot", json!({"delay": 120}));
    receiver.queue_command(MACHINE, json!(3), "config_update", json!({"collection_interval": 2}));
    receiver.queue_command(
        MACHINE,
        json!(4),
        "fan_control",
        json!({"action": "set_fan_speed", "zone": 5, "speed": 40}),
    );
    receiver.queue_command(MACHINE, json!(5), "shell", json!({"cmd": "id"}));
    receiver.queue_command(MACHINE, json!(6), "config_update", json!({"server_url": "http://elsewhere"}));
    receiver.queue_command(MACHINE, json!(7), "fan_control", json!({"action": "get_status"}));
    let agent = AgentProcess::start(d, &cfg, &["run"]).expect("agent");
    let results = receiver.wait_for_results(7, WAIT);
    assert_eq!(results.len(), 7, "{results:?}\n{}", agent.stderr());
    assert_eq!(result_of(&results, 1), json!({"success": true, "message": "Zone 1 speed set to 40%"}));
    assert_eq!(result_of(&results, 2), json!({"success": true, "message": "Reboot scheduled in 2 minute(s)"}));
    assert_eq!(result_of(&results, 3)["success"], true);
    let refused = |id, why: &str| {
        let r = result_of(&results, id);
        assert_eq!(r["success"], false, "{r}");
        assert!(r["message"].as_str().unwrap_or("").contains(why), "{r}");
    };
    refused(4, "`zone` must be 0-1");
    refused(5, "unknown command type \"shell\"");
    refused(6, "`server_url`");
    assert_eq!(result_of(&results, 7), json!({"success": true, "message": "BMC mode OPTIMAL; zone 0: 2%, zone 1: 2%"}));
    // The config file was rewritten and reloaded.
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).expect("config")).expect("json");
    assert_eq!(written["collection_interval"], 2);
    assert!(
        wait_until(WAIT, || agent.stderr().contains("config reloaded").then_some(())).is_some(),
        "{}",
        agent.stderr()
    );
    // More polls run nothing again.
    let polls = receiver.command_polls();
    assert!(wait_until(WAIT, || (receiver.command_polls() >= polls + 2).then_some(())).is_some());
    assert_eq!(
        calls(d, "ipmitool"),
        [
            "raw 0x30 0x70 0x66 0x01 0x01 0x28",
            "raw 0x30 0x45 0x00",
            "raw 0x30 0x70 0x66 0x00 0x00",
            "raw 0x30 0x70 0x66 0x00 0x01"
        ]
    );
    assert_eq!(calls(d, "shutdown"), ["-r +2"]);
    assert!(receiver.pending_commands().is_empty());
    // Self-metrics in the batches.
    let batches = receiver.wait_for_accepted(1, WAIT);
    let metric = |name: &str| {
        batches.last().and_then(|b| b.json["metrics"].as_array()?.iter().find(|m| m["name"] == name).cloned())
    };
    assert!(
        wait_until(WAIT, || {
            let last = receiver.accepted().last().cloned()?;
            let ms = last.json["metrics"].as_array()?.clone();
            let get = |n: &str| ms.iter().find(|m| m["name"] == n).map(|m| m["value"].clone());
            (get("dcmon_commands_received_total") == Some(json!(7))
                && get("dcmon_commands_run_total") == Some(json!(4))
                && get("dcmon_commands_refused_total") == Some(json!(3))
                && get("dcmon_commands_failed_total") == Some(json!(0)))
            .then_some(())
        })
        .is_some(),
        "{:?}",
        metric("dcmon_commands_received_total")
    );
}

#[test]
fn a_type_not_allowed_is_refused_with_a_posted_result() {
    let (receiver, dir, cfg) = set_up(&["fan_control"]);
    receiver.queue_command(MACHINE, json!("r-1"), "reboot", json!({"delay": 60}));
    let agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("agent");
    let results = receiver.wait_for_results(1, WAIT);
    assert_eq!(results.len(), 1, "{}", agent.stderr());
    assert_eq!(results[0]["command_id"], "r-1");
    assert_eq!(results[0]["machine_id"], MACHINE);
    let message = results[0]["result"]["message"].as_str().unwrap_or("");
    assert!(results[0]["result"]["success"] == false && message.contains("not in this host's commands.allow"));
    assert!(calls(dir.path(), "shutdown").is_empty(), "reboot not listed: never run");
}

#[test]
fn results_survive_an_outage_and_kill_9_and_commands_are_not_rerun() {
    let (receiver, dir, cfg) = set_up(&["fan_control"]);
    let d = dir.path();
    receiver.force_results_status(Some(503));
    receiver.queue_command(MACHINE, json!(11), "fan_control", json!({"action": "set_bmc_mode", "mode": "full_speed"}));
    let mut agent = AgentProcess::start(d, &cfg, &["run"]).expect("agent");
    // It ran; its result is refused by the "down" server; the command stays pending and is
    // offered again in each poll, and not run again.
    assert!(wait_until(WAIT, || (!calls(d, "ipmitool").is_empty()).then_some(())).is_some(), "{}", agent.stderr());
    let polls = receiver.command_polls();
    assert!(wait_until(WAIT, || (receiver.command_polls() >= polls + 2).then_some(())).is_some(), "{}", agent.stderr());
    assert!(receiver.command_results().is_empty());
    // kill -9 between the run and the delivered result.
    assert!(agent.signal_and_wait("KILL", WAIT).is_some());
    receiver.force_results_status(None);
    let agent = AgentProcess::start(d, &cfg, &["run"]).expect("restart");
    let results = receiver.wait_for_results(1, WAIT);
    assert_eq!(results.len(), 1, "{}", agent.stderr());
    assert_eq!(results[0]["result"], json!({"success": true, "message": "BMC mode set to FULL_SPEED"}));
    let polls = receiver.command_polls();
    assert!(wait_until(WAIT, || (receiver.command_polls() >= polls + 2).then_some(())).is_some());
    assert_eq!(calls(d, "ipmitool"), ["raw 0x30 0x45 0x01 0x01"], "run exactly once");
    assert_eq!(receiver.command_results().len(), 1);
}

#[test]
fn garbage_and_oversized_answers_are_survived() {
    let (receiver, dir, cfg) = set_up(&["fan_control"]);
    let agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("agent");
    for body in [b"{\"commands\": 7}".to_vec(), b"\xff\x00garbage".to_vec(), vec![b'['; 1 << 20]] {
        let polls = receiver.command_polls();
        receiver.commands_raw_answer(Some(body));
        assert!(
            wait_until(WAIT, || (receiver.command_polls() >= polls + 2).then_some(())).is_some(),
            "{}",
            agent.stderr()
        );
    }
    receiver.commands_raw_answer(None);
    receiver.queue_command(
        MACHINE,
        json!(21),
        "fan_control",
        json!({"action": "set_fan_speeds", "zone0_speed": 10, "zone1_speed": 20}),
    );
    let results = receiver.wait_for_results(1, WAIT);
    assert_eq!(results.len(), 1, "{}", agent.stderr());
    assert_eq!(results[0]["result"]["success"], true);
    assert!(receiver.wait_for_accepted(2, WAIT).len() >= 2, "collection kept going");
    let log = agent.stderr();
    assert!(log.contains("larger than") && log.contains("not JSON"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(!log.contains(KEY), "the key is never logged");
}

#[test]
fn a_result_rejected_for_good_does_not_hold_back_later_ones() {
    let (receiver, dir, cfg) = set_up(&["fan_control"]);
    receiver.force_results_status(Some(422));
    receiver.queue_command(MACHINE, json!(31), "fan_control", json!({"action": "get_status"}));
    let agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("agent");
    assert!(
        wait_until(WAIT, || agent.stderr().contains("rejected the result of command 31").then_some(())).is_some(),
        "{}",
        agent.stderr()
    );
    receiver.force_results_status(None);
    receiver.queue_command(
        MACHINE,
        json!(32),
        "fan_control",
        json!({"action": "set_fan_speed", "zone": 0, "speed": 0}),
    );
    // 32's result arrives; 31, still pending on the server and so offered again, has its
    // stored result posted again (the server now takes it), without running it again.
    let results = receiver.wait_for_results(2, WAIT);
    assert_eq!(result_of(&results, 32), json!({"success": true, "message": "Zone 0 speed set to 0%"}));
    assert_eq!(result_of(&results, 31)["success"], true, "{results:?}");
    let polls = receiver.command_polls();
    assert!(wait_until(WAIT, || (receiver.command_polls() >= polls + 2).then_some(())).is_some());
    assert_eq!(calls(dir.path(), "ipmitool").iter().filter(|c| c.as_str() == "raw 0x30 0x45 0x00").count(), 1);
}

#[test]
fn an_unreadable_journal_turns_commands_off_and_collection_goes_on() {
    let (receiver, dir, cfg) = set_up(&["fan_control"]);
    std::fs::write(dir.path().join("commands.journal"), b"{torn").expect("journal");
    receiver.queue_command(MACHINE, json!(41), "fan_control", json!({"action": "get_status"}));
    let agent = AgentProcess::start(dir.path(), &cfg, &["run"]).expect("agent");
    assert!(receiver.wait_for_accepted(2, WAIT).len() >= 2, "{}", agent.stderr());
    let log = agent.stderr();
    assert!(log.contains("remote commands are off: command journal"), "{log}");
    assert_eq!(receiver.command_polls(), 0);
    assert!(calls(dir.path(), "ipmitool").is_empty());
}
