//! Scenario tests for [`agentd_core::Dispatcher`]: one behaviour per test, driven
//! through the public API the daemon uses (`submit`/`accept`, `handle`, `stop`,
//! settings, queries).
//!
//! The scenarios written before queue modes use [`config`]: followup mode without
//! debounce and with a cap no scenario reaches, i.e. each held message runs as its
//! own task, at once. The queue-mode scenarios set what they exercise.
//!
//! Every call goes through [`H`], which checks `check_invariants()` after it, so
//! each scenario also checks the structural invariants at every step.

use std::time::Duration;

use agentd_core::{
    collected_text, overflow_text, parse_chat_command, preview, Accepted, Action, AgentReport,
    Capacity, ChatCommand, Config, Dispatcher, DropPolicy, Ending, Event, ExitStatus, Interruption,
    Message, Millis, Mode, Priority, QueueCommand, QueueSettings, Refused, ReportOutcome, Scope,
    StopCause, StopError, StopStep, StopTarget, Task, TaskId, TaskState, HUNG, MAX_COLLECTED_BYTES,
    MAX_PREVIEWS, TIMED_OUT,
};

const CANCEL_GRACE: Duration = Duration::from_secs(5);
const TERM_GRACE: Duration = Duration::from_secs(7);

fn id(n: u128) -> TaskId {
    TaskId::from_u128(n)
}

/// The old semantics: every held message runs as its own task, at once (followup
/// mode, no debounce), with a cap and limits no scenario reaches.
fn config(max_concurrent: u32) -> Config {
    Config {
        max_concurrent,
        cancel_grace: CANCEL_GRACE,
        term_grace: TERM_GRACE,
        queue: QueueSettings {
            mode: Mode::Followup,
            debounce: Duration::ZERO,
            cap: 1000,
            drop: DropPolicy::Old,
        },
        ..Config::default()
    }
}

/// Test harness: a dispatcher, a clock, and invariant checks after every call.
struct H {
    d: Dispatcher,
    now: u64,
}

impl H {
    fn new(max_concurrent: u32) -> H {
        H::with(config(max_concurrent))
    }

    fn with(config: Config) -> H {
        H {
            d: Dispatcher::new(config),
            now: 1_000,
        }
    }

    /// Two slots, session `a` in steer mode (debounce `debounce_ms`), and task 1 of
    /// it running with an agent that takes steering.
    fn steering(debounce_ms: u64) -> H {
        let mut h = H::with(config_with(
            2,
            settings(Mode::Steer, debounce_ms, 20, DropPolicy::Old),
        ));
        let _ = h.accept(msg(1, "a"));
        let _ = h.spawned(1);
        let _ = h.ev(Event::AgentReady {
            task_id: id(1),
            steer: true,
        });
        h
    }

    fn accept(&mut self, msg: Message) -> (Result<Accepted, Refused>, Vec<Action>) {
        let (r, a) = self.d.accept(msg, Millis(self.now));
        self.check();
        (r, a.into_vec())
    }

    /// Everything observable about the dispatcher, to show that a call changed nothing.
    fn snapshot(&self) -> String {
        let mut tasks: Vec<&Task> = self.d.tasks().collect();
        tasks.sort_by_key(|t| t.id);
        let mut positions: Vec<_> = self.d.positions().into_iter().collect();
        positions.sort();
        format!(
            "{tasks:?} {positions:?} {:?} {} {}",
            self.d.capacity(),
            self.d.n_sessions(),
            self.d.n_queued()
        )
    }

    fn check(&self) {
        if let Err(e) = self.d.check_invariants() {
            panic!("invariant broken: {e}\n{:#?}", self.d);
        }
    }

    fn at(&mut self, now: u64) -> &mut H {
        self.now = now;
        self
    }

    fn submit(&mut self, n: u128, session: &str) -> Vec<Action> {
        let s = self.d.submit(
            id(n),
            session.to_string(),
            format!("text {n}"),
            Millis(self.now),
        );
        assert_eq!(s.task_id, id(n));
        self.check();
        s.actions.into_vec()
    }

    fn ev(&mut self, event: Event) -> Vec<Action> {
        let actions = self.d.handle(event, Millis(self.now)).into_vec();
        self.check();
        actions
    }

    fn stop(
        &mut self,
        target: StopTarget,
        scope: Scope,
    ) -> Result<(Vec<TaskId>, Vec<Action>), StopError> {
        let r = self
            .d
            .stop(target, &scope, Millis(self.now))
            .map(|(ids, a)| (ids, a.into_vec()));
        self.check();
        r
    }

    fn spawned(&mut self, n: u128) -> Vec<Action> {
        self.ev(Event::Spawned {
            task_id: id(n),
            pid: pid(n),
        })
    }

    /// Spawned + handshake: the task runs.
    fn run(&mut self, n: u128) {
        assert_eq!(self.spawned(n), vec![]);
        assert_eq!(
            self.ev(Event::AgentReady {
                task_id: id(n),
                steer: false
            }),
            vec![]
        );
        assert!(matches!(self.state(n), TaskState::Running { .. }));
    }

    fn report(&mut self, n: u128, outcome: ReportOutcome) -> Vec<Action> {
        self.ev(Event::Report {
            task_id: id(n),
            report: AgentReport {
                outcome,
                text: "done".into(),
                command_exit: None,
            },
        })
    }

    fn reap(&mut self, n: u128, status: ExitStatus) -> Vec<Action> {
        self.ev(Event::Reaped {
            task_id: id(n),
            status,
        })
    }

    fn timer(&mut self, n: u128, step: StopStep) -> Vec<Action> {
        self.ev(Event::StopTimer {
            task_id: id(n),
            step,
        })
    }

    fn state(&self, n: u128) -> TaskState {
        self.d
            .task(&id(n))
            .unwrap_or_else(|| panic!("task {n} not in the dispatcher"))
            .state
            .clone()
    }

    fn busy(&self) -> u32 {
        self.d.capacity().busy
    }

    /// Nothing left anywhere (invariant 8).
    fn assert_empty(&self) {
        assert_eq!(self.d.n_sessions(), 0, "{:#?}", self.d);
        assert_eq!(self.d.tasks().count(), 0, "{:#?}", self.d);
        assert_eq!(self.d.n_queued(), 0);
        assert_eq!(self.busy(), 0);
    }
}

/// A work message `text n` for a session, interactive, with the session's mode.
fn msg(n: u128, session: &str) -> Message {
    Message::new(id(n), session, format!("text {n}"))
}

fn with_mode(mode: Mode, m: Message) -> Message {
    Message {
        mode: Some(mode),
        ..m
    }
}

fn background(m: Message) -> Message {
    Message {
        priority: Priority::Background,
        ..m
    }
}

fn with_id(message_id: &str, m: Message) -> Message {
    Message {
        message_id: Some(message_id.into()),
        ..m
    }
}

fn settings(mode: Mode, debounce_ms: u64, cap: u32, drop: DropPolicy) -> QueueSettings {
    QueueSettings {
        mode,
        debounce: Duration::from_millis(debounce_ms),
        cap,
        drop,
    }
}

/// A configuration of one slot whose sessions use `queue`.
fn config_with(max_concurrent: u32, queue: QueueSettings) -> Config {
    Config {
        queue,
        ..config(max_concurrent)
    }
}

/// The plain answer for a message that started or queued.
fn plain(n: u128) -> Accepted {
    Accepted::Task {
        task_id: id(n),
        steered_into: None,
        dropped: vec![],
        notice: None,
    }
}

fn notice(r: &Result<Accepted, Refused>) -> Option<&str> {
    match r {
        Ok(Accepted::Task { notice, .. }) => notice.as_deref(),
        other => panic!("not accepted as a task: {other:?}"),
    }
}

fn texts(ns: &[u128]) -> Vec<String> {
    ns.iter().map(|n| format!("text {n}")).collect()
}

fn spawn_text(actions: &[Action], n: u128) -> String {
    actions
        .iter()
        .find_map(|a| match a {
            Action::Spawn { task_id, text, .. } if *task_id == id(n) => Some(text.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no spawn of {n} in {actions:#?}"))
}

fn debounces(actions: &[Action]) -> Vec<(String, Duration, u64)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SetDebounce {
                session,
                after,
                generation,
            } => Some((session.clone(), *after, *generation)),
            _ => None,
        })
        .collect()
}

fn no_ids() -> Vec<TaskId> {
    Vec::new()
}

fn pid(n: u128) -> u32 {
    1000 + n as u32
}

fn spawns(actions: &[Action]) -> Vec<TaskId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Spawn { task_id, .. } => Some(*task_id),
            _ => None,
        })
        .collect()
}

fn finished(actions: &[Action]) -> Vec<&Task> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Finished(t) => Some(t),
            _ => None,
        })
        .collect()
}

/// The single `Finished` action in `actions`, for task `n`.
fn only_finished(actions: &[Action], n: u128) -> Task {
    let f = finished(actions);
    assert_eq!(f.len(), 1, "expected one Finished in {actions:#?}");
    assert_eq!(f[0].id, id(n));
    f[0].clone()
}

fn ending(task: &Task) -> &Ending {
    match &task.state {
        TaskState::Done { ending, .. } => ending,
        other => panic!("finished task in state {other:?}"),
    }
}

fn failed_reason(task: &Task) -> &str {
    match ending(task) {
        Ending::Failed { reason } => reason,
        other => panic!("expected Failed, got {other:?}"),
    }
}

fn cancelled_queued() -> Ending {
    Ending::Cancelled {
        by: None,
        after: Duration::ZERO,
    }
}

fn stale_events(n: u128) -> Vec<Event> {
    let task_id = id(n);
    vec![
        Event::Spawned { task_id, pid: 4242 },
        Event::SpawnFailed {
            task_id,
            error: "late".into(),
        },
        Event::AgentReady {
            task_id,
            steer: true,
        },
        Event::Progress {
            task_id,
            text: "late".into(),
        },
        Event::Report {
            task_id,
            report: AgentReport {
                outcome: ReportOutcome::Succeeded,
                text: "late".into(),
                command_exit: None,
            },
        },
        Event::ProtocolError {
            task_id,
            error: "late".into(),
        },
        Event::StopTimer {
            task_id,
            step: StopStep::Sigterm,
        },
        Event::StopTimer {
            task_id,
            step: StopStep::Sigkill,
        },
        Event::Reaped {
            task_id,
            status: ExitStatus::code(0),
        },
        Event::Hung { task_id },
        Event::TimedOut { task_id },
    ]
}

// ----- admission -----

#[test]
fn first_message_starts() {
    let mut h = H::new(2);
    let a = h.submit(1, "a");
    assert_eq!(
        a,
        vec![Action::Spawn {
            task_id: id(1),
            session: "a".into(),
            text: "text 1".into()
        }]
    );
    assert_eq!(h.state(1), TaskState::Starting { pid: None });
    assert_eq!(h.d.task(&id(1)).unwrap().started_at, Some(Millis(1_000)));
    assert_eq!(h.d.active_task("a"), Some(id(1)));
    assert_eq!(h.d.position(&id(1)), None);
    assert_eq!(h.d.capacity(), Capacity { busy: 1, max: 2 });
}

#[test]
fn spawned_records_pid_and_handshake_makes_it_running() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    assert_eq!(h.spawned(1), vec![]);
    assert_eq!(h.state(1), TaskState::Starting { pid: Some(pid(1)) });
    let a = h.ev(Event::AgentReady {
        task_id: id(1),
        steer: true,
    });
    assert_eq!(a, vec![]);
    assert_eq!(
        h.state(1),
        TaskState::Running {
            pid: pid(1),
            steer: true
        }
    );
}

#[test]
fn second_message_of_a_busy_session_is_queued_with_its_position() {
    let mut h = H::new(2);
    let _ = h.submit(1, "a");
    assert_eq!(h.submit(2, "a"), vec![]);
    assert_eq!(h.submit(3, "a"), vec![]);
    assert_eq!(h.state(2), TaskState::Queued);
    assert_eq!(h.d.position(&id(2)), Some(1));
    assert_eq!(h.d.position(&id(3)), Some(2));
    assert_eq!(h.d.n_queued(), 2);
    // The lane of the session is 1, even with a free global slot.
    assert_eq!(h.busy(), 1);
}

#[test]
fn other_session_is_not_blocked_when_a_slot_is_free() {
    let mut h = H::new(2);
    let _ = h.submit(1, "a");
    let _ = h.submit(2, "a");
    assert_eq!(spawns(&h.submit(3, "b")), vec![id(3)]);
    assert_eq!(h.d.capacity(), Capacity { busy: 2, max: 2 });
}

#[test]
fn cap_of_one_queues_the_second_session_at_position_one() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    assert_eq!(h.submit(2, "b"), vec![]);
    assert_eq!(h.state(2), TaskState::Queued);
    assert_eq!(h.d.position(&id(2)), Some(1));
    assert_eq!(h.d.capacity(), Capacity { busy: 1, max: 1 });
}

