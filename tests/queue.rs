//! Dispatcher semantics end to end: queue modes, caps and drop policies, fairness,
//! priorities, expiry, de-duplication and live events.

use serde_json::{json, Value};

use crate::support::*;

/// Waits until the task is running with its agent ready to take messages.
fn wait_running(d: &Daemon, task: &str) {
    d.wait_state(task, "running");
}

#[test]
fn collect_turns_messages_held_during_a_run_into_one_follow_up() {
    let d = Daemon::with_collecting_echo_agent(&["--debounce", "200ms"]);
    let gate = d.gate("first");
    let first = d.submit("alice", &format!("hold {gate} first"));
    wait_running(&d, &first);
    let two = d.submit("alice", "second message");
    let three = d.submit("alice", "third message");
    assert_eq!(d.task(&two)["state"], json!("queued"));
    d.release(&gate);

    let view = d.wait_state(&two, "succeeded");
    assert_eq!(
        view["result"],
        json!("[Queued messages while agent was busy]\n---\nQueued #1\nsecond message\n---\nQueued #2\nthird message")
    );
    let merged = d.task(&three);
    assert_eq!(merged["state"], json!("merged"));
    assert_eq!(merged["merged_into"], json!(two));
    assert_eq!(
        d.task(&first)["result"],
        json!(format!("hold {gate} first"))
    );
}

#[test]
fn followup_runs_each_held_message_as_its_own_task_in_order() {
    let d = Daemon::with_echo_agent(&["--queue-mode", "followup", "--debounce", "0ms"]);
    let gate = d.gate("first");
    let first = d.submit("alice", &format!("hold {gate}"));
    wait_running(&d, &first);
    let held: Vec<String> = ["one", "two", "three"]
        .iter()
        .map(|t| d.submit("alice", t))
        .collect();
    d.release(&gate);
    let mut finished_at = Vec::new();
    for (id, text) in held.iter().zip(["one", "two", "three"]) {
        let view = d.wait_state(id, "succeeded");
        assert_eq!(view["result"], json!(text));
        finished_at.push(view["finished_at"].as_str().unwrap().to_string());
    }
    let mut sorted = finished_at.clone();
    sorted.sort();
    assert_eq!(finished_at, sorted, "follow-ups ran out of order");
}

#[test]
fn steer_delivers_the_message_into_the_running_command() {
    let agent = format!("{AGENT_EXEC} --steer -- sh -c {{text}}");
    let d = Daemon::start(&["--agent", &agent]);
    let reply = d.send("alice", "/queue steer");
    assert!(
        reply["reply"].as_str().unwrap().contains("mode steer"),
        "{reply}"
    );
    let task = d.submit("alice", "echo ready; read line; echo got:$line");
    d.wait_progress(&task, "ready");

    let reply = d.send("alice", "hello from the chat");
    assert_eq!(reply["accepted"], json!(true));
    assert_eq!(reply["task"]["state"], json!("merged"), "{reply}");
    assert_eq!(reply["task"]["merged_into"], json!(task));
    assert!(
        reply["reply"]
            .as_str()
            .unwrap()
            .contains("steered into running task"),
        "{reply}"
    );

    let view = d.wait_state(&task, "succeeded");
    assert!(
        view["result"]
            .as_str()
            .unwrap()
            .contains("got:hello from the chat"),
        "{view}"
    );
}

#[test]
fn steer_to_an_agent_that_cannot_take_it_falls_back_to_a_follow_up_and_says_so() {
    // agent-exec steers only with --steer: by default the command's stdin is closed.
    let agent = format!("{AGENT_EXEC} -- sh -c {{text}}");
    let d = Daemon::start(&[
        "--agent",
        &agent,
        "--queue-mode",
        "steer",
        "--debounce",
        "0ms",
    ]);
    let gate = d.gate("g");
    let running = d.submit(
        "alice",
        &format!("echo ready; while [ ! -e {gate} ]; do sleep 0.02; done"),
    );
    d.wait_progress(&running, "ready");
    let reply = d.send("alice", "echo as a follow-up");
    assert_eq!(reply["task"]["state"], json!("queued"), "{reply}");
    let notice = reply["notice"].as_str().unwrap();
    assert!(
        notice.contains("does not accept steering") && notice.contains("follow-up"),
        "{notice}"
    );
    assert!(
        reply["reply"].as_str().unwrap().contains("note:"),
        "{reply}"
    );
    d.release(&gate);
    let follow_up = reply["task"]["task_id"].as_str().unwrap();
    assert_eq!(
        d.wait_state(follow_up, "succeeded")["result"],
        json!("as a follow-up")
    );
}

