//! docs/protocol.md is the contract: its transcripts are replayed against a real
//! agentd, its JSON examples must parse, and its tables must name what exists.

mod transcript;

use agentd_proto::control::{
    Capacity, DropPolicy, ErrorBody, ErrorCode, EventKind, EventView, ExitView, Named, Priority,
    QueueMode, Request, RequestBody, Response, SendReply, StatusReply, StopReply, StopStep,
    StoppingView, TaskState, TaskView, TasksPage, WatchReply,
};
use serde_json::{json, Value};

use crate::support::*;
use transcript::*;

/// A bridge watches its chat and sends on the same connection: it must learn the
/// task id (the `send` answer) before any event about that task.
#[test]
fn a_send_is_answered_before_the_events_it_causes_on_the_same_connection() {
    let d = Daemon::with_agent_exec(&["--max-concurrent", "4", "--debounce", "0ms"]);
    let mut c = Conn::open(&d);
    c.send(&json!({"id": 1, "cmd": "watch", "session": "chat"}));
    assert_eq!(
        c.line()["result"],
        json!({"session": "chat", "task_id": null})
    );
    for round in 0..20u64 {
        let id = 100 + round;
        c.send(&json!({"id": id, "cmd": "send", "session": "chat", "text": "true", "mode": "followup"}));
        // The previous task's events all came before its `finished`, so the next
        // line must be this answer, not an event about the task it created.
        let answer = c.line();
        assert_eq!(
            answer["id"],
            json!(id),
            "round {round}: an event came before the send's answer: {answer}"
        );
        let task = answer["result"]["task"]["task_id"].clone();
        assert!(task.is_string(), "round {round}: no task in the answer");
        // And its events follow, through its end.
        loop {
            let line = c.line();
            let event = &line["event"];
            if event["task_id"] == task && event["kind"] == json!("finished") {
                break;
            }
        }
    }
}

/// A `started` event says the agent process was started: its task view carries that
/// process's pid, the one the `send` answer shows.
#[test]
fn a_started_event_carries_the_agent_pid() {
    let d = Daemon::with_agent_exec(&["--max-concurrent", "1"]);
    let mut c = Conn::open(&d);
    c.send(&json!({"id": 1, "cmd": "watch", "session": "chat"}));
    assert_eq!(c.line()["id"], json!(1));
    c.send(&json!({"id": 2, "cmd": "send", "session": "chat", "text": "exec sleep 60"}));
    let answer = c.line();
    let pid = answer["result"]["task"]["pid"].clone();
    assert!(pid.is_u64(), "no pid in the answer: {answer}");
    loop {
        let line = c.line();
        if line["event"]["kind"] == json!("started") {
            assert_eq!(line["event"]["task"]["pid"], pid, "{line}");
            break;
        }
    }
    c.send(&json!({"id": 3, "cmd": "stop", "all": true}));
}

#[test]
fn the_transcripts_in_the_protocol_doc_are_what_agentd_says() {
    let doc = protocol_doc();
    let transcripts: Vec<Transcript> = fenced_blocks(&doc)
        .iter()
        .filter(|b| b.info == "transcript")
        .map(parse_transcript)
        .collect();
    assert!(
        !transcripts.is_empty(),
        "docs/protocol.md has no transcript"
    );
    // AGENTD_TRANSCRIPT_RECORD=N records only the N-th transcript (=all: every one).
    let only: Option<usize> = std::env::var("AGENTD_TRANSCRIPT_RECORD")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut recorded = Vec::new();
    for (i, t) in transcripts.iter().enumerate() {
        if only.is_none_or(|n| n == i + 1) {
            recorded.extend(replay(t).map(|text| (t, text)));
        }
    }
    // AGENTD_TRANSCRIPT_WRITE=1 (with RECORD) puts what agentd answered into the doc.
    if std::env::var_os("AGENTD_TRANSCRIPT_WRITE").is_some() && !recorded.is_empty() {
        write_transcripts(&recorded);
    }
}

