//! `resume` and the chat's `/resume`: an interrupted, cancelled or failed task runs
//! again in its session, as a new attempt linked to it, and its agent gets the last
//! checkpoint the task saved.

use crate::control::Replier;
use agentd_core::{Message, Mode, TaskId};
use agentd_proto::control::{ErrorBody, ErrorCode, TaskState};
use agentd_proto::text;

use crate::control::Reply;
use crate::supervisor::{err, Supervisor};
use crate::views;

/// What a resumed attempt's agent is told before its Start.
#[derive(Debug, Clone)]
pub(crate) struct Resumed {
    /// The task this attempt resumes.
    pub(crate) previous: TaskId,
    /// The last checkpoint that task saved (or inherited).
    pub(crate) checkpoint: Option<String>,
}

/// The states a task can be resumed from.
fn resumable(state: TaskState) -> bool {
    matches!(
        state,
        TaskState::Interrupted | TaskState::Cancelled | TaskState::Failed
    )
}

impl Supervisor {
    /// Resumes `task` (an id or prefix). From a chat (`chat` is its session) only the
    /// chat's own tasks, and without a task its latest resumable one.
    pub(crate) fn resume(
        &mut self,
        task: Option<&str>,
        chat: Option<&str>,
        reply: Replier,
    ) -> Option<(Replier, Reply)> {
        match self.resume_message(task, chat) {
            Ok((message, attempt)) => self.accept_work(message, Some(attempt), None, reply),
            Err(e) => Some((reply, Err(e))),
        }
    }

    fn resume_message(
        &self,
        task: Option<&str>,
        chat: Option<&str>,
    ) -> Result<(Message, Resumed), ErrorBody> {
        if self.shutting_down.is_some() {
            return err(ErrorCode::ShuttingDown, text::SHUTTING_DOWN_REFUSED);
        }
        let previous = match (task, chat) {
            (Some(id), _) => self.resolve(id)?,
            (None, Some(session)) => self
                .latest_resumable(session)
                .ok_or_else(|| ErrorBody::new(ErrorCode::NotFound, text::NOTHING_TO_RESUME))?,
            (None, None) => return err(ErrorCode::BadRequest, text::NOTHING_TO_RESUME),
        };
        if let Some(live) = self.dispatcher.task(&previous) {
            let view = views::task_view(live, None);
            if chat.is_some_and(|s| s != live.session) {
                return err(ErrorCode::Forbidden, text::task_not_in_this_chat(previous));
            }
            return err(
                ErrorCode::BadRequest,
                text::resume_live(previous, view.state.as_str()),
            );
        }
        let old = self
            .history
            .get(&previous)
            .ok_or_else(|| ErrorBody::new(ErrorCode::NotFound, text::no_task(previous)))?;
        if chat.is_some_and(|s| s != old.session) {
            return err(ErrorCode::Forbidden, text::task_not_in_this_chat(previous));
        }
        let state = views::task_view(&old, None).state;
        if !resumable(state) {
            return err(
                ErrorCode::BadRequest,
                text::resume_not_resumable(previous, state.as_str()),
            );
        }
        if let Some(attempt) = self.live_attempt_of(previous) {
            return err(
                ErrorCode::BadRequest,
                text::resume_in_progress(previous, attempt),
            );
        }
        let message = Message {
            task_id: TaskId::now_v7(),
            session: old.session.clone(),
            text: old.text.clone(),
            message_id: None,
            priority: old.priority,
            // Its own task, never merged with held messages nor steered into a run.
            mode: Some(Mode::Followup),
        };
        let attempt = Resumed {
            previous,
            checkpoint: self.checkpoint_of(previous),
        };
        Ok((message, attempt))
    }

    /// The newest task of `session` in the history that can be resumed.
    fn latest_resumable(&self, session: &str) -> Option<TaskId> {
        self.history
            .iter(Some(session))
            .filter(|t| resumable(views::task_view(t, None).state))
            .max_by_key(|t| (t.finished_at, t.id))
            .map(|t| t.id)
    }

    /// A queued or running attempt of `previous`, if there is one.
    fn live_attempt_of(&self, previous: TaskId) -> Option<TaskId> {
        let queued = self
            .resumes
            .iter()
            .find(|(_, r)| r.previous == previous)
            .map(|(id, _)| *id);
        queued.or_else(|| {
            self.agents
                .iter()
                .find(|(_, a)| a.resumed_from == Some(previous))
                .map(|(id, _)| *id)
        })
    }

    /// The latest checkpoint of a task: one whose write is still in flight, else
    /// the store's.
    fn checkpoint_of(&self, task_id: TaskId) -> Option<String> {
        if let Some((_, data)) = self.checkpoints_in_flight.get(&task_id) {
            return Some(data.clone());
        }
        let reader = self.store_reader.as_ref()?;
        match reader.task(task_id) {
            Ok(record) => record?.checkpoint,
            Err(e) => {
                tracing::warn!(%task_id, "cannot read the task's checkpoint: {e}");
                None
            }
        }
    }
}