#[test]
fn slot_is_freed_on_reap_not_on_report() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    let _ = h.submit(2, "b");
    h.run(1);
    assert_eq!(h.report(1, ReportOutcome::Succeeded), vec![exit_grace(1)]);
    assert_eq!(h.busy(), 1, "a report does not free the slot");
    assert_eq!(h.state(2), TaskState::Queued);

    let a = h.at(2_000).reap(1, ExitStatus::code(0));
    assert_eq!(a.len(), 2, "{a:#?}");
    let done = only_finished(&a, 1);
    assert_eq!(ending(&done), &Ending::Succeeded);
    assert_eq!(done.finished_at, Some(Millis(2_000)));
    // Finished first, then the next admission.
    assert!(matches!(a[0], Action::Finished(_)));
    assert_eq!(spawns(&a), vec![id(2)]);
    assert_eq!(h.busy(), 1);
}

#[test]
fn spawn_failure_ends_failed_and_admits_the_next() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    let _ = h.submit(2, "b");
    let a = h.ev(Event::SpawnFailed {
        task_id: id(1),
        error: "no such file".into(),
    });
    let done = only_finished(&a, 1);
    assert!(failed_reason(&done).contains("no such file"));
    assert_eq!(
        done.state,
        TaskState::Done {
            ending: ending(&done).clone(),
            exit: None
        }
    );
    assert_eq!(spawns(&a), vec![id(2)]);
    assert!(h.d.task(&id(1)).is_none());
}

#[test]
fn admission_is_round_robin_across_sessions_not_fifo() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    let _ = h.submit(2, "a");
    let _ = h.submit(3, "a");
    let _ = h.submit(4, "b");
    let _ = h.submit(5, "c");
    let mut order = vec![id(1)];
    for _ in 0..4 {
        let running = *order.last().unwrap();
        let a = h.ev(Event::Reaped {
            task_id: running,
            status: ExitStatus::code(0),
        });
        order.extend(spawns(&a));
    }
    assert_eq!(order, vec![id(1), id(4), id(5), id(2), id(3)]);
}

#[test]
fn positions_are_round_robin() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    for n in 2..=6 {
        let _ = h.submit(n, "a");
    }
    let _ = h.submit(7, "b");
    assert_eq!(h.d.position(&id(7)), Some(1));
    assert_eq!(h.d.position(&id(2)), Some(2));
    assert_eq!(h.d.position(&id(3)), Some(3));
    assert_eq!(h.d.position(&id(6)), Some(6));
    let mut all: Vec<u32> = h.d.positions().into_values().collect();
    all.sort();
    assert_eq!(all, (1..=6).collect::<Vec<_>>());
}

#[test]
fn positions_alternate_between_sessions_round_by_round() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    let _ = h.submit(2, "a");
    let _ = h.submit(3, "a");
    let _ = h.submit(4, "b");
    let _ = h.submit(5, "b");
    // b waits in the ready ring, a is busy: b, a, b, a.
    let want = [(4, 1), (2, 2), (5, 3), (3, 4)];
    for (n, position) in want {
        assert_eq!(h.d.position(&id(n)), Some(position), "task {n}");
    }
    // And that is the order they are admitted in when each run ends.
    let mut order = Vec::new();
    let mut running = id(1);
    for _ in 0..4 {
        let a = h.ev(Event::Reaped {
            task_id: running,
            status: ExitStatus::code(0),
        });
        running = spawns(&a)[0];
        order.push(running);
    }
    assert_eq!(order, want.map(|(n, _)| id(n)));
}

// ----- how a task ends -----

fn ending_after(report: Option<AgentReport>, status: ExitStatus) -> Task {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    h.run(1);
    if let Some(report) = report {
        assert_eq!(
            h.ev(Event::Report {
                task_id: id(1),
                report
            }),
            vec![exit_grace(1)]
        );
    }
    let a = h.reap(1, status);
    h.assert_empty();
    only_finished(&a, 1)
}

/// The timer a running agent gets when it reports: it should exit within the grace.
fn exit_grace(n: u128) -> Action {
    Action::SetExitGrace {
        task_id: id(n),
        after: CANCEL_GRACE,
    }
}

#[test]
fn an_agent_that_reports_but_does_not_exit_is_stopped_and_keeps_its_outcome() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    let _ = h.submit(2, "b");
    h.run(1);
    assert_eq!(h.report(1, ReportOutcome::Succeeded), vec![exit_grace(1)]);
    // A second report arms nothing more.
    assert_eq!(h.report(1, ReportOutcome::Failed), vec![]);
    let a = h.at(6_000).ev(Event::ExitGraceOver { task_id: id(1) });
    assert_eq!(
        a,
        vec![
            Action::Signal {
                task_id: id(1),
                step: StopStep::Sigterm
            },
            Action::SetTimer {
                task_id: id(1),
                after: TERM_GRACE,
                step: StopStep::Sigkill
            },
        ]
    );
    assert_eq!(
        h.state(2),
        TaskState::Queued,
        "the slot stays taken until the reap"
    );
    assert!(matches!(
        h.state(1),
        TaskState::Stopping {
            cause: StopCause::Linger,
            ..
        }
    ));
    let a = h.at(7_000).reap(1, ExitStatus::signal(15));
    let done = only_finished(&a, 1);
    assert_eq!(ending(&done), &Ending::Succeeded);
    assert_eq!(spawns(&a), vec![id(2)]);
}

#[test]
fn an_exit_grace_that_ends_during_a_later_stop_leaves_that_stop_its_graces() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    h.run(1);
    assert_eq!(h.report(1, ReportOutcome::Succeeded), vec![exit_grace(1)]);
    // Stopped while it should be exiting: the stop's own cancel grace starts now.
    let (_, a) = h
        .at(2_000)
        .stop(StopTarget::Task(id(1)), Scope::Owner)
        .unwrap();
    assert_eq!(
        a,
        vec![
            Action::SendCancel { task_id: id(1) },
            Action::SetTimer {
                task_id: id(1),
                after: CANCEL_GRACE,
                step: StopStep::Sigterm
            }
        ]
    );
    // The exit grace armed by the report ends first: no SIGTERM before the stop's.
    assert_eq!(
        h.at(6_000).ev(Event::ExitGraceOver { task_id: id(1) }),
        vec![]
    );
    let a = h.at(7_000).timer(1, StopStep::Sigterm);
    assert_eq!(
        a[0],
        Action::Signal {
            task_id: id(1),
            step: StopStep::Sigterm
        }
    );
    let done = only_finished(&h.at(7_010).reap(1, ExitStatus::signal(15)), 1);
    assert_eq!(
        ending(&done),
        &Ending::Cancelled {
            by: Some(StopStep::Sigterm),
            after: Duration::from_millis(5_010)
        }
    );
}

#[test]
fn a_user_stop_of_a_lingering_agent_does_not_replace_the_linger() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    h.run(1);
    let _ = h.report(1, ReportOutcome::Succeeded);
    let _ = h.at(6_000).ev(Event::ExitGraceOver { task_id: id(1) });
    // A user stop is weaker than a linger: the task keeps its cause and its outcome.
    let _ = h.stop(StopTarget::Task(id(1)), Scope::Owner).unwrap();
    assert!(matches!(
        h.state(1),
        TaskState::Stopping {
            cause: StopCause::Linger,
            ..
        }
    ));
    let done = only_finished(&h.at(7_000).reap(1, ExitStatus::signal(15)), 1);
    assert_eq!(ending(&done), &Ending::Succeeded);
}

#[test]
fn a_protocol_error_during_an_interrupt_replaces_it() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    h.run(1);
    let _ = h.at(2_000).accept(with_mode(Mode::Interrupt, msg(2, "a")));
    assert!(matches!(
        h.state(1),
        TaskState::Stopping {
            cause: StopCause::Interrupt,
            ..
        }
    ));
    let _ = h.ev(Event::ProtocolError {
        task_id: id(1),
        error: "torn frame".into(),
    });
    assert_eq!(
        h.state(1),
        TaskState::Stopping {
            pid: Some(pid(1)),
            step: StopStep::Sigkill,
            requested_at: Millis(2_000),
            cause: StopCause::ProtocolError("torn frame".into()),
            step_at: Millis(2_000),
        },
        "the stronger cause replaces the interrupt; the stop keeps its start"
    );
    let done = only_finished(&h.reap(1, ExitStatus::signal(9)), 1);
    assert!(failed_reason(&done).contains("torn frame"));
}

#[test]
fn a_task_that_reports_while_stopping_gets_no_exit_grace() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    h.run(1);
    let _ = h.stop(StopTarget::Task(id(1)), Scope::Owner).unwrap();
    assert_eq!(h.report(1, ReportOutcome::Cancelled), vec![]);
    let done = only_finished(&h.reap(1, ExitStatus::code(0)), 1);
    assert!(matches!(
        ending(&done),
        Ending::Cancelled {
            by: Some(StopStep::CooperativeCancel),
            ..
        }
    ));
}

fn report(outcome: ReportOutcome, command_exit: Option<ExitStatus>) -> Option<AgentReport> {
    Some(AgentReport {
        outcome,
        text: "result".into(),
        command_exit,
    })
}

#[test]
fn report_succeeded_and_exit_zero_is_succeeded() {
    let t = ending_after(report(ReportOutcome::Succeeded, None), ExitStatus::code(0));
    assert_eq!(
        t.state,
        TaskState::Done {
            ending: Ending::Succeeded,
            exit: Some(ExitStatus::code(0))
        }
    );
    assert_eq!(
        t.report.as_deref(),
        report(ReportOutcome::Succeeded, None).as_ref()
    );
}

#[test]
fn report_succeeded_but_bad_exit_is_failed() {
    for status in [ExitStatus::code(3), ExitStatus::signal(9)] {
        let t = ending_after(report(ReportOutcome::Succeeded, None), status);
        let reason = failed_reason(&t);
        assert!(reason.contains(&status.describe()), "{reason}");
    }
}

#[test]
fn report_failed_is_failed() {
    let t = ending_after(report(ReportOutcome::Failed, None), ExitStatus::code(0));
    assert_eq!(failed_reason(&t), "agent reported failure");
    let t = ending_after(
        report(ReportOutcome::Failed, Some(ExitStatus::code(2))),
        ExitStatus::code(0),
    );
    assert_eq!(failed_reason(&t), "command failed with exit code 2");
}

#[test]
fn no_report_is_failed_without_reporting() {
    for status in [ExitStatus::code(0), ExitStatus::signal(11)] {
        let t = ending_after(None, status);
        let reason = failed_reason(&t);
        assert!(reason.contains("without reporting"), "{reason}");
        assert!(reason.contains(&status.describe()), "{reason}");
    }
}

#[test]
fn agent_dying_before_its_handshake_is_failed() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    let _ = h.spawned(1);
    let t = only_finished(&h.reap(1, ExitStatus::code(127)), 1);
    let reason = failed_reason(&t);
    assert!(reason.contains("before its handshake"), "{reason}");
    assert!(reason.contains("exit code 127"), "{reason}");
    h.assert_empty();
}

#[test]
fn first_report_wins() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    h.run(1);
    let _ = h.report(1, ReportOutcome::Failed);
    let _ = h.report(1, ReportOutcome::Succeeded);
    let t = only_finished(&h.reap(1, ExitStatus::code(0)), 1);
    assert_eq!(failed_reason(&t), "agent reported failure");
}

#[test]
fn progress_keeps_the_latest_line() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    let _ = h.submit(2, "a");
    h.run(1);
    for line in ["one", "two", "three"] {
        let a = h.ev(Event::Progress {
            task_id: id(1),
            text: line.into(),
        });
        assert_eq!(a, vec![]);
    }
    assert_eq!(h.d.task(&id(1)).unwrap().progress.as_deref(), Some("three"));
    // Progress for a queued task (no agent yet) is ignored.
    let _ = h.ev(Event::Progress {
        task_id: id(2),
        text: "bogus".into(),
    });
    assert_eq!(h.d.task(&id(2)).unwrap().progress, None);
    let _ = h.report(1, ReportOutcome::Succeeded);
    let t = only_finished(&h.reap(1, ExitStatus::code(0)), 1);
    assert_eq!(t.progress.as_deref(), Some("three"));
}

