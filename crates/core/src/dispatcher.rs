//! [`Dispatcher`]: the per-session lanes, queue modes, the global lane with its
//! priority classes, and the stop sequence.
//!
//! **Invariants** (checked by [`Dispatcher::check_invariants`] in the tests):
//! - at most one task per session is active (starting, running or stopping), and it is
//!   the one recorded as the session's claim;
//! - `live` (agents ordered spawned and not yet reaped) never exceeds `max_concurrent`,
//!   and live background tasks never exceed `max_background`;
//! - a session is in a ready ring exactly when it has queued work, no active task and
//!   no debounce pending, once, in the ring of its next task's priority: admission
//!   is round-robin across ready sessions, interactive before background;
//! - no slot is idle while an admissible session waits;
//! - a claim is released only by the end of the task that holds it (compare, then
//!   release);
//! - a session with no queued work and no active task has no entry at all, and a
//!   task leaves every map the moment [`Action::Finished`] is emitted; the only
//!   per-session state that outlives the work is a session's own queue settings
//!   (set explicitly) and the bounded de-duplication window.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

use crate::queue::{self, DropPolicy, Mode, Priority, QueueSettings};
use crate::task::{
    AgentReport, Ending, ExitStatus, Millis, ReportOutcome, StopCause, StopStep, Task, TaskId,
    TaskState,
};

/// Limits, graces and defaults the dispatcher decides with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Most agent processes alive at once.
    pub max_concurrent: u32,
    /// Most background agent processes alive at once (`None`: only `max_concurrent`).
    pub max_background: Option<u32>,
    /// Time between the cooperative cancel and SIGTERM.
    pub cancel_grace: Duration,
    /// Time between SIGTERM and SIGKILL.
    pub term_grace: Duration,
    /// Queue settings of sessions that have none of their own.
    pub queue: QueueSettings,
    /// Most queued tasks across all sessions; past it new work is refused.
    pub max_queued: u32,
    /// Queued tasks older than this expire (`None`: never).
    pub queue_timeout: Option<Duration>,
    /// How many `(session, message_id)` pairs are remembered for de-duplication.
    pub dedup_window: usize,
    /// Whether the agent wants several held messages merged into one prompt (IPC
    /// `AgentFeatures::collected_prompts`; LLM agents do, a shell command does not).
    /// Without it a `collect` session is drained as `followup`: each held message
    /// runs as its own task.
    pub collected_prompts: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            max_concurrent: 2,
            max_background: None,
            cancel_grace: Duration::from_secs(5),
            term_grace: Duration::from_secs(5),
            queue: QueueSettings::default(),
            max_queued: 1000,
            queue_timeout: None,
            dedup_window: 10_000,
            collected_prompts: true,
        }
    }
}

/// Something that happened, reported by the daemon.
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
    /// The exit grace armed by [`Action::SetExitGrace`] elapsed.
    ExitGraceOver {
        task_id: TaskId,
    },
    /// A debounce timer armed by [`Action::SetDebounce`] elapsed.
    Debounce {
        session: String,
        generation: u64,
    },
    /// Time passed (the daemon ticks regularly): queued work may expire.
    Tick,
}

/// Something the daemon must do.
// `Finished` carries the whole task. Actions live only for one decision's batch, so
// the size difference costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
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
    /// Deliver a message into the running task over its IPC channel.
    Steer { task_id: TaskId, text: String },
    /// Signal the task's process tree (`Sigterm` or `Sigkill`).
    Signal { task_id: TaskId, step: StopStep },
    /// Feed back `Event::StopTimer { task_id, step }` after `after`.
    SetTimer {
        task_id: TaskId,
        after: Duration,
        step: StopStep,
    },
    /// The agent reported its result and should exit: feed back
    /// `Event::ExitGraceOver { task_id }` after `after`. A timer of its own, so that
    /// it cannot be taken for a stop's timer when a stop comes in between.
    SetExitGrace { task_id: TaskId, after: Duration },
    /// Feed back `Event::Debounce { session, generation }` after `after`.
    SetDebounce {
        session: String,
        after: Duration,
        generation: u64,
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

/// A work message for a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The id the message's task gets (the daemon makes it).
    pub task_id: TaskId,
    pub session: String,
    pub text: String,
    /// The bridge's id for de-duplication of re-deliveries.
    pub message_id: Option<String>,
    pub priority: Priority,
    /// This message's mode, overriding the session's (a `/queue <mode>` prefix).
    pub mode: Option<Mode>,
}

