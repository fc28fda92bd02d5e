//! What the store keeps, in plain types: the daemon maps its own task and settings
//! types onto these, so the store does not change when the dispatcher does.

use uuid::Uuid;

use crate::pid::ProcessIdentity;

/// A task's state as stored. The names are the ones users see (DESIGN.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Queued,
    Starting,
    Running,
    Stopping,
    Succeeded,
    Failed,
    Cancelled,
    Interrupted,
    Expired,
    Dropped,
    Merged,
}

impl State {
    pub const ALL: [State; 11] = [
        State::Queued,
        State::Starting,
        State::Running,
        State::Stopping,
        State::Succeeded,
        State::Failed,
        State::Cancelled,
        State::Interrupted,
        State::Expired,
        State::Dropped,
        State::Merged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Starting => "starting",
            State::Running => "running",
            State::Stopping => "stopping",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
            State::Interrupted => "interrupted",
            State::Expired => "expired",
            State::Dropped => "dropped",
            State::Merged => "merged",
        }
    }

    pub fn parse(name: &str) -> Option<State> {
        State::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Starting, running or stopping: the task held its session's lane.
    pub fn is_active(self) -> bool {
        matches!(self, State::Starting | State::Running | State::Stopping)
    }

    /// A state a task never leaves.
    pub fn is_terminal(self) -> bool {
        !matches!(self, State::Queued) && !self.is_active()
    }
}

/// How an agent process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// One task as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord {
    pub id: Uuid,
    pub session: String,
    pub text: String,
    pub state: State,
    /// Queue mode the message arrived with (the daemon's name for it).
    pub mode: String,
    /// Admission class (the daemon's name for it).
    pub priority: String,
    /// Further per-message options, opaque to the store (e.g. JSON).
    pub options: Option<String>,
    /// The bridge's id of the message; (session, message_id) is unique.
    pub message_id: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// Latest progress line.
    pub progress: Option<String>,
    pub result: Option<String>,
    /// How the task ended, opaque to the store (the daemon's encoding).
    pub ending: Option<String>,
    /// Why it ended, in words (e.g. "daemon crashed").
    pub reason: Option<String>,
    pub exit: Option<Exit>,
    /// The agent process, recorded with its start time and boot id.
    pub process: Option<ProcessIdentity>,
    /// The task this one is a new attempt of (`/resume`).
    pub attempt_of: Option<Uuid>,
    /// The agent's latest checkpoint.
    pub checkpoint: Option<String>,
    /// The message's own run-time limit in milliseconds (`send.timeout_ms`).
    pub timeout_ms: Option<u64>,
}

impl TaskRecord {
    /// Nothing is recorded of a run: no start, end, progress, result, exit or
    /// process (a new message, or a new attempt with the checkpoint it inherits).
    pub(crate) fn is_new(&self) -> bool {
        self.started_at.is_none()
            && self.finished_at.is_none()
            && self.progress.is_none()
            && self.result.is_none()
            && self.ending.is_none()
            && self.reason.is_none()
            && self.exit.is_none()
            && self.process.is_none()
    }

    /// A new queued task with nothing but its message.
    pub fn queued(id: Uuid, session: &str, text: &str, created_at: i64) -> TaskRecord {
        TaskRecord {
            id,
            session: session.to_string(),
            text: text.to_string(),
            state: State::Queued,
            mode: "collect".to_string(),
            priority: "interactive".to_string(),
            options: None,
            message_id: None,
            created_at,
            started_at: None,
            finished_at: None,
            progress: None,
            result: None,
            ending: None,
            reason: None,
            exit: None,
            process: None,
            attempt_of: None,
            checkpoint: None,
            timeout_ms: None,
        }
    }
}

/// A session's queue settings as set with `/queue` (names are the daemon's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSettings {
    pub session: String,
    pub mode: String,
    pub debounce_ms: u64,
    pub cap: u32,
    pub drop_policy: String,
}

/// How the previous agentd on this store ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreviousRun {
    /// The store was just created.
    None,
    /// It closed the store.
    Clean,
    /// It died without closing the store (crash, kill -9, power loss).
    Crashed,
}

/// What was read back when the store was opened.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// Queued tasks, each session's in its queue order; sessions interleave in the
    /// order their messages arrived.
    pub queued: Vec<TaskRecord>,
    /// Tasks that were starting, running or stopping: now `interrupted` with the
    /// reason given to [`crate::Store::open`]. Their `process` is what the previous
    /// agentd recorded, to find and end leftover agents (check it first).
    pub interrupted: Vec<TaskRecord>,
    /// Queue settings that sessions set.
    pub settings: Vec<SessionSettings>,
    /// The newest (session, message_id, task id) triples, oldest first, to seed an
    /// in-memory de-duplication window.
    pub recent_messages: Vec<(String, String, Uuid)>,
    pub previous_run: PreviousRun,
    /// Finished tasks kept as history.
    pub finished: u64,
}
