//! The server's answer to `GET /api/commands/{machine_id}`, with every command type allowed:
//! never a panic, and every command kept has an id and either a checked action or a reason.
#![no_main]
use dcmon_agent::commands::parse::{MAX_COMMANDS_PER_POLL, parse_answer};
use dcmon_agent::config::{CommandType, CommandsConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let config = CommandsConfig { enabled: true, allow: CommandType::ALL.to_vec(), ..CommandsConfig::default() };
    if let Ok(parsed) = parse_answer(data, &config) {
        assert!(parsed.commands.len() <= MAX_COMMANDS_PER_POLL);
        for command in parsed.commands {
            if let Err(why) = &command.action {
                assert!(!why.is_empty());
            }
        }
    }
});
