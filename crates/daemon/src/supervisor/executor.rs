//! Executing the dispatcher's decisions, and the timers that drive stops, debounces,
//! handshakes and drains.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use agentd_core::{Action, Event, StopStep, TaskId};
use agentd_proto::control::EventKind;
use agentd_proto::ipc::SupervisorMsg;

use crate::supervisor::agents::{Agent, Steered};
use crate::supervisor::Supervisor;
use crate::views::now_millis;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Timer {
    Stop {
        task_id: TaskId,
        step: StopStep,
    },
    /// The exit grace of an agent that reported its result.
    ExitGrace {
        task_id: TaskId,
    },
    Debounce {
        session: String,
        generation: u64,
    },
    Handshake {
        task_id: TaskId,
    },
    /// A reaped agent's channel did not reach EOF in time: finish the task anyway.
    Drain {
        task_id: TaskId,
    },
    /// Time to look at an agent's silence and run time again.
    Liveness {
        task_id: TaskId,
    },
}

/// How long a reaped agent's channel may take to deliver its last frames.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

impl Supervisor {
    /// Executes actions, feeding the events they cause (spawned, spawn failed) back into
    /// the dispatcher until nothing is left to do.
    pub(crate) fn execute(&mut self, actions: agentd_core::Actions) {
        let mut work: VecDeque<Action> = actions.into_vec().into();
        while let Some(action) = work.pop_front() {
            let follow_up = match action {
                Action::Spawn { task_id, .. } if self.shutting_down.is_some() => {
                    // Shutting down: nothing new starts. The store still holds the
                    // task as queued, so it runs after the next start.
                    tracing::debug!(%task_id, "not started: shutting down");
                    None
                }
                Action::Spawn {
                    task_id,
                    session,
                    text,
                } => self.spawn(task_id, session, text),
                Action::SendCancel { task_id } => {
                    self.send_to_agent(task_id, SupervisorMsg::Cancel);
                    None
                }
                Action::Signal { task_id, step } => {
                    self.signal_tree(task_id, step);
                    None
                }
                Action::SetTimer {
                    task_id,
                    after,
                    step,
                } => {
                    self.arm(after, Timer::Stop { task_id, step });
                    None
                }
                Action::SetExitGrace { task_id, after } => {
                    self.arm(after, Timer::ExitGrace { task_id });
                    None
                }
                Action::Steer { task_id, text } => {
                    if let Some(agent) = self.agents.get_mut(&task_id) {
                        agent.steers.push_back(Steered {
                            text: text.clone(),
                            kept: false,
                        });
                        if agent.steer_backlog_full() {
                            self.dispatcher.set_steer_backlog_full(task_id, true);
                        }
                    }
                    self.send_to_agent(task_id, SupervisorMsg::Steer { text: text.clone() });
                    self.publish_task(EventKind::Steered, &task_id, Some(text), None);
                    None
                }
                Action::SetDebounce {
                    session,
                    after,
                    generation,
                } => {
                    self.arm(
                        after,
                        Timer::Debounce {
                            session,
                            generation,
                        },
                    );
                    None
                }
                Action::Finished(task) => {
                    self.publish_finished(&task);
                    self.record_finished(task);
                    None
                }
            };
            if let Some(event) = follow_up {
                let spawned = match &event {
                    Event::Spawned { task_id, .. } => Some(*task_id),
                    _ => None,
                };
                work.extend(self.dispatcher.handle(event, now_millis()).into_vec());
                // Published after the dispatcher took the pid, so the event's view
                // carries it, as the answers do.
                if let Some(task_id) = spawned {
                    self.publish_task(EventKind::Started, &task_id, None, None);
                }
            }
        }
        self.answer_waiters();
    }

    pub(crate) fn handle(&mut self, event: Event) {
        let actions = self.dispatcher.handle(event, now_millis());
        self.execute(actions);
    }

    pub(crate) fn arm(&mut self, after: Duration, timer: Timer) {
        self.timer_seq += 1;
        // A duration too large for the clock (a flag of a thousand years) is a timer
        // that never fires in practice, not a panic.
        let now = Instant::now();
        let at = now
            .checked_add(after)
            .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
            .unwrap_or(now);
        self.timers.insert((at, self.timer_seq), timer);
    }

    pub(crate) fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            match entry.remove() {
                Timer::Stop { task_id, step } => self.handle(Event::StopTimer { task_id, step }),
                Timer::ExitGrace { task_id } => self.handle(Event::ExitGraceOver { task_id }),
                Timer::Debounce {
                    session,
                    generation,
                } => self.handle(Event::Debounce {
                    session,
                    generation,
                }),
                Timer::Drain { task_id } => {
                    if self
                        .agents
                        .get(&task_id)
                        .and_then(Agent::exit_status)
                        .is_some()
                    {
                        tracing::warn!(%task_id, "the agent's channel stayed open after it exited");
                        self.channel_drained(task_id);
                    }
                }
                Timer::Liveness { task_id } => self.check_liveness(task_id),
                Timer::Handshake { task_id } => {
                    if self.agents.get(&task_id).is_some_and(Agent::is_handshaking) {
                        let error =
                            agentd_proto::text::no_handshake_within(self.config.handshake_timeout);
                        self.handle(Event::ProtocolError { task_id, error });
                    }
                }
            }
        }
    }
}
