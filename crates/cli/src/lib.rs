//! `agentctl`, the command-line client of agentd, and a reusable control-socket client.
//!
//! - [`client`]: [`Client`], a blocking client for the control socket (connect,
//!   `hello`, requests matched by id, event streams of `watch`). Integration tests and
//!   bridges can use it.
//! - [`args`]: the command line as clap types.
//! - [`render`]: pure functions that turn answers into the human-readable output.
//! - [`main`] / [`run`] / [`execute`]: the program itself; `bin/agentctl.rs` only calls
//!   [`main`].
//!
//! Output: on success the human-readable answer (or, with `--json`, exactly the
//! response's `result` as one compact JSON line) on stdout. On failure one line
//! `agentctl: <error>` on stderr and a non-zero exit code, one of the `EXIT_*`
//! constants; with `--json`, an error answered by agentd is also printed on stdout as
//! `{"code":…,"message":…}`. A closed stdout (broken pipe) ends agentctl quietly with
//! [`EXIT_OK`].
//!
//! Streaming commands print as events arrive and flush after each line: `watch`
//! (one line per event; with `--json` one event object per line) and `send --wait`
//! (progress lines, then the outcome and the result; with `--json` only the final
//! task), and `log` (the output as it is read; with `--json` one `LogChunk` object
//! per line). `send --wait` exits with [`EXIT_TASK_FAILED`] when the task did not
//! succeed. Output already printed as progress is not printed again as the result.
//! Ctrl-C on `send --wait`, `watch` or `chat` ends agentctl with [`EXIT_INTERRUPTED`]
//! and a line on stderr saying that the task goes on and how to stop it.
//!
//! `chat` is a terminal chat with one session: each line read from stdin is sent as
//! a message (chat commands such as `/status` are answered at once), while the
//! session's events and results, read on a second connection, are printed in between;
//! on EOF or `/quit` it leaves once each message sent has had its first event.
//!
//! Colour: styles are printed only when [`run`] finds stdout a terminal and
//! `NO_COLOR` unset (or `--color always`); [`execute`] never prints them. Times are
//! local (the `TZ` environment variable, else the system's zone). Tables show short
//! unique prefixes of task ids (`--full` for full ones; `--json` always has them).

pub mod args;
pub mod client;
pub mod render;

#[cfg(test)]
mod fixtures;

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io::{self, BufRead, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use agentd_proto::control::{
    EventKind, PingReply, QueueSettingsView, RequestBody, SendReply, StatusReply, StopReply,
    TaskState, TaskView, TasksPage,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use agentd_proto::control::EventView;
use clap::CommandFactory;
use jiff::tz::TimeZone;

pub use args::{Cli, Command};
pub use client::{Client, ClientError, WatchStream};

use args::{ChatArgs, ColorWhen, ManArgs, SendArgs, WatchArgs};

/// Success (also when stdout was closed early).
pub const EXIT_OK: u8 = 0;
/// agentd answered with an error (not found, queue full, unsupported protocol…).
pub const EXIT_DAEMON_ERROR: u8 = 1;
/// The command line is wrong (clap's usage errors).
pub const EXIT_USAGE: u8 = 2;
/// agentd is not running or its socket cannot be connected to.
pub const EXIT_UNREACHABLE: u8 = 3;
/// Anything else: no answer in time, connection lost, an answer that cannot be
/// understood, output that cannot be written.
pub const EXIT_FAILURE: u8 = 4;
/// `send --wait`: the task ended in a state other than `succeeded` (failed,
/// cancelled, interrupted, expired, dropped…).
pub const EXIT_TASK_FAILED: u8 = 5;
/// `send --wait`, `watch` or `chat` ended by Ctrl-C (SIGINT); the tasks go on.
pub const EXIT_INTERRUPTED: u8 = 130;

/// How long `chat`, once left, still waits for the first event about each message
/// it sent (see `Ctx::chat`).
const CHAT_LEAVE_WAIT: Duration = Duration::from_secs(5);

/// [`run`] with the process arguments.
pub fn main() -> ExitCode {
    run(std::env::args_os())
}

/// The entry point of the `agentctl` binary: [`run_with_pages`] with the process
/// arguments.
pub fn main_with_pages(companions: &[clap::Command]) -> ExitCode {
    run_with_pages(std::env::args_os(), companions)
}

/// [`run_with_pages`] without companion pages.
pub fn run<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    run_with_pages(args, &[])
}

/// Parses `args` (program name first) with [`Cli::try_parse_checked`] and runs the
/// command on the real stdout and stderr. Usage errors, `--help` and `--version` are
/// printed by clap. `man DIR` also writes a page for each of `companions` (agentd's:
/// its command line is the daemon's, which this crate does not depend on).
pub fn run_with_pages<I, T>(args: I, companions: &[clap::Command]) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut cli = match Cli::try_parse_checked(args) {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout; a closed stdout is not an error.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { EXIT_OK });
        }
    };
    let colour = match cli.color {
        ColorWhen::Always => true,
        ColorWhen::Never => false,
        ColorWhen::Auto => {
            anstream::AutoStream::choice(&io::stdout()) != anstream::ColorChoice::Never
        }
    };
    if let Command::Man(man) = &mut cli.command {
        man.companions = companions.to_vec();
    }
    if matches!(
        cli.command,
        Command::Watch(_) | Command::Send(_) | Command::Chat(_)
    ) {
        catch_interrupt();
    }
    // stderr stays unlocked: the Ctrl-C thread writes to it while a command runs.
    let code = execute_styled(&cli, colour, &mut io::stdout().lock(), &mut io::stderr());
    ExitCode::from(code)
}

/// Runs a parsed command line, writing output without colour to `out` and the error
/// line to `err`; returns the exit code.
pub fn execute(cli: &Cli, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    execute_styled(cli, false, out, err)
}

/// [`execute`], with ANSI styles in the output if `colour`.
pub fn execute_styled(cli: &Cli, colour: bool, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    if colour {
        execute_on(cli, out, err)
    } else {
        execute_on(cli, &mut Plain::new(out), err)
    }
}

/// A writer that drops ANSI escape sequences on the way to `inner` (stateful, so a
/// sequence split across writes is dropped too).
struct Plain<'a> {
    inner: &'a mut dyn Write,
    state: anstream::adapter::StripBytes,
}

impl<'a> Plain<'a> {
    fn new(inner: &'a mut dyn Write) -> Plain<'a> {
        Plain {
            inner,
            state: anstream::adapter::StripBytes::new(),
        }
    }
}

impl Write for Plain<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for printable in self.state.strip_next(buf) {
            self.inner.write_all(printable)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What Ctrl-C prints before agentctl exits, if anything (see [`catch_interrupt`]).
static INTERRUPT_NOTICE: Mutex<Option<String>> = Mutex::new(None);

/// Says what Ctrl-C would leave running from now on (`None`: nothing to say).
fn on_interrupt(notice: Option<String>) {
    if let Ok(mut slot) = INTERRUPT_NOTICE.lock() {
        *slot = notice;
    }
}

/// Turns SIGINT into: the notice set by [`on_interrupt`] on stderr, then exit
/// [`EXIT_INTERRUPTED`]. Only the binary does this (not [`execute`], which tests call).
fn catch_interrupt() {
    let Ok(mut signals) = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT]) else {
        return;
    };
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            let notice = INTERRUPT_NOTICE.lock().ok().and_then(|n| n.clone());
            let mut err = io::stderr().lock();
            // After the ^C the terminal echoed, on a line of its own.
            if io::IsTerminal::is_terminal(&err) {
                let _ = writeln!(err);
            }
            if let Some(notice) = notice {
                let _ = writeln!(err, "{notice}");
            }
            let _ = err.flush();
            std::process::exit(EXIT_INTERRUPTED.into());
        }
    });
}

