//! Property tests for [`agentd_core::Dispatcher`]: random sequences of messages (with
//! random queue modes, priorities and bridge message ids), per-session `/queue`
//! settings, stops, ticks, debounce timers (current and stale) and world events
//! (spawns completing or failing, handshakes with or without steering, reports,
//! protocol errors, reaps, stop timers, stale replays) are run against a model of the
//! daemon that executes the dispatcher's actions the way the daemon does, and that
//! predicts what the queue modes, caps, drop policies and limits decide.
//!
//! After every step the model checks the invariants of DESIGN.md that the core
//! decides: one active task per session (2), live agents within the cap (and live
//! background agents within theirs) and the slot held until the reap (3), round-robin
//! fairness among ready sessions of a priority class (4), every acknowledged message
//! ends in exactly one place (6), memory bounded by live work (8), compare-and-release
//! of session claims (9), chat scope (10) and de-duplication (11), plus the stop
//! sequence and how each task ends.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use agentd_core::{
    collected_text, overflow_text, parse_chat_command, preview, Accepted, Action, Actions,
    AgentReport, ChatCommand, Config, Dispatcher, DropPolicy, Ending, Event, ExitStatus,
    Interruption, Message, Millis, Mode, Named, Priority, QueueChange, QueueCommand, QueueSettings,
    Refused, ReportOutcome, Scope, StopArg, StopCause, StopError, StopStep, StopTarget, Task,
    TaskId, TaskState, HUNG, TIMED_OUT,
};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{RngAlgorithm, TestCaseError, TestRng, TestRunner};

const SESSIONS: [&str; 4] = ["s0", "s1", "s2", "s3"];
const CANCEL_GRACE: Duration = Duration::from_millis(500);
const TERM_GRACE: Duration = Duration::from_millis(700);
const DROPS: [DropPolicy; 3] = [DropPolicy::Old, DropPolicy::New, DropPolicy::Summarize];

/// The daemon's configuration for one run.
#[derive(Debug, Clone)]
struct Params {
    max_concurrent: u32,
    max_background: Option<u32>,
    max_queued: u32,
    queue_timeout: Option<Duration>,
    dedup_window: usize,
    defaults: QueueSettings,
}

impl Params {
    fn config(&self) -> Config {
        Config {
            max_concurrent: self.max_concurrent,
            max_background: self.max_background,
            cancel_grace: CANCEL_GRACE,
            term_grace: TERM_GRACE,
            queue: self.defaults,
            max_queued: self.max_queued,
            queue_timeout: self.queue_timeout,
            dedup_window: self.dedup_window,
            // The model merges collected messages; draining them as followup for
            // an agent that wants no collected prompts has its own scenario test.
            collected_prompts: true,
        }
    }
}

fn queue_settings() -> impl Strategy<Value = QueueSettings> {
    (
        prop_oneof![1 => Just(Mode::Collect), 2 => prop::sample::select(Mode::all().collect::<Vec<_>>())],
        prop_oneof![1 => Just(0u64), 2 => 1..=3u64],
        1..=4u32,
        prop::sample::select(DROPS.to_vec()),
    )
        .prop_map(|(mode, debounce, cap, drop)| QueueSettings {
            mode,
            debounce: Duration::from_millis(100 * debounce),
            cap,
            drop,
        })
}

fn params() -> impl Strategy<Value = Params> {
    (
        1..=3u32,
        prop::option::weighted(0.4, 1..=2u32),
        prop_oneof![1 => 1..=4u32, 2 => 5..=40u32],
        prop::option::weighted(0.4, 100..=1_500u64),
        1..=6usize,
        queue_settings(),
    )
        .prop_map(
            |(max_concurrent, max_background, max_queued, timeout, dedup_window, defaults)| {
                Params {
                    max_concurrent,
                    max_background,
                    max_queued,
                    queue_timeout: timeout.map(Duration::from_millis),
                    dedup_window,
                    defaults,
                }
            },
        )
}

#[derive(Debug, Clone)]
enum Target {
    /// Any task ever accepted (finished ones included), or an unknown id.
    Task(Index),
    Current(usize),
    All(usize),
    Everything,
}

#[derive(Debug, Clone)]
enum Op {
    Submit {
        session: usize,
        /// Rather to a session that has a task active (picked with `session` as an
        /// index), where the queue modes matter.
        busy: bool,
        mode: Option<Mode>,
        background: bool,
        message_id: Option<u8>,
    },
    /// `/queue …` (`Some`) or `/queue reset` (`None`) for a session.
    Settings(usize, Option<QueueSettings>),
    /// A pending spawn completes or fails; `Some(steer)`: the handshake follows at once.
    CompleteSpawn(Index, bool, Option<bool>),
    Ready(Index, bool),
    Progress(Index),
    Report(Index, usize),
    ProtocolError(Index),
    Reap(Index, usize),
    FireTimer(Index),
    /// One of the armed debounce timers fires (current or stale).
    FireDebounce(Index),
    /// A debounce timer that already fired fires again, or a made-up one.
    ReplayDebounce(Index, usize),
    /// Time passes by this many milliseconds, then the daemon ticks.
    Tick(u64),
    /// `None` is the owner, `Some(s)` the chat of session `s`.
    Stop(Target, Option<usize>),
    /// An event about a task that has no agent (finished or still queued).
    Stale(Index, usize),
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        3 => any::<Index>().prop_map(Target::Task),
        2 => (0..SESSIONS.len()).prop_map(Target::Current),
        2 => (0..SESSIONS.len()).prop_map(Target::All),
        1 => Just(Target::Everything),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        9 => (
            0..SESSIONS.len(),
            any::<bool>(),
            prop::option::weighted(0.5, prop::sample::select(Mode::all().collect::<Vec<_>>())),
            prop::bool::weighted(0.3),
            prop::option::weighted(0.4, 0..6u8),
        )
            .prop_map(|(session, busy, mode, background, message_id)| Op::Submit {
                session,
                busy,
                mode,
                background,
                message_id,
            }),
        1 => (0..SESSIONS.len(), prop::option::weighted(0.7, queue_settings()))
            .prop_map(|(s, q)| Op::Settings(s, q)),
        4 => (
            any::<Index>(),
            prop::bool::weighted(0.85),
            prop::option::weighted(0.7, prop::bool::weighted(0.7)),
        )
            .prop_map(|(i, ok, handshake)| Op::CompleteSpawn(i, ok, handshake)),
        3 => (any::<Index>(), prop::bool::weighted(0.7)).prop_map(|(i, s)| Op::Ready(i, s)),
        1 => any::<Index>().prop_map(Op::Progress),
        2 => (any::<Index>(), 0..3usize).prop_map(|(i, k)| Op::Report(i, k)),
        1 => any::<Index>().prop_map(Op::ProtocolError),
        4 => (any::<Index>(), 0..4usize).prop_map(|(i, k)| Op::Reap(i, k)),
        2 => any::<Index>().prop_map(Op::FireTimer),
        3 => any::<Index>().prop_map(Op::FireDebounce),
        1 => (any::<Index>(), 0..3usize).prop_map(|(i, k)| Op::ReplayDebounce(i, k)),
        2 => prop_oneof![0..200u64, 200..1_500u64].prop_map(Op::Tick),
        2 => (target(), prop::option::weighted(0.6, 0..SESSIONS.len())).prop_map(|(t, s)| Op::Stop(t, s)),
        2 => (any::<Index>(), 0..9usize).prop_map(|(i, k)| Op::Stale(i, k)),
    ]
}

/// How often each behaviour happened across the cases of a run, so that the property
/// test is known to exercise what it checks.
static COVERAGE: Mutex<BTreeMap<&'static str, u32>> = Mutex::new(BTreeMap::new());

/// Behaviours every run of the property test must have met at least this often: far
/// below what a run meets (a few times less than the rarest seen in a run), so that
/// this fails when the model stops exercising one of them, not by chance.
const COVERED: [(&str, u32); 27] = [
    ("watchdog stopped a task", 3),
    ("watchdog during a stop", 1),
    ("ended hung or timed out", 1),
    ("exit grace over during a stop", 3),
    ("accepted", 1_000),
    ("protocol error after a signal", 3),
    ("exit grace armed", 10),
    ("lingered", 3),
    ("duplicate", 20),
    ("de-dup window evicted", 20),
    ("refused: queue full", 20),
    ("refused: session full", 20),
    ("steered", 5),
    ("steer-backlog steered", 5),
    ("steer fell back", 20),
    ("interrupt stopped a task", 20),
    ("ended interrupted", 10),
    ("collected", 10),
    ("dropped", 20),
    ("overflow note", 10),
    ("expired", 20),
    ("debounce armed", 50),
    ("debounce re-armed", 5),
    ("debounce ended", 20),
    ("debounce stale", 10),
    ("background admitted", 50),
    ("background held by max_background", 5),
];

fn hit(what: &'static str) {
    *COVERAGE.lock().unwrap().entry(what).or_default() += 1;
}

fn id(n: u128) -> TaskId {
    TaskId::from_u128(n)
}

/// An agent process the model's world holds: spawned and not yet reaped.
#[derive(Debug)]
struct Agent {
    task: TaskId,
    /// Its handshake was delivered.
    ready: bool,
    /// It said in its handshake that it accepts steering.
    steer: bool,
}

/// An accepted message, as the model knows it.
#[derive(Debug, Clone)]
struct Msg {
    session: String,
    text: String,
    priority: Priority,
    /// The mode it was queued with, after fallbacks.
    mode: Mode,
    message_id: Option<String>,
    created: u64,
}

