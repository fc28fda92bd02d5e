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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::time::Duration;

use crate::order::{self, OrderKey, PositionIndex, RankedMap};
use crate::queue::{self, DropPolicy, Mode, Priority, QueueSettings};
use crate::task::{
    AgentReport, Ending, ExitStatus, Interruption, Millis, ReportOutcome, StopCause, StopStep,
    Task, TaskId, TaskState,
};

/// The dispatcher's hash tables: foldhash instead of std's SipHash, whose hashing was
/// 8% of the loop's instructions per accepted message (callgrind, 64 clients: a task
/// id is hashed about ten times per message). Seeded per table, as std's are.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

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
    /// The agent sent nothing for longer than the silence limit (see
    /// [`crate::Liveness`]): it is stopped with [`StopCause::Hung`] and fails as
    /// `hung`. Ignored for an agent that already reported (it lingers instead) and
    /// for a task already stopping (that stop owns the outcome).
    Hung {
        task_id: TaskId,
    },
    /// The task ran past its run-time limit: it is stopped with
    /// [`StopCause::TimedOut`] and fails as `timed out` (ignored for a task already
    /// stopping).
    TimedOut {
        task_id: TaskId,
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
    /// Queued tasks in the order they will run, by their place in line (see
    /// [`Queued`]): ranked, so a task's index in its session costs O(log n).
    queue: RankedMap<i64, TaskId>,
    /// The next place in line behind the last task (and the one ahead of the first).
    next_back: i64,
    next_front: i64,
    /// The ready ring this session is in, and its place there.
    ring: Option<(Priority, u64)>,
    /// The key under which the session is in the position index (with its queue's
    /// length), if it has queued work.
    indexed: Option<OrderKey>,
    /// The task that holds this session's lane.
    active: Option<TaskId>,
    /// Set while waiting for quiet before a follow-up; the generation of the timer
    /// that may end the wait (a newer message arms a newer one).
    debounce: Option<u64>,
    /// Previews of the first messages dropped with `drop: summarize` (at most
    /// [`queue::MAX_PREVIEWS`]), for the next follow-up, and how many were dropped.
    dropped_previews: Vec<String>,
    dropped: u64,
}

/// Where every queued task is: its place in its session's line and its age.
#[derive(Debug, Default)]
struct Queued {
    /// Bumped by every change that can move a queued task's position (see
    /// [`Dispatcher::order_version`]).
    version: u64,
    place: Map<TaskId, (i64, Millis)>,
    /// Queued tasks, oldest first (for expiry and for stopping everything).
    by_age: BTreeSet<(Millis, TaskId)>,
}

impl Session {
    fn front(&self) -> Option<TaskId> {
        self.queue.first().map(|(_, t)| *t)
    }

    fn n_queued(&self) -> usize {
        self.queue.len()
    }

    fn queued(&self) -> impl Iterator<Item = TaskId> + '_ {
        self.queue.iter().map(|(_, t)| *t)
    }

    fn push_back(&mut self, queued: &mut Queued, task_id: TaskId, created_at: Millis) {
        let place = self.next_back;
        self.next_back += 1;
        self.enter(queued, task_id, created_at, place);
    }

    fn push_front(&mut self, queued: &mut Queued, task_id: TaskId, created_at: Millis) {
        self.next_front -= 1;
        let place = self.next_front;
        self.enter(queued, task_id, created_at, place);
    }

    fn enter(&mut self, queued: &mut Queued, task_id: TaskId, created_at: Millis, place: i64) {
        queued.version += 1;
        self.queue.insert(place, task_id);
        queued.place.insert(task_id, (place, created_at));
        queued.by_age.insert((created_at, task_id));
    }

    fn pop_front(&mut self, queued: &mut Queued) -> Option<TaskId> {
        let task_id = self.front()?;
        self.remove(queued, task_id);
        Some(task_id)
    }

    fn remove(&mut self, queued: &mut Queued, task_id: TaskId) -> bool {
        let Some((place, created_at)) = queued.place.remove(&task_id) else {
            return false;
        };
        queued.version += 1;
        queued.by_age.remove(&(created_at, task_id));
        self.queue.remove(&place).is_some()
    }
}

