//! Control protocol: clients ↔ agentd over the control socket.
//!
//! Newline-delimited JSON. Each line from the client is one [`Request`]; each line
//! from agentd is one [`Response`] carrying the request's `id`. Responses to different
//! requests may come out of order (a `stop` answers when the task has ended, while a
//! `status` sent after it answers at once). A line longer than
//! [`MAX_REQUEST_BYTES`] is refused with `request_too_large` and the connection closes.
//!
//! A client may start with `hello` to check the protocol version; agentd answers
//! `unsupported_protocol` and closes if it cannot speak the client's version.

use serde::{Deserialize, Serialize};

/// Version of the control protocol.
pub const CONTROL_PROTOCOL_VERSION: u32 = 1;

/// Largest request line accepted, in bytes (newline excluded).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Most tasks in one answer to `tasks`.
pub const MAX_TASKS_PAGE: u32 = 500;

/// A page of `tasks` stops growing once its views exceed this many bytes (it always
/// holds at least one task).
pub const MAX_PAGE_BYTES: usize = 1024 * 1024;

/// One request line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the client; echoed in the response.
    pub id: u64,
    #[serde(flatten)]
    pub body: RequestBody,
}

impl Request {
    /// Parses one request line: exactly what `serde_json::from_slice::<Request>`
    /// gives, values and errors alike, but a `send` (every message's request) is
    /// read straight into its fields. The derived parser of a flattened, internally
    /// tagged enum first copies the whole line into an intermediate tree, twice: that
    /// was about 4,000 of the loop's instructions per message, the direct reading
    /// 2,650 (callgrind). Anything the direct reading does not take (another
    /// command, a bad field) is parsed again by the derived parser, which then
    /// decides, so no error changes.
    pub fn from_line(line: &[u8]) -> serde_json::Result<Request> {
        if let Ok(line) = serde_json::from_slice::<SendLine<'_>>(line) {
            if let (true, Some(session), Some(text)) = (line.cmd == "send", line.session, line.text)
            {
                return Ok(Request {
                    id: line.id,
                    body: RequestBody::Send {
                        session,
                        text,
                        message_id: line.message_id,
                        priority: line.priority,
                        mode: line.mode,
                        timeout_ms: line.timeout_ms,
                    },
                });
            }
        }
        serde_json::from_slice(line)
    }
}