/// The dispatcher plus a model of the daemon and of the world around it.
struct World {
    d: Dispatcher,
    p: Params,
    now: u64,
    next_id: u128,
    next_pid: u32,
    /// Every accepted message (its task), in order.
    submitted: Vec<TaskId>,
    msgs: HashMap<TaskId, Msg>,
    /// Sessions' own settings.
    settings: HashMap<String, QueueSettings>,
    /// Per session: held (queued) messages in the order they run, and the admitted
    /// unfinished task.
    queues: HashMap<String, VecDeque<TaskId>>,
    active: HashMap<String, TaskId>,
    /// Sessions waiting for quiet: `Some(generation)` of the timer that ends the wait;
    /// `None` while an arm is expected later in the same batch of actions.
    debounce: HashMap<String, Option<u64>>,
    /// Previews of messages dropped with `drop: summarize`, for the next follow-up.
    previews: HashMap<String, Vec<String>>,
    /// Spawns ordered and not yet answered.
    pending: Vec<TaskId>,
    agents: Vec<Agent>,
    /// Armed stop timers (`Some(step)`) and exit graces (`None`).
    timers: Vec<(TaskId, Option<StopStep>)>,
    debounce_timers: Vec<(String, u64)>,
    fired_debounces: Vec<(String, u64)>,
    last_generation: u64,
    finished: HashMap<TaskId, Task>,
    admitted: HashSet<TaskId>,
    /// What each spawned task was started with.
    spawned_text: HashMap<TaskId, String>,
    /// Messages steered into a running task (message → task).
    steered: HashMap<TaskId, TaskId>,
    /// Last stop step taken on a task and when its stop began.
    stop_step: HashMap<TaskId, (StopStep, u64)>,
    /// Tasks whose stop an interrupting message began.
    interrupted: HashSet<TaskId>,
    /// Tasks stopped for not exiting after their report (their outcome stands).
    lingered: HashSet<TaskId>,
    /// Tasks whose stop the liveness check began: hung (`true`) or timed out.
    watchdog: HashMap<TaskId, bool>,
    protocol_error: HashMap<TaskId, String>,
    reports: HashMap<TaskId, AgentReport>,
    /// Sessions whose queued work was cancelled by a stop-all and that got no new
    /// message since: none of their tasks may be admitted.
    sealed: HashSet<String>,
    /// Ready sessions (held work, no active task, no quiet time pending), with the
    /// class of their next task and the admissions of every other session of that
    /// class since they became ready.
    waiting: HashMap<String, (Priority, HashMap<String, u32>)>,
    /// The de-duplication window: `(session, message_id)` → task, oldest first.
    dedup: HashMap<(String, String), TaskId>,
    dedup_order: VecDeque<(String, String)>,
    /// Every pair that has left the window.
    departed: HashSet<(String, String)>,
    // Expectations within one batch of actions:
    /// Queued tasks that must end in this batch, and how.
    expect_end: HashMap<TaskId, Ending>,
    /// Messages that ended merged into a follow-up whose Spawn is still to come.
    merging: Vec<(TaskId, TaskId)>,
    /// A `Steer` that must come.
    expect_steer: Option<(TaskId, String)>,
}

impl World {
    fn new(p: Params) -> World {
        World {
            d: Dispatcher::new(p.config()),
            p,
            now: 1_000,
            next_id: 1,
            next_pid: 100,
            submitted: Vec::new(),
            msgs: HashMap::new(),
            settings: HashMap::new(),
            queues: HashMap::new(),
            active: HashMap::new(),
            debounce: HashMap::new(),
            previews: HashMap::new(),
            pending: Vec::new(),
            agents: Vec::new(),
            timers: Vec::new(),
            debounce_timers: Vec::new(),
            fired_debounces: Vec::new(),
            last_generation: 0,
            finished: HashMap::new(),
            admitted: HashSet::new(),
            spawned_text: HashMap::new(),
            steered: HashMap::new(),
            stop_step: HashMap::new(),
            watchdog: HashMap::new(),
            interrupted: HashSet::new(),
            lingered: HashSet::new(),
            protocol_error: HashMap::new(),
            reports: HashMap::new(),
            sealed: HashSet::new(),
            waiting: HashMap::new(),
            dedup: HashMap::new(),
            dedup_order: VecDeque::new(),
            departed: HashSet::new(),
            expect_end: HashMap::new(),
            merging: Vec::new(),
            expect_steer: None,
        }
    }

    fn settings(&self, session: &str) -> QueueSettings {
        self.settings
            .get(session)
            .copied()
            .unwrap_or(self.p.defaults)
    }

    fn session_of(&self, task: &TaskId) -> &str {
        &self
            .msgs
            .get(task)
            .unwrap_or_else(|| panic!("unknown task {task}"))
            .session
    }

    fn alive(&self, task: TaskId) -> bool {
        self.pending.contains(&task) || self.agents.iter().any(|a| a.task == task)
    }

    fn n_live(&self) -> usize {
        self.pending.len() + self.agents.len()
    }

    fn n_live_background(&self) -> usize {
        self.pending
            .iter()
            .chain(self.agents.iter().map(|a| &a.task))
            .filter(|t| self.msgs[*t].priority == Priority::Background)
            .count()
    }

    fn background_admissible(&self) -> bool {
        self.p
            .max_background
            .is_none_or(|max| self.n_live_background() < max as usize)
    }

    fn n_queued(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }

    /// Running, not stopping, and its agent said it accepts steering.
    fn steerable(&self, task: TaskId) -> bool {
        !self.stop_step.contains_key(&task)
            && self
                .agents
                .iter()
                .any(|a| a.task == task && a.ready && a.steer)
    }

    /// A message for `session` would be admitted at once, so the global queue limit
    /// does not apply to it.
    fn starts_at_once(&self, session: &str, priority: Priority) -> bool {
        let idle = !self.active.contains_key(session)
            && !self.debounce.contains_key(session)
            && self.queues.get(session).is_none_or(VecDeque::is_empty);
        let slot_free = self.n_live() < self.p.max_concurrent as usize;
        idle && slot_free
            && match priority {
                Priority::Interactive => true,
                Priority::Background => {
                    SESSIONS
                        .iter()
                        .all(|s| self.ready_class(s) != Some(Priority::Interactive))
                        && self.background_admissible()
                }
            }
    }

    /// The class of a ready session's next task; `None` if it is not ready.
    fn ready_class(&self, session: &str) -> Option<Priority> {
        if self.active.contains_key(session) || self.debounce.contains_key(session) {
            return None;
        }
        let next = self.queues.get(session)?.front()?;
        Some(self.msgs[next].priority)
    }

    /// Forgets a session that holds nothing (its quiet time and previews go with it).
    fn prune(&mut self, session: &str) {
        if !self.active.contains_key(session)
            && self.queues.get(session).is_none_or(VecDeque::is_empty)
        {
            self.queues.remove(session);
            self.debounce.remove(session);
            self.previews.remove(session);
        }
    }

    fn refresh_waiting(&mut self) {
        for s in SESSIONS {
            match self.ready_class(s) {
                None => {
                    self.waiting.remove(s);
                }
                Some(class) => {
                    let entry = self
                        .waiting
                        .entry(s.to_string())
                        .or_insert((class, HashMap::new()));
                    if entry.0 != class {
                        // Moved to the other class's ring: a new wait.
                        *entry = (class, HashMap::new());
                    }
                }
            }
        }
    }

    fn remember(&mut self, session: &str, message_id: &Option<String>, task: TaskId) {
        let Some(message_id) = message_id else { return };
        let key = (session.to_string(), message_id.clone());
        assert!(self.dedup.insert(key.clone(), task).is_none());
        self.dedup_order.push_back(key);
        while self.dedup_order.len() > self.p.dedup_window {
            hit("de-dup window evicted");
            let old = self.dedup_order.pop_front().unwrap();
            self.dedup.remove(&old);
            self.departed.insert(old);
        }
    }

