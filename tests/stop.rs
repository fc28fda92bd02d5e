//! Stops: cooperative cancel, then SIGTERM, then SIGKILL, to the whole process tree;
//! the slot frees when the agent is reaped; chats stop only their own tasks.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

#[test]
fn stop_cancels_cooperatively_leaves_no_process_and_the_queued_task_runs() {
    let d = Daemon::with_agent_exec(&["--max-concurrent", "1"]);
    let pidfile = d.dir.path().join("pids");
    // A shell that starts two tool processes and records their pids.
    let script = format!(
        "sleep 300 & echo $! >> {p}; sleep 301 & echo $! >> {p}; echo working; wait",
        p = pidfile.display()
    );
    let long = d.submit("alice", &script);
    let queued = d.submit("bob", "echo hello");
    d.wait_progress(&long, "working");
    let tools = wait_pids(&pidfile, 2);

    let out = d.agentctl(&["stop", &long]);
    assert!(out.status.success(), "{}", stderr(&out));
    let line = stdout(&out);
    assert!(
        line.contains(&format!(
            "task {long}  cancelled (ended by cooperative cancel after"
        )),
        "{line}"
    );

    let view = d.task(&long);
    assert_eq!(view["state"], json!("cancelled"));
    assert_eq!(view["exit"]["ended_by"], json!("cooperative_cancel"));
    for pid in tools {
        assert!(!alive(pid), "tool process {pid} survived the stop");
    }
    let view = d.wait_state(&queued, "succeeded");
    assert_eq!(view["result"], json!("hello"));
}

#[test]
fn a_command_that_ignores_sigint_and_sigterm_is_killed_after_both_graces() {
    let d = Daemon::with_agent_exec(&[
        "--max-concurrent",
        "1",
        "--cancel-grace",
        "1s",
        "--term-grace",
        "1s",
    ]);
    let stubborn = d.submit(
        "alice",
        "trap '' INT TERM; echo stubborn; sleep 60; sleep 60",
    );
    let next = d.submit("bob", "echo next");
    d.wait_progress(&stubborn, "stubborn");

    let start = Instant::now();
    let stopped = d.agentctl_json(&["stop", &stubborn]);
    let took = start.elapsed();
    let view = &stopped["stopped"][0];
    assert_eq!(view["state"], json!("cancelled"), "{stopped}");
    assert_eq!(view["exit"]["ended_by"], json!("sigkill"), "{stopped}");
    assert!(
        took >= Duration::from_millis(1900),
        "SIGKILL came before both graces: {took:?}"
    );
    assert!(
        took < Duration::from_secs(8),
        "the stop took {took:?}, expected about 2 s"
    );
    let stop_ms = view["exit"]["stop_ms"].as_u64().unwrap();
    assert!((1900..8000).contains(&stop_ms), "stop_ms {stop_ms}");
    // The slot is free again: the queued task runs.
    d.wait_state(&next, "succeeded");
    d.assert_nothing_left();
}

#[test]
fn a_stop_during_the_agents_handshake_is_held_and_sent_after_the_start() {
    // The agent's Hello waits for a gate, so the stop comes while agentd still
    // handshakes: its Cancel is held, then sent right behind Start (in the same
    // write, so agent-exec finds it in its buffer, not on the socket).
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate-hello");
    let agent = format!(
        "sh -c 'while [ ! -e {g} ]; do sleep 0.02; done; exec {AGENT_EXEC} -- sh -c \"$1\"' \
         wrapper {{text}}",
        g = gate.display()
    );
    let d = Daemon::start_in(dir, &["--agent", &agent], &[]);
    // `exec`: see the interrupt test in queue.rs (dash loses a SIGINT that hits its fork).
    let task = d.submit("alice", "echo started; exec sleep 30");
    d.wait_state(&task, "starting");
    // The stop is answered once the task has ended: ask from another thread.
    let stop = std::thread::scope(|s| {
        let stop = s.spawn(|| d.request(json!({"cmd": "stop", "task_id": task})));
        d.wait_state(&task, "stopping");
        std::fs::write(&gate, "").unwrap();
        stop.join().unwrap()
    });
    let view = &stop["stopped"][0];
    assert_eq!(view["state"], json!("cancelled"), "{stop}");
    assert_eq!(
        view["exit"]["ended_by"],
        json!("cooperative_cancel"),
        "{stop}\n{}",
        d.log()
    );
    assert_eq!(view["exit"]["code"], json!(130), "{stop}");
}

#[test]
fn an_agent_that_ignores_cancel_is_ended_by_sigterm() {
    let d = Daemon::with_test_agent(&["--cancel-grace", "300ms", "--term-grace", "10s"]);
    let task = d.submit("alice", "ignore-cancel sleep:60000");
    d.wait_state(&task, "running");
    let stopped = d.agentctl_json(&["stop", &task]);
    assert_eq!(
        stopped["stopped"][0]["exit"]["ended_by"],
        json!("sigterm"),
        "{stopped}"
    );
    assert_eq!(
        stopped["stopped"][0]["exit"]["signal"],
        json!(libc::SIGTERM)
    );
}

