//! Human-readable output of agentctl: pure functions from control-protocol answers to
//! text (no trailing newline; the caller prints one).
//!
//! Functions that show ages take `now` so that their output is reproducible. Every
//! string that comes from agentd (task text, progress, results, replies) is sanitized:
//! control characters such as terminal escape sequences are replaced by `�`, and in
//! one-line contexts (tables) line breaks become spaces.
//!
//! Colour: task states, table headers and clocks carry ANSI styles (`anstyle`); the
//! caller strips them when stdout is not a terminal or `NO_COLOR` is set (see
//! [`plain`]). Times are shown in a given time zone (the local one in agentctl), and
//! tables show short unique prefixes of task ids unless asked for full ones.

use std::ops::Range;
use std::path::Path;
use std::time::{Duration, SystemTime};

use agentd_proto::control::TaskState;
use agentd_proto::control::{
    EventKind, EventView, ExitView, PingReply, QueueSettingsView, SendReply, StatusReply,
    StopReply, TaskView,
};
use agentd_proto::text;
use anstyle::{AnsiColor, Style};
use jiff::tz::TimeZone;

/// Width of the TEXT column of the tasks table, in characters.
pub const TEXT_WIDTH: usize = 40;

/// Width of the SESSION column of the tasks table, in characters.
pub const SESSION_WIDTH: usize = 32;

/// Width of the excerpt of a dropped message's text, in characters.
pub const EXCERPT_WIDTH: usize = 40;

/// The shortest id prefix a table shows (agentd accepts prefixes of at least 4).
pub const MIN_ID_PREFIX: usize = 8;

/// Indentation of the result lines under a `finished` event line: under `task`.
const EVENT_INDENT: &str = "          ";

/// Answer to `send`: `task <id>  started`, `task <id>  queued: position 1 (1/1 agents
/// busy)`, `task <id>  steered into running task <id>`, or, for control commands typed
/// as chat text (`/status`…), the reply itself.
///
/// A message delivered again: `task <id>  already received (<outcome>): not run
/// again`.
///
/// Then, each on its own line, what else the answer says:
///
/// ```text
///   dropped to make room: task <id>  <text excerpt>
///   note: <notice>
/// ```
pub fn render_send(reply: &SendReply) -> String {
    let mut out = match &reply.task {
        Some(task) if reply.duplicate => clean_block(&text::duplicate_line(task)),
        Some(task) if reply.accepted && reply.command.is_none() => {
            let mut out = send_preamble(reply, task)
                .map(|lines| format!("{}\n", clean_block(lines)))
                .unwrap_or_default();
            out.push_str(&clean_block(&text::send_line(
                task,
                reply.capacity,
                reply.steered_into.as_deref(),
            )));
            out
        }
        _ => clean_block(&reply.reply),
    };
    let mut line = |l: String| {
        out.push('\n');
        out.push_str(&l);
    };
    for dropped in &reply.dropped {
        line(format!(
            "  {}",
            text::dropped_line(
                clean_line(&dropped.task_id),
                truncate(&clean_line(&dropped.text), EXCERPT_WIDTH)
            )
        ));
    }
    if let Some(notice) = &reply.notice {
        line(format!("  {}", text::note_line(&clean_line(notice))));
    }
    out
}

/// The lines of agentd's `reply` before the line about the new task (`resuming task
/// … as a new attempt:`), if there are any.
fn send_preamble<'a>(reply: &'a SendReply, task: &TaskView) -> Option<&'a str> {
    let head = format!("task {}", task.task_id);
    let at = reply
        .reply
        .match_indices(&head)
        .map(|(at, _)| at)
        .find(|&at| at == 0 || reply.reply[..at].ends_with('\n'))?;
    let preamble = reply.reply[..at].trim_end_matches('\n');
    (!preamble.is_empty()).then_some(preamble)
}

/// What `agentctl chat` prints of a `send` answer: for accepted work, whose own line
/// comes as events, only the other lines ([`render_send`] less the task's line).
pub fn render_send_in_chat(reply: &SendReply) -> Vec<String> {
    let text = render_send(reply);
    let work = reply.accepted && reply.command.is_none() && !reply.duplicate;
    let skip = match (&reply.task, work) {
        (Some(task), true) => send_preamble(reply, task).map_or(0, |p| p.lines().count()),
        _ => return text.lines().map(str::to_string).collect(),
    };
    text.lines()
        .enumerate()
        .filter(|&(i, _)| i != skip)
        .map(|(_, line)| line.to_string())
        .collect()
}

/// An error agentd answered a chat line with (`agentctl chat`), as the chat's
/// reply: its message, on lines of their own.
pub fn render_chat_error(message: &str) -> String {
    clean_block(message)
}

/// `  merged into task <id>`: a message went into another task (`send`, `send
/// --wait`).
pub fn render_merged_into(task_id: &str) -> String {
    format!("  merged into task {}", clean_line(task_id))
}

/// A progress line of `send --wait`: `  <text>`.
pub fn render_progress(progress: &str) -> String {
    format!("  {}", clean_line(progress))
}

/// The end of `send --wait`: `task <id>  <outcome>` (see [`text::outcome`]) and how
/// long it took (`(waited 2s, ran 1.20 s)`, from agentd's timestamps), then the
/// result, if any, on the following lines, less its lines `shown` (already printed
/// as progress, see [`shown_lines`]).
pub fn render_wait_end(task: &TaskView, shown: Range<usize>) -> String {
    let mut out = format!(
        "task {}  {}",
        clean_line(&task.task_id),
        paint(state_style(task.state), &clean_line(&text::outcome(task)))
    );
    if let Some(took) = took(task) {
        out.push_str(&format!(" ({took})"));
    }
    let result = task.result.as_deref().map(clean_block).unwrap_or_default();
    for (_, line) in result
        .lines()
        .enumerate()
        .filter(|(i, _)| !shown.contains(i))
    {
        out.push('\n');
        out.push_str(line);
    }
    out
}

/// Which lines of `result` are the progress lines already shown (`shown`, in order;
/// `"\0"` marks a gap, where lines were skipped), so that output printed as progress
/// is not printed again.
///
/// The shown lines are one run of the output, and the result (agent-exec: the tail
/// of the output) holds it from its start when the client saw the task from its
/// start; from further on when it followed the task from the middle (a message
/// steered or merged into a running task); or only its end when the output was
/// longer than the result keeps. The longest such overlap wins; the run ends at the
/// end of either text or at a gap.
pub fn shown_lines(shown: &[String], result: &str) -> Range<usize> {
    let cleaned = clean_block(result);
    let lines: Vec<String> = cleaned.lines().map(clean_line).collect();
    let progress: Vec<Option<String>> = shown
        .iter()
        .map(|p| (p != "\0").then(|| clean_line(p)))
        .collect();
    // The length of the common run of lines[at..] and progress[from..], if it is a
    // whole overlap: it reaches the end of either, or a gap.
    let overlap = |at: usize, from: usize| -> Option<usize> {
        let n = lines[at..]
            .iter()
            .zip(&progress[from..])
            .take_while(|(line, p)| p.as_deref() == Some(line.as_str()))
            .count();
        let whole =
            at + n == lines.len() || from + n == progress.len() || progress[from + n].is_none();
        (n > 0 && whole).then_some(n)
    };
    let mut best = 0..0;
    // The shown lines from their first, somewhere in the result.
    for at in 0..lines.len() {
        if let Some(n) = overlap(at, 0).filter(|n| *n > best.len()) {
            best = at..at + n;
        }
    }
    // The result starts inside the shown lines (its start was cut off).
    for from in 1..progress.len() {
        if let Some(n) = overlap(0, from).filter(|n| *n > best.len()) {
            best = 0..n;
        }
    }
    best
}

