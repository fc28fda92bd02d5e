//! agentd's side of live agents: spawning, IPC, signals, reaping and agent events.

use std::collections::VecDeque;
use std::time::Instant;

use agentd_core::{Event, ExitStatus, StopStep, TaskId, Verdict};
use agentd_proc::{reap_children, AgentCommand, TaskProcs, TreeReport};
use agentd_proto::ipc::{SupervisorMsg, TaskStart, IPC_PROTOCOL_VERSION};
use nix::sys::signal::Signal;
use tokio::sync::mpsc;

use crate::agent_io;
use crate::config::agent_argv;
use crate::supervisor::executor::{Timer, DRAIN_TIMEOUT};
use crate::supervisor::requests::resume::Resumed;
use crate::supervisor::Supervisor;

/// agentd's side of one live agent.
///
/// An agent has two lives that end independently: its conversation on the channel
/// ([`Talk`]) and its process with the channel's end and its process tree
/// ([`Life`]). It leaves the agent table once it is reaped, drained, and the Killer
/// reported its tree empty (see [`Supervisor::try_finish`]).
pub(crate) struct Agent {
    pub(crate) pid: u32,
    /// When it was spawned (the run-time limit counts from here).
    started: Instant,
    /// When a frame last arrived from it; `None` while handshaking.
    pub(super) last_heard: Option<Instant>,
    /// Its task's own run-time limit, instead of `--task-timeout`.
    task_timeout: Option<std::time::Duration>,
    /// Messages to the agent, written by its writer task.
    pub(super) to_agent: mpsc::UnboundedSender<SupervisorMsg>,
    /// Steered messages awaiting the agent's SteerAck, oldest first.
    pub(crate) steers: VecDeque<Steered>,
    /// For a resumed attempt: the task it resumes.
    pub(crate) resumed_from: Option<TaskId>,
    /// Its processes (pidfd and task cgroup) while the Killer has not needed them:
    /// handed over before the first signal, or at the reap if something may be left
    /// (see [`Supervisor::reap`]). `None` once handed over, and always without a
    /// cgroup (the Killer's fallback tells agents from orphans by the ones it tracks).
    procs: Option<TaskProcs>,
    talk: Talk,
    life: Life,
}

/// Most steered messages an agent may have unacknowledged, and most bytes of them:
/// past either, messages steered into its task are queued as follow-ups until it
/// catches up (an agent that never reads them would have them pile up in agentd
/// and in agent-exec without bound).
pub(crate) const MAX_UNREAD_STEERS: usize = 64;
pub(crate) const MAX_UNREAD_STEER_BYTES: usize = 4 * 1024 * 1024;

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

/// Where an agent's process, its channel and its process tree stand.
#[derive(Clone, Copy)]
enum Life {
    /// The process runs and the channel is open.
    Running,
    /// The reader saw the end of the channel (every frame was handled); the process
    /// is not reaped yet.
    Drained,
    /// The reaper collected the process (its pid is never signalled again: the Killer
    /// holds its pidfd and its cgroup). Its last frames (a result) may still be unread
    /// (`drained` false until EOF or [`DRAIN_TIMEOUT`]), and what it left behind may
    /// still run (`tree_empty` false until the Killer's [`TreeReport::Empty`]).
    Exited {
        status: ExitStatus,
        drained: bool,
        tree_empty: bool,
    },
}

impl Agent {
    /// Whether the agent has as many steered messages unacknowledged as it may have.
    pub(crate) fn steer_backlog_full(&self) -> bool {
        self.steers.len() >= MAX_UNREAD_STEERS
            || self.steers.iter().map(|s| s.text.len()).sum::<usize>() >= MAX_UNREAD_STEER_BYTES
    }

