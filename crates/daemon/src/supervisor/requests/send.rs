//! `send`: work messages and the chat commands typed as text.

use crate::control::Replier;
use agentd_core::{
    parse_chat_command, Accepted, ChatCommand, Message, Mode, Priority, QueueChange, QueueCommand,
    Refused, Scope, StopArg, StopTarget, TaskId, HELP_TEXT,
};
use agentd_proto::control::{Answer, ErrorBody, ErrorCode, EventKind, SendReply, TaskView};
use agentd_proto::text;

use agentd_store::Op;

use crate::control::Reply;
use crate::durable;
use crate::supervisor::requests::ack::{self, Ack, OnCommit};
use crate::supervisor::requests::resume::Resumed;
use crate::supervisor::requests::{check_message_id, check_session, Work};
use crate::supervisor::{err, json, Supervisor};
use crate::views::{self, now_millis};

impl Supervisor {
    /// A chat message: a control command or work. Returns the reply to send now, or
    /// `None` when the reply was handed to a stop waiter.
    pub(crate) fn on_send(&mut self, work: Work, reply: Replier) -> Option<(Replier, Reply)> {
        if let Err(e) =
            check_session(&work.session).and_then(|()| check_message_id(work.message_id.as_deref()))
        {
            return Some((reply, Err(e)));
        }
        let (text, mode) = match parse_chat_command(&work.text) {
            Some(ChatCommand::WorkWithMode { mode, text }) => (text, Some(mode)),
            Some(ChatCommand::Work { text }) => (text, work.mode),
            Some(command) => return self.chat_command(work.session, command, reply),
            None => (work.text, work.mode),
        };
        if text.trim().is_empty() {
            return Some((reply, err(ErrorCode::BadRequest, text::EMPTY_MESSAGE)));
        }
        if self.shutting_down.is_some() {
            return Some((
                reply,
                err(ErrorCode::ShuttingDown, text::SHUTTING_DOWN_REFUSED),
            ));
        }
        let message = Message {
            task_id: TaskId::now_v7(),
            session: work.session,
            text,
            message_id: work.message_id,
            priority: work.priority,
            mode,
        };
        // A re-delivery of a message whose task finished before a restart: the
        // dispatcher's window no longer knows it, the store does.
        if let Some(original) = self.stored_message(&message) {
            let answer = self.send_reply(Ok(Accepted::Duplicate { task_id: original }));
            return self.answer_duplicate(original, reply, answer);
        }
        self.accept_work(message, None, work.timeout, reply)
    }

