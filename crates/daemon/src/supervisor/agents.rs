//! agentd's side of live agents: spawning, IPC, signals, reaping and agent events.

use std::collections::VecDeque;

use agentd_core::{AgentReport, Event, ExitStatus, ReportOutcome, StopStep, TaskId};
use agentd_proc::{reap_children, spawn_agent, AgentCommand, TaskTree};
use agentd_proto::control::EventKind;
use agentd_proto::ipc::{AgentMsg, Outcome, SupervisorMsg, TaskStart, IPC_PROTOCOL_VERSION};
use nix::sys::signal::Signal;
use tokio::sync::mpsc;

use crate::agent_io::{self, AgentEvent, AgentInput};
use crate::config::agent_argv;
use crate::supervisor::executor::{Timer, DRAIN_TIMEOUT};
use crate::supervisor::Supervisor;

/// agentd's side of one live agent.
pub(crate) struct Agent {
    pub(crate) pid: u32,
    /// Messages to the agent, written by its writer task.
    pub(crate) to_agent: mpsc::UnboundedSender<SupervisorMsg>,
    /// The task, sent once the agent's Hello checks out.
    pub(crate) start: TaskStart,
    /// Whether the handshake completed.
    pub(crate) ready: bool,
    /// Messages ordered before the handshake completed (a cancel), sent right after Start.
    pub(crate) held: Vec<SupervisorMsg>,
    /// Set when the reaper collected the agent: its pid must never be signalled again.
    pub(crate) exit: Option<ExitStatus>,
    /// Set when the reader saw the end of the channel: every frame has been handled.
    pub(crate) drained: bool,
    /// Steered texts awaiting the agent's SteerAck, oldest first.
    pub(crate) steers: VecDeque<String>,
}

impl Supervisor {
    pub(crate) fn spawn(
        &mut self,
        task_id: TaskId,
        session: String,
        text: String,
    ) -> Option<Event> {
        let (program, args) = agent_argv(&self.config.agent, &text);
        let command = AgentCommand {
            program: program.clone(),
            args,
            task_id: task_id.to_string(),
            session: session.clone(),
            log_path: Some(self.logs.join(format!("{task_id}.log"))),
        };
        let spawned = match spawn_agent(&command) {
            Ok(spawned) => spawned,
            Err(e) => {
                tracing::warn!(%task_id, "cannot start agent {program}: {e}");
                self.remove_empty_log(task_id);
                return Some(Event::SpawnFailed {
                    task_id,
                    error: format!("{program}: {e}"),
                });
            }
        };
        let pid = spawned.pid;
        let to_agent = match agent_io::start(task_id, spawned.channel, self.agent_events.clone()) {
            Ok(to_agent) => to_agent,
            Err(e) => {
                // The process exists: kill it; the reaper will report it.
                TaskTree::new(pid, task_id.to_string()).kill_all(true, 10);
                tracing::warn!(%task_id, "cannot set up the IPC channel: {e}");
                self.pids.insert(pid, task_id);
                return Some(Event::ProtocolError {
                    task_id,
                    error: format!("cannot set up the IPC channel: {e}"),
                });
            }
        };
        tracing::info!(%task_id, pid, session = %session, "agent started");
        self.pids.insert(pid, task_id);
        self.agents.insert(
            task_id,
            Agent {
                pid,
                to_agent,
                start: TaskStart {
                    task_id: task_id.to_string(),
                    session,
                    text,
                },
                ready: false,
                held: Vec::new(),
                exit: None,
                drained: false,
                steers: VecDeque::new(),
            },
        );
        self.arm(self.config.handshake_timeout, Timer::Handshake { task_id });
        self.publish_task(EventKind::Started, &task_id, None, None);
        Some(Event::Spawned { task_id, pid })
    }

    pub(crate) fn send_to_agent(&mut self, task_id: TaskId, msg: SupervisorMsg) {
        if let Some(agent) = self.agents.get_mut(&task_id) {
            if agent.ready {
                let _ = agent.to_agent.send(msg);
            } else {
                agent.held.push(msg);
            }
        }
    }

    pub(crate) fn signal_tree(&mut self, task_id: TaskId, step: StopStep) {
        let Some(agent) = self.agents.get(&task_id) else {
            return;
        };
        let tree = TaskTree::new(agent.pid, task_id.to_string());
        // Once reaped, the agent's pid (and so its group id) may be reused: from then on
        // its processes are found by scanning only.
        let unreaped = agent.exit.is_none();
        match step {
            StopStep::CooperativeCancel => {}
            StopStep::Sigterm => {
                let n = tree.signal(Signal::SIGTERM, unreaped);
                tracing::info!(%task_id, processes = n, "SIGTERM sent to the task's processes");
            }
            StopStep::Sigkill => {
                let left = tree.kill_all(unreaped, 10);
                tracing::info!(%task_id, "SIGKILL sent to the task's processes");
                if !left.is_empty() {
                    tracing::warn!(%task_id, ?left, "processes survived SIGKILL rounds");
                }
            }
        }
    }