#[test]
fn protocol_error_kills_and_ends_failed_with_the_error() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    let _ = h.submit(2, "b");
    h.run(1);
    let _ = h.report(1, ReportOutcome::Succeeded);
    let a = h.ev(Event::ProtocolError {
        task_id: id(1),
        error: "garbage frame".into(),
    });
    assert_eq!(
        a,
        vec![Action::Signal {
            task_id: id(1),
            step: StopStep::Sigkill
        }]
    );
    assert!(matches!(
        h.state(1),
        TaskState::Stopping {
            step: StopStep::Sigkill,
            cause: StopCause::ProtocolError(ref e),
            ..
        } if e == "garbage frame"
    ));
    assert_eq!(h.busy(), 1, "the slot is held until the reap");
    let a = h.reap(1, ExitStatus::signal(9));
    let t = only_finished(&a, 1);
    let reason = failed_reason(&t);
    assert!(reason.contains("garbage frame"), "{reason}");
    assert_eq!(spawns(&a), vec![id(2)]);
}

#[test]
fn protocol_error_during_a_stop_does_not_escalate_backwards() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    h.run(1);
    let _ = h.stop(StopTarget::Task(id(1)), Scope::Owner).unwrap();
    let _ = h.ev(Event::ProtocolError {
        task_id: id(1),
        error: "bad".into(),
    });
    // The pending SIGTERM timer is now below the current step.
    assert_eq!(h.timer(1, StopStep::Sigterm), vec![]);
    assert_eq!(h.timer(1, StopStep::Sigkill), vec![]);
    let t = only_finished(&h.reap(1, ExitStatus::signal(9)), 1);
    assert!(failed_reason(&t).contains("bad"));
}

// ----- stop -----

#[test]
fn stop_of_a_queued_task_cancels_it_at_once_and_it_leaves_the_queue() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    let _ = h.submit(2, "a");
    let _ = h.submit(3, "a");
    assert_eq!(h.d.position(&id(3)), Some(2));
    let (ids, a) = h
        .at(1_500)
        .stop(StopTarget::Task(id(2)), Scope::Owner)
        .unwrap();
    assert_eq!(ids, vec![id(2)]);
    let t = only_finished(&a, 2);
    assert_eq!(a.len(), 1);
    assert_eq!(
        t.state,
        TaskState::Done {
            ending: cancelled_queued(),
            exit: None
        }
    );
    assert_eq!(t.finished_at, Some(Millis(1_500)));
    assert!(h.d.task(&id(2)).is_none());
    assert_eq!(h.d.position(&id(3)), Some(1));
    assert_eq!(h.d.n_queued(), 1);
    // The running task is untouched.
    assert!(matches!(h.state(1), TaskState::Starting { .. }));
}

#[test]
fn stop_of_the_only_queued_task_of_a_waiting_session_forgets_the_session() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    let _ = h.submit(2, "b");
    let (_, a) = h.stop(StopTarget::Task(id(2)), Scope::Owner).unwrap();
    assert_eq!(ending(&only_finished(&a, 2)), &cancelled_queued());
    assert_eq!(h.d.n_sessions(), 1);
    // When the slot frees, nothing of b is admitted.
    let a = h.reap(1, ExitStatus::code(0));
    assert_eq!(spawns(&a), no_ids());
    h.assert_empty();
}

#[test]
fn stop_of_a_running_task_sends_cancel_and_arms_the_sigterm_timer() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    h.run(1);
    let (ids, a) = h
        .at(2_000)
        .stop(StopTarget::Task(id(1)), Scope::Owner)
        .unwrap();
    assert_eq!(ids, vec![id(1)]);
    assert_eq!(
        a,
        vec![
            Action::SendCancel { task_id: id(1) },
            Action::SetTimer {
                task_id: id(1),
                after: CANCEL_GRACE,
                step: StopStep::Sigterm
            }
        ]
    );
    assert_eq!(
        h.state(1),
        TaskState::Stopping {
            pid: Some(pid(1)),
            step: StopStep::CooperativeCancel,
            requested_at: Millis(2_000),
            cause: StopCause::User,
            step_at: Millis(2_000),
        }
    );
    assert_eq!(h.busy(), 1);
}

#[test]
fn sigterm_timer_signals_and_arms_the_sigkill_timer() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    h.run(1);
    let _ = h.stop(StopTarget::Task(id(1)), Scope::Owner).unwrap();
    assert_eq!(
        h.timer(1, StopStep::Sigterm),
        vec![
            Action::Signal {
                task_id: id(1),
                step: StopStep::Sigterm
            },
            Action::SetTimer {
                task_id: id(1),
                after: TERM_GRACE,
                step: StopStep::Sigkill
            }
        ]
    );
    assert!(matches!(
        h.state(1),
        TaskState::Stopping {
            step: StopStep::Sigterm,
            ..
        }
    ));
    // Each step says when it was taken; the stop keeps its start.
    let _ = h.at(9_000).timer(1, StopStep::Sigterm);
    assert!(
        matches!(
            h.state(1),
            TaskState::Stopping {
                step: StopStep::Sigterm,
                step_at,
                requested_at,
                ..
            } if step_at < Millis(9_000) && requested_at <= step_at
        ),
        "a repeated timer is no new step: {:?}",
        h.state(1)
    );
    let _ = h.at(12_000);
    assert_eq!(
        h.timer(1, StopStep::Sigkill),
        vec![Action::Signal {
            task_id: id(1),
            step: StopStep::Sigkill
        }]
    );
    assert!(
        matches!(
            h.state(1),
            TaskState::Stopping {
                step: StopStep::Sigkill,
                step_at: Millis(12_000),
                ..
            }
        ),
        "{:?}",
        h.state(1)
    );
    assert!(matches!(
        h.state(1),
        TaskState::Stopping {
            step: StopStep::Sigkill,
            ..
        }
    ));
}

#[test]
fn reaped_while_stopping_is_cancelled_by_the_last_step_after_the_elapsed_time() {
    for last in [
        StopStep::CooperativeCancel,
        StopStep::Sigterm,
        StopStep::Sigkill,
    ] {
        let mut h = H::new(1);
        let _ = h.submit(1, "a");
        h.run(1);
        let _ = h.at(10_000).stop(StopTarget::Task(id(1)), Scope::Owner);
        if last >= StopStep::Sigterm {
            let _ = h.at(15_000).timer(1, StopStep::Sigterm);
        }
        if last >= StopStep::Sigkill {
            let _ = h.at(22_000).timer(1, StopStep::Sigkill);
        }
        // The agent even reported success on its way out: it was still stopped.
        let _ = h.report(1, ReportOutcome::Succeeded);
        let t = only_finished(&h.at(22_345).reap(1, ExitStatus::signal(9)), 1);
        assert_eq!(
            t.state,
            TaskState::Done {
                ending: Ending::Cancelled {
                    by: Some(last),
                    after: Duration::from_millis(12_345)
                },
                exit: Some(ExitStatus::signal(9))
            },
            "last step {last:?}"
        );
        h.assert_empty();
    }
}

#[test]
fn stop_of_a_starting_task_before_its_pid_is_known_keeps_the_pid_when_it_arrives() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    let (_, a) = h.stop(StopTarget::Task(id(1)), Scope::Owner).unwrap();
    assert_eq!(a[0], Action::SendCancel { task_id: id(1) });
    assert_eq!(h.spawned(1), vec![]);
    assert!(matches!(
        h.state(1),
        TaskState::Stopping {
            pid: Some(p),
            step: StopStep::CooperativeCancel,
            ..
        } if p == pid(1)
    ));
    // A handshake does not undo the stop.
    let _ = h.ev(Event::AgentReady {
        task_id: id(1),
        steer: false,
    });
    assert!(matches!(h.state(1), TaskState::Stopping { .. }));
}

#[test]
fn stopping_twice_changes_nothing() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    h.run(1);
    let _ = h
        .at(2_000)
        .stop(StopTarget::Task(id(1)), Scope::Owner)
        .unwrap();
    let _ = h.timer(1, StopStep::Sigterm);
    let before = h.state(1);
    let (ids, a) = h
        .at(3_000)
        .stop(StopTarget::Task(id(1)), Scope::Owner)
        .unwrap();
    assert_eq!(ids, vec![id(1)]);
    assert_eq!(a, vec![]);
    assert_eq!(h.state(1), before);
}

#[test]
fn stop_of_an_unknown_or_finished_task_is_not_found() {
    let mut h = H::new(1);
    assert_eq!(
        h.stop(StopTarget::Task(id(9)), Scope::Owner),
        Err(StopError::NotFound(id(9)))
    );
    let _ = h.submit(1, "a");
    let _ = h.spawned(1);
    let _ = h.reap(1, ExitStatus::code(0));
    assert_eq!(
        h.stop(StopTarget::Task(id(1)), Scope::Chat("a".into())),
        Err(StopError::NotFound(id(1)))
    );
}

#[test]
fn stale_timers_do_nothing() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    let _ = h.submit(2, "a");
    h.run(1);
    // A timer for a task that is not stopping.
    assert_eq!(h.timer(1, StopStep::Sigterm), vec![]);
    assert!(matches!(h.state(1), TaskState::Running { .. }));
    let _ = h.stop(StopTarget::Task(id(1)), Scope::Owner).unwrap();
    let _ = h.timer(1, StopStep::Sigterm);
    // Lower or equal steps than the current one.
    assert_eq!(h.timer(1, StopStep::Sigterm), vec![]);
    assert_eq!(h.timer(1, StopStep::CooperativeCancel), vec![]);
    let _ = h.reap(1, ExitStatus::signal(15));
    // After the task finished (task 2 now holds the session).
    assert_eq!(h.timer(1, StopStep::Sigkill), vec![]);
    assert_eq!(h.timer(1, StopStep::Sigterm), vec![]);
    assert_eq!(h.state(2), TaskState::Starting { pid: None });
    // A queued task has no agent to signal.
    let _ = h.submit(3, "a");
    assert_eq!(h.timer(3, StopStep::Sigkill), vec![]);
    assert_eq!(h.state(3), TaskState::Queued);
}

#[test]
fn stale_events_for_a_finished_task_do_not_release_the_new_claim_of_its_session() {
    let mut h = H::new(2);
    let _ = h.submit(1, "a");
    let _ = h.submit(2, "a");
    h.run(1);
    let _ = h.report(1, ReportOutcome::Succeeded);
    let a = h.reap(1, ExitStatus::code(0));
    assert_eq!(spawns(&a), vec![id(2)]);
    h.run(2);
    let before = h.state(2);
    for event in stale_events(1) {
        assert_eq!(h.ev(event.clone()), vec![], "{event:?}");
        assert_eq!(h.d.active_task("a"), Some(id(2)), "after {event:?}");
        assert_eq!(h.state(2), before, "after {event:?}");
        assert_eq!(h.busy(), 1, "after {event:?}");
    }
    // The session is still busy: a new message queues although a slot is free.
    assert_eq!(h.submit(3, "a"), vec![]);
    assert_eq!(h.state(3), TaskState::Queued);
}

#[test]
fn events_for_unknown_tasks_do_nothing() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    for event in stale_events(77) {
        assert_eq!(h.ev(event.clone()), vec![], "{event:?}");
    }
    assert_eq!(h.state(1), TaskState::Starting { pid: None });
    assert_eq!(h.d.n_sessions(), 1);
}

#[test]
fn events_for_a_queued_task_do_nothing() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    let _ = h.submit(2, "b");
    for event in stale_events(2) {
        assert_eq!(h.ev(event.clone()), vec![], "{event:?}");
        assert_eq!(h.state(2), TaskState::Queued, "after {event:?}");
    }
    assert_eq!(h.busy(), 1);
}

// ----- stop scope (invariant 10) -----

#[test]
fn chat_cannot_stop_another_sessions_task() {
    let mut h = H::new(2);
    let _ = h.submit(1, "a");
    let _ = h.submit(2, "b");
    let _ = h.submit(3, "b");
    for n in [2, 3] {
        assert_eq!(
            h.stop(StopTarget::Task(id(n)), Scope::Chat("a".into())),
            Err(StopError::Forbidden {
                task_id: id(n),
                session: "b".into()
            })
        );
    }
    assert_eq!(h.state(2), TaskState::Starting { pid: None });
    assert_eq!(h.state(3), TaskState::Queued);
}

#[test]
fn chat_cannot_stop_another_session() {
    let mut h = H::new(2);
    let _ = h.submit(1, "a");
    let _ = h.submit(2, "b");
    let _ = h.submit(3, "b");
    for target in [
        StopTarget::SessionAll("b".into()),
        StopTarget::SessionCurrent("b".into()),
    ] {
        assert_eq!(
            h.stop(target, Scope::Chat("a".into())),
            Err(StopError::OtherSession {
                session: "b".into()
            })
        );
    }
    assert_eq!(h.state(2), TaskState::Starting { pid: None });
    assert_eq!(h.state(3), TaskState::Queued);
}

#[test]
fn chat_everything_stops_nothing() {
    let mut h = H::new(2);
    let _ = h.submit(1, "a");
    let _ = h.submit(2, "b");
    let (ids, a) = h
        .stop(StopTarget::Everything, Scope::Chat("a".into()))
        .unwrap();
    assert_eq!((ids, a), (no_ids(), vec![]));
    assert_eq!(h.state(1), TaskState::Starting { pid: None });
    assert_eq!(h.state(2), TaskState::Starting { pid: None });
}

