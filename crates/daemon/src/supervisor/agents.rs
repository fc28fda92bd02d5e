//! agentd's side of live agents: spawning, IPC, signals, reaping and agent events.

use std::collections::VecDeque;

use agentd_core::{AgentReport, Event, ExitStatus, ReportOutcome, StopStep, TaskId};
use agentd_proc::{reap_children, spawn_agent, AgentCommand, TaskTree};
use agentd_proto::control::EventKind;
use agentd_proto::ipc::{
    AgentMsg, Outcome, SupervisorMsg, TaskStart, IPC_PROTOCOL_VERSION, MAX_CHECKPOINT_BYTES,
    MIN_IPC_PROTOCOL_VERSION,
};
use nix::sys::signal::Signal;
use tokio::sync::mpsc;

use crate::agent_io::{self, AgentEvent, AgentInput};
use crate::config::agent_argv;
use crate::supervisor::executor::{Timer, DRAIN_TIMEOUT};
use crate::supervisor::requests::resume::Resumed;
use crate::supervisor::{StoreEvent, Supervisor};

/// agentd's side of one live agent.
///
/// An agent has two lives that end independently: its conversation on the channel
/// ([`Talk`]) and its process with the channel's end ([`Life`]). It leaves the agent
/// table once it is both reaped and drained (see [`Supervisor::finish_reaped`]).
pub(crate) struct Agent {
    pub(crate) pid: u32,
    /// Messages to the agent, written by its writer task.
    to_agent: mpsc::UnboundedSender<SupervisorMsg>,
    /// Steered messages awaiting the agent's SteerAck, oldest first.
    pub(crate) steers: VecDeque<Steered>,
    /// For a resumed attempt: the task it resumes.
    pub(crate) resumed_from: Option<TaskId>,
    talk: Talk,
    life: Life,
}

/// A message steered into an agent, until the agent acknowledges it.
pub(crate) struct Steered {
    pub(crate) text: String,
    /// The message is also kept as a follow-up task (`steer-backlog`): if the agent
    /// refuses it, that task already carries it.
    pub(crate) kept: bool,
}

/// Where the conversation with an agent stands.
enum Talk {
    /// Spawned, no Hello yet. `start` is sent once the Hello checks out; messages
    /// ordered meanwhile (a cancel) are held and sent right after it.
    Handshaking {
        start: TaskStart,
        /// For a resumed attempt, told (to a v2 agent) right before Start.
        resume: Option<Resumed>,
        held: Vec<SupervisorMsg>,
    },
    /// The handshake completed: messages go straight to the agent.
    Ready,
}

/// Where an agent's process and its channel stand.
#[derive(Clone, Copy)]
enum Life {
    /// The process runs and the channel is open.
    Running,
    /// The reader saw the end of the channel (every frame was handled); the process
    /// is not reaped yet.
    Drained,
    /// The reaper collected the process; its last frames (a result) may still be
    /// unread, until EOF or [`DRAIN_TIMEOUT`]. Its pid must never be signalled again.
    Exited(ExitStatus),
}

impl Agent {
    fn new(
        pid: u32,
        to_agent: mpsc::UnboundedSender<SupervisorMsg>,
        start: TaskStart,
        resume: Option<Resumed>,
    ) -> Agent {
        Agent {
            pid,
            to_agent,
            steers: VecDeque::new(),
            resumed_from: resume.as_ref().map(|r| r.previous),
            talk: Talk::Handshaking {
                start,
                resume,
                held: Vec::new(),
            },
            life: Life::Running,
        }
    }

    /// Sends `msg` now, or after Start when the handshake is still under way.
    fn send(&mut self, msg: SupervisorMsg) {
        match &mut self.talk {
            Talk::Handshaking { held, .. } => held.push(msg),
            Talk::Ready => {
                let _ = self.to_agent.send(msg);
            }
        }
    }

    /// Completes the handshake: Welcome (in the agent's protocol version, which it
    /// said in its Hello), for a resumed attempt Resume (v2 agents only), Start, then
    /// the messages held meanwhile.
    fn welcome(&mut self, protocol: u32) {
        if let Talk::Handshaking {
            start,
            resume,
            held,
        } = std::mem::replace(&mut self.talk, Talk::Ready)
        {
            let protocol = protocol.min(IPC_PROTOCOL_VERSION);
            let _ = self.to_agent.send(SupervisorMsg::Welcome { protocol });
            if let (Some(resume), true) = (resume, protocol >= 2) {
                let _ = self.to_agent.send(SupervisorMsg::Resume {
                    previous_task_id: resume.previous.to_string(),
                    checkpoint: resume.checkpoint,
                });
            }
            let _ = self.to_agent.send(SupervisorMsg::Start(start));
            for msg in held {
                let _ = self.to_agent.send(msg);
            }
        }
    }

    /// Whether the agent has not completed its handshake.
    pub(crate) fn is_handshaking(&self) -> bool {
        matches!(self.talk, Talk::Handshaking { .. })
    }

    /// The agent's exit, once it was reaped (and its channel is not yet drained).
    pub(crate) fn exit_status(&self) -> Option<ExitStatus> {
        match self.life {
            Life::Exited(status) => Some(status),
            Life::Running | Life::Drained => None,
        }
    }
}

