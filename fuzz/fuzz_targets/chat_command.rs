//! Chat text, as agentd reads every `send` (crates/core/src/command.rs
//! `parse_chat_command`, which also parses `/queue` options and their durations
//! with `parse_duration`).
//!
//! Checks: nothing panics; surrounding whitespace changes nothing; what a command
//! takes from the text (a task id, a message) is a part of the text.

#![no_main]

use agentd_core::{parse_chat_command, parse_duration, ChatCommand, StopArg};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let command = parse_chat_command(text);
    assert_eq!(
        parse_chat_command(&format!(" \t{text}\n ")),
        command,
        "surrounding whitespace changed the command"
    );
    match &command {
        Some(ChatCommand::Status { task: Some(arg) })
        | Some(ChatCommand::Stop(StopArg::Task(arg))) => {
            assert!(
                !arg.is_empty() && !arg.contains(char::is_whitespace),
                "{arg:?}"
            );
            assert!(
                text.contains(arg.as_str()),
                "{arg:?} is not part of {text:?}"
            );
        }
        Some(ChatCommand::WorkWithMode { text: work, .. }) => {
            assert!(
                text.contains(work.as_str()),
                "{work:?} is not part of {text:?}"
            );
        }
        _ => {}
    }
    if let Some(duration) = parse_duration(text) {
        assert!(
            duration.as_millis() < 1_000_000_000_000,
            "{duration:?} from {text:?}"
        );
    }
});