#[test]
fn chat_may_stop_its_own_tasks() {
    let mut h = H::new(2);
    let _ = h.submit(1, "a");
    let _ = h.submit(2, "a");
    let (ids, a) = h
        .stop(StopTarget::Task(id(2)), Scope::Chat("a".into()))
        .unwrap();
    assert_eq!(ids, vec![id(2)]);
    assert_eq!(ending(&only_finished(&a, 2)), &cancelled_queued());
    let (ids, a) = h
        .stop(
            StopTarget::SessionCurrent("a".into()),
            Scope::Chat("a".into()),
        )
        .unwrap();
    assert_eq!(ids, vec![id(1)]);
    assert_eq!(a[0], Action::SendCancel { task_id: id(1) });
}

#[test]
fn owner_may_stop_anything() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    let _ = h.submit(2, "b");
    let _ = h.submit(3, "c");
    let (ids, a) = h.stop(StopTarget::Task(id(1)), Scope::Owner).unwrap();
    assert_eq!(ids, vec![id(1)]);
    assert_eq!(a[0], Action::SendCancel { task_id: id(1) });
    let (ids, a) = h
        .stop(StopTarget::SessionCurrent("b".into()), Scope::Owner)
        .unwrap();
    assert_eq!(ids, vec![id(2)]);
    assert_eq!(ending(&only_finished(&a, 2)), &cancelled_queued());
    let (ids, a) = h
        .stop(StopTarget::SessionAll("c".into()), Scope::Owner)
        .unwrap();
    assert_eq!(ids, vec![id(3)]);
    assert_eq!(ending(&only_finished(&a, 3)), &cancelled_queued());
}

#[test]
fn stop_current_of_an_idle_or_unknown_session_stops_nothing() {
    let mut h = H::new(1);
    let (ids, a) = h
        .stop(
            StopTarget::SessionCurrent("a".into()),
            Scope::Chat("a".into()),
        )
        .unwrap();
    assert_eq!((ids, a), (no_ids(), vec![]));
    let (ids, a) = h
        .stop(StopTarget::SessionAll("a".into()), Scope::Chat("a".into()))
        .unwrap();
    assert_eq!((ids, a), (no_ids(), vec![]));
    h.assert_empty();
}

#[test]
fn stop_current_of_a_waiting_session_cancels_its_oldest_queued_task() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    let _ = h.submit(2, "b");
    let _ = h.submit(3, "b");
    let (ids, a) = h
        .stop(
            StopTarget::SessionCurrent("b".into()),
            Scope::Chat("b".into()),
        )
        .unwrap();
    assert_eq!(ids, vec![id(2)]);
    assert_eq!(ending(&only_finished(&a, 2)), &cancelled_queued());
    assert_eq!(h.state(3), TaskState::Queued);
}

#[test]
fn stop_all_cancels_queued_first_then_stops_the_active_task_and_promotes_nothing() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    let _ = h.submit(2, "a");
    let _ = h.submit(3, "a");
    let _ = h.submit(4, "b");
    h.run(1);
    let (ids, a) = h
        .at(5_000)
        .stop(StopTarget::SessionAll("a".into()), Scope::Chat("a".into()))
        .unwrap();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, vec![id(1), id(2), id(3)]);
    assert_eq!(spawns(&a), no_ids());
    // Queued ones end first, in queue order, then the active one starts stopping.
    assert_eq!(a.len(), 4, "{a:#?}");
    assert!(matches!(&a[0], Action::Finished(t) if t.id == id(2)));
    assert!(matches!(&a[1], Action::Finished(t) if t.id == id(3)));
    for t in finished(&a) {
        assert_eq!(ending(t), &cancelled_queued());
    }
    assert_eq!(a[2], Action::SendCancel { task_id: id(1) });
    assert_eq!(
        a[3],
        Action::SetTimer {
            task_id: id(1),
            after: CANCEL_GRACE,
            step: StopStep::Sigterm
        }
    );
    assert_eq!(h.d.n_queued(), 1, "b's task stays queued");

    let a = h.at(5_100).reap(1, ExitStatus::code(0));
    let t = only_finished(&a, 1);
    assert_eq!(
        ending(&t),
        &Ending::Cancelled {
            by: Some(StopStep::CooperativeCancel),
            after: Duration::from_millis(100)
        }
    );
    // The freed slot goes to b, nothing of a is promoted.
    assert_eq!(spawns(&a), vec![id(4)]);
    assert_eq!(h.d.active_task("a"), None);
    assert_eq!(h.d.n_sessions(), 1);
}

#[test]
fn stop_everything_cancels_all_queued_then_stops_all_active() {
    let mut h = H::new(2);
    let _ = h.submit(1, "a");
    let _ = h.submit(2, "a");
    let _ = h.submit(3, "b");
    let _ = h.submit(4, "c");
    let _ = h.submit(5, "b");
    h.run(1);
    let (ids, a) = h.stop(StopTarget::Everything, Scope::Owner).unwrap();
    let mut sorted = ids;
    sorted.sort();
    assert_eq!(sorted, vec![id(1), id(2), id(3), id(4), id(5)]);
    assert_eq!(spawns(&a), no_ids());
    let n_finished = finished(&a).len();
    assert_eq!(n_finished, 3, "{a:#?}");
    // Every Finished comes before the first SendCancel.
    assert!(a[..n_finished]
        .iter()
        .all(|a| matches!(a, Action::Finished(_))));
    for t in finished(&a) {
        assert_eq!(ending(t), &cancelled_queued());
    }
    let cancels: Vec<&Action> = a
        .iter()
        .filter(|a| matches!(a, Action::SendCancel { .. }))
        .collect();
    assert_eq!(
        cancels,
        vec![
            &Action::SendCancel { task_id: id(1) },
            &Action::SendCancel { task_id: id(3) }
        ]
    );
    assert_eq!(spawns(&h.reap(1, ExitStatus::code(0))), no_ids());
    let _ = h.spawned(3);
    assert_eq!(spawns(&h.reap(3, ExitStatus::signal(15))), no_ids());
    h.assert_empty();
}

// ----- memory (invariant 8) -----

#[test]
fn sessions_and_tasks_leave_the_maps_once_everything_ended() {
    let mut h = H::new(2);
    let _ = h.submit(1, "a");
    let _ = h.submit(2, "a");
    let _ = h.submit(3, "b");
    let _ = h.submit(4, "c");
    let _ = h.submit(5, "d");
    // 1 succeeds, 3 fails to spawn, 2 is cancelled while queued, 4 breaks the
    // protocol, 5 is stopped while starting.
    h.run(1);
    let _ = h.report(1, ReportOutcome::Succeeded);
    let a = h.reap(1, ExitStatus::code(0));
    assert_eq!(spawns(&a), vec![id(4)], "c and d were waiting before a");
    let a = h.ev(Event::SpawnFailed {
        task_id: id(3),
        error: "nope".into(),
    });
    assert_eq!(spawns(&a), vec![id(5)]);
    let _ = h.stop(StopTarget::Task(id(2)), Scope::Owner).unwrap();
    let _ = h.spawned(4);
    let _ = h.ev(Event::ProtocolError {
        task_id: id(4),
        error: "x".into(),
    });
    let _ = h
        .stop(StopTarget::SessionCurrent("d".into()), Scope::Owner)
        .unwrap();
    let _ = h.spawned(5);
    let _ = h.timer(5, StopStep::Sigterm);
    let _ = h.reap(5, ExitStatus::signal(15));
    assert_eq!(h.d.n_sessions(), 1);
    let _ = h.reap(4, ExitStatus::signal(9));
    h.assert_empty();
    assert!(h.d.positions().is_empty());
}

// ----- queue modes -----

#[test]
fn collect_merges_held_messages_into_one_follow_up() {
    let mut h = H::with(config_with(
        2,
        settings(Mode::Collect, 0, 20, DropPolicy::Old),
    ));
    let (r, a) = h.accept(msg(1, "a"));
    assert_eq!(r, Ok(plain(1)));
    assert_eq!(spawns(&a), vec![id(1)]);
    for n in 2..=4 {
        let (r, a) = h.accept(msg(n, "a"));
        assert_eq!(r, Ok(plain(n)));
        assert_eq!(a, vec![]);
        assert_eq!(h.d.task(&id(n)).unwrap().mode, Mode::Collect);
    }
    assert_eq!(h.d.n_queued(), 3);
    h.run(1);
    let _ = h.report(1, ReportOutcome::Succeeded);
    let a = h.at(3_000).reap(1, ExitStatus::code(0));
    // The run ends; the held messages after the first end merged into it, and it
    // starts with all of them, in order.
    let f = finished(&a);
    assert_eq!(
        f.iter().map(|t| t.id).collect::<Vec<_>>(),
        vec![id(1), id(3), id(4)]
    );
    for t in &f[1..] {
        assert_eq!(
            t.state,
            TaskState::Done {
                ending: Ending::Merged { into: id(2) },
                exit: None
            }
        );
        assert_eq!(t.finished_at, Some(Millis(3_000)));
    }
    let want = collected_text(&texts(&[2, 3, 4]));
    assert!(want.starts_with("[Queued messages while agent was busy]"));
    assert_eq!(
        a.last(),
        Some(&Action::Spawn {
            task_id: id(2),
            session: "a".into(),
            text: want.clone()
        })
    );
    assert_eq!(a.len(), 4, "{a:#?}");
    assert_eq!(h.d.task(&id(2)).unwrap().text, want);
    assert_eq!(h.d.n_queued(), 0);
    assert!(h.d.task(&id(3)).is_none() && h.d.task(&id(4)).is_none());
    // A single held message stays as it is.
    let _ = h.accept(msg(5, "a"));
    let a = h.reap(2, ExitStatus::code(0));
    assert_eq!(spawn_text(&a, 5), "text 5");
    assert_eq!(finished(&a).len(), 1);
    let _ = h.reap(5, ExitStatus::code(0));
    h.assert_empty();
}

#[test]
fn followup_runs_each_held_message_as_its_own_task_in_order() {
    let mut h = H::with(config_with(
        2,
        settings(Mode::Followup, 0, 20, DropPolicy::Old),
    ));
    let _ = h.accept(msg(1, "a"));
    for n in 2..=4 {
        let (r, a) = h.accept(msg(n, "a"));
        assert_eq!(r, Ok(plain(n)));
        assert_eq!(a, vec![]);
    }
    let mut running = 1;
    for n in 2..=4 {
        let a = h.reap(running, ExitStatus::code(0));
        assert_eq!(finished(&a).len(), 1, "nothing merges: {a:#?}");
        assert_eq!(spawns(&a), vec![id(n)]);
        assert_eq!(spawn_text(&a, n), format!("text {n}"));
        running = n;
    }
    let _ = h.reap(4, ExitStatus::code(0));
    h.assert_empty();
}

#[test]
fn collect_for_an_agent_that_wants_no_collected_prompts_runs_each_message_alone() {
    let mut h = H::with(Config {
        collected_prompts: false,
        ..config_with(2, settings(Mode::Collect, 0, 20, DropPolicy::Old))
    });
    let _ = h.accept(msg(1, "a"));
    for n in 2..=3 {
        let _ = h.accept(msg(n, "a"));
    }
    h.run(1);
    let _ = h.report(1, ReportOutcome::Succeeded);
    let a = h.reap(1, ExitStatus::code(0));
    // Drained as followup: the first held message runs with its own text only.
    assert_eq!(finished(&a).len(), 1);
    assert_eq!(
        a.iter()
            .filter_map(|a| match a {
                Action::Spawn { task_id, text, .. } => Some((*task_id, text.clone())),
                _ => None,
            })
            .collect::<Vec<_>>(),
        vec![(id(2), "text 2".to_string())]
    );
    assert_eq!(h.state(3), TaskState::Queued);
    // What the daemon learns later of its agent applies to the next runs.
    h.d.set_collected_prompts(true);
    let _ = h.accept(msg(4, "a"));
    h.run(2);
    let _ = h.report(2, ReportOutcome::Succeeded);
    let a = h.reap(2, ExitStatus::code(0));
    assert_eq!(spawns(&a), vec![id(3)]);
    assert_eq!(h.state(3), TaskState::Starting { pid: None });
    assert_eq!(
        h.d.task(&id(3)).unwrap().text,
        collected_text(&texts(&[3, 4]))
    );
}

