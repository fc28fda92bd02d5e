//! One spelling per variant, everywhere: serde on the wire, agentctl's flags, the chat
//! parser, agentd's flags and config file, and every "expected one of …" list read the
//! name tables of `agentd_core::Named`, in any case.

use agentd_cli::args::{parse_queue_mode, parse_queue_setting, QueueSetting};
use agentd_core::{
    parse_chat_command, ChatCommand, DropPolicy, Mode, Named, Priority, QueueChange, QueueCommand,
    StopStep,
};
use agentd_daemon::config;
use agentd_proto::control::{ExitView, Request, RequestBody, TaskState};
use serde_json::json;

use crate::support::*;

fn request(body: serde_json::Value) -> Result<RequestBody, String> {
    serde_json::from_value::<Request>(body)
        .map(|r| r.body)
        .map_err(|e| e.to_string())
}

fn chat_queue(text: &str) -> Option<QueueChange> {
    match parse_chat_command(text) {
        Some(ChatCommand::Queue(QueueCommand::Set(change))) => Some(change),
        _ => None,
    }
}

#[test]
fn every_surface_spells_modes_and_drop_policies_from_their_tables() {
    for (mode, name) in Mode::NAMES {
        for word in [name.to_string(), name.to_uppercase()] {
            // The wire, both ways.
            assert_eq!(
                request(json!({"id": 1, "cmd": "queue", "session": "s", "mode": word})),
                Ok(RequestBody::Queue {
                    session: "s".into(),
                    mode: Some(*mode),
                    debounce_ms: None,
                    cap: None,
                    drop: None,
                    reset: false
                })
            );
            // agentctl, the chat, agentd's flags and config file.
            assert_eq!(parse_queue_mode(&word), Ok(*mode));
            assert_eq!(parse_queue_setting(&word), Ok(QueueSetting::Mode(*mode)));
            assert_eq!(
                chat_queue(&format!("/queue {word}")).and_then(|c| c.mode),
                Some(*mode)
            );
            assert_eq!(config::parse_mode(&word).unwrap(), *mode);
        }
        let sent = serde_json::to_value(RequestBody::Send {
            session: "s".into(),
            text: "t".into(),
            message_id: None,
            priority: None,
            mode: Some(*mode),
        })
        .unwrap();
        assert_eq!(sent["mode"], json!(name));
    }
    for (drop, name) in DropPolicy::NAMES {
        for word in [name.to_string(), name.to_uppercase()] {
            let body = request(json!({"id": 1, "cmd": "queue", "session": "s", "drop": word}));
            assert!(
                matches!(body, Ok(RequestBody::Queue { drop: Some(d), .. }) if d == *drop),
                "{body:?}"
            );
            assert_eq!(
                parse_queue_setting(&format!("drop:{word}")),
                Ok(QueueSetting::Drop(*drop))
            );
            assert_eq!(
                chat_queue(&format!("/queue drop:{word}")).and_then(|c| c.drop),
                Some(*drop)
            );
            assert_eq!(config::parse_drop(&word).unwrap(), *drop);
        }
    }

    // Every error lists the table.
    let modes = Mode::one_of();
    let wire = request(json!({"id": 1, "cmd": "queue", "session": "s", "mode": "bogus"}));
    assert!(wire.unwrap_err().contains(&modes));
    assert!(parse_queue_mode("bogus").unwrap_err().contains(&modes));
    assert!(config::parse_mode("bogus")
        .unwrap_err()
        .to_string()
        .contains(&modes));
    let drops = DropPolicy::one_of();
    let wire = request(json!({"id": 1, "cmd": "queue", "session": "s", "drop": "all"}));
    assert!(wire.unwrap_err().contains(&drops));
    assert!(parse_queue_setting("drop:all")
        .unwrap_err()
        .contains(&drops));
    assert!(config::parse_drop("all")
        .unwrap_err()
        .to_string()
        .contains(&drops));
    match parse_chat_command("/queue drop:all") {
        Some(ChatCommand::Invalid { reply }) => assert!(reply.contains(&drops), "{reply}"),
        other => panic!("{other:?}"),
    }
    match parse_chat_command("/queue fastest") {
        Some(ChatCommand::Invalid { reply }) => {
            assert!(reply.contains(&Mode::joined("|")), "{reply}");
            assert!(reply.contains(&DropPolicy::joined("|")), "{reply}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn priorities_stop_steps_and_task_states_are_spelled_by_their_tables() {
    for (priority, name) in Priority::NAMES {
        let body = request(json!({
            "id": 1, "cmd": "send", "session": "s", "text": "t",
            "priority": name.to_uppercase()
        }));
        assert!(
            matches!(body, Ok(RequestBody::Send { priority: Some(p), .. }) if p == *priority),
            "{body:?}"
        );
    }
    let wire =
        request(json!({"id": 1, "cmd": "send", "session": "s", "text": "t", "priority": "urgent"}));
    assert!(wire.unwrap_err().contains(&Priority::one_of()));

    for (step, name) in StopStep::NAMES {
        let exit = ExitView {
            ended_by: Some(*step),
            ..ExitView::default()
        };
        let value = serde_json::to_value(&exit).unwrap();
        assert_eq!(value["ended_by"], json!(name));
        let back: ExitView =
            serde_json::from_value(json!({"ended_by": name.to_uppercase()})).unwrap();
        assert_eq!(back.ended_by, Some(*step));
    }

    // Adding a state breaks this match, which leads here (and to its table).
    let every_state: Vec<TaskState> = TaskState::all()
        .inspect(|s| match s {
            TaskState::Queued
            | TaskState::Starting
            | TaskState::Running
            | TaskState::Stopping
            | TaskState::Succeeded
            | TaskState::Failed
            | TaskState::Cancelled
            | TaskState::Interrupted
            | TaskState::Expired
            | TaskState::Dropped
            | TaskState::Merged => {}
        })
        .collect();
    assert_eq!(every_state.len(), 11);
    agentd_core::check_table(&every_state).unwrap();
    for (state, name) in TaskState::NAMES {
        assert_eq!(serde_json::to_value(state).unwrap(), json!(name));
        assert_eq!(state.to_string(), *name);
        let back: TaskState = serde_json::from_value(json!(name.to_uppercase())).unwrap();
        assert_eq!(back, *state);
    }
}

/// The same through the real binaries: agentd's flags, agentctl's words and the chat
/// take any case, and every answer spells the table's way.
#[test]
fn flags_words_and_chat_commands_take_any_case() {
    let d = Daemon::with_agent_exec(&["--queue-mode", "FollowUp", "--drop", "OLD"]);
    let shown = d.agentctl_json(&["queue", "--session", "a"]);
    assert_eq!(shown["mode"], json!("followup"), "{shown}");
    assert_eq!(shown["drop"], json!("old"), "{shown}");

    let set = d.agentctl_json(&["queue", "--session", "a", "STEER-Backlog", "drop:New"]);
    assert_eq!(set["mode"], json!("steer-backlog"), "{set}");
    assert_eq!(set["drop"], json!("new"), "{set}");

    let reply = d.send("a", "/queue Interrupt drop:SUMMARIZE");
    assert_eq!(reply["accepted"], json!(false), "{reply}");
    let shown = d.agentctl_json(&["queue", "--session", "a"]);
    assert_eq!(shown["mode"], json!("interrupt"), "{shown}");
    assert_eq!(shown["drop"], json!("summarize"), "{shown}");

    let out = d.agentctl(&["queue", "--session", "a", "fastest"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains(&Mode::one_of()), "{}", stderr(&out));
}