#[test]
fn the_transcript_matcher_binds_placeholders_and_reports_differences() {
    let mut b = Bindings::default();
    let expected = json!({"id": 3, "result": {"reply": "task $T1  started", "task": {"task_id": "$T1", "pid": "$PID", "at": "…"}}});
    let actual = json!({"id": 3, "result": {"reply": "task 01ab-cdef  started", "task": {"task_id": "01ab-cdef", "pid": 4242, "at": "2026-01-01T00:00:00.000Z"}}});
    matches(&expected, &actual, &mut b, "line").unwrap();
    assert_eq!(b.get("T1"), Some(&json!("01ab-cdef")));
    assert_eq!(b.get("PID"), Some(&json!(4242)));
    // Bound names must agree later; a field too many or too few is a difference.
    assert!(matches(
        &json!({"task_id": "$T1"}),
        &json!({"task_id": "other"}),
        &mut b,
        "l"
    )
    .is_err());
    assert!(matches(&json!({"a": 1}), &json!({"a": 1, "b": 2}), &mut b, "l").is_err());
    assert!(matches(&json!({"a": 1, "b": 2}), &json!({"a": 1}), &mut b, "l").is_err());
    assert!(matches(
        &json!("stopped after …"),
        &json!("stopped after 0.02 s"),
        &mut b,
        "l"
    )
    .is_ok());
    assert!(matches(&json!("stopped after …"), &json!("cancelled"), &mut b, "l").is_err());
    assert_eq!(
        substitute(&json!({"task_id": "$T1:4", "text": "/stop $T1"}), &b),
        json!({"task_id": "01ab", "text": "/stop 01ab-cdef"})
    );
    assert_eq!(
        generalize(
            &json!({"reply": "task 01ab-cdef started", "pid": 4242, "at": "2026-01-01T00:00:00.000Z"}),
            &b
        ),
        json!({"reply": "task $T1 started", "pid": "$PID", "at": "…"})
    );
    assert_eq!(
        shell_words("agentd --agent 'agent-exec -- sh -c {text}' -x"),
        ["agentd", "--agent", "agent-exec -- sh -c {text}", "-x"]
    );
}

// ----- the doc's examples and tables -----

#[test]
fn every_json_example_in_the_protocol_doc_parses_as_what_it_shows() {
    let doc = protocol_doc();
    let mut checked = 0;
    for block in fenced_blocks(&doc).iter().filter(|b| b.info == "json") {
        for (i, line) in block.text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let n = block.line + i;
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("docs/protocol.md line {n}: not JSON ({e}): {line}"));
            if value.get("cmd").is_some() {
                serde_json::from_value::<Request>(value.clone()).unwrap_or_else(|e| {
                    panic!("docs/protocol.md line {n}: not a valid request ({e}): {line}")
                });
            } else {
                serde_json::from_value::<Response>(value.clone()).unwrap_or_else(|e| {
                    panic!("docs/protocol.md line {n}: not a valid response line ({e}): {line}")
                });
            }
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} JSON examples found");
}

/// The names serde knows for an enum, from its error for an unknown one.
macro_rules! variants {
    ($t:ty, $unknown:expr) => {{
        let error = serde_json::from_value::<$t>($unknown)
            .unwrap_err()
            .to_string();
        let list = error
            .split("expected one of ")
            .nth(1)
            .unwrap_or_else(|| panic!("no variant list in {error:?}"))
            .to_string();
        list.split(", ")
            .filter_map(|v| v.split('`').nth(1))
            .map(String::from)
            .collect::<Vec<String>>()
    }};
}

/// The spellings of an enum spelled by its name table ([`Named`]).
fn names<T: Named>() -> Vec<String> {
    T::NAMES.iter().map(|(_, n)| n.to_string()).collect()
}

/// Keys of a value's JSON object.
macro_rules! keys {
    ($value:expr) => {{
        let mut keys: Vec<String> = serde_json::to_value($value)
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    }};
}

/// The example requests under "Requests" show every command, so that a client's
/// author has one line of each to start from.
#[test]
fn the_request_examples_show_every_command() {
    let doc = protocol_doc();
    let start = doc.find("### Requests").expect("a Requests section");
    let block = fenced_blocks(&doc[start..])
        .into_iter()
        .find(|b| b.info == "json")
        .expect("the request examples");
    let shown: Vec<String> = block
        .text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let value: Value = serde_json::from_str(l).unwrap();
            value["cmd"].as_str().unwrap().to_string()
        })
        .collect();
    for cmd in variants!(Request, json!({"id": 1, "cmd": "?"})) {
        assert!(shown.contains(&cmd), "no example request of {cmd}");
    }
}

