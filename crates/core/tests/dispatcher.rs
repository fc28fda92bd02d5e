//! Scenario tests for [`agentd_core::Dispatcher`]: one behaviour per test, driven
//! through the public API the daemon uses (`submit`, `handle`, `stop`, queries).
//!
//! Every call goes through [`H`], which checks `check_invariants()` after it, so
//! each scenario also checks the structural invariants at every step.

use std::time::Duration;

use agentd_core::{
    Action, AgentReport, Capacity, Config, Dispatcher, Ending, Event, ExitStatus, Millis,
    ReportOutcome, Scope, StopError, StopStep, StopTarget, Task, TaskId, TaskState,
};

const CANCEL_GRACE: Duration = Duration::from_secs(5);
const TERM_GRACE: Duration = Duration::from_secs(7);

fn id(n: u128) -> TaskId {
    TaskId::from_u128(n)
}

/// Test harness: a dispatcher, a clock, and invariant checks after every call.
struct H {
    d: Dispatcher,
    now: u64,
}

impl H {
    fn new(max_concurrent: u32) -> H {
        H {
            d: Dispatcher::new(Config {
                max_concurrent,
                cancel_grace: CANCEL_GRACE,
                term_grace: TERM_GRACE,
            }),
            now: 1_000,
        }
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
    assert_eq!(h.report(1, ReportOutcome::Succeeded), vec![]);
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
            vec![]
        );
    }
    let a = h.reap(1, status);
    h.assert_empty();
    only_finished(&a, 1)
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
    assert_eq!(t.report, report(ReportOutcome::Succeeded, None));
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
    assert!(failed_reason(&t).contains("without reporting"));
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
            ..
        }
    ));
    assert_eq!(h.busy(), 1, "the slot is held until the reap");
    let a = h.reap(1, ExitStatus::signal(9));
    let t = only_finished(&a, 1);
    let reason = failed_reason(&t);
    assert!(reason.contains("garbage frame"), "{reason}");
    assert_eq!(t.protocol_error.as_deref(), Some("garbage frame"));
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
            requested_at: Millis(2_000)
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
    assert_eq!(
        h.timer(1, StopStep::Sigkill),
        vec![Action::Signal {
            task_id: id(1),
            step: StopStep::Sigkill
        }]
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