fn execute_on(cli: &Cli, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let result = dispatch(cli, out).and_then(|code| {
        out.flush().map_err(RunError::Output)?;
        Ok(code)
    });
    match result {
        Ok(code) => code,
        Err(RunError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => EXIT_OK,
        Err(RunError::Client(e)) => {
            if cli.json {
                if let Some(body) = e.error_body() {
                    if let Ok(json) = serde_json::to_string(body) {
                        let _ = writeln!(out, "{json}").and_then(|()| out.flush());
                    }
                }
            }
            let _ = writeln!(err, "agentctl: {e}");
            e.exit_code()
        }
        Err(e @ (RunError::Output(_) | RunError::Write { .. })) => {
            let _ = writeln!(err, "agentctl: {e}");
            EXIT_FAILURE
        }
    }
}

/// Why [`execute`] failed.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot write output: {0}")]
    Output(#[source] io::Error),
    #[error("cannot write into {}: {source}", dir.display())]
    Write {
        dir: std::path::PathBuf,
        source: io::Error,
    },
}

/// Runs the command; the exit code on success.
fn dispatch(cli: &Cli, out: &mut dyn Write) -> Result<u8, RunError> {
    let socket = cli.socket_path();
    let ctx = Ctx {
        socket: &socket,
        json: cli.json,
        full: cli.full,
        tz: TimeZone::system(),
    };
    let now = SystemTime::now;
    match &cli.command {
        Command::Send(a) if a.wait => return ctx.send_wait(a, out),
        Command::Chat(a) => return ctx.chat(a, out),
        Command::Completions(a) => {
            // Into memory first: clap_complete panics on a write error (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(a.shell, &mut Cli::command(), "agentctl", &mut script);
            out.write_all(&script).map_err(RunError::Output)
        }
        Command::Man(a) => man(a, out),
        Command::Send(_) => ctx.one_shot(&cli.command, out, |r: SendReply| render::render_send(&r)),
        Command::Status(a) if a.task_id.is_some() => {
            ctx.one_shot(&cli.command, out, |t: TaskView| {
                render::render_task(&t, now(), &ctx.tz)
            })
        }
        Command::Status(_) => ctx.one_shot(&cli.command, out, |s: StatusReply| {
            render::render_status(&s, now(), ctx.full)
        }),
        Command::Tasks(_) => ctx.tasks(&cli.command, out),
        Command::Stop(_) => ctx.one_shot(&cli.command, out, |s: StopReply| render::render_stop(&s)),
        Command::Queue(_) => ctx.one_shot(&cli.command, out, |q: QueueSettingsView| {
            render::render_queue(&q)
        }),
        Command::Watch(a) => ctx.watch(a, out),
        Command::Log(a) => ctx.log(a, out),
        Command::Resume(_) => {
            ctx.one_shot(&cli.command, out, |r: SendReply| render::render_send(&r))
        }
        Command::Ping => ctx.one_shot(&cli.command, out, |p: PingReply| {
            render::render_ping(&p, &socket)
        }),
    }?;
    Ok(EXIT_OK)
}

/// `man [DIR]`: agentctl.1 on `out`, or every page (agentctl's and its companions')
/// written into DIR.
fn man(args: &ManArgs, out: &mut dyn Write) -> Result<(), RunError> {
    let command = Cli::command();
    match &args.dir {
        None => clap_mangen::Man::new(command)
            .render(out)
            .map_err(RunError::Output),
        Some(dir) => std::iter::once(command)
            .chain(args.companions.iter().cloned())
            .try_for_each(|command| clap_mangen::generate_to(command, dir))
            .map_err(|source| RunError::Write {
                dir: dir.clone(),
                source,
            }),
    }
}

/// What every command needs.
struct Ctx<'a> {
    socket: &'a Path,
    json: bool,
    /// Full task ids in tables.
    full: bool,
    /// The zone times are shown in.
    tz: TimeZone,
}

/// Turns a stream of events into printed lines, remembering each task's progress
/// lines so that a result is not printed again where progress already showed it.
struct EventPrinter {
    json: bool,
    tz: TimeZone,
    progress: HashMap<String, Vec<String>>,
}

impl EventPrinter {
    fn new(json: bool, tz: TimeZone) -> EventPrinter {
        EventPrinter {
            json,
            tz,
            progress: HashMap::new(),
        }
    }

    /// The lines for one event; `skipped` progress lines were coalesced before it.
    fn lines(&mut self, event: &EventView, skipped: u64) -> Result<Vec<String>, ClientError> {
        if self.json {
            // The event object, with agentd's count of progress lines left out.
            let mut value =
                serde_json::to_value(event).map_err(|e| ClientError::BadResponse(e.to_string()))?;
            if let (Some(object), true) = (value.as_object_mut(), skipped > 0) {
                object.insert("skipped".into(), skipped.into());
            }
            return Ok(vec![to_json(&value)?]);
        }
        let mut lines = Vec::new();
        if skipped > 0 {
            lines.push(agentd_proto::text::skipped_progress(skipped));
        }
        let shown = match (event.kind, &event.text) {
            (EventKind::Progress, Some(text)) => {
                let seen = self.progress.entry(event.task_id.clone()).or_default();
                // A gap: the result can no longer be matched line for line.
                if skipped == 0 {
                    seen.push(text.clone());
                } else {
                    seen.push(String::from("\0"));
                }
                0..0
            }
            (EventKind::Finished, _) => {
                let seen = self.progress.remove(&event.task_id).unwrap_or_default();
                let result = event.task.as_ref().and_then(|t| t.result.as_deref());
                result.map_or(0..0, |r| render::shown_lines(&seen, r))
            }
            _ => 0..0,
        };
        lines.push(render::render_event(
            event,
            SystemTime::now(),
            &self.tz,
            shown,
        ));
        Ok(lines)
    }
}

