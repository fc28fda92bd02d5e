//! `stop` and the waiters that answer it once the tasks ended.

use std::collections::HashSet;

use agentd_core::{Scope, StopError, StopTarget, TaskId};
use agentd_proto::control::{ErrorCode, SendReply, StopReply, TaskView};
use agentd_proto::text;
use tokio::sync::oneshot;

use crate::control::Reply;
use crate::supervisor::{err, json, Supervisor};
use crate::views::now_millis;

/// A `stop` request waiting for its tasks to end.
pub(crate) struct StopWaiter {
    pub(crate) tasks: Vec<TaskId>,
    pub(crate) remaining: HashSet<TaskId>,
    /// `Some(session)` when the stop came as a chat `/stop`: answer as a chat reply.
    pub(crate) chat: bool,
    pub(crate) reply: oneshot::Sender<Reply>,
}

impl Supervisor {
    pub(crate) fn stop(
        &mut self,
        target: StopTarget,
        scope: Scope,
        chat: bool,
        reply: oneshot::Sender<Reply>,
    ) {
        // A task that already ended is reported as it ended.
        if let StopTarget::Task(task_id) = &target {
            if let Some(done) = self.history.get(task_id) {
                if let Scope::Chat(session) = &scope {
                    if &done.session != session {
                        let _ = reply.send(err(
                            ErrorCode::Forbidden,
                            text::task_not_in_this_chat(task_id),
                        ));
                        return;
                    }
                }
                let id = *task_id;
                self.waiters.push(StopWaiter {
                    tasks: vec![id],
                    remaining: HashSet::new(),
                    chat,
                    reply,
                });
                self.answer_waiters();
                return;
            }
        }
        match self.dispatcher.stop(target, &scope, now_millis()) {
            Ok((tasks, actions)) => {
                let remaining = tasks.iter().copied().collect();
                self.waiters.push(StopWaiter {
                    tasks,
                    remaining,
                    chat,
                    reply,
                });
                self.execute(actions);
            }
            Err(StopError::NotFound(id)) => {
                let _ = reply.send(err(ErrorCode::NotFound, text::no_task(id)));
            }
            Err(StopError::Forbidden { task_id, .. }) => {
                let _ = reply.send(err(
                    ErrorCode::Forbidden,
                    text::task_not_in_this_chat(task_id),
                ));
            }
            Err(StopError::OtherSession { session }) => {
                let _ = reply.send(err(
                    ErrorCode::Forbidden,
                    text::session_not_this_chat(&session),
                ));
            }
        }
    }

    pub(crate) fn answer_waiters(&mut self) {
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| w.remaining.is_empty());
        self.waiters = waiting;
        for waiter in done {
            let stopped: Vec<TaskView> =
                waiter.tasks.iter().filter_map(|id| self.view(id)).collect();
            let reply = StopReply { stopped };
            let answer = if waiter.chat {
                json(SendReply {
                    reply: text::stop_lines(&reply),
                    accepted: false,
                    task: None,
                    capacity: None,
                    command: Some("stop".into()),
                    data: serde_json::to_value(&reply).ok(),
                    ..SendReply::default()
                })
            } else {
                json(reply)
            };
            let _ = waiter.reply.send(answer);
        }
    }
}
