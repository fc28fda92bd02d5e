//! agentctl as a user meets it: one-line answers, JSON, errors and exit codes.

use std::process::Command;

use serde_json::json;

use crate::support::*;

#[test]
fn agentctl_says_clearly_when_agentd_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nothing.sock");
    let out = Command::new(AGENTCTL)
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("agentd is not running at"), "{err}");
    assert!(err.contains(&socket.display().to_string()), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn agentctl_uses_agentd_socket_from_the_environment() {
    let d = Daemon::with_agent_exec(&[]);
    let out = Command::new(AGENTCTL)
        .arg("ping")
        .env("AGENTD_SOCKET", &d.socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("is running"), "{}", stdout(&out));
}

#[test]
fn send_status_and_unknown_tasks_in_words_and_json() {
    let d = Daemon::with_agent_exec(&["--max-concurrent", "1"]);
    let out = d.agentctl(&["send", "--session", "alice", "sleep", "30"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let line = stdout(&out);
    assert!(
        line.starts_with("task ") && line.trim_end().ends_with("started"),
        "{line}"
    );
    let task_id = line.split_whitespace().nth(1).unwrap().to_string();

    let view = d.agentctl_json(&["status", &task_id]);
    assert_eq!(view["task_id"], json!(task_id));
    assert_eq!(view["text"], json!("sleep 30"));
    // A unique prefix is enough.
    let view = d.agentctl_json(&["status", &task_id[..13]]);
    assert_eq!(view["task_id"], json!(task_id));

    let out = d.agentctl(&["status", "01234567-89ab-7def-8123-456789abcdef"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no task"), "{}", stderr(&out));

    let out = d.agentctl(&["stop"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a stop without a target is a usage error"
    );
}