/// The dispatcher state machine. See the module docs for its invariants.
#[derive(Debug)]
pub struct Dispatcher {
    config: Config,
    /// Boxed: a table of pointers grows cheaply, and a queued task costs one
    /// allocation of its own size (see `scripts/bench-restart.sh`).
    tasks: Map<TaskId, Box<Task>>,
    sessions: Map<String, Session>,
    /// Sessions whose next task is interactive, ready to run, in admission order (by
    /// when they joined the ring).
    ready: BTreeMap<u64, String>,
    /// The same for background work.
    ready_background: BTreeMap<u64, String>,
    /// Counter of places in the ready rings.
    ring_seq: u64,
    /// Every queued task's place and age.
    queued: Queued,
    /// The admission order of every queued task, kept as sessions change.
    index: PositionIndex,
    /// Tasks whose agent was ordered spawned and is not yet reaped.
    live: BTreeSet<TaskId>,
    /// Live tasks whose agent has as many steered messages unread as the daemon lets
    /// it have ([`Dispatcher::set_steer_backlog_full`]): steers become follow-ups.
    steer_full: BTreeSet<TaskId>,
    /// Sessions' own queue settings (only those set with `/queue`).
    settings: Map<String, QueueSettings>,
    /// Recently seen `(session, message_id)` pairs and their tasks, oldest first.
    seen: Map<(String, String), TaskId>,
    seen_order: VecDeque<(String, String)>,
    /// Hashes of the pairs that have left the window, so that a pair in neither was
    /// never accepted by this dispatcher ([`Dispatcher::may_have_left_window`]);
    /// `None` once more than [`DEPARTED_PER_WINDOW`] windows' worth have left.
    departed: Option<HashSet<u64, foldhash::fast::RandomState>>,
    /// What hashes the pairs in `departed`.
    departed_hash: foldhash::fast::RandomState,
    debounce_generation: u64,
}

/// How many windows' worth of departed message ids [`Dispatcher`] keeps the hashes
/// of (8 bytes and a control byte each: about 1.2 MB for the default window of
/// 10,000) before it stops telling which ones may have left.
const DEPARTED_PER_WINDOW: usize = 10;

