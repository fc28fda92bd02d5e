//! What a restarted agentd still knows: finished tasks listed from the store (paged,
//! pruned by the retention), re-delivered message ids answered with their original
//! task, a queued message's own time limit, and recovered work that the new limits
//! would refuse.

use std::collections::HashSet;

use serde_json::{json, Value};

use crate::support::*;

/// A config file in `daemon`'s dir holding `history = N` (finished tasks kept in
/// memory), for the `--config` flag.
fn history_config(dir: &std::path::Path, history: usize) -> String {
    let path = dir.join("agentd.toml");
    std::fs::write(&path, format!("history = {history}\n")).unwrap();
    path.to_str().unwrap().to_string()
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("a list: {list}"))
        .iter()
        .map(|t| t["task_id"].as_str().unwrap().to_string())
        .collect()
}

/// Every page of `tasks` (with `limit`), joined, checking each page's order.
fn all_pages(daemon: &Daemon, limit: u32) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut body = json!({"cmd": "tasks", "all": true, "limit": limit});
        if let Some(c) = &cursor {
            body["cursor"] = json!(c);
        }
        let page = daemon.request(body);
        let page_ids = ids(&page["tasks"]);
        assert!(page_ids.len() <= limit as usize, "{page}");
        let mut sorted = page_ids.clone();
        sorted.sort();
        assert_eq!(page_ids, sorted, "a page is in task id order: {page}");
        out.extend(page_ids);
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return out,
        }
    }
}

fn run_tasks(daemon: &Daemon, n: usize, tag: &str) -> Vec<String> {
    (0..n)
        .map(|i| {
            let id = daemon.submit("chat", &format!("echo {tag}-{i}"));
            daemon.wait_state(&id, "succeeded");
            id
        })
        .collect()
}

#[test]
fn tasks_all_lists_the_finished_tasks_of_earlier_runs_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let config = history_config(dir.path(), 2);
    let agent = format!("{AGENT_EXEC} -- sh -c {{text}}");
    let mut daemon = Daemon::start_in(dir, &["--agent", &agent, "--config", &config], &[]);
    let before = run_tasks(&daemon, 5, "before");
    kill(daemon.pid(), libc::SIGTERM);
    daemon.restart();
    let after = run_tasks(&daemon, 2, "after");
    let every: Vec<String> = before.iter().chain(&after).cloned().collect();

    // Unpaged: the finished ones oldest first, from this run and the earlier one.
    let listed = daemon.request(json!({"cmd": "tasks", "all": true}));
    assert_eq!(ids(&listed), every, "{listed}");
    let first = &listed.as_array().unwrap()[0];
    assert_eq!(first["state"], json!("succeeded"), "{first}");
    assert_eq!(first["result"], json!("before-0"), "{first}");
    // Of one session, and none of another.
    let chat = daemon.request(json!({"cmd": "tasks", "session": "chat", "all": true}));
    assert_eq!(ids(&chat), every);
    let other = daemon.request(json!({"cmd": "tasks", "session": "other", "all": true}));
    assert_eq!(ids(&other), Vec::<String>::new());
    // Without `all`: nothing is live.
    assert_eq!(ids(&daemon.request(json!({"cmd": "tasks"}))).len(), 0);

    // Paged: each task exactly once, in id order.
    let paged = all_pages(&daemon, 2);
    let mut sorted = every.clone();
    sorted.sort();
    assert_eq!(paged, sorted);

    // agentctl fetches the pages.
    let cli = daemon.agentctl_json(&["tasks", "--all"]);
    let cli_ids: HashSet<String> = ids(&cli).into_iter().collect();
    assert_eq!(cli_ids, every.iter().cloned().collect::<HashSet<_>>());

    // A task of the earlier run by a prefix of its id, and in its chat.
    let view = daemon.task(&before[0][..23]);
    assert_eq!(view["task_id"], json!(before[0]), "{view}");
    assert_eq!(view["result"], json!("before-0"), "{view}");
    let chat = daemon.send("chat", &format!("/status {}", &before[1][..23]));
    assert_eq!(chat["data"]["task_id"], json!(before[1]), "{chat}");
    assert!(
        chat["reply"].as_str().unwrap().contains("succeeded"),
        "{chat}"
    );
    let elsewhere = daemon
        .try_request(
            json!({"cmd": "send", "session": "other", "text": format!("/status {}", before[1])}),
        )
        .unwrap();
    assert_eq!(
        elsewhere["error"]["code"],
        json!("forbidden"),
        "{elsewhere}"
    );
    let unknown = daemon
        .try_request(json!({"cmd": "status", "task_id": "01a1fb45-182d-75a4-ad1f-f60ce7a63179"}))
        .unwrap();
    assert_eq!(unknown["error"]["code"], json!("not_found"), "{unknown}");
    // Its output log, by a prefix too.
    let out = daemon.agentctl(&["log", &before[0][..23]]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "before-0");
    let unknown = daemon
        .try_request(json!({"cmd": "log", "task_id": "01a1fb45-182d-75a4-ad1f-f60ce7a63179"}))
        .unwrap();
    assert_eq!(unknown["error"]["code"], json!("not_found"), "{unknown}");
}