/// Answer to `queue`: `session <S>: mode collect, debounce 1s, cap 20, drop
/// summarize`, with ` (defaults)` when the session has no settings of its own.
pub fn render_queue(settings: &QueueSettingsView) -> String {
    text::settings_line(&QueueSettingsView {
        session: clean_line(&settings.session),
        ..settings.clone()
    })
}

/// One event of `watch`, received at `at`: `HH:MM:SS  task <id>  <what>` (the time
/// of day in `tz`), where `<what>` is one of
///
/// ```text
/// accepted (queued, position 2)     accepted (starting)
/// position 1
/// started
/// progress: <text>
/// steered: <text>                   steered into <id>: <text>
/// merged into <id>
/// dropped                           dropped: <note>
/// expired                           expired: <note>
/// finished: <outcome> (ran 1.20 s)
/// ```
///
/// and a `finished` event's result follows on the next lines, indented under `task`,
/// less its lines `shown` (already printed as progress, see [`shown_lines`]).
pub fn render_event(
    event: &EventView,
    at: SystemTime,
    tz: &TimeZone,
    shown: Range<usize>,
) -> String {
    let task = event.task.as_ref();
    let text = event.text.as_deref().map(clean_line);
    let with_text = |what: &str| match &text {
        Some(t) => format!("{what}: {t}"),
        None => what.to_string(),
    };
    let position = event.position.or(task.and_then(|t| t.position));
    let what = match event.kind {
        EventKind::Accepted => {
            let mut details: Vec<String> = task.map(|t| t.state.to_string()).into_iter().collect();
            details.extend(position.map(|p| format!("position {p}")));
            if details.is_empty() {
                "accepted".to_string()
            } else {
                format!("accepted ({})", details.join(", "))
            }
        }
        EventKind::Position => match position {
            Some(p) => format!("position {p}"),
            None => "position changed".to_string(),
        },
        EventKind::Started => "started".to_string(),
        EventKind::Progress => with_text("progress"),
        EventKind::Steered => match &event.into {
            Some(into) if *into != event.task_id => {
                with_text(&format!("steered into {}", clean_line(into)))
            }
            _ => with_text("steered"),
        },
        EventKind::Merged => {
            match event
                .into
                .as_ref()
                .or(task.and_then(|t| t.merged_into.as_ref()))
            {
                Some(into) => format!("merged into {}", clean_line(into)),
                None => "merged".to_string(),
            }
        }
        EventKind::Dropped => with_text("dropped"),
        EventKind::Expired => with_text("expired"),
        EventKind::Finished => match task {
            Some(t) => {
                let mut what = format!(
                    "finished: {}",
                    paint(state_style(t.state), &clean_line(&text::outcome(t)))
                );
                if let Some(ran) = ran(t) {
                    what.push_str(&format!(" (ran {})", format_seconds(ran)));
                }
                what
            }
            None => "finished".to_string(),
        },
    };
    let mut out = format!(
        "{}  task {}  {what}",
        paint(Style::new().dimmed(), &clock(at, tz)),
        clean_line(&event.task_id)
    );
    if event.kind == EventKind::Finished {
        let result = task
            .and_then(|t| t.result.as_deref())
            .map(clean_block)
            .unwrap_or_default();
        for (_, line) in result
            .lines()
            .enumerate()
            .filter(|(i, _)| !shown.contains(i))
        {
            out.push('\n');
            out.push_str(format!("{EVENT_INDENT}{line}").trim_end());
        }
    }
    out
}

/// `HH:MM:SS` of `at`, in `tz`.
pub fn clock(at: SystemTime, tz: &TimeZone) -> String {
    match jiff::Timestamp::try_from(at) {
        Ok(t) => t.to_zoned(tz.clone()).strftime("%H:%M:%S").to_string(),
        Err(_) => "--:--:--".to_string(),
    }
}

/// An agentd timestamp in `tz`: `2024-05-01 12:00:00 CEST` (as sent if it cannot be
/// parsed).
pub fn local_time(stamp: &str, tz: &TimeZone) -> String {
    parse_timestamp(stamp)
        .and_then(|at| jiff::Timestamp::try_from(at).ok())
        .map(|t| {
            t.to_zoned(tz.clone())
                .strftime("%Y-%m-%d %H:%M:%S %Z")
                .to_string()
        })
        .unwrap_or_else(|| clean_line(stamp))
}

/// `waited 2s, ran 1.20 s` (the wait only if it was a second or more), from an
/// ended task's timestamps.
fn took(task: &TaskView) -> Option<String> {
    let ran = ran(task)?;
    let created = parse_timestamp(&task.created_at);
    let started = task.started_at.as_deref().and_then(parse_timestamp);
    let waited = created.zip(started).and_then(|(c, s)| since(c, s));
    Some(match waited {
        Some(w) if w >= Duration::from_secs(1) => {
            format!("waited {}, ran {}", format_duration(w), format_seconds(ran))
        }
        _ => format!("ran {}", format_seconds(ran)),
    })
}

/// How long an ended task ran, from its timestamps.
fn ran(task: &TaskView) -> Option<Duration> {
    let started = task.started_at.as_deref().and_then(parse_timestamp)?;
    let finished = task.finished_at.as_deref().and_then(parse_timestamp)?;
    since(started, finished)
}

/// The style of a task state: green for success, red for failure, yellow for
/// stopped or dropped work, cyan for work under way.
pub fn state_style(state: TaskState) -> Style {
    let colour = match state {
        TaskState::Succeeded => AnsiColor::Green,
        TaskState::Failed | TaskState::Interrupted | TaskState::Expired => AnsiColor::Red,
        TaskState::Cancelled | TaskState::Dropped | TaskState::Stopping => AnsiColor::Yellow,
        TaskState::Starting | TaskState::Running => AnsiColor::Cyan,
        TaskState::Queued | TaskState::Merged => return Style::new(),
    };
    Style::new().fg_color(Some(colour.into()))
}