#[test]
fn descendants_that_left_the_group_and_session_are_killed_too() {
    let d = Daemon::with_test_agent(&["--cancel-grace", "200ms", "--term-grace", "200ms"]);
    let pidfile = d.dir.path().join("pids");
    let task = d.submit(
        "alice",
        &format!(
            "children:2 escapee pidfile:{} ignore-cancel sleep:60000",
            pidfile.display()
        ),
    );
    d.wait_state(&task, "running");
    let pids = wait_pids(&pidfile, 3);
    for pid in &pids {
        assert!(
            alive(*pid),
            "descendant {pid} should be running before the stop"
        );
    }
    d.agentctl_json(&["stop", &task]);
    for pid in &pids {
        assert!(!alive(*pid), "descendant {pid} survived the stop");
    }
    d.assert_nothing_left();
}

#[test]
fn a_finished_task_leaves_no_background_process_behind() {
    let d = Daemon::with_agent_exec(&[]);
    let pidfile = d.dir.path().join("pids");
    let task = d.submit(
        "alice",
        &format!(
            "setsid sleep 300 & echo $! > {}; echo done",
            pidfile.display()
        ),
    );
    d.wait_state(&task, "succeeded");
    let pids = read_pids(&pidfile);
    assert_eq!(pids.len(), 1);
    wait_for("the background process is gone", DEADLINE, || {
        (!alive(pids[0])).then_some(())
    });
}

#[test]
fn stopping_a_queued_task_removes_it_from_the_queue() {
    let d = Daemon::with_agent_exec(&["--max-concurrent", "1"]);
    let long = d.submit("alice", "sleep 30");
    let queued = d.submit("bob", "echo never");
    let out = d.agentctl(&["stop", &queued]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("cancelled (removed from the queue)"),
        "{}",
        stdout(&out)
    );
    assert_eq!(d.task(&queued)["state"], json!("cancelled"));
    assert_eq!(d.task(&queued)["started_at"], json!(null));
    // The running task is untouched (it may still be finishing its handshake).
    d.wait_state(&long, "running");
}

#[test]
fn a_chat_stops_only_its_own_tasks() {
    let d = Daemon::with_agent_exec(&["--max-concurrent", "2", "--cancel-grace", "5s"]);
    let alice = d.submit("alice", "sleep 30");
    let bob = d.submit("bob", "sleep 30");
    d.wait_state(&alice, "running");
    d.wait_state(&bob, "running");

    let response = d
        .try_request(json!({"cmd": "send", "session": "bob", "text": format!("/stop {alice}")}))
        .unwrap();
    assert_eq!(response["error"]["code"], json!("forbidden"), "{response}");
    assert_eq!(d.task(&alice)["state"], json!("running"));

    // `/stop` in bob's chat stops bob's task (answered at once, while it stops).
    let reply = d.send("bob", "/stop");
    assert_eq!(reply["command"], json!("stop"));
    assert!(
        reply["reply"]
            .as_str()
            .unwrap()
            .contains(&format!("task {bob}  stopping: cancel sent")),
        "{reply}"
    );
    d.wait_state(&bob, "cancelled");
    assert_eq!(d.task(&alice)["state"], json!("running"));
}

#[test]
fn stop_all_in_a_chat_cancels_queued_messages_first_then_the_run() {
    let d = Daemon::with_agent_exec(&["--max-concurrent", "2"]);
    let run = d.submit("alice", "sleep 30");
    let held1 = d.submit("alice", "echo one");
    let held2 = d.submit("alice", "echo two");
    let other = d.submit("bob", "sleep 30");
    d.wait_state(&run, "running");
    let reply = d.send("alice", "/stop all");
    let stopped = reply["data"]["stopped"].as_array().unwrap();
    let states: Vec<_> = stopped
        .iter()
        .map(|v| (v["task_id"].as_str().unwrap(), v["state"].as_str().unwrap()))
        .collect();
    // Answered at once: the held messages are cancelled, the run is stopping.
    assert_eq!(
        states,
        [
            (held1.as_str(), "cancelled"),
            (held2.as_str(), "cancelled"),
            (run.as_str(), "stopping")
        ]
    );
    d.wait_state(&run, "cancelled");
    // Nothing of alice's was promoted into the half-stopped session.
    for id in [&held1, &held2] {
        assert_eq!(d.task(id)["started_at"], json!(null));
    }
    assert_eq!(d.task(&other)["state"], json!("running"));
}

