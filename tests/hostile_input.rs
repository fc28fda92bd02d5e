//! Input from outside that once got past agentd's checks: client fields at their
//! extremes, and rows of a store that agentd did not write as it reads them.

use serde_json::{json, Value};

use crate::support::*;

/// The error of a request that must be refused.
fn refused(d: &Daemon, body: Value) -> Value {
    let answer = d.try_request(body.clone()).expect("an answer");
    assert_eq!(
        answer["ok"],
        json!(false),
        "{body} was not refused: {answer}"
    );
    answer["error"].clone()
}

/// An empty `message_id` would make every later message of the session with one a
/// "re-delivery" of the first (answered `duplicate`, never run); a huge one would be
/// held 10,000 times over in the de-duplication window. Both are refused, nothing is
/// accepted, and a message with a proper id afterwards is new work.
#[test]
fn an_empty_or_overlong_message_id_is_refused_and_nothing_is_taken_for_a_duplicate() {
    let d = Daemon::with_agent_exec(&[]);
    for (id, what) in [(String::new(), "empty"), ("m".repeat(1025), "1025 bytes")] {
        for text in ["echo one", "echo two"] {
            let error = refused(
                &d,
                json!({"cmd": "send", "session": "chat", "text": text, "message_id": id}),
            );
            assert_eq!(error["code"], json!("bad_request"), "{what}: {error}");
            assert_eq!(
                error["message"],
                json!(agentd_proto::text::BAD_MESSAGE_ID),
                "{what}"
            );
        }
    }
    let longest = "m".repeat(1024);
    let reply = d.request(
        json!({"cmd": "send", "session": "chat", "text": "echo one", "message_id": longest}),
    );
    assert_eq!(reply["accepted"], json!(true), "{reply}");
    assert_eq!(reply["duplicate"], Value::Null, "{reply}");
    let tasks = d.all_tasks();
    assert_eq!(tasks.as_array().unwrap().len(), 1, "{tasks}");
}

/// A session name is copied into the agent's environment (`AGENTD_SESSION`) and
/// printed in agentctl's tables: one with a NUL could never start an agent (every
/// task of it failed at spawn), one with a newline or an escape breaks the lines it
/// is printed in. `send`, `queue` and `watch` refuse them at once.
#[test]
fn a_session_with_control_characters_is_refused_before_anything_is_queued() {
    let d = Daemon::with_agent_exec(&[]);
    for session in ["chat\0x", "chat\nx", "chat\u{1b}[2J", "\t"] {
        for body in [
            json!({"cmd": "send", "session": session, "text": "echo hi"}),
            json!({"cmd": "queue", "session": session, "cap": 3}),
            json!({"cmd": "watch", "session": session}),
        ] {
            let error = refused(&d, body.clone());
            assert_eq!(error["code"], json!("bad_request"), "{body}: {error}");
            assert_eq!(
                error["message"],
                json!(agentd_proto::text::BAD_SESSION),
                "{body}"
            );
        }
    }
    assert_eq!(d.all_tasks(), json!([]));
    // Any other character is fine.
    let task = d.submit("chat: ünïcode ✓ / tabs\u{a0}ok", "echo hi");
    d.wait_state(&task, "succeeded");
}

/// `log` from an offset past what a file offset can hold (the client's u64 is not a
/// file's i64) reads as the end of the log, as any offset past its end does, rather
/// than failing as an internal error.
#[test]
fn a_log_offset_beyond_any_file_reads_as_the_end() {
    let d = Daemon::with_agent_exec(&[]);
    let task = d.submit("chat", "echo some output");
    d.wait_state(&task, "succeeded");
    for offset in [1u64 << 40, i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX] {
        let chunk = d.request(json!({"cmd": "log", "task_id": task, "offset": offset}));
        assert_eq!(chunk["data"], json!(""), "{offset}: {chunk}");
        assert_eq!(chunk["next_offset"], json!(offset), "{offset}: {chunk}");
        assert_eq!(chunk["done"], json!(true), "{offset}: {chunk}");
    }
}

