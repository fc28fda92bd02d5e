//! [`Dispatcher`]: the per-session lanes, the global lane and the stop sequence.
//!
//! **Invariants** (checked by [`Dispatcher::check_invariants`] in the tests):
//! - at most one task per session is active (starting, running or stopping), and it is
//!   the one recorded as the session's claim;
//! - `live` (agents ordered spawned and not yet reaped) never exceeds `max_concurrent`;
//! - a session is in the ready ring exactly when it has queued work and no active task,
//!   and it appears there once: admission is round-robin across ready sessions;
//! - a claim is released only by the end of the task that holds it (compare, then
//!   release);
//! - a session with no queued work and no active task has no entry at all, and a
//!   finished task leaves every map the moment [`Action::Finished`] is emitted.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use crate::task::{
    AgentReport, Ending, ExitStatus, Millis, ReportOutcome, StopStep, Task, TaskId, TaskState,
};

/// Limits and graces the dispatcher decides with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Most agent processes alive at once.
    pub max_concurrent: u32,
    /// Time between the cooperative cancel and SIGTERM.
    pub cancel_grace: Duration,
    /// Time between SIGTERM and SIGKILL.
    pub term_grace: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            max_concurrent: 2,
            cancel_grace: Duration::from_secs(5),
            term_grace: Duration::from_secs(5),
        }
    }
}

/// Something that happened to a task, reported by the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The agent process of a task exists (its pid is also its process group).
    Spawned {
        task_id: TaskId,
        pid: u32,
    },
    /// The agent process could not be started; no process exists.
    SpawnFailed {
        task_id: TaskId,
        error: String,
    },
    /// The agent completed its handshake.
    AgentReady {
        task_id: TaskId,
        steer: bool,
    },
    Progress {
        task_id: TaskId,
        text: String,
    },
    /// The agent reported its result (it has not necessarily exited yet).
    Report {
        task_id: TaskId,
        report: AgentReport,
    },
    /// The agent broke the protocol (garbage frame, wrong handshake…): it is killed.
    ProtocolError {
        task_id: TaskId,
        error: String,
    },
    /// The agent process was reaped and its leftover processes were killed.
    Reaped {
        task_id: TaskId,
        status: ExitStatus,
    },
    /// A stop timer armed by [`Action::SetTimer`] elapsed.
    StopTimer {
        task_id: TaskId,
        step: StopStep,
    },
}

/// Something the daemon must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start an agent process for the task. Answer with `Spawned` or `SpawnFailed`.
    Spawn {
        task_id: TaskId,
        session: String,
        text: String,
    },
    /// Send the cooperative cancel over the task's IPC channel.
    SendCancel { task_id: TaskId },
    /// Signal the task's process tree (`Sigterm` or `Sigkill`).
    Signal { task_id: TaskId, step: StopStep },
    /// Feed back `Event::StopTimer { task_id, step }` after `after`.
    SetTimer {
        task_id: TaskId,
        after: Duration,
        step: StopStep,
    },
    /// The task reached a terminal state and left the dispatcher; keep it as history.
    Finished(Task),
}

/// The actions one decision produced. Dropping them loses effects, hence `must_use`.
#[must_use = "actions must be executed by the daemon"]
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Actions(pub Vec<Action>);

impl Actions {
    /// No action: written out rather than an `Option`, so `?` cannot swallow a decision.
    pub fn none() -> Actions {
        Actions(Vec::new())
    }
    pub fn into_vec(self) -> Vec<Action> {
        self.0
    }
}

/// What a new work message became.
#[must_use = "actions must be executed by the daemon"]
#[derive(Debug)]
pub struct Submitted {
    pub task_id: TaskId,
    pub actions: Actions,
}

/// What a stop names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopTarget {
    Task(TaskId),
    /// The session's active task, or its oldest queued task when none is active.
    SessionCurrent(String),
    /// The session's queued tasks (first) and its active task.
    SessionAll(String),
    /// Every queued task (first) and every active task.
    Everything,
}

/// Who asks for a stop: a chat may only stop its own tasks; the workstation's owner
/// (agentctl) may stop any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Owner,
    Chat(String),
}

/// Why a stop was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopError {
    NotFound(TaskId),
    /// The task belongs to another session than the chat that asked.
    Forbidden {
        task_id: TaskId,
        session: String,
    },
    /// A chat asked to stop another session's tasks.
    OtherSession {
        session: String,
    },
}

