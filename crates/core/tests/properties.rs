//! Property tests for [`agentd_core::Dispatcher`]: random sequences of messages,
//! stops and world events (spawns completing or failing, handshakes, reports, protocol
//! errors, reaps, timers, stale replays) are run against a small model of the daemon
//! that executes the dispatcher's actions the way the daemon does.
//!
//! After every step the model checks the invariants of DESIGN.md that the core
//! decides: one active task per session (2), live agents within the cap and the slot
//! held until the reap (3), round-robin fairness (4), nothing lost (6), memory bounded
//! by live work (8), compare-and-release of session claims (9) and chat scope (10),
//! plus the stop sequence and how each task ends.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use agentd_core::{
    parse_chat_command, Action, AgentReport, ChatCommand, Config, Dispatcher, Ending, Event,
    ExitStatus, Millis, ReportOutcome, Scope, StopArg, StopError, StopStep, StopTarget, Task,
    TaskId, TaskState,
};
use proptest::prelude::*;
use proptest::sample::Index;

const SESSIONS: [&str; 4] = ["s0", "s1", "s2", "s3"];
const CANCEL_GRACE: Duration = Duration::from_millis(500);
const TERM_GRACE: Duration = Duration::from_millis(700);

#[derive(Debug, Clone)]
enum Target {
    /// Any task ever submitted (finished ones included), or an unknown id.
    Task(Index),
    Current(usize),
    All(usize),
    Everything,
}

#[derive(Debug, Clone)]
enum Op {
    Submit(usize),
    CompleteSpawn(Index, bool),
    Ready(Index, bool),
    Progress(Index),
    Report(Index, usize),
    ProtocolError(Index),
    Reap(Index, usize),
    FireTimer(Index),
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
        6 => (0..SESSIONS.len()).prop_map(Op::Submit),
        4 => (any::<Index>(), prop::bool::weighted(0.85)).prop_map(|(i, ok)| Op::CompleteSpawn(i, ok)),
        3 => (any::<Index>(), any::<bool>()).prop_map(|(i, s)| Op::Ready(i, s)),
        1 => any::<Index>().prop_map(Op::Progress),
        2 => (any::<Index>(), 0..3usize).prop_map(|(i, k)| Op::Report(i, k)),
        1 => any::<Index>().prop_map(Op::ProtocolError),
        4 => (any::<Index>(), 0..4usize).prop_map(|(i, k)| Op::Reap(i, k)),
        3 => any::<Index>().prop_map(Op::FireTimer),
        3 => (target(), prop::option::weighted(0.6, 0..SESSIONS.len())).prop_map(|(t, s)| Op::Stop(t, s)),
        2 => (any::<Index>(), 0..9usize).prop_map(|(i, k)| Op::Stale(i, k)),
    ]
}

fn id(n: u128) -> TaskId {
    TaskId::from_u128(n)
}

/// An agent process the model's world holds: spawned and not yet reaped.
#[derive(Debug)]
struct Agent {
    task: TaskId,
    ready: bool,
}

/// The dispatcher plus a model of the daemon and of the world around it.
struct World {
    d: Dispatcher,
    cap: u32,
    now: u64,
    next_id: u128,
    next_pid: u32,
    /// Every submitted task, in submission order, with its session.
    submitted: Vec<(TaskId, String)>,
    session_of: HashMap<TaskId, String>,
    /// Per session: queued tasks in arrival order, and the admitted unfinished task.
    queues: HashMap<String, VecDeque<TaskId>>,
    active: HashMap<String, TaskId>,
    /// Spawns ordered and not yet answered.
    pending: Vec<TaskId>,
    agents: Vec<Agent>,
    timers: Vec<(TaskId, StopStep)>,
    finished: HashMap<TaskId, Task>,
    admitted: HashSet<TaskId>,
    /// Last stop step taken on a task and when its stop began.
    stop_step: HashMap<TaskId, (StopStep, u64)>,
    protocol_error: HashMap<TaskId, String>,
    reports: HashMap<TaskId, AgentReport>,
    /// Sessions whose queued work was cancelled by a stop-all and that got no new
    /// message since: none of their tasks may be admitted.
    sealed: HashSet<String>,
    /// Sessions waiting in the ready state, with the admissions of every other session
    /// since they became ready.
    waiting: HashMap<String, HashMap<String, u32>>,
}