impl Dispatcher {
    pub fn new(config: Config) -> Dispatcher {
        Dispatcher {
            config,
            tasks: Map::default(),
            sessions: Map::default(),
            ready: BTreeMap::new(),
            ready_background: BTreeMap::new(),
            ring_seq: 0,
            queued: Queued::default(),
            index: PositionIndex::default(),
            live: BTreeSet::new(),
            steer_full: BTreeSet::new(),
            settings: Map::default(),
            seen: Map::default(),
            seen_order: VecDeque::new(),
            departed: Some(HashSet::default()),
            departed_hash: foldhash::fast::RandomState::default(),
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

    /// Whether the agent of live task `task_id` has as many steered messages it has
    /// not acknowledged as it may have (the daemon counts them): while it does, a
    /// message steered into it is queued as a follow-up instead, with a notice, so
    /// that an agent that does not read its steers cannot make them pile up.
    pub fn set_steer_backlog_full(&mut self, task_id: TaskId, full: bool) {
        if full && self.live.contains(&task_id) {
            self.steer_full.insert(task_id);
        } else {
            self.steer_full.remove(&task_id);
        }
    }

    // ----- queries -----

    /// A task that is queued or active.
    pub fn task(&self, task_id: &TaskId) -> Option<&Task> {
        self.tasks.get(task_id).map(|t| &**t)
    }

    /// Every queued or active task, in no particular order.
    pub fn tasks(&self) -> impl Iterator<Item = &Task> {
        self.tasks.values().map(|t| &**t)
    }

    pub fn capacity(&self) -> Capacity {
        Capacity {
            busy: self.live.len() as u32,
            max: self.config.max_concurrent,
        }
    }

    /// Number of queued tasks, O(1).
    pub fn n_queued(&self) -> usize {
        self.index.n_queued()
    }

    pub fn n_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// The active tasks (starting, running or stopping), by id: O(active).
    pub fn active_tasks(&self) -> impl Iterator<Item = &Task> {
        self.live.iter().filter_map(|t| self.task(t))
    }

    /// A session's queued tasks in the order they will run.
    pub fn queued_tasks_of<'a>(&'a self, session: &str) -> impl Iterator<Item = &'a Task> + 'a {
        self.sessions
            .get(session)
            .into_iter()
            .flat_map(|s| s.queued())
            .filter_map(|t| self.task(&t))
    }

    /// Number of the session's queued tasks, O(1).
    pub fn n_queued_in(&self, session: &str) -> usize {
        self.sessions.get(session).map_or(0, |s| s.queue.len())
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

    /// Admission order of every queued task (1 = admitted next), computed from scratch
    /// in O(n log n): the reference the fast queries are checked against. To list
    /// the whole queue use [`Dispatcher::queued_in_order`]; to learn the position of some
    /// tasks, use [`Dispatcher::position`], [`Dispatcher::positions_of`] or
    /// [`Dispatcher::session_positions`], which cost O(log² n) a task.
    ///
    /// Sessions take turns: first the ready sessions in ring order (interactive, then
    /// background), then the sessions that are busy or waiting for quiet (they join
    /// the ring later), in the order their runs started. Round `r` admits the `r`-th
    /// queued task of each. It is an estimate: collected messages merge when they run.
    pub fn positions(&self) -> HashMap<TaskId, u32> {
        let mut order: Vec<&Session> = self
            .ready
            .values()
            .chain(self.ready_background.values())
            .filter_map(|s| self.sessions.get(s))
            .collect();
        // Busy or quiet-waiting sessions, in the order their runs started (then by name).
        let mut waiting: Vec<(&String, &Session)> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.n_queued() > 0 && s.ring.is_none())
            .collect();
        waiting.sort_by_key(|(key, s)| {
            let started = s
                .active
                .and_then(|t| self.tasks.get(&t))
                .map(|t| (t.started_at, t.id));
            (started, *key)
        });
        order.extend(waiting.into_iter().map(|(_, s)| s));

        let queues: Vec<Vec<TaskId>> = order.iter().map(|s| s.queued().collect()).collect();
        let mut positions = HashMap::new();
        let rounds = queues.iter().map(Vec::len).max().unwrap_or(0);
        let mut next = 1u32;
        for round in 0..rounds {
            for queue in &queues {
                if let Some(task_id) = queue.get(round) {
                    positions.insert(*task_id, next);
                    next += 1;
                }
            }
        }
        positions
    }

    /// Every queued task with its position, in admission order, produced lazily:
    /// O(sessions) to begin, then O(1) a task (the first page of a listing does not
    /// cost the whole queue).
    pub fn queued_in_order(&self) -> impl Iterator<Item = (&Task, u32)> + '_ {
        let mut lanes: VecDeque<order::Iter<'_, i64, TaskId>> = self
            .index
            .keys_in_order()
            .filter_map(|key| self.session_of_key(key))
            .map(|s| s.queue.iter())
            .collect();
        let mut next_position = 0u32;
        std::iter::from_fn(move || loop {
            // One round takes the next task of every lane, in order; a lane that has
            // run out leaves the rotation.
            let mut lane = lanes.pop_front()?;
            if let Some((_, task_id)) = lane.next() {
                lanes.push_back(lane);
                if let Some(task) = self.task(task_id) {
                    next_position += 1;
                    return Some((task, next_position));
                }
            }
        })
    }

    fn session_of_key(&self, key: &OrderKey) -> Option<&Session> {
        let name = match key {
            OrderKey::Ready {
                class: Priority::Interactive,
                seq,
            } => self.ready.get(seq)?,
            OrderKey::Ready {
                class: Priority::Background,
                seq,
            } => self.ready_background.get(seq)?,
            OrderKey::Quiet(name) => name,
            OrderKey::Busy { task, .. } => &self.tasks.get(task)?.session,
        };
        self.sessions.get(name)
    }

    /// A number that changes whenever a queued task's position may have changed (a
    /// task queued or leaving the queue, a session moving in the admission order),
    /// and only then: a watcher of positions need not ask again while it stands.
    pub fn order_version(&self) -> u64 {
        self.queued.version
    }

