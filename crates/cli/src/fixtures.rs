//! Test fixtures shared by the unit tests of this crate.

use agentd_proto::control::{Priority, TaskState, TaskView};

/// A task view with the given identity and nothing else set.
pub(crate) fn task(id: &str, session: &str, state: TaskState, text: &str) -> TaskView {
    TaskView {
        task_id: id.into(),
        session: session.into(),
        state,
        position: None,
        pid: None,
        created_at: "2024-05-01T10:00:00Z".into(),
        started_at: None,
        finished_at: None,
        text: text.into(),
        progress: None,
        result: None,
        exit: None,
        merged_into: None,
        priority: Priority::Interactive,
        stopping: None,
    }
}