/// `text` in `style` (ANSI escapes around it).
pub fn paint(style: Style, text: &str) -> String {
    if text.is_empty() || style == Style::new() {
        text.to_string()
    } else {
        format!("{style}{text}{style:#}")
    }
}

/// `s` without ANSI styles: what is printed when colour is off.
pub fn plain(s: &str) -> String {
    anstream::adapter::strip_str(s).to_string()
}

/// The shortest prefix of each id, at least [`MIN_ID_PREFIX`] characters, that no
/// other id of `ids` shares (not ending on a `-`); ids shorter than that are kept.
pub fn short_ids(ids: &[&str]) -> Vec<String> {
    ids.iter()
        .map(|id| {
            let common = ids
                .iter()
                .filter(|other| *other != id)
                .map(|other| {
                    id.chars()
                        .zip(other.chars())
                        .take_while(|(a, b)| a == b)
                        .count()
                })
                .max()
                .unwrap_or(0);
            let chars: Vec<char> = id.chars().collect();
            let mut len = (common + 1).max(MIN_ID_PREFIX).min(chars.len());
            while len < chars.len() && chars[len - 1] == '-' {
                len += 1;
            }
            chars[..len].iter().collect()
        })
        .collect()
}

/// Answer to `ping`: `agentd 0.1.0 is running at <socket> (pid N, up 3s)`.
pub fn render_ping(reply: &PingReply, socket: &Path) -> String {
    format!(
        "{} is running at {} (pid {}, up {})",
        server_name(&reply.version),
        socket.display(),
        reply.pid,
        format_duration(Duration::from_millis(reply.uptime_ms)),
    )
}

/// Answer to `status`: one summary line, then the active tasks as a table (see
/// [`render_tasks`]).
pub fn render_status(reply: &StatusReply, now: SystemTime, full_ids: bool) -> String {
    let mut out = format!(
        "{} (pid {}, up {}): {}/{} agents busy, {} queued, {} {}",
        server_name(&reply.version),
        reply.pid,
        format_duration(Duration::from_millis(reply.uptime_ms)),
        reply.capacity.busy,
        reply.capacity.max,
        reply.queued,
        reply.sessions,
        if reply.sessions == 1 {
            "session"
        } else {
            "sessions"
        },
    );
    if let Some(containment) = &reply.containment {
        out.push('\n');
        out.push_str(&text::containment_line(containment));
    }
    if let Some(liveness) = &reply.liveness {
        out.push('\n');
        out.push_str(&text::liveness_line(liveness));
    }
    if let Some(r) = &reply.recovery {
        out.push('\n');
        out.push_str(&agentd_proto::text::recovery_line(
            r.queued,
            r.over_limits,
            r.interrupted,
            r.killed,
            r.crashed,
        ));
    }
    if !reply.active.is_empty() {
        out.push('\n');
        out.push_str(&render_tasks(&reply.active, now, full_ids));
    }
    out
}