#[test]
fn drop_summarize_adds_no_overflow_note_for_an_agent_that_runs_messages_as_commands() {
    let mut h = H::with(Config {
        collected_prompts: false,
        ..config_with(2, settings(Mode::Followup, 0, 1, DropPolicy::Summarize))
    });
    let _ = h.accept(msg(1, "a"));
    let _ = h.accept(msg(2, "a"));
    let (r, a) = h.accept(msg(3, "a"));
    assert!(matches!(r, Ok(Accepted::Task { ref dropped, .. }) if *dropped == vec![id(2)]));
    assert_eq!(ending(&only_finished(&a, 2)), &Ending::Dropped);
    let a = h.reap(1, ExitStatus::code(0));
    // The dropped message's text is not passed on, where a shell would run it.
    assert_eq!(spawn_text(&a, 3), "text 3");
}

#[test]
fn a_shutdown_interrupts_running_tasks_and_keeps_the_queue() {
    let mut h = H::new(2);
    let _ = h.accept(msg(1, "a"));
    let _ = h.accept(msg(2, "b"));
    let _ = h.accept(msg(3, "a"));
    h.run(1);
    h.run(2);
    // A user's stop already under way ends as the shutdown's too.
    let _ = h.stop(StopTarget::Task(id(2)), Scope::Owner).unwrap();
    let a = h.d.stop_for_shutdown(Millis(h.now)).into_vec();
    assert!(a.contains(&Action::SendCancel { task_id: id(1) }), "{a:?}");
    assert!(!a.contains(&Action::SendCancel { task_id: id(2) }), "{a:?}");
    for n in [1, 2] {
        let a = h.reap(n, ExitStatus::code(130));
        assert!(
            matches!(
                ending(&only_finished(&a, n)),
                Ending::Interrupted {
                    by: Some(StopStep::CooperativeCancel),
                    why: Interruption::Shutdown,
                    ..
                }
            ),
            "{n}: {a:?}"
        );
    }
    // Queued work is not stopped (the daemon spawns nothing more while it stops).
    assert!(!matches!(h.state(3), TaskState::Done { .. }));
}

#[test]
fn collect_merges_only_consecutive_collected_messages() {
    let mut h = H::with(config_with(
        2,
        settings(Mode::Collect, 0, 20, DropPolicy::Old),
    ));
    let _ = h.accept(msg(1, "a"));
    let _ = h.accept(msg(2, "a"));
    // A `/queue followup` prefix: this message only.
    let _ = h.accept(with_mode(Mode::Followup, msg(3, "a")));
    let _ = h.accept(msg(4, "a"));
    let _ = h.accept(msg(5, "a"));
    assert_eq!(h.d.task(&id(3)).unwrap().mode, Mode::Followup);
    let a = h.reap(1, ExitStatus::code(0));
    assert_eq!(spawn_text(&a, 2), "text 2", "a follow-up is not collected");
    assert_eq!(finished(&a).len(), 1);
    let a = h.reap(2, ExitStatus::code(0));
    assert_eq!(spawn_text(&a, 3), "text 3", "nor does a follow-up collect");
    assert_eq!(finished(&a).len(), 1);
    let a = h.reap(3, ExitStatus::code(0));
    assert_eq!(spawn_text(&a, 4), collected_text(&texts(&[4, 5])));
    assert_eq!(
        ending(finished(&a)[1]),
        &Ending::Merged { into: id(4) },
        "{a:#?}"
    );
    let _ = h.reap(4, ExitStatus::code(0));
    h.assert_empty();
}

// ----- debounce -----

#[test]
fn debounce_holds_the_follow_up_until_quiet_and_a_new_message_rearms_it() {
    let mut h = H::with(config_with(
        2,
        settings(Mode::Collect, 1_000, 20, DropPolicy::Old),
    ));
    // The first message of an idle session starts at once; held messages arm nothing
    // while the run is active.
    assert_eq!(spawns(&h.accept(msg(1, "a")).1), vec![id(1)]);
    assert_eq!(h.accept(msg(2, "a")).1, vec![]);
    let a = h.at(2_000).reap(1, ExitStatus::code(0));
    assert_eq!(spawns(&a), no_ids());
    let d = debounces(&a);
    assert_eq!(d.len(), 1, "{a:#?}");
    let (session, after, g1) = d[0].clone();
    assert_eq!((session.as_str(), after), ("a", Duration::from_secs(1)));
    assert_eq!(h.busy(), 0, "the slot stays free during the quiet time");
    assert_eq!(h.d.active_task("a"), None);
    assert_eq!(h.state(2), TaskState::Queued);
    assert_eq!(h.d.position(&id(2)), Some(1));
    // Another session is not held up by a's quiet time.
    assert_eq!(spawns(&h.accept(msg(3, "b")).1), vec![id(3)]);
    // A new message in the window arms a newer timer; the first one is stale.
    let (r, a) = h.at(2_500).accept(msg(4, "a"));
    assert_eq!(r, Ok(plain(4)));
    let d = debounces(&a);
    assert_eq!(a.len(), 1, "{a:#?}");
    let (session, after, g2) = d[0].clone();
    assert_eq!((session.as_str(), after), ("a", Duration::from_secs(1)));
    assert!(g2 > g1);
    let before = h.snapshot();
    assert_eq!(
        h.at(3_000).ev(Event::Debounce {
            session: "a".into(),
            generation: g1
        }),
        vec![]
    );
    assert_eq!(h.snapshot(), before);
    // The latest timer ends the wait: the held messages start, collected.
    let a = h.at(3_500).ev(Event::Debounce {
        session: "a".into(),
        generation: g2,
    });
    assert_eq!(
        ending(&only_finished(&a, 4)),
        &Ending::Merged { into: id(2) }
    );
    assert_eq!(spawns(&a), vec![id(2)]);
    assert_eq!(spawn_text(&a, 2), collected_text(&texts(&[2, 4])));
    assert_eq!(h.d.task(&id(2)).unwrap().started_at, Some(Millis(3_500)));
    // Replays, stale generations and unknown sessions change nothing.
    let before = h.snapshot();
    for (session, generation) in [("a", g2), ("a", g1), ("a", g2 + 100), ("zz", g2)] {
        let ev = Event::Debounce {
            session: session.into(),
            generation,
        };
        assert_eq!(h.ev(ev.clone()), vec![], "{ev:?}");
        assert_eq!(h.snapshot(), before, "{ev:?}");
    }
}

#[test]
fn debounce_applies_before_each_follow_up_not_to_a_session_that_emptied() {
    let mut h = H::with(config_with(
        1,
        settings(Mode::Followup, 500, 20, DropPolicy::Old),
    ));
    let _ = h.accept(msg(1, "a"));
    let _ = h.accept(msg(2, "a"));
    let _ = h.accept(msg(3, "a"));
    let a = h.reap(1, ExitStatus::code(0));
    let (_, _, g) = debounces(&a)[0].clone();
    let a = h.ev(Event::Debounce {
        session: "a".into(),
        generation: g,
    });
    assert_eq!(spawns(&a), vec![id(2)]);
    let a = h.reap(2, ExitStatus::code(0));
    assert_eq!(spawns(&a), no_ids());
    let (_, _, g) = debounces(&a)[0].clone();
    // The held message is cancelled in the window: the session is forgotten, and
    // its timer finds nothing.
    let (_, a) = h.stop(StopTarget::Task(id(3)), Scope::Owner).unwrap();
    assert_eq!(ending(&only_finished(&a, 3)), &cancelled_queued());
    h.assert_empty();
    assert_eq!(
        h.ev(Event::Debounce {
            session: "a".into(),
            generation: g
        }),
        vec![]
    );
    // A new message of the session starts at once.
    assert_eq!(spawns(&h.accept(msg(4, "a")).1), vec![id(4)]);
}

// ----- steer -----

#[test]
fn steer_goes_into_a_running_task_that_accepts_it() {
    let mut h = H::steering(1_000);
    let running = h.state(1);
    let (r, a) = h.at(1_500).accept(msg(2, "a"));
    assert_eq!(
        r,
        Ok(Accepted::Task {
            task_id: id(2),
            steered_into: Some(id(1)),
            dropped: vec![],
            notice: None
        })
    );
    assert_eq!(a.len(), 2, "{a:#?}");
    assert_eq!(
        a[0],
        Action::Steer {
            task_id: id(1),
            text: "text 2".into()
        }
    );
    let t = only_finished(&a, 2);
    assert_eq!(
        t.state,
        TaskState::Done {
            ending: Ending::Merged { into: id(1) },
            exit: None
        }
    );
    assert_eq!(t.finished_at, Some(Millis(1_500)));
    assert!(h.d.task(&id(2)).is_none());
    assert_eq!(h.d.n_queued(), 0);
    assert_eq!(h.state(1), running);
    // Nothing follows the run.
    let a = h.reap(1, ExitStatus::code(0));
    assert_eq!(spawns(&a), no_ids());
    assert_eq!(debounces(&a), vec![]);
    h.assert_empty();
}

#[test]
fn steer_falls_back_to_a_followup_with_a_notice_when_the_task_cannot_take_it() {
    // The agent said it does not steer; it has not done its handshake; it is stopping.
    for case in 0..3 {
        let mut h = H::with(config_with(
            2,
            settings(Mode::Steer, 0, 20, DropPolicy::Old),
        ));
        let _ = h.accept(msg(1, "a"));
        match case {
            0 => h.run(1),
            1 => {
                let _ = h.spawned(1);
            }
            _ => {
                let _ = h.spawned(1);
                let _ = h.ev(Event::AgentReady {
                    task_id: id(1),
                    steer: true,
                });
                let _ = h.stop(StopTarget::Task(id(1)), Scope::Owner).unwrap();
            }
        }
        let before = h.state(1);
        let (r, a) = h.accept(msg(2, "a"));
        assert_eq!(a, vec![], "case {case}: no Steer");
        let text = notice(&r).unwrap_or_else(|| panic!("case {case}: no notice"));
        assert!(text.contains("follow-up"), "{text}");
        assert!(matches!(
            r,
            Ok(Accepted::Task { task_id, steered_into: None, ref dropped, .. })
                if task_id == id(2) && dropped.is_empty()
        ));
        assert_eq!(h.state(2), TaskState::Queued);
        assert_eq!(h.d.task(&id(2)).unwrap().mode, Mode::Followup);
        assert_eq!(h.state(1), before);
        // It runs as its own task when the run ends.
        let a = h.reap(1, ExitStatus::code(0));
        assert_eq!(spawns(&a), vec![id(2)]);
        assert_eq!(spawn_text(&a, 2), "text 2");
    }
}

/// While the daemon says the agent's unread steers are at their bound, a steer is
/// queued as a follow-up with a notice that says why; once it has caught up,
/// steering goes in again. The mark goes with the task.
#[test]
fn steer_falls_back_to_a_followup_while_the_agents_steer_backlog_is_full() {
    let mut h = H::steering(0);
    h.d.set_steer_backlog_full(id(1), true);
    let (r, a) = h.accept(msg(2, "a"));
    assert_eq!(a, vec![], "no Steer");
    let text = notice(&r).expect("a notice");
    assert!(
        text.contains("has not read") && text.contains("follow-up"),
        "{text}"
    );
    assert_eq!(h.state(2), TaskState::Queued);
    assert_eq!(h.d.task(&id(2)).unwrap().mode, Mode::Followup);
    h.d.set_steer_backlog_full(id(1), false);
    let (r, a) = h.accept(msg(3, "a"));
    assert!(
        matches!(r, Ok(Accepted::Task { steered_into: Some(t), .. }) if t == id(1)),
        "{r:?}"
    );
    assert_eq!(
        a[0],
        Action::Steer {
            task_id: id(1),
            text: "text 3".into()
        }
    );
    // A task that is not live is never marked.
    h.d.set_steer_backlog_full(id(9), true);
    h.d.set_steer_backlog_full(id(1), true);
    let a = h.reap(1, ExitStatus::code(0));
    assert_eq!(spawns(&a), vec![id(2)]);
    let _ = h.spawned(2);
    let _ = h.ev(Event::AgentReady {
        task_id: id(2),
        steer: true,
    });
    let (r, _) = h.accept(msg(4, "a"));
    assert!(
        matches!(r, Ok(Accepted::Task { steered_into: Some(t), .. }) if t == id(2)),
        "{r:?}"
    );
}

#[test]
fn steer_to_an_idle_session_just_starts() {
    let mut h = H::with(config_with(
        2,
        settings(Mode::Steer, 0, 20, DropPolicy::Old),
    ));
    let (r, a) = h.accept(msg(1, "a"));
    assert_eq!(r, Ok(plain(1)));
    assert_eq!(spawns(&a), vec![id(1)]);
    assert!(!a.iter().any(|a| matches!(a, Action::Steer { .. })));
}