    /// New work (a message, or a resumed attempt of an earlier task) into the
    /// dispatcher; answered once its record is committed. Returns the reply to send
    /// now, or `None` when it is sent after the commit. `timeout` is the task's own
    /// run-time limit (`send.timeout_ms`), instead of `--task-timeout`.
    pub(crate) fn accept_work(
        &mut self,
        message: Message,
        attempt: Option<Resumed>,
        timeout: Option<std::time::Duration>,
        reply: Replier,
    ) -> Option<(Replier, Reply)> {
        let now = now_millis();
        let task_id = message.task_id;
        let message_task = task_id;
        // Known before the actions run: the task may be spawned in this very step.
        if let Some(timeout) = timeout {
            self.task_timeouts.insert(task_id, timeout);
        }
        let mut record = durable::queued_record(&message, message.mode, now.0);
        record.timeout_ms = timeout.map(|t| t.as_millis().min(u64::MAX as u128) as u64);
        let message_key = message
            .message_id
            .clone()
            .map(|id| (message.session.clone(), id));
        if let Some(attempt) = &attempt {
            record.attempt_of = Some(attempt.previous);
            // The attempt starts from the checkpoint it inherits: resumed again
            // before it saves one of its own, it hands the same one on.
            record.checkpoint = attempt.checkpoint.clone();
        }
        let (outcome, actions) = self.dispatcher.accept(message, now);
        // A new task's record is submitted before its actions run, so every later
        // write about it (started, finished, merged) follows it into the store.
        let commit = if let Ok(Accepted::Task { .. }) = &outcome {
            let front = match self.dispatcher.task(&task_id) {
                Some(task) => {
                    record.mode = task.mode.as_str().to_string();
                    task.mode == Mode::Interrupt && task.state == agentd_core::TaskState::Queued
                }
                None => false,
            };
            let ack = Ack::new();
            let on_commit = OnCommit::new(&ack);
            if message_key.is_some() {
                // Committed ones (in order, mostly) make room first.
                while self
                    .inserts_pending
                    .front()
                    .is_some_and(|(_, ack)| ack.inserted())
                {
                    self.inserts_pending.pop_front();
                }
                self.inserts_pending.push_back((task_id, ack.clone()));
            }
            self.store.submit_with(
                Op::Insert {
                    task: Box::new(record),
                    front,
                },
                move |result| on_commit.done(result),
            );
            Some(ack)
        } else {
            None
        };
        let resumed_line = attempt
            .as_ref()
            .map(|a| text::resumed_line(a.previous, a.checkpoint.is_some()));
        if let Ok(Accepted::Task { task_id, .. }) = &outcome {
            if let Some(attempt) = attempt {
                // Handed to its agent (v2) right before Start.
                self.resumes.insert(*task_id, attempt);
            }
            if *task_id != message_task {
                // Merged into another task (or a duplicate): not a task of its own.
                self.task_timeouts.remove(&message_task);
            }
            self.publish_task(EventKind::Accepted, task_id, None, None);
        } else {
            self.task_timeouts.remove(&message_task);
        }
        self.execute(actions);
        self.mark_kept_steer(&outcome);
        let duplicate_of = match &outcome {
            Ok(Accepted::Duplicate { task_id }) => Some(*task_id),
            _ => None,
        };
        let mut answer = self.send_reply(outcome);
        if let Some(original) = duplicate_of {
            return self.answer_duplicate(original, reply, answer);
        }
        if let (Some(line), Ok(Answer::Send(send))) = (resumed_line, &mut answer) {
            send.reply = format!("{line}\n{}", send.reply);
        }
        let Some(ack) = commit else {
            return Some((reply, answer));
        };
        // Acknowledged only once committed; the loop does not wait for it.
        ack.answered(ack::Answer {
            reply,
            answer,
            task_id,
            message: message_key,
            events: self.store_events.clone(),
            relay: self.relay.clone(),
        });
        None
    }

    /// The answer to a duplicate of `original`'s message: now if `original`'s insert
    /// has committed, else (`None`) with its outcome once it does, so that it is
    /// never acknowledged before `original` is, nor when `original` is refused.
    fn answer_duplicate(
        &self,
        original: TaskId,
        reply: Replier,
        answer: Reply,
    ) -> Option<(Replier, Reply)> {
        // Newest first: a duplicate mostly follows its original closely.
        let Some((_, ack)) = self
            .inserts_pending
            .iter()
            .rev()
            .find(|(task_id, _)| *task_id == original)
        else {
            return Some((reply, answer));
        };
        ack.duplicate(ack::Duplicate {
            reply,
            answer,
            relay: self.relay.clone(),
        });
        None
    }

    /// The finished task the store holds for this message's (session, message_id),
    /// when the dispatcher does not know the message (one indexed lookup).
    fn stored_message(&self, message: &Message) -> Option<TaskId> {
        let message_id = message.message_id.as_deref()?;
        if self.dedup_complete
            && !self
                .dispatcher
                .may_have_left_window(&message.session, message_id)
        {
            // The window was seeded with every message id the store held, and this
            // one has not left it since: the store holds no task for it (no read).
            return None;
        }
        let original = self
            .store_reader
            .as_ref()?
            .find_message(&message.session, message_id)
            .ok()??;
        // Live tasks are the dispatcher's to answer.
        (self.dispatcher.task(&original).is_none() && self.history.get(&original).is_some())
            .then_some(original)
    }