/// Answer to `tasks`: a table (ID, SESSION, STATE, POS, AGE/DURATION, TEXT), or
/// `no tasks`.
///
/// AGE/DURATION is how long a queued task has waited, how long an active task has
/// run, and for an ended task how long it ran (or waited, if it never started).
///
/// IDs are the shortest unique prefixes among the listed tasks (see [`short_ids`]),
/// which agentd accepts wherever a task id is expected; full ones with `full_ids`.
pub fn render_tasks(tasks: &[TaskView], now: SystemTime, full_ids: bool) -> String {
    if tasks.is_empty() {
        return "no tasks".to_string();
    }
    let header = ["ID", "SESSION", "STATE", "POS", "AGE/DURATION", "TEXT"].map(String::from);
    let ids: Vec<String> = tasks.iter().map(|t| clean_line(&t.task_id)).collect();
    let ids = if full_ids {
        ids
    } else {
        short_ids(&ids.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let rows: Vec<[String; 6]> = tasks
        .iter()
        .zip(ids)
        .map(|(t, id)| {
            [
                id,
                truncate(&clean_line(&t.session), SESSION_WIDTH),
                t.state.to_string(),
                t.position
                    .map_or_else(|| "-".to_string(), |p| p.to_string()),
                task_time(t, now).map_or_else(|| "-".to_string(), format_duration),
                truncate(&clean_line(&t.text), TEXT_WIDTH),
            ]
        })
        .collect();
    let mut widths = [0usize; 6];
    for row in std::iter::once(&header).chain(&rows) {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let states = std::iter::once(None).chain(tasks.iter().map(|t| Some(t.state)));
    std::iter::once(&header)
        .chain(&rows)
        .zip(states)
        .map(|(row, state)| {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let style = match state {
                    None => Style::new().bold(),
                    Some(state) if i == 2 => state_style(state),
                    Some(_) => Style::new(),
                };
                line.push_str(&paint(style, cell));
                if i + 1 < row.len() {
                    // Padded by characters, as the widths are counted, outside the style.
                    line.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
                }
            }
            line.trim_end().to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Answer to `status TASK_ID`: a short detail view of one task, times in `tz`.
pub fn render_task(task: &TaskView, now: SystemTime, tz: &TimeZone) -> String {
    let created = parse_timestamp(&task.created_at);
    let started = task.started_at.as_deref().and_then(parse_timestamp);
    let finished = task.finished_at.as_deref().and_then(parse_timestamp);

    let mut out = format!("task {}", clean_line(&task.task_id));
    // `label     value`, continuation lines indented under the value.
    let mut field = |label: &str, value: &str| {
        let mut label = label;
        for line in value.lines().chain(value.is_empty().then_some("")) {
            out.push_str(format!("\n  {label:<9} {line}").trim_end());
            label = "";
        }
    };

    field(
        "state",
        &paint(state_style(task.state), task.state.as_str()),
    );
    field("session", &clean_line(&task.session));
    if let Some(position) = task.position {
        field("position", &position.to_string());
    }
    if let Some(pid) = task.pid {
        field("pid", &pid.to_string());
    }
    let mut created_line = local_time(&task.created_at, tz);
    if let Some(age) = created.and_then(|c| since(c, now)) {
        created_line.push_str(&format!(" ({} ago)", format_duration(age)));
    }
    field("created", &created_line);
    if let Some(at) = &task.started_at {
        let mut line = local_time(at, tz);
        if let Some(waited) = created.zip(started).and_then(|(c, s)| since(c, s)) {
            line.push_str(&format!(" (waited {})", format_duration(waited)));
        }
        field("started", &line);
    }
    if let Some(at) = &task.finished_at {
        let mut line = local_time(at, tz);
        if let Some(ran) = started.zip(finished).and_then(|(s, f)| since(s, f)) {
            line.push_str(&format!(" (ran {})", format_duration(ran)));
        }
        field("finished", &line);
    }
    if let Some(stop) = task
        .stopping
        .as_ref()
        .filter(|_| task.state == TaskState::Stopping)
    {
        let at = stop.step_at.as_deref();
        let ago = at.and_then(parse_timestamp).and_then(|at| since(at, now));
        let at = at.map(|at| local_time(at, tz));
        field(
            "stop",
            &clean_line(&text::stop_progress(stop, at.as_deref(), ago)),
        );
    }
    field("text", &clean_block(&task.text));
    if let Some(progress) = &task.progress {
        field("progress", &clean_block(progress));
    }
    if let Some(result) = &task.result {
        field("result", &clean_block(result));
    }
    if let Some(exit) = &task.exit {
        let described = describe_exit(exit);
        if !described.is_empty() {
            field("exit", &described);
        }
    }
    out
}

/// Answer to `stop`: one line per stopped task, or `nothing to stop`.
///
/// `task <id>  cancelled (ended by cooperative cancel after 0.04 s)`, or for a task
/// that had not started, `task <id>  cancelled (removed from the queue)`.
pub fn render_stop(reply: &StopReply) -> String {
    clean_block(&text::stop_lines(reply))
}

/// How a task ended, in one line: the stop step and its time, then the agent's and
/// the wrapped command's exit, then agentd's error; parts separated by `; `. Empty
/// when nothing is known.
///
/// e.g. `ended by SIGKILL after 2.01 s; agent killed by SIGKILL`.
pub fn describe_exit(exit: &ExitView) -> String {
    let mut parts = Vec::new();
    if exit.ended_by.is_some() {
        parts.push(describe_stop(exit));
    }
    if let Some(code) = exit.code {
        parts.push(format!("agent exited with code {code}"));
    }
    if let Some(signal) = exit.signal {
        parts.push(format!("agent killed by {}", signal_name(signal)));
    }
    if let Some(code) = exit.command_code {
        parts.push(format!("command exited with code {code}"));
    }
    if let Some(signal) = exit.command_signal {
        parts.push(format!("command killed by {}", signal_name(signal)));
    }
    if let Some(error) = &exit.error {
        parts.push(format!("error: {}", clean_line(error)));
    }
    if let Some(reason) = &exit.reason {
        parts.push(format!("interrupted: {}", clean_line(reason)));
    }
    parts.join("; ")
}

/// `ended by <step> after <time>` (or without the time if agentd did not send it).
fn describe_stop(exit: &ExitView) -> String {
    let step = exit.ended_by.map_or("stop", agentd_proto::text::stop_step);
    match exit.stop_ms {
        Some(ms) => format!(
            "ended by {step} after {}",
            format_seconds(Duration::from_millis(ms))
        ),
        None => format!("ended by {step}"),
    }
}

/// A coarse duration: the two largest non-zero units, e.g. `45s`, `2m 3s`, `1h 5m`,
/// `3d 4h`; `0s` for less than a second.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let (days, hours, minutes, seconds) =
        (secs / 86_400, secs / 3_600 % 24, secs / 60 % 60, secs % 60);
    let two = |big: u64, big_unit: &str, small: u64, small_unit: &str| {
        if small == 0 {
            format!("{big}{big_unit}")
        } else {
            format!("{big}{big_unit} {small}{small_unit}")
        }
    };
    if days > 0 {
        two(days, "d", hours, "h")
    } else if hours > 0 {
        two(hours, "h", minutes, "m")
    } else if minutes > 0 {
        two(minutes, "m", seconds, "s")
    } else {
        format!("{seconds}s")
    }
}

pub use agentd_proto::text::format_seconds;

/// Parses an RFC 3339 timestamp as agentd sends it (`2024-05-01T10:00:00.123Z`; a
/// numeric offset such as `+02:00` is also accepted).
pub fn parse_timestamp(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Some(t);
    }
    // `…±HH:MM`: humantime only knows UTC, so shift by hand.
    let split = s.len().checked_sub(6)?;
    let (base, offset) = (s.get(..split)?, s.get(split..)?.as_bytes());
    let sign = offset[0];
    if !(sign == b'+' || sign == b'-') || offset[3] != b':' {
        return None;
    }
    let digits = |b: &[u8]| -> Option<u64> {
        std::str::from_utf8(b)
            .ok()
            .filter(|d| d.bytes().all(|c| c.is_ascii_digit()))?
            .parse()
            .ok()
    };
    let shift = Duration::from_secs(digits(&offset[1..3])? * 3_600 + digits(&offset[4..6])? * 60);
    let local = humantime::parse_rfc3339_weak(base).ok()?;
    if sign == b'+' {
        local.checked_sub(shift)
    } else {
        local.checked_add(shift)
    }
}

/// The AGE/DURATION column: see [`render_tasks`].
fn task_time(task: &TaskView, now: SystemTime) -> Option<Duration> {
    let created = parse_timestamp(&task.created_at);
    let started = task.started_at.as_deref().and_then(parse_timestamp);
    let finished = task.finished_at.as_deref().and_then(parse_timestamp);
    let from = started.or(created)?;
    let to = if task.state.is_terminal() {
        finished?
    } else {
        now
    };
    since(from, to)
}

/// `to - from`, zero if the clocks disagree.
fn since(from: SystemTime, to: SystemTime) -> Option<Duration> {
    Some(to.duration_since(from).unwrap_or(Duration::ZERO))
}

/// `agentd <version>`, whether agentd sent `0.1.0` or `agentd 0.1.0`.
fn server_name(version: &str) -> String {
    let version = clean_line(version);
    if version.starts_with("agentd") {
        version
    } else {
        format!("agentd {version}")
    }
}

/// `SIGKILL` for 9, etc. (Linux numbering); `signal N` for others.
fn signal_name(signal: i32) -> String {
    let name = match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return format!("signal {signal}"),
    };
    name.to_string()
}

/// Multi-line text: control characters other than newline and tab become `�`,
/// carriage returns and trailing line breaks go.
fn clean_block(s: &str) -> String {
    s.chars()
        .filter(|&c| c != '\r')
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '\u{FFFD}'
            } else {
                c
            }
        })
        .collect::<String>()
        .trim_end_matches('\n')
        .to_string()
}

/// One-line text: runs of whitespace become one space, control characters `�`.
fn clean_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for word in s.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(
            word.chars()
                .map(|c| if c.is_control() { '\u{FFFD}' } else { c }),
        );
    }
    out
}