#[test]
fn steer_backlog_steers_now_and_keeps_a_follow_up() {
    let mut h = H::with(config_with(
        2,
        settings(Mode::Collect, 0, 20, DropPolicy::Old),
    ));
    let _ = h.accept(msg(1, "a"));
    let _ = h.spawned(1);
    let _ = h.ev(Event::AgentReady {
        task_id: id(1),
        steer: true,
    });
    let (r, a) = h.accept(with_mode(Mode::SteerBacklog, msg(2, "a")));
    assert_eq!(
        r,
        Ok(Accepted::Task {
            task_id: id(2),
            steered_into: Some(id(1)),
            dropped: vec![],
            notice: None
        })
    );
    assert_eq!(
        a,
        vec![Action::Steer {
            task_id: id(1),
            text: "text 2".into()
        }]
    );
    assert_eq!(h.state(2), TaskState::Queued);
    assert_eq!(h.d.task(&id(2)).unwrap().mode, Mode::Followup);
    // A collected message behind it runs after it, on its own.
    let _ = h.accept(msg(3, "a"));
    let a = h.reap(1, ExitStatus::code(0));
    assert_eq!(spawns(&a), vec![id(2)]);
    assert_eq!(spawn_text(&a, 2), "text 2");
    // Task 2 has not done its handshake: no steering now, a notice instead.
    let (r, a) = h.accept(with_mode(Mode::SteerBacklog, msg(4, "a")));
    assert_eq!(a, vec![]);
    assert!(notice(&r).is_some());
    assert_eq!(h.d.task(&id(4)).unwrap().mode, Mode::Followup);
    let a = h.reap(2, ExitStatus::code(0));
    assert_eq!(spawns(&a), vec![id(3)]);
    assert_eq!(spawn_text(&a, 3), "text 3", "a follow-up is not collected");
    let a = h.reap(3, ExitStatus::code(0));
    assert_eq!(spawns(&a), vec![id(4)]);
}

// ----- interrupt -----

#[test]
fn interrupt_stops_the_active_task_and_runs_the_message_next() {
    let mut h = H::with(config_with(
        2,
        settings(Mode::Followup, 1_000, 20, DropPolicy::Old),
    ));
    let _ = h.accept(msg(1, "a"));
    h.run(1);
    let _ = h.accept(msg(2, "a"));
    let _ = h.accept(msg(3, "a"));
    let (r, a) = h.at(2_000).accept(with_mode(Mode::Interrupt, msg(4, "a")));
    assert_eq!(
        a,
        vec![
            Action::SendCancel { task_id: id(1) },
            Action::SetTimer {
                task_id: id(1),
                after: CANCEL_GRACE,
                step: StopStep::Sigterm
            }
        ]
    );
    let text = notice(&r).expect("the sender is told").to_string();
    assert!(text.contains(&id(1).to_string()), "{text}");
    assert_eq!(
        h.state(1),
        TaskState::Stopping {
            pid: Some(pid(1)),
            step: StopStep::CooperativeCancel,
            requested_at: Millis(2_000),
            cause: StopCause::Interrupt,
            step_at: Millis(2_000),
        }
    );
    assert_eq!(h.busy(), 1, "the slot is held until the reap");
    // It runs next, before the older held messages.
    assert_eq!(h.d.position(&id(4)), Some(1));
    assert_eq!(h.d.position(&id(2)), Some(2));
    assert_eq!(h.d.position(&id(3)), Some(3));
    let _ = h.report(1, ReportOutcome::Succeeded);
    let a = h.at(2_300).reap(1, ExitStatus::code(0));
    let f = finished(&a);
    assert_eq!(f.len(), 1);
    assert_eq!(
        f[0].state,
        TaskState::Done {
            ending: Ending::Interrupted {
                by: Some(StopStep::CooperativeCancel),
                after: Duration::from_millis(300),
                why: Interruption::NewerMessage,
            },
            exit: Some(ExitStatus::code(0))
        }
    );
    // No quiet time before an interrupting message.
    assert_eq!(debounces(&a), vec![]);
    assert_eq!(spawns(&a), vec![id(4)]);
    assert_eq!(spawn_text(&a, 4), "text 4");
    // The older held messages follow, after the quiet time.
    let a = h.reap(4, ExitStatus::code(0));
    assert_eq!(spawns(&a), no_ids());
    let (_, _, g) = debounces(&a)[0].clone();
    let a = h.ev(Event::Debounce {
        session: "a".into(),
        generation: g,
    });
    assert_eq!(spawns(&a), vec![id(2)]);
}

#[test]
fn interrupt_escalates_like_a_stop_and_records_the_step() {
    let mut h = H::with(config_with(
        1,
        settings(Mode::Interrupt, 0, 20, DropPolicy::Old),
    ));
    let _ = h.accept(msg(1, "a"));
    h.run(1);
    let _ = h.at(2_000).accept(msg(2, "a"));
    let a = h.at(7_000).timer(1, StopStep::Sigterm);
    assert_eq!(
        a[0],
        Action::Signal {
            task_id: id(1),
            step: StopStep::Sigterm
        }
    );
    // A second interrupt does not stop it again; it runs first.
    let (r, a) = h.accept(msg(3, "a"));
    assert_eq!(a, vec![]);
    assert_eq!(notice(&r), None);
    let a = h.at(7_500).reap(1, ExitStatus::signal(15));
    assert_eq!(
        ending(finished(&a)[0]),
        &Ending::Interrupted {
            by: Some(StopStep::Sigterm),
            after: Duration::from_millis(5_500),
            why: Interruption::NewerMessage,
        }
    );
    assert_eq!(spawns(&a), vec![id(3)]);
    let a = h.reap(3, ExitStatus::code(0));
    assert_eq!(spawns(&a), vec![id(2)]);
}

#[test]
fn interrupt_skips_the_quiet_time_and_an_idle_session_just_starts() {
    let mut h = H::with(config_with(
        1,
        settings(Mode::Followup, 1_000, 20, DropPolicy::Old),
    ));
    let (r, a) = h.accept(with_mode(Mode::Interrupt, msg(1, "a")));
    assert_eq!(r, Ok(plain(1)), "nothing to interrupt");
    assert_eq!(spawns(&a), vec![id(1)]);
    let _ = h.accept(msg(2, "a"));
    let a = h.reap(1, ExitStatus::code(0));
    let (_, _, g) = debounces(&a)[0].clone();
    // In the quiet window: the interrupting message starts now.
    let (r, a) = h.accept(with_mode(Mode::Interrupt, msg(3, "a")));
    assert_eq!(r, Ok(plain(3)));
    assert_eq!(spawns(&a), vec![id(3)]);
    assert_eq!(debounces(&a), vec![]);
    // The old timer is stale.
    assert_eq!(
        h.ev(Event::Debounce {
            session: "a".into(),
            generation: g
        }),
        vec![]
    );
    let a = h.reap(3, ExitStatus::code(0));
    let (_, _, g) = debounces(&a)[0].clone();
    let a = h.ev(Event::Debounce {
        session: "a".into(),
        generation: g,
    });
    assert_eq!(spawns(&a), vec![id(2)]);
}

// ----- cap and drop policies -----

#[test]
fn cap_with_drop_new_refuses_the_message_and_changes_nothing() {
    let mut h = H::with(config_with(
        2,
        settings(Mode::Followup, 0, 2, DropPolicy::New),
    ));
    let _ = h.accept(msg(1, "a"));
    let _ = h.spawned(1);
    let _ = h.ev(Event::AgentReady {
        task_id: id(1),
        steer: true,
    });
    let _ = h.accept(msg(2, "a"));
    let _ = h.accept(msg(3, "a"));
    let before = h.snapshot();
    for m in [
        with_id("m4", msg(4, "a")),
        with_mode(Mode::Interrupt, msg(4, "a")),
        with_mode(Mode::SteerBacklog, msg(4, "a")),
    ] {
        let (r, a) = h.accept(m.clone());
        assert_eq!(r, Err(Refused::SessionFull { cap: 2 }), "{m:?}");
        assert_eq!(a, vec![], "{m:?}: no Steer, no stop");
        assert_eq!(h.snapshot(), before);
    }
    // Steering queues nothing, so it is not limited.
    let (r, _) = h.accept(with_mode(Mode::Steer, msg(5, "a")));
    assert!(matches!(r, Ok(Accepted::Task { steered_into: Some(t), .. }) if t == id(1)));
    // Other sessions have room.
    assert_eq!(spawns(&h.accept(msg(6, "b")).1), vec![id(6)]);
    // The refused message left no trace: its re-delivery, once there is room, is new.
    let _ = h.stop(StopTarget::Task(id(2)), Scope::Owner).unwrap();
    let (r, _) = h.accept(with_id("m4", msg(7, "a")));
    assert_eq!(r, Ok(plain(7)));
}

#[test]
fn cap_with_drop_old_drops_the_oldest_held_message() {
    let mut h = H::with(config_with(
        2,
        settings(Mode::Followup, 0, 2, DropPolicy::Old),
    ));
    let _ = h.accept(msg(1, "a"));
    let _ = h.accept(msg(2, "a"));
    let _ = h.accept(msg(3, "a"));
    let (r, a) = h.at(1_500).accept(msg(4, "a"));
    assert_eq!(
        r,
        Ok(Accepted::Task {
            task_id: id(4),
            steered_into: None,
            dropped: vec![id(2)],
            notice: None
        })
    );
    assert_eq!(a.len(), 1, "{a:#?}");
    let t = only_finished(&a, 2);
    assert_eq!(
        t.state,
        TaskState::Done {
            ending: Ending::Dropped,
            exit: None
        }
    );
    assert_eq!(t.finished_at, Some(Millis(1_500)));
    assert_eq!(h.d.position(&id(3)), Some(1));
    assert_eq!(h.d.position(&id(4)), Some(2));
    assert_eq!(h.d.n_queued(), 2);
    let a = h.reap(1, ExitStatus::code(0));
    assert_eq!(
        spawn_text(&a, 3),
        "text 3",
        "no overflow note with drop:old"
    );
}

#[test]
fn cap_with_drop_summarize_tells_the_next_follow_up_what_was_dropped() {
    let mut h = H::with(config_with(
        2,
        settings(Mode::Collect, 0, 2, DropPolicy::Summarize),
    ));
    let long = format!("fix the\n   build {}", "x".repeat(100));
    let _ = h.accept(msg(1, "a"));
    let _ = h.accept(Message::new(id(2), "a", long.clone()));
    let _ = h.accept(msg(3, "a"));
    let (r, a) = h.accept(msg(4, "a"));
    assert!(matches!(r, Ok(Accepted::Task { ref dropped, .. }) if *dropped == vec![id(2)]));
    assert_eq!(ending(&only_finished(&a, 2)), &Ending::Dropped);
    let (r, a) = h.accept(msg(5, "a"));
    assert!(matches!(r, Ok(Accepted::Task { ref dropped, .. }) if *dropped == vec![id(3)]));
    assert_eq!(ending(&only_finished(&a, 3)), &Ending::Dropped);
    let a = h.reap(1, ExitStatus::code(0));
    let note = overflow_text(&[preview(&long), preview("text 3")]);
    assert!(note.contains("Dropped 2 messages"));
    let text = spawn_text(&a, 4);
    assert!(text.starts_with(&note), "{text}");
    assert_eq!(
        text,
        format!("{note}\n\n{}", collected_text(&texts(&[4, 5])))
    );
    // Only the next follow-up carries the note.
    let _ = h.accept(msg(6, "a"));
    let a = h.reap(4, ExitStatus::code(0));
    assert_eq!(spawn_text(&a, 6), "text 6");
}

/// A flood into a busy session with `drop: summarize` kept a preview of every
/// dropped message for the next follow-up: memory without bound, and past about
/// 45,000 of them a prompt too large for one IPC frame (the agent never got it).
/// The note keeps the first [`MAX_PREVIEWS`] and counts the rest.
#[test]
fn a_flood_of_dropped_messages_gives_a_bounded_overflow_note_that_counts_them_all() {
    let mut h = H::with(config_with(
        2,
        settings(Mode::Followup, 0, 1, DropPolicy::Summarize),
    ));
    let _ = h.accept(msg(1, "a"));
    h.run(1);
    let n = 5_000;
    for k in 2..=n + 2 {
        let _ = h.accept(msg(k, "a"));
    }
    let a = h.reap(1, ExitStatus::code(0));
    let text = spawn_text(&a, n + 2);
    assert!(
        text.contains(&format!("Dropped {n} messages")),
        "{}",
        &text[..200]
    );
    assert!(text.contains("text 2\n") && text.contains(&format!("text {}\n", MAX_PREVIEWS + 1)));
    assert!(
        !text.contains(&format!("text {}\n", MAX_PREVIEWS + 2)),
        "{text}"
    );
    assert!(
        text.contains(&format!("… and {} more", n as usize - MAX_PREVIEWS)),
        "{text}"
    );
    assert!(text.len() < 16 * 1024, "{} bytes", text.len());
}