/// A store written by something else (a newer agentd, a hand edit, a clock far off)
/// may hold times past the year 9999, the last one RFC 3339 can write: agentd still
/// starts, lists and shows the task (at the latest time it can write), and keeps
/// serving.
#[test]
fn stored_times_past_the_year_9999_are_shown_and_do_not_take_agentd_down() {
    let mut d = Daemon::with_agent_exec(&[]);
    let task = d.submit("chat", "echo hi");
    d.wait_state(&task, "succeeded");
    kill(d.pid(), libc::SIGTERM);
    d.child.wait().unwrap();
    let db = rusqlite::Connection::open(d.dir.path().join("state/agentd.db")).unwrap();
    let far = i64::MAX;
    let changed = db
        .execute(
            "UPDATE tasks SET created_at = ?1, started_at = ?1, finished_at = ?1",
            [far],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(db);
    d.restart();
    let latest = json!("9999-12-31T23:59:59.999Z");
    let view = d.task(&task);
    assert_eq!(view["created_at"], latest, "{view}");
    let tasks = d.request(json!({"cmd": "tasks", "all": true}));
    // (The listing shows the view written when the task finished.)
    assert_eq!(tasks[0]["task_id"], json!(task), "{tasks}");
    let out = d.agentctl(&["tasks", "--all"]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.request(json!({"cmd": "ping"}));
    assert!(d.child.try_wait().unwrap().is_none(), "agentd ended");
}

/// A duration flag is added to the clock: `--frame-timeout` of 10^19 s made agentd
/// panic at its first agent frame (the task stayed `starting`). Past 100 years a
/// duration is refused at start, flag and config file alike, naming the bound.
#[test]
fn a_duration_past_100_years_is_refused_at_start() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agentd.toml");
    std::fs::write(&config, "retention-age = \"500000000y\"\n").unwrap();
    for extra in [
        vec!["--frame-timeout", "10000000000000000000s"],
        vec!["--config", config.to_str().unwrap()],
    ] {
        let out = Command::new(AGENTD)
            .arg("--socket")
            .arg(dir.path().join("run/agentd.sock"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(&extra)
            .env_remove("AGENTD_SOCKET")
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(!out.status.success(), "{extra:?} started: {err}");
        assert!(err.contains("at most 100 years"), "{extra:?}: {err}");
    }
}

/// An agent that takes steering but does not read what is steered (its command
/// never reads stdin) would have every steered message held for it, in agentd and
/// in agent-exec, without bound: a client could grow both as far as memory goes.
/// Past 64 unread steers the next messages are queued as follow-ups with a notice
/// that says why; nothing is lost.
#[test]
fn steers_an_agent_does_not_read_are_bounded_and_the_rest_queued_as_follow_ups() {
    let agent = format!("{AGENT_EXEC} --steer -- sh -c {{text}}");
    let d = Daemon::start(&[
        "--agent",
        &agent,
        "--queue-mode",
        "steer",
        "--debounce",
        "0ms",
    ]);
    let running = d.submit("alice", "echo ready; exec sleep 60");
    d.wait_progress(&running, "ready");
    let mut steered = 0;
    let mut queued = Vec::new();
    for i in 0..70 {
        let reply = d.send("alice", &format!("echo steer {i}"));
        assert_eq!(reply["accepted"], json!(true), "{reply}");
        if reply["steered_into"] == json!(running) {
            assert!(queued.is_empty(), "steer {i} after a follow-up: {reply}");
            steered += 1;
        } else {
            assert_eq!(reply["task"]["state"], json!("queued"), "{reply}");
            let notice = reply["notice"].as_str().unwrap_or_default();
            assert!(
                notice.contains("has not read") && notice.contains("follow-up"),
                "{notice}"
            );
            queued.push(reply["task"]["task_id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(steered, 64, "{} queued", queued.len());
    assert_eq!(queued.len(), 6);
    // The follow-ups run once the task is done.
    d.request(json!({"cmd": "stop", "task_id": running}));
    for task in &queued {
        d.wait_state(task, "succeeded");
    }
}

/// Held messages near the request line's size, collected into one prompt, once
/// made a prompt larger than an IPC frame: the agent got no Start and the task
/// failed, with every message merged into it. Now a collected prompt stays within
/// 2 MiB and the rest form the next one: every message is answered.
#[test]
fn large_held_messages_are_collected_into_prompts_an_agent_can_be_sent() {
    let d = Daemon::with_collecting_echo_agent(&["--debounce", "0ms"]);
    let gate = d.gate("first");
    let first = d.submit("alice", &format!("hold {gate} first"));
    d.wait_state(&first, "running");
    let held: Vec<String> = (0..6)
        .map(|k| d.submit("alice", &format!("m{k} {}", "x".repeat(900 * 1024))))
        .collect();
    d.release(&gate);
    d.wait_state(&first, "succeeded");
    let mut prompts = std::collections::BTreeSet::new();
    for task in &held {
        let view = wait_for("the held message is done", DEADLINE, || {
            let view = d.task(task);
            let state = view["state"].as_str().unwrap_or_default().to_string();
            ["succeeded", "merged", "failed"]
                .contains(&state.as_str())
                .then_some(view)
        });
        let ran = match view["merged_into"].as_str() {
            Some(into) => into.to_string(),
            None => task.clone(),
        };
        let outcome = d.wait_state(&ran, "succeeded");
        assert!(
            outcome["text"].as_str().unwrap().len() <= 2 * 1024 * 1024,
            "{ran}"
        );
        prompts.insert(ran);
    }
    assert!(prompts.len() >= 2, "{prompts:?}");
}

/// A watch counted as a request in flight for as long as it lived, and a
/// connection with 64 requests in flight is not read further: the 65th watch of a
/// connection (a bridge watching its 65th chat), and everything sent after it on
/// that connection, was never answered. Watches now have their own bound per
/// connection, past which a watch is refused with a clear error.
#[test]
fn a_connection_with_many_watches_is_still_read_and_past_the_bound_a_watch_is_refused() {
    use std::io::{BufRead, BufReader, Write};
    let d = Daemon::with_agent_exec(&[]);
    let stream = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut ask = |request: Value| -> Value {
        writeln!(writer, "{request}").unwrap();
        loop {
            let mut line = String::new();
            reader
                .read_line(&mut line)
                .unwrap_or_else(|e| panic!("no answer to {request}: {e}"));
            let line: Value = serde_json::from_str(&line).unwrap();
            if line["id"] == request["id"] && line.get("event").is_none() {
                return line;
            }
        }
    };
    let max = 4096;
    for i in 0..max {
        let answer = ask(json!({"id": i, "cmd": "watch", "session": format!("chat-{i}")}));
        assert_eq!(answer["ok"], json!(true), "watch {i}: {answer}");
    }
    let answer = ask(json!({"id": max, "cmd": "watch", "session": "one-too-many"}));
    assert_eq!(answer["error"]["code"], json!("bad_request"), "{answer}");
    assert_eq!(
        answer["error"]["message"],
        json!(agentd_proto::text::too_many_watches(max))
    );
    // The connection is still read.
    let answer =
        ask(json!({"id": max + 1, "cmd": "send", "session": "chat-70", "text": "echo hi"}));
    assert_eq!(answer["ok"], json!(true), "{answer}");
    let answer = ask(json!({"id": max + 2, "cmd": "ping"}));
    assert_eq!(answer["result"]["pong"], json!(true), "{answer}");
}