/// The fields of a `send` line, for [`Request::from_line`] (other fields are ignored,
/// as the derived parser ignores them; `session` and `text` are optional here only
/// so that a line of another command is told apart cheaply).
#[derive(Deserialize)]
struct SendLine<'a> {
    id: u64,
    #[serde(borrow)]
    cmd: std::borrow::Cow<'a, str>,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    message_id: Option<String>,
    #[serde(default, with = "crate::names::option")]
    priority: Option<Priority>,
    #[serde(default, with = "crate::names::option")]
    mode: Option<QueueMode>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// The command of a request, tagged by `"cmd"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum RequestBody {
    /// Version handshake. Answer: [`HelloReply`].
    Hello {
        protocol: u32,
        #[serde(default)]
        client: Option<String>,
    },
    /// Liveness check. Answer: [`PingReply`].
    Ping,
    /// A chat message for a session: work, or a control command such as `/status`.
    /// Answer: [`SendReply`].
    Send {
        session: String,
        text: String,
        /// A bridge's own id for the message, for de-duplication of re-deliveries:
        /// the same id for the same session is answered with the original task.
        #[serde(default)]
        message_id: Option<String>,
        /// `interactive` (default) or `background` (admitted after interactive work,
        /// within its own cap).
        #[serde(default, with = "crate::names::option")]
        priority: Option<Priority>,
        /// Queue mode for this message only (like a `/queue <mode>` prefix).
        #[serde(default, with = "crate::names::option")]
        mode: Option<QueueMode>,
        /// Run-time limit of this message's task, in milliseconds, instead of
        /// `agentd --task-timeout`: past it the task is stopped and fails as
        /// `timed out`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// Show, change or reset a session's queue settings. Without any field set it
    /// only shows them. Answer: [`QueueSettingsView`].
    Queue {
        session: String,
        #[serde(default, with = "crate::names::option")]
        mode: Option<QueueMode>,
        #[serde(default)]
        debounce_ms: Option<u64>,
        #[serde(default)]
        cap: Option<u32>,
        #[serde(default, with = "crate::names::option")]
        drop: Option<DropPolicy>,
        /// Back to the daemon's defaults (applied before the other fields).
        #[serde(default)]
        reset: bool,
    },
    /// Subscribe to the events of one task (ends after it finishes) or of a session
    /// (until the client disconnects). Answer: [`WatchReply`], then event lines
    /// `{"id": <this request's id>, "ok": true, "event": {…}}`.
    Watch {
        #[serde(default)]
        task_id: Option<String>,
        #[serde(default)]
        session: Option<String>,
    },
    /// Daemon status, or one task's status. Answer: [`StatusReply`] or [`TaskView`].
    Status {
        #[serde(default)]
        task_id: Option<String>,
    },
    /// Running and queued tasks, optionally of one session, optionally with the finished
    /// ones (from the store: of earlier runs too, as the retention keeps them).
    ///
    /// Without `limit` and `cursor` the answer is `[TaskView]`, or `too_large` when
    /// the listing does not fit in one page ([`MAX_TASKS_PAGE`] tasks). With either
    /// of them the answer is a [`TasksPage`]: at most `limit` tasks (at most
    /// [`MAX_TASKS_PAGE`], and at most [`MAX_PAGE_BYTES`] of views) in task id
    /// order (creation order) after `cursor`, and the cursor of the next page.
    Tasks {
        #[serde(default)]
        session: Option<String>,
        #[serde(default)]
        all: bool,
        /// Most tasks in the answer (capped at [`MAX_TASKS_PAGE`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
        /// `next_cursor` of the previous page: this page starts after it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cursor: Option<String>,
    },
    /// Stop one task, a session's tasks, or every task. Answers when the stopped
    /// tasks have ended, or with `wait: false` at once, with the tasks still stopping
    /// in `stopping`: [`StopReply`].
    Stop {
        #[serde(default)]
        task_id: Option<String>,
        #[serde(default)]
        session: Option<String>,
        #[serde(default)]
        all: bool,
        #[serde(default = "yes")]
        wait: bool,
    },
    /// A piece of a task's output log, from byte `offset`. Answer: [`LogChunk`]. Ask
    /// again from `next_offset` until `data` is empty (the end for now) or, to follow
    /// a running task, until `done`.
    Log {
        task_id: String,
        #[serde(default)]
        offset: u64,
    },
    /// Runs an interrupted, cancelled or failed task again in its session, as a new
    /// attempt linked to it (its agent is told, with the last checkpoint). Answer:
    /// [`SendReply`], like new work.
    Resume { task_id: String },
}

/// Most bytes of a log in one [`LogChunk`].
pub const MAX_LOG_CHUNK: usize = 256 * 1024;

/// Answer to `log`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    pub task_id: String,
    pub offset: u64,
    /// Where the next chunk starts.
    pub next_offset: u64,
    /// The output (invalid UTF-8 replaced; a chunk never splits a character).
    pub data: String,
    /// The task has ended and all of its output has been read.
    pub done: bool,
}

/// One response line. agentd writes `Response<Answer>` (typed, serialized once);
/// clients read `Response` (`result` as JSON, decoded by the request they sent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response<R = serde_json::Value> {
    /// The request's id; `null` when the request line had no valid id.
    pub id: Option<u64>,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<R>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// Set on the event lines of a `watch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<EventView>,
    /// On a `progress` event line: how many progress lines of that task agentd left
    /// out before this one because the client read slower than they came (the
    /// latest line wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<u64>,
}

impl Response {
    /// A JSON result (for clients and tests; agentd answers with [`Response::answer`]).
    pub fn ok(id: u64, result: impl Serialize) -> Response {
        let result = serde_json::to_value(result)
            .unwrap_or_else(|e| serde_json::Value::String(format!("unserializable result: {e}")));
        Response::answer(id, result)
    }
}

impl<R> Response<R> {
    /// A successful answer to request `id`.
    pub fn answer(id: u64, result: R) -> Response<R> {
        Response {
            id: Some(id),
            ok: true,
            result: Some(result),
            error: None,
            event: None,
            skipped: None,
        }
    }

    pub fn event(id: u64, event: EventView) -> Response<R> {
        Response {
            id: Some(id),
            ok: true,
            result: None,
            error: None,
            event: Some(event),
            skipped: None,
        }
    }