    /// Executes the dispatcher's actions like the daemon does, checking each, then
    /// checks that every expectation of the batch was met.
    fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Spawn {
                    task_id,
                    session,
                    text,
                } => self.spawn(task_id, session, text),
                Action::SendCancel { task_id } => {
                    assert!(
                        !self.finished.contains_key(&task_id),
                        "cancel of finished {task_id}"
                    );
                    assert!(self.alive(task_id), "cancel of {task_id} without an agent");
                    assert!(
                        !self.stop_step.contains_key(&task_id),
                        "{task_id} stopped twice"
                    );
                    self.stop_step
                        .insert(task_id, (StopStep::CooperativeCancel, self.now));
                }
                Action::Steer { task_id, text } => {
                    assert_eq!(
                        self.expect_steer.take(),
                        Some((task_id, text.clone())),
                        "unexpected steer"
                    );
                    // Steered messages go to a running, steer-capable task.
                    assert!(self.steerable(task_id), "steer into {task_id}");
                    assert!(self.active.values().any(|t| *t == task_id));
                }
                Action::Signal { task_id, step } => {
                    assert!(
                        !self.finished.contains_key(&task_id),
                        "signal to finished {task_id}"
                    );
                    assert!(self.alive(task_id), "signal to {task_id} without an agent");
                    assert_ne!(step, StopStep::CooperativeCancel);
                    let now = self.now;
                    let entry = self.stop_step.entry(task_id).or_insert((step, now));
                    assert!(
                        entry.0 <= step,
                        "{task_id}: signal {step:?} after {:?}",
                        entry.0
                    );
                    entry.0 = step;
                }
                Action::SetTimer {
                    task_id,
                    after,
                    step,
                } => {
                    assert!(
                        !self.finished.contains_key(&task_id),
                        "timer for finished {task_id}"
                    );
                    let want = match step {
                        StopStep::Sigterm => CANCEL_GRACE,
                        StopStep::Sigkill => TERM_GRACE,
                        StopStep::CooperativeCancel => panic!("timer for the cooperative step"),
                    };
                    assert_eq!(after, want);
                    self.timers.push((task_id, Some(step)));
                }
                Action::SetExitGrace { task_id, after } => {
                    assert!(
                        !self.finished.contains_key(&task_id),
                        "exit grace for finished {task_id}"
                    );
                    assert_eq!(after, CANCEL_GRACE);
                    self.timers.push((task_id, None));
                }
                Action::SetDebounce {
                    session,
                    after,
                    generation,
                } => {
                    assert_eq!(
                        self.debounce.get(&session),
                        Some(&None),
                        "{session}: debounce not expected"
                    );
                    // The session's quiet time now (a message that re-arms it after
                    // `/queue debounce:0` arms a timer of zero).
                    assert_eq!(after, self.settings(&session).debounce);
                    assert!(generation > self.last_generation, "generations grow");
                    hit("debounce armed");
                    self.last_generation = generation;
                    assert!(!self.active.contains_key(&session));
                    assert!(self.queues.get(&session).is_some_and(|q| !q.is_empty()));
                    self.debounce.insert(session.clone(), Some(generation));
                    self.debounce_timers.push((session, generation));
                }
                Action::Finished(task) => self.finish(task),
            }
            self.refresh_waiting();
        }
        assert!(
            self.expect_end.is_empty(),
            "did not end: {:?}",
            self.expect_end
        );
        assert!(
            self.merging.is_empty(),
            "merged without a follow-up: {:?}",
            self.merging
        );
        assert_eq!(self.expect_steer, None, "no steer");
        assert!(
            self.debounce.values().all(Option::is_some),
            "debounce not armed: {:?}",
            self.debounce
        );
    }

    fn spawn(&mut self, task_id: TaskId, session: String, text: String) {
        assert!(
            !self.finished.contains_key(&task_id),
            "Spawn of finished {task_id}"
        );
        assert!(self.admitted.insert(task_id), "{task_id} spawned twice");
        assert_eq!(self.session_of(&task_id), session);
        assert!(
            !self.sealed.contains(&session),
            "{task_id} of {session} promoted after a stop-all"
        );
        assert!(
            !self.active.contains_key(&session),
            "invariant 2: {session} already runs {:?}, now {task_id}",
            self.active.get(&session)
        );
        assert!(
            !self.debounce.contains_key(&session),
            "{session} admitted during its quiet time"
        );
        let class = self.msgs[&task_id].priority;
        let queue = self.queues.get_mut(&session).expect("session has a queue");
        assert_eq!(
            queue.front(),
            Some(&task_id),
            "a session's tasks are admitted in queue order"
        );
        // Collect: the collected messages right behind it join it.
        let mut group = vec![queue.pop_front().unwrap()];
        if self.msgs[&task_id].mode == Mode::Collect {
            while let Some(next) = queue
                .front()
                .filter(|t| self.msgs[*t].mode == Mode::Collect)
            {
                group.push(*next);
                queue.pop_front();
            }
        }
        let merged: Vec<TaskId> = self
            .merging
            .iter()
            .filter(|(_, into)| *into == task_id)
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(merged, group[1..], "merged into {task_id}");
        if group.len() > 1 {
            hit("collected");
        }
        self.merging.retain(|(_, into)| *into != task_id);
        let texts: Vec<String> = group.iter().map(|t| self.msgs[t].text.clone()).collect();
        let mut want = collected_text(&texts);
        if let Some(previews) = self.previews.remove(&session) {
            hit("overflow note");
            want = format!("{}\n\n{want}", overflow_text(&previews));
        }
        assert_eq!(text, want, "text of {task_id}");
        self.spawned_text.insert(task_id, text);

        // Priority classes: background waits while interactive work is ready, and
        // stays within its own cap.
        if class == Priority::Background {
            hit("background admitted");
            assert!(
                self.background_admissible(),
                "a background task beyond max_background"
            );
            for s in SESSIONS.iter().filter(|s| **s != session) {
                assert_ne!(
                    self.ready_class(s),
                    Some(Priority::Interactive),
                    "background {task_id} admitted while {s} is ready with interactive work"
                );
            }
        }
        // Invariant 4: nobody is admitted twice while another ready session of the
        // same class waits.
        for (waiter, (waiter_class, counts)) in self.waiting.iter_mut() {
            if *waiter != session && *waiter_class == class {
                let n = counts.entry(session.clone()).or_default();
                *n += 1;
                assert!(
                    *n <= 1,
                    "invariant 4: {session} admitted twice while {waiter} waits"
                );
            }
        }
        self.active.insert(session, task_id);
        self.pending.push(task_id);
        assert!(
            self.n_live() <= self.p.max_concurrent as usize,
            "invariant 3: {} live agents, cap {}",
            self.n_live(),
            self.p.max_concurrent
        );
    }

    fn finish(&mut self, task: Task) {
        let task_id = task.id;
        assert!(
            !self.finished.contains_key(&task_id),
            "{task_id} finished twice"
        );
        let session = self.session_of(&task_id).to_string();
        assert_eq!(task.session, session);
        assert_eq!(task.finished_at, Some(Millis(self.now)));
        let TaskState::Done { ending, exit } = &task.state else {
            panic!("finished in state {:?}", task.state);
        };
        if self.admitted.contains(&task_id) {
            // Invariants 3 and 9: finished only when its agent is gone, and only its
            // own end releases its session.
            assert!(!self.alive(task_id), "{task_id} finished with a live agent");
            assert_eq!(self.active.remove(&session), Some(task_id));
            assert!(
                !matches!(
                    ending,
                    Ending::Merged { .. } | Ending::Dropped | Ending::Expired
                ),
                "{task_id} ran and ended {ending:?}"
            );
            assert_eq!(Some(&task.text), self.spawned_text.get(&task_id));
            // The follow-up waits for quiet, unless it interrupts.
            let next = self.queues.get(&session).and_then(|q| q.front());
            if next.is_some_and(|t| self.msgs[t].mode != Mode::Interrupt)
                && !self.settings(&session).debounce.is_zero()
            {
                self.debounce.insert(session.clone(), None);
            }
            self.prune(&session);
        } else if let Some(into) = self.steered.get(&task_id) {
            assert_eq!(ending, &Ending::Merged { into: *into });
            assert_eq!(*exit, None);
        } else {
            assert_eq!(*exit, None);
            let queue = self.queues.get_mut(&session).expect("queue");
            assert!(queue.contains(&task_id), "{task_id} was not queued");
            match ending {
                Ending::Merged { into } => {
                    // Removed from the queue when `into` is spawned.
                    assert_eq!(self.session_of(into), session);
                    self.merging.push((task_id, *into));
                }
                _ => {
                    assert_eq!(
                        self.expect_end.remove(&task_id).as_ref(),
                        Some(ending),
                        "{task_id} ended unexpectedly"
                    );
                    queue.retain(|t| *t != task_id);
                    // A message dropped on overflow makes room for a new one: the
                    // session stays.
                    if *ending != Ending::Dropped {
                        self.prune(&session);
                    }
                }
            }
        }
        self.finished.insert(task_id, task);
    }

    /// Invariants checked after every step.
    fn check(&self) {
        if let Err(e) = self.d.check_invariants() {
            panic!("check_invariants: {e}\n{:#?}", self.d);
        }
        // No pair that left the window is ever said not to have (the daemon would
        // then not ask the store and take a re-delivery for new work).
        for (session, message_id) in &self.departed {
            assert!(
                self.d.may_have_left_window(session, message_id),
                "({session}, {message_id}) left the window"
            );
        }
        let mut active_per_session: HashMap<&str, u32> = HashMap::new();
        for task in self.d.tasks() {
            assert!(
                !self.finished.contains_key(&task.id),
                "finished {} still held",
                task.id
            );
            let msg = &self.msgs[&task.id];
            assert_eq!(task.session, msg.session);
            assert_eq!(task.priority, msg.priority);
            assert_eq!(task.mode, msg.mode);
            assert_eq!(task.message_id, msg.message_id);
            assert!(matches!(
                task.mode,
                Mode::Collect | Mode::Followup | Mode::Interrupt
            ));
            if task.state.is_active() {
                *active_per_session.entry(&task.session).or_default() += 1;
                assert!(self.admitted.contains(&task.id));
                assert_eq!(self.active.get(&msg.session), Some(&task.id));
                assert_eq!(self.d.active_task(&msg.session), Some(task.id));
            } else {
                assert_eq!(task.state, TaskState::Queued);
                assert_eq!(task.text, msg.text);
                assert!(!self.admitted.contains(&task.id));
                assert!(self.d.position(&task.id).is_some());
            }
        }
        assert!(
            active_per_session.values().all(|n| *n <= 1),
            "invariant 2: {active_per_session:?}"
        );
        assert!(
            self.n_live() <= self.p.max_concurrent as usize,
            "invariant 3"
        );
        if let Some(max) = self.p.max_background {
            assert!(self.n_live_background() <= max as usize);
        }
        // Work-conserving: a free slot is never left idle while an admissible session
        // is ready.
        if self.n_live() < self.p.max_concurrent as usize {
            for s in SESSIONS {
                let admissible = match self.ready_class(s) {
                    None => false,
                    Some(Priority::Interactive) => true,
                    Some(Priority::Background) => self.background_admissible(),
                };
                assert!(!admissible, "a free slot while {s} is ready");
                if self.ready_class(s) == Some(Priority::Background) {
                    hit("background held by max_background");
                }
            }
        }
        assert_eq!(
            self.d.capacity().busy as usize,
            self.n_live(),
            "slots = live agents"
        );
        assert_eq!(
            self.d.tasks().count(),
            self.submitted.len() - self.finished.len(),
            "every unfinished task is held, no finished one is"
        );
        let n_queued = self.n_queued();
        assert_eq!(self.d.n_queued(), n_queued);
        let live_sessions = SESSIONS
            .iter()
            .filter(|s| {
                self.active.contains_key(**s) || self.queues.get(**s).is_some_and(|q| !q.is_empty())
            })
            .count();
        assert_eq!(self.d.n_sessions(), live_sessions, "invariant 8");
        assert!(self
            .queues
            .keys()
            .chain(self.debounce.keys())
            .chain(self.previews.keys())
            .all(|s| self.active.contains_key(s)
                || self.queues.get(s).is_some_and(|q| !q.is_empty())));
        let positions = self.d.positions();
        let mut all: Vec<u32> = positions.values().copied().collect();
        all.sort();
        assert_eq!(all, (1..=n_queued as u32).collect::<Vec<_>>());
        for queue in self.queues.values() {
            let mine: Vec<u32> = queue.iter().map(|t| positions[t]).collect();
            assert!(
                mine.windows(2).all(|w| w[0] < w[1]),
                "a session's positions follow its queue: {mine:?}"
            );
        }
        for s in SESSIONS {
            assert_eq!(self.d.settings(s), self.settings(s));
            assert_eq!(self.d.has_own_settings(s), self.settings.contains_key(s));
        }
    }

    fn handle(&mut self, event: Event) -> Vec<Action> {
        self.d.handle(event, Millis(self.now)).into_vec()
    }

    fn snapshot(&self) -> String {
        let mut tasks: Vec<&Task> = self.d.tasks().collect();
        tasks.sort_by_key(|t| t.id);
        let mut positions: Vec<_> = self.d.positions().into_iter().collect();
        positions.sort();
        format!(
            "{tasks:?} {:?} {} {} {positions:?} {:?}",
            self.d.capacity(),
            self.d.n_sessions(),
            self.d.n_queued(),
            SESSIONS.map(|s| self.d.active_task(s))
        )
    }

    /// An event that must change nothing.
    fn no_op(&mut self, event: Event) {
        let before = self.snapshot();
        let a = self.handle(event.clone());
        assert_eq!(a, vec![], "{event:?}");
        assert_eq!(self.snapshot(), before, "{event:?} changed the state");
    }

    fn step(&mut self, op: &Op) {
        self.now += 10;
        match op {
            Op::Submit {
                session,
                busy,
                mode,
                background,
                message_id,
            } => {
                // Sessions whose task runs (handshake done), else any with a task.
                let running = |w: &World, s: &str| {
                    w.active
                        .get(s)
                        .is_some_and(|t| w.agents.iter().any(|a| a.task == *t && a.ready))
                };
                let mut busy_sessions: Vec<&'static str> =
                    SESSIONS.into_iter().filter(|s| running(self, s)).collect();
                if busy_sessions.is_empty() {
                    busy_sessions = SESSIONS
                        .into_iter()
                        .filter(|s| self.active.contains_key(*s))
                        .collect();
                }
                let session = if *busy && !busy_sessions.is_empty() {
                    busy_sessions.swap_remove(session % busy_sessions.len())
                } else {
                    SESSIONS[*session]
                };
                self.submit(
                    session,
                    *mode,
                    *background,
                    message_id.map(|m| format!("m{m}")),
                )
            }
            Op::Settings(s, settings) => {
                let session = SESSIONS[*s];
                match settings {
                    Some(q) => {
                        self.d.set_settings(session, *q);
                        self.settings.insert(session.to_string(), *q);
                    }
                    None => {
                        self.d.reset_settings(session);
                        self.settings.remove(session);
                    }
                }
            }
            Op::CompleteSpawn(i, ok, handshake) => {
                if !self.pending.is_empty() {
                    let task = self.pending[i.index(self.pending.len())];
                    self.complete_spawn(task, *ok);
                    if let (true, Some(steer)) = (*ok, handshake) {
                        self.ready(task, *steer);
                    }
                }
            }
            Op::Ready(i, steer) => {
                let idle: Vec<TaskId> = self
                    .agents
                    .iter()
                    .filter(|a| !a.ready)
                    .map(|a| a.task)
                    .collect();
                if !idle.is_empty() {
                    self.ready(idle[i.index(idle.len())], *steer);
                }
            }
            Op::Progress(i) => {
                if let Some(task) = self.pick_agent(i) {
                    let text = format!("progress at {}", self.now);
                    let a = self.handle(Event::Progress {
                        task_id: task,
                        text: text.clone(),
                    });
                    assert_eq!(a, vec![]);
                    assert_eq!(self.d.task(&task).unwrap().progress, Some(text));
                }
            }
            Op::Report(i, k) => {
                if let Some(task) = self.pick_agent(i) {
                    let outcome = [
                        ReportOutcome::Succeeded,
                        ReportOutcome::Failed,
                        ReportOutcome::Cancelled,
                    ][*k];
                    let report = AgentReport {
                        outcome,
                        text: "result".into(),
                        command_exit: None,
                    };
                    let first = !self.reports.contains_key(&task);
                    let running = !self.stop_step.contains_key(&task)
                        && self.agents.iter().any(|a| a.task == task && a.ready);
                    self.reports.entry(task).or_insert(report.clone());
                    let a = self.handle(Event::Report {
                        task_id: task,
                        report,
                    });
                    // A report frees nothing and admits nothing; a running agent's
                    // first report gives it the exit grace.
                    let want = if first && running {
                        hit("exit grace armed");
                        vec![Action::SetExitGrace {
                            task_id: task,
                            after: CANCEL_GRACE,
                        }]
                    } else {
                        vec![]
                    };
                    assert_eq!(a, want);
                    self.apply(a);
                }
            }
            Op::ProtocolError(i) => {
                if let Some(task) = self.pick_agent(i) {
                    let error = format!("garbage {}", self.now);
                    // Once the agent was signalled (SIGTERM or SIGKILL), the stop in
                    // progress owns the outcome: a broken channel changes nothing.
                    let signalled = self
                        .stop_step
                        .get(&task)
                        .is_some_and(|(step, _)| *step >= StopStep::Sigterm);
                    let want = if signalled {
                        hit("protocol error after a signal");
                        vec![]
                    } else {
                        self.protocol_error.entry(task).or_insert(error.clone());
                        vec![Action::Signal {
                            task_id: task,
                            step: StopStep::Sigkill,
                        }]
                    };
                    let a = self.handle(Event::ProtocolError {
                        task_id: task,
                        error,
                    });
                    assert_eq!(a, want);
                    self.apply(a);
                }
            }
            Op::Reap(i, k) => {
                if let Some(task) = self.pick_agent(i) {
                    let status = [
                        ExitStatus::code(0),
                        ExitStatus::code(1),
                        ExitStatus::signal(9),
                        ExitStatus::signal(15),
                    ][*k];
                    self.reap(task, status);
                }
            }
            Op::FireTimer(i) => {
                if !self.timers.is_empty() {
                    let (task, step) = self.timers.remove(i.index(self.timers.len()));
                    self.fire(task, step);
                }
            }
            Op::FireDebounce(i) => {
                if !self.debounce_timers.is_empty() {
                    let (session, generation) = self
                        .debounce_timers
                        .remove(i.index(self.debounce_timers.len()));
                    self.fire_debounce(session, generation);
                }
            }
            Op::ReplayDebounce(i, k) => {
                // Timers that fired already, or that were never armed: stale.
                let (session, generation) = match k {
                    0 if !self.fired_debounces.is_empty() => {
                        self.fired_debounces[i.index(self.fired_debounces.len())].clone()
                    }
                    1 => (
                        SESSIONS[i.index(SESSIONS.len())].to_string(),
                        self.last_generation + 1 + i.index(5) as u64,
                    ),
                    _ => ("nobody".to_string(), self.last_generation),
                };
                self.no_op(Event::Debounce {
                    session,
                    generation,
                });
            }
            Op::Tick(advance) => {
                self.now += advance;
                self.tick();
                // Time passing is when the daemon's liveness check may find an agent
                // hung or timed out (the tick's own length picks which, so the other
                // operations' random stream stays as it was).
                if advance % 4 == 0 {
                    let hung = advance % 8 == 0;
                    let pick = (advance / 8) as usize;
                    if !self.agents.is_empty() {
                        let task = self.agents[pick % self.agents.len()].task;
                        self.watchdog_fires(task, hung);
                    } else if let Some(task) = self
                        .submitted
                        .iter()
                        .copied()
                        .filter(|t| self.finished.contains_key(t))
                        .nth(pick % 7)
                    {
                        // A late verdict about a task that has ended changes nothing.
                        let event = if hung {
                            Event::Hung { task_id: task }
                        } else {
                            Event::TimedOut { task_id: task }
                        };
                        self.no_op(event);
                    }
                }
            }
            Op::Stop(target, scope) => self.stop(target, *scope),
            Op::Stale(i, k) => {
                // Tasks without an agent: finished ones (late, duplicated events) and
                // queued ones (events that cannot be about them).
                let no_agent: Vec<TaskId> = self
                    .submitted
                    .iter()
                    .copied()
                    .filter(|t| self.finished.contains_key(t) || !self.admitted.contains(t))
                    .collect();
                if !no_agent.is_empty() {
                    let task_id = no_agent[i.index(no_agent.len())];
                    let event = match k {
                        0 => Event::Spawned {
                            task_id,
                            pid: 99_999,
                        },
                        1 => Event::SpawnFailed {
                            task_id,
                            error: "stale".into(),
                        },
                        2 => Event::AgentReady {
                            task_id,
                            steer: true,
                        },
                        3 => Event::Progress {
                            task_id,
                            text: "stale".into(),
                        },
                        4 => Event::Report {
                            task_id,
                            report: AgentReport {
                                outcome: ReportOutcome::Succeeded,
                                text: "stale".into(),
                                command_exit: None,
                            },
                        },
                        5 => Event::ProtocolError {
                            task_id,
                            error: "stale".into(),
                        },
                        6 => Event::StopTimer {
                            task_id,
                            step: StopStep::Sigterm,
                        },
                        7 => Event::StopTimer {
                            task_id,
                            step: StopStep::Sigkill,
                        },
                        _ => Event::Reaped {
                            task_id,
                            status: ExitStatus::code(0),
                        },
                    };
                    self.no_op(event);
                }
            }
        }
        self.check();
    }

    fn pick_agent(&self, i: &Index) -> Option<TaskId> {
        (!self.agents.is_empty()).then(|| self.agents[i.index(self.agents.len())].task)
    }

    /// A message arrives: the model predicts what becomes of it, then checks the
    /// dispatcher's answer and actions against that.
    fn submit(
        &mut self,
        session: &str,
        mode: Option<Mode>,
        background: bool,
        message_id: Option<String>,
    ) {
        let task_id = id(self.next_id);
        self.next_id += 1;
        let text = format!("text {task_id}");
        let priority = if background {
            Priority::Background
        } else {
            Priority::Interactive
        };
        let message = Message {
            task_id,
            session: session.to_string(),
            text: text.clone(),
            message_id: message_id.clone(),
            priority,
            mode,
        };
        let before = self.snapshot();

        // Invariant 11: a re-delivery is acknowledged with the original task.
        if let Some(mid) = &message_id {
            if let Some(&original) = self.dedup.get(&(session.to_string(), mid.clone())) {
                hit("duplicate");
                let (r, a) = self.d.accept(message, Millis(self.now));
                assert_eq!(r, Ok(Accepted::Duplicate { task_id: original }));
                assert_eq!(a.into_vec(), vec![]);
                assert_eq!(self.snapshot(), before);
                return;
            }
        }

        let settings = self.settings(session);
        let mut mode = mode.unwrap_or(settings.mode);
        let active = self.active.get(session).copied();
        let mut want_notice = false;
        let mut steer_into = None;
        if matches!(mode, Mode::Steer | Mode::SteerBacklog) {
            match active {
                None => mode = Mode::Followup,
                Some(t) if self.steerable(t) => steer_into = Some(t),
                Some(_) => {
                    hit("steer fell back");
                    want_notice = true;
                    mode = Mode::Followup;
                }
            }
        }
        let record = |w: &mut World, mode: Mode| {
            w.msgs.insert(
                task_id,
                Msg {
                    session: session.to_string(),
                    text: text.clone(),
                    priority,
                    mode,
                    message_id: message_id.clone(),
                    created: w.now,
                },
            );
            w.submitted.push(task_id);
            w.remember(session, &message_id, task_id);
        };

        // Steer: into the running task, and it ends there.
        if let (Mode::Steer, Some(into)) = (mode, steer_into) {
            hit("steered");
            hit("accepted");
            record(self, mode);
            self.steered.insert(task_id, into);
            self.expect_steer = Some((into, text.clone()));
            let (r, a) = self.d.accept(message, Millis(self.now));
            assert_eq!(
                r,
                Ok(Accepted::Task {
                    task_id,
                    steered_into: Some(into),
                    dropped: vec![],
                    notice: None
                })
            );
            let a = a.into_vec();
            assert_eq!(a.len(), 2, "{a:?}");
            self.apply(a);
            assert!(self.finished.contains_key(&task_id));
            return;
        }

        // Refusals change nothing and leave no trace.
        let held = self.queues.get(session).map_or(0, VecDeque::len);
        let cap = settings.cap.max(1) as usize;
        let makes_room = held >= cap && settings.drop != DropPolicy::New;
        let refusal = if !makes_room
            && !self.starts_at_once(session, priority)
            && self.n_queued() >= self.p.max_queued as usize
        {
            Some(Refused::QueueFull {
                limit: self.p.max_queued,
            })
        } else if held >= cap && settings.drop == DropPolicy::New {
            Some(Refused::SessionFull { cap: settings.cap })
        } else {
            None
        };
        if let Some(refusal) = refusal {
            hit(match refusal {
                Refused::QueueFull { .. } => "refused: queue full",
                Refused::SessionFull { .. } => "refused: session full",
            });
            let (r, a) = self.d.accept(message, Millis(self.now));
            assert_eq!(r, Err(refusal));
            assert_eq!(a.into_vec(), vec![]);
            assert_eq!(self.snapshot(), before);
            return;
        }

        // Overflow: the oldest held messages make room.
        let overflow = (held + 1).saturating_sub(cap);
        let dropped: Vec<TaskId> = self
            .queues
            .get(session)
            .map(|q| q.iter().take(overflow).copied().collect())
            .unwrap_or_default();
        for t in &dropped {
            hit("dropped");
            self.expect_end.insert(*t, Ending::Dropped);
            if settings.drop == DropPolicy::Summarize {
                let p = preview(&self.msgs[t].text);
                self.previews
                    .entry(session.to_string())
                    .or_default()
                    .push(p);
            }
        }
        if let Some(into) = steer_into {
            // steer-backlog: steered now, and kept as its own follow-up.
            hit("steer-backlog steered");
            self.expect_steer = Some((into, text.clone()));
            mode = Mode::Followup;
        }
        let stops =
            mode == Mode::Interrupt && active.is_some_and(|t| !self.stop_step.contains_key(&t));
        hit("accepted");
        record(self, mode);
        self.sealed.remove(session);
        let queue = self.queues.entry(session.to_string()).or_default();
        if mode == Mode::Interrupt {
            // Runs next, and no quiet time holds it.
            queue.push_front(task_id);
            self.debounce.remove(session);
        } else {
            queue.push_back(task_id);
            if self.debounce.contains_key(session) {
                hit("debounce re-armed");
                // A new message in the quiet window starts it again.
                self.debounce.insert(session.to_string(), None);
            }
        }
        self.refresh_waiting();

        let (r, a) = self.d.accept(message, Millis(self.now));
        let a = a.into_vec();
        match r {
            Ok(Accepted::Task {
                task_id: t,
                steered_into,
                dropped: d,
                notice,
            }) => {
                assert_eq!(t, task_id);
                assert_eq!(steered_into, steer_into);
                assert_eq!(d, dropped);
                assert_eq!(notice.is_some(), want_notice || stops, "{notice:?}");
            }
            other => panic!("{task_id}: {other:?}"),
        }
        if stops {
            hit("interrupt stopped a task");
            let stopped = active.unwrap();
            assert!(
                a.contains(&Action::SendCancel { task_id: stopped }),
                "{a:?}"
            );
            self.interrupted.insert(stopped);
        } else {
            assert!(
                !a.iter().any(|a| matches!(a, Action::SendCancel { .. })),
                "{a:?}"
            );
        }
        self.apply(a);
    }

    /// The agent's handshake, saying whether it accepts steering.
    fn ready(&mut self, task: TaskId, steer: bool) {
        let agent = self.agents.iter_mut().find(|a| a.task == task).unwrap();
        agent.ready = true;
        agent.steer = steer;
        let stopping = self.stop_step.contains_key(&task);
        let a = self.handle(Event::AgentReady {
            task_id: task,
            steer,
        });
        assert_eq!(a, vec![]);
        let state = &self.d.task(&task).unwrap().state;
        if stopping {
            assert!(matches!(state, TaskState::Stopping { .. }), "{state:?}");
        } else {
            assert!(
                matches!(state, TaskState::Running { steer: s, .. } if *s == steer),
                "{state:?}"
            );
        }
    }

    fn complete_spawn(&mut self, task: TaskId, ok: bool) {
        self.pending.retain(|t| *t != task);
        if ok {
            let pid = self.next_pid;
            self.next_pid += 1;
            self.agents.push(Agent {
                task,
                ready: false,
                steer: false,
            });
            let a = self.handle(Event::Spawned { task_id: task, pid });
            assert_eq!(a, vec![]);
            assert_eq!(self.d.task(&task).unwrap().state.pid(), Some(pid));
        } else {
            let a = self.handle(Event::SpawnFailed {
                task_id: task,
                error: "exec failed".into(),
            });
            self.apply(a);
            let done = self.finished.get(&task).expect("a failed spawn finishes");
            assert!(matches!(
                &done.state,
                TaskState::Done { ending: Ending::Failed { reason }, exit: None }
                    if reason.contains("exec failed")
            ));
        }
    }

    /// The liveness check says `task`'s agent is hung (`true`) or timed out. A stop
    /// under way owns the outcome; silence after a report is not a hang (the exit
    /// grace governs); else the stop sequence begins.
    fn watchdog_fires(&mut self, task: TaskId, hung: bool) {
        let stopping = self.stop_step.contains_key(&task);
        let reported = self.reports.contains_key(&task);
        let silent_after_report = hung && reported;
        let starts = !(stopping || silent_after_report);
        let want = if starts {
            hit("watchdog stopped a task");
            self.watchdog.insert(task, hung);
            vec![
                Action::SendCancel { task_id: task },
                Action::SetTimer {
                    task_id: task,
                    after: CANCEL_GRACE,
                    step: StopStep::Sigterm,
                },
            ]
        } else {
            if self.stop_step.contains_key(&task) {
                hit("watchdog during a stop");
            }
            vec![]
        };
        let event = if hung {
            Event::Hung { task_id: task }
        } else {
            Event::TimedOut { task_id: task }
        };
        let a = self.handle(event);
        assert_eq!(a, want, "watchdog (hung: {hung}) of {task}");
        self.apply(a);
    }

    fn reap(&mut self, task: TaskId, status: ExitStatus) {
        let handshake = self.agents.iter().any(|a| a.task == task && a.ready);
        self.agents.retain(|a| a.task != task);
        let a = self.handle(Event::Reaped {
            task_id: task,
            status,
        });
        self.apply(a);
        let done = self.finished.get(&task).expect("a reaped task finishes");
        let TaskState::Done { ending, exit } = &done.state else {
            unreachable!()
        };
        assert_eq!(*exit, Some(status));
        if let Some(error) = self.protocol_error.get(&task) {
            assert!(
                matches!(ending, Ending::Failed { reason } if reason.contains(error.as_str())),
                "{ending:?}"
            );
        } else if let Some(&hung) = self.watchdog.get(&task) {
            hit("ended hung or timed out");
            let reason = if hung { HUNG } else { TIMED_OUT };
            assert_eq!(
                ending,
                &Ending::Failed {
                    reason: reason.into()
                }
            );
        } else if self.lingered.contains(&task) {
            let want = match self.reports[&task].outcome {
                ReportOutcome::Succeeded => Ending::Succeeded,
                ReportOutcome::Failed => Ending::Failed {
                    reason: "agent reported failure (and was stopped for not exiting)".into(),
                },
                ReportOutcome::Cancelled => Ending::Cancelled {
                    by: None,
                    after: Duration::ZERO,
                },
            };
            assert_eq!(ending, &want);
        } else if let Some(&(step, requested)) = self.stop_step.get(&task) {
            let by = Some(step);
            let after = Duration::from_millis(self.now - requested);
            if self.interrupted.contains(&task) {
                hit("ended interrupted");
                assert_eq!(
                    ending,
                    &Ending::Interrupted {
                        by,
                        after,
                        why: Interruption::NewerMessage
                    }
                );
            } else {
                assert_eq!(ending, &Ending::Cancelled { by, after });
            }
        } else if !handshake {
            assert!(
                matches!(ending, Ending::Failed { reason } if reason.contains("before its handshake")),
                "{ending:?}"
            );
        } else {
            match self.reports.get(&task).map(|r| r.outcome) {
                Some(ReportOutcome::Succeeded) if status.success() => {
                    assert_eq!(ending, &Ending::Succeeded)
                }
                Some(ReportOutcome::Cancelled) => assert!(
                    matches!(ending, Ending::Cancelled { by: None, .. }),
                    "{ending:?}"
                ),
                Some(_) => assert!(matches!(ending, Ending::Failed { .. }), "{ending:?}"),
                None => assert!(
                    matches!(ending, Ending::Failed { reason } if reason.contains("without reporting")),
                    "{ending:?}"
                ),
            }
        }
    }

    /// A stop timer (`Some(step)`) or an exit grace (`None`) fires.
    fn fire(&mut self, task: TaskId, step: Option<StopStep>) {
        let Some(step) = step else {
            return self.fire_exit_grace(task);
        };
        let current = self.stop_step.get(&task).map(|(s, _)| *s);
        let a = self.handle(Event::StopTimer {
            task_id: task,
            step,
        });
        let want = if self.finished.contains_key(&task) || current.is_none_or(|c| c >= step) {
            vec![]
        } else if step == StopStep::Sigterm {
            vec![
                Action::Signal {
                    task_id: task,
                    step,
                },
                Action::SetTimer {
                    task_id: task,
                    after: TERM_GRACE,
                    step: StopStep::Sigkill,
                },
            ]
        } else {
            vec![Action::Signal {
                task_id: task,
                step,
            }]
        };
        assert_eq!(a, want, "timer {step:?} of {task}, last step {current:?}");
        self.apply(a);
    }

    /// A running agent that reported and is still alive when its exit grace ends
    /// lingers: it is stopped from SIGTERM on. One stopped since keeps that stop's
    /// graces: the exit grace does nothing.
    fn fire_exit_grace(&mut self, task: TaskId) {
        let lingers = !self.finished.contains_key(&task)
            && !self.stop_step.contains_key(&task)
            && self.reports.contains_key(&task)
            && self.agents.iter().any(|a| a.task == task && a.ready);
        let a = self.handle(Event::ExitGraceOver { task_id: task });
        let want = if lingers {
            hit("lingered");
            self.lingered.insert(task);
            self.stop_step
                .insert(task, (StopStep::CooperativeCancel, self.now));
            vec![
                Action::Signal {
                    task_id: task,
                    step: StopStep::Sigterm,
                },
                Action::SetTimer {
                    task_id: task,
                    after: TERM_GRACE,
                    step: StopStep::Sigkill,
                },
            ]
        } else {
            if self.stop_step.contains_key(&task) && !self.finished.contains_key(&task) {
                hit("exit grace over during a stop");
            }
            vec![]
        };
        assert_eq!(a, want, "exit grace of {task}");
        self.apply(a);
    }

    fn fire_debounce(&mut self, session: String, generation: u64) {
        self.fired_debounces.push((session.clone(), generation));
        let event = Event::Debounce {
            session: session.clone(),
            generation,
        };
        if self.debounce.get(&session) != Some(&Some(generation)) {
            // Stale: a newer message re-armed it, an interrupt or the end of the
            // session's work cleared it.
            hit("debounce stale");
            return self.no_op(event);
        }
        hit("debounce ended");
        self.debounce.remove(&session);
        self.refresh_waiting();
        let a = self.handle(event);
        assert!(
            a.iter()
                .all(|a| matches!(a, Action::Spawn { .. } | Action::Finished(_))),
            "the end of a quiet time only admits: {a:?}"
        );
        self.apply(a);
    }

    fn tick(&mut self) {
        let expired: Vec<TaskId> = match self.p.queue_timeout {
            None => Vec::new(),
            Some(timeout) => self
                .queues
                .values()
                .flatten()
                .copied()
                .filter(|t| self.now - self.msgs[t].created >= timeout.as_millis() as u64)
                .collect(),
        };
        if expired.is_empty() {
            return self.no_op(Event::Tick);
        }
        for t in &expired {
            hit("expired");
            self.expect_end.insert(*t, Ending::Expired);
        }
        let a = self.handle(Event::Tick);
        assert!(
            a.iter()
                .all(|a| matches!(a, Action::Spawn { .. } | Action::Finished(_))),
            "{a:?}"
        );
        self.apply(a);
    }

    fn stop(&mut self, target: &Target, scope: Option<usize>) {
        let scope = match scope {
            None => Scope::Owner,
            Some(s) => Scope::Chat(SESSIONS[s].to_string()),
        };
        let chat = match &scope {
            Scope::Chat(s) => Some(s.clone()),
            Scope::Owner => None,
        };
        let (target, expected) = match target {
            Target::Task(i) => {
                let task_id = if self.submitted.is_empty() {
                    id(u128::MAX)
                } else {
                    self.submitted[i.index(self.submitted.len())]
                };
                let expected = match self.msgs.get(&task_id).map(|m| &m.session) {
                    _ if self.finished.contains_key(&task_id) => Err(StopError::NotFound(task_id)),
                    None => Err(StopError::NotFound(task_id)),
                    Some(session) if chat.as_ref().is_some_and(|c| c != session) => {
                        Err(StopError::Forbidden {
                            task_id,
                            session: session.clone(),
                        })
                    }
                    Some(_) => Ok(vec![task_id]),
                };
                (StopTarget::Task(task_id), expected)
            }
            Target::Current(s) | Target::All(s) => {
                let session = SESSIONS[*s].to_string();
                let queued: Vec<TaskId> = self
                    .queues
                    .get(&session)
                    .map(|q| q.iter().copied().collect())
                    .unwrap_or_default();
                let active = self.active.get(&session).copied();
                let expected = if chat.as_ref().is_some_and(|c| *c != session) {
                    Err(StopError::OtherSession {
                        session: session.clone(),
                    })
                } else if matches!(target, Target::Current(_)) {
                    Ok(active.or(queued.first().copied()).into_iter().collect())
                } else {
                    Ok(queued.into_iter().chain(active).collect())
                };
                let t = match target {
                    Target::Current(_) => StopTarget::SessionCurrent(session),
                    _ => StopTarget::SessionAll(session),
                };
                (t, expected)
            }
            Target::Everything => {
                let expected = if chat.is_some() {
                    Ok(vec![])
                } else {
                    let mut all: Vec<TaskId> = self
                        .submitted
                        .iter()
                        .copied()
                        .filter(|t| !self.finished.contains_key(t))
                        .collect();
                    all.sort();
                    Ok(all)
                };
                (StopTarget::Everything, expected)
            }
        };
        let result = self.d.stop(target.clone(), &scope, Millis(self.now));
        let (ids, actions) = match (result, expected) {
            (Err(got), Err(want)) => {
                assert_eq!(got, want, "{target:?} by {scope:?}");
                return;
            }
            (Ok((ids, actions)), Ok(want)) => {
                let mut sorted = ids.clone();
                if matches!(target, StopTarget::Everything) {
                    sorted.sort();
                }
                assert_eq!(sorted, want, "{target:?} by {scope:?}");
                (ids, actions.into_vec())
            }
            (got, want) => panic!("{target:?} by {scope:?}: got {got:?}, want {want:?}"),
        };
        // Invariant 10: a chat's stop touches only its own tasks.
        if let Some(chat) = &chat {
            for a in &actions {
                let task_id = match a {
                    Action::Finished(t) => t.id,
                    Action::SendCancel { task_id }
                    | Action::Signal { task_id, .. }
                    | Action::SetTimer { task_id, .. }
                    | Action::SetExitGrace { task_id, .. }
                    | Action::Steer { task_id, .. }
                    | Action::Spawn { task_id, .. } => *task_id,
                    Action::SetDebounce { .. } => panic!("a stop armed a debounce: {a:?}"),
                };
                assert_eq!(self.session_of(&task_id), chat, "{a:?}");
            }
        }
        // Queued targets end at once, before any running one is asked to stop. Work
        // may be admitted last: cancelling a session's next task, held back as
        // background work, can leave interactive work next (`apply` checks each
        // Spawn, and a stop-all's session is sealed).
        let first_cancel = actions
            .iter()
            .position(|a| matches!(a, Action::SendCancel { .. }))
            .unwrap_or(actions.len());
        let first_spawn = actions
            .iter()
            .position(|a| matches!(a, Action::Spawn { .. }))
            .unwrap_or(actions.len());
        for (n, a) in actions.iter().enumerate() {
            match a {
                Action::Spawn { .. } => {}
                Action::Finished(_) => assert!(n < first_cancel.min(first_spawn), "{actions:?}"),
                Action::SendCancel { .. } | Action::SetTimer { .. } => {
                    assert!(n < first_spawn, "{actions:?}")
                }
                other => panic!("a stop did {other:?}"),
            }
        }
        for task_id in &ids {
            let queued = !self.admitted.contains(task_id);
            let ended = actions
                .iter()
                .any(|a| matches!(a, Action::Finished(t) if t.id == *task_id));
            assert_eq!(
                queued, ended,
                "{task_id}: queued targets end at once, others later"
            );
            if queued {
                self.expect_end.insert(
                    *task_id,
                    Ending::Cancelled {
                        by: None,
                        after: Duration::ZERO,
                    },
                );
            } else if !self.stop_step.contains_key(task_id) {
                assert!(actions.contains(&Action::SendCancel { task_id: *task_id }));
            }
        }
        match &target {
            StopTarget::SessionAll(s) => {
                self.sealed.insert(s.clone());
            }
            StopTarget::Everything if chat.is_none() => {
                self.sealed.extend(SESSIONS.map(String::from));
            }
            _ => {}
        }
        self.apply(actions);
    }

    /// Lets every agent end: spawns complete, agents are reaped, timers fire.
    fn quiesce(&mut self) {
        for _ in 0..10_000 {
            self.now += 10;
            if let Some(&task) = self.pending.first() {
                self.complete_spawn(task, true);
            } else if let Some(agent) = self.agents.first() {
                self.reap(agent.task, ExitStatus::code(0));
            } else if !self.timers.is_empty() {
                let (task, step) = self.timers.remove(0);
                self.fire(task, step);
            } else if !self.debounce_timers.is_empty() {
                let (session, generation) = self.debounce_timers.remove(0);
                self.fire_debounce(session, generation);
            } else {
                return;
            }
            self.check();
        }
        panic!("the world does not quiesce");
    }

    /// Invariant 6: every accepted message ended in exactly one place.
    /// A stop's cause only ever gets stronger, and it is the strongest the model
    /// knows of: the first protocol error, else a linger, else an interrupt.
    fn check_stop_causes(&self, seen: &mut HashMap<TaskId, u8>) {
        for task in self.d.tasks() {
            let TaskState::Stopping { cause, .. } = &task.state else {
                continue;
            };
            let rank = cause.rank();
            if let Some(before) = seen.insert(task.id, rank) {
                assert!(before <= rank, "{}: cause weakened to {cause:?}", task.id);
            }
            let expected = if let Some(error) = self.protocol_error.get(&task.id) {
                Some(StopCause::ProtocolError(error.clone()))
            } else if self.lingered.contains(&task.id) {
                Some(StopCause::Linger)
            } else if self.interrupted.contains(&task.id) {
                Some(StopCause::Interrupt)
            } else if let Some(&hung) = self.watchdog.get(&task.id) {
                Some(if hung {
                    StopCause::Hung
                } else {
                    StopCause::TimedOut
                })
            } else {
                None
            };
            if let Some(expected) = expected {
                assert_eq!(cause, &expected, "{}", task.id);
            }
        }
    }

    fn check_every_message_ended(&self) {
        assert_eq!(self.finished.len(), self.submitted.len());
        for task_id in &self.submitted {
            let task = self
                .finished
                .get(task_id)
                .unwrap_or_else(|| panic!("{task_id} never finished"));
            let TaskState::Done { ending, .. } = &task.state else {
                unreachable!()
            };
            if self.admitted.contains(task_id) {
                // It ran: its own task ended after running.
                assert!(matches!(
                    ending,
                    Ending::Succeeded
                        | Ending::Failed { .. }
                        | Ending::Cancelled { .. }
                        | Ending::Interrupted { .. }
                ));
            } else {
                match ending {
                    Ending::Merged { into } => {
                        // Into a task of its session that ran (collected), or that was
                        // running when it was steered.
                        assert!(self.admitted.contains(into), "{task_id} merged into {into}");
                        assert_eq!(self.session_of(into), self.session_of(task_id));
                    }
                    Ending::Dropped | Ending::Expired => {}
                    Ending::Cancelled { by: None, after } => assert_eq!(*after, Duration::ZERO),
                    other => panic!("{task_id} never ran but ended {other:?}"),
                }
            }
        }
    }
}