#[test]
fn agentctl_stop_by_session_and_all() {
    let d = Daemon::with_agent_exec(&["--max-concurrent", "1"]);
    let a = d.submit("alice", "sleep 30");
    let b = d.submit("bob", "sleep 30");
    // Until its agent's handshake, alice's task is `starting`.
    d.wait_state(&a, "running");
    let stopped = d.agentctl_json(&["stop", "--session", "bob"]);
    assert_eq!(stopped["stopped"][0]["task_id"], json!(b));
    assert_eq!(d.task(&a)["state"], json!("running"));
    let stopped = d.agentctl_json(&["stop", "--all"]);
    assert_eq!(stopped["stopped"][0]["task_id"], json!(a));
    assert_eq!(d.task(&a)["state"], json!("cancelled"));
    let out = d.agentctl(&["stop", "--all"]);
    assert!(stdout(&out).contains("nothing to stop"), "{}", stdout(&out));
}

#[test]
fn an_agent_that_reports_but_does_not_exit_is_ended_and_keeps_its_result() {
    let d = Daemon::with_test_agent(&[
        "--max-concurrent",
        "1",
        "--cancel-grace",
        "300ms",
        "--term-grace",
        "5s",
    ]);
    let lingering = d.submit("alice", "linger:60000 result:early");
    let next = d.submit("bob", "result:next");
    let view = d.wait_state(&lingering, "succeeded");
    assert_eq!(view["result"], json!("early"));
    assert_eq!(view["exit"]["signal"], json!(libc::SIGTERM), "{view}");
    // The slot it held went to the next task.
    d.wait_state(&next, "succeeded");
}

#[test]
fn a_hung_agent_that_ignores_sigterm_is_killed_and_its_slot_freed() {
    let d = Daemon::with_test_agent(&[
        "--max-concurrent",
        "1",
        "--cancel-grace",
        "200ms",
        "--term-grace",
        "300ms",
    ]);
    let hung = d.submit("alice", "hang ignore-term");
    let next = d.submit("bob", "result:next");
    d.wait_state(&hung, "running");
    let stopped = d.agentctl_json(&["stop", &hung]);
    let view = &stopped["stopped"][0];
    assert_eq!(view["state"], json!("cancelled"), "{stopped}");
    assert_eq!(view["exit"]["ended_by"], json!("sigkill"));
    assert_eq!(view["exit"]["signal"], json!(libc::SIGKILL));
    d.wait_state(&next, "succeeded");
}

/// `status ID` of a stopping task says which step of the stop sequence it is at,
/// since when, and which step comes next and when: an agent that ignores the cancel
/// and SIGTERM is seen at each step, in the JSON view and in agentctl's text, until
/// SIGKILL ends it. Once ended, the view has no `stopping` any more.
#[test]
fn status_of_a_stopping_task_says_its_step_and_since_when() {
    let d = Daemon::with_test_agent(&["--cancel-grace", "3s", "--term-grace", "3s"]);
    let task = d.submit("alice", "ignore-cancel ignore-term sleep:60000");
    d.wait_progress(&task, "tick");
    d.request(json!({"cmd": "stop", "task_id": task, "wait": false}));
    let step_of = |view: &serde_json::Value| view["stopping"]["step"].as_str().map(String::from);

    let cancel = d.task(&task);
    assert_eq!(cancel["state"], "stopping", "{cancel}");
    let at = |view: &serde_json::Value| view["stopping"]["step_at"].as_str().unwrap().to_string();
    if step_of(&cancel).as_deref() == Some("cooperative_cancel") {
        assert_eq!(cancel["stopping"]["task_id"], task, "{cancel}");
        assert_eq!(cancel["stopping"]["next"], "sigterm", "{cancel}");
        assert!(
            cancel["stopping"]["next_in_ms"].as_u64().unwrap() <= 3_000,
            "{cancel}"
        );
        assert!(at(&cancel).as_str() >= cancel["started_at"].as_str().unwrap());
    }

    // SIGTERM sent (and ignored): the text names it, when, and SIGKILL to come.
    let term = wait_for("the SIGTERM step", DEADLINE, || {
        let view = d.task(&task);
        (step_of(&view).as_deref() == Some("sigterm")).then_some(view)
    });
    assert_eq!(term["stopping"]["next"], "sigkill", "{term}");
    assert!(
        term["stopping"]["next_in_ms"].as_u64().unwrap() <= 3_000,
        "{term}"
    );
    if step_of(&cancel).as_deref() == Some("cooperative_cancel") {
        assert!(at(&term) > at(&cancel), "{cancel}\n{term}");
    }
    let text = wait_for("agentctl status at the SIGTERM step", DEADLINE, || {
        let text = stdout(&d.agentctl(&["status", &task]));
        text.contains("stopping").then_some(text)
    });
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("stop "))
        .unwrap_or_else(|| panic!("no stop line:\n{text}"));
    assert!(
        line.contains("SIGTERM sent at ") && line.contains(" ago), SIGKILL in ")
            || line.contains("SIGKILL sent at "),
        "{text}"
    );

    let done = d.wait_state(&task, "cancelled");
    assert_eq!(done["exit"]["ended_by"], "sigkill", "{done}");
    assert!(done.get("stopping").is_none(), "{done}");
    assert!(!stdout(&d.agentctl(&["status", &task])).contains("\n  stop "));
}