#[test]
fn tasks_all_shows_what_the_retention_keeps() {
    let agent = format!("{AGENT_EXEC} -- sh -c {{text}}");
    let mut daemon = Daemon::start(&["--agent", &agent, "--retention-count", "3"]);
    let before = run_tasks(&daemon, 2, "before");
    kill(daemon.pid(), libc::SIGKILL);
    daemon.restart();
    let after = run_tasks(&daemon, 3, "after");
    // The newest 3 (pruned as tasks finish, not only at start).
    let listed = daemon.request(json!({"cmd": "tasks", "all": true}));
    assert_eq!(ids(&listed), after, "{listed}");
    assert_eq!(all_pages(&daemon, 2), after);
    drop(before);
}

/// Sends `text` with a message id; returns the answer.
fn send_once(daemon: &Daemon, text: &str, message_id: &str) -> Value {
    daemon.request(json!({
        "cmd": "send", "session": "chat", "text": text, "message_id": message_id
    }))
}

#[test]
fn a_redelivered_message_is_answered_with_its_task_after_it_left_memory_and_after_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let config = history_config(dir.path(), 1);
    let marks = dir.path().join("runs");
    let agent = format!("{AGENT_EXEC} -- sh -c {{text}}");
    let mut daemon = Daemon::start_in(dir, &["--agent", &agent, "--config", &config], &[]);
    let text = format!("echo ran >> {}; echo first", marks.display());
    let first = send_once(&daemon, &text, "evt-1");
    let id = first["task"]["task_id"].as_str().unwrap().to_string();
    daemon.wait_state(&id, "succeeded");
    // Two more tasks push it out of the in-memory history.
    run_tasks(&daemon, 2, "later");
    let check = |daemon: &Daemon, when: &str| {
        let again = send_once(daemon, &text, "evt-1");
        assert_eq!(again["duplicate"], json!(true), "{when}: {again}");
        assert_eq!(again["task"]["task_id"], json!(id), "{when}: {again}");
        assert_eq!(
            again["task"]["state"],
            json!("succeeded"),
            "{when}: {again}"
        );
        assert_eq!(again["task"]["result"], json!("first"), "{when}: {again}");
    };
    check(&daemon, "out of the history");
    kill(daemon.pid(), libc::SIGTERM);
    daemon.restart();
    check(&daemon, "after a shutdown");
    kill(daemon.pid(), libc::SIGKILL);
    daemon.restart();
    check(&daemon, "after kill -9");
    // Give a wrongly started run every chance to show up before looking.
    daemon.request(json!({"cmd": "stop", "all": true}));
    let later = daemon.submit("chat", "echo done");
    daemon.wait_state(&later, "succeeded");
    assert_eq!(
        std::fs::read_to_string(&marks).unwrap(),
        "ran\n",
        "it ran once"
    );
}

#[test]
fn a_queued_messages_own_time_limit_survives_a_restart() {
    let agent = format!("{TEST_AGENT} {{text}}");
    let mut daemon = Daemon::start(&["--agent", &agent, "--max-concurrent", "1"]);
    let running = daemon.submit("a", "sleep:60000");
    daemon.wait_state(&running, "running");
    let queued = daemon.request(json!({
        "cmd": "send", "session": "b", "text": "sleep:60000", "timeout_ms": 800
    }));
    let queued = queued["task"]["task_id"].as_str().unwrap().to_string();
    assert_eq!(daemon.task(&queued)["state"], json!("queued"));
    kill(daemon.pid(), libc::SIGKILL);
    daemon.restart();
    assert_eq!(daemon.task(&running)["state"], json!("interrupted"));
    let view = daemon.wait_state(&queued, "failed");
    assert_eq!(view["exit"]["error"], json!("timed out"), "{view}");
}