impl Message {
    /// An interactive message with the session's mode and no bridge id.
    pub fn new(task_id: TaskId, session: impl Into<String>, text: impl Into<String>) -> Message {
        Message {
            task_id,
            session: session.into(),
            text: text.into(),
            message_id: None,
            priority: Priority::Interactive,
            mode: None,
        }
    }
}

/// What became of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// The message is a task: started, queued, or (steered) merged into the running
    /// task. `dropped` are held messages that overflow removed to make room;
    /// `notice` tells the sender about a fallback or an interrupt.
    Task {
        task_id: TaskId,
        steered_into: Option<TaskId>,
        dropped: Vec<TaskId>,
        notice: Option<String>,
    },
    /// A re-delivery of a message already accepted: nothing new happened.
    Duplicate { task_id: TaskId },
}

/// Why a message was refused. Nothing was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The daemon-wide queue limit is reached.
    QueueFull { limit: u32 },
    /// The session's cap is reached and its drop policy is `new`.
    SessionFull { cap: u32 },
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
    /// Queued tasks in the order they will run.
    queue: VecDeque<TaskId>,
    /// The task that holds this session's lane.
    active: Option<TaskId>,
    /// Set while waiting for quiet before a follow-up; the generation of the timer
    /// that may end the wait (a newer message arms a newer one).
    debounce: Option<u64>,
    /// Previews of messages dropped with `drop: summarize`, for the next follow-up.
    dropped_previews: Vec<String>,
}

/// The dispatcher state machine. See the module docs for its invariants.
#[derive(Debug)]
pub struct Dispatcher {
    config: Config,
    tasks: HashMap<TaskId, Task>,
    sessions: HashMap<String, Session>,
    /// Sessions whose next task is interactive, ready to run, in admission order.
    ready: VecDeque<String>,
    /// The same for background work.
    ready_background: VecDeque<String>,
    /// Tasks whose agent was ordered spawned and is not yet reaped.
    live: BTreeSet<TaskId>,
    /// Sessions' own queue settings (only those set with `/queue`).
    settings: HashMap<String, QueueSettings>,
    /// Recently seen `(session, message_id)` pairs and their tasks, oldest first.
    seen: HashMap<(String, String), TaskId>,
    seen_order: VecDeque<(String, String)>,
    debounce_generation: u64,
}

