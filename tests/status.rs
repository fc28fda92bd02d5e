//! `status`: answered by the connection from the loop's snapshot, in order with the
//! connection's own requests, the same answer as the loop's, and bounded in size
//! whatever the queue holds.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

/// A connection that writes many request lines (from a thread, so that neither side
/// blocks on a full socket buffer) and reads their answers.
pub(crate) fn exchange(d: &Daemon, requests: Vec<Value>) -> Vec<Value> {
    let stream = UnixStream::connect(&d.socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("read timeout");
    let mut writer = stream.try_clone().expect("clone");
    let n = requests.len();
    let text: String = requests.iter().map(|r| format!("{r}\n")).collect();
    let sender = std::thread::spawn(move || writer.write_all(text.as_bytes()));
    let mut reader = BufReader::new(stream);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut line = String::new();
        reader.read_line(&mut line).expect("an answer");
        out.push(serde_json::from_str(&line).expect("a JSON line"));
    }
    sender.join().expect("writer").expect("write the requests");
    out
}

pub(crate) fn answer_to(answers: &[Value], id: u64) -> &Value {
    answers
        .iter()
        .find(|a| a["id"] == json!(id))
        .unwrap_or_else(|| panic!("no answer to {id} in {answers:?}"))
}

/// The status answer without what changes by itself between two answers.
fn comparable(mut status: Value) -> Value {
    status["uptime_ms"] = Value::Null;
    status
}

#[test]
fn a_status_pipelined_after_a_send_sees_that_send() {
    let d = Daemon::with_echo_agent(&["--max-concurrent", "1"]);
    let gate = d.gate("g");
    let first = d.submit("alice", &format!("hold {gate} first"));
    d.wait_state(&first, "running");
    // A send and a status in one write on one connection: the status is read while
    // the send is still on its way to the loop, and must count it.
    for round in 0..5u64 {
        let answers = exchange(
            &d,
            vec![
                json!({"id": 1, "cmd": "send", "session": format!("s{round}"), "text": "queued work"}),
                json!({"id": 2, "cmd": "status"}),
            ],
        );
        let sent = answer_to(&answers, 1);
        assert_eq!(sent["ok"], json!(true), "{sent}");
        let status = &answer_to(&answers, 2)["result"];
        assert_eq!(
            status["queued"],
            json!(round + 1),
            "round {round}: {status}"
        );
        assert_eq!(
            status["sessions"],
            json!(round + 2),
            "round {round}: {status}"
        );
    }
    d.release(&gate);
}

#[test]
fn status_from_the_connection_is_the_loops_answer() {
    let d = Daemon::with_echo_agent(&["--max-concurrent", "2"]);
    let gate = d.gate("g");
    let a = d.submit("alice", &format!("hold {gate} a"));
    let b = d.submit("bob", &format!("hold {gate} b"));
    d.wait_state(&a, "running");
    d.wait_state(&b, "running");
    d.submit("alice", "queued behind a");
    d.submit("carol", "queued too");
    // On a connection of its own: from the snapshot.
    let snapshot = comparable(d.request(json!({"cmd": "status"})));
    // Behind a request of the same connection that the loop answers: through the
    // loop, in order.
    let answers = exchange(
        &d,
        vec![
            json!({"id": 1, "cmd": "status", "task_id": a}),
            json!({"id": 2, "cmd": "status"}),
        ],
    );
    let through_loop = comparable(answer_to(&answers, 2)["result"].clone());
    assert_eq!(snapshot, through_loop);
    assert_eq!(snapshot["queued"], json!(2), "{snapshot}");
    assert_eq!(
        snapshot["capacity"],
        json!({"busy": 2, "max": 2}),
        "{snapshot}"
    );
    let active: Vec<&Value> = snapshot["active"].as_array().unwrap().iter().collect();
    assert_eq!(active.len(), 2, "{snapshot}");
    assert_eq!(active[0]["task_id"], json!(a), "{snapshot}");

    // A change an agent makes (its task ends) shows at once too.
    d.release(&gate);
    d.wait_state(&a, "succeeded");
    wait_for("status to show the next tasks", DEADLINE, || {
        let status = d.request(json!({"cmd": "status"}));
        let ids: Vec<Value> = status["active"]
            .as_array()?
            .iter()
            .map(|t| t["task_id"].clone())
            .collect();
        (!ids.contains(&json!(a))).then_some(())
    });
    let status = d.request(json!({"cmd": "status"}));
    let view = d.task(&a);
    assert_eq!(view["state"], json!("succeeded"), "{view}");
    assert!(
        status["active"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["task_id"] != json!(a)),
        "{status}"
    );
}