/// Held messages of up to 1 MiB each, collected into one prompt, made one larger
/// than an IPC frame holds (4 MiB): the agent was never started on it. A collected
/// prompt takes messages only while it stays within [`MAX_COLLECTED_BYTES`]; the
/// rest are the next collected follow-up, nothing is dropped.
#[test]
fn a_collected_prompt_stays_within_its_size_bound_and_the_rest_follow() {
    let mut h = H::with(config_with(
        2,
        settings(Mode::Collect, 0, 20, DropPolicy::Old),
    ));
    let _ = h.accept(msg(1, "a"));
    h.run(1);
    let big = |k: u128| format!("{k} {}", "x".repeat(900 * 1024));
    for k in 2..=7 {
        let _ = h.accept(Message::new(id(k), "a", big(k)));
    }
    let a = h.reap(1, ExitStatus::code(0));
    let first = spawn_text(&a, 2);
    assert!(first.len() <= MAX_COLLECTED_BYTES, "{}", first.len());
    let taken = finished(&a).iter().filter(|t| t.id != id(1)).count() + 1;
    assert!((2..6).contains(&taken), "{taken} messages collected");
    assert_eq!(
        first,
        collected_text(&(2..2 + taken as u128).map(big).collect::<Vec<_>>())
    );
    assert_eq!(h.d.n_queued(), 6 - taken);
    // The rest are the next one, and so on until every message ran.
    let (mut active, mut batch, mut ran) = (2u128, taken, taken);
    while ran < 6 {
        h.run(active);
        let a = h.reap(active, ExitStatus::code(0));
        let next = active + batch as u128;
        assert!(spawn_text(&a, next).len() <= MAX_COLLECTED_BYTES);
        batch = finished(&a).iter().filter(|t| t.id != id(active)).count() + 1;
        ran += batch;
        active = next;
    }
    assert_eq!(ran, 6);
}

#[test]
fn global_queue_limit_refuses_and_changes_nothing() {
    let mut h = H::with(Config {
        max_queued: 2,
        ..config(1)
    });
    let _ = h.accept(msg(1, "a"));
    h.run(1);
    let _ = h.accept(msg(2, "a"));
    let _ = h.accept(msg(3, "b"));
    let before = h.snapshot();
    for m in [
        with_id("x", msg(4, "c")),
        msg(4, "a"),
        with_mode(Mode::Interrupt, msg(4, "a")),
    ] {
        let (r, a) = h.accept(m.clone());
        assert_eq!(r, Err(Refused::QueueFull { limit: 2 }), "{m:?}");
        assert_eq!(a, vec![], "{m:?}");
        assert_eq!(h.snapshot(), before, "{m:?}");
    }
    // Room again: accepted, and the refused message's id was not remembered.
    let _ = h.stop(StopTarget::Task(id(3)), Scope::Owner).unwrap();
    let (r, _) = h.accept(with_id("x", msg(5, "c")));
    assert_eq!(r, Ok(plain(5)));
}

#[test]
fn the_global_queue_limit_does_not_refuse_work_that_starts_at_once() {
    // Two slots, one busy; the queue is full with a's held message.
    let mut h = H::with(Config {
        max_queued: 1,
        ..config(2)
    });
    let _ = h.accept(msg(1, "a"));
    h.run(1);
    let _ = h.accept(msg(2, "a"));
    // b's message does not wait: it takes the free slot.
    let (r, a) = h.accept(msg(3, "b"));
    assert_eq!(r, Ok(plain(3)));
    assert_eq!(spawns(&a), vec![id(3)]);
}

#[test]
fn the_global_queue_limit_does_not_refuse_what_drop_old_makes_room_for() {
    let mut h = H::with(Config {
        max_queued: 1,
        queue: QueueSettings {
            cap: 1,
            drop: DropPolicy::Old,
            ..config(1).queue
        },
        ..config(1)
    });
    let _ = h.accept(msg(1, "a"));
    h.run(1);
    let _ = h.accept(msg(2, "a"));
    // a is at its cap of 1 and the global queue is full, but dropping 2 makes room.
    let (r, _) = h.accept(msg(3, "a"));
    assert!(
        matches!(r, Ok(Accepted::Task { ref dropped, .. }) if dropped == &vec![id(2)]),
        "{r:?}"
    );
    assert_eq!(h.d.n_queued(), 1);
}

// ----- priorities -----

#[test]
fn background_work_waits_while_interactive_work_is_ready() {
    let mut h = H::new(1);
    let _ = h.accept(msg(1, "a"));
    assert_eq!(h.accept(background(msg(2, "bg"))).1, vec![]);
    assert_eq!(h.accept(msg(3, "c")).1, vec![]);
    assert_eq!(h.d.position(&id(3)), Some(1));
    assert_eq!(h.d.position(&id(2)), Some(2));
    let a = h.reap(1, ExitStatus::code(0));
    assert_eq!(spawns(&a), vec![id(3)]);
    let a = h.reap(3, ExitStatus::code(0));
    assert_eq!(spawns(&a), vec![id(2)]);
    assert_eq!(h.d.task(&id(2)).unwrap().priority, Priority::Background);
}

#[test]
fn max_background_caps_live_background_tasks_even_with_free_slots() {
    let mut h = H::with(Config {
        max_background: Some(1),
        ..config(3)
    });
    assert_eq!(spawns(&h.accept(background(msg(1, "x"))).1), vec![id(1)]);
    assert_eq!(h.accept(background(msg(2, "y"))).1, vec![]);
    assert_eq!(h.busy(), 1);
    assert_eq!(h.state(2), TaskState::Queued);
    // Interactive work takes the free slots.
    assert_eq!(spawns(&h.accept(msg(3, "z")).1), vec![id(3)]);
    assert_eq!(h.busy(), 2);
    assert_eq!(spawns(&h.reap(3, ExitStatus::code(0))), no_ids());
    // A background slot frees: the waiting background task starts.
    assert_eq!(spawns(&h.reap(1, ExitStatus::code(0))), vec![id(2)]);
}

// ----- expiry -----

#[test]
fn queued_tasks_expire_after_the_queue_timeout_active_ones_do_not() {
    let mut h = H::with(Config {
        queue_timeout: Some(Duration::from_secs(10)),
        ..config(1)
    });
    let _ = h.accept(msg(1, "a"));
    h.run(1);
    let _ = h.at(2_000).accept(msg(2, "a"));
    let _ = h.at(5_000).accept(msg(3, "b"));
    assert_eq!(h.at(11_999).ev(Event::Tick), vec![]);
    let a = h.at(12_000).ev(Event::Tick);
    let t = only_finished(&a, 2);
    assert_eq!(a.len(), 1);
    assert_eq!(
        t.state,
        TaskState::Done {
            ending: Ending::Expired,
            exit: None
        }
    );
    assert_eq!(t.finished_at, Some(Millis(12_000)));
    assert!(matches!(h.state(1), TaskState::Running { .. }));
    let a = h.at(15_000).ev(Event::Tick);
    assert_eq!(ending(&only_finished(&a, 3)), &Ending::Expired);
    assert_eq!(h.d.n_sessions(), 1, "b is forgotten");
    assert_eq!(h.at(60_000).ev(Event::Tick), vec![]);
    assert!(matches!(h.state(1), TaskState::Running { .. }));
    assert_eq!(spawns(&h.reap(1, ExitStatus::code(0))), no_ids());
    h.assert_empty();
}

#[test]
fn without_a_queue_timeout_ticks_change_nothing() {
    let mut h = H::new(1);
    let _ = h.accept(msg(1, "a"));
    let _ = h.accept(msg(2, "a"));
    let before = h.snapshot();
    assert_eq!(h.at(1_000_000_000).ev(Event::Tick), vec![]);
    assert_eq!(h.snapshot(), before);
}

// ----- de-duplication (invariant 11) -----

#[test]
fn a_redelivered_message_is_acknowledged_with_the_original_task() {
    let mut h = H::new(1);
    let (r, a) = h.accept(with_id("m1", msg(1, "a")));
    assert_eq!(r, Ok(plain(1)));
    assert_eq!(spawns(&a), vec![id(1)]);
    let _ = h.accept(with_id("m2", msg(2, "a")));
    for (n, original) in [(10, 1), (11, 2)] {
        let before = h.snapshot();
        let m = with_id(&format!("m{original}"), msg(n, "a"));
        let (r, a) = h.accept(m);
        assert_eq!(
            r,
            Ok(Accepted::Duplicate {
                task_id: id(original)
            })
        );
        assert_eq!(a, vec![]);
        assert_eq!(h.snapshot(), before);
        assert!(h.d.task(&id(n)).is_none());
    }
    // The same id in another session is another message.
    let (r, _) = h.accept(with_id("m1", msg(3, "b")));
    assert_eq!(r, Ok(plain(3)));
    // Also once the original finished.
    let _ = h.reap(1, ExitStatus::code(0));
    assert!(h.d.task(&id(1)).is_none());
    let (r, a) = h.accept(with_id("m1", msg(12, "a")));
    assert_eq!(r, Ok(Accepted::Duplicate { task_id: id(1) }));
    assert_eq!(a, vec![]);
    // Messages without an id are never duplicates.
    assert_eq!(h.accept(msg(13, "a")).0, Ok(plain(13)));
    assert_eq!(h.accept(msg(14, "a")).0, Ok(plain(14)));
}

#[test]
fn a_steered_message_is_remembered_too() {
    let mut h = H::with(config_with(
        1,
        settings(Mode::Steer, 0, 20, DropPolicy::Old),
    ));
    let _ = h.accept(msg(1, "a"));
    let _ = h.spawned(1);
    let _ = h.ev(Event::AgentReady {
        task_id: id(1),
        steer: true,
    });
    let (r, _) = h.accept(with_id("s", msg(2, "a")));
    assert!(matches!(
        r,
        Ok(Accepted::Task {
            steered_into: Some(_),
            ..
        })
    ));
    let (r, a) = h.accept(with_id("s", msg(3, "a")));
    assert_eq!(r, Ok(Accepted::Duplicate { task_id: id(2) }));
    assert_eq!(a, vec![], "not steered twice");
}

#[test]
fn the_window_tells_which_message_ids_may_have_left_it() {
    let mut h = H::with(Config {
        dedup_window: 2,
        ..config(1)
    });
    let _ = h.accept(with_id("m1", msg(1, "a")));
    let _ = h.accept(with_id("m2", msg(2, "a")));
    // Full, but nothing has left it: a pair it does not hold was never accepted.
    assert!(h.d.dedup_window_full());
    assert!(!h.d.may_have_left_window("a", "m3"));
    assert!(!h.d.may_have_left_window("a", "m1"));
    // m3 pushes m1 out.
    let _ = h.accept(with_id("m3", msg(3, "a")));
    assert!(h.d.may_have_left_window("a", "m1"));
    assert!(!h.d.may_have_left_window("a", "m4"));
    assert!(!h.d.may_have_left_window("b", "m1"), "another session's m1");
    // An id forgotten (its acceptance undone: never stored) has not left it.
    h.d.forget_message("a", "m3", id(3));
    let _ = h.accept(with_id("m5", msg(5, "a")));
    assert!(!h.d.may_have_left_window("a", "m3"));
    // Ten windows' worth of departures, and it no longer tells: any may have left.
    for n in 10..40 {
        let _ = h.accept(with_id(&format!("x{n}"), msg(n, "a")));
    }
    h.check();
    assert!(h.d.may_have_left_window("a", "m4"));
}

#[test]
fn the_de_duplication_window_is_bounded() {
    let mut h = H::with(Config {
        dedup_window: 2,
        ..config(1)
    });
    for n in 1..=3 {
        let _ = h.accept(with_id(&format!("m{n}"), msg(n, "a")));
    }
    assert_eq!(
        h.accept(with_id("m3", msg(10, "a"))).0,
        Ok(Accepted::Duplicate { task_id: id(3) })
    );
    assert_eq!(
        h.accept(with_id("m2", msg(11, "a"))).0,
        Ok(Accepted::Duplicate { task_id: id(2) })
    );
    // m1 fell out of the window: it is new work now (and pushes m2 out).
    assert_eq!(h.accept(with_id("m1", msg(4, "a"))).0, Ok(plain(4)));
    assert_eq!(h.accept(with_id("m2", msg(5, "a"))).0, Ok(plain(5)));
    assert_eq!(
        h.accept(with_id("m1", msg(12, "a"))).0,
        Ok(Accepted::Duplicate { task_id: id(4) })
    );
}

// ----- /queue settings -----