    pub fn err(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Response<R> {
        Response::failed(id, ErrorBody::new(code, message))
    }

    pub fn failed(id: Option<u64>, error: ErrorBody) -> Response<R> {
        Response {
            id,
            ok: false,
            result: None,
            error: Some(error),
            event: None,
            skipped: None,
        }
    }
}

/// What agentd answers a request with, typed. Serialized as the bare reply
/// (untagged): which one a `result` holds follows from the request.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Answer {
    Hello(HelloReply),
    Ping(PingReply),
    Send(Box<SendReply>),
    Stop(StopReply),
    Status(Box<StatusReply>),
    /// `status` of one task.
    Task(Box<TaskView>),
    /// `tasks` without paging.
    Tasks(Vec<TaskView>),
    /// `tasks` with `limit` or `cursor`.
    TasksPage(TasksPage),
    Queue(QueueSettingsView),
    Watch(Box<WatchReply>),
    Log(Box<LogChunk>),
}

impl From<LogChunk> for Answer {
    fn from(reply: LogChunk) -> Answer {
        Answer::Log(Box::new(reply))
    }
}

impl From<HelloReply> for Answer {
    fn from(reply: HelloReply) -> Answer {
        Answer::Hello(reply)
    }
}

impl From<PingReply> for Answer {
    fn from(reply: PingReply) -> Answer {
        Answer::Ping(reply)
    }
}

impl From<SendReply> for Answer {
    fn from(reply: SendReply) -> Answer {
        Answer::Send(Box::new(reply))
    }
}

impl From<StopReply> for Answer {
    fn from(reply: StopReply) -> Answer {
        Answer::Stop(reply)
    }
}

impl From<StatusReply> for Answer {
    fn from(reply: StatusReply) -> Answer {
        Answer::Status(Box::new(reply))
    }
}

impl From<TaskView> for Answer {
    fn from(reply: TaskView) -> Answer {
        Answer::Task(Box::new(reply))
    }
}

impl From<Vec<TaskView>> for Answer {
    fn from(reply: Vec<TaskView>) -> Answer {
        Answer::Tasks(reply)
    }
}

impl From<TasksPage> for Answer {
    fn from(reply: TasksPage) -> Answer {
        Answer::TasksPage(reply)
    }
}

impl From<QueueSettingsView> for Answer {
    fn from(reply: QueueSettingsView) -> Answer {
        Answer::Queue(reply)
    }
}

impl From<WatchReply> for Answer {
    fn from(reply: WatchReply) -> Answer {
        Answer::Watch(Box::new(reply))
    }
}

/// A structured error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    /// One line, for humans.
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            code,
            message: message.into(),
        }
    }
}

/// Machine-readable error kinds. Stable names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line is not valid JSON or not a known request.
    BadRequest,
    /// The line exceeds [`MAX_REQUEST_BYTES`]; the connection is closed.
    RequestTooLarge,
    /// The client's protocol version is not supported; the connection is closed.
    UnsupportedProtocol,
    /// No such task.
    NotFound,
    /// The sender may not act on that task (e.g. a chat stopping another chat's task).
    Forbidden,
    /// The daemon's queue limit, or the chat's cap with `drop: new`, refuses the
    /// message; nothing was accepted.
    QueueFull,
    /// The daemon is shutting down; nothing was accepted.
    ShuttingDown,
    /// The message could not be written to agentd's store (disk full, I/O error);
    /// nothing was accepted. Try again later.
    StoreFailed,
    /// agentd already serves its maximum of connections; this one is closed.
    TooManyConnections,
    /// A request line was begun but not finished within the request timeout; the
    /// connection is closed.
    RequestTimeout,
    /// On a `watch`: the client read its events too slowly and fell more than the
    /// connection's output budget behind; the watch has ended (the connection stays).
    Lagged,
    /// The answer would exceed the largest answer agentd sends (e.g. `tasks` without
    /// `limit` on a long listing); ask for pages.
    TooLarge,
    /// An unexpected daemon-side failure.
    Internal,
}

/// Answer to `hello`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloReply {
    pub protocol: u32,
    /// e.g. `agentd 0.1.0`.
    pub server: String,
}

/// Answer to `ping`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingReply {
    pub pong: bool,
    pub version: String,
    pub pid: u32,
    pub uptime_ms: u64,
}

/// Task states, as clients see them (spelled by [`Named`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskState {
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