impl World {
    fn new(cap: u32) -> World {
        World {
            d: Dispatcher::new(Config {
                max_concurrent: cap,
                cancel_grace: CANCEL_GRACE,
                term_grace: TERM_GRACE,
            }),
            cap,
            now: 1_000,
            next_id: 1,
            next_pid: 100,
            submitted: Vec::new(),
            session_of: HashMap::new(),
            queues: HashMap::new(),
            active: HashMap::new(),
            pending: Vec::new(),
            agents: Vec::new(),
            timers: Vec::new(),
            finished: HashMap::new(),
            admitted: HashSet::new(),
            stop_step: HashMap::new(),
            protocol_error: HashMap::new(),
            reports: HashMap::new(),
            sealed: HashSet::new(),
            waiting: HashMap::new(),
        }
    }

    fn alive(&self, task: TaskId) -> bool {
        self.pending.contains(&task) || self.agents.iter().any(|a| a.task == task)
    }

    fn n_live(&self) -> usize {
        self.pending.len() + self.agents.len()
    }

    fn refresh_waiting(&mut self) {
        for s in SESSIONS {
            let ready =
                !self.active.contains_key(s) && self.queues.get(s).is_some_and(|q| !q.is_empty());
            if !ready {
                self.waiting.remove(s);
            } else {
                self.waiting.entry(s.to_string()).or_default();
            }
        }
    }

