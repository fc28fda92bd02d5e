//! Things that cross each other in time: a timer armed by one step firing during a
//! later one, an agent's death racing its reaping, an event and the state it reports.

use serde_json::json;

use crate::support::*;

#[test]
fn a_linger_timer_armed_by_the_result_does_not_cut_a_later_stops_grace_short() {
    let d = Daemon::with_test_agent(&["--cancel-grace", "6s", "--term-grace", "10s"]);
    let mark = d.dir.path().join("a-second-after-the-result");
    // Reports, then lingers; a second after its result it creates `mark`.
    let task = d.submit(
        "alice",
        &format!("linger:60000 touch:1000:{} ignore-cancel", mark.display()),
    );
    wait_for("the agent is a second past its result", DEADLINE, || {
        mark.exists().then_some(())
    });
    // The result armed a linger timer for 6 s after it, which is 5 s from now. This
    // stop gives the agent its own 6 s of cancel grace before SIGTERM.
    let stopped = d.agentctl_json(&["stop", &task]);
    let view = &stopped["stopped"][0];
    assert_eq!(view["exit"]["ended_by"], json!("sigterm"), "{stopped}");
    let stop_ms = view["exit"]["stop_ms"].as_u64().unwrap();
    assert!(
        stop_ms >= 6000,
        "SIGTERM came {stop_ms} ms after the stop, before the 6 s cancel grace: {stopped}"
    );
}

#[test]
fn stopping_sigstopped_agents_records_cancelled_not_a_protocol_error() {
    // SIGTERM (then SIGCONT) kills the test agent with agentd's Cancel unread, so its
    // channel ends with "connection reset by peer", racing the reaper. Which comes
    // first depends on scheduling (the dispatcher's scenario test pins the rule
    // down): six at once give the race six chances.
    let d = Daemon::with_test_agent(&[
        "--max-concurrent",
        "6",
        "--cancel-grace",
        "300ms",
        "--term-grace",
        "10s",
    ]);
    let tasks: Vec<String> = (0..6)
        .map(|i| d.submit(&format!("s{i}"), "sleep:60000"))
        .collect();
    for task in &tasks {
        let view = d.wait_state(task, "running");
        kill(view["pid"].as_u64().unwrap() as u32, libc::SIGSTOP);
    }
    let stopped = d.agentctl_json(&["stop", "--all"]);
    for view in stopped["stopped"].as_array().unwrap() {
        assert_eq!(view["state"], json!("cancelled"), "{view}\n{}", d.log());
        assert_eq!(view["exit"]["ended_by"], json!("sigterm"), "{view}");
    }
    assert_eq!(stopped["stopped"].as_array().unwrap().len(), 6);
}

#[test]
fn a_channel_reset_after_sigterm_leaves_the_outcome_to_the_stop() {
    // The agent reads nothing (agentd's Cancel stays unread); on SIGTERM it closes its
    // channel, which agentd sees reset, and exits a second later: the reset comes
    // before the reap, every time.
    let d = Daemon::with_test_agent(&["--cancel-grace", "300ms", "--term-grace", "10s"]);
    let task = d.submit("alice", "close-on-term:1000");
    d.wait_state(&task, "running");
    let stopped = d.agentctl_json(&["stop", &task]);
    let view = &stopped["stopped"][0];
    assert_eq!(view["state"], json!("cancelled"), "{view}\n{}", d.log());
    assert_eq!(view["exit"]["ended_by"], json!("sigterm"), "{view}");
    assert!(
        d.log().contains("Connection reset by peer"),
        "the channel was not reset before the reap:\n{}",
        d.log()
    );
}

#[test]
fn a_progress_event_carries_the_task_as_it_is_after_that_progress() {
    let d = Daemon::with_test_agent(&[]);
    let mut watch = Watch::session(&d, "alice");
    let task = d.submit("alice", "progress:5");
    let events = watch.until(|e| e["kind"] == json!("finished"));
    let progress: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == json!("progress"))
        .collect();
    // Progress may be coalesced for a subscriber (latest wins, with a count of the
    // lines it replaced), but every line is accounted for and the last one is shown.
    let lines: u64 = progress
        .iter()
        .map(|e| 1 + e["skipped"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(lines, 5, "{events:?}");
    assert_eq!(
        progress.last().unwrap()["text"],
        json!("line 5"),
        "{events:?}"
    );
    for event in progress {
        assert_eq!(event["task_id"], json!(task));
        assert_eq!(event["task"]["progress"], event["text"], "{event}");
    }
}