impl Named for TaskState {
    const WHAT: &'static str = "task state";
    const NAMES: &'static [(TaskState, &'static str)] = &[
        (TaskState::Queued, "queued"),
        (TaskState::Starting, "starting"),
        (TaskState::Running, "running"),
        (TaskState::Stopping, "stopping"),
        (TaskState::Succeeded, "succeeded"),
        (TaskState::Failed, "failed"),
        (TaskState::Cancelled, "cancelled"),
        (TaskState::Interrupted, "interrupted"),
        (TaskState::Expired, "expired"),
        (TaskState::Dropped, "dropped"),
        (TaskState::Merged, "merged"),
    ];
}

impl Serialize for TaskState {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        crate::names::serialize(self, serializer)
    }
}

impl<'de> Deserialize<'de> for TaskState {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<TaskState, D::Error> {
        crate::names::deserialize(deserializer)
    }
}

impl TaskState {
    /// Its spelling (from the [`Named`] table).
    pub fn as_str(self) -> &'static str {
        self.name()
    }

    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            TaskState::Queued | TaskState::Starting | TaskState::Running | TaskState::Stopping
        )
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// The queue vocabulary is core's: one name table per enum (agentd_core::Named),
// serialized through crate::names.
pub use agentd_core::{DropPolicy, Mode as QueueMode, Named, Priority, StopStep};

/// A session's queue settings, as in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSettingsView {
    pub session: String,
    #[serde(with = "crate::names")]
    pub mode: QueueMode,
    pub debounce_ms: u64,
    pub cap: u32,
    #[serde(with = "crate::names")]
    pub drop: DropPolicy,
    /// True when the session has its own settings (not the daemon's defaults).
    pub custom: bool,
}

/// Answer to `watch`. agentd's events for the watch follow it, starting with a
/// snapshot (the `merged` steps of a merged message, then the followed task's
/// `position`, `started` or `finished`): the watch is authoritative, no catch-up
/// `status` is needed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WatchReply {
    /// For a task watch, the task followed (after any merges), as a full id.
    pub task_id: Option<String>,
    pub session: Option<String>,
    /// For a task watch, the followed task as it stood when the watch began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskView>,
}

/// What happened, as a `watch` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The message became a task (state `queued` or `starting`).
    Accepted,
    /// A queued task's position changed.
    Position,
    /// The agent process was started.
    Started,
    Progress,
    /// A message was delivered into the running task.
    Steered,
    /// A message was merged into another task (collect) or steered into it.
    Merged,
    /// A held message was dropped on overflow.
    Dropped,
    /// A queued task waited past the queue timeout.
    Expired,
    /// The task ended (any terminal state); `task` carries the final view.
    Finished,
}

/// One event line of a `watch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventView {
    pub kind: EventKind,
    pub task_id: String,
    pub session: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u32>,
    /// Progress line, steered text, or a note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// For `merged`/`steered`: the task the message went into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub into: Option<String>,
    /// The task as it stands after the event (always set for `finished`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskView>,
    /// When agentd published the event (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

/// Which step of the stop sequence ended a task.
/// How a task ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitView {
    /// Exit code of the agent process, when it exited normally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// Signal that ended the agent process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Exit status of the command the agent wrapped, as the agent reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_signal: Option<i32>,
    /// For stopped tasks: the step of the stop sequence that ended it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::names::option"
    )]
    pub ended_by: Option<StopStep>,
    /// For stopped tasks: milliseconds from the stop request to the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_ms: Option<u64>,
    /// Why the task failed, when agentd knows (spawn failure, protocol error…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For interrupted tasks: why (`a newer message`, `shutdown`, `daemon crashed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A task as clients see it. Stable field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    pub task_id: String,
    pub session: String,
    pub state: TaskState,
    /// Position in the admission order (1 = next), for queued tasks.
    pub position: Option<u32>,
    /// Pid of the agent process while it lives.
    pub pid: Option<u32>,
    /// RFC 3339 timestamps.
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub text: String,
    /// The latest progress line.
    pub progress: Option<String>,
    pub result: Option<String>,
    pub exit: Option<ExitView>,
    /// For `merged` tasks: the task this message went into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<String>,
    #[serde(default, with = "crate::names")]
    pub priority: Priority,
    /// For a `stopping` task: the step of the stop sequence taken last, since when,
    /// and (in the answer to `status` of this task) the next step and when it is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopping: Option<StoppingView>,
}

