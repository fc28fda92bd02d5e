//! Finished tasks ([`History`]) and task id resolution.
//!
//! A finished task leaves the dispatcher in the step it ends and lives on only here.
//! [`MemoryHistory`] keeps the newest `--history` tasks in memory; a durable store
//! implements the same trait.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};

use agentd_core::{Task, TaskId};
use agentd_proto::control::ErrorCode;
use agentd_proto::text;

use crate::supervisor::{err, RequestError, Supervisor};

/// Where finished tasks are kept. Object-safe: the supervisor holds a
/// `Box<dyn History>`.
pub trait History {
    /// Records a finished task; a task recorded again replaces its earlier entry.
    fn record(&mut self, task: Task);
    /// A finished task by id.
    fn get(&self, id: &TaskId) -> Option<Cow<'_, Task>>;
    /// Finished tasks (only `session`'s, if given), oldest first.
    fn iter<'a>(&'a self, session: Option<&'a str>)
        -> Box<dyn Iterator<Item = Cow<'a, Task>> + 'a>;
    /// Ids of finished tasks whose hyphenated lowercase form starts with `prefix`.
    fn ids_with_prefix(&self, prefix: &str) -> Vec<TaskId>;
    /// Like [`History::get`], from memory only (never a disk read).
    fn cached(&self, id: &TaskId) -> Option<Cow<'_, Task>> {
        self.get(id)
    }
    /// Like [`History::ids_with_prefix`], from memory only.
    fn cached_ids_with_prefix(&self, prefix: &str) -> Vec<TaskId> {
        self.ids_with_prefix(prefix)
    }
}

/// The newest `capacity` finished tasks, in memory.
#[derive(Debug, Default)]
pub struct MemoryHistory {
    capacity: usize,
    tasks: HashMap<TaskId, Task>,
    /// Oldest first.
    order: VecDeque<TaskId>,
}

impl MemoryHistory {
    pub fn new(capacity: usize) -> MemoryHistory {
        MemoryHistory {
            capacity,
            ..MemoryHistory::default()
        }
    }
}

impl History for MemoryHistory {
    fn record(&mut self, task: Task) {
        let id = task.id;
        if self.tasks.insert(id, task).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.tasks.remove(&old);
            }
        }
    }

    fn get(&self, id: &TaskId) -> Option<Cow<'_, Task>> {
        self.tasks.get(id).map(Cow::Borrowed)
    }

    fn iter<'a>(
        &'a self,
        session: Option<&'a str>,
    ) -> Box<dyn Iterator<Item = Cow<'a, Task>> + 'a> {
        Box::new(
            self.order
                .iter()
                .filter_map(|id| self.tasks.get(id))
                .filter(move |t| session.is_none_or(|s| t.session == s))
                .map(Cow::Borrowed),
        )
    }

    fn ids_with_prefix(&self, prefix: &str) -> Vec<TaskId> {
        self.order
            .iter()
            .filter(|id| id.to_string().starts_with(prefix))
            .copied()
            .collect()
    }
}

impl Supervisor {
    pub(crate) fn record_finished(&mut self, task: Task) {
        crate::logfmt::task_finished(&task);
        let id = task.id;
        self.task_timeouts.remove(&id);
        if let Some(mut op) = crate::durable::finish_op(&task) {
            // A running task stopped for a shutdown is interrupted, not cancelled: it
            // may be resumed after the next start.
            if let agentd_store::Op::Finish { state, reason, .. } = &mut op {
                if self.shutting_down.is_some()
                    && task.started_at.is_some()
                    && matches!(
                        *state,
                        agentd_store::State::Cancelled | agentd_store::State::Interrupted
                    )
                {
                    *state = agentd_store::State::Interrupted;
                    *reason = Some(agentd_proto::text::INTERRUPTED_BY_SHUTDOWN.to_string());
                }
            }
            // Retried by the store until it is written; listings take the task from
            // memory until then.
            crate::supervisor::lock(&self.finishing).insert(id);
            let finishing = std::sync::Arc::clone(&self.finishing);
            self.store.submit_with(op, move |_| {
                crate::supervisor::lock(&finishing).remove(&id);
            });
        }
        // A resumed attempt that ended before its agent started.
        self.resumes.remove(&id);
        self.history.record(task);
        for waiter in &mut self.waiters {
            waiter.remaining.remove(&id);
        }
    }