    /// A `steer-backlog` message was steered *and* kept as a follow-up task: its
    /// steer (the one just sent to the agent) must not be queued again if refused.
    fn mark_kept_steer(&mut self, outcome: &Result<Accepted, Refused>) {
        let Ok(Accepted::Task {
            task_id,
            steered_into: Some(into),
            ..
        }) = outcome
        else {
            return;
        };
        let kept = self
            .view(task_id)
            .is_some_and(|v| v.state != agentd_proto::control::TaskState::Merged);
        if let (true, Some(agent)) = (kept, self.agents.get_mut(into)) {
            if let Some(steered) = agent.steers.back_mut() {
                steered.kept = true;
            }
        }
    }

    /// The answer to accepted (or refused) work.
    pub(crate) fn send_reply(&self, outcome: Result<Accepted, Refused>) -> Reply {
        let capacity = views::capacity(self.dispatcher.capacity());
        match outcome {
            Err(Refused::QueueFull { limit }) => err(ErrorCode::QueueFull, text::queue_full(limit)),
            Err(Refused::SessionFull { cap }) => err(ErrorCode::QueueFull, text::session_full(cap)),
            Ok(Accepted::Duplicate { task_id }) => {
                // The window may outlive the task (the retention pruned it).
                let view = self.view(&task_id);
                json(SendReply {
                    reply: match &view {
                        Some(view) => text::duplicate_line(view),
                        None => text::duplicate_gone_line(task_id),
                    },
                    accepted: true,
                    task: view,
                    capacity: Some(capacity),
                    command: None,
                    data: None,
                    duplicate: true,
                    dropped: Vec::new(),
                    notice: None,
                    steered_into: None,
                })
            }
            Ok(Accepted::Task {
                task_id,
                steered_into,
                dropped,
                notice,
            }) => {
                // Dropped tasks have ended: their views come from the history.
                let dropped: Vec<TaskView> =
                    dropped.iter().filter_map(|id| self.view(id)).collect();
                let view = self
                    .view(&task_id)
                    .ok_or_else(|| ErrorBody::new(ErrorCode::Internal, "the task vanished"))?;
                let steered_into = steered_into.map(|into| into.to_string());
                let mut reply = text::send_line(&view, Some(capacity), steered_into.as_deref());
                for d in &dropped {
                    reply.push('\n');
                    reply.push_str(&text::dropped_line(
                        &d.task_id,
                        agentd_core::preview(&d.text),
                    ));
                }
                if let Some(notice) = &notice {
                    reply.push('\n');
                    reply.push_str(&text::note_line(notice));
                }
                json(SendReply {
                    reply,
                    accepted: true,
                    task: Some(view),
                    capacity: Some(capacity),
                    command: None,
                    data: None,
                    duplicate: false,
                    dropped,
                    notice,
                    steered_into,
                })
            }
        }
    }