/// One random run: the ops, then quiescence, then the end-of-run checks.
fn run_case(p: Params, ops: &[Op]) {
    let mut w = World::new(p);
    w.check();
    // The strength of each stopping task's cause, as last seen.
    let mut causes: HashMap<TaskId, u8> = HashMap::new();
    for op in ops {
        w.step(op);
        w.check_stop_causes(&mut causes);
    }
    w.quiesce();
    w.check_every_message_ended();
    // Invariant 8: nothing left in the hot maps but settings and the window.
    assert_eq!(w.d.n_sessions(), 0);
    assert_eq!(w.d.tasks().count(), 0);
    assert_eq!(w.d.n_queued(), 0);
    assert_eq!(w.d.capacity().busy, 0);
    assert!(w.d.positions().is_empty());
    // The window still answers for what it holds.
    let window: Vec<((String, String), TaskId)> =
        w.dedup.iter().map(|(k, t)| (k.clone(), *t)).collect();
    for ((session, message_id), original) in window {
        let m = Message {
            message_id: Some(message_id),
            ..Message::new(id(u128::MAX), session, "again")
        };
        let (r, a) = w.d.accept(m, Millis(w.now));
        assert_eq!(r, Ok(Accepted::Duplicate { task_id: original }));
        assert_eq!(a.into_vec(), vec![]);
    }
}

