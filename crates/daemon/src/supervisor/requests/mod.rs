//! Control requests, one module per request family.

pub(crate) mod ack;
pub(crate) mod log;
pub(crate) mod queue;
pub(crate) mod resume;
pub(crate) mod send;
pub(crate) mod status;
pub(crate) mod stop;
pub(crate) mod stored;
pub(crate) mod watch;

use std::time::Duration;

use agentd_core::{Mode, Priority, QueueChange, Scope, StopTarget};
use agentd_proto::control::{Answer, ErrorCode, RequestBody, SendReply};
use agentd_proto::text;

use crate::control::ControlRequest;
use crate::supervisor::{err, json, RequestError, Supervisor};
use crate::views;

impl Supervisor {
    pub(crate) fn on_request(&mut self, request: ControlRequest) {
        let ControlRequest {
            body,
            reply,
            events,
            handed: _,
        } = request;
        match body {
            RequestBody::Stop {
                task_id,
                session,
                all,
                wait,
            } => {
                let target = match (task_id, session, all) {
                    (Some(id), None, false) => self.resolve(&id).map(StopTarget::Task),
                    (None, Some(session), false) => Ok(StopTarget::SessionAll(session)),
                    (None, None, true) => Ok(StopTarget::Everything),
                    _ => err(ErrorCode::BadRequest, text::STOP_TARGETS),
                };
                match target {
                    Ok(target) => self.stop(target, Scope::Owner, false, wait, reply),
                    Err(e) => {
                        reply.send(Err(e));
                    }
                }
            }
            RequestBody::Send {
                session,
                text,
                message_id,
                priority,
                mode,
                timeout_ms,
            } => {
                if timeout_ms == Some(0) {
                    let message = agentd_proto::text::ZERO_TIMEOUT;
                    reply.send(err(ErrorCode::BadRequest, message));
                    return;
                }
                let work = Work {
                    timeout: timeout_ms.map(Duration::from_millis),
                    session,
                    text,
                    message_id,
                    priority: priority.map(views::priority).unwrap_or_default(),
                    mode: mode.map(views::mode),
                };
                if let Some((reply, answer)) = self.on_send(work, reply) {
                    reply.send(answer);
                }
            }
            RequestBody::Queue {
                session,
                mode,
                debounce_ms,
                cap,
                drop,
                reset,
            } => {
                let change = QueueChange {
                    mode: mode.map(views::mode),
                    debounce: debounce_ms.map(Duration::from_millis),
                    cap,
                    drop: drop.map(views::drop_policy),
                };
                let mut saves = Vec::new();
                let answer = self
                    .queue_settings(&session, reset, change, &mut saves)
                    .and_then(json);
                self.answer_when_saved(saves, reply, answer);
            }
            RequestBody::Watch { task_id, session } => {
                reply.send(self.watch(task_id, session, events));
            }
            RequestBody::Status { task_id: Some(id) } => self.status_of(&id, None, reply),
            RequestBody::Status { task_id: None } => {
                reply.send(self.status());
            }
            RequestBody::Tasks {
                session,
                all: true,
                limit,
                cursor,
            } => self.tasks_all(session, limit, cursor.as_deref(), reply),
            RequestBody::Tasks {
                session,
                all: false,
                limit,
                cursor,
            } => {
                let answer = self.tasks(session.as_deref(), false, limit, cursor.as_deref());
                reply.send(answer);
            }
            RequestBody::Log { task_id, offset } => {
                self.log(&task_id, offset, reply);
            }
            RequestBody::Resume { task_id } => {
                if let Some((reply, answer)) = self.resume(Some(&task_id), None, reply) {
                    reply.send(answer);
                }
            }
            RequestBody::Hello { .. } | RequestBody::Ping => {
                reply.send(err(ErrorCode::Internal, "answered by the connection"));
            }
        }
    }

    pub(crate) fn chat_reply(
        &self,
        command: &str,
        text: String,
        data: serde_json::Value,
    ) -> Answer {
        chat_answer(command, text, data)
    }
}

/// The answer to a chat command: its `reply` text and `data`.
pub(crate) fn chat_answer(command: &str, text: String, data: serde_json::Value) -> Answer {
    SendReply {
        reply: text,
        accepted: false,
        task: None,
        capacity: None,
        command: Some(command.to_string()),
        data: Some(data),
        ..SendReply::default()
    }
    .into()
}

/// A work message as a client sent it.
pub(crate) struct Work {
    pub(crate) session: String,
    pub(crate) text: String,
    pub(crate) message_id: Option<String>,
    pub(crate) priority: Priority,
    pub(crate) mode: Option<Mode>,
    /// The task's own run-time limit (`send.timeout_ms`).
    pub(crate) timeout: Option<Duration>,
}

/// A session name goes into the agent's environment (`AGENTD_SESSION`, where a NUL
/// cannot be) and into the lines agentctl prints (where a newline or an escape
/// breaks them).
pub(crate) fn check_session(session: &str) -> Result<(), RequestError> {
    if session.trim().is_empty() || session.len() > 256 || session.contains(char::is_control) {
        return err(ErrorCode::BadRequest, text::BAD_SESSION);
    }
    Ok(())
}

/// Longest `message_id`, in bytes: the de-duplication window holds 10,000 of them.
pub(crate) const MAX_MESSAGE_ID_BYTES: usize = 1024;

/// An empty `message_id` would make every later message of its session with one a
/// re-delivery of the first.
pub(crate) fn check_message_id(message_id: Option<&str>) -> Result<(), RequestError> {
    if message_id.is_some_and(|id| id.is_empty() || id.len() > MAX_MESSAGE_ID_BYTES) {
        return err(ErrorCode::BadRequest, text::BAD_MESSAGE_ID);
    }
    Ok(())
}
