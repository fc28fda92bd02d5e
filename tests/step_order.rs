//! What clients read of one loop step, against the `status` snapshot the connections
//! answer from: nothing a client has read (an answer, an event) is missing from a
//! `status` it asks for afterwards, on any connection; and a connection's own order
//! holds: a `send`'s answer (sent after the commit, from the store's writer through
//! the relay) before any event about its task. The probes here only ever ask
//! `status`, so they are served on the fast lane (the thread `agentd-fast`), while
//! the watchers and senders are on the loop's runtime, whose writers run only after
//! a step (and its snapshot) is done: these tests check that ordering across the two
//! threads. (An earlier design that served every connection on a thread of its own
//! needed the step's lines held in the outboxes until the snapshot was out: without
//! the hold the first two tests failed in 4 of 4 and 3 of 4 runs, while
//! `status::a_status_counts_every_send_already_answered_to_any_client` cannot
//! fail that way, since a `send`'s answer follows its commit, after the step. With
//! the snapshot's counts published one step late on purpose, the first test and the
//! last one here failed.)

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

/// A connection for one request at a time.
struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    fn open(d: &Daemon) -> Conn {
        let stream = UnixStream::connect(&d.socket).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("read timeout");
        let writer = stream.try_clone().expect("clone");
        Conn {
            reader: BufReader::new(stream),
            writer,
        }
    }

    fn write(&mut self, request: &Value) {
        writeln!(self.writer, "{request}").expect("write a request");
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("a line");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad line {line:?}: {e}"))
    }

    fn round_trip(&mut self, request: Value) -> Value {
        self.write(&request);
        self.read()
    }

    /// `status` (answered from the loop's snapshot: this connection has nothing else
    /// in flight).
    fn status(&mut self) -> Value {
        let answer = self.round_trip(json!({"id": 1, "cmd": "status"}));
        assert_eq!(answer["ok"], json!(true), "{answer}");
        answer["result"].clone()
    }
}

fn active_ids(status: &Value) -> Vec<String> {
    status["active"]
        .as_array()
        .expect("active tasks")
        .iter()
        .map(|t| t["task_id"].as_str().expect("a task id").to_string())
        .collect()
}

/// Watchers are told of each new task (`accepted`) in the step that queued it, well
/// before its sender's answer (which waits for the commit): a `status` asked right
/// after such an event, on another connection, counts every task any watcher has
/// been told of.
#[test]
fn a_status_counts_every_task_a_watcher_was_told_of() {
    const SESSIONS: usize = 6;
    const PER: usize = 60;
    let d = Daemon::with_echo_agent(&["--max-concurrent", "1", "--cap", "1000"]);
    let gate = d.gate("g");
    let first = d.submit("hold", &format!("hold {gate} first"));
    d.wait_state(&first, "running");
    // Tasks some watcher has read an `accepted` event of.
    let told = AtomicU64::new(0);
    let watches: Vec<Watch> = (0..SESSIONS)
        .map(|s| Watch::session(&d, &format!("s{s}")))
        .collect();
    std::thread::scope(|scope| {
        for (s, mut watch) in watches.into_iter().enumerate() {
            let (d, told) = (&d, &told);
            scope.spawn(move || {
                let mut probe = Conn::open(d);
                let mut seen = 0;
                while seen < PER {
                    let event = watch.next();
                    if event["kind"] != json!("accepted") {
                        continue;
                    }
                    seen += 1;
                    told.fetch_add(1, Ordering::SeqCst);
                    let before = told.load(Ordering::SeqCst);
                    let queued = probe.status()["queued"].as_u64().expect("queued");
                    assert!(
                        queued >= before,
                        "session s{s}: status counts {queued} queued, watchers were told of {before}"
                    );
                }
            });
            scope.spawn(move || {
                let mut conn = Conn::open(d);
                for i in 0..PER {
                    let sent = conn.round_trip(
                        json!({"id": 2, "cmd": "send", "session": format!("s{s}"), "text": format!("work {i}")}),
                    );
                    assert_eq!(sent["result"]["task"]["state"], json!("queued"), "{sent}");
                }
            });
        }
    });
    assert_eq!(told.load(Ordering::SeqCst), (SESSIONS * PER) as u64);
    let status = d.request(json!({"cmd": "status"}));
    assert_eq!(status["queued"], json!(SESSIONS * PER), "{status}");
    d.release(&gate);
}

/// A watcher told that a task started finds it among `status`'s active tasks; told
/// that it finished (its agent exited, or a `stop` ended it, whose answer comes late,
/// in the step the task ended), no longer. Several sessions at once, so that the
/// loop's steps and the clients' reads interleave.
#[test]
fn status_agrees_with_what_watchers_and_a_late_stop_answer_said() {
    const SESSIONS: usize = 3;
    const ROUNDS: usize = 8;
    let d = Daemon::with_echo_agent(&["--max-concurrent", "3", "--cancel-grace", "2s"]);
    std::thread::scope(|scope| {
        for s in 0..SESSIONS {
            let d = &d;
            scope.spawn(move || {
                let session = format!("s{s}");
                let mut watch = Watch::session(d, &session);
                let mut probe = Conn::open(d);
                for round in 0..ROUNDS {
                    let gate = d.gate(&format!("{s}-{round}"));
                    let task = d.submit(&session, &format!("hold {gate} round {round}"));
                    let is_task = |e: &Value, kind: &str| {
                        e["kind"] == json!(kind) && e["task_id"] == json!(task)
                    };
                    watch.until(|e| is_task(e, "started"));
                    let status = probe.status();
                    assert!(
                        active_ids(&status).contains(&task),
                        "{session} round {round}: told {task} started, status: {status}"
                    );
                    if round % 2 == 0 {
                        d.release(&gate);
                    } else {
                        // Answered once the task has ended, from the step that ended it.
                        let mut stopper = Conn::open(d);
                        let stopped =
                            stopper.round_trip(json!({"id": 3, "cmd": "stop", "task_id": task}));
                        assert_eq!(stopped["ok"], json!(true), "{stopped}");
                        let status = probe.status();
                        assert!(
                            !active_ids(&status).contains(&task),
                            "{session} round {round}: stop of {task} answered, status: {status}"
                        );
                    }
                    watch.until(|e| is_task(e, "finished"));
                    let status = probe.status();
                    assert!(
                        !active_ids(&status).contains(&task),
                        "{session} round {round}: told {task} finished, status: {status}"
                    );
                }
            });
        }
    });
}