/// The model-based test. Run by hand (not with `proptest!`) so that, once every case
/// passed, it can check that the cases met every behaviour they are meant to check.
#[test]
fn dispatcher_keeps_its_invariants() {
    // 256 cases unless PROPTEST_CASES says otherwise, from a fixed seed: the coverage
    // floors below must not depend on luck, and a failure must replay the same way.
    // (Raise PROPTEST_CASES for a longer soak.)
    let config = ProptestConfig {
        source_file: Some(file!()),
        ..ProptestConfig::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    let strategy = (params(), prop::collection::vec(op(), 0..80));
    if let Err(e) = runner.run(&strategy, |(p, ops)| {
        run_case(p, &ops);
        Ok(())
    }) {
        panic!("{e}");
    }
    let coverage = COVERAGE.lock().unwrap();
    eprintln!("coverage: {coverage:#?}");
    for (what, at_least) in COVERED {
        let n = coverage.get(what).copied().unwrap_or(0);
        assert!(n >= at_least, "only {n} × {what:?} (want {at_least})");
    }
}

/// A command word in random case, with or without a `@botname`.
fn command_word(word: &'static str) -> impl Strategy<Value = String> {
    (
        prop::collection::vec(any::<bool>(), word.len()),
        prop::option::of("[a-z_]{1,12}"),
    )
        .prop_map(move |(upper, bot)| {
            let mut w: String = word
                .chars()
                .zip(upper)
                .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
                .collect();
            if let Some(bot) = bot {
                w.push('@');
                w.push_str(&bot);
            }
            w
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Chat text never crashes the parser, and only text that starts with `/` can be a
    /// command: everything else is work.
    #[test]
    fn chat_text_not_starting_with_a_slash_is_work(text in any::<String>()) {
        let parsed = parse_chat_command(&text);
        if !text.trim().starts_with('/') {
            prop_assert_eq!(parsed, None);
        }
    }

    #[test]
    fn stop_commands_parse_in_any_case_and_spacing(
        word in command_word("stop"),
        all in command_word("all"),
        arg in 0..3usize,
        pad in "[ \t\n]{0,3}",
        gap in "[ \t]{1,3}",
    ) {
        let all = all.split('@').next().unwrap().to_string();
        let (text, want) = match arg {
            0 => (format!("{pad}/{word}{pad}"), StopArg::Current),
            1 => (format!("{pad}/{word}{gap}{all}{pad}"), StopArg::All),
            _ => (format!("/{word}{gap}0192abcd{pad}"), StopArg::Task("0192abcd".into())),
        };
        prop_assert_eq!(parse_chat_command(&text), Some(ChatCommand::Stop(want)), "{:?}", text);
        // A second argument makes it work text.
        let text = format!("/{word} the build");
        prop_assert_eq!(parse_chat_command(&text), None);
    }

    /// `/queue [mode] [debounce:…] [cap:…] [drop:…]` parses whatever options are given,
    /// in any case and order, into the change they name.
    #[test]
    fn queue_settings_commands_parse(
        word in command_word("queue"),
        mode in prop::option::of(prop::sample::select(Mode::all().collect::<Vec<_>>())),
        debounce in prop::option::of(0..10_000u64),
        cap in prop::option::of(1..100u32),
        drop in prop::option::of(prop::sample::select(DROPS.to_vec())),
        upper in any::<bool>(),
        reverse in any::<bool>(),
        gap in "[ \t]{1,3}",
    ) {
        let case = |s: &str| if upper { s.to_ascii_uppercase() } else { s.to_string() };
        let mut options: Vec<String> = Vec::new();
        if let Some(d) = debounce {
            options.push(format!("{}:{d}ms", case("debounce")));
        }
        if let Some(c) = cap {
            options.push(format!("{}:{c}", case("cap")));
        }
        if let Some(d) = drop {
            options.push(format!("{}:{}", case("drop"), case(d.as_str())));
        }
        if reverse {
            options.reverse();
        }
        let mut words: Vec<String> = vec![format!("/{word}")];
        words.extend(mode.map(|m| case(m.as_str())));
        words.extend(options);
        let text = words.join(&gap);
        let want = if mode.is_none() && debounce.is_none() && cap.is_none() && drop.is_none() {
            QueueCommand::Show
        } else {
            QueueCommand::Set(QueueChange {
                mode,
                debounce: debounce.map(Duration::from_millis),
                cap,
                drop,
            })
        };
        prop_assert_eq!(parse_chat_command(&text), Some(ChatCommand::Queue(want)), "{:?}", text);
    }
}

/// One step of the position test: long queues over many sessions.
#[derive(Debug, Clone)]
enum PosOp {
    Send {
        session: usize,
        background: bool,
        mode: Option<Mode>,
    },
    /// The agent of the `n`-th active task exits.
    Reap(Index),
    /// A stop of the `n`-th queued task.
    StopQueued(Index),
    /// Every pending debounce timer fires.
    Quiet,
    /// Time passes (ticks expire old work).
    Wait(u64),
}

fn pos_op() -> impl Strategy<Value = PosOp> {
    prop_oneof![
        8 => (0..12usize, any::<bool>(), prop::option::of(prop::sample::select(vec![
            Mode::Collect, Mode::Followup, Mode::Interrupt
        ])))
            .prop_map(|(session, background, mode)| PosOp::Send { session, background, mode }),
        3 => any::<Index>().prop_map(PosOp::Reap),
        1 => any::<Index>().prop_map(PosOp::StopQueued),
        1 => Just(PosOp::Quiet),
        1 => (1..3_000u64).prop_map(PosOp::Wait),
    ]
}

/// Every queued task's position, asked one at a time, for a session, for a set of
/// tasks, or listed in order, equals the table computed from scratch, and no position
/// moves while `order_version` stays the same, over random sequences of messages
/// (both classes, interrupts that jump the line), reaps, stops of queued work, quiet
/// times ending and expiry.
#[test]
fn fast_positions_equal_the_table_computed_from_scratch() {
    let config = ProptestConfig {
        cases: 64,
        source_file: Some(file!()),
        ..ProptestConfig::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    let strategy = (
        1..4u32,
        prop::option::of(0..2u32),
        prop::bool::ANY,
        prop::collection::vec(pos_op(), 0..300),
    );
    let result = runner.run(&strategy, |(max_concurrent, max_background, quiet, ops)| {
        let mut d = Dispatcher::new(Config {
            max_concurrent,
            max_background,
            max_queued: 10_000,
            queue_timeout: Some(Duration::from_secs(20)),
            queue: QueueSettings {
                cap: 200,
                debounce: if quiet {
                    Duration::from_secs(1)
                } else {
                    Duration::ZERO
                },
                ..QueueSettings::default()
            },
            ..Config::default()
        });
        let mut now = 1_000u64;
        let mut next_id = 1u128;
        let mut debounces: Vec<(String, u64)> = Vec::new();
        let mut pids: HashMap<TaskId, u32> = HashMap::new();
        let mut run =
            |d: &mut Dispatcher, actions: Actions, now: u64, debounces: &mut Vec<(String, u64)>| {
                // Spawns succeed at once; debounce timers are kept until `Quiet`.
                let mut pending = actions.into_vec();
                while let Some(action) = pending.pop() {
                    match action {
                        Action::Spawn { task_id, .. } => {
                            let pid = 100 + pids.len() as u32;
                            pids.insert(task_id, pid);
                            pending.extend(
                                d.handle(Event::Spawned { task_id, pid }, Millis(now))
                                    .into_vec(),
                            );
                        }
                        Action::SetDebounce {
                            session,
                            generation,
                            ..
                        } => debounces.push((session, generation)),
                        _ => {}
                    }
                }
            };
        let mut before: Option<(u64, HashMap<TaskId, u32>)> = None;
        for op in &ops {
            now += 10;
            match op {
                PosOp::Send {
                    session,
                    background,
                    mode,
                } => {
                    let msg = Message {
                        priority: if *background {
                            Priority::Background
                        } else {
                            Priority::Interactive
                        },
                        mode: *mode,
                        ..Message::new(id(next_id), format!("s{session}"), format!("m{next_id}"))
                    };
                    next_id += 1;
                    let (_, actions) = d.accept(msg, Millis(now));
                    run(&mut d, actions, now, &mut debounces);
                }
                PosOp::Reap(i) => {
                    let active: Vec<TaskId> = d.active_tasks().map(|t| t.id).collect();
                    if !active.is_empty() {
                        let task_id = active[i.index(active.len())];
                        let actions = d.handle(
                            Event::Reaped {
                                task_id,
                                status: ExitStatus::code(0),
                            },
                            Millis(now),
                        );
                        run(&mut d, actions, now, &mut debounces);
                    }
                }
                PosOp::StopQueued(i) => {
                    let mut queued: Vec<TaskId> = d
                        .tasks()
                        .filter(|t| t.state == TaskState::Queued)
                        .map(|t| t.id)
                        .collect();
                    queued.sort();
                    if !queued.is_empty() {
                        let task_id = queued[i.index(queued.len())];
                        let (_, actions) = d
                            .stop(StopTarget::Task(task_id), &Scope::Owner, Millis(now))
                            .unwrap();
                        run(&mut d, actions, now, &mut debounces);
                    }
                }
                PosOp::Quiet => {
                    for (session, generation) in std::mem::take(&mut debounces) {
                        let actions = d.handle(
                            Event::Debounce {
                                session,
                                generation,
                            },
                            Millis(now),
                        );
                        run(&mut d, actions, now, &mut debounces);
                    }
                }
                PosOp::Wait(ms) => {
                    now += ms;
                    let actions = d.handle(Event::Tick, Millis(now));
                    run(&mut d, actions, now, &mut debounces);
                }
            }
            let table = d.positions();
            prop_assert_eq!(table.len(), d.n_queued());
            // While the order version stands, no position moved.
            if let Some((version, previous)) = &before {
                if *version == d.order_version() {
                    prop_assert_eq!(previous, &table);
                }
            }
            before = Some((d.order_version(), table.clone()));
            for task in d.tasks() {
                prop_assert_eq!(d.position(&task.id), table.get(&task.id).copied());
            }
            for s in 0..12 {
                let session = format!("s{s}");
                let want: Vec<(TaskId, u32)> = d
                    .queued_tasks_of(&session)
                    .map(|t| (t.id, table[&t.id]))
                    .collect();
                prop_assert_eq!(d.session_positions(&session), want);
            }
            let listed: Vec<(TaskId, u32)> = d.queued_in_order().map(|(t, p)| (t.id, p)).collect();
            let mut by_position: Vec<(TaskId, u32)> = table.iter().map(|(t, p)| (*t, *p)).collect();
            by_position.sort_by_key(|(_, p)| *p);
            prop_assert_eq!(listed, by_position);
            let ids: Vec<TaskId> = (1..next_id).map(id).collect();
            let mut asked: Vec<(TaskId, u32)> = d.positions_of(&ids).collect();
            let mut want: Vec<(TaskId, u32)> = table.iter().map(|(t, p)| (*t, *p)).collect();
            asked.sort();
            want.sort();
            prop_assert_eq!(asked, want);
            if let Err(e) = d.check_invariants() {
                return Err(TestCaseError::fail(e));
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
