//! Live agents never exceed `--max-concurrent`; each session runs one task at a time;
//! sessions do not block each other.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::json;

use crate::support::*;

#[test]
fn six_chats_share_two_slots_and_all_finish() {
    let d = Daemon::with_test_agent(&["--max-concurrent", "2"]);
    let ids: Vec<String> = (0..6)
        .map(|i| d.submit(&format!("chat{i}"), "sleep:400 result:ok"))
        .collect();

    // Sample agentd's live children from /proc while the six compete.
    let done = Arc::new(AtomicBool::new(false));
    let pid = d.pid();
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut max_seen = 0;
            let mut samples = 0;
            while !done.load(Ordering::Relaxed) {
                let live = process_table()
                    .iter()
                    .filter(|(child, p)| p.ppid == pid && !p.zombie && !is_guardian(**child))
                    .count();
                max_seen = max_seen.max(live);
                samples += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            (max_seen, samples)
        })
    };
    for id in &ids {
        let view = d.wait_state(id, "succeeded");
        assert_eq!(view["result"], json!("ok"));
    }
    done.store(true, Ordering::Relaxed);
    let (max_seen, samples) = sampler.join().unwrap();
    assert!(samples > 10, "too few samples: {samples}");
    assert!(
        max_seen <= 2,
        "{max_seen} live agents with --max-concurrent 2"
    );
    assert_eq!(max_seen, 2, "the two slots were never used together");
    assert!(d.live_children().is_empty());
}

#[test]
fn one_run_per_session_in_arrival_order_while_other_chats_run() {
    let d = Daemon::with_test_agent(&["--max-concurrent", "3"]);
    let first = d.submit("alice", "sleep:600 result:first");
    let second = d.submit("alice", "result:second");
    let other = d.submit("bob", "result:bob");

    // Bob is not blocked by alice's long task.
    d.wait_state(&other, "succeeded");
    // Alice's second message waits for her first, although slots are free.
    let view = d.task(&second);
    assert_eq!(view["state"], json!("queued"), "{view}");
    assert_eq!(d.task(&first)["state"], json!("running"));
    let first_view = d.wait_state(&first, "succeeded");
    let second_view = d.wait_state(&second, "succeeded");
    assert!(second_view["started_at"].as_str() >= first_view["finished_at"].as_str());
}

#[test]
fn the_slot_frees_when_the_agent_is_reaped_not_when_it_reports() {
    // The agent reports its result, then stays alive for a while before exiting.
    let d = Daemon::with_test_agent(&["--max-concurrent", "1"]);
    let lingering = d.submit("alice", "linger:800 result:early");
    let next = d.submit("bob", "result:next");
    wait_for("the lingering agent reported its result", DEADLINE, || {
        (d.task(&lingering)["result"] == json!("early")).then_some(())
    });
    // Reported, but its process lives: bob must still be queued.
    assert_eq!(d.task(&next)["state"], json!("queued"));
    assert_eq!(d.task(&lingering)["state"], json!("running"));
    d.wait_state(&lingering, "succeeded");
    d.wait_state(&next, "succeeded");
}