    /// Executes the dispatcher's actions like the daemon does, checking each.
    fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Spawn {
                    task_id,
                    session,
                    text,
                } => {
                    assert!(
                        !self.finished.contains_key(&task_id),
                        "Spawn of finished {task_id}"
                    );
                    assert!(self.admitted.insert(task_id), "{task_id} spawned twice");
                    assert_eq!(self.session_of.get(&task_id), Some(&session));
                    assert_eq!(text, format!("text {task_id}"));
                    assert!(
                        !self.sealed.contains(&session),
                        "{task_id} of {session} promoted after a stop-all"
                    );
                    assert!(
                        !self.active.contains_key(&session),
                        "invariant 2: {session} already runs {:?}, now {task_id}",
                        self.active.get(&session)
                    );
                    let queue = self.queues.get_mut(&session).expect("session has a queue");
                    assert_eq!(
                        queue.pop_front(),
                        Some(task_id),
                        "a session's tasks are admitted in arrival order"
                    );
                    // Invariant 4: nobody is admitted twice while another session waits.
                    for (waiter, counts) in self.waiting.iter_mut() {
                        if *waiter != session {
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
                        self.n_live() <= self.cap as usize,
                        "invariant 3: {} live agents, cap {}",
                        self.n_live(),
                        self.cap
                    );
                }
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
                    self.timers.push((task_id, step));
                }
                Action::Finished(task) => {
                    let task_id = task.id;
                    assert!(
                        !self.finished.contains_key(&task_id),
                        "{task_id} finished twice"
                    );
                    let session = self.session_of.get(&task_id).expect("known task").clone();
                    assert_eq!(task.session, session);
                    assert_eq!(task.finished_at, Some(Millis(self.now)));
                    let TaskState::Done { ending, .. } = &task.state else {
                        panic!("finished in state {:?}", task.state);
                    };
                    if self.admitted.contains(&task_id) {
                        // Invariants 3 and 9: finished only when its agent is gone, and
                        // only its own end releases its session.
                        assert!(!self.alive(task_id), "{task_id} finished with a live agent");
                        assert_eq!(self.active.remove(&session), Some(task_id));
                    } else {
                        assert_eq!(
                            ending,
                            &Ending::Cancelled {
                                by: None,
                                after: Duration::ZERO
                            },
                            "a queued task can only be cancelled"
                        );
                        let queue = self.queues.get_mut(&session).expect("queue");
                        let before = queue.len();
                        queue.retain(|t| *t != task_id);
                        assert_eq!(queue.len() + 1, before, "{task_id} was not queued");
                    }
                    self.finished.insert(task_id, task);
                }
            }
            self.refresh_waiting();
        }
    }

    /// Invariants checked after every step.
    fn check(&self) {
        if let Err(e) = self.d.check_invariants() {
            panic!("check_invariants: {e}\n{:#?}", self.d);
        }
        let mut active_per_session: HashMap<&str, u32> = HashMap::new();
        for task in self.d.tasks() {
            assert!(
                !self.finished.contains_key(&task.id),
                "finished {} still held",
                task.id
            );
            let session = &self.session_of[&task.id];
            assert_eq!(&task.session, session);
            if task.state.is_active() {
                *active_per_session.entry(&task.session).or_default() += 1;
                assert!(self.admitted.contains(&task.id));
                assert_eq!(self.active.get(session), Some(&task.id));
                assert_eq!(self.d.active_task(session), Some(task.id));
            } else {
                assert_eq!(task.state, TaskState::Queued);
                assert!(!self.admitted.contains(&task.id));
                assert!(self.d.position(&task.id).is_some());
            }
        }
        assert!(
            active_per_session.values().all(|n| *n <= 1),
            "invariant 2: {active_per_session:?}"
        );
        assert!(self.n_live() <= self.cap as usize, "invariant 3");
        // Work-conserving: a free slot is never left idle while a session waits.
        assert!(
            self.n_live() == self.cap as usize || self.waiting.is_empty(),
            "a free slot while {:?} wait",
            self.waiting.keys()
        );
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
        let n_queued: usize = self.queues.values().map(VecDeque::len).sum();
        assert_eq!(self.d.n_queued(), n_queued);
        let live_sessions = SESSIONS
            .iter()
            .filter(|s| {
                self.active.contains_key(**s) || self.queues.get(**s).is_some_and(|q| !q.is_empty())
            })
            .count();
        assert_eq!(self.d.n_sessions(), live_sessions, "invariant 8");
        let positions = self.d.positions();
        let mut all: Vec<u32> = positions.values().copied().collect();
        all.sort();
        assert_eq!(all, (1..=n_queued as u32).collect::<Vec<_>>());
        for queue in self.queues.values() {
            let mine: Vec<u32> = queue.iter().map(|t| positions[t]).collect();
            assert!(
                mine.windows(2).all(|w| w[0] < w[1]),
                "FIFO within a session: {mine:?}"
            );
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
            "{tasks:?} {:?} {} {positions:?} {:?}",
            self.d.capacity(),
            self.d.n_sessions(),
            SESSIONS.map(|s| self.d.active_task(s))
        )
    }

    fn step(&mut self, op: &Op) {
        self.now += 10;
        match op {
            Op::Submit(s) => self.submit(SESSIONS[*s]),
            Op::CompleteSpawn(i, ok) => {
                if !self.pending.is_empty() {
                    let task = self.pending[i.index(self.pending.len())];
                    self.complete_spawn(task, *ok);
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
                    let task = idle[i.index(idle.len())];
                    self.agents
                        .iter_mut()
                        .find(|a| a.task == task)
                        .unwrap()
                        .ready = true;
                    let stopping = self.stop_step.contains_key(&task);
                    let a = self.handle(Event::AgentReady {
                        task_id: task,
                        steer: *steer,
                    });
                    assert_eq!(a, vec![]);
                    let state = &self.d.task(&task).unwrap().state;
                    if stopping {
                        assert!(matches!(state, TaskState::Stopping { .. }), "{state:?}");
                    } else {
                        assert!(
                            matches!(state, TaskState::Running { steer: s, .. } if s == steer),
                            "{state:?}"
                        );
                    }
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
                    self.reports.entry(task).or_insert(report.clone());
                    let a = self.handle(Event::Report {
                        task_id: task,
                        report,
                    });
                    assert_eq!(a, vec![], "a report frees nothing and admits nothing");
                }
            }
            Op::ProtocolError(i) => {
                if let Some(task) = self.pick_agent(i) {
                    let error = format!("garbage {}", self.now);
                    self.protocol_error.entry(task).or_insert(error.clone());
                    let a = self.handle(Event::ProtocolError {
                        task_id: task,
                        error,
                    });
                    assert_eq!(
                        a,
                        vec![Action::Signal {
                            task_id: task,
                            step: StopStep::Sigkill
                        }]
                    );
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
            Op::Stop(target, scope) => self.stop(target, *scope),
            Op::Stale(i, k) => {
                // Tasks without an agent: finished ones (late, duplicated events) and
                // queued ones (events that cannot be about them).
                let no_agent: Vec<TaskId> = self
                    .submitted
                    .iter()
                    .map(|(t, _)| *t)
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
                    let before = self.snapshot();
                    let a = self.handle(event.clone());
                    assert_eq!(a, vec![], "stale {event:?}");
                    assert_eq!(self.snapshot(), before, "stale {event:?} changed the state");
                }
            }
        }
        self.check();
    }

    fn pick_agent(&self, i: &Index) -> Option<TaskId> {
        (!self.agents.is_empty()).then(|| self.agents[i.index(self.agents.len())].task)
    }

    fn submit(&mut self, session: &str) {
        let task_id = id(self.next_id);
        self.next_id += 1;
        self.submitted.push((task_id, session.to_string()));
        self.session_of.insert(task_id, session.to_string());
        self.queues
            .entry(session.to_string())
            .or_default()
            .push_back(task_id);
        self.sealed.remove(session);
        self.refresh_waiting();
        let s = self.d.submit(
            task_id,
            session.to_string(),
            format!("text {task_id}"),
            Millis(self.now),
        );
        assert_eq!(s.task_id, task_id);
        let a = s.actions.into_vec();
        assert!(
            a.iter().all(|a| matches!(a, Action::Spawn { .. })),
            "a submit only admits: {a:?}"
        );
        self.apply(a);
    }

    fn complete_spawn(&mut self, task: TaskId, ok: bool) {
        self.pending.retain(|t| *t != task);
        if ok {
            let pid = self.next_pid;
            self.next_pid += 1;
            self.agents.push(Agent { task, ready: false });
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

    fn reap(&mut self, task: TaskId, status: ExitStatus) {
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
        } else if let Some(&(step, requested)) = self.stop_step.get(&task) {
            assert_eq!(
                ending,
                &Ending::Cancelled {
                    by: Some(step),
                    after: Duration::from_millis(self.now - requested)
                }
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

    fn fire(&mut self, task: TaskId, step: StopStep) {
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
                    self.submitted[i.index(self.submitted.len())].0
                };
                let expected = match self.session_of.get(&task_id) {
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
                        .map(|(t, _)| *t)
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
                    | Action::Spawn { task_id, .. } => *task_id,
                };
                assert_eq!(&self.session_of[&task_id], chat, "{a:?}");
            }
        }
        // Queued targets end at once, before any running one is asked to stop.
        let first_cancel = actions
            .iter()
            .position(|a| matches!(a, Action::SendCancel { .. }))
            .unwrap_or(actions.len());
        for (n, a) in actions.iter().enumerate() {
            match a {
                Action::Spawn { .. } => panic!("a stop admitted work: {actions:?}"),
                Action::Finished(_) => assert!(n < first_cancel, "{actions:?}"),
                _ => {}
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
            if !queued && !self.stop_step.contains_key(task_id) {
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
            } else {
                return;
            }
            self.check();
        }
        panic!("the world does not quiesce");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn dispatcher_keeps_its_invariants(
        cap in 1u32..=3,
        ops in prop::collection::vec(op(), 0..60),
    ) {
        let mut w = World::new(cap);
        w.check();
        for op in &ops {
            w.step(op);
        }
        w.quiesce();
        // Invariant 6: every acknowledged message ended in a recorded state.
        for (task_id, _) in &w.submitted {
            prop_assert!(w.finished.contains_key(task_id), "{} never finished", task_id);
        }
        prop_assert_eq!(w.finished.len(), w.submitted.len());
        // Invariant 8: nothing left in the hot maps.
        prop_assert_eq!(w.d.n_sessions(), 0);
        prop_assert_eq!(w.d.tasks().count(), 0);
        prop_assert_eq!(w.d.capacity().busy, 0);
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
}