/// At most `max` characters, the last one `…` when something was cut.
fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentd_proto::control::{
        Capacity, DropPolicy, EventKind, EventView, QueueMode, StopStep, TaskState,
    };

    const ID1: &str = "01900000-0000-7000-8000-000000000001";
    const ID2: &str = "01900000-0000-7000-8000-000000000002";
    const ID3: &str = "01900000-0000-7000-8000-000000000003";

    fn now() -> SystemTime {
        parse_timestamp("2024-05-01T10:05:00Z").unwrap()
    }

    use crate::fixtures::task;

    fn running() -> TaskView {
        TaskView {
            pid: Some(4242),
            started_at: Some("2024-05-01T10:00:01.500Z".into()),
            progress: Some("compiling crate 3/7".into()),
            ..task(ID1, "alice", TaskState::Running, "fix the build")
        }
    }

    fn queued() -> TaskView {
        TaskView {
            position: Some(1),
            created_at: "2024-05-01T10:04:30Z".into(),
            ..task(
                ID2,
                "telegram:1234567",
                TaskState::Queued,
                "write a long report about\nthe state of the \x1b[31mproject",
            )
        }
    }

    fn killed() -> TaskView {
        TaskView {
            started_at: Some("2024-05-01T10:00:01Z".into()),
            finished_at: Some("2024-05-01T10:02:04Z".into()),
            result: Some("partial: 2 of 3 files\nupdated".into()),
            exit: Some(ExitView {
                signal: Some(9),
                ended_by: Some(StopStep::Sigkill),
                stop_ms: Some(2_010),
                ..ExitView::default()
            }),
            ..task(ID3, "bob", TaskState::Cancelled, "refactor")
        }
    }

    fn send_reply(task: Option<TaskView>) -> SendReply {
        SendReply {
            reply: "ignored".into(),
            accepted: true,
            task,
            capacity: Some(Capacity { busy: 1, max: 1 }),
            command: None,
            data: None,
            duplicate: false,
            dropped: vec![],
            notice: None,
            steered_into: None,
        }
    }

    #[test]
    fn send_started_and_queued() {
        assert_eq!(
            render_send(&send_reply(Some(running()))),
            format!("task {ID1}  started")
        );
        assert_eq!(
            render_send(&send_reply(Some(queued()))),
            format!("task {ID2}  queued: position 1 (1/1 agents busy)")
        );
        let kept = SendReply {
            steered_into: Some(ID1.into()),
            ..send_reply(Some(queued()))
        };
        assert_eq!(
            render_send(&kept),
            format!(
                "task {ID2}  steered into running task {ID1} and kept as a follow-up: position 1 (1/1 agents busy)"
            )
        );
    }

    #[test]
    fn send_control_commands_print_the_reply() {
        let reply = SendReply {
            reply: "agentd 0.1.0: 1/1 agents busy\nyour task: running\n".into(),
            accepted: false,
            task: None,
            capacity: None,
            command: Some("status".into()),
            data: Some(serde_json::json!({})),
            duplicate: false,
            dropped: vec![],
            notice: None,
            steered_into: None,
        };
        assert_eq!(
            render_send(&reply),
            "agentd 0.1.0: 1/1 agents busy\nyour task: running"
        );
    }

    #[test]
    fn send_extra_lines() {
        let reply = SendReply {
            duplicate: true,
            dropped: vec![
                TaskView {
                    text: "first\nheld   message".into(),
                    ..task(ID1, "alice", TaskState::Dropped, "")
                },
                task(
                    ID3,
                    "alice",
                    TaskState::Dropped,
                    "a message long enough to be cut short at forty characters",
                ),
            ],
            notice: Some("agent cannot be steered: queued as a follow-up\n".into()),
            ..send_reply(Some(queued()))
        };
        assert_eq!(
            render_send(&reply),
            format!(
                "task {ID2}  already received (queued): not run again\n  \
                 dropped to make room: task {ID1}  first held message\n  \
                 dropped to make room: task {ID3}  a message long enough to be cut short a…\n  \
                 note: agent cannot be steered: queued as a follow-up"
            )
        );
        let merged = TaskView {
            merged_into: Some(ID1.into()),
            ..task(ID2, "alice", TaskState::Merged, "and also this")
        };
        assert_eq!(
            render_send(&send_reply(Some(merged))),
            format!("task {ID2}  steered into running task {ID1}")
        );
        // A control command with a notice.
        let reply = SendReply {
            reply: "nothing to stop".into(),
            accepted: false,
            command: Some("stop".into()),
            notice: Some("try /tasks".into()),
            ..send_reply(None)
        };
        assert_eq!(render_send(&reply), "nothing to stop\n  note: try /tasks");
    }

    #[test]
    fn a_resume_says_so_before_the_new_attempt() {
        let reply = SendReply {
            reply: format!(
                "resuming task {ID1} from its last checkpoint, as a new attempt:\ntask {ID2}  \
                 queued: position 1 (1/1 agents busy)\nnote: something"
            ),
            notice: Some("something".into()),
            ..send_reply(Some(queued()))
        };
        let first = format!("resuming task {ID1} from its last checkpoint, as a new attempt:");
        assert_eq!(
            render_send(&reply),
            format!("{first}\ntask {ID2}  queued: position 1 (1/1 agents busy)\n  note: something")
        );
        // In a chat the task's own line comes as events.
        assert_eq!(
            render_send_in_chat(&reply),
            [first, "  note: something".to_string()]
        );
        // Without a preamble, as before.
        let plain = send_reply(Some(queued()));
        assert_eq!(
            render_send(&plain),
            format!("task {ID2}  queued: position 1 (1/1 agents busy)")
        );
        assert!(render_send_in_chat(&plain).is_empty());
    }

    #[test]
    fn wait_lines() {
        assert_eq!(render_progress("step 2/3\r\n"), "  step 2/3");
        assert_eq!(render_merged_into(ID1), format!("  merged into task {ID1}"));
        assert_eq!(
            plain(&render_wait_end(&killed(), 0..0)),
            format!(
                "task {ID3}  cancelled (ended by SIGKILL after 2.01 s) (waited 1s, ran 2m 3s)\n\
                 partial: 2 of 3 files\nupdated"
            )
        );
        let done = TaskView {
            result: Some("\n".into()),
            ..task(ID1, "a", TaskState::Succeeded, "x")
        };
        assert_eq!(
            plain(&render_wait_end(&done, 0..0)),
            format!("task {ID1}  succeeded")
        );
    }

    #[test]
    fn queue_settings_line() {
        let mut settings = QueueSettingsView {
            session: "telegram:42".into(),
            mode: QueueMode::SteerBacklog,
            debounce_ms: 2_500,
            cap: 25,
            drop: DropPolicy::New,
            custom: true,
        };
        assert_eq!(
            render_queue(&settings),
            "session telegram:42: mode steer-backlog, debounce 2s 500ms, cap 25, drop new"
        );
        settings = QueueSettingsView {
            mode: QueueMode::Collect,
            debounce_ms: 1_000,
            cap: 20,
            drop: DropPolicy::Summarize,
            custom: false,
            ..settings
        };
        assert_eq!(
            render_queue(&settings),
            "session telegram:42: mode collect, debounce 1s, cap 20, drop summarize (defaults)"
        );
        settings.debounce_ms = 0;
        assert!(render_queue(&settings).contains("debounce 0s,"));
    }

    #[test]
    fn watch_event_lines() {
        let at = parse_timestamp("2024-05-01T10:05:07.900Z").unwrap();
        let event = |kind: EventKind| EventView {
            kind,
            task_id: ID1.into(),
            session: "alice".into(),
            position: None,
            text: None,
            into: None,
            task: None,
            at: None,
        };
        let cases = [
            (
                EventView {
                    position: Some(2),
                    task: Some(TaskView {
                        position: Some(2),
                        ..task(ID1, "alice", TaskState::Queued, "x")
                    }),
                    ..event(EventKind::Accepted)
                },
                "accepted (queued, position 2)",
            ),
            (
                EventView {
                    task: Some(task(ID1, "alice", TaskState::Starting, "x")),
                    ..event(EventKind::Accepted)
                },
                "accepted (starting)",
            ),
            (event(EventKind::Accepted), "accepted"),
            (
                EventView {
                    position: Some(1),
                    ..event(EventKind::Position)
                },
                "position 1",
            ),
            (event(EventKind::Started), "started"),
            (
                EventView {
                    text: Some("linking\x07".into()),
                    ..event(EventKind::Progress)
                },
                "progress: linking\u{FFFD}",
            ),
            (
                EventView {
                    text: Some("use the other API".into()),
                    ..event(EventKind::Steered)
                },
                "steered: use the other API",
            ),
            (
                EventView {
                    text: Some("use the other API".into()),
                    into: Some(ID2.into()),
                    ..event(EventKind::Steered)
                },
                &format!("steered into {ID2}: use the other API"),
            ),
            (
                EventView {
                    into: Some(ID2.into()),
                    ..event(EventKind::Merged)
                },
                &format!("merged into {ID2}"),
            ),
            (
                EventView {
                    task: Some(TaskView {
                        merged_into: Some(ID3.into()),
                        ..task(ID1, "alice", TaskState::Merged, "x")
                    }),
                    ..event(EventKind::Merged)
                },
                &format!("merged into {ID3}"),
            ),
            (event(EventKind::Dropped), "dropped"),
            (
                EventView {
                    text: Some("cap 20 reached".into()),
                    ..event(EventKind::Dropped)
                },
                "dropped: cap 20 reached",
            ),
            (event(EventKind::Expired), "expired"),
            (event(EventKind::Finished), "finished"),
            (
                EventView {
                    task: Some(TaskView {
                        started_at: None,
                        ..task(ID1, "alice", TaskState::Cancelled, "x")
                    }),
                    ..event(EventKind::Finished)
                },
                "finished: cancelled (removed from the queue)",
            ),
        ];
        for (event, what) in cases {
            assert_eq!(
                plain(&render_event(&event, at, &TimeZone::UTC, 0..0)),
                format!("10:05:07  task {ID1}  {what}"),
                "{event:?}"
            );
        }
        let done = EventView {
            task: Some(killed()),
            ..event(EventKind::Finished)
        };
        assert_eq!(
            plain(&render_event(&done, at, &TimeZone::UTC, 0..0)),
            format!(
                "10:05:07  task {ID1}  finished: cancelled (ended by SIGKILL after 2.01 s) (ran 2m 3s)\n          \
                 partial: 2 of 3 files\n          \
                 updated"
            )
        );
        assert_eq!(
            clock(
                parse_timestamp("2024-05-01T23:59:59Z").unwrap(),
                &TimeZone::UTC
            ),
            "23:59:59"
        );
    }

    #[test]
    fn ping_line() {
        let pong = PingReply {
            pong: true,
            version: "0.1.0".into(),
            pid: 77,
            uptime_ms: 3_400,
        };
        assert_eq!(
            render_ping(&pong, Path::new("/run/user/1000/agentd/agentd.sock")),
            "agentd 0.1.0 is running at /run/user/1000/agentd/agentd.sock (pid 77, up 3s)"
        );
    }

    #[test]
    fn status_summary_and_active_tasks() {
        let mut reply = StatusReply {
            version: "0.1.0".into(),
            pid: 123,
            uptime_ms: 123_000,
            capacity: Capacity { busy: 1, max: 2 },
            queued: 3,
            sessions: 2,
            active: vec![running()],
            containment: None,
            liveness: None,
            recovery: None,
        };
        assert_eq!(
            plain(&render_status(&reply, now(), true)),
            format!(
                "agentd 0.1.0 (pid 123, up 2m 3s): 1/2 agents busy, 3 queued, 2 sessions\n\
                 ID                                    SESSION  STATE    POS  AGE/DURATION  TEXT\n\
                 {ID1}  alice    running  -    4m 58s        fix the build"
            )
        );
        reply.active.clear();
        reply.sessions = 1;
        reply.capacity.busy = 0;
        reply.queued = 0;
        assert_eq!(
            plain(&render_status(&reply, now(), true)),
            "agentd 0.1.0 (pid 123, up 2m 3s): 0/2 agents busy, 0 queued, 1 session"
        );
        reply.recovery = Some(agentd_proto::control::RecoveryView {
            queued: 30,
            over_limits: 0,
            interrupted: 1,
            killed: 0,
            crashed: true,
        });
        assert_eq!(
            plain(&render_status(&reply, now(), true)),
            "agentd 0.1.0 (pid 123, up 2m 3s): 0/2 agents busy, 0 queued, 1 session\n\
             recovered 30 queued, 1 interrupted (the previous agentd crashed)"
        );
        if let Some(r) = reply.recovery.as_mut() {
            r.killed = 1;
        }
        assert!(
            plain(&render_status(&reply, now(), true))
                .ends_with(", 1 interrupted, ended 1 leftover agent (the previous agentd crashed)"),
            "one agent"
        );
        if let Some(r) = reply.recovery.as_mut() {
            r.over_limits = 4;
            r.crashed = false;
            r.killed = 0;
        }
        assert_eq!(
            plain(&render_status(&reply, now(), true)).lines().nth(1),
            Some(
                "recovered 30 queued (4 over the limits, queued anyway: they were accepted \
                 before), 1 interrupted"
            )
        );
    }

    #[test]
    fn tasks_table() {
        let table = plain(&render_tasks(&[running(), queued(), killed()], now(), true));
        let expected = format!(
            "ID                                    SESSION           STATE      POS  AGE/DURATION  TEXT\n\
             {ID1}  alice             running    -    4m 58s        fix the build\n\
             {ID2}  telegram:1234567  queued     1    30s           write a long report about the state of …\n\
             {ID3}  bob               cancelled  -    2m 3s         refactor"
        );
        assert_eq!(table, expected);
        assert_eq!(render_tasks(&[], now(), false), "no tasks");
    }

    #[test]
    fn task_detail_of_a_killed_task() {
        assert_eq!(
            plain(&render_task(&killed(), now(), &TimeZone::UTC)),
            format!(
                "task {ID3}\n  \
                 state     cancelled\n  \
                 session   bob\n  \
                 created   2024-05-01 10:00:00 UTC (5m ago)\n  \
                 started   2024-05-01 10:00:01 UTC (waited 1s)\n  \
                 finished  2024-05-01 10:02:04 UTC (ran 2m 3s)\n  \
                 text      refactor\n  \
                 result    partial: 2 of 3 files\n            \
                 updated\n  \
                 exit      ended by SIGKILL after 2.01 s; agent killed by SIGKILL"
            )
        );
    }

    #[test]
    fn task_detail_of_a_running_task() {
        assert_eq!(
            plain(&render_task(&running(), now(), &TimeZone::UTC)),
            format!(
                "task {ID1}\n  \
                 state     running\n  \
                 session   alice\n  \
                 pid       4242\n  \
                 created   2024-05-01 10:00:00 UTC (5m ago)\n  \
                 started   2024-05-01 10:00:01 UTC (waited 1s)\n  \
                 text      fix the build\n  \
                 progress  compiling crate 3/7"
            )
        );
    }

    #[test]
    fn task_detail_of_a_stopping_task_says_its_step_since_when_and_the_next() {
        let stopping = TaskView {
            state: TaskState::Stopping,
            stopping: Some(agentd_proto::control::StoppingView {
                task_id: ID1.into(),
                step: StopStep::Sigterm,
                step_at: Some("2024-05-01T10:04:58.000Z".into()),
                next: Some(StopStep::Sigkill),
                next_in_ms: Some(2_900),
            }),
            ..running()
        };
        let out = plain(&render_task(&stopping, now(), &TimeZone::UTC));
        assert!(
            out.contains(
                "\n  stop      SIGTERM sent at 2024-05-01 10:04:58 UTC (2 s ago), SIGKILL in 3 s\n"
            ),
            "{out}"
        );
        // A view that is no longer stopping shows no stop line.
        let ended = TaskView {
            state: TaskState::Cancelled,
            ..stopping
        };
        let out = plain(&render_task(&ended, now(), &TimeZone::UTC));
        assert!(!out.contains("  stop "), "{out}");
    }

    #[test]
    fn task_detail_sanitizes_agent_output() {
        let t = queued();
        let out = plain(&render_task(&t, now(), &TimeZone::UTC));
        assert!(!out.contains('\x1b'), "{out}");
        assert!(out.contains(
            "  text      write a long report about\n            the state of the \u{FFFD}[31mproject"
        ));
        assert!(out.contains("  position  1\n"));
        let t = TaskView {
            text: "trailing  \n\n".into(),
            result: Some(String::new()),
            ..task(ID1, "a", TaskState::Queued, "")
        };
        let out = plain(&render_task(&t, now(), &TimeZone::UTC));
        assert!(out.ends_with("\n  text      trailing\n  result"), "{out:?}");
    }

    #[test]
    fn stop_lines() {
        let cooperative = TaskView {
            exit: Some(ExitView {
                code: Some(0),
                ended_by: Some(StopStep::CooperativeCancel),
                stop_ms: Some(40),
                ..ExitView::default()
            }),
            started_at: Some("2024-05-01T10:00:01Z".into()),
            ..task(ID1, "alice", TaskState::Cancelled, "x")
        };
        let removed = TaskView {
            started_at: None,
            ..task(ID2, "alice", TaskState::Cancelled, "y")
        };
        let reply = StopReply {
            stopped: vec![cooperative, removed],
            ..StopReply::default()
        };
        assert_eq!(
            render_stop(&reply),
            format!(
                "task {ID1}  cancelled (ended by cooperative cancel after 0.04 s)\n\
                 task {ID2}  cancelled (removed from the queue)"
            )
        );
        let finished_first = TaskView {
            exit: Some(ExitView {
                code: Some(0),
                ..ExitView::default()
            }),
            started_at: Some("2024-05-01T10:00:01Z".into()),
            ..task(ID3, "bob", TaskState::Succeeded, "z")
        };
        assert_eq!(
            render_stop(&StopReply {
                stopped: vec![finished_first],
                ..StopReply::default()
            }),
            format!("task {ID3}  succeeded")
        );
        assert_eq!(render_stop(&StopReply::default()), "nothing to stop");
    }

    #[test]
    fn exit_descriptions() {
        assert_eq!(describe_exit(&ExitView::default()), "");
        let exit = ExitView {
            code: Some(1),
            command_signal: Some(15),
            error: Some("agent spoke\ngarbage".into()),
            ..ExitView::default()
        };
        assert_eq!(
            describe_exit(&exit),
            "agent exited with code 1; command killed by SIGTERM; error: agent spoke garbage"
        );
        let exit = ExitView {
            ended_by: Some(StopStep::Sigterm),
            command_code: Some(130),
            signal: Some(64),
            ..ExitView::default()
        };
        assert_eq!(
            describe_exit(&exit),
            "ended by SIGTERM; agent killed by signal 64; command exited with code 130"
        );
        let exit = ExitView {
            ended_by: Some(StopStep::CooperativeCancel),
            stop_ms: Some(40),
            code: Some(130),
            reason: Some("a newer message".into()),
            ..ExitView::default()
        };
        assert_eq!(
            describe_exit(&exit),
            "ended by cooperative cancel after 0.04 s; agent exited with code 130; interrupted: a newer message"
        );
    }

    #[test]
    fn durations() {
        let ms = Duration::from_millis;
        assert_eq!(format_seconds(ms(40)), "0.04 s");
        assert_eq!(format_seconds(ms(2_010)), "2.01 s");
        assert_eq!(format_seconds(ms(75_000)), "1m 15s");
        assert_eq!(format_duration(ms(999)), "0s");
        assert_eq!(format_duration(ms(3_000)), "3s");
        assert_eq!(format_duration(ms(123_000)), "2m 3s");
        assert_eq!(format_duration(ms(120_000)), "2m");
        assert_eq!(format_duration(ms(3_900_000)), "1h 5m");
        assert_eq!(format_duration(ms(273_600_000)), "3d 4h");
    }

    #[test]
    fn timestamps() {
        let utc = parse_timestamp("2024-05-01T10:00:00Z").unwrap();
        assert_eq!(parse_timestamp("2024-05-01T12:00:00+02:00"), Some(utc));
        assert_eq!(parse_timestamp("2024-05-01T09:30:00-00:30"), Some(utc));
        assert_eq!(parse_timestamp("2024-05-01T10:00:00+00:00"), Some(utc));
        assert!(parse_timestamp("2024-05-01T10:00:00.25Z").is_some());
        assert_eq!(parse_timestamp("yesterday"), None);
        assert_eq!(parse_timestamp("ééééééé"), None);
        assert_eq!(parse_timestamp(""), None);
    }

    #[test]
    fn unparseable_times_show_as_dashes() {
        let t = TaskView {
            created_at: "sometime".into(),
            ..task(ID1, "a", TaskState::Queued, "x")
        };
        assert!(plain(&render_tasks(&[t], now(), true))
            .ends_with(&format!("{ID1}  a        queued  -    -             x")));
    }
    #[test]
    fn tables_show_short_unique_id_prefixes() {
        let a = "01a230f8-4e0f-7631-818f-51393a280628";
        let b = "01a230f8-50b0-768a-8337-21619a863337";
        let c = "01a230f8-50b1-7000-8000-000000000000";
        assert_eq!(
            short_ids(&[a, b, c]),
            ["01a230f8-4", "01a230f8-50b0", "01a230f8-50b1"]
        );
        // Never shorter than MIN_ID_PREFIX, never ending on a dash.
        assert_eq!(short_ids(&[a]), ["01a230f8"]);
        assert_eq!(
            short_ids(&["01a230f-x", "01a230f-y"]),
            ["01a230f-x", "01a230f-y"]
        );
        assert_eq!(short_ids(&["t-1", "t-2"]), ["t-1", "t-2"]);
        let tasks = [
            task(a, "alice", TaskState::Running, "x"),
            task(b, "alice", TaskState::Queued, "y"),
        ];
        let table = plain(&render_tasks(&tasks, now(), false));
        let ids: Vec<&str> = table
            .lines()
            .map(|l| l.split_whitespace().next().unwrap())
            .collect();
        assert_eq!(ids, ["ID", "01a230f8-4", "01a230f8-5"]);
        let table = plain(&render_tasks(&tasks, now(), true));
        assert!(table.contains(a) && table.contains(b), "{table}");
    }

    #[test]
    fn states_and_headers_are_coloured_and_plain_strips_them() {
        let table = render_tasks(&[running(), killed()], now(), true);
        let bold = Style::new().bold();
        let cyan = Style::new().fg_color(Some(AnsiColor::Cyan.into()));
        let yellow = Style::new().fg_color(Some(AnsiColor::Yellow.into()));
        assert!(
            table.starts_with(&format!("{bold}ID{bold:#}  ")),
            "{table:?}"
        );
        assert!(
            table.contains(&format!("{cyan}running{cyan:#}  ")),
            "{table:?}"
        );
        assert!(
            table.contains(&format!("{yellow}cancelled{yellow:#}  ")),
            "{table:?}"
        );
        // Padding is outside the styles, so columns line up as without colour.
        let stripped = plain(&table);
        assert!(!stripped.contains('\x1b'));
        assert_eq!(
            stripped,
            plain(&render_tasks(&[running(), killed()], now(), true))
        );
        let widths: Vec<usize> = stripped
            .lines()
            .map(|l| {
                l.find("AGE")
                    .or_else(|| l.find("4m").or(l.find("2m")))
                    .unwrap()
            })
            .collect();
        assert!(widths.iter().all(|w| *w == widths[0]), "{stripped}");
        let green = Style::new().fg_color(Some(AnsiColor::Green.into()));
        let done = TaskView {
            result: Some("ok".into()),
            ..task(ID1, "a", TaskState::Succeeded, "x")
        };
        assert_eq!(
            render_wait_end(&done, 0..0),
            format!("task {ID1}  {green}succeeded{green:#}\nok")
        );
        // Agent output cannot smuggle its own escapes in: they are replaced first.
        let evil = TaskView {
            result: Some("\x1b[2J".into()),
            ..done
        };
        assert!(plain(&render_wait_end(&evil, 0..0)).ends_with("\n\u{FFFD}[2J"));
    }

    #[test]
    fn times_are_shown_in_the_given_zone() {
        let kathmandu =
            TimeZone::fixed(jiff::tz::Offset::from_seconds(5 * 3600 + 45 * 60).unwrap());
        let at = parse_timestamp("2024-05-01T23:59:59Z").unwrap();
        assert_eq!(clock(at, &kathmandu), "05:44:59");
        assert_eq!(
            local_time("2024-05-01T10:00:00Z", &kathmandu),
            "2024-05-01 15:45:00 +05:45"
        );
        assert_eq!(local_time("sometime", &kathmandu), "sometime");
        let detail = plain(&render_task(&killed(), now(), &kathmandu));
        assert!(
            detail.contains("  created   2024-05-01 15:45:00 +05:45 (5m ago)\n"),
            "{detail}"
        );
        let event = EventView {
            kind: EventKind::Started,
            task_id: ID1.into(),
            session: "a".into(),
            position: None,
            text: None,
            into: None,
            task: None,
            at: None,
        };
        assert!(plain(&render_event(&event, at, &kathmandu, 0..0)).starts_with("05:44:59  task"));
    }

    #[test]
    fn output_shown_as_progress_is_not_printed_again() {
        let shown = |lines: &[&str]| lines.iter().map(|l| l.to_string()).collect::<Vec<_>>();
        assert_eq!(shown_lines(&shown(&["one", "two"]), "one\ntwo\n"), 0..2);
        assert_eq!(shown_lines(&shown(&["one"]), "one\ntwo"), 0..1);
        assert_eq!(shown_lines(&shown(&["thinking…"]), "the answer"), 0..0);
        assert_eq!(
            shown_lines(&shown(&["one", "\0", "nine"]), "one\ntwo\nnine"),
            0..1
        );
        assert_eq!(
            shown_lines(&shown(&["one", "two", "three"]), "one\ntwo"),
            0..2
        );
        assert_eq!(shown_lines(&[], "one"), 0..0);
        // Followed from the middle (a steered or merged message): the output's start
        // was not shown.
        assert_eq!(
            shown_lines(&shown(&["got yes", "done"]), "building\ngot yes\ndone"),
            1..3
        );
        // A result that keeps only the output's tail.
        assert_eq!(
            shown_lines(&shown(&["1", "2", "3", "4"]), "3\n4\nthe end"),
            0..2
        );
        // A line that only happens to be equal is no overlap.
        assert_eq!(shown_lines(&shown(&["b", "x"]), "a\nb\nc"), 0..0);
        let done = TaskView {
            result: Some("one\ntwo\nthree".into()),
            ..task(ID1, "a", TaskState::Succeeded, "x")
        };
        assert_eq!(
            plain(&render_wait_end(&done, 0..2)),
            format!("task {ID1}  succeeded\nthree")
        );
        assert_eq!(
            plain(&render_wait_end(&done, 0..3)),
            format!("task {ID1}  succeeded")
        );
        assert_eq!(
            plain(&render_wait_end(&done, 1..3)),
            format!("task {ID1}  succeeded\none")
        );
        let event = EventView {
            kind: EventKind::Finished,
            task_id: ID1.into(),
            session: "a".into(),
            position: None,
            text: None,
            into: None,
            task: Some(done),
            at: None,
        };
        let at = now();
        assert_eq!(
            plain(&render_event(&event, at, &TimeZone::UTC, 0..2)),
            format!("10:05:00  task {ID1}  finished: succeeded\n          three")
        );
    }
}