/// The backticked names in the first column of the table under `heading` whose
/// header's first cell is `column`.
fn table_names(doc: &str, heading: &str, column: &str) -> Vec<String> {
    let section = doc
        .split("\n### ")
        .find(|s| s.starts_with(heading))
        .unwrap_or_else(|| panic!("docs/protocol.md has no section {heading:?}"));
    let mut names = Vec::new();
    let (mut in_table, mut previous_in_a_table) = (false, false);
    for line in section.lines() {
        let first = line.split('|').nth(1).unwrap_or("").trim();
        let header = line.starts_with('|') && !previous_in_a_table;
        previous_in_a_table = line.starts_with('|');
        if !line.starts_with('|') {
            in_table = false;
        } else if header {
            in_table = first.trim_matches('`') == column;
        } else if in_table && !first.starts_with("---") {
            names.extend(first.split('`').skip(1).step_by(2).map(String::from));
        }
    }
    assert!(
        !names.is_empty(),
        "no `{column}` table under {heading:?} in docs/protocol.md"
    );
    names.sort();
    names.dedup();
    names
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn sample_view() -> TaskView {
    TaskView {
        task_id: "t".into(),
        session: "s".into(),
        state: TaskState::Merged,
        position: None,
        pid: None,
        created_at: "c".into(),
        started_at: None,
        finished_at: None,
        text: "x".into(),
        progress: None,
        result: None,
        exit: None,
        merged_into: Some("u".into()),
        priority: Priority::Interactive,
        stopping: Some(sample_stopping()),
    }
}

fn sample_stopping() -> StoppingView {
    StoppingView {
        task_id: "t".into(),
        step: StopStep::CooperativeCancel,
        step_at: Some("2026-12-01T08:51:25.718Z".into()),
        next: Some(StopStep::Sigterm),
        next_in_ms: Some(5000),
    }
}

/// Every chat command is in the chat-command tables a bridge author and a user read:
/// docs/protocol.md's (with the `command` it answers) and the README's.
#[test]
fn the_chat_command_tables_name_every_chat_command() {
    let doc = protocol_doc();
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let in_protocol = table_names(&doc, "send and SendReply", "text");
    let in_readme: Vec<&str> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `/"))
        .collect();
    let command_row = doc
        .lines()
        .find(|l| l.starts_with("| `command` |"))
        .expect("a `command` row");
    for command in agentd_core::COMMANDS {
        let word = format!("/{command}");
        let named = |name: &str| name == word || name.starts_with(&format!("{word} "));
        assert!(
            in_protocol.iter().any(|n| named(n)),
            "docs/protocol.md's chat-command table lacks {word}: {in_protocol:?}"
        );
        assert!(
            in_readme
                .iter()
                .any(|l| named(&format!("/{}", l.split('`').next().unwrap()))),
            "the README's chat-command table lacks {word}"
        );
        // `/resume` starts work: it is answered like work, without a `command`.
        assert!(
            command_row.contains(&format!("`{command}`")) || *command == "resume",
            "the `command` row does not name {command}"
        );
    }
}