/// Capacity in use: live agent processes against the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub busy: u32,
    pub max: u32,
}

/// Answer to `send`: work accepted, or a control command answered.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SendReply {
    /// The text a bridge shows in the chat, one or more lines.
    pub reply: String,
    /// True when the text was work and became (or joined) a task.
    pub accepted: bool,
    /// For accepted work: the task and where it stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,
    /// For control commands: the command's name (`status`, `stop`, `tasks`, `queue`,
    /// `help`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// For control commands: the same structured answer the control request gives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// True when this was a re-delivery of a `message_id` already seen: `task` is
    /// the original task and nothing new was accepted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    /// Held messages dropped to make room for this one (cap with `drop: old` or
    /// `drop: summarize`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<TaskView>,
    /// Anything else the sender should know, e.g. that steering fell back to a
    /// follow-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    /// The running task the message was steered into: with `steer` the message's
    /// task is `merged` into it; with `steer-backlog` it is also kept, queued as a
    /// follow-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steered_into: Option<String>,
}

/// Answer to `status` without a task id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    pub version: String,
    pub pid: u32,
    pub uptime_ms: u64,
    pub capacity: Capacity,
    pub queued: u32,
    pub sessions: u32,
    /// Tasks in starting, running or stopping.
    pub active: Vec<TaskView>,
    /// Which guarantee holds that a stopped or finished task leaves nothing running
    /// (absent from agentds before 0.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containment: Option<ContainmentView>,
    /// The liveness limits agents are held to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<LivenessView>,
    /// What recovery did when this agentd started on an existing store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<RecoveryView>,
}

/// How a task's processes are found and killed on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContainmentKind {
    /// A cgroup v2 per task: every descendant is killed, however it detached.
    Cgroup,
    /// No writable cgroup: process group, parent links and `AGENTD_TASK_ID`. A
    /// process that double-forks and scrubs its environment escapes.
    ProcessTree,
}

/// `status.containment`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainmentView {
    pub kind: ContainmentKind,
    /// For `cgroup`: the directory under which task cgroups are made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// For `cgroup`: the controllers task cgroups get (`pids`: each has `pids.max`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controllers: Vec<String>,
    /// For `process-tree`: why no cgroup is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `status.liveness`: the limits of `agentd --heartbeat`, `--hung-after`,
/// `--task-timeout` and `--frame-timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LivenessView {
    pub heartbeat_ms: u64,
    /// An agent silent this long is stopped and fails as `hung` (`null`: never).
    pub hung_after_ms: Option<u64>,
    /// A task running this long is stopped and fails as `timed out` (`null`: never).
    pub task_timeout_ms: Option<u64>,
    /// A frame an agent began must be complete within this.
    pub frame_timeout_ms: u64,
}

/// What agentd found in its store when it started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryView {
    /// Queued tasks put back in their queues, with their ids.
    pub queued: u32,
    /// Of those, the ones the current limits (`--max-queued`, a session's cap) would
    /// have refused: queued anyway, since they were accepted before.
    #[serde(default)]
    pub over_limits: u32,
    /// Tasks that were running when the previous agentd ended: now `interrupted`.
    pub interrupted: u32,
    /// Leftover agent processes of the previous agentd that were ended.
    pub killed: u32,
    /// Whether the previous agentd ended without closing the store (crash, kill -9).
    pub crashed: bool,
}

/// Answer to `tasks` with a `limit` or a `cursor`: one page, in task id order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TasksPage {
    pub tasks: Vec<TaskView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

fn yes() -> bool {
    true
}

/// Answer to `stop`: every task the stop acted on, in its final state (or, for a
/// stop answered without waiting, as it stands).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StopReply {
    pub stopped: Vec<TaskView>,
    /// For a stop answered without waiting: how far each task still `stopping` is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stopping: Vec<StoppingView>,
}

