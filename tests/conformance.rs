//! docs/protocol.md is the contract: its transcripts are replayed against a real
//! agentd, its JSON examples must parse, and its tables must name what exists.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

use serde_json::{json, Value};

use crate::support::*;

/// One client connection speaking raw lines.
struct Conn {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Conn {
    fn open(d: &Daemon) -> Conn {
        let stream = UnixStream::connect(&d.socket).expect("connect");
        stream
            .set_read_timeout(Some(DEADLINE))
            .expect("read timeout");
        Conn {
            writer: stream.try_clone().expect("clone"),
            reader: BufReader::new(stream),
        }
    }

    fn send(&mut self, request: &Value) {
        writeln!(self.writer, "{request}").expect("write request");
    }

    fn line(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read a line");
        assert!(n > 0, "agentd closed the connection");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("invalid JSON line ({e}): {line}"))
    }
}

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