#[test]
fn the_protocol_doc_tables_name_every_command_code_kind_state_and_field() {
    let doc = protocol_doc();
    let check = |heading: &str, column: &str, expected: Vec<String>| {
        assert_eq!(
            table_names(&doc, heading, column),
            sorted(expected),
            "docs/protocol.md: the `{column}` table under {heading:?} and the code disagree"
        );
    };
    check(
        "Requests",
        "cmd",
        variants!(Request, json!({"id": 1, "cmd": "?"})),
    );
    check("Responses", "code", variants!(ErrorCode, json!("?")));
    check(
        "Watches and events",
        "kind",
        variants!(EventKind, json!("?")),
    );
    check("TaskView", "state", names::<TaskState>());
    check("send and SendReply", "mode", names::<QueueMode>());
    check("TaskView", "field", keys!(sample_view()));
    check(
        "send and SendReply",
        "field",
        keys!(SendReply {
            reply: String::new(),
            accepted: true,
            task: Some(sample_view()),
            capacity: Some(Capacity { busy: 0, max: 1 }),
            command: Some("status".into()),
            data: Some(Value::Null),
            duplicate: true,
            dropped: vec![sample_view()],
            notice: Some(String::new()),
            steered_into: Some(String::new()),
        }),
    );
    check(
        "status",
        "field",
        keys!(StatusReply {
            version: String::new(),
            pid: 1,
            uptime_ms: 0,
            capacity: Capacity { busy: 0, max: 1 },
            queued: 0,
            sessions: 0,
            active: vec![],
            containment: Some(agentd_proto::control::ContainmentView {
                kind: agentd_proto::control::ContainmentKind::Cgroup,
                cgroup: None,
                controllers: vec![],
                reason: None,
            }),
            liveness: Some(agentd_proto::control::LivenessView {
                heartbeat_ms: 0,
                hung_after_ms: None,
                task_timeout_ms: None,
                frame_timeout_ms: 0,
            }),
            recovery: Some(Default::default()),
        }),
    );
    check(
        "Watches and events",
        "event field",
        keys!(EventView {
            kind: EventKind::Merged,
            task_id: "t".into(),
            session: "s".into(),
            position: Some(1),
            text: Some(String::new()),
            into: Some("u".into()),
            task: Some(sample_view()),
            at: Some(String::new()),
        }),
    );
    check(
        "Responses",
        "line field",
        keys!(Response {
            id: Some(1),
            ok: true,
            result: Some(Value::Null),
            error: Some(ErrorBody::new(ErrorCode::Lagged, "")),
            event: Some(EventView {
                kind: EventKind::Progress,
                task_id: "t".into(),
                session: "s".into(),
                position: None,
                text: None,
                into: None,
                task: None,
                at: None,
            }),
            skipped: Some(1),
        }),
    );
    check(
        "tasks and TasksPage",
        "page field",
        keys!(TasksPage {
            tasks: vec![sample_view()],
            next_cursor: Some("t".into()),
        }),
    );
    let stopping = sample_stopping();
    check(
        "stop and StopReply",
        "stop field",
        keys!(StopReply {
            stopped: vec![sample_view()],
            stopping: vec![stopping.clone()],
        }),
    );
    check("stop and StopReply", "stopping field", keys!(stopping));
    check(
        "Watches and events",
        "answer field",
        keys!(WatchReply {
            task_id: Some("t".into()),
            session: Some("s".into()),
            task: Some(sample_view()),
        }),
    );
    // The `step` row names every step of the stop sequence.
    let step_row = doc
        .lines()
        .find(|l| l.starts_with("| `step` |"))
        .expect("a `step` row");
    for step in names::<StopStep>() {
        assert!(
            step_row.contains(&format!("`{step}`")),
            "the `step` row does not name {step}"
        );
    }
    // Every field of every request is named in its command's row.
    let some = || Some("x".to_string());
    let requests = [
        RequestBody::Hello {
            protocol: 1,
            client: some(),
        },
        RequestBody::Ping,
        RequestBody::Send {
            session: "s".into(),
            text: "t".into(),
            message_id: some(),
            priority: Some(Priority::Background),
            mode: Some(QueueMode::Steer),
            timeout_ms: Some(1),
        },
        RequestBody::Queue {
            session: "s".into(),
            mode: Some(QueueMode::Steer),
            debounce_ms: Some(0),
            cap: Some(1),
            drop: Some(DropPolicy::Old),
            reset: true,
        },
        RequestBody::Watch {
            task_id: some(),
            session: some(),
        },
        RequestBody::Status { task_id: some() },
        RequestBody::Tasks {
            session: some(),
            all: true,
            limit: Some(1),
            cursor: some(),
        },
        RequestBody::Stop {
            task_id: some(),
            session: some(),
            all: true,
            wait: false,
        },
        RequestBody::Log {
            task_id: "t".into(),
            offset: 1,
        },
        RequestBody::Resume {
            task_id: "t".into(),
        },
    ];
    assert_eq!(
        requests.len(),
        variants!(Request, json!({"id": 1, "cmd": "?"})).len(),
        "a command is missing from this list"
    );
    for body in requests {
        let value = serde_json::to_value(&body).unwrap();
        let cmd = value["cmd"].as_str().unwrap().to_string();
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `{cmd}` |")))
            .unwrap_or_else(|| panic!("no row for {cmd}"));
        let fields = row.split('|').nth(2).unwrap_or("");
        for key in keys!(&value).into_iter().filter(|k| k != "cmd") {
            assert!(
                fields.contains(&format!("`{key}`")),
                "the `{cmd}` row does not name its field {key}"
            );
        }
    }
    // Every exit field is named in the TaskView table's `exit` row.
    let exit_row = doc
        .lines()
        .find(|l| l.starts_with("| `exit` |"))
        .expect("an `exit` row");
    let exit = ExitView {
        code: Some(0),
        signal: Some(0),
        command_code: Some(0),
        command_signal: Some(0),
        ended_by: Some(agentd_proto::control::StopStep::Sigkill),
        stop_ms: Some(0),
        error: Some(String::new()),
        reason: Some(String::new()),
    };
    for key in keys!(exit) {
        assert!(
            exit_row.contains(&format!("`{key}`")),
            "the `exit` row does not name {key}"
        );
    }
}