#[test]
fn recovered_work_past_the_new_limits_is_kept_and_said() {
    let agent = format!("{TEST_AGENT} {{text}}");
    let mut daemon = Daemon::start(&[
        "--agent",
        &agent,
        "--max-concurrent",
        "1",
        "--queue-mode",
        "followup",
        "--debounce",
        "0s",
    ]);
    let running = daemon.submit("busy", "sleep:60000");
    daemon.wait_state(&running, "running");
    let queued: Vec<String> = (0..5)
        .map(|i| daemon.submit(&format!("s{}", i % 2), &format!("result:r{i}")))
        .collect();
    kill(daemon.pid(), libc::SIGKILL);
    // Back with room for 1 queued task in all, and 1 per session, new ones refused:
    // the first starts, the second waits, the other 3 are over the limits.
    daemon.args.extend(
        ["--max-queued", "1", "--cap", "1", "--drop", "new"]
            .iter()
            .map(|s| s.to_string()),
    );
    daemon.restart();
    let status = daemon.request(json!({"cmd": "status"}));
    assert_eq!(status["recovery"]["queued"], json!(5), "{status}");
    assert_eq!(status["recovery"]["over_limits"], json!(3), "{status}");
    let line = stdout(&daemon.agentctl(&["status"]));
    assert!(line.contains("over the limits"), "{line}");
    // Every one is listed, then runs.
    let listed: HashSet<String> = ids(&daemon.request(json!({"cmd": "tasks", "all": true})))
        .into_iter()
        .collect();
    for id in &queued {
        assert!(listed.contains(id), "{id} is listed: {listed:?}");
        daemon.wait_state(id, "succeeded");
    }
}

#[test]
fn a_redelivery_of_a_task_the_retention_pruned_is_still_not_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let marks = dir.path().join("runs");
    let agent = format!("{AGENT_EXEC} -- sh -c {{text}}");
    let mut daemon = Daemon::start_in(dir, &["--agent", &agent, "--retention-count", "1"], &[]);
    let text = format!("echo ran >> {}", marks.display());
    let first = send_once(&daemon, &text, "evt-1");
    let id = first["task"]["task_id"].as_str().unwrap().to_string();
    daemon.wait_state(&id, "succeeded");
    run_tasks(&daemon, 1, "later");
    kill(daemon.pid(), libc::SIGTERM);
    // The store prunes the first task when it opens.
    daemon.restart();
    let gone = daemon
        .try_request(json!({"cmd": "status", "task_id": id}))
        .unwrap();
    assert_eq!(gone["error"]["code"], json!("not_found"), "{gone}");
    let again = send_once(&daemon, &text, "evt-1");
    assert_eq!(again["duplicate"], json!(true), "{again}");
    assert_eq!(again["task"], Value::Null, "{again}");
    assert!(again["reply"].as_str().unwrap().contains(&id), "{again}");
    let later = daemon.submit("chat", "echo done");
    daemon.wait_state(&later, "succeeded");
    assert_eq!(
        std::fs::read_to_string(&marks).unwrap(),
        "ran\n",
        "it ran once"
    );
}

#[test]
fn queue_settings_answered_as_set_survive_a_kill9_right_after_the_answer() {
    let mut daemon = Daemon::start(&[]);
    for (i, chat) in ["alice", "bob", "carol"].iter().enumerate() {
        let r = daemon.request(json!({"cmd": "queue", "session": chat,
            "debounce_ms": 1000 + i as u64, "cap": 7 + i as u64}));
        assert_eq!(r["debounce_ms"], json!(1000 + i as u64), "{r}");
    }
    let r = daemon.request(json!({"cmd": "send", "session": "dave", "text": "/queue cap:9"}));
    assert!(r["reply"].as_str().is_some(), "{r}");
    // The answers came after the commits: a crash right now loses none of them.
    crate::durability::kill9(&mut daemon);
    crate::durability::respawn(&mut daemon, &[], "agentd2.log");
    for (i, chat) in ["alice", "bob", "carol"].iter().enumerate() {
        let r = daemon.request(json!({"cmd": "queue", "session": chat}));
        assert_eq!(r["debounce_ms"], json!(1000 + i as u64), "{chat}: {r}");
        assert_eq!(r["cap"], json!(7 + i as u64), "{chat}: {r}");
        assert_eq!(r["custom"], json!(true), "{chat}: {r}");
    }
    let r = daemon.request(json!({"cmd": "queue", "session": "dave"}));
    assert_eq!(r["cap"], json!(9), "{r}");
}