#[test]
fn queue_settings_are_per_session_and_reset_to_the_defaults() {
    let mut h = H::with(Config::default());
    let defaults = QueueSettings::default();
    assert_eq!(
        defaults,
        settings(Mode::Collect, 1_000, 20, DropPolicy::Summarize)
    );
    assert_eq!(h.d.settings("a"), defaults);
    assert!(!h.d.has_own_settings("a"));
    let Some(ChatCommand::Queue(QueueCommand::Set(change))) =
        parse_chat_command("/queue followup debounce:0 cap:2 drop:new")
    else {
        panic!("not a /queue command")
    };
    let own = change.apply(h.d.settings("a"));
    h.d.set_settings("a", own);
    h.check();
    assert_eq!(
        h.d.settings("a"),
        settings(Mode::Followup, 0, 2, DropPolicy::New)
    );
    assert!(h.d.has_own_settings("a"));
    assert_eq!(h.d.settings("b"), defaults);
    assert!(!h.d.has_own_settings("b"));
    // In force: a's held messages are follow-ups, without quiet time, two at most.
    let _ = h.accept(msg(1, "a"));
    let _ = h.accept(msg(2, "a"));
    let _ = h.accept(msg(3, "a"));
    assert_eq!(
        h.accept(msg(4, "a")).0,
        Err(Refused::SessionFull { cap: 2 })
    );
    let a = h.reap(1, ExitStatus::code(0));
    assert_eq!(spawn_text(&a, 2), "text 2");
    let a = h.reap(2, ExitStatus::code(0));
    assert_eq!(spawns(&a), vec![id(3)]);
    let _ = h.reap(3, ExitStatus::code(0));
    h.assert_empty();
    // Settings are kept when the session's work is gone, until reset.
    assert!(h.d.has_own_settings("a"));
    h.d.reset_settings("a");
    h.check();
    assert_eq!(h.d.settings("a"), defaults);
    assert!(!h.d.has_own_settings("a"));
    // Back on the defaults: collected, after the quiet time.
    let _ = h.accept(msg(5, "a"));
    let _ = h.accept(msg(6, "a"));
    let _ = h.accept(msg(7, "a"));
    let a = h.reap(5, ExitStatus::code(0));
    assert_eq!(spawns(&a), no_ids());
    let (_, after, g) = debounces(&a)[0].clone();
    assert_eq!(after, Duration::from_secs(1));
    let a = h.ev(Event::Debounce {
        session: "a".into(),
        generation: g,
    });
    assert_eq!(spawn_text(&a, 6), collected_text(&texts(&[6, 7])));
}

// ----- fairness acceptance (invariant 4) -----

#[test]
fn a_quiet_chat_is_not_starved_by_a_busy_chat_with_thirty_held_follow_ups() {
    for debounce in [0, 1_000] {
        let mut h = H::with(config_with(
            1,
            settings(Mode::Followup, debounce, 50, DropPolicy::Old),
        ));
        let _ = h.accept(msg(1, "busy"));
        h.run(1);
        for n in 2..=31 {
            assert_eq!(h.accept(msg(n, "busy")).0, Ok(plain(n)));
        }
        let (r, a) = h.accept(msg(100, "quiet"));
        assert_eq!((r, a), (Ok(plain(100)), vec![]));
        let p = h.d.position(&id(100)).unwrap();
        assert!(p <= 2, "debounce {debounce}: position {p}");
        assert_eq!(h.d.position(&id(2)), Some(p % 2 + 1));
        // Admission order as the runs end (firing quiet-time timers as they come).
        let mut order = Vec::new();
        let mut running = id(1);
        let mut timer = None;
        while order.len() < 3 {
            let mut a = h.ev(Event::Reaped {
                task_id: running,
                status: ExitStatus::code(0),
            });
            if let Some((session, _, generation)) = debounces(&a).pop() {
                timer = Some((session, generation));
            }
            if spawns(&a).is_empty() {
                let (session, generation) = timer.take().expect("a quiet-time timer");
                a = h.ev(Event::Debounce {
                    session,
                    generation,
                });
            }
            running = spawns(&a)[0];
            order.push(running);
        }
        assert_eq!(order, vec![id(100), id(2), id(3)], "debounce {debounce}");
    }
}

// ----- liveness: hung and timed-out agents -----

/// A hung agent goes through the whole stop sequence and fails as `hung`; its slot
/// is held until the reap.
#[test]
fn a_hung_agent_is_stopped_through_the_sequence_and_fails_as_hung() {
    let mut h = H::new(1);
    h.submit(1, "a");
    h.run(1);
    let actions = h.ev(Event::Hung { task_id: id(1) });
    assert_eq!(
        actions,
        vec![
            Action::SendCancel { task_id: id(1) },
            Action::SetTimer {
                task_id: id(1),
                after: CANCEL_GRACE,
                step: StopStep::Sigterm
            }
        ]
    );
    assert!(matches!(
        h.state(1),
        TaskState::Stopping {
            cause: StopCause::Hung,
            ..
        }
    ));
    assert!(h.timer(1, StopStep::Sigterm).contains(&Action::Signal {
        task_id: id(1),
        step: StopStep::Sigterm
    }));
    assert_eq!(h.busy(), 1);
    let done = h.reap(1, ExitStatus::signal(15));
    assert_eq!(failed_reason(&only_finished(&done, 1)), HUNG);
    h.assert_empty();
}

#[test]
fn a_timed_out_task_fails_as_timed_out_even_while_starting() {
    let mut h = H::new(1);
    h.submit(1, "a");
    h.spawned(1);
    let actions = h.ev(Event::TimedOut { task_id: id(1) });
    assert!(actions.contains(&Action::SendCancel { task_id: id(1) }));
    let done = h.reap(1, ExitStatus::signal(9));
    assert_eq!(failed_reason(&only_finished(&done, 1)), TIMED_OUT);
}

/// A user stop under way keeps its sequence (no second cancel, no new timer) and its
/// outcome: the user gets the `cancelled` they asked for.
#[test]
fn a_stop_in_progress_owns_the_outcome_over_the_watchdog() {
    let mut h = H::new(1);
    h.submit(1, "a");
    h.run(1);
    h.stop(StopTarget::Task(id(1)), Scope::Owner).unwrap();
    assert_eq!(h.ev(Event::Hung { task_id: id(1) }), vec![]);
    assert_eq!(h.ev(Event::TimedOut { task_id: id(1) }), vec![]);
    assert_eq!(h.ev(Event::Hung { task_id: id(1) }), vec![]);
    assert!(matches!(
        h.state(1),
        TaskState::Stopping {
            cause: StopCause::User,
            step: StopStep::CooperativeCancel,
            ..
        }
    ));
    let done = h.reap(1, ExitStatus::code(0));
    assert!(matches!(
        ending(&only_finished(&done, 1)),
        Ending::Cancelled { .. }
    ));
}

/// An agent that reported its result stops heartbeating by design: silence then is
/// not a hang (the linger timer ends it, keeping what it reported).
#[test]
fn silence_after_the_report_is_not_a_hang() {
    let mut h = H::new(1);
    h.submit(1, "a");
    h.run(1);
    h.report(1, ReportOutcome::Succeeded);
    assert_eq!(h.ev(Event::Hung { task_id: id(1) }), vec![]);
    assert!(matches!(h.state(1), TaskState::Running { .. }));
    let done = h.reap(1, ExitStatus::code(0));
    assert_eq!(ending(&only_finished(&done, 1)), &Ending::Succeeded);
}

/// A protocol error outranks a hang: the ending names the protocol error.
#[test]
fn a_protocol_error_during_a_hung_stop_decides_the_ending() {
    let mut h = H::new(1);
    h.submit(1, "a");
    h.run(1);
    h.ev(Event::Hung { task_id: id(1) });
    h.ev(Event::ProtocolError {
        task_id: id(1),
        error: "garbage".into(),
    });
    let done = h.reap(1, ExitStatus::signal(9));
    assert!(failed_reason(&only_finished(&done, 1)).contains("garbage"));
}

#[test]
fn a_message_that_comes_back_is_queued_past_the_cap_and_the_global_limit() {
    let base = config(1);
    let mut h = H::with(Config {
        max_queued: 1,
        queue: QueueSettings {
            cap: 1,
            drop: DropPolicy::New,
            ..base.queue
        },
        ..base
    });
    let _ = h.submit(1, "a");
    h.run(1);
    assert!(h.accept(msg(2, "a")).0.is_ok());
    assert!(
        h.accept(msg(3, "a")).0.is_err(),
        "the session and the queue are full"
    );
    // A steer the agent refused was accepted already: it must not be lost.
    let a = h.d.requeue(msg(4, "a"), Millis(h.now)).into_vec();
    h.check();
    assert_eq!(a, vec![]);
    assert_eq!(h.state(4), TaskState::Queued);
    assert_eq!(h.d.task(&id(4)).unwrap().mode, Mode::Followup);
    assert_eq!(h.d.n_queued(), 2);
    // It runs in its turn, after the message held before it.
    let _ = h.report(1, ReportOutcome::Succeeded);
    assert_eq!(spawns(&h.reap(1, ExitStatus::code(0))), vec![id(2)]);
}

#[test]
fn a_channel_that_breaks_while_the_task_is_stopped_leaves_the_outcome_to_the_stop() {
    let mut h = H::new(1);
    let _ = h.submit(1, "a");
    h.run(1);
    let _ = h.stop(StopTarget::Task(id(1)), Scope::Owner).unwrap();
    let _ = h.at(6_000).timer(1, StopStep::Sigterm);
    // SIGTERM killed it with the Cancel unread: its channel reports a reset.
    let reset = Event::ProtocolError {
        task_id: id(1),
        error: "Connection reset by peer (os error 104)".into(),
    };
    assert_eq!(h.ev(reset.clone()), vec![]);
    let done = only_finished(&h.at(6_010).reap(1, ExitStatus::signal(15)), 1);
    assert_eq!(
        ending(&done),
        &Ending::Cancelled {
            by: Some(StopStep::Sigterm),
            after: Duration::from_millis(5_010)
        }
    );

    // Before any signal, garbage on the channel is the agent's own doing: a protocol
    // error, stronger than the user's stop (protocol_error_during_a_stop_…).
    let _ = h.submit(2, "a");
    h.run(2);
    let _ = h.stop(StopTarget::Task(id(2)), Scope::Owner).unwrap();
    assert_eq!(
        h.ev(Event::ProtocolError {
            task_id: id(2),
            error: "garbage".into()
        }),
        vec![Action::Signal {
            task_id: id(2),
            step: StopStep::Sigkill
        }]
    );
    let done = only_finished(&h.reap(2, ExitStatus::signal(9)), 2);
    assert!(failed_reason(&done).contains("garbage"));
}

/// Work an earlier agentd acknowledged comes back past today's limits, in order, and
/// its message id is remembered; a refused acceptance can be forgotten.
#[test]
fn restored_work_is_queued_past_the_limits_and_remembers_its_message_id() {
    let mut h = H::with(Config {
        max_queued: 1,
        ..config_with(1, settings(Mode::Followup, 0, 1, DropPolicy::New))
    });
    h.submit(1, "busy");
    h.run(1);
    let (r, _) = h.accept(msg(2, "s"));
    assert_eq!(r, Ok(plain(2)));
    assert_eq!(
        h.accept(msg(3, "s")).0,
        Err(Refused::QueueFull { limit: 1 })
    );
    let actions = h.d.restore(with_id("evt-3", msg(3, "s")), Millis(h.now));
    h.check();
    assert!(actions.into_vec().is_empty(), "no slot is free");
    let actions = h.d.restore(with_id("evt-4", msg(4, "t")), Millis(h.now));
    h.check();
    assert!(actions.into_vec().is_empty());
    assert_eq!(h.d.n_queued(), 3);
    assert!(h.d.position(&id(3)).is_some() && h.d.position(&id(4)).is_some());
    // Restored twice (a duplicate in the store's answer) changes nothing.
    let actions = h.d.restore(with_id("evt-3", msg(9, "s")), Millis(h.now));
    assert!(actions.into_vec().is_empty());
    assert!(h.d.task(&id(9)).is_none());
    // A re-delivery is answered with the restored task.
    let (r, _) = h.accept(with_id("evt-3", msg(5, "s")));
    assert_eq!(r, Ok(Accepted::Duplicate { task_id: id(3) }));
    // An id remembered from the store, then one forgotten again.
    h.d.remember_message("u", "evt-old", id(42));
    let (r, _) = h.accept(with_id("evt-old", msg(6, "u")));
    assert_eq!(r, Ok(Accepted::Duplicate { task_id: id(42) }));
    h.d.forget_message("u", "evt-old", id(41));
    assert_eq!(
        h.accept(with_id("evt-old", msg(6, "u"))).0,
        Ok(Accepted::Duplicate { task_id: id(42) }),
        "only the task it names forgets it"
    );
    h.d.forget_message("u", "evt-old", id(42));
    h.check();
    assert!(!h.d.dedup_window_full());
    assert_eq!(
        h.accept(with_id("evt-old", msg(7, "u"))).0,
        Err(Refused::QueueFull { limit: 1 }),
        "new work again (and refused by the limit, like any)"
    );
}
