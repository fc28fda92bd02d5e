//! The texts users read, shared by agentd's chat replies, its error messages and
//! agentctl, so a chat and a terminal say the same thing in the same words.
//!
//! Sections: task lines (outcome, accepted, duplicate, stop); the extra lines of a
//! send's answer; chat-command answers; error messages of requests.

use std::fmt::{Display, Write as _};
use std::time::Duration;

use crate::control::{
    Capacity, QueueSettingsView, StopReply, StopStep, StoppingView, TaskState, TaskView,
};

/// The refusal of an unknown chat command such as `/stauts`: nothing was run.
pub fn unknown_command(command: &str) -> String {
    let commands: Vec<String> = agentd_core::COMMANDS
        .iter()
        .map(|c| format!("/{c}"))
        .collect();
    format!(
        "unknown command /{command}: nothing was run (commands: {}; /help explains them); \
         to send work that starts with a slash, begin it with //",
        commands.join(", ")
    )
}

/// A stop step in words: `cooperative cancel`, `SIGTERM`, `SIGKILL`.
pub fn stop_step(step: StopStep) -> &'static str {
    match step {
        StopStep::CooperativeCancel => "cooperative cancel",
        StopStep::Sigterm => "SIGTERM",
        StopStep::Sigkill => "SIGKILL",
    }
}

