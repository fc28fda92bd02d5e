//! The stdlib-only Python example agent (`examples/python/example_agent.py`) under
//! a real agentd: it reports progress, takes a steer, saves checkpoints, and ends
//! `cancelled` on `/stop`. Skipped, with a message, when `python3` is not on PATH.

use serde_json::json;

use crate::support::*;

fn python_agent() -> Option<String> {
    let found = std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIPPED: python3 is not on PATH");
        return None;
    }
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/example_agent.py");
    Some(format!("python3 {} {{text}}", example.display()))
}

#[test]
fn the_python_example_agent_reports_takes_a_steer_checkpoints_and_stops_cancelled() {
    let Some(agent) = python_agent() else { return };
    let d = Daemon::start(&["--agent", &agent, "--queue-mode", "steer"]);
    let task = d.submit("alice", "steps:100000 delay:300ms count sheep");
    // Progress: after each step "step K/100000: count sheep", a checkpoint (which
    // reaches agentd with protocol 2 and is no protocol error), then this line.
    d.wait_progress(&task, "checkpoint saved: step");

    let reply = d.send("alice", "also count goats");
    assert!(
        reply["reply"]
            .as_str()
            .unwrap()
            .contains("steered into running task"),
        "{reply}"
    );
    d.wait_progress(&task, "steered: also count goats");

    let reply = d.send("alice", "/stop");
    assert!(
        reply["reply"]
            .as_str()
            .unwrap()
            .contains("stopping: cancel sent"),
        "{reply}"
    );
    let view = d.wait_state(&task, "cancelled");
    assert_eq!(
        view["exit"]["ended_by"],
        json!("cooperative_cancel"),
        "{view}"
    );
    assert!(
        view["result"]
            .as_str()
            .unwrap()
            .starts_with("cancelled after step "),
        "{view}"
    );
    wait_for("the agent is gone", DEADLINE, || {
        d.descendants().is_empty().then_some(())
    });
}