#[test]
fn interrupt_stops_the_running_task_and_runs_the_new_message_next() {
    let d = Daemon::with_agent_exec(&["--queue-mode", "followup", "--debounce", "5s"]);
    // `exec`: under `-c` dash catches SIGINT and vforks a foreground command, and a
    // SIGINT that lands between that fork and the child's exec is lost (the child runs
    // on, the shell waits for it): the cancel would be ignored and the task end by
    // SIGTERM after the cancel grace. A loaded machine stretches that window to
    // milliseconds, long enough for the interrupt below to land in it.
    let long = d.submit("alice", "echo started; exec sleep 30");
    d.wait_progress(&long, "started");
    let older = d.submit("alice", "echo older held message");
    let reply = d.send("alice", "/queue interrupt echo urgent");
    let urgent = reply["task"]["task_id"].as_str().unwrap().to_string();
    assert!(
        reply["notice"]
            .as_str()
            .unwrap()
            .contains(&format!("interrupting task {long}")),
        "{reply}"
    );

    let view = d.wait_state(&urgent, "succeeded");
    assert_eq!(view["result"], json!("urgent"));
    let stopped = d.task(&long);
    assert_eq!(stopped["state"], json!("interrupted"), "{stopped}");
    assert_eq!(
        stopped["exit"]["ended_by"],
        json!("cooperative_cancel"),
        "{stopped}\n{}",
        d.log()
    );
    assert_eq!(
        stopped["exit"]["reason"],
        json!("a newer message"),
        "{stopped}"
    );
    // The older held message waits its turn behind the urgent one (and its debounce).
    let older_view = d.task(&older);
    assert!(
        older_view["started_at"].is_null()
            || older_view["started_at"].as_str() >= view["started_at"].as_str()
    );
}

#[test]
fn a_quiet_chat_is_not_starved_by_a_chat_with_thirty_held_follow_ups() {
    let d = Daemon::with_echo_agent(&[
        "--max-concurrent",
        "1",
        "--queue-mode",
        "followup",
        "--debounce",
        "0ms",
        "--cap",
        "50",
    ]);
    let gate = d.gate("busy");
    let first = d.submit("busy", &format!("hold {gate}"));
    wait_running(&d, &first);
    for i in 0..30 {
        d.submit("busy", &format!("follow-up {i}"));
    }
    let reply = d.send("quiet", "just one question");
    let position = reply["task"]["position"].as_u64().unwrap();
    assert!(
        position <= 2,
        "the quiet chat was put at position {position}"
    );
    let quiet = reply["task"]["task_id"].as_str().unwrap().to_string();
    d.release(&gate);
    let view = d.wait_state(&quiet, "succeeded");
    // At most one of the busy chat's follow-ups ran before the quiet chat.
    let all = d.agentctl_json(&["tasks", "--all", "--session", "busy"]);
    let before = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["text"].as_str().unwrap().starts_with("follow-up"))
        .filter(|t| {
            t["started_at"]
                .as_str()
                .is_some_and(|s| Some(s) < view["started_at"].as_str())
        })
        .count();
    assert!(
        before <= 1,
        "{before} follow-ups of the busy chat ran before the quiet chat"
    );
}

