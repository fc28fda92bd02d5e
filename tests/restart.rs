//! Restarts with a queue longer than one page of recovery (agentd reads the queued
//! tasks back from the store a page at a time, so that a long queue is never held
//! twice): every task comes back once, with its id, in its session's order.

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::durability::{echo_agent_args, kill9, respawn, Reaper};
use crate::support::*;

/// Every task `tasks` lists, through its pages.
fn all_tasks(daemon: &Daemon) -> Vec<Value> {
    let (mut all, mut cursor) = (Vec::new(), None::<String>);
    loop {
        let mut request = json!({"cmd": "tasks", "limit": 500});
        if let Some(c) = &cursor {
            request["cursor"] = json!(c);
        }
        let page = daemon.request(request);
        all.extend(page["tasks"].as_array().expect("a page").iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return all,
        }
    }
}

#[test]
fn a_queue_of_several_pages_comes_back_whole_in_order_after_kill9() {
    const SESSIONS: usize = 3;
    const PER_SESSION: usize = 800; // 2,400 queued: more than two pages of 1,024.
    let mut args = echo_agent_args();
    args.extend(["--cap", "1000", "--max-queued", "5000"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start(&args);
    let gate = daemon.gate("never");
    let running = daemon.submit("busy", &format!("hold {gate} first"));
    daemon.wait_state(&running, "running");
    // One client per session, at the same time: each session's order is its client's.
    let sent: HashMap<String, Vec<String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..SESSIONS)
            .map(|s| {
                let (daemon, gate) = (&daemon, &gate);
                scope.spawn(move || {
                    let session = format!("chat-{s}");
                    let ids: Vec<String> = (0..PER_SESSION)
                        .map(|i| daemon.submit(&session, &format!("hold {gate} {i}")))
                        .collect();
                    (session, ids)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let orphans = kill9(&mut daemon);
    let _reaper = Reaper(orphans);

    respawn(&mut daemon, &args, "agentd2.log");
    let status = daemon.request(json!({"cmd": "status"}));
    assert_eq!(
        status["recovery"]["queued"],
        json!(SESSIONS * PER_SESSION),
        "{status}"
    );
    let tasks = all_tasks(&daemon);
    assert_eq!(tasks.len(), SESSIONS * PER_SESSION, "each task once");
    for (session, ids) in &sent {
        // The session's tasks by queue position; one may have started already (the
        // queue runs on after a restart): it comes first.
        let mut back: Vec<&Value> = tasks
            .iter()
            .filter(|t| t["session"] == json!(session))
            .collect();
        back.sort_by_key(|t| t["position"].as_u64().unwrap_or(0));
        let back: Vec<&str> = back
            .iter()
            .map(|t| t["task_id"].as_str().unwrap())
            .collect();
        assert_eq!(back, *ids, "session {session}");
    }
}
