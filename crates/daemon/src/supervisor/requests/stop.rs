//! `stop` and the waiters that answer it once the tasks ended.

use std::collections::HashSet;
use std::time::Instant;

use crate::control::Replier;
use agentd_core::{Scope, StopError, StopTarget, TaskId, TaskState};
use agentd_proto::control::{ErrorCode, SendReply, StopReply, StoppingView, TaskView};
use agentd_proto::text;

use crate::control::Reply;
use crate::supervisor::executor::Timer;
use crate::supervisor::{err, json, Supervisor};
use crate::views::{self, now_millis};

/// A `stop` request waiting for its tasks to end.
pub(crate) struct StopWaiter {
    pub(crate) tasks: Vec<TaskId>,
    pub(crate) remaining: HashSet<TaskId>,
    /// `Some(session)` when the stop came as a chat `/stop`: answer as a chat reply.
    pub(crate) chat: bool,
    pub(crate) reply: Replier,
}

impl Supervisor {
    /// Starts a stop. With `wait` it is answered once its tasks have ended (a
    /// waiter), else at once, with the tasks as they stand.
    pub(crate) fn stop(
        &mut self,
        target: StopTarget,
        scope: Scope,
        chat: bool,
        wait: bool,
        reply: Replier,
    ) {
        // A task that already ended is reported as it ended.
        if let StopTarget::Task(task_id) = &target {
            if let Some(done) = self.history.get(task_id) {
                if let Scope::Chat(session) = &scope {
                    if &done.session != session {
                        reply.send(err(
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
            Ok((tasks, actions)) if !wait => {
                self.execute(actions);
                reply.send(self.stop_answer(&tasks, chat));
            }
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
                reply.send(err(ErrorCode::NotFound, text::no_task(id)));
            }
            Err(StopError::Forbidden { task_id, .. }) => {
                reply.send(err(
                    ErrorCode::Forbidden,
                    text::task_not_in_this_chat(task_id),
                ));
            }
            Err(StopError::OtherSession { session }) => {
                reply.send(err(
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
            let answer = self.stop_answer(&waiter.tasks, waiter.chat);
            waiter.reply.send(answer);
        }
    }

    /// The answer to a stop: its tasks as they stand (ended, or still stopping and
    /// how far), as a chat reply for a chat's `/stop`.
    fn stop_answer(&self, tasks: &[TaskId], chat: bool) -> Reply {
        let stopped: Vec<TaskView> = tasks.iter().filter_map(|id| self.view(id)).collect();
        let stopping = tasks.iter().filter_map(|id| self.stopping(id)).collect();
        let reply = StopReply { stopped, stopping };
        if chat {
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
        }
    }

    /// How far a stopping task is: its step and since when, and the next one by its
    /// armed timer.
    pub(crate) fn stopping(&self, task_id: &TaskId) -> Option<StoppingView> {
        let task = self.dispatcher.task(task_id)?;
        let TaskState::Stopping { step, .. } = &task.state else {
            return None;
        };
        let next = self
            .timers
            .iter()
            .filter_map(|((at, _), timer)| match timer {
                Timer::Stop {
                    task_id: t,
                    step: s,
                } if t == task_id && s > step => Some((*at, *s)),
                _ => None,
            })
            .min();
        let now = Instant::now();
        Some(StoppingView {
            next: next.map(|(_, s)| views::stop_step(s)),
            next_in_ms: next.map(|(at, _)| at.saturating_duration_since(now).as_millis() as u64),
            ..views::stopping_view(task)?
        })
    }
}