#[test]
fn status_does_not_grow_with_the_queue_or_the_sessions() {
    let d = Daemon::with_echo_agent(&[
        "--max-concurrent",
        "1",
        "--max-queued",
        "100000",
        "--cap",
        "100000",
    ]);
    let gate = d.gate("g");
    let first = d.submit("s0", &format!("hold {gate} first"));
    d.wait_state(&first, "running");
    let size = |d: &Daemon| d.request(json!({"cmd": "status"})).to_string().len();
    let before = size(&d);
    // 2,000 queued over 1,000 sessions, pipelined on one connection.
    let sends = (0..2000u64)
        .map(|i| json!({"id": i, "cmd": "send", "session": format!("s{}", i % 1000), "text": format!("work {i}")}))
        .collect();
    for answer in exchange(&d, sends) {
        assert_eq!(answer["ok"], json!(true), "{answer}");
    }
    let status = d.request(json!({"cmd": "status"}));
    assert_eq!(status["queued"], json!(2000), "{status}");
    assert_eq!(status["sessions"], json!(1000), "{status}");
    // Only the counts' digits (and the uptime's) differ.
    let after = status.to_string().len();
    assert!(
        after <= before + 16,
        "status grew from {before} to {after} bytes: {status}"
    );
    d.release(&gate);
}

#[test]
fn a_chats_status_lists_its_first_queued_tasks_and_counts_the_rest() {
    let d = Daemon::with_echo_agent(&["--max-concurrent", "1", "--cap", "100"]);
    let gate = d.gate("g");
    let first = d.submit("chat", &format!("hold {gate} first"));
    d.wait_state(&first, "running");
    let sends = (0..30u64)
        .map(|i| json!({"id": i, "cmd": "send", "session": "chat", "text": format!("work {i}"), "mode": "followup"}))
        .collect();
    let mut ids: Vec<(u64, String)> = exchange(&d, sends)
        .iter()
        .map(|a| {
            assert_eq!(a["ok"], json!(true), "{a}");
            let task = a["result"]["task"]["task_id"].as_str().unwrap().to_string();
            (a["id"].as_u64().unwrap(), task)
        })
        .collect();
    // In the order they were sent (answers may come in any order).
    ids.sort();
    let reply = d.send("chat", "/status");
    let text = reply["reply"].as_str().unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[1].contains(&first) && lines[1].contains("running"),
        "{text}"
    );
    let queued: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("queued (position"))
        .collect();
    assert_eq!(queued.len(), 10, "{text}");
    // The first ten in the order they will run; the other twenty counted.
    for (i, line) in queued.iter().enumerate() {
        assert!(
            line.contains(&format!("queued (position {})", i + 1)),
            "{text}"
        );
    }
    assert!(text.contains("… and 20 more queued in this chat"), "{text}");
    // The ones shown are the first ten sent.
    for (_, id) in &ids[..10] {
        assert!(text.contains(id.as_str()), "{id} missing: {text}");
    }
    assert_eq!(reply["data"]["queued"], json!(30), "{reply}");
    d.release(&gate);
}

#[test]
fn status_from_the_connection_shows_each_new_progress_line() {
    let d = Daemon::with_agent_exec(&["--max-concurrent", "2"]);
    let gate = d.gate("g");
    let other = d.submit("bob", "echo bob-is-up; sleep 300");
    let task = d.submit(
        "alice",
        &format!("echo first; while [ ! -e {gate} ]; do sleep 0.02; done; echo second; sleep 300"),
    );
    let progress_of = |status: &Value, id: &str| {
        status["active"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t["task_id"] == json!(id)))
            .map(|t| t["progress"].clone())
    };
    // Once the loop has taken a line (the task's own view shows it), the very next
    // status shows it too: the snapshot is patched in the same step, not at the
    // next rebuild.
    for (id, line) in [(&other, "bob-is-up"), (&task, "first")] {
        d.wait_progress(id, line);
        let status = d.request(json!({"cmd": "status"}));
        assert_eq!(progress_of(&status, id), Some(json!(line)), "{status}");
    }
    d.release(&gate);
    d.wait_progress(&task, "second");
    let status = d.request(json!({"cmd": "status"}));
    assert_eq!(
        progress_of(&status, &task),
        Some(json!("second")),
        "{status}"
    );
    assert_eq!(
        progress_of(&status, &other),
        Some(json!("bob-is-up")),
        "{status}"
    );
    // The same as the loop answers.
    let answers = exchange(
        &d,
        vec![
            json!({"id": 1, "cmd": "status", "task_id": task}),
            json!({"id": 2, "cmd": "status"}),
        ],
    );
    assert_eq!(
        comparable(status),
        comparable(answer_to(&answers, 2)["result"].clone())
    );
}