    /// A control command typed as chat text. Returns the reply to send now, or `None`
    /// when the reply was handed to a stop waiter.
    pub(crate) fn chat_command(
        &mut self,
        session: String,
        command: ChatCommand,
        reply: Replier,
    ) -> Option<(Replier, Reply)> {
        let answer = match command {
            ChatCommand::Help => {
                Ok(self.chat_reply("help", HELP_TEXT.to_string(), serde_json::Value::Null))
            }
            ChatCommand::Status { task: Some(task) } => {
                self.status_of(&task, Some(session), reply);
                return None;
            }
            ChatCommand::Status { task: None } => self.chat_status(&session),
            ChatCommand::Resume { task } => {
                return self.resume(task.as_deref(), Some(&session), reply);
            }
            ChatCommand::Tasks => {
                let list = self.list(Some(&session), false);
                let text = text::chat_tasks(&list);
                Ok(self.chat_reply(
                    "tasks",
                    text,
                    serde_json::to_value(&list).unwrap_or_default(),
                ))
            }
            ChatCommand::Queue(queue) => {
                let mut saves = Vec::new();
                let result = match queue {
                    QueueCommand::Show => {
                        self.queue_settings(&session, false, QueueChange::default(), &mut saves)
                    }
                    QueueCommand::Reset => {
                        self.queue_settings(&session, true, QueueChange::default(), &mut saves)
                    }
                    QueueCommand::Set(change) => {
                        self.queue_settings(&session, false, change, &mut saves)
                    }
                };
                let answer = result.map(|view| {
                    let text = text::settings_line(&view);
                    self.chat_reply(
                        "queue",
                        text,
                        serde_json::to_value(&view).unwrap_or_default(),
                    )
                });
                self.answer_when_saved(saves, reply, answer);
                return None;
            }
            ChatCommand::Invalid { reply: text } => err(ErrorCode::BadRequest, text),
            ChatCommand::Unknown { command } => {
                err(ErrorCode::BadRequest, text::unknown_command(&command))
            }
            ChatCommand::WorkWithMode { .. } | ChatCommand::Work { .. } => {
                err(ErrorCode::Internal, "work is not a command")
            }
            ChatCommand::Stop(arg) => {
                let target = match arg {
                    StopArg::Current => Ok(StopTarget::SessionCurrent(session.clone())),
                    StopArg::All => Ok(StopTarget::SessionAll(session.clone())),
                    StopArg::Task(id) => self.resolve(&id).map(StopTarget::Task),
                };
                match target {
                    Ok(target) => {
                        // A chat is answered at once; the end comes as the task's
                        // `finished` event.
                        self.stop(target, Scope::Chat(session), true, false, reply);
                        return None;
                    }
                    Err(e) => Err(e),
                }
            }
        };
        Some((reply, answer))
    }

    /// The agent refused a steered message: it becomes a follow-up, and watchers are told.
    pub(crate) fn steer_refused(&mut self, running: TaskId, text: String) {
        let Some(session) = self.dispatcher.task(&running).map(|t| t.session.clone()) else {
            tracing::warn!(%running, "a steered message was refused after its task ended: {}", crate::logfmt::Quoted(&text));
            return;
        };
        if self.shutting_down.is_some() {
            // Like every queued message, it would be cancelled: it must not start work.
            tracing::warn!(%running, "shutting down: the refused steered message is not queued as a follow-up: {}", crate::logfmt::Quoted(&text));
            return;
        }
        let message = Message {
            task_id: TaskId::now_v7(),
            session,
            text,
            message_id: None,
            priority: Priority::Interactive,
            mode: Some(Mode::Followup),
        };
        let task_id = message.task_id;
        let now = now_millis();
        // It was acknowledged as steered already: as a follow-up it must be durable
        // too, so its record is submitted before the dispatcher's actions (like any
        // new task), then it is queued past any cap or limit, never lost.
        let record = durable::queued_record(&message, Some(Mode::Followup), now.0);
        self.store.submit_detached(Op::Insert {
            task: Box::new(record),
            front: false,
        });
        let actions = self.dispatcher.requeue(message, now);
        let note = text::steer_refused_note(running);
        self.publish_task(EventKind::Accepted, &task_id, Some(note), None);
        self.execute(actions);
    }
}

/// The answer to a message that the dispatcher took for new but the store already
/// held (its original finished before a restart): the original task id, not run again.
pub(crate) fn duplicate_of_stored(answer: Reply, original: TaskId) -> Reply {
    let Ok(agentd_proto::control::Answer::Send(mut send)) = answer else {
        return answer;
    };
    if let Some(view) = send.task.as_mut() {
        view.task_id = original.to_string();
        send.reply = text::duplicate_line(view);
    }
    send.duplicate = true;
    send.dropped.clear();
    send.notice = None;
    Ok(agentd_proto::control::Answer::Send(send))
}