/// On one connection that watches a session and sends to it, pipelined: each
/// `send`'s answer (sent after the commit, from the store's writer through the
/// connections' thread) comes before any event about its task (queued by the loop's
/// thread in the step that accepted it).
#[test]
fn a_sends_answer_comes_before_any_event_about_its_task_on_the_same_connection() {
    const SENDS: u64 = 40;
    let d = Daemon::with_echo_agent(&["--max-concurrent", "2", "--cap", "1000"]);
    let mut conn = Conn::open(&d);
    let watched = conn.round_trip(json!({"id": 0, "cmd": "watch", "session": "s"}));
    assert_eq!(watched["ok"], json!(true), "{watched}");
    let sends: String = (1..=SENDS)
        .map(|i| {
            format!(
                "{}\n",
                json!({"id": i, "cmd": "send", "session": "s", "text": format!("work {i}")})
            )
        })
        .collect();
    let mut writer = conn.writer.try_clone().expect("clone");
    let sender = std::thread::spawn(move || writer.write_all(sends.as_bytes()));
    let mut answered: HashSet<String> = HashSet::new();
    let mut finished = 0;
    while answered.len() < SENDS as usize || finished < SENDS {
        let line = conn.read();
        if line["id"] == json!(0) {
            let event = &line["event"];
            let task = event["task_id"].as_str().expect("a task id").to_string();
            assert!(
                answered.contains(&task),
                "an event about {task} before its send's answer: {line}"
            );
            if event["kind"] == json!("finished") {
                finished += 1;
            }
        } else {
            assert_eq!(line["ok"], json!(true), "{line}");
            let task = line["result"]["task"]["task_id"]
                .as_str()
                .expect("a task id");
            assert!(answered.insert(task.to_string()), "answered twice: {line}");
        }
    }
    sender.join().expect("writer").expect("write the sends");
}

/// The fast lane (the thread that accepts every connection and answers `hello`,
/// `ping` and `status` itself until a connection asks for anything else) against
/// what the loop's runtime writes to other connections: a client that connects
/// anew for each `status` after a `hello`, as `agentctl status` does, is never told
/// fewer queued tasks than a watcher on another connection has read `accepted`
/// events of, nor fewer than the senders have read `queued` answers of. Its
/// connections never leave the fast lane, so this is the ordering across threads:
/// the loop publishes a step's snapshot before that step's lines can be written.
#[test]
fn a_one_shot_status_on_the_fast_lane_counts_what_other_connections_were_told() {
    const SENDERS: usize = 4;
    const PER: usize = 40;
    let d = Daemon::with_echo_agent(&["--max-concurrent", "1", "--cap", "1000"]);
    let gate = d.gate("g");
    let first = d.submit("hold", &format!("hold {gate} first"));
    d.wait_state(&first, "running");
    let told = AtomicU64::new(0);
    let acknowledged = AtomicU64::new(0);
    let mut watch = Watch::session(&d, "s");
    let one_shot_status = |d: &Daemon| -> u64 {
        let mut conn = Conn::open(d);
        let hello = conn.round_trip(json!({"id": 1, "cmd": "hello", "protocol": 1}));
        assert_eq!(hello["ok"], json!(true), "{hello}");
        let queued = conn.status()["queued"].as_u64().expect("queued");
        let pong = conn.round_trip(json!({"id": 2, "cmd": "ping"}));
        assert_eq!(pong["result"]["pong"], json!(true), "{pong}");
        queued
    };
    std::thread::scope(|scope| {
        let (d, told, acknowledged) = (&d, &told, &acknowledged);
        scope.spawn(move || {
            let mut seen = 0;
            while seen < SENDERS * PER {
                let event = watch.next();
                if event["kind"] != json!("accepted") {
                    continue;
                }
                seen += 1;
                told.fetch_add(1, Ordering::SeqCst);
                let before = told.load(Ordering::SeqCst);
                let queued = one_shot_status(d);
                assert!(
                    queued >= before,
                    "a one-shot status counts {queued} queued, the watcher was told of {before}"
                );
            }
        });
        for c in 0..SENDERS {
            scope.spawn(move || {
                let mut conn = Conn::open(d);
                for i in 0..PER {
                    let sent = conn.round_trip(
                        json!({"id": 2, "cmd": "send", "session": "s", "text": format!("work {c} {i}")}),
                    );
                    assert_eq!(sent["result"]["task"]["state"], json!("queued"), "{sent}");
                    acknowledged.fetch_add(1, Ordering::SeqCst);
                    let before = acknowledged.load(Ordering::SeqCst);
                    let queued = one_shot_status(d);
                    assert!(
                        queued >= before,
                        "a one-shot status counts {queued} queued, senders were answered for {before}"
                    );
                }
            });
        }
    });
    assert_eq!(told.load(Ordering::SeqCst), (SENDERS * PER) as u64);
    d.release(&gate);
}
