//! Defaults a new user meets: chat `/stop` answers at once, `agentctl stop` waits
//! unless told not to, and collected messages suit the default shell agent.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

/// A command that ignores the cooperative cancel (SIGINT) and SIGTERM.
const STUBBORN: &str = "trap '' INT TERM; echo stubborn; sleep 60; sleep 60";

#[test]
fn chat_stop_answers_at_once_and_the_final_state_comes_as_an_event() {
    let d = Daemon::with_agent_exec(&["--cancel-grace", "5s", "--term-grace", "1s"]);
    let task = d.submit("alice", STUBBORN);
    d.wait_progress(&task, "stubborn");
    let mut watch = Watch::session(&d, "alice");

    let reply = d.send("alice", "/stop");
    assert_eq!(reply["command"], json!("stop"), "{reply}");
    assert_eq!(
        reply["reply"],
        json!(format!(
            "task {task}  stopping: cancel sent, SIGTERM in 5 s"
        )),
        "{reply}"
    );
    let stopping = &reply["data"]["stopped"][0];
    assert_eq!(stopping["state"], json!("stopping"), "{reply}");
    assert_eq!(
        reply["data"]["stopping"][0]["next"],
        json!("sigterm"),
        "{reply}"
    );

    let events = watch.until(|e| e["kind"] == json!("finished"));
    let finished = events.last().unwrap();
    assert_eq!(finished["task_id"], json!(task));
    assert_eq!(finished["task"]["state"], json!("cancelled"), "{finished}");
    assert_eq!(finished["task"]["exit"]["ended_by"], json!("sigkill"));
}

#[test]
fn agentctl_stop_waits_for_the_end_unless_told_not_to() {
    let d = Daemon::with_agent_exec(&["--cancel-grace", "1s", "--term-grace", "1s"]);
    let task = d.submit("alice", STUBBORN);
    d.wait_progress(&task, "stubborn");
    let out = d.agentctl(&["stop", "--no-wait", &task]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim_end(),
        format!("task {task}  stopping: cancel sent, SIGTERM in 1 s")
    );
    d.wait_state(&task, "cancelled");

    // By default it waits until the task has ended, like `systemctl stop`.
    let task = d.submit("alice", STUBBORN);
    d.wait_progress(&task, "stubborn");
    let start = Instant::now();
    let out = d.agentctl(&["stop", &task]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        start.elapsed() >= Duration::from_millis(1900),
        "returned before both graces"
    );
    assert!(
        stdout(&out).contains(&format!("task {task}  cancelled (ended by SIGKILL after")),
        "{}",
        stdout(&out)
    );
}

#[test]
fn collected_messages_with_the_default_agent_run_as_commands_without_shell_errors() {
    // The default agent (agent-exec running `sh -c {text}`) and the default mode.
    let d = Daemon::start(&["--debounce", "100ms"]);
    let gate = d.gate("g");
    let first = d.submit(
        "alice",
        &format!("while [ ! -e {gate} ]; do sleep 0.02; done; echo first"),
    );
    d.wait_state(&first, "running");
    let two = d.submit("alice", "echo two");
    let three = d.submit("alice", "echo three");
    d.release(&gate);
    for (task, result) in [(&first, "first"), (&two, "two"), (&three, "three")] {
        let view = d.wait_state(task, "succeeded");
        assert_eq!(view["result"], json!(result), "{view}");
    }
    let logs = d.dir.path().join("state").join("logs");
    for entry in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        assert!(
            !text.contains("not found"),
            "{}: {text}",
            entry.path().display()
        );
    }
}

#[test]
fn a_message_dropped_on_overflow_never_runs_with_the_default_agent() {
    // The default agent runs each message as a shell command, and the default drop
    // policy is `summarize`: the overflow note must not be prepended to the next
    // command, where `- <preview>` would run part of the dropped message.
    let d = Daemon::start(&["--debounce", "0ms"]);
    let gate = d.gate("g");
    let ran = d.dir.path().join("dropped-ran");
    let first = d.submit(
        "alice",
        &format!("while [ ! -e {gate} ]; do sleep 0.02; done; echo first"),
    );
    d.wait_state(&first, "running");
    d.send("alice", "/queue followup cap:1");
    let dropped = d.submit("alice", &format!("true; touch {}", ran.display()));
    let reply = d.send("alice", "echo kept");
    assert_eq!(reply["dropped"][0]["task_id"], json!(dropped), "{reply}");
    let kept = reply["task"]["task_id"].as_str().unwrap().to_string();
    d.release(&gate);
    let view = d.wait_state(&kept, "succeeded");
    assert_eq!(view["text"], json!("echo kept"), "{view}");
    assert_eq!(view["result"], json!("kept"), "{view}");
    assert_eq!(d.task(&dropped)["state"], json!("dropped"));
    assert!(!ran.exists(), "a dropped message ran: {view}");
}
