//! The store at start (recovered work back into the dispatcher, leftover agents of
//! the previous agentd ended, history reloaded) and write failures that the loop must
//! act on.

use agentd_core::{Accepted, Refused, Scope, StopTarget, TaskId};
use agentd_proto::control::RecoveryView;
use agentd_store::{Liveness, PreviousRun, Recovery, TaskRecord};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::durable;
use crate::supervisor::Supervisor;
use crate::views::now_millis;

/// Queued tasks read from the store at a time at start.
const RESTORE_PAGE: usize = 1024;

/// A write completion that needs the loop.
#[derive(Debug)]
pub(crate) enum StoreEvent {
    /// A new task's record was not committed (disk trouble, or the store already
    /// held its message): the message was refused, so the task must not run.
    /// `message`: its (session, message_id), if it had one; `original`: the task
    /// the store held for that message (else the record could not be written).
    InsertFailed {
        task_id: TaskId,
        message: Option<(String, String)>,
        original: Option<TaskId>,
    },
    /// A task's checkpoint (write number `seq`) is committed.
    CheckpointWritten { task_id: TaskId, seq: u64 },
}

impl Supervisor {
    pub(crate) fn on_store_event(&mut self, event: StoreEvent) {
        match event {
            StoreEvent::InsertFailed {
                task_id,
                message,
                original,
            } => {
                tracing::warn!(%task_id, "the task's record was not written: stopping it");
                // Its duplicates from here on are new work, or the stored task's.
                self.inserts_pending.retain(|(id, _)| *id != task_id);
                if let Some((session, message_id)) = message {
                    match original {
                        // A re-delivery is the stored task's.
                        Some(original) => {
                            self.dispatcher
                                .remember_message(&session, &message_id, original)
                        }
                        // Refused: a re-delivery is new work.
                        None => self
                            .dispatcher
                            .forget_message(&session, &message_id, task_id),
                    }
                }
                if let Ok((_, actions)) =
                    self.dispatcher
                        .stop(StopTarget::Task(task_id), &Scope::Owner, now_millis())
                {
                    self.execute(actions);
                }
            }
            StoreEvent::CheckpointWritten { task_id, seq } => {
                if self
                    .checkpoints_in_flight
                    .get(&task_id)
                    .is_some_and(|(latest, _)| *latest == seq)
                {
                    self.checkpoints_in_flight.remove(&task_id);
                }
            }
        }
    }

    /// Finished tasks read from the store (newest first) into the in-memory history.
    pub(crate) fn load_history(&mut self, finished: Vec<TaskRecord>) {
        for record in finished.iter().rev() {
            if let Some(task) = durable::finished_task(record) {
                self.history.record(task);
            }
        }
    }

    /// Kills what a previous agentd on this socket left in its task cgroups (what
    /// escaped its guardian, or descendants of the agents ended by identity above)
    /// and removes those cgroups. Our guardian runs already (see `containment`), so
    /// an agentd killed meanwhile leaves nothing either. Blocking and bounded; runs
    /// before any recovered work starts.
    fn recover_cgroups(&mut self) {
        for left in self.procs.recover() {
            tracing::warn!(
                cgroup = %left.cgroup.display(),
                pids = ?left.pids,
                removed = left.removed,
                "killed what a previous agentd left running"
            );
        }
    }

    /// Puts recovered work back: settings, then queued tasks with their ids in their
    /// per-session order. Tasks that were running are interrupted (the store marked
    /// them) and are not run again; an agent of theirs still alive is ended, but only
    /// if its pid still names the same process (start time and boot id); then
    /// leftover task cgroups are emptied.
    pub(crate) fn recover(&mut self, recovery: Recovery) {
        for s in &recovery.settings {
            match durable::settings(s) {
                Some(settings) => self.dispatcher.set_settings(&s.session, settings),
                None => {
                    tracing::warn!(session = %s.session, "ignoring unknown stored queue settings")
                }
            }
        }
        let mut killed = 0;
        for record in &recovery.interrupted {
            if let Some(process) = &record.process {
                if process.check() == Liveness::Same {
                    // The agent leads its own process group.
                    match killpg(Pid::from_raw(process.pid as i32), Signal::SIGKILL) {
                        Ok(()) => {
                            killed += 1;
                            tracing::warn!(task_id = %record.id, pid = process.pid, "ended a leftover agent of the previous agentd");
                        }
                        Err(e) => {
                            tracing::warn!(task_id = %record.id, pid = process.pid, "cannot end a leftover agent: {e}")
                        }
                    }
                }
            }
            // The store recorded it interrupted (with the reason) already.
            if let Some(task) = durable::finished_task(record) {
                self.history.record(task);
            }
        }
        self.recover_cgroups();
        let mut restored = 0u32;
        let mut over_limits = 0u32;
        for record in &recovery.queued {
            let (back, over) = self.restore_queued(record);
            restored += u32::from(back);
            over_limits += u32::from(over);
        }
        let (back, over) = self.restore_queued_from_store();
        restored += back;
        over_limits += over;
        self.seed_dedup(&recovery.recent_messages);
        if recovery.previous_run != PreviousRun::None {
            tracing::info!(
                "recovered {restored} queued ({over_limits} over the limits) and {} interrupted tasks (previous agentd {})",
                recovery.interrupted.len(),
                if recovery.previous_run == PreviousRun::Crashed {
                    "crashed"
                } else {
                    "shut down"
                }
            );
            self.recovery = Some(RecoveryView {
                queued: restored,
                over_limits,
                interrupted: recovery.interrupted.len() as u32,
                killed,
                crashed: recovery.previous_run == PreviousRun::Crashed,
            });
        }
    }