/// Capacity in use: live agent processes against the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub busy: u32,
    pub max: u32,
}

#[derive(Debug, Default)]
struct Session {
    /// Queued tasks in arrival order.
    queue: VecDeque<TaskId>,
    /// The task that holds this session's lane.
    active: Option<TaskId>,
}

/// The dispatcher state machine. See the module docs for its invariants.
#[derive(Debug)]
pub struct Dispatcher {
    config: Config,
    tasks: HashMap<TaskId, Task>,
    sessions: HashMap<String, Session>,
    /// Sessions with queued work and no active task, in admission order.
    ready: VecDeque<String>,
    /// Tasks whose agent was ordered spawned and is not yet reaped.
    live: BTreeSet<TaskId>,
}

impl Dispatcher {
    pub fn new(config: Config) -> Dispatcher {
        Dispatcher {
            config,
            tasks: HashMap::new(),
            sessions: HashMap::new(),
            ready: VecDeque::new(),
            live: BTreeSet::new(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    // ----- queries -----

    /// A task that is queued or active.
    pub fn task(&self, task_id: &TaskId) -> Option<&Task> {
        self.tasks.get(task_id)
    }

    /// Every queued or active task, in no particular order.
    pub fn tasks(&self) -> impl Iterator<Item = &Task> {
        self.tasks.values()
    }

    pub fn capacity(&self) -> Capacity {
        Capacity {
            busy: self.live.len() as u32,
            max: self.config.max_concurrent,
        }
    }

    pub fn n_queued(&self) -> usize {
        self.sessions.values().map(|s| s.queue.len()).sum()
    }

    pub fn n_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// The task holding the session's lane.
    pub fn active_task(&self, session: &str) -> Option<TaskId> {
        self.sessions.get(session).and_then(|s| s.active)
    }

    /// Admission order of every queued task (1 = admitted next).
    ///
    /// Sessions take turns: first the ready sessions in ring order, then the busy
    /// sessions that have queued work (they rejoin the ring when their run ends), in
    /// the order their runs started. Round `r` admits the `r`-th queued task of each.
    pub fn positions(&self) -> HashMap<TaskId, u32> {
        let mut order: Vec<&Session> = self
            .ready
            .iter()
            .filter_map(|s| self.sessions.get(s))
            .collect();
        let mut busy: Vec<(&Task, &Session)> = self
            .sessions
            .values()
            .filter(|s| !s.queue.is_empty())
            .filter_map(|s| s.active.and_then(|t| self.tasks.get(&t)).map(|t| (t, s)))
            .collect();
        busy.sort_by_key(|(t, _)| (t.started_at, t.id));
        order.extend(busy.into_iter().map(|(_, s)| s));

        let mut positions = HashMap::new();
        let rounds = order.iter().map(|s| s.queue.len()).max().unwrap_or(0);
        let mut next = 1u32;
        for round in 0..rounds {
            for session in &order {
                if let Some(task_id) = session.queue.get(round) {
                    positions.insert(*task_id, next);
                    next += 1;
                }
            }
        }
        positions
    }

    pub fn position(&self, task_id: &TaskId) -> Option<u32> {
        match self.tasks.get(task_id)?.state {
            TaskState::Queued => self.positions().get(task_id).copied(),
            _ => None,
        }
    }

    // ----- inputs -----

    /// A work message for `session` becomes a queued task and is admitted if a slot and
    /// the session's lane are free.
    pub fn submit(
        &mut self,
        task_id: TaskId,
        session: String,
        text: String,
        now: Millis,
    ) -> Submitted {
        let task = Task {
            id: task_id,
            session: session.clone(),
            text,
            state: TaskState::Queued,
            created_at: now,
            started_at: None,
            finished_at: None,
            progress: None,
            report: None,
            protocol_error: None,
        };
        self.tasks.insert(task_id, task);
        let entry = self.sessions.entry(session.clone()).or_default();
        entry.queue.push_back(task_id);
        if entry.active.is_none() && entry.queue.len() == 1 {
            self.ready.push_back(session);
        }
        let mut actions = Vec::new();
        self.admit(now, &mut actions);
        Submitted {
            task_id,
            actions: Actions(actions),
        }
    }

    /// Something happened to a task. Events about unknown or finished tasks (late,
    /// duplicated) change nothing.
    pub fn handle(&mut self, event: Event, now: Millis) -> Actions {
        let mut actions = Vec::new();
        match event {
            Event::Spawned { task_id, pid } => {
                if let Some(task) = self.tasks.get_mut(&task_id) {
                    match &mut task.state {
                        TaskState::Starting { pid: p } | TaskState::Stopping { pid: p, .. }
                            if p.is_none() =>
                        {
                            *p = Some(pid)
                        }
                        _ => {}
                    }
                }
            }
            Event::SpawnFailed { task_id, error } => {
                if self
                    .tasks
                    .get(&task_id)
                    .is_some_and(|t| t.state.is_active())
                {
                    let ending = Ending::Failed {
                        reason: format!("cannot start the agent: {error}"),
                    };
                    self.finish_active(task_id, ending, None, now, &mut actions);
                }
            }
            Event::AgentReady { task_id, steer } => {
                if let Some(task) = self.tasks.get_mut(&task_id) {
                    if let TaskState::Starting { pid: Some(pid) } = task.state {
                        task.state = TaskState::Running { pid, steer };
                    }
                }
            }
            Event::Progress { task_id, text } => {
                if let Some(task) = self.tasks.get_mut(&task_id).filter(|t| t.state.is_active()) {
                    task.progress = Some(text);
                }
            }
            Event::Report { task_id, report } => {
                if let Some(task) = self.tasks.get_mut(&task_id).filter(|t| t.state.is_active()) {
                    if task.report.is_none() {
                        task.report = Some(report);
                    }
                }
            }
            Event::ProtocolError { task_id, error } => {
                if let Some(task) = self.tasks.get_mut(&task_id).filter(|t| t.state.is_active()) {
                    if task.protocol_error.is_none() {
                        task.protocol_error = Some(error);
                    }
                    let requested_at = match task.state {
                        TaskState::Stopping { requested_at, .. } => requested_at,
                        _ => now,
                    };
                    let pid = task.state.pid();
                    task.state = TaskState::Stopping {
                        pid,
                        step: StopStep::Sigkill,
                        requested_at,
                    };
                    actions.push(Action::Signal {
                        task_id,
                        step: StopStep::Sigkill,
                    });
                }
            }
            Event::StopTimer { task_id, step } => {
                if let Some(task) = self.tasks.get_mut(&task_id) {
                    if let TaskState::Stopping { step: current, .. } = &mut task.state {
                        if *current < step {
                            *current = step;
                            actions.push(Action::Signal { task_id, step });
                            if step == StopStep::Sigterm {
                                actions.push(Action::SetTimer {
                                    task_id,
                                    after: self.config.term_grace,
                                    step: StopStep::Sigkill,
                                });
                            }
                        }
                    }
                }
            }
            Event::Reaped { task_id, status } => {
                if let Some(task) = self.tasks.get(&task_id).filter(|t| t.state.is_active()) {
                    let ending = ending_of(task, status, now);
                    self.finish_active(task_id, ending, Some(status), now, &mut actions);
                }
            }
        }
        Actions(actions)
    }

    /// Starts a stop. Returns the tasks it acts on (each ends in a terminal state, some
    /// at once, others when their agent is reaped) and the actions to execute.
    pub fn stop(
        &mut self,
        target: StopTarget,
        scope: &Scope,
        now: Millis,
    ) -> Result<(Vec<TaskId>, Actions), StopError> {
        let targets: Vec<TaskId> = match target {
            StopTarget::Task(task_id) => {
                let task = self
                    .tasks
                    .get(&task_id)
                    .ok_or(StopError::NotFound(task_id))?;
                if let Scope::Chat(session) = scope {
                    if &task.session != session {
                        return Err(StopError::Forbidden {
                            task_id,
                            session: task.session.clone(),
                        });
                    }
                }
                vec![task_id]
            }
            StopTarget::SessionCurrent(session) => {
                self.check_scope(scope, &session)?;
                let s = self.sessions.get(&session);
                s.and_then(|s| s.active.or_else(|| s.queue.front().copied()))
                    .into_iter()
                    .collect()
            }
            StopTarget::SessionAll(session) => {
                self.check_scope(scope, &session)?;
                match self.sessions.get(&session) {
                    Some(s) => s.queue.iter().copied().chain(s.active).collect(),
                    None => Vec::new(),
                }
            }
            StopTarget::Everything => {
                let Scope::Owner = scope else {
                    return Ok((Vec::new(), Actions::none()));
                };
                let mut queued: Vec<&Task> = self
                    .tasks
                    .values()
                    .filter(|t| t.state == TaskState::Queued)
                    .collect();
                queued.sort_by_key(|t| (t.created_at, t.id));
                let mut active: Vec<&Task> = self
                    .tasks
                    .values()
                    .filter(|t| t.state.is_active())
                    .collect();
                active.sort_by_key(|t| (t.created_at, t.id));
                queued.iter().chain(active.iter()).map(|t| t.id).collect()
            }
        };
        let mut actions = Vec::new();
        // Queued tasks first, so that nothing is promoted into a half-stopped session.
        for &task_id in &targets {
            if self
                .tasks
                .get(&task_id)
                .is_some_and(|t| t.state == TaskState::Queued)
            {
                self.cancel_queued(task_id, now, &mut actions);
            }
        }
        for &task_id in &targets {
            self.begin_stop(task_id, now, &mut actions);
        }
        Ok((targets, Actions(actions)))
    }

    fn check_scope(&self, scope: &Scope, session: &str) -> Result<(), StopError> {
        match scope {
            Scope::Chat(own) if own != session => Err(StopError::OtherSession {
                session: session.to_string(),
            }),
            _ => Ok(()),
        }
    }

    // ----- transitions -----

    fn begin_stop(&mut self, task_id: TaskId, now: Millis, actions: &mut Vec<Action>) {
        let Some(task) = self.tasks.get_mut(&task_id) else {
            return;
        };
        let pid = match task.state {
            TaskState::Starting { pid } => pid,
            TaskState::Running { pid, .. } => Some(pid),
            // Already stopping (answered when it ends), queued (handled), or done.
            _ => return,
        };
        task.state = TaskState::Stopping {
            pid,
            step: StopStep::CooperativeCancel,
            requested_at: now,
        };
        actions.push(Action::SendCancel { task_id });
        actions.push(Action::SetTimer {
            task_id,
            after: self.config.cancel_grace,
            step: StopStep::Sigterm,
        });
    }

    fn cancel_queued(&mut self, task_id: TaskId, now: Millis, actions: &mut Vec<Action>) {
        let Some(task) = self.tasks.remove(&task_id) else {
            return;
        };
        if let Some(session) = self.sessions.get_mut(&task.session) {
            session.queue.retain(|t| *t != task_id);
            if session.queue.is_empty() {
                self.ready.retain(|s| *s != task.session);
                if session.active.is_none() {
                    self.sessions.remove(&task.session);
                }
            }
        }
        actions.push(Action::Finished(Task {
            state: TaskState::Done {
                ending: Ending::Cancelled {
                    by: None,
                    after: Duration::ZERO,
                },
                exit: None,
            },
            finished_at: Some(now),
            ..task
        }));
    }

    /// Ends the active task: records its ending, releases its slot and its session's
    /// claim (only if it holds it), and admits the next work.
    fn finish_active(
        &mut self,
        task_id: TaskId,
        ending: Ending,
        exit: Option<ExitStatus>,
        now: Millis,
        actions: &mut Vec<Action>,
    ) {
        let Some(task) = self.tasks.remove(&task_id) else {
            return;
        };
        self.live.remove(&task_id);
        if let Some(session) = self.sessions.get_mut(&task.session) {
            if session.active == Some(task_id) {
                session.active = None;
                if session.queue.is_empty() {
                    self.sessions.remove(&task.session);
                } else {
                    self.ready.push_back(task.session.clone());
                }
            }
        }
        actions.push(Action::Finished(Task {
            state: TaskState::Done { ending, exit },
            finished_at: Some(now),
            ..task
        }));
        self.admit(now, actions);
    }

    /// Admits ready sessions round-robin while live agents are below the cap.
    fn admit(&mut self, now: Millis, actions: &mut Vec<Action>) {
        while (self.live.len() as u32) < self.config.max_concurrent {
            let Some(session_key) = self.ready.pop_front() else {
                break;
            };
            let Some(session) = self.sessions.get_mut(&session_key) else {
                continue;
            };
            if session.active.is_some() {
                continue;
            }
            let Some(task_id) = session.queue.pop_front() else {
                continue;
            };
            session.active = Some(task_id);
            let Some(task) = self.tasks.get_mut(&task_id) else {
                continue;
            };
            task.state = TaskState::Starting { pid: None };
            task.started_at = Some(now);
            self.live.insert(task_id);
            actions.push(Action::Spawn {
                task_id,
                session: session_key,
                text: task.text.clone(),
            });
        }
    }

    /// Checks the structural invariants listed in the module docs.
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.live.len() as u32 > self.config.max_concurrent {
            return Err(format!(
                "{} live agents exceed the cap of {}",
                self.live.len(),
                self.config.max_concurrent
            ));
        }
        if (self.live.len() as u32) < self.config.max_concurrent && !self.ready.is_empty() {
            return Err(format!(
                "a slot is free while {} sessions wait",
                self.ready.len()
            ));
        }
        let mut seen_ready = std::collections::HashSet::new();
        for key in &self.ready {
            if !seen_ready.insert(key) {
                return Err(format!("session {key} is in the ready ring twice"));
            }
        }
        for (key, session) in &self.sessions {
            if session.active.is_none() && session.queue.is_empty() {
                return Err(format!("idle empty session {key} kept"));
            }
            let should_be_ready = session.active.is_none() && !session.queue.is_empty();
            if should_be_ready != seen_ready.contains(key) {
                return Err(format!(
                    "session {key}: ready ring membership is {}",
                    !should_be_ready
                ));
            }
            if let Some(active) = session.active {
                let task = self
                    .tasks
                    .get(&active)
                    .ok_or(format!("session {key} claimed by a gone task"))?;
                if !task.state.is_active() || &task.session != key {
                    return Err(format!(
                        "session {key} claimed by {active}, which is {:?}",
                        task.state
                    ));
                }
                if !self.live.contains(&active) {
                    return Err(format!("active task {active} holds no slot"));
                }
            }
            for queued in &session.queue {
                match self.tasks.get(queued) {
                    Some(t) if t.state == TaskState::Queued && &t.session == key => {}
                    other => return Err(format!("queue of {key} holds {queued}: {other:?}")),
                }
            }
        }
        for key in &self.ready {
            if !self.sessions.contains_key(key) {
                return Err(format!("ready ring names unknown session {key}"));
            }
        }
        for task in self.tasks.values() {
            let session = self
                .sessions
                .get(&task.session)
                .ok_or(format!("task {} has no session", task.id))?;
            let listed = match task.state {
                TaskState::Queued => session.queue.contains(&task.id),
                TaskState::Done { .. } => {
                    return Err(format!("finished task {} still in the hot map", task.id))
                }
                _ => session.active == Some(task.id),
            };
            if !listed {
                return Err(format!(
                    "task {} ({:?}) is not where its state says",
                    task.id, task.state
                ));
            }
        }
        let n_active = self.tasks.values().filter(|t| t.state.is_active()).count();
        if n_active != self.live.len() {
            return Err(format!(
                "{n_active} active tasks but {} live slots",
                self.live.len()
            ));
        }
        Ok(())
    }
}

/// How an active task ended, given how its agent exited.
fn ending_of(task: &Task, status: ExitStatus, now: Millis) -> Ending {
    if let Some(error) = &task.protocol_error {
        return Ending::Failed {
            reason: format!("agent broke the protocol: {error}"),
        };
    }
    if let TaskState::Stopping {
        step, requested_at, ..
    } = task.state
    {
        return Ending::Cancelled {
            by: Some(step),
            after: now.since(requested_at),
        };
    }
    match &task.report {
        Some(AgentReport {
            outcome: ReportOutcome::Succeeded,
            ..
        }) if status.success() => Ending::Succeeded,
        Some(AgentReport {
            outcome: ReportOutcome::Succeeded,
            ..
        }) => Ending::Failed {
            reason: format!(
                "agent reported success but exited with {}",
                status.describe()
            ),
        },
        Some(AgentReport {
            outcome: ReportOutcome::Failed,
            command_exit,
            ..
        }) => Ending::Failed {
            reason: match command_exit {
                Some(exit) => format!("command failed with {}", exit.describe()),
                None => "agent reported failure".to_string(),
            },
        },
        Some(AgentReport {
            outcome: ReportOutcome::Cancelled,
            ..
        }) => Ending::Cancelled {
            by: None,
            after: Duration::ZERO,
        },
        None => Ending::Failed {
            reason: format!(
                "agent exited without reporting a result ({})",
                status.describe()
            ),
        },
    }
}