#[test]
fn status_from_the_connection_shows_a_result_reported_before_the_agent_exits() {
    // The agent reports its result and stays alive: the task is still active, and
    // the snapshot (rebuilt only when what the active views show changed) shows the
    // result at once, as the loop's own answer does.
    let d = Daemon::with_test_agent(&["--cancel-grace", "300s"]);
    let task = d.submit("alice", "result:early-answer linger:300000");
    let result_of = |status: &Value| {
        status["active"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t["task_id"] == json!(task)))
            .map(|t| t["result"].clone())
    };
    wait_for("the task's own view to show its result", DEADLINE, || {
        (d.task(&task)["result"] == json!("early-answer")).then_some(())
    });
    let status = d.request(json!({"cmd": "status"}));
    assert_eq!(result_of(&status), Some(json!("early-answer")), "{status}");
    let answers = exchange(
        &d,
        vec![
            json!({"id": 1, "cmd": "status", "task_id": task}),
            json!({"id": 2, "cmd": "status"}),
        ],
    );
    assert_eq!(
        comparable(status),
        comparable(answer_to(&answers, 2)["result"].clone())
    );
}

/// Under a flood of sends from many connections (the loop handles them in slices,
/// letting the connections run between), a `status` answered from the snapshot
/// still counts every send whose `queued` answer agentd wrote before the `status`
/// was sent: to any connection (a probe of its own), and to the same one (a client
/// asking after its answer).
#[test]
fn a_status_counts_every_send_already_answered_to_any_client() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const CLIENTS: usize = 16;
    const PER: usize = 40;
    let d = Daemon::with_echo_agent(&["--max-concurrent", "1"]);
    let gate = d.gate("g");
    let first = d.submit("hold", &format!("hold {gate} first"));
    d.wait_state(&first, "running");
    // `queued` answers read by the clients so far (each counted once it is read).
    let answered = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let connect = || {
        let stream = UnixStream::connect(&d.socket).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("read timeout");
        let writer = stream.try_clone().expect("clone");
        (BufReader::new(stream), writer)
    };
    let round_trip = |conn: &mut (BufReader<UnixStream>, UnixStream), request: Value| -> Value {
        writeln!(conn.1, "{request}").expect("write a request");
        let mut line = String::new();
        conn.0.read_line(&mut line).expect("an answer");
        serde_json::from_str(&line).expect("a JSON line")
    };
    let queued_in = |answer: &Value| -> u64 {
        assert_eq!(answer["ok"], json!(true), "{answer}");
        answer["result"]["queued"].as_u64().expect("a queued count")
    };
    let probes = std::thread::scope(|scope| {
        for c in 0..CLIENTS {
            let (answered, connect, round_trip) = (&answered, &connect, &round_trip);
            scope.spawn(move || {
                let mut conn = connect();
                for i in 0..PER {
                    let sent = round_trip(
                        &mut conn,
                        json!({"id": 1, "cmd": "send", "session": format!("c{c}-{}", i % 4), "text": format!("work {i}")}),
                    );
                    assert_eq!(sent["result"]["accepted"], json!(true), "{sent}");
                    assert_eq!(sent["result"]["task"]["state"], json!("queued"), "{sent}");
                    answered.fetch_add(1, Ordering::SeqCst);
                    if i % 5 == 4 {
                        // On the same connection, after its answer.
                        let before = answered.load(Ordering::SeqCst);
                        let status = round_trip(&mut conn, json!({"id": 2, "cmd": "status"}));
                        let queued = queued_in(&status);
                        assert!(queued >= before, "client {c}: status counts {queued} queued, {before} answered before it was sent");
                    }
                }
            });
        }
        let probe = scope.spawn(|| {
            let mut conn = connect();
            let mut n = 0u64;
            while !done.load(Ordering::SeqCst) {
                let before = answered.load(Ordering::SeqCst);
                let queued = queued_in(&round_trip(&mut conn, json!({"id": 3, "cmd": "status"})));
                assert!(
                    queued >= before,
                    "probe: status counts {queued} queued, {before} answered before it was sent"
                );
                n += 1;
            }
            n
        });
        // The clients are the other scoped threads: wait for the count they reach.
        wait_for("every send answered", DEADLINE, || {
            (answered.load(Ordering::SeqCst) == (CLIENTS * PER) as u64).then_some(())
        });
        done.store(true, Ordering::SeqCst);
        probe.join().expect("the probe")
    });
    assert!(probes > 0);
    let status = d.request(json!({"cmd": "status"}));
    assert_eq!(status["queued"], json!(CLIENTS * PER), "{status}");
    d.release(&gate);
}
