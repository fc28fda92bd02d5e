//! What live agents say: the handling of every message and channel event from an agent.

use std::time::Instant;

use agentd_core::{AgentReport, Event, ExitStatus, ReportOutcome, TaskId};
use agentd_proto::control::EventKind;
use agentd_proto::ipc::{
    AgentMsg, Outcome, SupervisorMsg, IPC_PROTOCOL_VERSION, MAX_CHECKPOINT_BYTES,
    MIN_IPC_PROTOCOL_VERSION,
};

use crate::agent_io::{AgentEvent, AgentInput};
use crate::supervisor::agents::Steered;
use crate::supervisor::{StoreEvent, Supervisor};

impl Supervisor {
    pub(crate) fn on_agent_event(&mut self, event: AgentEvent) {
        let AgentEvent { task_id, input } = event;
        let heartbeat = self.config.agents.heartbeat;
        let Some(agent) = self.agents.get_mut(&task_id) else {
            return;
        };
        if matches!(input, AgentInput::Msg(_)) && agent.last_heard.is_some() {
            agent.last_heard = Some(Instant::now());
        }
        let event = match input {
            AgentInput::Msg(AgentMsg::Hello(hello)) if agent.is_handshaking() => {
                if !(MIN_IPC_PROTOCOL_VERSION..=IPC_PROTOCOL_VERSION).contains(&hello.protocol) {
                    let reason = format!(
                        "agentd speaks agent protocol {MIN_IPC_PROTOCOL_VERSION} to {IPC_PROTOCOL_VERSION}, the agent {}",
                        hello.protocol
                    );
                    let _ = agent.to_agent.send(SupervisorMsg::Reject {
                        reason: reason.clone(),
                    });
                    Event::ProtocolError {
                        task_id,
                        error: reason,
                    }
                } else {
                    agent.welcome(hello.protocol, heartbeat);
                    tracing::debug!(%task_id, agent = %crate::logfmt::Word(&hello.agent), steer = hello.capabilities.steer, "agent ready");
                    Event::AgentReady {
                        task_id,
                        steer: hello.capabilities.steer,
                    }
                }
            }
            AgentInput::Msg(msg) if agent.is_handshaking() => Event::ProtocolError {
                task_id,
                error: format!("expected Hello first, got {}", msg_name(&msg)),
            },
            AgentInput::Msg(AgentMsg::Hello(_)) => Event::ProtocolError {
                task_id,
                error: "a second Hello".into(),
            },
            AgentInput::Msg(AgentMsg::Progress { text }) => Event::Progress {
                task_id,
                text: clip(text, 4096),
            },
            AgentInput::Msg(AgentMsg::Result(result)) => Event::Report {
                task_id,
                report: AgentReport {
                    outcome: match result.outcome {
                        Outcome::Succeeded => ReportOutcome::Succeeded,
                        Outcome::Failed => ReportOutcome::Failed,
                        Outcome::Cancelled => ReportOutcome::Cancelled,
                    },
                    text: clip(result.text, 64 * 1024),
                    command_exit: result.command_exit.map(|e| ExitStatus {
                        code: e.code,
                        signal: e.signal,
                    }),
                },
            },
            AgentInput::Msg(AgentMsg::Heartbeat) => return,
            // What a v2 agent wants; it decides how later held messages are drained.
            AgentInput::Msg(AgentMsg::Features(features)) => {
                self.dispatcher
                    .set_collected_prompts(features.collected_prompts);
                return;
            }
            AgentInput::Msg(AgentMsg::Checkpoint { data }) if data.len() > MAX_CHECKPOINT_BYTES => {
                Event::ProtocolError {
                    task_id,
                    error: agentd_proto::text::checkpoint_too_large(
                        data.len(),
                        MAX_CHECKPOINT_BYTES,
                    ),
                }
            }
            // The latest replaces the one before, in the store, through the writer.
            AgentInput::Msg(AgentMsg::Checkpoint { data }) => {
                self.save_checkpoint(task_id, data);
                return;
            }
            AgentInput::Msg(AgentMsg::SteerAck { accepted }) => {
                let steered = agent.steers.pop_front();
                let full = agent.steer_backlog_full();
                self.dispatcher.set_steer_backlog_full(task_id, full);
                match steered {
                    Some(Steered { text, kept: false }) if !accepted => {
                        self.steer_refused(task_id, text);
                    }
                    Some(Steered { text, kept: true }) if !accepted => {
                        tracing::debug!(%task_id, "the agent refused a steered message that is kept as a follow-up: {text:?}");
                    }
                    _ => {}
                }
                return;
            }
            // The agent closed its channel: it is exiting, or has exited and was reaped.
            AgentInput::Closed => {
                self.channel_drained(task_id);
                return;
            }
            AgentInput::Broken(error) => {
                if agent.exit_status().is_some() {
                    // It died in the middle of a frame: its exit says more than the frame.
                    tracing::debug!(%task_id, "channel of an exited agent ended mid-frame: {error}");
                    self.channel_drained(task_id);
                    return;
                }
                agent.drained();
                Event::ProtocolError { task_id, error }
            }
        };
        if let Event::ProtocolError { error, .. } = &event {
            tracing::warn!(%task_id, pid = agent.pid, "agent broke the protocol: {error}; killing it");
        }
        // The line goes to the task's log first; then a progress event carries the
        // task as it is after that progress: handled first, then published.
        let progress = match &event {
            Event::Progress { text, .. } => {
                if let Some(output) = self.log_writers.get(&task_id) {
                    output.write_line(text);
                }
                Some(text.clone())
            }
            _ => None,
        };
        self.handle(event);
        if let Some(text) = progress {
            self.publish_task(EventKind::Progress, &task_id, Some(text), None);
        }
    }
}

impl Supervisor {
    /// Keeps `data` as the task's latest checkpoint: in memory until its write is
    /// committed, then in the store only.
    fn save_checkpoint(&mut self, task_id: TaskId, data: String) {
        self.checkpoint_seq += 1;
        let seq = self.checkpoint_seq;
        self.checkpoints_in_flight
            .insert(task_id, (seq, data.clone()));
        let events = self.store_events.clone();
        self.store.submit_with(
            agentd_store::Op::Checkpoint { id: task_id, data },
            move |result| {
                if let Err(e) = result {
                    tracing::warn!(%task_id, "the task's checkpoint was not written: {e}");
                }
                let _ = events.send(StoreEvent::CheckpointWritten { task_id, seq });
            },
        );
    }
}

pub(crate) fn msg_name(msg: &AgentMsg) -> &'static str {
    match msg {
        AgentMsg::Hello(_) => "Hello",
        AgentMsg::Progress { .. } => "Progress",
        AgentMsg::Result(_) => "Result",
        AgentMsg::Heartbeat => "Heartbeat",
        AgentMsg::Features(_) => "Features",
        AgentMsg::Checkpoint { .. } => "Checkpoint",
        AgentMsg::SteerAck { .. } => "SteerAck",
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub(crate) fn clip(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}