    pub(crate) fn reap(&mut self) {
        for reaped in reap_children() {
            let Some(task_id) = self.pids.remove(&reaped.pid) else {
                tracing::debug!(pid = reaped.pid, "reaped an adopted orphan");
                continue;
            };
            // The agent is gone; whatever it left behind goes too, before the slot frees.
            // Its pid was reaped, so the group is found by scanning, never by killpg.
            let tree = TaskTree::new(reaped.pid, task_id.to_string());
            let left = tree.kill_all(false, 10);
            if !left.is_empty() {
                tracing::warn!(%task_id, ?left, "leftover processes survived SIGKILL rounds");
            }
            let status = ExitStatus {
                code: reaped.code,
                signal: reaped.signal,
            };
            tracing::info!(%task_id, pid = reaped.pid, status = %status.describe(), "agent reaped");
            // Frames the agent wrote before exiting (its result) may still be unread:
            // the task ends once its channel is drained (EOF), or after DRAIN_TIMEOUT.
            match self.agents.get_mut(&task_id) {
                Some(agent) if !agent.drained => {
                    agent.exit = Some(status);
                    self.arm(DRAIN_TIMEOUT, Timer::Drain { task_id });
                }
                _ => self.finish_reaped(task_id, status),
            }
        }
    }

    /// An agent that wrote nothing on its own stdout/stderr leaves no log file.
    pub(crate) fn remove_empty_log(&self, task_id: TaskId) {
        let log = self.logs.join(format!("{task_id}.log"));
        if std::fs::metadata(&log).is_ok_and(|m| m.len() == 0) {
            let _ = std::fs::remove_file(&log);
        }
    }

    /// The agent is reaped and its channel drained: the dispatcher may end the task.
    pub(crate) fn finish_reaped(&mut self, task_id: TaskId, status: ExitStatus) {
        self.agents.remove(&task_id);
        self.remove_empty_log(task_id);
        self.handle(Event::Reaped { task_id, status });
    }

    pub(crate) fn on_agent_event(&mut self, event: AgentEvent) {
        let AgentEvent { task_id, input } = event;
        let Some(agent) = self.agents.get_mut(&task_id) else {
            return;
        };
        let event = match input {
            AgentInput::Msg(AgentMsg::Hello(hello)) if !agent.ready => {
                if hello.protocol != IPC_PROTOCOL_VERSION {
                    let reason = format!(
                        "agentd speaks agent protocol {IPC_PROTOCOL_VERSION}, the agent {}",
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
                    agent.ready = true;
                    let _ = agent.to_agent.send(SupervisorMsg::Welcome {
                        protocol: IPC_PROTOCOL_VERSION,
                    });
                    let _ = agent
                        .to_agent
                        .send(SupervisorMsg::Start(agent.start.clone()));
                    for held in agent.held.drain(..) {
                        let _ = agent.to_agent.send(held);
                    }
                    tracing::info!(%task_id, agent = %hello.agent, steer = hello.capabilities.steer, "agent ready");
                    Event::AgentReady {
                        task_id,
                        steer: hello.capabilities.steer,
                    }
                }
            }
            AgentInput::Msg(msg) if !agent.ready => Event::ProtocolError {
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
            AgentInput::Msg(AgentMsg::SteerAck { accepted }) => {
                let text = agent.steers.pop_front();
                if let (false, Some(text)) = (accepted, text) {
                    self.steer_refused(task_id, text);
                }
                return;
            }
            // The agent closed its channel: it is exiting, or has exited and was reaped.
            AgentInput::Closed => {
                agent.drained = true;
                if let Some(status) = agent.exit {
                    self.finish_reaped(task_id, status);
                }
                return;
            }
            AgentInput::Broken(error) => {
                agent.drained = true;
                if let Some(status) = agent.exit {
                    // It died in the middle of a frame: its exit says more than the frame.
                    tracing::debug!(%task_id, "channel of an exited agent ended mid-frame: {error}");
                    self.finish_reaped(task_id, status);
                    return;
                }
                Event::ProtocolError { task_id, error }
            }
        };
        if let Event::ProtocolError { error, .. } = &event {
            tracing::warn!(%task_id, pid = agent.pid, "agent broke the protocol: {error}; killing it");
        }
        // A progress event carries the task as it is after that progress: handled first.
        let progress = match &event {
            Event::Progress { text, .. } => Some(text.clone()),
            _ => None,
        };
        self.handle(event);
        if let Some(text) = progress {
            self.publish_task(EventKind::Progress, &task_id, Some(text), None);
        }
    }
}

pub(crate) fn msg_name(msg: &AgentMsg) -> &'static str {
    match msg {
        AgentMsg::Hello(_) => "Hello",
        AgentMsg::Progress { .. } => "Progress",
        AgentMsg::Result(_) => "Result",
        AgentMsg::Heartbeat => "Heartbeat",
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