    /// A full task id, or a unique prefix (at least 4 characters) of a known one.
    pub(crate) fn resolve(&self, text: &str) -> Result<TaskId, RequestError> {
        match self.lookup_in_memory(text)? {
            Lookup::Id(id) => Ok(id),
            Lookup::Prefix {
                prefix,
                text,
                mut matches,
            } => {
                matches.extend(self.history.ids_with_prefix(&prefix));
                pick(&text, matches)
            }
        }
    }

    /// What memory says about a task id or prefix, without reading the disk: a whole
    /// id, or a prefix with the live and in-memory finished tasks it matches (the
    /// store may hold more).
    pub(crate) fn lookup_in_memory(&self, text: &str) -> Result<Lookup, RequestError> {
        let text = text.trim().trim_end_matches('…');
        if let Ok(id) = TaskId::parse_str(text) {
            return Ok(Lookup::Id(id));
        }
        if text.len() < 4 || !text.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return err(ErrorCode::NotFound, text::not_a_task_id(text));
        }
        let prefix = text.to_ascii_lowercase();
        let matches: Vec<TaskId> = self
            .dispatcher
            .tasks()
            .map(|t| t.id)
            .filter(|id| id.to_string().starts_with(&prefix))
            .chain(self.history.cached_ids_with_prefix(&prefix))
            .collect();
        Ok(Lookup::Prefix {
            prefix,
            text: text.to_string(),
            matches,
        })
    }
}

/// A task id as a request gave it.
pub(crate) enum Lookup {
    Id(TaskId),
    /// A prefix (`prefix` lowercase, `text` as given) and the tasks it matches so far.
    Prefix {
        prefix: String,
        text: String,
        matches: Vec<TaskId>,
    },
}

/// The one task a prefix (`text`) names among `matches`, or why there is none.
pub(crate) fn pick(text: &str, mut matches: Vec<TaskId>) -> Result<TaskId, RequestError> {
    matches.sort();
    matches.dedup();
    match matches.as_slice() {
        [one] => Ok(*one),
        [] => err(ErrorCode::NotFound, text::no_task(text)),
        _ => err(
            ErrorCode::BadRequest,
            text::ambiguous_prefix(text, matches.len()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentd_core::{Ending, Millis, Mode, Priority, TaskState};

    fn task(session: &str) -> Task {
        Task {
            id: TaskId::now_v7(),
            session: session.into(),
            text: "x".into(),
            state: TaskState::Done {
                ending: Ending::Dropped,
                exit: None,
            },
            created_at: Millis(0),
            started_at: None,
            finished_at: Some(Millis(1)),
            progress: None,
            report: None,
            priority: Priority::Interactive,
            mode: Mode::Followup,
            message_id: None,
        }
    }

    #[test]
    fn memory_history_keeps_the_newest_in_order() {
        let mut history = MemoryHistory::new(2);
        let tasks: Vec<Task> = ["a", "b", "a"].into_iter().map(task).collect();
        for t in &tasks {
            history.record(t.clone());
        }
        assert!(history.get(&tasks[0].id).is_none(), "the oldest is evicted");
        let ids: Vec<TaskId> = history.iter(None).map(|t| t.id).collect();
        assert_eq!(ids, vec![tasks[1].id, tasks[2].id]);
        let in_a: Vec<TaskId> = history.iter(Some("a")).map(|t| t.id).collect();
        assert_eq!(in_a, vec![tasks[2].id]);
        let prefix = &tasks[2].id.to_string()[..36];
        assert_eq!(history.ids_with_prefix(prefix), vec![tasks[2].id]);
        // Recording again replaces, and does not count twice.
        history.record(tasks[2].clone());
        assert_eq!(history.iter(None).count(), 2);
    }
}