/// `0.04 s`, `2.01 s`, `0.003 s` under 10 ms, `1m 15s` from a minute on.
pub fn format_seconds(d: Duration) -> String {
    if d >= Duration::from_secs(60) {
        let secs = d.as_secs();
        format!("{}m {}s", secs / 60, secs % 60)
    } else if d < Duration::from_millis(10) {
        format!("{:.3} s", d.as_secs_f64())
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

/// How a task stands or ended, in words: `running`, `cancelled (ended by SIGKILL
/// after 2.01 s)`, `cancelled (removed from the queue)`, `failed (command failed
/// with exit code 2)`.
pub fn outcome(view: &TaskView) -> String {
    let exit = view.exit.clone().unwrap_or_default();
    match view.state {
        TaskState::Cancelled => match (exit.ended_by, exit.stop_ms) {
            (Some(step), Some(ms)) => format!(
                "cancelled (ended by {} after {})",
                stop_step(step),
                format_seconds(Duration::from_millis(ms))
            ),
            (Some(step), None) => format!("cancelled (ended by {})", stop_step(step)),
            (None, _) if view.started_at.is_none() => {
                "cancelled (removed from the queue)".to_string()
            }
            (None, _) => "cancelled".to_string(),
        },
        TaskState::Failed => match &exit.error {
            Some(error) => format!("failed ({error})"),
            None => "failed".to_string(),
        },
        TaskState::Interrupted => match &exit.reason {
            Some(reason) => format!("interrupted ({reason})"),
            None => "interrupted".to_string(),
        },
        TaskState::Merged => match &view.merged_into {
            Some(into) => format!("merged into task {into}"),
            None => "merged".to_string(),
        },
        state => state.to_string(),
    }
}

/// The answer to accepted work: `task ID  started` or
/// `task ID  queued: position 1 (1/1 agents busy)`.
pub fn accepted_line(view: &TaskView, capacity: Option<Capacity>) -> String {
    let id = &view.task_id;
    match view.state {
        TaskState::Queued => {
            // Written into one buffer: every accepted message's answer has this line.
            let mut line = String::with_capacity(96);
            let _ = write!(line, "task {id}  queued");
            if let Some(position) = view.position {
                let _ = write!(line, ": position {position}");
            }
            if let Some(c) = capacity {
                let _ = write!(line, " ({}/{} agents busy)", c.busy, c.max);
            }
            line
        }
        TaskState::Starting | TaskState::Running => format!("task {id}  started"),
        // Collected messages merge only when their follow-up starts, so a message
        // that is merged as it is accepted was steered into the running task.
        TaskState::Merged => match &view.merged_into {
            Some(into) => steered_line(id, into),
            None => format!("task {id}  steered into the running task"),
        },
        _ => format!("task {id}  {}", outcome(view)),
    }
}

/// `task ID  steered into running task INTO`.
pub fn steered_line(task_id: impl Display, into: impl Display) -> String {
    format!("task {task_id}  steered into running task {into}")
}

/// The answer to a message delivered again (same message id):
/// `task ID  already received (OUTCOME): not run again`.
pub fn duplicate_line(view: &TaskView) -> String {
    format!(
        "task {}  already received ({}): not run again",
        view.task_id,
        outcome(view)
    )
}

/// A re-delivery of a message whose task is no longer kept (pruned by the retention).
pub fn duplicate_gone_line(task_id: impl Display) -> String {
    format!("task {task_id}  already received (no longer kept): not run again")
}

/// `dropped to make room: task ID EXCERPT`, one per message dropped for a new one.
pub fn dropped_line(task_id: impl Display, excerpt: impl Display) -> String {
    format!("dropped to make room: task {task_id}  {excerpt}")
}

/// `note: NOTICE`: a fallback or an interrupt the sender should know of.
pub fn note_line(notice: &str) -> String {
    format!("note: {notice}")
}

/// Watchers' note on a steered message the agent refused.
pub fn steer_refused_note(running: impl Display) -> String {
    format!("the agent of task {running} refused the steered message: queued as a follow-up")
}

/// `session alice: mode collect, debounce 1s, cap 20, drop summarize (defaults)`.
pub fn settings_line(v: &QueueSettingsView) -> String {
    format!(
        "session {}: mode {}, debounce {}, cap {}, drop {}{}",
        v.session,
        v.mode.as_str(),
        humantime::format_duration(Duration::from_millis(v.debounce_ms)),
        v.cap,
        v.drop.as_str(),
        if v.custom { "" } else { " (defaults)" }
    )
}

/// One line per task for a chat's `/tasks` and `/status`.
pub fn task_line(view: &TaskView) -> String {
    let snippet: String = view.text.chars().take(50).collect();
    let ellipsis = if view.text.chars().count() > 50 {
        "…"
    } else {
        ""
    };
    match (view.state, view.position) {
        (TaskState::Queued, Some(p)) => format!(
            "task {}  queued (position {p})  {snippet}{ellipsis}",
            view.task_id
        ),
        _ => format!(
            "task {}  {}  {snippet}{ellipsis}",
            view.task_id,
            outcome(view)
        ),
    }
}

/// A chat's `/status TASK`: the task's line, then its latest progress and result.
pub fn chat_task_status(view: &TaskView) -> String {
    let mut text = task_line(view);
    if let Some(progress) = &view.progress {
        text.push_str(&format!("\nlatest: {progress}"));
    }
    if let Some(result) = &view.result {
        text.push_str(&format!("\nresult: {result}"));
    }
    text
}

/// A chat's `/status`: agentd's load, then the chat's tasks with their latest
/// progress.
/// How many of a chat's queued tasks its `/status` lists (the rest are counted).
pub const CHAT_STATUS_QUEUED: usize = 10;

/// A chat's `/status`: the daemon's counts, then this chat's active task and its
/// first queued ones (at most [`CHAT_STATUS_QUEUED`]); `more` queued are counted.
pub fn chat_status(capacity: Capacity, queued: u32, mine: &[TaskView], more: usize) -> String {
    let mut text = format!(
        "{}/{} agents busy, {} queued overall",
        capacity.busy, capacity.max, queued
    );
    if mine.is_empty() {
        text.push_str("\nnothing running or queued in this chat");
    }
    for view in mine {
        text.push('\n');
        text.push_str(&task_line(view));
        if let Some(progress) = &view.progress {
            text.push_str(&format!("\n  latest: {progress}"));
        }
    }
    if more > 0 {
        text.push_str(&format!(
            "\n… and {more} more queued in this chat (/tasks lists them)"
        ));
    }
    text
}

/// A chat's `/tasks`.
pub fn chat_tasks(list: &[TaskView]) -> String {
    if list.is_empty() {
        return "no tasks in this chat".to_string();
    }
    list.iter().map(task_line).collect::<Vec<_>>().join("\n")
}

// ----- error messages -----

pub fn no_task(id: impl Display) -> String {
    format!("no task {id}")
}

/// A task id that is neither a full id nor a usable prefix.
pub fn not_a_task_id(text: impl Display) -> String {
    let text = text.to_string();
    let what = if text.is_empty() {
        "no task id given".to_string()
    } else {
        format!("no task {text}")
    };
    format!(
        "{what}: give a task id or a unique prefix of at least 4 characters \
         (task ids look like 0192f3c4-…)"
    )
}

pub fn ambiguous_prefix(text: impl Display, matches: usize) -> String {
    format!("task id prefix {text} is ambiguous ({matches} tasks): give more of the id")
}

pub fn task_not_in_this_chat(id: impl Display) -> String {
    format!("task {id} is not in this chat")
}

pub fn session_not_this_chat(session: impl Display) -> String {
    format!("session {session} is not this chat")
}

pub const BAD_SESSION: &str =
    "session must be 1 to 256 bytes, not only blanks, without control characters";
pub const BAD_MESSAGE_ID: &str = "message_id must be 1 to 1024 bytes";

/// A watch past the bound of watches of one connection.
pub fn too_many_watches(max: usize) -> String {
    format!("this connection has {max} watches, the most it may have: end one, or watch on another connection")
}

/// A duration of a flag or the config file past agentd's bound (100 years).
pub fn duration_too_long(text: &str) -> String {
    format!("invalid duration {:?}: at most 100 years", text.trim())
}
pub const EMPTY_MESSAGE: &str = "empty message: nothing to do";
pub const SHUTTING_DOWN_REFUSED: &str = "agentd is shutting down; the message was not accepted";

/// A work message whose record could not be committed.
pub fn store_failed(error: impl std::fmt::Display) -> String {
    format!("agentd could not record the message, so it was not accepted: {error}")
}

/// Queue settings whose record could not be committed.
pub fn settings_not_saved(error: impl std::fmt::Display) -> String {
    format!(
        "agentd could not record the queue settings: they apply now, and agentd keeps trying to record them, but a restart before it can would lose them: {error}"
    )
}

/// A read of finished tasks from the store failed.
pub fn history_read_failed(error: impl std::fmt::Display) -> String {
    format!("agentd could not read its finished tasks from the store: {error}")
}

/// Too many reads of the store (`tasks --all`, `status ID`, `log`) wait already.
pub const HISTORY_BUSY: &str =
    "agentd is busy reading from its store (too many requests wait); try again in a moment";

/// Reason recorded on tasks that were running when agentd died.
pub const INTERRUPTED_BY_CRASH: &str = "daemon crashed";

/// Reason recorded on tasks that agentd interrupted for a shutdown.
pub const INTERRUPTED_BY_SHUTDOWN: &str = "shutdown";

/// Reason given for a task stopped for a newer message of its session (`interrupt`).
pub const INTERRUPTED_BY_NEWER_MESSAGE: &str = "a newer message";

/// `agentctl status`: what recovery did at start.
/// `over_limits`: recovered queued tasks that the current limits (`--max-queued`, a
/// session's cap) would have refused, queued anyway.
pub fn recovery_line(
    queued: u32,
    over_limits: u32,
    interrupted: u32,
    killed: u32,
    crashed: bool,
) -> String {
    let mut line = format!("recovered {queued} queued");
    if over_limits > 0 {
        line.push_str(&format!(
            " ({over_limits} over the limits, queued anyway: they were accepted before)"
        ));
    }
    line.push_str(&format!(", {interrupted} interrupted"));
    if killed > 0 {
        let agents = if killed == 1 { "agent" } else { "agents" };
        line.push_str(&format!(", ended {killed} leftover {agents}"));
    }
    if crashed {
        line.push_str(" (the previous agentd crashed)");
    }
    line
}
pub const CAP_TOO_SMALL: &str = "cap must be at least 1";
pub const DEBOUNCE_TOO_LONG: &str = "debounce must be at most 24h";
pub const STOP_TARGETS: &str = "stop takes exactly one of task_id, session, all";
pub const WATCH_TARGETS: &str = "watch takes exactly one of task_id, session";

pub fn queue_full(limit: u32) -> String {
    let wait = if limit == 1 {
        "message waits"
    } else {
        "messages wait"
    };
    format!("agentd's queue is full ({limit} {wait}): the message was not accepted")
}

pub fn session_full(cap: u32) -> String {
    let messages = if cap == 1 { "message" } else { "messages" };
    format!(
        "this chat already holds {cap} waiting {messages} (cap {cap}, drop: new): the message \
         was not accepted"
    )
}

/// The failure reason of an agent that sent no Hello in time.
pub fn no_handshake_within(timeout: Duration) -> String {
    format!(
        "no handshake within {}",
        humantime::format_duration(timeout)
    )
}

/// The `containment:` line of `agentctl status`.
pub fn containment_line(c: &crate::control::ContainmentView) -> String {
    use crate::control::ContainmentKind;
    match c.kind {
        ContainmentKind::Cgroup => format!(
            "containment: a cgroup per task under {} ({}): stops kill every descendant",
            c.cgroup.as_deref().unwrap_or("?"),
            if c.controllers.is_empty() {
                "no controllers".to_string()
            } else {
                format!("controllers: {}", c.controllers.join(", "))
            }
        ),
        ContainmentKind::ProcessTree => format!(
            "containment: process tree only ({}): a descendant that double-forks and clears its environment can escape a stop",
            c.reason.as_deref().unwrap_or("no cgroup")
        ),
    }
}

/// The `liveness:` line of `agentctl status`.
pub fn liveness_line(l: &crate::control::LivenessView) -> String {
    let limit = |ms: Option<u64>| match ms {
        Some(ms) => humantime::format_duration(Duration::from_millis(ms)).to_string(),
        None => "off".to_string(),
    };
    format!(
        "liveness: heartbeat every {}, hung after {} of silence, task timeout {}",
        limit(Some(l.heartbeat_ms)),
        limit(l.hung_after_ms),
        limit(l.task_timeout_ms)
    )
}

/// A `send` whose `timeout_ms` is 0.
pub const ZERO_TIMEOUT: &str =
    "timeout_ms must be more than 0 (leave it out for no limit of its own)";

/// Why the process-tree fallback is in use when `--no-cgroup` asked for it.
pub const CGROUP_DISABLED: &str = "cgroups disabled by --no-cgroup";

/// agentctl: the socket path names a directory (`suggest`: the socket it may have
/// meant, `DIR/agentd.sock`).
pub fn socket_is_a_directory(path: &std::path::Path, suggest: &std::path::Path) -> String {
    format!(
        "{} is a directory, not agentd's socket: give the socket file, e.g. {}",
        path.display(),
        suggest.display()
    )
}

/// agentctl: the socket path names something that is no socket (`kind`: `a regular
/// file`, …).
pub fn socket_is_not_a_socket(path: &std::path::Path, kind: &str) -> String {
    format!(
        "{} is {kind}, not agentd's socket: give the socket agentd listens on (its --socket)",
        path.display()
    )
}

/// agentd's exit status (a macro, so that [`AGENTD_AFTER_HELP`] can hold it too).
macro_rules! agentd_exit_status {
    () => {
        "Exit status: 0 stopped by SIGTERM or SIGINT, 1 could not run (socket, store, \
         containment), 2 usage error, 75 another agentd holds the state dir, 78 \
         configuration error (a flag's value, the config file, an agent program that \
         cannot be run)"
    };
}

/// agentd's exit status, in `agentd --help` and its man page.
pub const AGENTD_EXIT_STATUS: &str = agentd_exit_status!();

/// The end of `agentd --help` and of its man page: examples, then the exit status.
pub const AGENTD_AFTER_HELP: &str = concat!(
    "Examples:\n  \
     agentd --max-concurrent 1 --agent 'agent-exec -- sh -c {text}' &\n  \
     agentd --config ~/.config/agentd/config.toml --log-format json\n  \
     agentd --socket /tmp/try/agentd.sock --state-dir /tmp/try/state --no-cgroup   \
     # a second, separate agentd\n\n",
    agentd_exit_status!()
);

/// agentd refuses to start: the agent command's program, which names no path, is in
/// none of the places a task's spawn would look (`next_to`: agentd's own directory;
/// `path`: agentd's `PATH`, which its agents inherit).
pub fn agent_program_not_found(program: &str, next_to: Option<&str>, path: &str) -> String {
    let beside = next_to
        .map(|dir| format!("next to agentd ({dir}) nor "))
        .unwrap_or_default();
    format!(
        "the agent program {program:?} is not found {beside}on agentd's PATH ({path}): \
         give its full path, or install it there"
    )
}

/// agentd refuses to start: the agent command's program names a path that is no
/// program (`problem`: one of the `AGENT_PROGRAM_*` below).
pub fn agent_program_unusable(program: &str, problem: &str) -> String {
    format!("the agent program {program:?} {problem}")
}

pub const AGENT_PROGRAM_MISSING: &str = "does not exist";
pub const AGENT_PROGRAM_NOT_EXECUTABLE: &str = "is not executable";
pub const AGENT_PROGRAM_DIRECTORY: &str = "is a directory";

/// What an error about the default agent command says it is about.
pub const DEFAULT_AGENT: &str =
    "the default agent (agent-exec -- sh -c {text}; give another with --agent)";

/// The answer to accepted work that was also steered into the running task
/// `steered_into` (`steer-backlog`): `task ID  steered into running task ID and kept
/// as a follow-up: position 1 (1/1 agents busy)`; otherwise [`accepted_line`].
pub fn send_line(
    view: &TaskView,
    capacity: Option<Capacity>,
    steered_into: Option<&str>,
) -> String {
    match steered_into {
        Some(into) if view.state == TaskState::Queued => {
            let mut line = format!(
                "task {}  steered into running task {into} and kept as a follow-up",
                view.task_id
            );
            if let Some(position) = view.position {
                line.push_str(&format!(": position {position}"));
            }
            if let Some(c) = capacity {
                line.push_str(&format!(" ({}/{} agents busy)", c.busy, c.max));
            }
            line
        }
        _ => accepted_line(view, capacity),
    }
}

/// `5 s` (whole seconds from half a second on), `0.3 s` below.
fn format_in(d: Duration) -> String {
    let ms = d.as_millis();
    if ms >= 60_000 {
        format_seconds(d)
    } else if ms >= 500 {
        format!("{} s", (ms + 500) / 1000)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// The step a stop took last, as `cancel sent` or `SIGTERM sent`.
fn step_taken(step: StopStep) -> String {
    match step {
        StopStep::CooperativeCancel => "cancel sent".to_string(),
        step => format!("{} sent", stop_step(step)),
    }
}

/// A stopping task's `stop` line in `agentctl status ID`: the step taken last, when
/// (`at`, a time as the reader's clock shows it, and how long ago) and the next step:
/// `SIGTERM sent at 2026-12-01 21:40:01 UTC (2 s ago), SIGKILL in 3 s`.
pub fn stop_progress(view: &StoppingView, at: Option<&str>, ago: Option<Duration>) -> String {
    let mut line = step_taken(view.step);
    match (at, ago) {
        (Some(at), Some(ago)) => line.push_str(&format!(" at {at} ({} ago)", format_in(ago))),
        (Some(at), None) => line.push_str(&format!(" at {at}")),
        (None, Some(ago)) => line.push_str(&format!(" {} ago", format_in(ago))),
        (None, None) => {}
    }
    if let (Some(next), Some(ms)) = (view.next, view.next_in_ms) {
        line.push_str(&format!(
            ", {} in {}",
            stop_step(next),
            format_in(Duration::from_millis(ms))
        ));
    }
    line
}

/// Where a stop stands: `stopping: cancel sent, SIGTERM in 5 s`.
pub fn stopping(view: &StoppingView) -> String {
    let taken = step_taken(view.step);
    match (view.next, view.next_in_ms) {
        (Some(next), Some(ms)) => format!(
            "stopping: {taken}, {} in {}",
            stop_step(next),
            format_in(Duration::from_millis(ms))
        ),
        _ => format!("stopping: {taken}"),
    }
}

/// One line per stopped task (`task ID  cancelled (…)`, or `task ID  stopping: cancel
/// sent, SIGTERM in 5 s` for one still stopping), or `nothing to stop`.
pub fn stop_lines(reply: &StopReply) -> String {
    if reply.stopped.is_empty() {
        return "nothing to stop".to_string();
    }
    let lines: Vec<String> = reply
        .stopped
        .iter()
        .map(|v| {
            let now = match reply.stopping.iter().find(|s| s.task_id == v.task_id) {
                Some(s) if v.state == TaskState::Stopping => stopping(s),
                _ => outcome(v),
            };
            format!("task {}  {now}", v.task_id)
        })
        .collect();
    lines.join("\n")
}

/// Refusal of a connection past `max-connections`.
pub fn too_many_connections(max: usize) -> String {
    format!("agentd already serves its maximum of {max} connections; try again later")
}

/// A request line that began but did not end within the request timeout.
pub fn request_timeout(timeout: Duration) -> String {
    format!(
        "the request line did not end within {}; closing the connection",
        format_seconds(timeout)
    )
}

/// The last line of a watch that fell behind its events.
pub fn watch_lagged(stall: Duration, budget_bytes: usize) -> String {
    format!(
        "this watch fell behind (the client did not read its events for {}, or over {} KiB of them waited) and was ended; watch again to resume",
        format_seconds(stall),
        budget_bytes / 1024
    )
}

/// `tasks` without paging on a listing longer than one answer.
pub fn listing_too_large(max_tasks: u32, max_bytes: usize) -> String {
    format!(
        "the listing is longer than one answer ({max_tasks} tasks or {} KiB): ask for pages with limit and cursor",
        max_bytes / 1024
    )
}

/// A `tasks` cursor that is not a task id.
pub fn invalid_cursor(cursor: &str) -> String {
    format!("invalid cursor {cursor:?}: pass the next_cursor of the previous page")
}

/// What a watcher is told when progress lines were coalesced away before a line.
pub fn skipped_progress(skipped: u64) -> String {
    match skipped {
        1 => "(1 progress line skipped)".to_string(),
        n => format!("({n} progress lines skipped)"),
    }
}

/// agentctl's word on Ctrl-C during `send --wait`: the task is not stopped by it.
pub fn interrupted_task(task_id: impl Display) -> String {
    format!("agentctl: stopped waiting; task {task_id} goes on (stop it with `agentctl stop {task_id}`)")
}

/// agentctl's word on Ctrl-C during `watch TASK_ID`: the task is not stopped by it.
pub fn interrupted_task_watch(task_id: impl Display) -> String {
    format!("agentctl: stopped watching; task {task_id} goes on (stop it with `agentctl stop {task_id}`)")
}

/// agentctl's word on Ctrl-C during `watch --session S`.
pub fn interrupted_session(session: impl Display) -> String {
    format!(
        "agentctl: stopped watching; the tasks of session {session} go on (stop them with \
         `agentctl stop --session {session}`)"
    )
}

/// agentctl's word on Ctrl-C during `chat --session S`: leaving the chat stops nothing.
pub fn interrupted_chat(session: impl Display) -> String {
    format!(
        "agentctl: left the chat; the tasks of session {session} go on (stop them with \
         `agentctl stop --session {session}`)"
    )
}

/// What `agentctl chat` adds to the chat's `/help`: leaving is agentctl's, not agentd's.
pub const CHAT_HELP_QUIT: &str =
    "  /quit             leave this chat (so do Ctrl-D and Ctrl-C); its tasks go on";

/// The first line of `agentctl chat`.
pub fn chat_banner(session: impl Display) -> String {
    format!(
        "chatting with session {session}: one line is one message; /help lists the \
         commands; /quit, Ctrl-D or Ctrl-C leaves (tasks go on)"
    )
}

/// `resume` of a task that is still queued or running.
pub fn resume_live(task_id: impl std::fmt::Display, state: &str) -> String {
    format!(
        "task {task_id} is {state}: only an interrupted, cancelled or failed task can be resumed"
    )
}

/// `resume` of a task that ended in a state that cannot be resumed.
pub fn resume_not_resumable(task_id: impl std::fmt::Display, state: &str) -> String {
    format!("task {task_id} {state}: only an interrupted, cancelled or failed task can be resumed")
}

/// `resume` of a task that already has an attempt queued or running.
pub fn resume_in_progress(
    task_id: impl std::fmt::Display,
    attempt: impl std::fmt::Display,
) -> String {
    format!("task {task_id} is being resumed already, as task {attempt}")
}

/// A chat's `/resume` without a task when the chat has nothing to resume.
pub const NOTHING_TO_RESUME: &str =
    "nothing to resume in this chat: no interrupted, cancelled or failed task";

/// The first line of the answer to `resume`, before the new attempt's send line.
pub fn resumed_line(previous: impl std::fmt::Display, has_checkpoint: bool) -> String {
    if has_checkpoint {
        format!("resuming task {previous} from its last checkpoint, as a new attempt:")
    } else {
        format!("resuming task {previous} (no checkpoint saved), as a new attempt:")
    }
}

/// An agent's checkpoint over the size agentd keeps (a protocol error).
pub fn checkpoint_too_large(len: usize, max: usize) -> String {
    format!("a checkpoint of {len} bytes is over the limit of {max} bytes")
}

// ----- chat bridges (agentd-matrix) -----

/// A chat bridge's answer to a user who is not on its allow-list; nothing runs.
pub fn bridge_refusal(sender: impl Display) -> String {
    format!(
        "Sorry {sender}, you are not on this bridge's list of allowed users, so I cannot \
         run anything for you. The owner of this agentd can add your user id to \
         `allowed-users` in the `[matrix]` config."
    )
}

/// The one message a bridge edits in place while a task runs: the task's line, then
/// its latest progress line.
pub fn bridge_progress(view: &TaskView, line: &str) -> String {
    format!("task {}  {}\n{line}", view.task_id, outcome(view))
}

/// What a bridge shows for a task it followed that agentd no longer knows (it
/// restarted on another state dir, or pruned the task while the bridge was away).
pub fn bridge_task_unknown(task_id: &str) -> String {
    format!(
        "task {task_id}  unknown to agentd now (it restarted without it, or forgot it): \
         how it ended cannot be shown"
    )
}

/// What a bridge posts when agentd's answer to a message cannot be read (an agentd
/// of another version, or a broken line); the details go to the bridge's log.
pub fn bridge_answer_unreadable() -> String {
    "agentd's answer to this message could not be read (the bridge's log has the \
     details); it may have started a task: `/status` shows what runs"
        .to_string()
}

/// The end of a text a bridge cut because the chat does not take it all (`total`
/// bytes in all).
pub fn bridge_cut(total: usize) -> String {
    format!(
        "… (cut: {total} bytes in all, more than the chat takes; `agentctl log <task>` \
         on agentd's machine prints a task's whole output)"
    )
}

/// What a bridge says when a message comes while agentd is not running.
pub fn bridge_agentd_down() -> String {
    "agentd is not running right now: your message waits, and is handed to it as soon \
     as it is back"
        .to_string()
}

/// What a bridge posts when a task ends: how it ended, then its result.
pub fn bridge_finished(view: &TaskView) -> String {
    match &view.result {
        Some(result) if !result.trim().is_empty() => {
            format!("task {}  {}\n{result}", view.task_id, outcome(view))
        }
        _ => format!("task {}  {}", view.task_id, outcome(view)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ExitView;

    #[test]
    fn full_queues_count_their_messages_in_words() {
        assert_eq!(
            session_full(1),
            "this chat already holds 1 waiting message (cap 1, drop: new): the message was \
             not accepted"
        );
        assert!(session_full(20).starts_with("this chat already holds 20 waiting messages "));
        assert_eq!(
            queue_full(1),
            "agentd's queue is full (1 message waits): the message was not accepted"
        );
        assert!(queue_full(1000).starts_with("agentd's queue is full (1000 messages wait)"));
    }

    fn view(state: TaskState, exit: Option<ExitView>, started: bool) -> TaskView {
        TaskView {
            task_id: "T".into(),
            session: "s".into(),
            state,
            position: (state == TaskState::Queued).then_some(3),
            pid: None,
            created_at: "2026-01-01T00:00:00Z".into(),
            started_at: started.then(|| "2026-01-01T00:00:01Z".into()),
            finished_at: None,
            text: "x".into(),
            progress: None,
            result: None,
            exit,
            merged_into: None,
            priority: Default::default(),
            stopping: None,
        }
    }

    #[test]
    fn seconds() {
        let ms = Duration::from_millis;
        assert_eq!(format_seconds(ms(40)), "0.04 s");
        assert_eq!(format_seconds(ms(3)), "0.003 s");
        assert_eq!(format_seconds(ms(2_010)), "2.01 s");
        assert_eq!(format_seconds(ms(75_000)), "1m 15s");
    }

    #[test]
    fn lines() {
        let cap = Some(Capacity { busy: 1, max: 1 });
        assert_eq!(
            accepted_line(&view(TaskState::Queued, None, false), cap),
            "task T  queued: position 3 (1/1 agents busy)"
        );
        assert_eq!(
            accepted_line(&view(TaskState::Running, None, true), cap),
            "task T  started"
        );
        assert_eq!(
            send_line(&view(TaskState::Queued, None, false), cap, Some("R")),
            "task T  steered into running task R and kept as a follow-up: position 3 (1/1 agents busy)"
        );
        let stopped = ExitView {
            ended_by: Some(StopStep::Sigkill),
            stop_ms: Some(2010),
            ..ExitView::default()
        };
        let removed = ExitView::default();
        let failed = ExitView {
            error: Some("boom".into()),
            ..ExitView::default()
        };
        let reply = StopReply {
            stopped: vec![
                view(TaskState::Cancelled, Some(stopped), true),
                view(TaskState::Cancelled, Some(removed), false),
                view(TaskState::Failed, Some(failed), true),
            ],
            stopping: vec![],
        };
        assert_eq!(
            stop_lines(&reply),
            "task T  cancelled (ended by SIGKILL after 2.01 s)\ntask T  cancelled (removed from the queue)\ntask T  failed (boom)"
        );
        assert_eq!(stop_lines(&StopReply::default()), "nothing to stop");
        let step = |step, next, ms| StoppingView {
            task_id: "T".into(),
            step,
            step_at: None,
            next,
            next_in_ms: ms,
        };
        let reply = StopReply {
            stopped: vec![view(TaskState::Stopping, None, true)],
            stopping: vec![step(
                StopStep::CooperativeCancel,
                Some(StopStep::Sigterm),
                Some(4_996),
            )],
        };
        assert_eq!(
            stop_lines(&reply),
            "task T  stopping: cancel sent, SIGTERM in 5 s"
        );
        let s = |st, next, ms| stopping(&step(st, next, ms));
        assert_eq!(
            s(StopStep::Sigterm, Some(StopStep::Sigkill), Some(300)),
            "stopping: SIGTERM sent, SIGKILL in 0.3 s"
        );
        assert_eq!(s(StopStep::Sigkill, None, None), "stopping: SIGKILL sent");
        let term = step(StopStep::Sigterm, Some(StopStep::Sigkill), Some(2_600));
        assert_eq!(
            stop_progress(&term, Some("21:40:01"), Some(Duration::from_millis(1_700))),
            "SIGTERM sent at 21:40:01 (2 s ago), SIGKILL in 3 s"
        );
        let cancel = step(StopStep::CooperativeCancel, None, None);
        assert_eq!(
            stop_progress(&cancel, None, Some(Duration::from_millis(300))),
            "cancel sent 0.3 s ago"
        );
        assert_eq!(stop_progress(&cancel, None, None), "cancel sent");
        assert_eq!(
            duplicate_line(&view(TaskState::Queued, None, false)),
            "task T  already received (queued): not run again"
        );
    }
}