#[test]
fn past_the_cap_drop_new_refuses_and_drop_summarize_passes_a_summary() {
    let d = Daemon::with_collecting_echo_agent(&["--debounce", "0ms"]);
    let gate = d.gate("g");
    let first = d.submit("alice", &format!("hold {gate}"));
    wait_running(&d, &first);
    d.send("alice", "/queue collect cap:2 drop:new");
    d.submit("alice", "kept one");
    d.submit("alice", "kept two");
    let response = d
        .try_request(json!({"cmd": "send", "session": "alice", "text": "refused three"}))
        .unwrap();
    assert_eq!(response["error"]["code"], json!("queue_full"), "{response}");
    assert!(
        response["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not accepted"),
        "{response}"
    );
    let out = d.agentctl(&["send", "--session", "alice", "refused", "again"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not accepted"), "{}", stderr(&out));

    d.send("alice", "/queue drop:summarize");
    let reply = d.send("alice", "newest");
    let dropped = reply["dropped"].as_array().unwrap();
    assert_eq!(dropped.len(), 1, "{reply}");
    assert_eq!(dropped[0]["text"], json!("kept one"));
    assert!(
        reply["reply"]
            .as_str()
            .unwrap()
            .contains("dropped to make room"),
        "{reply}"
    );
    assert_eq!(
        d.task(dropped[0]["task_id"].as_str().unwrap())["state"],
        json!("dropped")
    );

    d.release(&gate);
    let follow_up = wait_for("the follow-up ran", DEADLINE, || {
        let all = d.agentctl_json(&["tasks", "--all", "--session", "alice"]);
        all.as_array()
            .unwrap()
            .iter()
            .find(|t| {
                t["text"]
                    .as_str()
                    .is_some_and(|s| s.contains("[Queue overflow]"))
                    && t["state"] == json!("succeeded")
            })
            .cloned()
    });
    let result = follow_up["result"].as_str().unwrap();
    assert!(
        result.starts_with("[Queue overflow] Dropped 1 messages due to cap.\n- kept one"),
        "{result}"
    );
    assert!(
        result.contains("kept two") && result.contains("newest"),
        "{result}"
    );
}

#[test]
fn a_global_queue_limit_refuses_work_and_says_nothing_was_accepted() {
    let d = Daemon::with_echo_agent(&["--max-concurrent", "1", "--max-queued", "2"]);
    let gate = d.gate("g");
    let first = d.submit("a", &format!("hold {gate}"));
    wait_running(&d, &first);
    d.submit("b", "one");
    d.submit("c", "two");
    let response = d
        .try_request(json!({"cmd": "send", "session": "d", "text": "three"}))
        .unwrap();
    assert_eq!(response["error"]["code"], json!("queue_full"));
    assert!(response["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not accepted"));
    assert_eq!(d.agentctl_json(&["tasks", "--session", "d"]), json!([]));
    d.release(&gate);
}

#[test]
fn queued_work_expires_after_the_queue_timeout_and_watchers_are_told() {
    let d = Daemon::with_echo_agent(&["--max-concurrent", "1", "--queue-timeout", "300ms"]);
    let gate = d.gate("g");
    let first = d.submit("a", &format!("hold {gate}"));
    wait_running(&d, &first);
    // The session is watched before the message is sent: a task watch opened after
    // the send could come after a slow machine's 300 ms, when only `finished` is left.
    let mut watch = Watch::session(&d, "b");
    let waiting = d.submit("b", "too late");
    let view = d.wait_state(&waiting, "expired");
    assert!(view["started_at"].is_null());
    let kinds = watch.kinds_until("finished");
    assert!(kinds.contains(&"expired".to_string()), "{kinds:?}");
    d.release(&gate);
    assert_eq!(
        d.wait_state(&first, "succeeded")["state"],
        json!("succeeded")
    );
}

#[test]
fn a_redelivered_message_is_answered_with_the_original_task_and_not_run_twice() {
    let d = Daemon::with_echo_agent(&[]);
    let send = |text: &str| {
        d.request(
            json!({"cmd": "send", "session": "alice", "text": text, "message_id": "bridge-42"}),
        )
    };
    let first = send("only once");
    let id = first["task"]["task_id"].as_str().unwrap().to_string();
    d.wait_state(&id, "succeeded");
    let again = send("only once");
    assert_eq!(again["duplicate"], json!(true));
    assert_eq!(again["task"]["task_id"], json!(id));
    assert!(
        again["reply"]
            .as_str()
            .unwrap()
            .contains("already received"),
        "{again}"
    );
    // A chat and agentctl word the duplicate the same way.
    let out = d.agentctl(&[
        "send",
        "--session",
        "alice",
        "--message-id",
        "bridge-42",
        "only once",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        again["reply"].as_str().unwrap()
    );
    let all = d.agentctl_json(&["tasks", "--all"]);
    assert_eq!(all.as_array().unwrap().len(), 1, "ran twice: {all}");
    // The same bridge id in another chat is another message.
    let other =
        d.request(json!({"cmd": "send", "session": "bob", "text": "x", "message_id": "bridge-42"}));
    assert_ne!(other["task"]["task_id"], json!(id));
}

#[test]
fn background_work_waits_for_interactive_work_and_has_its_own_cap() {
    let d = Daemon::with_echo_agent(&["--max-concurrent", "2", "--max-background", "1"]);
    let gate = d.gate("g");
    let bg1 = d.request(json!({"cmd": "send", "session": "cron1", "text": format!("hold {gate} bg1"), "priority": "background"}));
    let bg1 = bg1["task"]["task_id"].as_str().unwrap().to_string();
    wait_running(&d, &bg1);
    // A second background job may not take the last slot…
    let bg2 = d.request(
        json!({"cmd": "send", "session": "cron2", "text": "bg2", "priority": "background"}),
    );
    assert_eq!(bg2["task"]["state"], json!("queued"), "{bg2}");
    // …which stays free for interactive work.
    let chat = d.submit("alice", &format!("hold {gate} chat"));
    assert_ne!(
        d.task(&chat)["state"],
        json!("queued"),
        "interactive work found no free slot"
    );
    wait_running(&d, &chat);
    assert_eq!(d.task(&chat)["priority"], json!("interactive"));
    d.release(&gate);
    let bg2 = bg2["task"]["task_id"].as_str().unwrap();
    assert_eq!(
        d.wait_state(bg2, "succeeded")["priority"],
        json!("background")
    );
}

#[test]
fn queue_settings_are_shown_changed_and_reset_from_chat_and_agentctl() {
    let d = Daemon::with_echo_agent(&[]);
    let shown = d.send("alice", "/queue");
    assert_eq!(
        shown["reply"],
        json!("session alice: mode collect, debounce 1s, cap 20, drop summarize (defaults)")
    );
    let changed = d.send("alice", "/queue followup debounce:2s cap:25 drop:old");
    assert_eq!(
        changed["reply"],
        json!("session alice: mode followup, debounce 2s, cap 25, drop old")
    );
    let view = d.agentctl_json(&["queue", "--session", "alice"]);
    assert_eq!(
        view,
        json!({"session": "alice", "mode": "followup", "debounce_ms": 2000, "cap": 25, "drop": "old", "custom": true})
    );
    let response = d
        .try_request(json!({"cmd": "send", "session": "alice", "text": "/queue cap:0"}))
        .unwrap();
    assert_eq!(response["error"]["code"], json!("bad_request"));
    let reset = d.send("alice", "/queue reset");
    assert!(
        reset["reply"].as_str().unwrap().ends_with("(defaults)"),
        "{reset}"
    );
    let out = d.agentctl(&["queue", "--session", "bob", "steer", "debounce:500ms"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("mode steer, debounce 500ms"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn watching_a_task_reports_its_life_and_ends_when_it_ends() {
    let d = Daemon::with_echo_agent(&["--max-concurrent", "1", "--debounce", "0ms"]);
    let gate = d.gate("g");
    let first = d.submit("alice", &format!("hold {gate}"));
    wait_running(&d, &first);
    let second = d.submit("bob", "second");
    let mut watch = Watch::task(&d, &second);
    d.release(&gate);
    let kinds = watch.kinds_until("finished");
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("position"),
        "{kinds:?}"
    );
    assert!(kinds.contains(&"started".to_string()), "{kinds:?}");
    let finished_view = d.task(&second);
    assert_eq!(finished_view["state"], json!("succeeded"));

    // A session watch sees progress and follows a collected message into its task.
    let mut session_watch = Watch::open(&d, json!({"cmd": "watch", "session": "carol"}));
    let task = d.submit("carol", "hello carol");
    let mut seen = Vec::new();
    loop {
        let event = session_watch.next();
        seen.push(event["kind"].as_str().unwrap().to_string());
        if event["kind"] == json!("finished") {
            assert_eq!(event["task_id"], json!(task));
            assert_eq!(event["task"]["result"], json!("hello carol"));
            break;
        }
    }
    assert_eq!(
        seen.first().map(String::as_str),
        Some("accepted"),
        "{seen:?}"
    );
}

/// A watch's snapshot says where its task stands; the position events after it are
/// moves only, for a later watcher too (not only for the first one).
#[test]
fn a_later_watcher_is_not_told_again_the_position_its_snapshot_gave() {
    let d = Daemon::with_echo_agent(&["--max-concurrent", "1", "--debounce", "0ms"]);
    let gate = d.gate("g");
    let first = d.submit("alice", &format!("hold {gate}"));
    wait_running(&d, &first);
    let second = d.submit("bob", "second");
    let third = d.submit("carol", "third");
    let mut early = Watch::task(&d, &second);
    let snapshot = early.next();
    assert_eq!(
        (&snapshot["kind"], &snapshot["position"]),
        (&json!("position"), &json!(1)),
        "{snapshot}"
    );
    let mut later = Watch::task(&d, &third);
    d.release(&gate);
    let events = later.kinds_and_positions_until_finished();
    assert_eq!(
        events.iter().take(3).cloned().collect::<Vec<_>>(),
        [
            ("position".to_string(), Some(2)),
            ("position".to_string(), Some(1)),
            ("started".to_string(), None)
        ],
        "{events:?}"
    );
}

#[test]
fn agentctl_send_wait_prints_the_result_and_exits_by_the_outcome() {
    let d = Daemon::with_agent_exec(&[]);
    let out = d.agentctl(&[
        "send",
        "--wait",
        "--session",
        "alice",
        "echo step one; echo the answer",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("succeeded") && text.contains("the answer"),
        "{text}"
    );

    let out = d.agentctl(&["send", "--wait", "--session", "alice", "exit 3"]);
    assert_eq!(out.status.code(), Some(5), "{}", stdout(&out));
    assert!(stdout(&out).contains("failed"), "{}", stdout(&out));

    let json_out = d.agentctl(&["--json", "send", "--wait", "--session", "bob", "echo done"]);
    let view: Value = serde_json::from_slice(&json_out.stdout).unwrap();
    assert_eq!(view["state"], json!("succeeded"));
    assert_eq!(view["result"], json!("done"));
}
