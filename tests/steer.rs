//! Steering fallbacks: a steered message the agent refuses is queued as a follow-up
//! and never lost, not even past the session's cap, and never revives work while
//! agentd shuts down; a `steer-backlog` message is answered as steered and kept.

use serde_json::{json, Value};

use crate::support::*;

/// The queued tasks of a session whose text is `text`.
fn queued_with_text(d: &Daemon, session: &str, text: &str) -> Vec<Value> {
    let list = d.request(json!({"cmd": "tasks", "session": session}));
    list.as_array()
        .unwrap()
        .iter()
        .filter(|t| t["text"] == json!(text) && t["state"] == json!("queued"))
        .cloned()
        .collect()
}

#[test]
fn a_refused_steer_is_queued_as_a_follow_up_even_when_the_session_is_full() {
    let d = Daemon::with_test_agent(&["--debounce", "0ms"]);
    // One held message fills the session (cap 1, drop new: a new message is refused).
    let reply = d.send("alice", "/queue steer cap:1 drop:new");
    assert!(
        reply["reply"].as_str().unwrap().contains("cap 1"),
        "{reply}"
    );
    let running = d.submit("alice", "refuse-steer sleep:60000");
    d.wait_state(&running, "running");
    let held = d.request(json!({
        "cmd": "send", "session": "alice", "text": "result:held", "mode": "followup"
    }));
    assert_eq!(held["task"]["state"], json!("queued"), "{held}");

    let mut watch = Watch::session(&d, "alice");
    let steered = d.send("alice", "result:steered");
    assert_eq!(steered["task"]["state"], json!("merged"), "{steered}");
    // The agent refuses it: it comes back as a follow-up, and watchers are told.
    let accepted = watch.until(|e| e["kind"] == json!("accepted"));
    let accepted = accepted.last().unwrap();
    assert_eq!(
        accepted["task"]["text"],
        json!("result:steered"),
        "{accepted}"
    );
    assert!(
        accepted["text"].as_str().unwrap().contains("refused"),
        "{accepted}"
    );
    let requeued = queued_with_text(&d, "alice", "result:steered");
    assert_eq!(requeued.len(), 1, "{requeued:?}");

    // Both follow-ups run once the running task is gone.
    d.agentctl_json(&["stop", &running]);
    d.wait_state(held["task"]["task_id"].as_str().unwrap(), "succeeded");
    let view = d.wait_state(requeued[0]["task_id"].as_str().unwrap(), "succeeded");
    assert_eq!(view["result"], json!("steered"));
}

#[test]
fn a_steer_refused_while_agentd_shuts_down_starts_no_new_work() {
    let mut d = Daemon::with_test_agent(&["--cancel-grace", "3s", "--term-grace", "3s"]);
    let gate = d.gate("steer");
    let late = d.dir.path().join("late-pids");
    d.send("alice", "/queue steer");
    let running = d.submit(
        "alice",
        &format!("refuse-steer steer-gate:{gate} ignore-cancel sleep:60000"),
    );
    d.wait_state(&running, "running");
    // If this message ever runs as a task, its agent writes its child's pid to `late`.
    let steered = d.send("alice", &format!("children:1 pidfile:{}", late.display()));
    assert_eq!(steered["task"]["state"], json!("merged"), "{steered}");

    kill(d.pid(), libc::SIGTERM);
    wait_for("agentd begins its shutdown", DEADLINE, || {
        d.log().contains("shutting down").then_some(())
    });
    // Only now does the agent answer the steer: refused.
    d.release(&gate);
    let status = wait_for("agentd exits", DEADLINE, || d.child.try_wait().unwrap());
    assert!(
        status.success(),
        "agentd exited with {status}:\n{}",
        d.log()
    );
    assert!(
        !late.exists(),
        "the refused steer ran as new work during shutdown:\n{}",
        d.log()
    );
    assert!(
        d.log()
            .contains("shutting down: the refused steered message"),
        "{}",
        d.log()
    );
}

#[test]
fn a_steer_backlog_message_is_answered_as_steered_and_kept() {
    let d = Daemon::with_test_agent(&["--debounce", "0ms"]);
    let running = d.submit("alice", "steer sleep:60000");
    d.wait_state(&running, "running");
    let reply = d.request(json!({
        "cmd": "send", "session": "alice", "text": "result:kept", "mode": "steer-backlog"
    }));
    assert_eq!(reply["task"]["state"], json!("queued"), "{reply}");
    let text = reply["reply"].as_str().unwrap();
    assert!(
        text.contains(&format!("steered into running task {running}"))
            && text.contains("kept as a follow-up"),
        "{text}"
    );
    d.wait_progress(&running, "steered: result:kept");

    // agentctl says the same.
    let out = d.agentctl(&[
        "send",
        "--session",
        "alice",
        "--mode",
        "steer-backlog",
        "result:again",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let line = stdout(&out);
    assert!(
        line.contains(&format!("steered into running task {running}"))
            && line.contains("kept as a follow-up"),
        "{line}"
    );
    d.agentctl_json(&["stop", &running]);
    let kept = reply["task"]["task_id"].as_str().unwrap();
    assert_eq!(d.wait_state(kept, "succeeded")["result"], json!("kept"));
}

/// A `steer-backlog` message is kept as a follow-up already: when the agent refuses
/// the steered copy, it must not be queued a second time (it would run twice).
#[test]
fn a_refused_steer_backlog_message_runs_once() {
    let d = Daemon::with_test_agent(&["--debounce", "0ms"]);
    let running = d.submit("alice", "refuse-steer sleep:60000");
    d.wait_state(&running, "running");
    let reply = d.request(json!({
        "cmd": "send", "session": "alice", "text": "result:kept", "mode": "steer-backlog"
    }));
    assert_eq!(reply["steered_into"], json!(running), "{reply}");
    let kept = reply["task"]["task_id"].as_str().unwrap().to_string();
    // The agent refuses the steer at once, before it reads the cancel: once the
    // running task has ended, agentd has handled the refusal.
    d.agentctl_json(&["stop", &running]);
    assert_eq!(d.wait_state(&kept, "succeeded")["result"], json!("kept"));
    // A follow-up sent after all that: once it has run, so has anything queued before.
    let last = d.request(json!({
        "cmd": "send", "session": "alice", "text": "result:last", "mode": "followup"
    }));
    d.wait_state(last["task"]["task_id"].as_str().unwrap(), "succeeded");
    let all = d.request(json!({"cmd": "tasks", "session": "alice", "all": true}));
    let ran: Vec<&Value> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["text"] == json!("result:kept"))
        .collect();
    assert_eq!(
        ran.len(),
        1,
        "the message became more than one task: {ran:?}"
    );
}
