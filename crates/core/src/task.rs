//! Tasks and their lifecycle states. A state carries its own data, so an illegal
//! combination (a queued task with a pid, a finished task without an ending) cannot be
//! written down.

use std::time::Duration;

/// Task id: a UUID (the daemon makes time-ordered v7 ids; tests use small numbers).
pub type TaskId = uuid::Uuid;

/// Wall-clock milliseconds since the Unix epoch, as supplied by the daemon with each
/// event. The core only subtracts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Millis(pub u64);

impl Millis {
    pub fn since(self, earlier: Millis) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

/// The steps of the stop sequence, in escalation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StopStep {
    CooperativeCancel,
    Sigterm,
    Sigkill,
}

/// Why a task is being stopped. Causes are ordered by strength, weakest first: a
/// stronger cause replaces a weaker one, never the reverse, and an equal one does
/// not replace either (the first protocol error stands). The cause decides the
/// ending (see [`StopCause::rank`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCause {
    /// A `stop` request: agentctl, or a chat's `/stop`.
    User,
    /// A newer message of the session asked for it (interrupt mode).
    Interrupt,
    /// The agent reported its result but did not exit within `cancel_grace`; what it
    /// reported stands.
    Linger,
    /// The agent stopped answering (the watchdog's cause).
    Hung,
    /// The task ran past its time limit.
    TimedOut,
    /// The agent broke the IPC protocol.
    ProtocolError(String),
    /// agentd is shutting down.
    Shutdown,
}

impl StopCause {
    /// The cause's strength: higher replaces lower.
    pub fn rank(&self) -> u8 {
        match self {
            StopCause::User => 0,
            StopCause::Interrupt => 1,
            StopCause::Linger => 2,
            StopCause::Hung => 3,
            StopCause::TimedOut => 4,
            StopCause::ProtocolError(_) => 5,
            StopCause::Shutdown => 6,
        }
    }

    /// Replaces this cause with `other` if `other` is stronger. Returns whether it did.
    pub fn escalate(&mut self, other: StopCause) -> bool {
        if other.rank() > self.rank() {
            *self = other;
            true
        } else {
            false
        }
    }
}

/// How the agent process ended, as the reaper saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitStatus {
    pub fn code(code: i32) -> ExitStatus {
        ExitStatus {
            code: Some(code),
            signal: None,
        }
    }
    pub fn signal(signal: i32) -> ExitStatus {
        ExitStatus {
            code: None,
            signal: Some(signal),
        }
    }
    pub fn success(self) -> bool {
        self.code == Some(0)
    }
    pub fn describe(self) -> String {
        match (self.code, self.signal) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(signal)) => format!("signal {signal}"),
            (None, None) => "unknown status".to_string(),
        }
    }
}

/// The outcome an agent reported for its task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportOutcome {
    Succeeded,
    Failed,
    Cancelled,
}

/// What the agent said at the end of its work (before it exited).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentReport {
    pub outcome: ReportOutcome,
    pub text: String,
    /// Exit status of the command the agent wrapped, if it wraps one.
    pub command_exit: Option<ExitStatus>,
}

/// Why a task ended `interrupted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interruption {
    /// Stopped for a newer message of its session (queue mode `interrupt`).
    NewerMessage,
    /// Stopped by agentd's shutdown (SIGTERM, SIGINT).
    Shutdown,
    /// It was live when agentd crashed: found so by the next start.
    Crash,
}

/// How a task ended. Every terminal task has exactly one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Succeeded,
    /// The agent failed, crashed, broke the protocol, or could not be spawned.
    Failed {
        reason: String,
    },
    /// Stopped. `by` is the step of the stop sequence that ended a started task; `None`
    /// when no step did: a queued task that left the queue, or an agent that reported
    /// a cancel nobody asked for.
    Cancelled {
        by: Option<StopStep>,
        after: Duration,
    },
    /// Stopped to make way for a newer message of its session (interrupt mode); `by`
    /// is the step that ended it.
    Interrupted {
        by: Option<StopStep>,
        after: Duration,
        why: Interruption,
    },
    /// Waited in the queue past its deadline.
    Expired,
    /// Dropped on overflow of its session's cap.
    Dropped,
    /// The message went into another task: collected into a follow-up, or steered
    /// into the running task.
    Merged {
        into: TaskId,
    },
}

/// Lifecycle of a task. Only `Queued`, `Starting`, `Running` and `Stopping` live in
/// the dispatcher's hot maps; `Done` is handed out in [`crate::Action::Finished`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskState {
    Queued,
    /// The spawn was ordered; `pid` is known once the daemon reports it.
    Starting {
        pid: Option<u32>,
    },
    /// The agent completed its handshake.
    Running {
        pid: u32,
        steer: bool,
    },
    /// A stop is in progress; `step` is the last step taken (at `step_at`), `cause`
    /// the strongest reason given so far.
    Stopping {
        pid: Option<u32>,
        step: StopStep,
        requested_at: Millis,
        cause: StopCause,
        step_at: Millis,
    },
    Done {
        ending: Ending,
        exit: Option<ExitStatus>,
    },
}

impl TaskState {
    /// True while the task holds its session's lane (starting, running or stopping).
    pub fn is_active(&self) -> bool {
        matches!(
            self,
            TaskState::Starting { .. } | TaskState::Running { .. } | TaskState::Stopping { .. }
        )
    }

    pub fn pid(&self) -> Option<u32> {
        match *self {
            TaskState::Starting { pid } | TaskState::Stopping { pid, .. } => pid,
            TaskState::Running { pid, .. } => Some(pid),
            TaskState::Queued | TaskState::Done { .. } => None,
        }
    }
}

/// One task: one agent run made from a work message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub id: TaskId,
    pub session: String,
    pub text: String,
    pub state: TaskState,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    /// Latest progress line.
    pub progress: Option<String>,
    /// What the agent reported, once it has.
    /// Boxed: most tasks in memory are queued and have none, and a smaller task
    /// fits a smaller allocation.
    pub report: Option<Box<AgentReport>>,
    pub priority: crate::queue::Priority,
    /// The queue mode the message arrived with (after fallbacks): decides how it is
    /// drained.
    pub mode: crate::queue::Mode,
    /// The bridge's id of the message, if it gave one.
    pub message_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<StopCause> {
        vec![
            StopCause::User,
            StopCause::Interrupt,
            StopCause::Linger,
            StopCause::Hung,
            StopCause::TimedOut,
            StopCause::ProtocolError("bad frame".into()),
            StopCause::Shutdown,
        ]
    }

    #[test]
    fn stop_causes_are_ordered_weakest_first() {
        let ranks: Vec<u8> = all().iter().map(StopCause::rank).collect();
        let mut sorted = ranks.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(ranks, sorted, "strictly increasing in declaration order");
    }

    #[test]
    fn a_stronger_cause_replaces_a_weaker_one_never_the_reverse() {
        for (i, weaker) in all().into_iter().enumerate() {
            for (j, other) in all().into_iter().enumerate() {
                let mut cause = weaker.clone();
                let replaced = cause.escalate(other.clone());
                assert_eq!(replaced, j > i, "{weaker:?} then {other:?}");
                assert_eq!(cause, if j > i { other } else { weaker.clone() });
            }
        }
    }

    #[test]
    fn the_first_protocol_error_stands() {
        let mut cause = StopCause::ProtocolError("first".into());
        assert!(!cause.escalate(StopCause::ProtocolError("second".into())));
        assert_eq!(cause, StopCause::ProtocolError("first".into()));
    }
}