impl Supervisor {
    pub(crate) fn spawn(
        &mut self,
        task_id: TaskId,
        session: String,
        text: String,
    ) -> Option<Event> {
        let (program, args) = agent_argv(&self.config.agent, &text);
        // Output goes through a pipe into the capped log; without one, straight
        // into the log file (uncapped).
        let pipe = crate::output::LogPipe::create(&self.logs, task_id)
            .map_err(|e| tracing::warn!(%task_id, "no capped log for this task: {e}"))
            .ok();
        let command = AgentCommand {
            program: program.clone(),
            args,
            task_id: task_id.to_string(),
            session: session.clone(),
            log_path: Some(match &pipe {
                Some(pipe) => pipe.path().to_path_buf(),
                None => self.logs.join(format!("{task_id}.log")),
            }),
        };
        let spawned = spawn_agent(&command);
        if let Some(pipe) = pipe {
            match &spawned {
                Ok(_) => {
                    let writer = pipe.start(
                        self.config.state_dir.clone(),
                        task_id,
                        self.config.log_cap,
                        self.pumps.clone(),
                    );
                    self.log_writers.insert(task_id, writer);
                }
                Err(_) => {
                    let _ = std::fs::remove_file(pipe.path());
                }
            }
        }
        let spawned = match spawned {
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
        tracing::info!(%task_id, pid, session = %crate::logfmt::Word(&session), "agent started");
        // Recorded with its start time and boot id, so that after a crash the pid is
        // trusted only while it is still this process.
        self.store.submit_detached(agentd_store::Op::Start {
            id: task_id,
            at: crate::views::now_millis().0 as i64,
            process: agentd_store::ProcessIdentity::capture(pid).ok(),
            text: Some(text.clone()),
        });
        self.pids.insert(pid, task_id);
        let resume = self.resumes.remove(&task_id);
        self.agents.insert(
            task_id,
            Agent::new(
                pid,
                to_agent,
                TaskStart {
                    task_id: task_id.to_string(),
                    session,
                    text,
                },
                resume,
            ),
        );
        self.arm(self.config.handshake_timeout, Timer::Handshake { task_id });
        // `started` is published once the dispatcher knows the pid (see `execute`).
        Some(Event::Spawned { task_id, pid })
    }

    pub(crate) fn send_to_agent(&mut self, task_id: TaskId, msg: SupervisorMsg) {
        if let Some(agent) = self.agents.get_mut(&task_id) {
            agent.send(msg);
        }
    }

    pub(crate) fn signal_tree(&mut self, task_id: TaskId, step: StopStep) {
        let Some(agent) = self.agents.get(&task_id) else {
            return;
        };
        let tree = TaskTree::new(agent.pid, task_id.to_string());
        // Once reaped, the agent's pid (and so its group id) may be reused: from then on
        // its processes are found by scanning only.
        let unreaped = agent.exit_status().is_none();
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
                    tracing::warn!(%task_id, left = %crate::logfmt::Pids(&left), "processes survived SIGKILL rounds");
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
                tracing::warn!(%task_id, left = %crate::logfmt::Pids(&left), "leftover processes survived SIGKILL rounds");
            }
            let status = ExitStatus {
                code: reaped.code,
                signal: reaped.signal,
            };
            tracing::info!(%task_id, pid = reaped.pid, exit_code = status.code, signal = status.signal, "agent reaped");
            // Frames the agent wrote before exiting (its result) may still be unread:
            // the task ends once its channel is drained (EOF), or after DRAIN_TIMEOUT.
            match self.agents.get_mut(&task_id) {
                Some(agent) if matches!(agent.life, Life::Running) => {
                    agent.life = Life::Exited(status);
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
        // agentd's write end closes: the log ends once the agent's tools close theirs.
        // A piped log is made only once there is output (by its pump, which may be
        // writing right now), so only an unpiped one can be empty.
        if self.log_writers.remove(&task_id).is_none() {
            self.remove_empty_log(task_id);
        }
        self.handle(Event::Reaped { task_id, status });
    }

    pub(crate) fn on_agent_event(&mut self, event: AgentEvent) {
        let AgentEvent { task_id, input } = event;
        let Some(agent) = self.agents.get_mut(&task_id) else {
            return;
        };
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
                    agent.welcome(hello.protocol);
                    tracing::info!(%task_id, agent = %crate::logfmt::Word(&hello.agent), steer = hello.capabilities.steer, "agent ready");
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
                if let Some(status) = agent.exit_status() {
                    self.finish_reaped(task_id, status);
                } else {
                    agent.life = Life::Drained;
                }
                return;
            }
            AgentInput::Broken(error) => {
                if let Some(status) = agent.exit_status() {
                    // It died in the middle of a frame: its exit says more than the frame.
                    tracing::debug!(%task_id, "channel of an exited agent ended mid-frame: {error}");
                    self.finish_reaped(task_id, status);
                    return;
                }
                agent.life = Life::Drained;
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
                if let Some(writer) = self.log_writers.get_mut(&task_id) {
                    crate::output::write_line(writer, text);
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