impl Dispatcher {
    pub fn new(config: Config) -> Dispatcher {
        Dispatcher {
            config,
            tasks: HashMap::new(),
            sessions: HashMap::new(),
            ready: VecDeque::new(),
            ready_background: VecDeque::new(),
            live: BTreeSet::new(),
            settings: HashMap::new(),
            seen: HashMap::new(),
            seen_order: VecDeque::new(),
            debounce_generation: 0,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// What the daemon learned of its agent (see [`Config::collected_prompts`]): it
    /// applies to runs that start from now on.
    pub fn set_collected_prompts(&mut self, wanted: bool) {
        self.config.collected_prompts = wanted;
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

    /// The queue settings in force for a session.
    pub fn settings(&self, session: &str) -> QueueSettings {
        self.settings
            .get(session)
            .copied()
            .unwrap_or(self.config.queue)
    }

    /// True when the session has settings of its own.
    pub fn has_own_settings(&self, session: &str) -> bool {
        self.settings.contains_key(session)
    }

    /// Admission order of every queued task (1 = admitted next).
    ///
    /// Sessions take turns: first the ready sessions in ring order (interactive, then
    /// background), then the sessions that are busy or waiting for quiet (they join
    /// the ring later), in the order their runs started. Round `r` admits the `r`-th
    /// queued task of each. It is an estimate: collected messages merge when they run.
    pub fn positions(&self) -> HashMap<TaskId, u32> {
        let mut order: Vec<&Session> = self
            .ready
            .iter()
            .chain(self.ready_background.iter())
            .filter_map(|s| self.sessions.get(s))
            .collect();
        let in_ring: HashSet<&String> = self
            .ready
            .iter()
            .chain(self.ready_background.iter())
            .collect();
        // Busy or quiet-waiting sessions, in the order their runs started (then by name).
        let mut waiting: Vec<(&String, &Session)> = self
            .sessions
            .iter()
            .filter(|(key, s)| !s.queue.is_empty() && !in_ring.contains(key))
            .collect();
        waiting.sort_by_key(|(key, s)| {
            let started = s
                .active
                .and_then(|t| self.tasks.get(&t))
                .map(|t| (t.started_at, t.id));
            (started, *key)
        });
        order.extend(waiting.into_iter().map(|(_, s)| s));

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

    // ----- settings -----

    /// Gives a session its own queue settings.
    pub fn set_settings(&mut self, session: &str, settings: QueueSettings) {
        self.settings.insert(session.to_string(), settings);
    }

    /// Puts a session back on the daemon's default settings.
    pub fn reset_settings(&mut self, session: &str) {
        self.settings.remove(session);
    }

    // ----- inputs -----

    /// A plain interactive message with the session's mode (see [`Dispatcher::accept`]).
    /// Refusals (queue limits) and duplicates cannot happen without limits and ids;
    /// if they do, the returned actions are empty.
    pub fn submit(
        &mut self,
        task_id: TaskId,
        session: String,
        text: String,
        now: Millis,
    ) -> Submitted {
        let (_, actions) = self.accept(Message::new(task_id, session, text), now);
        Submitted { task_id, actions }
    }

    /// A work message arrives for a session: de-duplicated, then steered, queued (with
    /// the session's cap and drop policy, and the global queue limit) or started.
    pub fn accept(&mut self, msg: Message, now: Millis) -> (Result<Accepted, Refused>, Actions) {
        let mut actions = Vec::new();
        if let Some(message_id) = &msg.message_id {
            if let Some(&task_id) = self.seen.get(&(msg.session.clone(), message_id.clone())) {
                return (Ok(Accepted::Duplicate { task_id }), Actions(actions));
            }
        }
        let settings = self.settings(&msg.session);
        let mut mode = msg.mode.unwrap_or(settings.mode);
        let mut notice = None;

        // What the running task (if any) can take.
        let active = self
            .sessions
            .get(&msg.session)
            .and_then(|s| s.active)
            .and_then(|t| self.tasks.get(&t));
        let active_id = active.map(|t| t.id);
        let steerable = matches!(
            active.map(|t| &t.state),
            Some(TaskState::Running { steer: true, .. })
        );
        let mut steer_into = None;
        if matches!(mode, Mode::Steer | Mode::SteerBacklog) {
            match (active, steerable) {
                (None, _) => mode = Mode::Followup,
                (Some(_), true) => steer_into = active_id,
                (Some(t), false) => {
                    notice = Some(match t.state {
                        TaskState::Running { .. } => format!(
                            "the agent of task {} does not accept steering: the message is queued as a follow-up",
                            t.id
                        ),
                        _ => format!(
                            "task {} is not running yet (or is stopping): the message is queued as a follow-up",
                            t.id
                        ),
                    });
                    mode = Mode::Followup;
                }
            }
        }

        // Steer only: the message goes into the running task and ends there.
        if let (Mode::Steer, Some(into)) = (mode, steer_into) {
            actions.push(Action::Steer {
                task_id: into,
                text: msg.text.clone(),
            });
            let task = self.new_task(&msg, mode, now);
            self.remember(&msg, task.id);
            actions.push(Action::Finished(Task {
                state: TaskState::Done {
                    ending: Ending::Merged { into },
                    exit: None,
                },
                finished_at: Some(now),
                ..task
            }));
            let accepted = Accepted::Task {
                task_id: msg.task_id,
                steered_into: Some(into),
                dropped: vec![],
                notice,
            };
            return (Ok(accepted), Actions(actions));
        }

        // Everything else is queued: check the limits first, so a refusal changes nothing.
        // The global limit counts what waits: not a message that starts at once, nor
        // one that takes the place of a held message dropped for it.
        let held = self.sessions.get(&msg.session).map_or(0, |s| s.queue.len());
        let makes_room = held as u32 >= settings.cap.max(1) && settings.drop != DropPolicy::New;
        if !makes_room
            && !self.starts_at_once(&msg.session, msg.priority)
            && self.n_queued() as u32 >= self.config.max_queued
        {
            return (
                Err(Refused::QueueFull {
                    limit: self.config.max_queued,
                }),
                Actions::none(),
            );
        }
        let mut dropped = Vec::new();
        if held as u32 >= settings.cap.max(1) {
            if settings.drop == DropPolicy::New {
                return (
                    Err(Refused::SessionFull { cap: settings.cap }),
                    Actions::none(),
                );
            }
            let overflow = held + 1 - settings.cap.max(1) as usize;
            for _ in 0..overflow {
                if let Some(old) = self.drop_oldest(&msg.session, settings.drop, now, &mut actions)
                {
                    dropped.push(old);
                }
            }
        }
        if let Some(into) = steer_into {
            // steer-backlog: deliver now, and keep the message as its own follow-up.
            actions.push(Action::Steer {
                task_id: into,
                text: msg.text.clone(),
            });
            mode = Mode::Followup;
        }
        let task = self.new_task(&msg, mode, now);
        self.remember(&msg, task.id);
        self.tasks.insert(task.id, task);
        let session = self.sessions.entry(msg.session.clone()).or_default();
        if mode == Mode::Interrupt {
            // Runs next: ahead of whatever else the session holds.
            session.queue.push_front(msg.task_id);
            session.debounce = None;
            if let Some(active) = active_id {
                if self.begin_stop(active, now, StopCause::Interrupt, &mut actions) {
                    notice = Some(format!(
                        "interrupting task {active}: this message runs next"
                    ));
                }
            }
        } else {
            session.queue.push_back(msg.task_id);
            if let Some(generation) = session.debounce {
                // A new message during the quiet window starts the window again.
                let _ = generation;
                self.arm_debounce(&msg.session, settings.debounce, &mut actions);
            }
        }
        self.refresh_ready(&msg.session);
        self.admit(now, &mut actions);
        let accepted = Accepted::Task {
            task_id: msg.task_id,
            steered_into: steer_into,
            dropped,
            notice,
        };
        (Ok(accepted), Actions(actions))
    }

    /// A message accepted earlier comes back: a steer its agent refused. It is queued
    /// as a follow-up of its session, past the session's cap and the daemon-wide
    /// limit: refusing it now would lose a message whose sender was told it was
    /// taken. (Only a steer-capable running agent can send one back, once per
    /// message steered into it.)
    pub fn requeue(&mut self, msg: Message, now: Millis) -> Actions {
        let mut actions = Vec::new();
        let task = self.new_task(&msg, Mode::Followup, now);
        self.tasks.insert(task.id, task);
        self.sessions
            .entry(msg.session.clone())
            .or_default()
            .queue
            .push_back(msg.task_id);
        self.refresh_ready(&msg.session);
        self.admit(now, &mut actions);
        Actions(actions)
    }

    /// True if a message for `session` would be admitted right away: the session is
    /// idle with nothing held, and a slot its priority class may use is free.
    fn starts_at_once(&self, session: &str, priority: Priority) -> bool {
        let idle = self
            .sessions
            .get(session)
            .is_none_or(|s| s.active.is_none() && s.debounce.is_none() && s.queue.is_empty());
        let slot_free = (self.live.len() as u32) < self.config.max_concurrent;
        idle && slot_free
            && match priority {
                Priority::Interactive => true,
                Priority::Background => self.ready.is_empty() && self.background_admissible(),
            }
    }

    fn new_task(&self, msg: &Message, mode: Mode, now: Millis) -> Task {
        Task {
            id: msg.task_id,
            session: msg.session.clone(),
            text: msg.text.clone(),
            state: TaskState::Queued,
            created_at: now,
            started_at: None,
            finished_at: None,
            progress: None,
            report: None,
            priority: msg.priority,
            mode,
            message_id: msg.message_id.clone(),
        }
    }

    fn remember(&mut self, msg: &Message, task_id: TaskId) {
        let Some(message_id) = &msg.message_id else {
            return;
        };
        let key = (msg.session.clone(), message_id.clone());
        if self.seen.insert(key.clone(), task_id).is_none() {
            self.seen_order.push_back(key);
        }
        while self.seen_order.len() > self.config.dedup_window {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
        }
    }

    /// Drops the session's oldest held message on overflow.
    fn drop_oldest(
        &mut self,
        session: &str,
        policy: DropPolicy,
        now: Millis,
        actions: &mut Vec<Action>,
    ) -> Option<TaskId> {
        let s = self.sessions.get_mut(session)?;
        let task_id = s.queue.pop_front()?;
        let task = self.tasks.remove(&task_id)?;
        if policy == DropPolicy::Summarize {
            s.dropped_previews.push(queue::preview(&task.text));
        }
        actions.push(Action::Finished(Task {
            state: TaskState::Done {
                ending: Ending::Dropped,
                exit: None,
            },
            finished_at: Some(now),
            ..task
        }));
        Some(task_id)
    }

    fn arm_debounce(&mut self, session: &str, after: Duration, actions: &mut Vec<Action>) {
        self.debounce_generation += 1;
        let generation = self.debounce_generation;
        if let Some(s) = self.sessions.get_mut(session) {
            s.debounce = Some(generation);
            actions.push(Action::SetDebounce {
                session: session.to_string(),
                after,
                generation,
            });
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
                        // Done, so it should exit now: after `cancel_grace` it is
                        // stopped from SIGTERM on, keeping the outcome it reported.
                        if let TaskState::Running { .. } = task.state {
                            actions.push(Action::SetExitGrace {
                                task_id,
                                after: self.config.cancel_grace,
                            });
                        }
                    }
                }
            }
            Event::ProtocolError { task_id, error } => {
                if let Some(task) = self.tasks.get_mut(&task_id).filter(|t| t.state.is_active()) {
                    // Once agentd has signalled the agent, its channel breaking is the
                    // end it was sent, not a protocol error: an agent killed with
                    // agentd's Cancel unread (it was SIGSTOPped, say) resets its
                    // channel as it dies. The stop in progress owns the outcome.
                    if matches!(&task.state, TaskState::Stopping { step, .. } if *step >= StopStep::Sigterm)
                    {
                        return Actions(actions);
                    }
                    let cause = StopCause::ProtocolError(error);
                    match &mut task.state {
                        TaskState::Stopping {
                            step,
                            cause: current,
                            ..
                        } => {
                            current.escalate(cause);
                            *step = StopStep::Sigkill;
                        }
                        state => {
                            *state = TaskState::Stopping {
                                pid: state.pid(),
                                step: StopStep::Sigkill,
                                requested_at: now,
                                cause,
                            };
                        }
                    }
                    actions.push(Action::Signal {
                        task_id,
                        step: StopStep::Sigkill,
                    });
                }
            }
            Event::ExitGraceOver { task_id } => {
                if let Some(task) = self.tasks.get_mut(&task_id) {
                    // A running agent that reported its result and did not exit in
                    // time lingers: it is stopped, from SIGTERM on. One stopped in the
                    // meantime keeps the graces of that stop.
                    if let (TaskState::Running { pid, .. }, Some(_)) = (&task.state, &task.report) {
                        task.state = TaskState::Stopping {
                            pid: Some(*pid),
                            step: StopStep::Sigterm,
                            requested_at: now,
                            cause: StopCause::Linger,
                        };
                        actions.push(Action::Signal {
                            task_id,
                            step: StopStep::Sigterm,
                        });
                        actions.push(Action::SetTimer {
                            task_id,
                            after: self.config.term_grace,
                            step: StopStep::Sigkill,
                        });
                    }
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
            Event::Debounce {
                session,
                generation,
            } => {
                if let Some(s) = self.sessions.get_mut(&session) {
                    if s.debounce == Some(generation) {
                        s.debounce = None;
                        self.refresh_ready(&session);
                        self.admit(now, &mut actions);
                    }
                }
            }
            Event::Tick => {
                if let Some(timeout) = self.config.queue_timeout {
                    let mut expired: Vec<&Task> = self
                        .tasks
                        .values()
                        .filter(|t| {
                            t.state == TaskState::Queued && now.since(t.created_at) >= timeout
                        })
                        .collect();
                    expired.sort_by_key(|t| (t.created_at, t.id));
                    let expired: Vec<TaskId> = expired.into_iter().map(|t| t.id).collect();
                    for task_id in expired {
                        self.remove_queued(task_id, Ending::Expired, now, &mut actions);
                    }
                    self.admit(now, &mut actions);
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
                let ending = Ending::Cancelled {
                    by: None,
                    after: Duration::ZERO,
                };
                self.remove_queued(task_id, ending, now, &mut actions);
            }
        }
        for &task_id in &targets {
            self.begin_stop(task_id, now, StopCause::User, &mut actions);
        }
        self.admit(now, &mut actions);
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

    /// Begins the stop sequence of an active task for `cause`. Returns false if it was
    /// not active or is already stopping (a stop in progress keeps its cause: user
    /// stops and interrupts are the weakest).
    fn begin_stop(
        &mut self,
        task_id: TaskId,
        now: Millis,
        cause: StopCause,
        actions: &mut Vec<Action>,
    ) -> bool {
        let Some(task) = self.tasks.get_mut(&task_id) else {
            return false;
        };
        let pid = match task.state {
            TaskState::Starting { pid } => pid,
            TaskState::Running { pid, .. } => Some(pid),
            // Already stopping (answered when it ends), queued (handled), or done.
            _ => return false,
        };
        task.state = TaskState::Stopping {
            pid,
            step: StopStep::CooperativeCancel,
            requested_at: now,
            cause,
        };
        actions.push(Action::SendCancel { task_id });
        actions.push(Action::SetTimer {
            task_id,
            after: self.config.cancel_grace,
            step: StopStep::Sigterm,
        });
        true
    }

    /// Takes a queued task out of its session's queue and ends it.
    fn remove_queued(
        &mut self,
        task_id: TaskId,
        ending: Ending,
        now: Millis,
        actions: &mut Vec<Action>,
    ) {
        let Some(task) = self.tasks.remove(&task_id) else {
            return;
        };
        if let Some(session) = self.sessions.get_mut(&task.session) {
            session.queue.retain(|t| *t != task_id);
        }
        self.refresh_ready(&task.session);
        self.prune(&task.session);
        actions.push(Action::Finished(Task {
            state: TaskState::Done { ending, exit: None },
            finished_at: Some(now),
            ..task
        }));
    }

    /// Ends the active task: records its ending, releases its slot and its session's
    /// claim (only if it holds it), and admits the next work, after the session's
    /// quiet time when it holds follow-ups.
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
        let session_key = task.session.clone();
        let mut debounce = None;
        if let Some(session) = self.sessions.get_mut(&session_key) {
            if session.active == Some(task_id) {
                session.active = None;
                let next_interrupts = session
                    .queue
                    .front()
                    .and_then(|t| self.tasks.get(t))
                    .is_some_and(|t| t.mode == Mode::Interrupt);
                let quiet = self
                    .settings
                    .get(&session_key)
                    .copied()
                    .unwrap_or(self.config.queue)
                    .debounce;
                if !session.queue.is_empty() && !next_interrupts && !quiet.is_zero() {
                    debounce = Some(quiet);
                }
            }
        }
        actions.push(Action::Finished(Task {
            state: TaskState::Done { ending, exit },
            finished_at: Some(now),
            ..task
        }));
        if let Some(after) = debounce {
            self.arm_debounce(&session_key, after, actions);
        }
        self.refresh_ready(&session_key);
        self.prune(&session_key);
        self.admit(now, actions);
    }

    /// Removes a session's entry once it holds nothing.
    fn prune(&mut self, session: &str) {
        if self
            .sessions
            .get(session)
            .is_some_and(|s| s.active.is_none() && s.queue.is_empty())
        {
            self.sessions.remove(session);
        }
    }

    /// Puts a session in the ready ring it belongs in (keeping its place if it is
    /// already there) or takes it out of both.
    fn refresh_ready(&mut self, session: &str) {
        let wanted = self.sessions.get(session).and_then(|s| {
            let ready = s.active.is_none() && s.debounce.is_none();
            let next = s.queue.front().and_then(|t| self.tasks.get(t))?;
            ready.then_some(next.priority)
        });
        let in_interactive = self.ready.iter().any(|s| s == session);
        let in_background = self.ready_background.iter().any(|s| s == session);
        match wanted {
            Some(Priority::Interactive) if in_interactive => {}
            Some(Priority::Background) if in_background => {}
            _ => {
                self.ready.retain(|s| s != session);
                self.ready_background.retain(|s| s != session);
                match wanted {
                    Some(Priority::Interactive) => self.ready.push_back(session.to_string()),
                    Some(Priority::Background) => {
                        self.ready_background.push_back(session.to_string())
                    }
                    None => {}
                }
            }
        }
    }

    fn n_live_background(&self) -> u32 {
        self.live
            .iter()
            .filter(|t| {
                self.tasks
                    .get(t)
                    .is_some_and(|t| t.priority == Priority::Background)
            })
            .count() as u32
    }

    fn background_admissible(&self) -> bool {
        self.config
            .max_background
            .is_none_or(|max| self.n_live_background() < max)
    }

    /// Admits ready sessions round-robin while live agents are below the cap:
    /// interactive sessions first, then background ones within their own cap.
    fn admit(&mut self, now: Millis, actions: &mut Vec<Action>) {
        while (self.live.len() as u32) < self.config.max_concurrent {
            let session_key = match self.ready.pop_front() {
                Some(key) => key,
                None if self.background_admissible() => match self.ready_background.pop_front() {
                    Some(key) => key,
                    None => break,
                },
                None => break,
            };
            self.start_next(&session_key, now, actions);
        }
    }

    /// Starts the session's next task; collected messages right behind it join it.
    fn start_next(&mut self, session_key: &str, now: Millis, actions: &mut Vec<Action>) {
        let Some(session) = self.sessions.get_mut(session_key) else {
            return;
        };
        if session.active.is_some() {
            return;
        }
        let Some(task_id) = session.queue.pop_front() else {
            return;
        };
        let collect = self.config.collected_prompts
            && self
                .tasks
                .get(&task_id)
                .is_some_and(|t| t.mode == Mode::Collect);
        let mut merged = Vec::new();
        if collect {
            while session
                .queue
                .front()
                .and_then(|t| self.tasks.get(t))
                .is_some_and(|t| t.mode == Mode::Collect)
            {
                merged.extend(session.queue.pop_front());
            }
        }
        let previews = std::mem::take(&mut session.dropped_previews);
        session.active = Some(task_id);

        let mut texts: Vec<String> = self
            .tasks
            .get(&task_id)
            .map(|t| vec![t.text.clone()])
            .unwrap_or_default();
        for other in &merged {
            if let Some(task) = self.tasks.remove(other) {
                texts.push(task.text.clone());
                actions.push(Action::Finished(Task {
                    state: TaskState::Done {
                        ending: Ending::Merged { into: task_id },
                        exit: None,
                    },
                    finished_at: Some(now),
                    ..task
                }));
            }
        }
        let Some(task) = self.tasks.get_mut(&task_id) else {
            return;
        };
        let mut text = queue::collected_text(&texts);
        if !previews.is_empty() {
            text = format!("{}\n\n{text}", queue::overflow_text(&previews));
        }
        task.text = text.clone();
        task.state = TaskState::Starting { pid: None };
        task.started_at = Some(now);
        self.live.insert(task_id);
        actions.push(Action::Spawn {
            task_id,
            session: session_key.to_string(),
            text,
        });
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
        if let Some(max) = self.config.max_background {
            if self.n_live_background() > max {
                return Err(format!(
                    "{} live background agents exceed {max}",
                    self.n_live_background()
                ));
            }
        }
        let slot_free = (self.live.len() as u32) < self.config.max_concurrent;
        if slot_free
            && (!self.ready.is_empty()
                || (!self.ready_background.is_empty() && self.background_admissible()))
        {
            return Err("a slot is free while an admissible session waits".to_string());
        }
        let mut seen_ready = HashSet::new();
        for key in self.ready.iter().chain(self.ready_background.iter()) {
            if !seen_ready.insert(key) {
                return Err(format!("session {key} is in the ready rings twice"));
            }
            if !self.sessions.contains_key(key) {
                return Err(format!("ready ring names unknown session {key}"));
            }
        }
        for (key, session) in &self.sessions {
            if session.active.is_none() && session.queue.is_empty() {
                return Err(format!("idle empty session {key} kept"));
            }
            let next = session.queue.front().and_then(|t| self.tasks.get(t));
            let should_be_ready =
                session.active.is_none() && session.debounce.is_none() && next.is_some();
            if should_be_ready != seen_ready.contains(key) {
                return Err(format!(
                    "session {key}: ready ring membership is {}",
                    !should_be_ready
                ));
            }
            if let Some(next) = next.filter(|_| should_be_ready) {
                let ring = if next.priority == Priority::Background {
                    &self.ready_background
                } else {
                    &self.ready
                };
                if !ring.contains(key) {
                    return Err(format!("session {key} is in the wrong ready ring"));
                }
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
        if self.seen.len() > self.config.dedup_window || self.seen.len() != self.seen_order.len() {
            return Err(format!(
                "de-duplication window holds {} entries",
                self.seen.len()
            ));
        }
        Ok(())
    }
}

/// How an active task ended, given how its agent exited. A stop in progress owns
/// the outcome, by its cause.
fn ending_of(task: &Task, status: ExitStatus, now: Millis) -> Ending {
    if let TaskState::Stopping {
        step,
        requested_at,
        cause,
        ..
    } = &task.state
    {
        let by = Some(*step);
        let after = now.since(*requested_at);
        match (cause, &task.report) {
            (StopCause::ProtocolError(error), _) => {
                return Ending::Failed {
                    reason: format!("agent broke the protocol: {error}"),
                }
            }
            // It reported, then had to be stopped for not exiting: what it reported
            // stands.
            (StopCause::Linger, Some(report)) => {
                return match report.outcome {
                    ReportOutcome::Succeeded => Ending::Succeeded,
                    ReportOutcome::Failed => Ending::Failed {
                        reason: "agent reported failure (and was stopped for not exiting)"
                            .to_string(),
                    },
                    ReportOutcome::Cancelled => Ending::Cancelled {
                        by: None,
                        after: Duration::ZERO,
                    },
                }
            }
            (StopCause::Interrupt, _) => return Ending::Interrupted { by, after },
            (
                StopCause::User
                | StopCause::Linger
                | StopCause::Hung
                | StopCause::TimedOut
                | StopCause::Shutdown,
                _,
            ) => return Ending::Cancelled { by, after },
        }
    }
    if let TaskState::Starting { .. } = task.state {
        return Ending::Failed {
            reason: format!(
                "agent exited before its handshake ({}); is the agent command an agentd agent such as agent-exec?",
                status.describe()
            ),
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