    fn new(
        pid: u32,
        to_agent: mpsc::UnboundedSender<SupervisorMsg>,
        start: TaskStart,
        resume: Option<Resumed>,
        procs: Option<TaskProcs>,
    ) -> Agent {
        Agent {
            pid,
            procs,
            started: Instant::now(),
            last_heard: None,
            task_timeout: None,
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
    /// said in its Hello), Settings (protocol 2: the heartbeat interval; a v1 agent
    /// has it in `AGENTD_HEARTBEAT_MS`), for a resumed attempt Resume (v2 agents
    /// only), Start, then the messages held meanwhile.
    pub(super) fn welcome(&mut self, protocol: u32, heartbeat: std::time::Duration) {
        self.last_heard = Some(Instant::now());
        if let Talk::Handshaking {
            start,
            resume,
            held,
        } = std::mem::replace(&mut self.talk, Talk::Ready)
        {
            let protocol = protocol.min(IPC_PROTOCOL_VERSION);
            let _ = self.to_agent.send(SupervisorMsg::Welcome { protocol });
            if protocol >= 2 {
                let _ =
                    self.to_agent
                        .send(SupervisorMsg::Settings(agentd_proto::ipc::AgentSettings {
                            heartbeat_interval_ms: heartbeat.as_millis() as u64,
                        }));
            }
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
            Life::Exited { status, .. } => Some(status),
            Life::Running | Life::Drained => None,
        }
    }

    /// The channel reached its end (or is given up on).
    pub(super) fn drained(&mut self) {
        match &mut self.life {
            Life::Running => self.life = Life::Drained,
            Life::Exited { drained, .. } => *drained = true,
            Life::Drained => {}
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
        let command = AgentCommand {
            program: program.clone(),
            args,
            task_id: task_id.to_string(),
            session: session.clone(),
            // stdout and stderr on a pipe, copied into the capped task log.
            log_path: None,
            capture_output: true,
            env: vec![(
                agentd_proto::ipc::ENV_HEARTBEAT_MS.to_string(),
                self.config.agents.heartbeat.as_millis().to_string(),
            )],
        };
        let spawned = match self.procs.spawn(&command) {
            Ok(spawned) => spawned,
            Err(e) => {
                tracing::warn!(%task_id, "cannot start agent {program}: {e}");
                return Some(Event::SpawnFailed {
                    task_id,
                    error: format!("{program}: {e}"),
                });
            }
        };
        let pid = spawned.pid;
        let process = match spawned.procs.start_time() {
            Some(start) => agentd_store::ProcessIdentity::started(pid, start),
            None => agentd_store::ProcessIdentity::capture(pid),
        };
        // In the same loop step as the spawn, the reaper can tell its exit. The Killer
        // gets the task's processes before any signal (`hand_to_killer`): without a
        // cgroup at once, with one only if a stop or a non-empty tree needs them, so
        // that a normal exit costs no round trip through the Killer's thread.
        self.pids.insert(pid, task_id);
        let procs = if spawned.procs.cgroup().is_some() {
            Some(spawned.procs)
        } else {
            self.killer.track(spawned.procs);
            None
        };
        let output = crate::output::start(
            spawned.output,
            self.config.state_dir.clone(),
            task_id,
            self.config.log_cap,
            self.pumps.clone(),
        );
        self.log_writers.insert(task_id, output);
        // Recorded with its start time and boot id, so that after a crash the pid is
        // trusted only while it is still this process.
        self.store.submit_detached(agentd_store::Op::Start {
            id: task_id,
            at: crate::views::now_millis().0 as i64,
            process: process.ok(),
            text: Some(text.clone()),
        });
        let resume = self.resumes.remove(&task_id);
        let start = TaskStart {
            task_id: task_id.to_string(),
            session: session.clone(),
            text,
        };
        let to_agent = match agent_io::start(
            task_id,
            spawned.channel,
            self.agent_events.clone(),
            self.config.agents.frame_timeout,
        ) {
            Ok(to_agent) => to_agent,
            Err(e) => {
                // The process exists: kill it; the reaper and the Killer end the task.
                tracing::warn!(%task_id, "cannot set up the IPC channel: {e}");
                if let Some(procs) = procs {
                    self.killer.track(procs);
                }
                self.killer.kill(&task_id.to_string());
                let (closed, _) = mpsc::unbounded_channel();
                let mut agent = Agent::new(pid, closed, start, resume, None);
                agent.life = Life::Drained;
                self.agents.insert(task_id, agent);
                return Some(Event::ProtocolError {
                    task_id,
                    error: format!("cannot set up the IPC channel: {e}"),
                });
            }
        };
        tracing::info!(%task_id, pid, session = %crate::logfmt::Word(&session), "agent started");
        let mut agent = Agent::new(pid, to_agent, start, resume, procs);
        agent.task_timeout = self.task_timeouts.remove(&task_id);
        self.agents.insert(task_id, agent);
        self.arm(self.config.handshake_timeout, Timer::Handshake { task_id });
        self.check_liveness(task_id);
        // `started` is published once the dispatcher knows the pid (see `execute`).
        Some(Event::Spawned { task_id, pid })
    }

    pub(crate) fn send_to_agent(&mut self, task_id: TaskId, msg: SupervisorMsg) {
        if let Some(agent) = self.agents.get_mut(&task_id) {
            agent.send(msg);
        }
    }

    /// Asks the Killer to signal the task's tree; returns at once (the Killer
    /// reports what it reached).
    pub(crate) fn signal_tree(&mut self, task_id: TaskId, step: StopStep) {
        if !self.agents.contains_key(&task_id) {
            return;
        }
        let id = task_id.to_string();
        match step {
            StopStep::CooperativeCancel => {}
            // Always followed by SIGCONT, so a SIGSTOPped agent acts on it.
            StopStep::Sigterm => {
                self.hand_to_killer(task_id);
                self.killer.signal(&id, Signal::SIGTERM)
            }
            StopStep::Sigkill => {
                self.hand_to_killer(task_id);
                self.killer.kill(&id)
            }
        }
    }

    /// Gives the task's processes to the Killer if the loop still holds them (in the
    /// same channel as, and ahead of, the request that needs them).
    fn hand_to_killer(&mut self, task_id: TaskId) {
        if let Some(procs) = self.agents.get_mut(&task_id).and_then(|a| a.procs.take()) {
            self.killer.track(procs);
        }
    }

    pub(crate) fn reap(&mut self) {
        for reaped in reap_children() {
            let Some(task_id) = self.pids.remove(&reaped.pid) else {
                tracing::debug!(pid = reaped.pid, "reaped an adopted orphan");
                continue;
            };
            let status = ExitStatus {
                code: reaped.code,
                signal: reaped.signal,
            };
            tracing::debug!(%task_id, pid = reaped.pid, exit_code = status.code, signal = status.signal, "agent reaped");
            // Whatever it left behind goes too, off the loop; the Killer answers with
            // TreeReport::Empty. If the loop still holds the task's processes (no stop
            // needed them), a task cgroup that one read shows empty is removed here and
            // the tree is empty now. Frames the agent wrote before exiting (its result)
            // may still be unread: the channel must drain too (EOF, or DRAIN_TIMEOUT).
            let held = self.agents.get_mut(&task_id).and_then(|a| a.procs.take());
            let empty_now = match held {
                Some(procs) => self.killer.untracked_exited(procs),
                None => {
                    self.killer.agent_exited(&task_id.to_string());
                    None
                }
            };
            let Some(agent) = self.agents.get_mut(&task_id) else {
                continue;
            };
            let drained = match agent.life {
                Life::Running => false,
                Life::Drained => true,
                Life::Exited { .. } => continue,
            };
            agent.life = Life::Exited {
                status,
                drained,
                tree_empty: false,
            };
            if !drained {
                self.arm(DRAIN_TIMEOUT, Timer::Drain { task_id });
            }
            if let Some(report) = empty_now {
                self.on_tree_report(report);
            }
        }
    }

    /// What the Killer reports: a tree signalled (logged), or a tree empty after its
    /// agent exited (the task may end).
    pub(crate) fn on_tree_report(&mut self, report: TreeReport) {
        match report {
            TreeReport::Signalled {
                task_id,
                signal,
                processes,
            } => {
                tracing::info!(%task_id, processes, "{signal} sent to the task's processes");
            }
            TreeReport::Empty {
                task_id,
                killed,
                survivors,
            } => {
                if !survivors.is_empty() {
                    tracing::warn!(%task_id, ?survivors, "processes survived every SIGKILL round");
                } else if killed > 0 {
                    tracing::info!(%task_id, killed, "the task's leftover processes were killed");
                }
                let Ok(task_id) = task_id.parse::<TaskId>() else {
                    return;
                };
                if let Some(Life::Exited { tree_empty, .. }) =
                    self.agents.get_mut(&task_id).map(|a| &mut a.life)
                {
                    *tree_empty = true;
                }
                self.try_finish(task_id);
            }
        }
    }

    /// The channel of `task_id` is at its end (or given up on).
    pub(crate) fn channel_drained(&mut self, task_id: TaskId) {
        if let Some(agent) = self.agents.get_mut(&task_id) {
            agent.drained();
        }
        self.try_finish(task_id);
    }

    /// Ends the task once its agent is reaped, its channel drained and its tree empty:
    /// only then is its slot freed.
    pub(crate) fn try_finish(&mut self, task_id: TaskId) {
        if let Some(Agent {
            life:
                Life::Exited {
                    status,
                    drained: true,
                    tree_empty: true,
                },
            ..
        }) = self.agents.get(&task_id)
        {
            let status = *status;
            self.finish_reaped(task_id, status);
        }
    }

    /// Looks at a live agent's silence and run time (see [`agentd_core::Liveness`])
    /// and stops it if it is hung or timed out; else looks again when it may be.
    pub(crate) fn check_liveness(&mut self, task_id: TaskId) {
        let Some(agent) = self.agents.get(&task_id) else {
            return;
        };
        if let Life::Exited { .. } = agent.life {
            return;
        }
        let now = Instant::now();
        let liveness = agentd_core::Liveness {
            task_timeout: agent.task_timeout.or(self.liveness.task_timeout),
            ..self.liveness
        };
        let verdict = liveness.verdict(
            agent.last_heard.map(|t| now.saturating_duration_since(t)),
            now.saturating_duration_since(agent.started),
        );
        match verdict {
            Verdict::Alive { recheck_in: None } => {}
            Verdict::Alive {
                recheck_in: Some(after),
            } => self.arm(after, Timer::Liveness { task_id }),
            Verdict::Hung
                if self
                    .dispatcher
                    .task(&task_id)
                    .is_some_and(|t| t.report.is_some()) =>
            {
                // It reported and stopped heartbeating, as agents do: its exit grace
                // governs now. Only the run-time limit still applies.
                if let Some(limit) = liveness.task_timeout {
                    let left = limit.saturating_sub(now.saturating_duration_since(agent.started));
                    self.arm(left, Timer::Liveness { task_id });
                }
            }
            Verdict::Hung | Verdict::TimedOut => {
                let pid = agent.pid;
                let stopping = self
                    .dispatcher
                    .task(&task_id)
                    .is_some_and(|t| matches!(t.state, agentd_core::TaskState::Stopping { .. }));
                if stopping {
                    // The stop under way owns the outcome (the dispatcher ignores it).
                    tracing::debug!(%task_id, ?verdict, "liveness limit reached while stopping");
                } else if verdict == Verdict::Hung {
                    let limit = liveness.hung_after.unwrap_or_default();
                    tracing::warn!(%task_id, pid, "agent hung: nothing from it for {limit:?}; stopping it");
                } else {
                    let limit = liveness.task_timeout.unwrap_or_default();
                    tracing::warn!(%task_id, pid, "task ran past its time limit of {limit:?}; stopping it");
                }
                let event = if verdict == Verdict::Hung {
                    Event::Hung { task_id }
                } else {
                    Event::TimedOut { task_id }
                };
                self.handle(event);
            }
        }
    }

    /// The agent is reaped, its channel drained and its tree empty: the dispatcher
    /// may end the task.
    fn finish_reaped(&mut self, task_id: TaskId, status: ExitStatus) {
        self.agents.remove(&task_id);
        // The loop lets go of the log: it is finished once the pipe is at its end too
        // (the agent's leftovers were killed, so that is soon).
        self.log_writers.remove(&task_id);
        self.handle(Event::Reaped { task_id, status });
    }
}
