//! Things that cross each other in time: a timer armed by one step firing during a
//! later one, an agent's death racing its reaping, an event and the state it reports.

use serde_json::json;

use crate::support::*;

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
    assert_eq!(progress.len(), 5, "{events:?}");
    for event in progress {
        assert_eq!(event["task_id"], json!(task));
        assert_eq!(event["task"]["progress"], event["text"], "{event}");
    }
}