    /// What a recovered queued task brings besides its message: its own run-time
    /// limit, and for a resumed attempt that had not started, what its agent is told
    /// (with the checkpoint it inherited).
    fn restored(&mut self, record: &TaskRecord) {
        if let Some(ms) = record.timeout_ms {
            self.task_timeouts
                .insert(record.id, std::time::Duration::from_millis(ms));
        }
        if let Some(previous) = record.attempt_of {
            self.resumes.insert(
                record.id,
                crate::supervisor::requests::resume::Resumed {
                    previous,
                    checkpoint: record.checkpoint.clone(),
                },
            );
        }
    }

    /// A recovered queued task that the current limits refuse (a smaller
    /// `--max-queued` or session cap than the agentd that accepted it) is queued
    /// anyway: it was acknowledged, so refusing it now would lose it. `status` counts
    /// it in its recovery line.
    fn restore_over_limits(&mut self, record: &TaskRecord, refused: Refused) {
        tracing::warn!(
            task_id = %record.id,
            session = %record.session,
            ?refused,
            "a recovered task is over the current limits: queued anyway, it was accepted before"
        );
        self.restored(record);
        let actions = self
            .dispatcher
            .restore(durable::recovered_message(record), now_millis());
        self.execute(actions);
    }

    /// Seeds the de-duplication window with the newest message ids the store holds
    /// (after the queued tasks are back, which the dispatcher remembered itself), so
    /// a re-delivered message is answered with its original task after a restart
    /// too. If the store held fewer than the window, the window knows them all.
    fn seed_dedup(&mut self, recent: &[(String, String, TaskId)]) {
        for (session, message_id, task_id) in recent {
            self.dispatcher
                .remember_message(session, message_id, *task_id);
        }
        self.dedup_complete = recent.len() < self.dispatcher.config().dedup_window;
    }

    /// The queued tasks in the store, in queue order, back into the dispatcher a page
    /// at a time, so that a long queue is never held twice (as records and as tasks).
    /// Returns how many came back and how many of them are over today's limits.
    fn restore_queued_from_store(&mut self) -> (u32, u32) {
        let (mut restored, mut over_limits, mut after) = (0u32, 0u32, None);
        loop {
            let Some(reader) = &self.store_reader else {
                tracing::error!(
                    "cannot read the queued tasks from the store: they stay queued there"
                );
                break;
            };
            match reader.queued_page(after, RESTORE_PAGE) {
                Ok((page, last)) => {
                    for record in &page {
                        let (back, over) = self.restore_queued(record);
                        restored += u32::from(back);
                        over_limits += u32::from(over);
                    }
                    let last_page = page.len() < RESTORE_PAGE;
                    drop(page);
                    crate::release_free_memory();
                    if last_page {
                        break;
                    }
                    after = last;
                }
                Err(e) => {
                    tracing::error!("cannot read the queued tasks from the store: {e}");
                    break;
                }
            }
        }
        (restored, over_limits)
    }

    /// One recovered queued task back in its queue with its id: (whether it came
    /// back, whether it is over today's limits and was queued anyway).
    fn restore_queued(&mut self, record: &TaskRecord) -> (bool, bool) {
        let message = durable::recovered_message(record);
        let (outcome, actions) = self.dispatcher.accept(message, now_millis());
        let result = match outcome {
            Ok(Accepted::Task { .. }) => {
                self.restored(record);
                (true, false)
            }
            Ok(Accepted::Duplicate { task_id }) => {
                tracing::warn!(%task_id, "a recovered task was a duplicate");
                (false, false)
            }
            Err(refused) => {
                self.restore_over_limits(record, refused);
                (true, true)
            }
        };
        self.execute(actions);
        result
    }
}