    /// The position of a queued task (1 = admitted next), O(log² n).
    pub fn position(&self, task_id: &TaskId) -> Option<u32> {
        let task = self.tasks.get(task_id)?;
        if task.state != TaskState::Queued {
            return None;
        }
        let session = self.sessions.get(&task.session)?;
        let key = session.indexed.as_ref()?;
        let (place, _) = self.queued.place.get(task_id)?;
        let idx = session.queue.rank(place);
        Some(self.index.position(key, idx) as u32)
    }

    /// The positions of those of `task_ids` that are queued (for watchers).
    pub fn positions_of<'a>(
        &'a self,
        task_ids: impl IntoIterator<Item = &'a TaskId> + 'a,
    ) -> impl Iterator<Item = (TaskId, u32)> + 'a {
        task_ids
            .into_iter()
            .filter_map(|t| Some((*t, self.position(t)?)))
    }

    /// The positions of a session's queued tasks, in queue order (for watchers):
    /// O(k log² n) for k queued tasks.
    pub fn session_positions(&self, session: &str) -> Vec<(TaskId, u32)> {
        let Some(s) = self.sessions.get(session) else {
            return Vec::new();
        };
        let Some(key) = s.indexed.as_ref() else {
            return Vec::new();
        };
        s.queued()
            .enumerate()
            .map(|(idx, t)| (t, self.index.position(key, idx) as u32))
            .collect()
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
        let backlog_full = active_id.is_some_and(|t| self.steer_full.contains(&t));
        let steerable = !backlog_full
            && matches!(
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
                        TaskState::Running { .. } if backlog_full => format!(
                            "the agent of task {} has not read the messages steered into it yet: the message is queued as a follow-up",
                            t.id
                        ),
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
        let held = self.sessions.get(&msg.session).map_or(0, |s| s.n_queued());
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
        self.tasks.insert(task.id, Box::new(task));
        let session = self.sessions.entry(msg.session.clone()).or_default();
        if mode == Mode::Interrupt {
            // Runs next: ahead of whatever else the session holds.
            session.push_front(&mut self.queued, msg.task_id, now);
            session.debounce = None;
            if let Some(active) = active_id {
                if self.begin_stop(active, now, StopCause::Interrupt, &mut actions) {
                    notice = Some(format!(
                        "interrupting task {active}: this message runs next"
                    ));
                }
            }
        } else {
            session.push_back(&mut self.queued, msg.task_id, now);
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
        self.queue_past_limits(msg, Mode::Followup, now)
    }

    /// A message acknowledged by an earlier agentd comes back from its store but does
    /// not fit the current limits (a smaller `max_queued` or session cap): it is
    /// queued anyway, in its mode (`collect` or `followup`) with its id remembered,
    /// because refusing it now would lose work whose sender was told it was taken.
    pub fn restore(&mut self, msg: Message, now: Millis) -> Actions {
        let mode = match msg.mode {
            Some(Mode::Collect) => Mode::Collect,
            _ => Mode::Followup,
        };
        if let Some(message_id) = &msg.message_id {
            if self
                .seen
                .contains_key(&(msg.session.clone(), message_id.clone()))
            {
                return Actions::none();
            }
        }
        self.remember(&msg, msg.task_id);
        self.queue_past_limits(msg, mode, now)
    }

    /// Remembers that `(session, message_id)` was accepted as `task_id` (an earlier
    /// agentd's message, read back from its store), so a re-delivery is answered with
    /// that task. Counts against the window like any message.
    pub fn remember_message(&mut self, session: &str, message_id: &str, task_id: TaskId) {
        let key = (session.to_string(), message_id.to_string());
        if self.seen.insert(key.clone(), task_id).is_none() {
            self.seen_order.push_back(key);
        }
        self.trim_seen();
    }

    /// Forgets `(session, message_id)` if it names `task_id`: its acceptance was
    /// undone (the record could not be written, so the sender was refused), and a
    /// re-delivery is new work.
    pub fn forget_message(&mut self, session: &str, message_id: &str, task_id: TaskId) {
        let key = (session.to_string(), message_id.to_string());
        if self.seen.get(&key) == Some(&task_id) {
            self.seen.remove(&key);
            if let Some(at) = self.seen_order.iter().position(|k| *k == key) {
                self.seen_order.remove(at);
            }
        }
    }

    /// Whether the de-duplication window is full (older message ids may have left it).
    pub fn dedup_window_full(&self) -> bool {
        self.seen_order.len() >= self.config.dedup_window
    }

    /// Whether `(session, message_id)` may have been remembered by this dispatcher and
    /// have left the window since. False means that a pair the window does not hold
    /// was never remembered here (neither accepted nor restored nor passed to
    /// [`Dispatcher::remember_message`]): if the window held every message id of the
    /// store when it was seeded, the store holds no task for the pair. True for a
    /// pair that did leave, for one whose hash another's matches, and for every pair
    /// once more than [`DEPARTED_PER_WINDOW`] windows' worth have left.
    pub fn may_have_left_window(&self, session: &str, message_id: &str) -> bool {
        self.departed.as_ref().is_none_or(|departed| {
            !departed.is_empty()
                && departed.contains(&self.departed_hash.hash_one((session, message_id)))
        })
    }

    fn queue_past_limits(&mut self, msg: Message, mode: Mode, now: Millis) -> Actions {
        let mut actions = Vec::new();
        let task = self.new_task(&msg, mode, now);
        self.tasks.insert(task.id, Box::new(task));
        self.sessions
            .entry(msg.session.clone())
            .or_default()
            .push_back(&mut self.queued, msg.task_id, now);
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
            .is_none_or(|s| s.active.is_none() && s.debounce.is_none() && s.n_queued() == 0);
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
        self.trim_seen();
    }

    fn trim_seen(&mut self) {
        while self.seen_order.len() > self.config.dedup_window {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen.remove(&old);
                let limit = self.config.dedup_window.saturating_mul(DEPARTED_PER_WINDOW);
                if let Some(departed) = &mut self.departed {
                    if departed.len() >= limit {
                        self.departed = None;
                    } else {
                        departed.insert(self.departed_hash.hash_one((&*old.0, &*old.1)));
                    }
                }
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
        let task_id = s.pop_front(&mut self.queued)?;
        let task = self.tasks.remove(&task_id)?;
        if policy == DropPolicy::Summarize {
            if s.dropped_previews.len() < queue::MAX_PREVIEWS {
                s.dropped_previews.push(queue::preview(&task.text));
            }
            s.dropped += 1;
        }
        actions.push(Action::Finished(Task {
            state: TaskState::Done {
                ending: Ending::Dropped,
                exit: None,
            },
            finished_at: Some(now),
            ..*task
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
                        task.report = Some(Box::new(report));
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
                            step_at,
                            ..
                        } => {
                            current.escalate(cause);
                            *step = StopStep::Sigkill;
                            *step_at = now;
                        }
                        state => {
                            *state = TaskState::Stopping {
                                pid: state.pid(),
                                step: StopStep::Sigkill,
                                requested_at: now,
                                cause,
                                step_at: now,
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
                            step_at: now,
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
                    if let TaskState::Stopping {
                        step: current,
                        step_at,
                        ..
                    } = &mut task.state
                    {
                        if *current < step {
                            *current = step;
                            *step_at = now;
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
            Event::Hung { task_id } => {
                let reported = self.tasks.get(&task_id).is_some_and(|t| t.report.is_some());
                if !reported {
                    self.stop_for(task_id, now, StopCause::Hung, &mut actions);
                }
            }
            Event::TimedOut { task_id } => {
                self.stop_for(task_id, now, StopCause::TimedOut, &mut actions);
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
                    // Oldest first, and only those past their deadline: O(expired).
                    let expired: Vec<TaskId> = self
                        .queued
                        .by_age
                        .iter()
                        .take_while(|(created_at, _)| now.since(*created_at) >= timeout)
                        .map(|(_, t)| *t)
                        .collect();
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
                s.and_then(|s| s.active.or_else(|| s.front()))
                    .into_iter()
                    .collect()
            }
            StopTarget::SessionAll(session) => {
                self.check_scope(scope, &session)?;
                match self.sessions.get(&session) {
                    Some(s) => s.queued().chain(s.active).collect(),
                    None => Vec::new(),
                }
            }
            StopTarget::Everything => {
                let Scope::Owner = scope else {
                    return Ok((Vec::new(), Actions::none()));
                };
                // Queued tasks oldest first, then active ones.
                let queued = self.queued.by_age.iter().map(|(_, t)| *t);
                let mut active: Vec<&Task> = self.tasks().filter(|t| t.state.is_active()).collect();
                active.sort_by_key(|t| (t.created_at, t.id));
                queued.chain(active.iter().map(|t| t.id)).collect()
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

    /// agentd is shutting down: every active task is stopped with
    /// [`StopCause::Shutdown`] and ends `interrupted` (so it can be resumed after the
    /// next start); one a user is stopping already ends so too. Queued work stays.
    pub fn stop_for_shutdown(&mut self, now: Millis) -> Actions {
        let active: Vec<TaskId> = self.live.iter().copied().collect();
        let mut actions = Vec::new();
        for task_id in active {
            match self.tasks.get_mut(&task_id).map(|t| &mut t.state) {
                Some(TaskState::Stopping { cause, .. }) if *cause == StopCause::User => {
                    *cause = StopCause::Shutdown;
                }
                _ => {
                    self.begin_stop(task_id, now, StopCause::Shutdown, &mut actions);
                }
            }
        }
        Actions(actions)
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
            step_at: now,
        };
        actions.push(Action::SendCancel { task_id });
        actions.push(Action::SetTimer {
            task_id,
            after: self.config.cancel_grace,
            step: StopStep::Sigterm,
        });
        true
    }

    /// Stops an active task for a watchdog's `cause`. A stop already in progress
    /// owns the outcome: it is ending the task anyway, and a user who stopped a task
    /// that then fell silent (SIGSTOPped, say) gets the `cancelled` they asked for.
    fn stop_for(
        &mut self,
        task_id: TaskId,
        now: Millis,
        cause: StopCause,
        actions: &mut Vec<Action>,
    ) {
        self.begin_stop(task_id, now, cause, actions);
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
            session.remove(&mut self.queued, task_id);
        }
        self.refresh_ready(&task.session);
        self.prune(&task.session);
        actions.push(Action::Finished(Task {
            state: TaskState::Done { ending, exit: None },
            finished_at: Some(now),
            ..*task
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
        self.steer_full.remove(&task_id);
        let session_key = task.session.clone();
        let mut debounce = None;
        if let Some(session) = self.sessions.get_mut(&session_key) {
            if session.active == Some(task_id) {
                session.active = None;
                let next_interrupts = session
                    .front()
                    .and_then(|t| self.tasks.get(&t))
                    .is_some_and(|t| t.mode == Mode::Interrupt);
                let quiet = self
                    .settings
                    .get(&session_key)
                    .copied()
                    .unwrap_or(self.config.queue)
                    .debounce;
                if session.n_queued() > 0 && !next_interrupts && !quiet.is_zero() {
                    debounce = Some(quiet);
                }
            }
        }
        actions.push(Action::Finished(Task {
            state: TaskState::Done { ending, exit },
            finished_at: Some(now),
            ..*task
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
            .is_some_and(|s| s.active.is_none() && s.n_queued() == 0)
        {
            if let Some(s) = self.sessions.remove(session) {
                if let Some(key) = &s.indexed {
                    self.index.remove(key);
                }
                match s.ring {
                    Some((Priority::Interactive, seq)) => drop(self.ready.remove(&seq)),
                    Some((Priority::Background, seq)) => drop(self.ready_background.remove(&seq)),
                    None => {}
                }
            }
        }
    }

    /// Puts a session in the ready ring it belongs in (keeping its place if it is
    /// already there) or takes it out of both, then brings its entry in the position
    /// index up to date. Every change of a session's queue, claim or quiet time ends
    /// with this call.
    fn refresh_ready(&mut self, session: &str) {
        let Some(s) = self.sessions.get_mut(session) else {
            return;
        };
        let wanted = match (s.active, s.debounce, s.front()) {
            (None, None, Some(next)) => self.tasks.get(&next).map(|t| t.priority),
            _ => None,
        };
        if s.ring.map(|(class, _)| class) != wanted {
            match s.ring.take() {
                Some((Priority::Interactive, seq)) => drop(self.ready.remove(&seq)),
                Some((Priority::Background, seq)) => drop(self.ready_background.remove(&seq)),
                None => {}
            }
            if let Some(class) = wanted {
                self.ring_seq += 1;
                let ring = match class {
                    Priority::Interactive => &mut self.ready,
                    Priority::Background => &mut self.ready_background,
                };
                ring.insert(self.ring_seq, session.to_string());
                s.ring = Some((class, self.ring_seq));
            }
        }
        // Its place in the admission order.
        let key = if s.n_queued() == 0 {
            None
        } else if let Some((class, seq)) = s.ring {
            Some(OrderKey::Ready { class, seq })
        } else if let Some(active) = s.active {
            Some(OrderKey::Busy {
                started_at: self.tasks.get(&active).and_then(|t| t.started_at),
                task: active,
            })
        } else {
            Some(OrderKey::Quiet(session.to_string()))
        };
        let len = s.n_queued() as u32;
        let unchanged = s.indexed == key
            && key
                .as_ref()
                .is_none_or(|k| self.index.len_of(k) == Some(len));
        if !unchanged {
            self.queued.version += 1;
            match key {
                // Only the length changed (a message in or out of a queue that keeps
                // its place): updated in place.
                Some(key) if s.indexed.as_ref() == Some(&key) => self.index.set_len(&key, len),
                key => {
                    if let Some(old) = s.indexed.take() {
                        self.index.remove(&old);
                    }
                    if let Some(key) = key {
                        self.index.add(key.clone(), len);
                        s.indexed = Some(key);
                    }
                }
            }
            self.index.shrink_if_empty();
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
            let session_key = match self.ready.pop_first() {
                Some((_, key)) => key,
                None if self.background_admissible() => match self.ready_background.pop_first() {
                    Some((_, key)) => key,
                    None => break,
                },
                None => break,
            };
            if let Some(s) = self.sessions.get_mut(&session_key) {
                s.ring = None;
            }
            self.start_next(&session_key, now, actions);
            self.refresh_ready(&session_key);
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
        let Some(task_id) = session.pop_front(&mut self.queued) else {
            return;
        };
        let collect = self.config.collected_prompts
            && self
                .tasks
                .get(&task_id)
                .is_some_and(|t| t.mode == Mode::Collect);
        let mut merged = Vec::new();
        if collect {
            // Within MAX_COLLECTED_BYTES (counted as collected_text lays it out):
            // the rest wait for the next collected prompt.
            let mut size = self.tasks.get(&task_id).map_or(0, |t| t.text.len()) + 64;
            while let Some(next) = session
                .front()
                .and_then(|t| self.tasks.get(&t))
                .filter(|t| t.mode == Mode::Collect)
            {
                size += next.text.len() + 32;
                if size > queue::MAX_COLLECTED_BYTES {
                    break;
                }
                merged.extend(session.pop_front(&mut self.queued));
            }
        }
        // The overflow note is a prompt for an agent that reads prompts; one that runs
        // each message as a command would run it (`- <preview>` is a shell line), so
        // it gets the message as sent, as with `drop: old`.
        let previews = std::mem::take(&mut session.dropped_previews);
        let dropped = std::mem::take(&mut session.dropped);
        let previews = if self.config.collected_prompts {
            previews
        } else {
            Vec::new()
        };
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
                    ..*task
                }));
            }
        }
        let Some(task) = self.tasks.get_mut(&task_id) else {
            return;
        };
        let mut text = queue::collected_text(&texts);
        if !previews.is_empty() {
            text = format!("{}\n\n{text}", queue::overflow_note(&previews, dropped));
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
        let rings = [
            (Priority::Interactive, &self.ready),
            (Priority::Background, &self.ready_background),
        ];
        for (class, ring) in rings {
            for (seq, key) in ring {
                if !seen_ready.insert(key) {
                    return Err(format!("session {key} is in the ready rings twice"));
                }
                let Some(session) = self.sessions.get(key) else {
                    return Err(format!("ready ring names unknown session {key}"));
                };
                if session.ring != Some((class, *seq)) {
                    return Err(format!("session {key} does not know its ring place"));
                }
            }
        }
        for (key, session) in &self.sessions {
            if session.active.is_none() && session.n_queued() == 0 {
                return Err(format!("idle empty session {key} kept"));
            }
            let next = session.front().and_then(|t| self.tasks.get(&t));
            let should_be_ready =
                session.active.is_none() && session.debounce.is_none() && next.is_some();
            if should_be_ready != seen_ready.contains(key) {
                return Err(format!(
                    "session {key}: ready ring membership is {}",
                    !should_be_ready
                ));
            }
            if let Some(next) = next.filter(|_| should_be_ready) {
                // The rings' entries were checked against `session.ring` above.
                let ring = match session.ring {
                    Some((Priority::Interactive, seq)) => self.ready.get(&seq),
                    Some((_, seq)) => self.ready_background.get(&seq),
                    None => None,
                };
                if session.ring.map(|(class, _)| class) != Some(next.priority) || ring != Some(key)
                {
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
            for queued in session.queued() {
                match self.tasks.get(&queued) {
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
                TaskState::Queued => session.queued().any(|t| t == task.id),
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
        self.check_positions()?;
        if self.seen.len() > self.config.dedup_window || self.seen.len() != self.seen_order.len() {
            return Err(format!(
                "de-duplication window holds {} entries",
                self.seen.len()
            ));
        }
        Ok(())
    }
}

/// The reason of a task stopped for being silent too long ([`Event::Hung`]).
pub const HUNG: &str = "hung";
/// The reason of a task stopped for running too long ([`Event::TimedOut`]).
pub const TIMED_OUT: &str = "timed out";

impl Dispatcher {
    /// The position index against the sessions, and every fast position against the
    /// table computed from scratch.
    fn check_positions(&self) -> Result<(), String> {
        let n_queued: usize = self.sessions.values().map(Session::n_queued).sum();
        if self.index.n_queued() != n_queued {
            return Err(format!(
                "position index counts {} queued tasks, the sessions {n_queued}",
                self.index.n_queued()
            ));
        }
        let n_indexed = self.sessions.values().filter(|s| s.n_queued() > 0).count();
        if self.index.n_sessions() != n_indexed {
            return Err(format!(
                "position index holds {} sessions, {n_indexed} have queued work",
                self.index.n_sessions()
            ));
        }
        if self.queued.place.len() != n_queued || self.queued.by_age.len() != n_queued {
            return Err(format!(
                "{} places and {} ages for {n_queued} queued tasks",
                self.queued.place.len(),
                self.queued.by_age.len()
            ));
        }
        for (key, session) in &self.sessions {
            let indexed = session.indexed.as_ref().and_then(|k| self.index.len_of(k));
            let want = (session.n_queued() > 0).then_some(session.n_queued() as u32);
            if indexed != want {
                return Err(format!(
                    "session {key} is indexed with {indexed:?} queued tasks, holds {want:?}"
                ));
            }
        }
        let positions = self.positions();
        for (task_id, want) in &positions {
            let fast = self.position(task_id);
            if fast != Some(*want) {
                return Err(format!(
                    "task {task_id}: position {fast:?}, from scratch {want}"
                ));
            }
        }
        let mut n_listed = 0;
        for (task, position) in self.queued_in_order() {
            n_listed += 1;
            if positions.get(&task.id) != Some(&position) || position != n_listed {
                return Err(format!(
                    "task {} listed at {position} (#{n_listed}), from scratch {:?}",
                    task.id,
                    positions.get(&task.id)
                ));
            }
        }
        if n_listed as usize != positions.len() {
            return Err(format!("{n_listed} tasks listed of {}", positions.len()));
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
            (StopCause::Interrupt, _) => {
                return Ending::Interrupted {
                    by,
                    after,
                    why: Interruption::NewerMessage,
                }
            }
            (StopCause::Shutdown, _) => {
                return Ending::Interrupted {
                    by,
                    after,
                    why: Interruption::Shutdown,
                }
            }
            (StopCause::Hung, _) => {
                return Ending::Failed {
                    reason: HUNG.to_string(),
                }
            }
            (StopCause::TimedOut, _) => {
                return Ending::Failed {
                    reason: TIMED_OUT.to_string(),
                }
            }
            (StopCause::User | StopCause::Linger, _) => return Ending::Cancelled { by, after },
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
    match task.report.as_deref() {
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