/// How far a task's stop is: the step taken last and when, and the next one. In a
/// stop's answer for each task still stopping, and in a stopping task's view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoppingView {
    pub task_id: String,
    /// The step of the stop sequence taken last.
    #[serde(with = "crate::names")]
    pub step: StopStep,
    /// When that step was taken (RFC 3339); absent from an agentd older than it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_at: Option<String>,
    /// The next step, unless the task ends first, and how long until it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::names::option"
    )]
    pub next: Option<StopStep>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_in_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_parses_as_the_derived_parser_parses_it() {
        let lines = [
            r#"{"id":1,"cmd":"send","session":"s","text":"ls"}"#,
            r#"{"cmd":"send","text":"ls -l","id":7,"session":"chat-1","message_id":"m-1"}"#,
            r#"{"id":2,"cmd":"send","session":"s","text":"x","priority":"background","mode":"steer","timeout_ms":5000}"#,
            r#"{"id":3,"cmd":"send","session":"s","text":"x","message_id":null,"timeout_ms":null,"priority":null}"#,
            r#"{"id":4,"cmd":"se\u006ed","session":"s\n","text":"a \"quoted\" text"}"#,
            r#"{"id":5,"cmd":"send","session":"s","text":"x","wait":true,"extra":{"a":[1,2]}}"#,
            r#"{"id":6,"cmd":"send","session":"s"}"#,
            r#"{"id":7,"cmd":"send","text":"x"}"#,
            r#"{"id":8,"cmd":"send","session":null,"text":"x"}"#,
            r#"{"id":9,"cmd":"send","session":"s","text":"x","priority":"urgent"}"#,
            r#"{"id":10,"cmd":"send","session":"s","text":"x","mode":"sideways"}"#,
            r#"{"id":11,"cmd":"send","session":"s","text":"x","timeout_ms":1.5}"#,
            r#"{"id":12,"cmd":"send","session":"s","text":"x","text":"y"}"#,
            r#"{"id":13,"cmd":"send","cmd":"status","session":"s","text":"x"}"#,
            r#"{"id":-1,"cmd":"send","session":"s","text":"x"}"#,
            r#"{"cmd":"send","session":"s","text":"x"}"#,
            r#"{"id":14,"session":"s","text":"x"}"#,
            r#"{"id":15,"cmd":"status"}"#,
            r#"{"id":16,"cmd":"status","session":"s","text":"x"}"#,
            r#"{"id":17,"cmd":"stop","all":true}"#,
            r#"{"id":18,"cmd":"sned","session":"s","text":"x"}"#,
            r#"{"id":19,"cmd":"send","session":"s","text":"x"} trailing"#,
            r#"{"id":20,"cmd":"send","session":5,"text":"x"}"#,
            r#"[1,2,3]"#,
            r#"not json"#,
            r#""#,
        ];
        for line in lines {
            let ours = Request::from_line(line.as_bytes()).map_err(|e| e.to_string());
            let derived =
                serde_json::from_slice::<Request>(line.as_bytes()).map_err(|e| e.to_string());
            assert_eq!(ours, derived, "{line}");
        }
        assert!(matches!(
            Request::from_line(lines[4].as_bytes()),
            Ok(Request { body: RequestBody::Send { session, .. }, .. }) if session == "s\n"
        ));
    }

    #[test]
    fn requests_parse_from_the_documented_json() {
        let r: Request =
            serde_json::from_str(r#"{"id":7,"cmd":"send","session":"alice","text":"hi"}"#).unwrap();
        assert_eq!(
            r,
            Request {
                id: 7,
                body: RequestBody::Send {
                    session: "alice".into(),
                    text: "hi".into(),
                    message_id: None,
                    priority: None,
                    mode: None,
                    timeout_ms: None,
                }
            }
        );
        let r: Request = serde_json::from_str(r#"{"id":1,"cmd":"stop","all":true}"#).unwrap();
        assert!(matches!(r.body, RequestBody::Stop { all: true, .. }));
        let r: Request = serde_json::from_str(r#"{"id":2,"cmd":"status"}"#).unwrap();
        assert_eq!(r.body, RequestBody::Status { task_id: None });
    }

    #[test]
    fn unknown_commands_are_errors() {
        assert!(serde_json::from_str::<Request>(r#"{"id":1,"cmd":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"ping"}"#).is_err());
    }

    #[test]
    fn error_responses_have_stable_codes() {
        let line = serde_json::to_string(&Response::<serde_json::Value>::err(
            None,
            ErrorCode::RequestTooLarge,
            "x",
        ))
        .unwrap();
        assert_eq!(
            line,
            r#"{"id":null,"ok":false,"error":{"code":"request_too_large","message":"x"}}"#
        );
    }
}