impl Ctx<'_> {
    /// Connects, sends the command's one request, and prints its result: as JSON, or
    /// decoded as `T` and rendered.
    fn one_shot<T: DeserializeOwned>(
        &self,
        command: &Command,
        out: &mut dyn Write,
        render: impl FnOnce(T) -> String,
    ) -> Result<(), RunError> {
        let body = command.request().ok_or_else(|| {
            ClientError::BadResponse("this command is not a single request".into())
        })?;
        let value = self.request(body)?;
        self.print_result(value, out, render)
    }

    /// Prints an answer: as JSON, or decoded as `T` and rendered.
    fn print_result<T: DeserializeOwned>(
        &self,
        value: Value,
        out: &mut dyn Write,
        render: impl FnOnce(T) -> String,
    ) -> Result<(), RunError> {
        let text = if self.json {
            to_json(&value)?
        } else {
            render(decode(value)?)
        };
        writeln!(out, "{text}").map_err(RunError::Output)
    }

    fn request(&self, body: RequestBody) -> Result<Value, ClientError> {
        Client::connect(self.socket)?.request(body)
    }

    /// `tasks`: fetches every page on one connection and prints them as one list
    /// (one JSON array with `--json`), in the order of [`listing_order`].
    fn tasks(&self, command: &Command, out: &mut dyn Write) -> Result<(), RunError> {
        let Some(RequestBody::Tasks {
            session,
            all,
            limit,
            ..
        }) = command.request()
        else {
            return Err(ClientError::BadResponse("not a tasks command".into()).into());
        };
        let mut client = Client::connect(self.socket)?;
        let mut tasks = Vec::new();
        let mut cursor = None;
        loop {
            let value = client.request(RequestBody::Tasks {
                session: session.clone(),
                all,
                limit,
                cursor: cursor.take(),
            })?;
            // An agentd from before paging answers the whole listing as an array.
            let page: TasksPage = match value {
                Value::Array(_) => TasksPage {
                    tasks: decode(value)?,
                    next_cursor: None,
                },
                page => decode(page)?,
            };
            tasks.extend(page.tasks);
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        tasks.sort_by(listing_order);
        let text = if self.json {
            to_json(&tasks)?
        } else {
            render::render_tasks(&tasks, SystemTime::now(), self.full)
        };
        writeln!(out, "{text}").map_err(RunError::Output)
    }

    /// `watch`: one line per event, flushed, until a task watch's task has ended or
    /// the connection closes.
    fn watch(&self, args: &WatchArgs, out: &mut dyn Write) -> Result<(), RunError> {
        let mut client = Client::connect(self.socket)?;
        let mut stream = client.watch(args.request())?;
        on_interrupt(Some(match (&args.session, stream.task_id()) {
            (Some(session), _) => agentd_proto::text::interrupted_session(session),
            (None, Some(task)) => agentd_proto::text::interrupted_task_watch(task),
            (None, None) => agentd_proto::text::interrupted_task_watch(
                args.task_id.as_deref().unwrap_or_default(),
            ),
        }));
        let mut printer = EventPrinter::new(self.json, self.tz.clone());
        while let Some(event) = stream.next() {
            let event = event?;
            for line in printer.lines(&event, stream.skipped())? {
                print_flushed(out, &line)?;
            }
        }
        Ok(())
    }

    /// `chat`: stdin lines are sent as messages on one connection while a session
    /// watch on another streams the session's events; ends on EOF or `/quit`, once
    /// the session's first event about each message sent has been printed (at most
    /// [`CHAT_LEAVE_WAIT`] later), so that a message typed just before leaving (or
    /// piped in) is still seen to be accepted.
    fn chat(&self, args: &ChatArgs, out: &mut dyn Write) -> Result<u8, RunError> {
        enum Input {
            Watching,
            /// The lines printed for one event about task `.0`.
            Lines(String, Vec<String>),
            WatchEnded(ClientError),
            Typed(String),
            Eof,
        }
        let (tx, rx) = mpsc::channel();
        let mut watcher = Client::connect(self.socket)?;
        let mut sender = Client::connect(self.socket)?;
        let (session, json, tz) = (args.session.clone(), self.json, self.tz.clone());
        let events = tx.clone();
        std::thread::spawn(move || {
            let ended = match watcher.watch_session(&session) {
                Err(e) => e,
                Ok(mut stream) => {
                    let _ = events.send(Input::Watching);
                    let mut printer = EventPrinter::new(json, tz);
                    loop {
                        let lines = match stream.next() {
                            Some(Ok(event)) => printer
                                .lines(&event, stream.skipped())
                                .map(|lines| (event.task_id, lines)),
                            Some(Err(e)) => Err(e),
                            None => Err(ClientError::Disconnected),
                        };
                        match lines {
                            Ok((task, lines)) => {
                                if events.send(Input::Lines(task, lines)).is_err() {
                                    return;
                                }
                            }
                            Err(e) => break e,
                        }
                    }
                }
            };
            let _ = events.send(Input::WatchEnded(ended));
        });
        // The watch first, so that nothing typed runs unseen.
        match rx.recv() {
            Ok(Input::Watching) => {}
            Ok(Input::WatchEnded(e)) => return Err(e.into()),
            _ => return Err(ClientError::Disconnected.into()),
        }
        std::thread::spawn(move || {
            for line in io::stdin().lock().lines() {
                match line {
                    Ok(line) => {
                        if tx.send(Input::Typed(line)).is_err() {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            let _ = tx.send(Input::Eof);
        });
        if !self.json {
            print_flushed(out, &agentd_proto::text::chat_banner(&args.session))?;
        }
        on_interrupt(Some(agentd_proto::text::interrupted_chat(&args.session)));
        // Tasks of messages sent whose first event has not been printed yet, tasks
        // whose events came before the answer to their message (another connection),
        // and, once the user has left, until when to wait for those events.
        let mut unseen: HashSet<String> = HashSet::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut leaving: Option<Instant> = None;
        loop {
            let input = match leaving {
                Some(_) if unseen.is_empty() => break,
                None => rx.recv().map_err(|_| ()),
                Some(until) => rx
                    .recv_timeout(until.saturating_duration_since(Instant::now()))
                    .map_err(|_| ()),
            };
            let Ok(input) = input else { break };
            match input {
                Input::Lines(task, lines) => {
                    if !unseen.remove(&task) {
                        seen.insert(task);
                    }
                    for line in lines {
                        print_flushed(out, &line)?;
                    }
                }
                // Nothing more is sent once the user has left.
                Input::Typed(_) if leaving.is_some() => {}
                Input::Typed(line) => {
                    let line = line.trim();
                    match line {
                        "" => continue,
                        "/quit" | "/exit" => {
                            leaving = Some(Instant::now() + CHAT_LEAVE_WAIT);
                            continue;
                        }
                        _ => {}
                    }
                    let value = match sender.request(args.request(line)) {
                        Ok(value) => value,
                        // A typo, or a command that failed: the answer is shown, as a
                        // chat app shows `error.message`, and the chat goes on.
                        Err(ClientError::Daemon(error)) => {
                            let text = if self.json {
                                to_json(&error)?
                            } else {
                                render::render_chat_error(&error.message)
                            };
                            print_flushed(out, &text)?;
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    };
                    let reply: SendReply = decode(value.clone())?;
                    if let Some(task) = reply.task.as_ref().filter(|_| !reply.duplicate) {
                        if !seen.remove(&task.task_id) {
                            unseen.insert(task.task_id.clone());
                        }
                    }
                    if self.json {
                        print_flushed(out, &to_json(&value)?)?;
                        continue;
                    }
                    // Accepted work shows up as events; only what else the answer
                    // says (a resume, drops, notes) is printed here.
                    let mut lines = render::render_send_in_chat(&reply);
                    if reply.command.as_deref() == Some("help") {
                        // Under `/help` in agentd's list, else at its end.
                        let at = lines
                            .iter()
                            .position(|l| l.trim_start().starts_with("/help "))
                            .map_or(lines.len(), |i| i + 1);
                        lines.insert(at, agentd_proto::text::CHAT_HELP_QUIT.to_string());
                    }
                    for line in lines {
                        print_flushed(out, &line)?;
                    }
                }
                Input::WatchEnded(e) => return Err(e.into()),
                Input::Eof | Input::Watching => {
                    leaving.get_or_insert_with(|| Instant::now() + CHAT_LEAVE_WAIT);
                }
            }
        }
        Ok(EXIT_OK)
    }

    /// `log [-f]`: the log chunk by chunk from its first byte; with `--follow`, until
    /// the task has ended and all its output is printed. With `--json`, one
    /// `LogChunk` object per line.
    fn log(&self, args: &args::LogArgs, out: &mut dyn Write) -> Result<(), RunError> {
        let mut client = Client::connect(self.socket)?;
        let mut offset = 0;
        loop {
            let value = client.request(RequestBody::Log {
                task_id: args.task_id.clone(),
                offset,
            })?;
            let chunk: agentd_proto::control::LogChunk = decode(value.clone())?;
            if self.json {
                print_flushed(out, &to_json(&value)?)?;
            } else if !chunk.data.is_empty() {
                out.write_all(chunk.data.as_bytes())
                    .and_then(|()| out.flush())
                    .map_err(RunError::Output)?;
            }
            offset = chunk.next_offset;
            if chunk.data.is_empty() {
                if !args.follow || chunk.done {
                    return Ok(());
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
    }

    /// `send --wait`: the send, then the task's progress until it ends (following the
    /// message into the task it was merged into), then its outcome and result.
    ///
    /// The session is watched before the message is sent, on the same connection, so
    /// every event of the task is seen however soon its agent reports: a watch of the
    /// task opened after the send's answer misses what the agent said before it.
    fn send_wait(&self, args: &SendArgs, out: &mut dyn Write) -> Result<u8, RunError> {
        let mut client = Client::connect(self.socket)?;
        let mut events = client.watch_session(&args.session)?;
        let value = events.request(args.request())?;
        let reply: SendReply = decode(value.clone())?;
        let task = match &reply.task {
            Some(task) if reply.accepted => task.clone(),
            // A control command: answered, nothing to wait for.
            _ => {
                self.print_result(value, out, |r: SendReply| render::render_send(&r))?;
                return Ok(EXIT_OK);
            }
        };
        // A new task that has already ended (its agent could not start) is told once,
        // by the end line below; a duplicate's line says it was not run again.
        let ended_at_once =
            task.state.is_terminal() && task.state != TaskState::Merged && !reply.duplicate;
        if !self.json && !ended_at_once {
            print_flushed(out, &render::render_send(&reply))?;
        }
        let mut progress = Vec::new();
        let view = match (task.state, &task.merged_into) {
            // The send's line already says where the message went.
            (TaskState::Merged, Some(into)) => {
                self.follow(&mut events, into, &mut progress, out)?
            }
            (state, _) if state.is_terminal() => task,
            _ => self.follow(&mut events, &task.task_id, &mut progress, out)?,
        };
        on_interrupt(None);
        let text = if self.json {
            to_json(&view)?
        } else {
            let shown = view
                .result
                .as_deref()
                .map_or(0..0, |r| render::shown_lines(&progress, r));
            render::render_wait_end(&view, shown)
        };
        writeln!(out, "{text}").map_err(RunError::Output)?;
        Ok(if view.state == TaskState::Succeeded {
            EXIT_OK
        } else {
            EXIT_TASK_FAILED
        })
    }

    /// Follows task `target` (and the tasks it is merged into) in the session watch
    /// `events` until it ends, printing progress lines (kept in `progress`) and
    /// merges; returns the final view.
    fn follow(
        &self,
        events: &mut WatchStream<'_>,
        target: &str,
        progress: &mut Vec<String>,
        out: &mut dyn Write,
    ) -> Result<TaskView, RunError> {
        let mut target = target.to_string();
        on_interrupt(Some(agentd_proto::text::interrupted_task(&target)));
        while let Some(event) = events.next() {
            let event = event?;
            if event.task_id != target {
                // Another task of the session.
                continue;
            }
            if events.skipped() > 0 {
                // A gap: the result can no longer be matched line for line.
                progress.push(String::from("\0"));
                if !self.json {
                    let notice = agentd_proto::text::skipped_progress(events.skipped());
                    print_flushed(out, &format!("  {notice}"))?;
                }
            }
            let line = match (event.kind, &event.text, &event.into) {
                (EventKind::Progress, Some(text), _) => {
                    progress.push(text.clone());
                    Some(render::render_progress(text))
                }
                (EventKind::Merged, _, Some(into)) => {
                    target = into.clone();
                    on_interrupt(Some(agentd_proto::text::interrupted_task(into)));
                    progress.clear();
                    Some(render::render_merged_into(into))
                }
                (EventKind::Finished, _, _) => {
                    return Ok(match event.task {
                        Some(view) if view.state.is_terminal() => view,
                        _ => events.call::<TaskView>(RequestBody::Status {
                            task_id: Some(event.task_id),
                        })?,
                    });
                }
                _ => None,
            };
            if let Some(line) = line.filter(|_| !self.json) {
                print_flushed(out, &line)?;
            }
        }
        // A session watch ends only with an error (returned above) or the connection.
        Err(ClientError::Disconnected.into())
    }
}

/// The order `agentctl tasks` lists tasks in: active ones by start, then queued ones
/// by position, then finished ones, oldest first.
fn listing_order(a: &TaskView, b: &TaskView) -> std::cmp::Ordering {
    fn key(t: &TaskView) -> (u8, u32, Option<&str>) {
        if t.state.is_terminal() {
            (2, 0, t.finished_at.as_deref())
        } else if t.state == TaskState::Queued {
            (1, t.position.unwrap_or(u32::MAX), None)
        } else {
            (0, 0, t.started_at.as_deref())
        }
    }
    key(a)
        .cmp(&key(b))
        .then_with(|| a.created_at.cmp(&b.created_at))
        .then_with(|| a.task_id.cmp(&b.task_id))
}

/// Writes one line and flushes, so that a reader sees it at once.
fn print_flushed(out: &mut dyn Write, line: &str) -> Result<(), RunError> {
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(RunError::Output)
}

fn decode<T: DeserializeOwned>(value: Value) -> Result<T, ClientError> {
    serde_json::from_value(value).map_err(|e| ClientError::BadResponse(e.to_string()))
}

fn to_json(value: &impl Serialize) -> Result<String, ClientError> {
    serde_json::to_string(value).map_err(|e| ClientError::BadResponse(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentd_proto::control::{
        Capacity, DropPolicy, ErrorCode, EventView, ExitView, HelloReply, Priority, QueueMode,
        Request, Response, WatchReply, CONTROL_PROTOCOL_VERSION,
    };
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;
    use std::thread;

    /// The server side of one connection of a fake agentd.
    struct Conn {
        reader: BufReader<UnixStream>,
        writer: UnixStream,
    }

    impl Conn {
        fn next(&mut self) -> Request {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            serde_json::from_str(&line).unwrap()
        }

        fn send(&mut self, response: &Response) {
            writeln!(self.writer, "{}", serde_json::to_string(response).unwrap()).unwrap();
        }

        fn event(&mut self, id: u64, event: EventView) {
            self.send(&Response::event(id, event));
        }
    }

    /// A fake agentd that accepts one connection, answers `hello`, and hands the
    /// connection to `script`.
    fn fake_agentd_script(
        script: impl FnOnce(&mut Conn) + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf, thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agentd.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut conn = Conn {
                reader: BufReader::new(stream.try_clone().unwrap()),
                writer: stream,
            };
            let hello = conn.next();
            conn.send(&Response::ok(
                hello.id,
                HelloReply {
                    protocol: CONTROL_PROTOCOL_VERSION,
                    server: "agentd 0.1.0".into(),
                },
            ));
            script(&mut conn);
        });
        (dir, path, handle)
    }

    /// A fake agentd that answers `hello` and then one request with `answer`.
    fn fake_agentd(
        answer: impl FnOnce(Request) -> Response + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf, thread::JoinHandle<()>) {
        fake_agentd_script(|conn| {
            let request = conn.next();
            let reply = answer(request);
            conn.send(&reply);
        })
    }

    /// Runs agentctl with `args` against `socket` as `run` would (usage errors
    /// included, rendered without colour); returns (exit code, stdout, stderr).
    fn agentctl(socket: &Path, args: &[&str]) -> (u8, String, String) {
        let mut argv: Vec<OsString> = vec!["agentctl".into(), "--socket".into()];
        argv.push(socket.into());
        argv.extend(args.iter().map(OsString::from));
        let cli = match Cli::try_parse_checked(argv) {
            Ok(cli) => cli,
            Err(e) => return (EXIT_USAGE, String::new(), e.render().to_string()),
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = execute(&cli, &mut out, &mut err);
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    fn task(id: &str, state: TaskState) -> TaskView {
        crate::fixtures::task(id, "alice", state, "fix the build")
    }

    fn accepted(task: TaskView) -> SendReply {
        SendReply {
            reply: "ignored".into(),
            accepted: true,
            task: Some(task),
            capacity: Some(Capacity { busy: 2, max: 2 }),
            command: None,
            data: None,
            duplicate: false,
            dropped: vec![],
            notice: None,
            steered_into: None,
        }
    }

    fn event(kind: EventKind, task_id: &str) -> EventView {
        EventView {
            kind,
            task_id: task_id.into(),
            session: "alice".into(),
            position: None,
            text: None,
            into: None,
            task: None,
            at: None,
        }
    }

    fn progress(task_id: &str, text: &str) -> EventView {
        EventView {
            text: Some(text.into()),
            ..event(EventKind::Progress, task_id)
        }
    }

    fn finished(view: TaskView) -> EventView {
        EventView {
            task: Some(view.clone()),
            ..event(EventKind::Finished, &view.task_id)
        }
    }

    /// Answers a `watch` of task `id` as agentd does, with `status` as the task's
    /// view in the answer, then sends `events`; returns the watch's request id.
    fn answer_task_watch(
        conn: &mut Conn,
        id: &str,
        status: TaskView,
        events: Vec<EventView>,
    ) -> u64 {
        let watch = conn.next();
        assert_eq!(
            watch.body,
            RequestBody::Watch {
                task_id: Some(id.into()),
                session: None
            }
        );
        conn.send(&Response::ok(
            watch.id,
            WatchReply {
                task_id: Some(id.into()),
                session: None,
                task: Some(status),
            },
        ));
        for e in events {
            conn.event(watch.id, e);
        }
        watch.id
    }

    /// Answers the session watch `send --wait` opens before it sends, then sends
    /// `snapshot`; returns the watch's request id, which the task's events carry.
    fn answer_session_watch(conn: &mut Conn, session: &str, snapshot: Vec<EventView>) -> u64 {
        let watch = conn.next();
        assert_eq!(
            watch.body,
            RequestBody::Watch {
                task_id: None,
                session: Some(session.into())
            }
        );
        conn.send(&Response::ok(
            watch.id,
            WatchReply {
                task_id: None,
                session: Some(session.into()),
                task: None,
            },
        ));
        for e in snapshot {
            conn.event(watch.id, e);
        }
        watch.id
    }

    #[test]
    fn not_running_is_one_line_and_exit_3() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agentd.sock");
        let (code, out, err) = agentctl(&socket, &["status"]);
        assert_eq!(code, EXIT_UNREACHABLE);
        assert_eq!(out, "");
        assert_eq!(
            err,
            format!(
                "agentctl: agentd is not running at {} (no socket): start it with \
                 `agentd &` or `systemctl --user start agentd`, or give agentctl its \
                 socket with --socket PATH or AGENTD_SOCKET\n",
                socket.display()
            )
        );
    }

    #[test]
    fn stop_with_nothing_to_stop() {
        let (_dir, socket, server) = fake_agentd(|request| {
            assert_eq!(
                request.body,
                RequestBody::Stop {
                    task_id: None,
                    session: None,
                    all: true,
                    wait: true,
                }
            );
            Response::ok(request.id, StopReply::default())
        });
        let (code, out, err) = agentctl(&socket, &["stop", "--all"]);
        server.join().unwrap();
        assert_eq!(
            (code, out.as_str(), err.as_str()),
            (0, "nothing to stop\n", "")
        );
    }

    #[test]
    fn send_prints_the_task_line() {
        let (_dir, socket, server) = fake_agentd(|request| {
            let RequestBody::Send {
                session,
                text,
                priority,
                mode,
                ..
            } = &request.body
            else {
                panic!("not a send: {request:?}");
            };
            assert_eq!(
                (session.as_str(), text.as_str()),
                ("alice", "fix the build")
            );
            assert_eq!((*priority, *mode), (None, None));
            let task = TaskView {
                position: Some(2),
                ..task("t-1", TaskState::Queued)
            };
            Response::ok(request.id, accepted(task))
        });
        let (code, out, _) = agentctl(
            &socket,
            &["send", "--session", "alice", "fix", "the", "build"],
        );
        server.join().unwrap();
        assert_eq!(code, EXIT_OK);
        assert_eq!(out, "task t-1  queued: position 2 (2/2 agents busy)\n");
    }

    #[test]
    fn send_prints_duplicates_drops_and_notices() {
        let (_dir, socket, server) = fake_agentd(|request| {
            assert!(matches!(
                request.body,
                RequestBody::Send {
                    priority: Some(Priority::Background),
                    mode: Some(QueueMode::Followup),
                    ..
                }
            ));
            let reply = SendReply {
                duplicate: true,
                dropped: vec![TaskView {
                    text: "an old message that nobody will miss, honestly".into(),
                    ..task("t-0", TaskState::Dropped)
                }],
                notice: Some("the agent cannot be steered;\nqueued as a follow-up".into()),
                ..accepted(TaskView {
                    position: Some(1),
                    ..task("t-1", TaskState::Queued)
                })
            };
            Response::ok(request.id, reply)
        });
        let (code, out, err) = agentctl(
            &socket,
            &[
                "send",
                "--session",
                "alice",
                "--background",
                "--mode",
                "followup",
                "x",
            ],
        );
        server.join().unwrap();
        assert_eq!(code, EXIT_OK, "{err}");
        assert_eq!(
            out,
            "task t-1  already received (queued): not run again\n  \
             dropped to make room: task t-0  an old message that nobody will miss, h…\n  \
             note: the agent cannot be steered; queued as a follow-up\n"
        );
    }

    #[test]
    fn send_wait_prints_progress_then_the_outcome_and_result() {
        let (_dir, socket, server) = fake_agentd_script(|conn| {
            // The session's other task, in the snapshot and later: not this send's.
            let watch = answer_session_watch(conn, "alice", vec![event(EventKind::Started, "t-0")]);
            let send = conn.next();
            assert!(matches!(send.body, RequestBody::Send { .. }));
            let queued = TaskView {
                position: Some(2),
                ..task("t-1", TaskState::Queued)
            };
            // Events that come before the send's answer are kept, not lost.
            conn.event(watch, event(EventKind::Accepted, "t-1"));
            conn.event(watch, progress("t-0", "elsewhere"));
            conn.send(&Response::ok(send.id, accepted(queued)));
            conn.event(
                watch,
                EventView {
                    position: Some(1),
                    ..event(EventKind::Position, "t-1")
                },
            );
            conn.event(watch, event(EventKind::Started, "t-1"));
            conn.event(watch, progress("t-1", "compiling"));
            conn.event(watch, progress("t-1", "testing \x1b[1m"));
            let done = TaskView {
                result: Some("all green\n2 files changed\n".into()),
                exit: Some(ExitView {
                    code: Some(0),
                    ..ExitView::default()
                }),
                ..task("t-1", TaskState::Succeeded)
            };
            conn.event(watch, finished(done));
        });
        let (code, out, err) = agentctl(&socket, &["send", "--session", "alice", "--wait", "x"]);
        server.join().unwrap();
        assert_eq!((code, err.as_str()), (EXIT_OK, ""));
        assert_eq!(
            out,
            "task t-1  queued: position 2 (2/2 agents busy)\n  \
             compiling\n  \
             testing \u{FFFD}[1m\n\
             task t-1  succeeded\n\
             all green\n\
             2 files changed\n"
        );
    }

    #[test]
    fn send_wait_prints_output_once_when_progress_already_showed_it() {
        let (_dir, socket, server) = fake_agentd_script(|conn| {
            let watch = answer_session_watch(conn, "alice", vec![]);
            let send = conn.next();
            // The agent reports before agentctl has the send's answer.
            conn.event(watch, progress("t-1", "one"));
            let running = task("t-1", TaskState::Running);
            conn.send(&Response::ok(send.id, accepted(running)));
            conn.event(watch, progress("t-1", "two"));
            let done = TaskView {
                started_at: Some("2024-05-01T10:00:00Z".into()),
                finished_at: Some("2024-05-01T10:00:01.250Z".into()),
                result: Some("one\ntwo\nthree\n".into()),
                ..task("t-1", TaskState::Succeeded)
            };
            conn.event(watch, finished(done));
        });
        let (code, out, err) = agentctl(&socket, &["send", "--session", "alice", "--wait", "x"]);
        server.join().unwrap();
        assert_eq!((code, err.as_str()), (EXIT_OK, ""));
        assert_eq!(
            out,
            "task t-1  started\n  one\n  two\ntask t-1  succeeded (ran 1.25 s)\nthree\n"
        );
    }

    #[test]
    fn watch_prints_each_task_output_once() {
        let (_dir, socket, server) = fake_agentd_script(|conn| {
            let watch = conn.next();
            conn.send(&Response::ok(
                watch.id,
                WatchReply {
                    task_id: None,
                    session: Some("alice".into()),
                    task: None,
                },
            ));
            conn.event(watch.id, progress("t-1", "one"));
            conn.event(watch.id, progress("t-2", "other"));
            conn.event(
                watch.id,
                finished(TaskView {
                    result: Some("one\ntwo".into()),
                    ..task("t-1", TaskState::Succeeded)
                }),
            );
            conn.event(
                watch.id,
                finished(TaskView {
                    result: Some("a different answer".into()),
                    ..task("t-2", TaskState::Succeeded)
                }),
            );
        });
        let (code, out, _) = agentctl(&socket, &["watch", "--session", "alice"]);
        server.join().unwrap();
        assert_eq!(code, EXIT_FAILURE);
        let lines: Vec<&str> = out
            .lines()
            .map(|l| if l.starts_with(' ') { l } else { &l[8..] })
            .collect();
        assert_eq!(
            lines,
            [
                "  task t-1  progress: one",
                "  task t-2  progress: other",
                "  task t-1  finished: succeeded",
                "          two",
                "  task t-2  finished: succeeded",
                "          a different answer",
            ]
        );
    }

    #[test]
    fn send_wait_exits_5_when_the_task_fails_and_json_prints_only_the_task() {
        for json in [false, true] {
            let failed = TaskView {
                exit: Some(ExitView {
                    error: Some("agent exited with code 3".into()),
                    code: Some(3),
                    ..ExitView::default()
                }),
                ..task("t-1", TaskState::Failed)
            };
            let final_view = failed.clone();
            let (_dir, socket, server) = fake_agentd_script(move |conn| {
                let watch = answer_session_watch(conn, "alice", vec![]);
                let send = conn.next();
                conn.send(&Response::ok(
                    send.id,
                    accepted(task("t-1", TaskState::Starting)),
                ));
                conn.event(watch, progress("t-1", "trying"));
                conn.event(watch, finished(failed));
            });
            let mut args = vec!["send", "--session", "alice", "--wait", "x"];
            if json {
                args.push("--json");
            }
            let (code, out, err) = agentctl(&socket, &args);
            server.join().unwrap();
            assert_eq!((code, err.as_str()), (EXIT_TASK_FAILED, ""));
            if json {
                let printed: TaskView = serde_json::from_str(&out).unwrap();
                assert_eq!(printed, final_view);
                assert_eq!(out.lines().count(), 1, "{out}");
            } else {
                assert_eq!(
                    out,
                    "task t-1  started\n  \
                     trying\n\
                     task t-1  failed (agent exited with code 3)\n"
                );
            }
        }
    }

    #[test]
    fn send_wait_follows_a_merged_message_into_its_task() {
        let (_dir, socket, server) = fake_agentd_script(|conn| {
            let watch = answer_session_watch(conn, "alice", vec![]);
            let send = conn.next();
            let merged = TaskView {
                merged_into: Some("t-1".into()),
                ..task("t-2", TaskState::Merged)
            };
            let reply = SendReply {
                notice: Some("collected for the follow-up".into()),
                ..accepted(merged)
            };
            conn.send(&Response::ok(send.id, reply));
            // t-1 is itself collected into t-3; agentctl follows it there.
            conn.event(
                watch,
                EventView {
                    into: Some("t-3".into()),
                    ..event(EventKind::Merged, "t-1")
                },
            );
            conn.event(watch, progress("t-3", "working"));
            conn.event(
                watch,
                finished(TaskView {
                    result: Some("done".into()),
                    ..task("t-3", TaskState::Succeeded)
                }),
            );
        });
        let (code, out, err) = agentctl(&socket, &["send", "--session", "alice", "--wait", "x"]);
        server.join().unwrap();
        assert_eq!((code, err.as_str()), (EXIT_OK, ""));
        assert_eq!(
            out,
            "task t-2  steered into running task t-1\n  \
             note: collected for the follow-up\n  \
             merged into task t-3\n  \
             working\n\
             task t-3  succeeded\n\
             done\n"
        );
    }

    #[test]
    fn send_wait_on_a_control_command_prints_the_reply() {
        let (_dir, socket, server) = fake_agentd_script(|conn| {
            answer_session_watch(conn, "alice", vec![]);
            let request = conn.next();
            conn.send(&Response::ok(
                request.id,
                SendReply {
                    reply: "1/2 agents busy".into(),
                    accepted: false,
                    task: None,
                    capacity: None,
                    command: Some("status".into()),
                    data: Some(serde_json::json!({})),
                    duplicate: false,
                    dropped: vec![],
                    notice: None,
                    steered_into: None,
                },
            ));
        });
        let (code, out, err) = agentctl(
            &socket,
            &["send", "--session", "alice", "--wait", "/status"],
        );
        server.join().unwrap();
        assert_eq!(
            (code, out.as_str(), err.as_str()),
            (EXIT_OK, "1/2 agents busy\n", "")
        );
    }

    #[test]
    fn send_wait_on_a_finished_duplicate_does_not_wait() {
        let (_dir, socket, server) = fake_agentd_script(|conn| {
            answer_session_watch(conn, "alice", vec![]);
            let request = conn.next();
            let done = TaskView {
                result: Some("42".into()),
                ..task("t-1", TaskState::Succeeded)
            };
            conn.send(&Response::ok(
                request.id,
                SendReply {
                    duplicate: true,
                    ..accepted(done)
                },
            ));
        });
        let (code, out, err) = agentctl(
            &socket,
            &[
                "send",
                "--session",
                "alice",
                "--message-id",
                "m1",
                "--wait",
                "x",
            ],
        );
        server.join().unwrap();
        assert_eq!((code, err.as_str()), (EXIT_OK, ""));
        assert_eq!(
            out,
            "task t-1  already received (succeeded): not run again\n\
             task t-1  succeeded\n\
             42\n"
        );
    }

    #[test]
    fn send_wait_reports_a_lost_connection_with_exit_4() {
        let (_dir, socket, server) = fake_agentd_script(|conn| {
            let watch = answer_session_watch(conn, "alice", vec![]);
            let send = conn.next();
            conn.send(&Response::ok(
                send.id,
                accepted(task("t-1", TaskState::Running)),
            ));
            conn.event(watch, progress("t-1", "half way"));
            // Then agentd goes away.
        });
        let (code, out, err) = agentctl(&socket, &["send", "--session", "alice", "--wait", "x"]);
        server.join().unwrap();
        assert_eq!(code, EXIT_FAILURE);
        assert_eq!(out, "task t-1  started\n  half way\n");
        assert_eq!(err, "agentctl: agentd closed the connection\n");
    }

    #[test]
    fn queue_shows_and_changes_settings() {
        let (_dir, socket, server) = fake_agentd(|request| {
            assert_eq!(
                request.body,
                RequestBody::Queue {
                    session: "alice".into(),
                    mode: Some(QueueMode::Steer),
                    debounce_ms: Some(500),
                    cap: Some(5),
                    drop: Some(DropPolicy::Old),
                    reset: false,
                }
            );
            Response::ok(
                request.id,
                QueueSettingsView {
                    session: "alice".into(),
                    mode: QueueMode::Steer,
                    debounce_ms: 500,
                    cap: 5,
                    drop: DropPolicy::Old,
                    custom: true,
                },
            )
        });
        let (code, out, err) = agentctl(
            &socket,
            &[
                "queue",
                "--session",
                "alice",
                "drop:old",
                "steer",
                "cap:5",
                "debounce:500ms",
            ],
        );
        server.join().unwrap();
        assert_eq!(
            (code, out.as_str(), err.as_str()),
            (
                EXIT_OK,
                "session alice: mode steer, debounce 500ms, cap 5, drop old\n",
                ""
            )
        );

        let (_dir, socket, server) = fake_agentd(|request| {
            assert!(matches!(
                request.body,
                RequestBody::Queue {
                    reset: true,
                    mode: None,
                    ..
                }
            ));
            Response::ok(
                request.id,
                QueueSettingsView {
                    session: "alice".into(),
                    mode: QueueMode::Collect,
                    debounce_ms: 1_000,
                    cap: 20,
                    drop: DropPolicy::Summarize,
                    custom: false,
                },
            )
        });
        let (code, out, _) = agentctl(&socket, &["queue", "--session", "alice", "--reset"]);
        server.join().unwrap();
        assert_eq!(code, EXIT_OK);
        assert_eq!(
            out,
            "session alice: mode collect, debounce 1s, cap 20, drop summarize (defaults)\n"
        );
    }

    #[test]
    fn queue_argument_errors_exit_2_without_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agentd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        for (words, expected) in [
            (&["cap:0"][..], "cap must be at least 1"),
            (
                &["debounce:later"],
                "debounce must be a duration such as 2s or 500ms",
            ),
            (
                &["drop:all"],
                "unknown drop policy \"all\" (expected one of old, new, summarize)",
            ),
            (
                &["steer", "interrupt"],
                "the queue mode is given more than once",
            ),
            (&["size:3"], "unknown queue option 'size'"),
        ] {
            let mut args = vec!["queue", "--session", "alice"];
            args.extend_from_slice(words);
            let (code, out, err) = agentctl(&socket, &args);
            assert_eq!(code, EXIT_USAGE, "{words:?}");
            assert_eq!(out, "");
            assert!(
                err.starts_with("error: ") && err.contains(expected),
                "{words:?}: {err}"
            );
        }
        let nothing = listener.accept().unwrap_err();
        assert_eq!(nothing.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn watch_a_task_prints_events_until_it_finishes() {
        for json in [false, true] {
            let events = vec![
                EventView {
                    position: Some(2),
                    task: Some(task("t-1", TaskState::Queued)),
                    ..event(EventKind::Accepted, "t-1")
                },
                event(EventKind::Started, "t-1"),
                progress("t-1", "step 1"),
                finished(TaskView {
                    result: Some("ok\nbye".into()),
                    ..task("t-1", TaskState::Succeeded)
                }),
            ];
            let sent = events.clone();
            let (_dir, socket, server) = fake_agentd_script(move |conn| {
                let watch = answer_task_watch(conn, "t-1", task("t-1", TaskState::Queued), vec![]);
                for e in sent {
                    conn.event(watch, e);
                }
                // The connection stays open: agentctl must stop on its own.
                let mut rest = String::new();
                let _ = std::io::Read::read_to_string(&mut conn.reader, &mut rest);
            });
            let mut args = vec!["watch", "t-1"];
            if json {
                args.push("--json");
            }
            let (code, out, err) = agentctl(&socket, &args);
            server.join().unwrap();
            assert_eq!((code, err.as_str()), (EXIT_OK, ""));
            if json {
                let printed: Vec<EventView> = out
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect();
                assert_eq!(printed, events);
            } else {
                let lines: Vec<&str> = out.lines().collect();
                assert_eq!(lines.len(), 6, "{out}");
                for line in &lines[..4] {
                    let clock = &line[..8];
                    assert!(
                        clock.bytes().enumerate().all(|(i, b)| if i % 3 == 2 {
                            b == b':'
                        } else {
                            b.is_ascii_digit()
                        }),
                        "{line}"
                    );
                }
                let without_clock: Vec<&str> = lines[..4].iter().map(|l| &l[8..]).collect();
                assert_eq!(
                    without_clock,
                    [
                        "  task t-1  accepted (queued, position 2)",
                        "  task t-1  started",
                        "  task t-1  progress: step 1",
                        "  task t-1  finished: succeeded",
                    ]
                );
                assert_eq!(lines[4..], ["          ok", "          bye"]);
            }
        }
    }

    #[test]
    fn watch_a_session_runs_until_the_connection_closes() {
        let (_dir, socket, server) = fake_agentd_script(|conn| {
            let watch = conn.next();
            assert_eq!(
                watch.body,
                RequestBody::Watch {
                    task_id: None,
                    session: Some("alice".into())
                }
            );
            conn.send(&Response::ok(
                watch.id,
                WatchReply {
                    task_id: None,
                    session: Some("alice".into()),
                    task: None,
                },
            ));
            conn.event(watch.id, finished(task("t-1", TaskState::Succeeded)));
            conn.event(watch.id, event(EventKind::Started, "t-2"));
        });
        let (code, out, err) = agentctl(&socket, &["watch", "--session", "alice"]);
        server.join().unwrap();
        assert_eq!(code, EXIT_FAILURE);
        let tails: Vec<&str> = out.lines().map(|l| &l[8..]).collect();
        assert_eq!(
            tails,
            ["  task t-1  finished: succeeded", "  task t-2  started"]
        );
        assert_eq!(err, "agentctl: agentd closed the connection\n");
    }

    #[test]
    fn watch_shows_skipped_progress_and_ends_on_a_lagged_notice() {
        let script = |conn: &mut Conn| {
            let watch = conn.next();
            conn.send(&Response::ok(
                watch.id,
                WatchReply {
                    task_id: None,
                    session: Some("alice".into()),
                    task: None,
                },
            ));
            let mut line = Response::event(watch.id, progress("t-1", "step 9"));
            line.skipped = Some(8);
            conn.send(&line);
            conn.send(&Response::err(
                Some(watch.id),
                ErrorCode::Lagged,
                "fell behind",
            ));
        };
        let (_dir, socket, server) = fake_agentd_script(script);
        let (code, out, err) = agentctl(&socket, &["watch", "--session", "alice"]);
        server.join().unwrap();
        assert_eq!(code, EXIT_DAEMON_ERROR);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert_eq!(lines[0], "(8 progress lines skipped)");
        assert!(lines[1].ends_with("step 9"), "{out}");
        assert_eq!(err, "agentctl: fell behind\n");

        let (_dir, socket, server) = fake_agentd_script(script);
        let (_, out, _) = agentctl(&socket, &["--json", "watch", "--session", "alice"]);
        server.join().unwrap();
        let printed: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        assert_eq!(printed["skipped"], 8);
        assert_eq!(printed["text"], "step 9");
    }

    #[test]
    fn tasks_joins_pages_and_accepts_an_unpaged_answer() {
        let (_dir, socket, server) = fake_agentd_script(|conn| {
            let first = conn.next();
            let RequestBody::Tasks { cursor: None, .. } = first.body else {
                panic!("{first:?}");
            };
            conn.send(&Response::ok(
                first.id,
                serde_json::json!({"tasks": [task("t-2", TaskState::Queued)], "next_cursor": "t-2"}),
            ));
            let second = conn.next();
            let RequestBody::Tasks { cursor, .. } = second.body else {
                panic!("{second:?}");
            };
            assert_eq!(cursor.as_deref(), Some("t-2"));
            conn.send(&Response::ok(
                second.id,
                serde_json::json!({"tasks": [task("t-1", TaskState::Running)]}),
            ));
        });
        let (code, out, err) = agentctl(&socket, &["--json", "tasks"]);
        server.join().unwrap();
        assert_eq!(code, EXIT_OK, "{err}");
        let printed: Value = serde_json::from_str(&out).unwrap();
        let ids: Vec<&str> = printed
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["task_id"].as_str().unwrap())
            .collect();
        // Running first, then queued.
        assert_eq!(ids, ["t-1", "t-2"]);

        // An agentd from before paging answers with the whole array.
        let (_dir, socket, server) =
            fake_agentd(|request| Response::ok(request.id, vec![task("t-9", TaskState::Queued)]));
        let (code, out, _) = agentctl(&socket, &["--json", "tasks"]);
        server.join().unwrap();
        assert_eq!(code, EXIT_OK);
        assert!(out.contains("t-9"), "{out}");
    }

    #[test]
    fn watch_errors_are_daemon_errors() {
        let (_dir, socket, server) = fake_agentd(|request| {
            Response::err(Some(request.id), ErrorCode::NotFound, "no task t-9")
        });
        let (code, out, err) = agentctl(&socket, &["watch", "t-9"]);
        server.join().unwrap();
        assert_eq!(
            (code, out.as_str(), err.as_str()),
            (EXIT_DAEMON_ERROR, "", "agentctl: no task t-9\n")
        );
    }

    #[test]
    fn json_prints_the_result_verbatim() {
        let (_dir, socket, server) = fake_agentd(|request| {
            Response::ok(
                request.id,
                serde_json::json!({"pong": true, "version": "0.1.0", "pid": 9, "uptime_ms": 5}),
            )
        });
        let (code, out, err) = agentctl(&socket, &["ping", "--json"]);
        server.join().unwrap();
        assert_eq!(code, EXIT_OK, "{err}");
        let printed: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            printed,
            serde_json::json!({"pong": true, "version": "0.1.0", "pid": 9, "uptime_ms": 5})
        );
        assert!(out.ends_with("}\n") && out.lines().count() == 1, "{out}");
    }

    #[test]
    fn daemon_errors_exit_1_and_json_prints_the_error_object() {
        for json in [false, true] {
            let (_dir, socket, server) = fake_agentd(|request| {
                Response::err(Some(request.id), ErrorCode::NotFound, "no task t-9")
            });
            let args: &[&str] = if json {
                &["status", "t-9", "--json"]
            } else {
                &["status", "t-9"]
            };
            let (code, out, err) = agentctl(&socket, args);
            server.join().unwrap();
            assert_eq!(code, EXIT_DAEMON_ERROR);
            assert_eq!(err, "agentctl: no task t-9\n");
            let expected_out = if json {
                "{\"code\":\"not_found\",\"message\":\"no task t-9\"}\n"
            } else {
                ""
            };
            assert_eq!(out, expected_out);
        }
    }

    #[test]
    fn an_unexpected_answer_exits_4() {
        let (_dir, socket, server) =
            fake_agentd(|request| Response::ok(request.id, "not a status"));
        let (code, out, err) = agentctl(&socket, &["status"]);
        server.join().unwrap();
        assert_eq!(code, EXIT_FAILURE);
        assert_eq!(out, "");
        assert!(
            err.starts_with("agentctl: unexpected answer from agentd: "),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1);
    }

    /// A stdout that is closed.
    struct ClosedPipe;

    impl Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    #[test]
    fn a_closed_stdout_exits_0_quietly() {
        let (_dir, socket, server) =
            fake_agentd(|request| Response::ok(request.id, serde_json::json!({"tasks": []})));
        let cli = Cli::try_parse_checked(
            ["agentctl", "tasks", "--socket"]
                .into_iter()
                .map(OsString::from)
                .chain([socket.clone().into_os_string()]),
        )
        .unwrap();
        let mut err = Vec::new();
        let code = execute(&cli, &mut ClosedPipe, &mut err);
        server.join().unwrap();
        assert_eq!(code, EXIT_OK);
        assert!(err.is_empty());
    }
}
