//! Finished tasks and task id resolution.

use agentd_core::{Task, TaskId};
use agentd_proto::control::ErrorCode;

use crate::supervisor::{err, RequestError, Supervisor};

impl Supervisor {
    pub(crate) fn record_finished(&mut self, task: Task) {
        tracing::info!(task_id = %task.id, session = %task.session, state = ?task.state, "task finished");
        let id = task.id;
        if self.history.insert(id, task).is_none() {
            self.history_order.push_back(id);
        }
        while self.history_order.len() > self.config.history {
            if let Some(old) = self.history_order.pop_front() {
                self.history.remove(&old);
            }
        }
        for waiter in &mut self.waiters {
            waiter.remaining.remove(&id);
        }
    }

    /// A full task id, or a unique prefix (at least 4 characters) of a known one.
    pub(crate) fn resolve(&self, text: &str) -> Result<TaskId, RequestError> {
        let text = text.trim().trim_end_matches('…');
        if let Ok(id) = TaskId::parse_str(text) {
            return Ok(id);
        }
        if text.len() < 4 || !text.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return err(
                ErrorCode::NotFound,
                format!("no task {text} (task ids look like 0192f3c4-…)"),
            );
        }
        let prefix = text.to_ascii_lowercase();
        let mut matches: Vec<TaskId> = self
            .dispatcher
            .tasks()
            .map(|t| t.id)
            .chain(self.history_order.iter().copied())
            .filter(|id| id.to_string().starts_with(&prefix))
            .collect();
        matches.sort();
        matches.dedup();
        match matches.as_slice() {
            [one] => Ok(*one),
            [] => err(ErrorCode::NotFound, format!("no task {text}")),
            _ => err(
                ErrorCode::BadRequest,
                format!(
                    "task id prefix {text} is ambiguous ({} tasks)",
                    matches.len()
                ),
            ),
        }
    }
}
