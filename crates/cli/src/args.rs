//! agentctl's command line, as clap types.
//!
//! [`Cli`] holds the global flags (`--socket`, `--json`, accepted before or after the
//! subcommand) and one [`Command`]. Each command that maps to exactly one control
//! request says so through [`Command::request`]; commands that stream or converse
//! (`watch`, `send --wait`) are run by their own code.
//!
//! Parse with [`Cli::try_parse_checked`]: on top of clap's own parsing it rejects
//! what clap cannot see, such as the same queue setting given twice.

use std::path::PathBuf;

use agentd_proto::control::{DropPolicy, Named, Priority, QueueMode, RequestBody};
use agentd_proto::paths::default_socket_path;
use clap::error::ErrorKind;
use clap::{ArgGroup, Args, CommandFactory, Parser, Subcommand};

/// `agentctl [--socket PATH] [--json] <command>`
#[derive(Debug, Clone, Parser)]
#[command(
    name = "agentctl",
    version,
    about = "Control agentd, the supervisor daemon for AI agents",
    after_help = "Exit status: 0 success, 1 agentd answered with an error, 2 usage error, \
                  3 agentd is not running or cannot be reached, 4 other failure \
                  (timeout, lost connection, unexpected answer), 5 `send --wait`: the \
                  task did not succeed, 130 `send --wait`, `watch` or `chat` interrupted \
                  by Ctrl-C (the tasks go on; `agentctl stop ID` stops one)."
)]
pub struct Cli {
    /// The control socket [default: $AGENTD_SOCKET, else
    /// $XDG_RUNTIME_DIR/agentd/agentd.sock, else /tmp/agentd-$UID/agentd.sock]
    // An empty value is a usage error, as for agentd (it would silently mean the
    // default socket). `$AGENTD_SOCKET` is read by `socket_path` (where empty means
    // unset, as in agentd), not by clap: clap would count a flag given by the
    // environment as given, and show it in every usage error's usage line as if it
    // were required.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        value_parser = clap::builder::PathBufValueParser::new()
    )]
    pub socket: Option<PathBuf>,

    /// Print agentd's answer as one JSON value on stdout (`watch`, `chat` and `log`: one
    /// object per line, an event, an answer or a piece of the log)
    #[arg(long, global = true)]
    pub json: bool,

    /// Show full task ids in tables instead of short unique prefixes
    #[arg(long, global = true)]
    pub full: bool,

    /// Colour the output: auto (on a terminal, unless NO_COLOR is set), always or never
    #[arg(long, global = true, value_name = "WHEN", default_value = "auto")]
    pub color: ColorWhen,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The socket to connect to: `--socket` (never empty), else `$AGENTD_SOCKET`
    /// (empty counts as unset), else the default path.
    pub fn socket_path(&self) -> PathBuf {
        match &self.socket {
            Some(path) => path.clone(),
            None => default_socket_path(),
        }
    }

    /// Parses `args` (program name first) like clap's `try_parse_from`, then
    /// [`check`](Cli::check)s the result. Errors are clap errors, exit code 2 (or 0
    /// for `--help` and `--version`).
    pub fn try_parse_checked<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let cli = Cli::try_parse_from(args)?;
        cli.check()?;
        Ok(cli)
    }

    /// What clap cannot check on its own: `queue` settings given twice (`collect
    /// steer`, `cap:5 cap:6`).
    pub fn check(&self) -> Result<(), clap::Error> {
        if let Command::Queue(q) = &self.command {
            if let Err(message) = q.change() {
                let mut command = Cli::command();
                command.build();
                let error = match command.find_subcommand_mut("queue") {
                    Some(queue) => queue.error(ErrorKind::ArgumentConflict, message),
                    None => Cli::command().error(ErrorKind::ArgumentConflict, message),
                };
                return Err(error);
            }
        }
        Ok(())
    }
}

/// agentctl's subcommands.
///
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Send a chat message to a session: work, or a control command such as /status
    Send(SendArgs),
    /// Show agentd's status, or one task's
    Status(StatusArgs),
    /// List running and queued tasks
    Tasks(TasksArgs),
    /// Stop a task, a session's tasks, or every task; waits until they have ended
    /// (unless --no-wait)
    Stop(StopArgs),
    /// Show or change how a session queues messages that arrive while it is busy
    Queue(QueueArgs),
    /// Follow a task, or every task of a session, as events happen
    Watch(WatchArgs),
    /// Print a task's whole output (its log), also after it ended or agentd restarted
    Log(LogArgs),
    /// Run an interrupted, cancelled or failed task again in its session, as a new
    /// attempt; its agent gets the last checkpoint the task saved
    Resume(ResumeArgs),
    /// Check that agentd is running
    #[command(after_help = "Examples:\n  \
                            agentctl ping\n  \
                            agentctl --socket /run/user/1000/agentd/agentd.sock ping")]
    Ping,
    /// Chat with a session in the terminal: each line is a message, /commands are
    /// answered at once, events and results stream in between; /quit, Ctrl-D or Ctrl-C
    /// leaves
    Chat(ChatArgs),
    /// Print a shell completion script for bash, zsh, fish, elvish or powershell (see
    /// the README for where to put it)
    Completions(CompletionsArgs),
    /// Print agentctl's man page, or write one page per command into DIR
    Man(ManArgs),
}

/// When to colour the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorWhen {
    /// On a terminal, unless NO_COLOR is set (CLICOLOR_FORCE forces it)
    Auto,
    /// Also when piped
    Always,
    /// Plain text
    Never,
}

/// `chat --session S [--background] [--mode MODE]`
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Examples:\n  agentctl chat --session alice\n  agentctl chat --session alice --mode steer   # messages go into the running task"
)]
pub struct ChatArgs {
    /// The session (chat) to talk to
    #[arg(long, value_name = "S")]
    pub session: String,

    /// Send every message with background priority
    #[arg(long)]
    pub background: bool,

    /// Queue mode for every message, if the session is busy
    #[arg(long, value_name = "MODE", value_parser = parse_queue_mode)]
    pub mode: Option<QueueMode>,
}

impl ChatArgs {
    /// The `send` request for one typed line.
    pub fn request(&self, line: &str) -> RequestBody {
        RequestBody::Send {
            session: self.session.clone(),
            text: line.to_string(),
            message_id: None,
            priority: self.background.then_some(Priority::Background),
            mode: self.mode,
            timeout_ms: None,
        }
    }
}

/// `completions SHELL`
#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for
    #[arg(value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

/// `man [DIR]`
#[derive(Debug, Clone, Args)]
pub struct ManArgs {
    /// Write agentctl.1, agentctl-COMMAND.1 and agentd.1 into this directory instead
    /// of printing agentctl.1
    #[arg(value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// The other programs whose pages go into DIR: agentd's, which the `agentctl`
    /// binary passes in ([`crate::main_with_pages`]).
    #[arg(skip)]
    pub companions: Vec<clap::Command>,
}

impl Command {
    /// The one control request this command makes, or `None` for commands that are
    /// not a single request/answer (`watch`). For `send --wait` this is the first
    /// request, the `send`.
    pub fn request(&self) -> Option<RequestBody> {
        Some(match self {
            Command::Send(a) => a.request(),
            Command::Status(a) => RequestBody::Status {
                task_id: a.task_id.clone(),
            },
            // The first page; agentctl fetches the others (see `Ctx::tasks`).
            Command::Tasks(a) => RequestBody::Tasks {
                session: a.session.clone(),
                all: a.all,
                limit: Some(agentd_proto::control::MAX_TASKS_PAGE),
                cursor: None,
            },
            Command::Stop(a) => RequestBody::Stop {
                task_id: a.task_id.clone(),
                session: a.session.clone(),
                all: a.all,
                wait: !a.no_wait,
            },
            Command::Queue(a) => a.request(),
            Command::Log(a) => RequestBody::Log {
                task_id: a.task_id.clone(),
                offset: 0,
            },
            Command::Resume(a) => RequestBody::Resume {
                task_id: a.task_id.clone(),
            },
            Command::Ping => RequestBody::Ping,
            Command::Watch(_) | Command::Chat(_) | Command::Completions(_) | Command::Man(_) => {
                return None
            }
        })
    }
}

/// `send --session S [--message-id ID] [--background] [--mode MODE] [--wait] TEXT...`
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Examples:\n  agentctl send --session alice 'make -j2 && ./run-long-job'\n  agentctl send --session alice --wait 'cargo test'   # progress, then the result\n  agentctl send --session alice /status   # a chat command, answered at once\n  agentctl send --session alice --mode steer 'use Python 3.12'\n  agentctl send --session cron --background --timeout 30m 'nightly report'"
)]
pub struct SendArgs {
    /// The session (chat) the message belongs to
    #[arg(long, value_name = "S")]
    pub session: String,

    /// The sender's own id for the message; a re-delivery with the same id is not run twice
    #[arg(long, value_name = "ID")]
    pub message_id: Option<String>,

    /// Background priority: admitted after interactive work, within its own cap
    #[arg(long)]
    pub background: bool,

    /// Queue mode for this message only, if the session is busy: collect, followup,
    /// steer, steer-backlog, interrupt
    #[arg(long, value_name = "MODE", value_parser = parse_queue_mode)]
    pub mode: Option<QueueMode>,

    /// Run-time limit of this task (e.g. 10m), instead of agentd's --task-timeout:
    /// past it the task is stopped and fails as `timed out`
    #[arg(long, value_name = "DUR", value_parser = parse_timeout)]
    pub timeout: Option<std::time::Duration>,

    /// Wait until the task has ended, printing its progress, then its outcome and
    /// result; exit 5 if it did not succeed
    #[arg(long)]
    pub wait: bool,

    /// The message; words are joined by single spaces (use `--` before text that
    /// starts with `-`)
    #[arg(required = true, value_name = "TEXT")]
    pub text: Vec<String>,
}

impl SendArgs {
    /// The `send` request.
    pub fn request(&self) -> RequestBody {
        RequestBody::Send {
            session: self.session.clone(),
            text: self.text.join(" "),
            message_id: self.message_id.clone(),
            priority: self.background.then_some(Priority::Background),
            mode: self.mode,
            timeout_ms: self
                .timeout
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        }
    }
}

/// `log [-f] TASK_ID`
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Examples:\n  agentctl log 01a1fb45-182d\n  agentctl log -f 01a1fb45-182d   # follow the output until the task ends"
)]
pub struct LogArgs {
    /// The task (an id, or a unique prefix of one)
    #[arg(value_name = "TASK_ID")]
    pub task_id: String,
    /// Keep printing the output of a running task as it comes, until it ends
    #[arg(short, long)]
    pub follow: bool,
}

/// `resume TASK_ID`
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Examples:\n  agentctl resume 01a1fb45-182d   # after `agentctl stop`, or a restart\n  agentctl --json resume 01a1fb45-182d"
)]
pub struct ResumeArgs {
    /// The task to run again (an id, or a unique prefix of one)
    #[arg(value_name = "TASK_ID")]
    pub task_id: String,
}

/// `status [TASK_ID]`
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Examples:\n  agentctl status\n  agentctl status 01a1fb45-182d   # one task, by a unique prefix of its id\n  agentctl --json status"
)]
pub struct StatusArgs {
    /// Show this task instead of the daemon
    #[arg(value_name = "TASK_ID")]
    pub task_id: Option<String>,
}

/// `tasks [--session S] [--all]`
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Examples:\n  agentctl tasks\n  agentctl tasks --session alice --all   # with ended ones\n  agentctl --json tasks --all"
)]
pub struct TasksArgs {
    /// Only this session's tasks
    #[arg(long, value_name = "S")]
    pub session: Option<String>,

    /// Include ended tasks (of earlier runs too, as far as the retention keeps them)
    #[arg(long)]
    pub all: bool,
}

/// `stop TASK_ID | --session S | --all`
#[derive(Debug, Clone, Args)]
#[command(group(
    ArgGroup::new("target")
        .required(true)
        .args(["task_id", "session", "all"])
))]
#[command(
    after_help = "Examples:\n  agentctl stop 01a1fb45-182d\n  agentctl stop --session alice   # its queued messages, then its running task\n  agentctl stop --all --no-wait"
)]
pub struct StopArgs {
    /// The task to stop
    #[arg(value_name = "TASK_ID")]
    pub task_id: Option<String>,

    /// Stop this session's running and queued tasks
    #[arg(long, value_name = "S")]
    pub session: Option<String>,

    /// Stop every task
    #[arg(long)]
    pub all: bool,

    /// Answer as soon as the stop has begun, saying where it stands, instead of
    /// waiting until the tasks have ended
    #[arg(long)]
    pub no_wait: bool,
}

/// `queue --session S [--reset] [MODE] [OPTS...]`
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Without MODE, OPTS or --reset the settings are only shown.\n\n\
                  Examples:\n  \
                  agentctl queue --session alice   # show them\n  \
                  agentctl queue --session alice steer\n  \
                  agentctl queue --session alice collect debounce:2s cap:25 drop:summarize\n  \
                  agentctl queue --session alice --reset"
)]
pub struct QueueArgs {
    /// The session (chat) whose settings to show or change
    #[arg(long, value_name = "S")]
    pub session: String,

    /// Back to agentd's defaults (applied before any MODE or OPTS given with it)
    #[arg(long)]
    pub reset: bool,

    /// In any order: a mode (collect, followup, steer, steer-backlog, interrupt) and
    /// options debounce:DURATION (e.g. 2s, 500ms), cap:N (held messages, at least
    /// 1), drop:old|new|summarize (what happens past the cap)
    #[arg(value_name = "MODE|OPTS", value_parser = parse_queue_setting)]
    pub settings: Vec<QueueSetting>,
}

impl QueueArgs {
    /// The settings folded into one change, or why they contradict each other (the
    /// same setting given twice).
    pub fn change(&self) -> Result<QueueChange, String> {
        match self.fold() {
            (change, None) => Ok(change),
            (_, Some(name)) => Err(format!("the queue {name} is given more than once")),
        }
    }

    /// The `queue` request. A setting given twice counts once, the last time (a
    /// command line from [`Cli::try_parse_checked`] has none).
    pub fn request(&self) -> RequestBody {
        let (change, _) = self.fold();
        RequestBody::Queue {
            session: self.session.clone(),
            mode: change.mode,
            debounce_ms: change.debounce_ms,
            cap: change.cap,
            drop: change.drop,
            reset: change.reset,
        }
    }

    /// The change (last one wins) and the name of the first setting given twice.
    fn fold(&self) -> (QueueChange, Option<&'static str>) {
        let mut change = QueueChange {
            reset: self.reset,
            ..QueueChange::default()
        };
        let mut twice = None;
        for setting in &self.settings {
            let (name, taken) = match *setting {
                QueueSetting::Mode(mode) => ("mode", change.mode.replace(mode).is_some()),
                QueueSetting::Debounce(ms) => {
                    ("debounce", change.debounce_ms.replace(ms).is_some())
                }
                QueueSetting::Cap(cap) => ("cap", change.cap.replace(cap).is_some()),
                QueueSetting::Drop(drop) => ("drop", change.drop.replace(drop).is_some()),
            };
            if taken && twice.is_none() {
                twice = Some(name);
            }
        }
        (change, twice)
    }
}

/// One word of `queue`'s MODE and OPTS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueSetting {
    /// `collect`, `followup`, `steer`, `steer-backlog`, `interrupt`
    Mode(QueueMode),
    /// `debounce:2s`, in milliseconds
    Debounce(u64),
    /// `cap:25`
    Cap(u32),
    /// `drop:old`, `drop:new`, `drop:summarize`
    Drop(DropPolicy),
}

/// What a `queue` command changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueChange {
    pub reset: bool,
    pub mode: Option<QueueMode>,
    pub debounce_ms: Option<u64>,
    pub cap: Option<u32>,
    pub drop: Option<DropPolicy>,
}

/// `watch TASK_ID | --session S`
#[derive(Debug, Clone, Args)]
#[command(group(
    ArgGroup::new("target")
        .required(true)
        .args(["task_id", "session"])
))]
#[command(
    after_help = "Examples:\n  agentctl watch 01a1fb45-182d\n  agentctl watch --session alice   # until Ctrl-C\n  agentctl --json watch --session alice   # one event object per line"
)]
pub struct WatchArgs {
    /// Follow this task until it ends
    #[arg(value_name = "TASK_ID")]
    pub task_id: Option<String>,

    /// Follow every task of this session until interrupted (Ctrl-C)
    #[arg(long, value_name = "S")]
    pub session: Option<String>,
}

impl WatchArgs {
    /// The `watch` request.
    pub fn request(&self) -> RequestBody {
        RequestBody::Watch {
            task_id: self.task_id.clone(),
            session: self.session.clone(),
        }
    }
}

/// A queue mode, in any case (the spellings of [`Named`]).
pub fn parse_queue_mode(s: &str) -> Result<QueueMode, String> {
    QueueMode::parse_name(s)
}

/// One word of `queue`'s MODE and OPTS: a mode, `debounce:DURATION`, `cap:N` or
/// `drop:POLICY`.
pub fn parse_queue_setting(s: &str) -> Result<QueueSetting, String> {
    let Some((key, value)) = s.split_once(':') else {
        if s.eq_ignore_ascii_case("reset") {
            return Err("to reset the settings use --reset".into());
        }
        return parse_queue_mode(s).map(QueueSetting::Mode).map_err(|e| {
            format!(
                "{e}; options are debounce:DURATION, cap:N and drop:{}",
                DropPolicy::joined("|")
            )
        });
    };
    // Keys in any case, as in the chat's `/queue`.
    match key.to_ascii_lowercase().as_str() {
        "debounce" => parse_debounce(value).map(QueueSetting::Debounce),
        "cap" => match value.parse::<u32>() {
            Ok(0) => Err("cap must be at least 1".into()),
            Ok(cap) => Ok(QueueSetting::Cap(cap)),
            Err(_) => Err(format!(
                "cap must be a whole number of messages, e.g. cap:25 (got '{value}')"
            )),
        },
        "drop" => DropPolicy::parse_name(value).map(QueueSetting::Drop),
        _ => Err(format!(
            "unknown queue option '{key}' (expected debounce:DURATION, cap:N or drop:{})",
            DropPolicy::joined("|")
        )),
    }
}

/// A task's run-time limit: a duration of at least a millisecond.
fn parse_timeout(value: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(value).map_err(|e| {
        format!("timeout must be a duration such as 10m or 30s (got '{value}': {e})")
    })?;
    if d.as_millis() == 0 {
        return Err(format!("timeout must be at least 1ms (got '{value}')"));
    }
    Ok(d)
}

/// `2s`, `500ms`, `1m 30s`, `0` → milliseconds; finer than a millisecond is refused
/// rather than rounded.
fn parse_debounce(value: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(value).map_err(|e| {
        format!("debounce must be a duration such as 2s or 500ms (got '{value}': {e})")
    })?;
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!(
            "debounce must be a whole number of milliseconds (got '{value}')"
        ));
    }
    u64::try_from(d.as_millis()).map_err(|_| format!("debounce '{value}' is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits an example line as the shell would: blanks between words, single quotes
    /// around a word with blanks (all the examples need).
    fn words(line: &str) -> Vec<String> {
        let (mut words, mut word, mut quoted, mut any) = (Vec::new(), String::new(), false, false);
        for c in line.chars() {
            match c {
                '\'' => (quoted, any) = (!quoted, true),
                c if c.is_whitespace() && !quoted => {
                    if any {
                        words.push(std::mem::take(&mut word));
                    }
                    any = false;
                }
                c => (word, any) = (word + &c.to_string(), true),
            }
        }
        assert!(!quoted, "unbalanced quotes in {line:?}");
        if any {
            words.push(word);
        }
        words
    }

    /// Each command that talks to agentd ends its `--help` (and man page) with
    /// examples, and each example is a command line agentctl parses as that command.
    #[test]
    fn every_command_gives_examples_that_parse() {
        let cli = Cli::command();
        for sub in cli.get_subcommands() {
            let name = sub.get_name();
            if ["help", "completions", "man"].contains(&name) {
                continue;
            }
            let help = sub.clone().render_long_help().to_string();
            let (_, examples) = help
                .split_once("Examples:\n")
                .unwrap_or_else(|| panic!("`{name} --help` gives no examples:\n{help}"));
            let lines: Vec<&str> = examples
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty())
                .collect();
            assert!(!lines.is_empty(), "{name}: {help}");
            for line in lines {
                let line = line.split("  # ").next().unwrap().trim_end();
                let argv = words(line);
                assert_eq!(argv.first().map(String::as_str), Some("agentctl"), "{line}");
                if let Err(e) = Cli::try_parse_checked(&argv) {
                    panic!("`{line}` does not parse: {e}");
                }
                let matches = Cli::command().try_get_matches_from(&argv).unwrap();
                let parsed_name = matches.subcommand_name();
                assert_eq!(parsed_name, Some(name), "`{line}`");
            }
        }
    }

    /// The help of `--mode` and of `queue`'s MODE|OPTS lists every spelling of the
    /// name tables, and every spelling parses in any case.
    #[test]
    fn help_and_parsers_follow_the_name_tables() {
        let cli = Cli::command();
        let help = |sub: &str, arg: &str| -> String {
            cli.find_subcommand(sub)
                .and_then(|c| c.get_arguments().find(|a| a.get_id() == arg))
                .and_then(|a| a.get_help())
                .map(|h| h.to_string().replace('\n', " "))
                .unwrap_or_default()
        };
        assert!(help("send", "mode").contains(&QueueMode::one_of()));
        let queue = help("queue", "settings");
        assert!(queue.contains(&QueueMode::one_of()), "{queue}");
        assert!(
            queue.contains(&format!("drop:{}", DropPolicy::joined("|"))),
            "{queue}"
        );
        for (mode, word) in QueueMode::NAMES {
            for spelled in [word.to_string(), word.to_uppercase()] {
                assert_eq!(parse_queue_mode(&spelled), Ok(*mode));
                assert_eq!(parse_queue_setting(&spelled), Ok(QueueSetting::Mode(*mode)));
            }
        }
        for (drop, word) in DropPolicy::NAMES {
            let spelled = format!("Drop:{}", word.to_uppercase());
            assert_eq!(parse_queue_setting(&spelled), Ok(QueueSetting::Drop(*drop)));
        }
        assert_eq!(parse_queue_setting("CAP:3"), Ok(QueueSetting::Cap(3)));
        assert_eq!(
            parse_queue_setting("Debounce:2s"),
            Ok(QueueSetting::Debounce(2000))
        );
    }
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_checked(std::iter::once("agentctl").chain(args.iter().copied()))
    }

    /// The usage error for `args`, as clap prints it.
    fn usage_error(args: &[&str]) -> String {
        let err = parse(args).unwrap_err();
        assert!(err.use_stderr(), "{args:?}");
        assert_eq!(err.exit_code(), 2, "{args:?}");
        err.render().to_string()
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn send_joins_words() {
        let cli = parse(&["send", "--session", "alice", "fix", "the", "build"]).unwrap();
        assert_eq!(
            cli.command.request(),
            Some(RequestBody::Send {
                session: "alice".into(),
                text: "fix the build".into(),
                message_id: None,
                priority: None,
                mode: None,
                timeout_ms: None,
            })
        );
        let cli = parse(&[
            "send",
            "--session",
            "a",
            "--message-id",
            "m1",
            "--",
            "-v",
            "/status",
        ])
        .unwrap();
        assert_eq!(
            cli.command.request(),
            Some(RequestBody::Send {
                session: "a".into(),
                text: "-v /status".into(),
                message_id: Some("m1".into()),
                priority: None,
                mode: None,
                timeout_ms: None,
            })
        );
        assert!(parse(&["send", "--session", "a"]).is_err());
        assert!(parse(&["send", "hello"]).is_err());
    }

    /// `--timeout` past what u64 milliseconds hold was cast with `as`: the limit
    /// sent wrapped around (`18446744073709552s` became 384 ms). It saturates.
    #[test]
    fn a_send_timeout_past_u64_milliseconds_saturates() {
        for (text, ms) in [
            ("10m", 600_000),
            ("18446744073709551615s", u64::MAX),
            // Wrapped to a limit of 384 ms.
            ("18446744073709552s", u64::MAX),
        ] {
            let cli = parse(&["send", "--session", "a", "--timeout", text, "x"]).unwrap();
            assert!(
                matches!(cli.command.request(), Some(RequestBody::Send { timeout_ms: Some(t), .. }) if t == ms),
                "{text}: {:?}",
                cli.command.request()
            );
        }
    }

    #[test]
    fn send_priority_mode_and_wait() {
        let cli = parse(&[
            "send",
            "--session",
            "a",
            "--background",
            "--mode",
            "steer-backlog",
            "--wait",
            "run",
            "it",
        ])
        .unwrap();
        let Command::Send(args) = &cli.command else {
            panic!("not send: {cli:?}");
        };
        assert!(args.wait);
        assert_eq!(
            cli.command.request(),
            Some(RequestBody::Send {
                session: "a".into(),
                text: "run it".into(),
                message_id: None,
                priority: Some(Priority::Background),
                mode: Some(QueueMode::SteerBacklog),
                timeout_ms: None,
            })
        );
        for (word, mode) in QueueMode::all().map(|m| (m.as_str(), m)) {
            let cli = parse(&["send", "--session", "a", "--mode", word, "x"]).unwrap();
            assert!(
                matches!(cli.command.request(), Some(RequestBody::Send { mode: Some(m), .. }) if m == mode)
            );
        }
        let err = usage_error(&["send", "--session", "a", "--mode", "later", "x"]);
        assert!(
            err.contains(
                "unknown queue mode \"later\" (expected one of collect, followup, steer, \
                 steer-backlog, interrupt)"
            ),
            "{err}"
        );
    }

    #[test]
    fn queue_settings_in_any_order() {
        let cli = parse(&["queue", "--session", "s"]).unwrap();
        assert_eq!(
            cli.command.request(),
            Some(RequestBody::Queue {
                session: "s".into(),
                mode: None,
                debounce_ms: None,
                cap: None,
                drop: None,
                reset: false,
            })
        );
        let cli = parse(&[
            "queue",
            "cap:25",
            "--session",
            "s",
            "drop:summarize",
            "followup",
            "debounce:2s",
            "--reset",
        ])
        .unwrap();
        assert_eq!(
            cli.command.request(),
            Some(RequestBody::Queue {
                session: "s".into(),
                mode: Some(QueueMode::Followup),
                debounce_ms: Some(2_000),
                cap: Some(25),
                drop: Some(DropPolicy::Summarize),
                reset: true,
            })
        );
        for (word, ms) in [
            ("debounce:500ms", 500),
            ("debounce:0", 0),
            ("debounce:1m 30s", 90_000),
            ("debounce:1.5s", 1_500),
        ] {
            assert_eq!(parse_queue_setting(word), Ok(QueueSetting::Debounce(ms)));
        }
        assert_eq!(
            parse_queue_setting("drop:old"),
            Ok(QueueSetting::Drop(DropPolicy::Old))
        );
        assert_eq!(
            parse_queue_setting("interrupt"),
            Ok(QueueSetting::Mode(QueueMode::Interrupt))
        );
    }

    #[test]
    fn queue_setting_errors_are_usage_errors() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["bogus"],
                "unknown queue mode \"bogus\" (expected one of collect, followup, steer, \
                 steer-backlog, interrupt); options are debounce:DURATION, cap:N and \
                 drop:old|new|summarize",
            ),
            (&["cap:0"], "cap must be at least 1"),
            (
                &["cap:many"],
                "cap must be a whole number of messages, e.g. cap:25 (got 'many')",
            ),
            (&["cap:-1"], "cap must be a whole number of messages"),
            (
                &["debounce:soon"],
                "debounce must be a duration such as 2s or 500ms (got 'soon': ",
            ),
            (
                &["debounce:1500us"],
                "debounce must be a whole number of milliseconds (got '1500us')",
            ),
            (
                &["drop:newest"],
                "unknown drop policy \"newest\" (expected one of old, new, summarize)",
            ),
            (
                &["speed:3"],
                "unknown queue option 'speed' (expected debounce:DURATION, cap:N or \
                 drop:old|new|summarize)",
            ),
            (&["reset"], "to reset the settings use --reset"),
            (
                &["collect", "steer"],
                "the queue mode is given more than once",
            ),
            (
                &["cap:1", "steer", "cap:2"],
                "the queue cap is given more than once",
            ),
            (
                &["debounce:1s", "debounce:1s"],
                "the queue debounce is given more than once",
            ),
        ];
        for (words, expected) in cases {
            let mut args = vec!["queue", "--session", "s"];
            args.extend_from_slice(words);
            let err = usage_error(&args);
            assert!(err.starts_with("error: "), "{err}");
            assert!(err.contains(expected), "{words:?}: {err}");
        }
        let err = usage_error(&["queue", "collect"]);
        assert!(err.contains("--session <S>"), "{err}");
    }

    #[test]
    fn watch_takes_a_task_or_a_session() {
        let cli = parse(&["watch", "t1"]).unwrap();
        let Command::Watch(args) = &cli.command else {
            panic!("not watch: {cli:?}");
        };
        assert_eq!(
            args.request(),
            RequestBody::Watch {
                task_id: Some("t1".into()),
                session: None,
            }
        );
        assert_eq!(cli.command.request(), None);
        let cli = parse(&["watch", "--session", "bob", "--json"]).unwrap();
        let Command::Watch(args) = &cli.command else {
            panic!("not watch: {cli:?}");
        };
        assert!(cli.json);
        assert_eq!(
            args.request(),
            RequestBody::Watch {
                task_id: None,
                session: Some("bob".into()),
            }
        );
        for bad in [&["watch"][..], &["watch", "t1", "--session", "bob"]] {
            usage_error(bad);
        }
    }

    #[test]
    fn global_flags_go_before_or_after_the_subcommand() {
        let before = parse(&["--socket", "/s", "--json", "ping"]).unwrap();
        let after = parse(&["ping", "--json", "--socket", "/s"]).unwrap();
        for cli in [before, after] {
            assert!(cli.json);
            assert_eq!(cli.socket_path(), PathBuf::from("/s"));
        }
        let cli = parse(&["tasks", "--all", "--json"]).unwrap();
        assert!(cli.json);
    }

    #[test]
    fn stop_takes_exactly_one_target() {
        for ok in [
            &["stop", "0190"][..],
            &["stop", "--session", "a"],
            &["stop", "--all"],
        ] {
            assert!(parse(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            &["stop"][..],
            &["stop", "0190", "--all"],
            &["stop", "--session", "a", "--all"],
            &["stop", "0190", "--session", "a"],
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.use_stderr(), "{bad:?}");
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
        let cli = parse(&["stop", "--session", "a"]).unwrap();
        assert_eq!(
            cli.command.request(),
            Some(RequestBody::Stop {
                task_id: None,
                session: Some("a".into()),
                all: false,
                wait: true,
            })
        );
        let cli = parse(&["stop", "--no-wait", "0190"]).unwrap();
        assert_eq!(
            cli.command.request(),
            Some(RequestBody::Stop {
                task_id: Some("0190".into()),
                session: None,
                all: false,
                wait: false,
            })
        );
    }

    #[test]
    fn status_and_tasks_map_to_their_requests() {
        let cli = parse(&["status"]).unwrap();
        assert_eq!(
            cli.command.request(),
            Some(RequestBody::Status { task_id: None })
        );
        let cli = parse(&["status", "t1"]).unwrap();
        assert_eq!(
            cli.command.request(),
            Some(RequestBody::Status {
                task_id: Some("t1".into())
            })
        );
        let cli = parse(&["tasks", "--session", "bob", "--all"]).unwrap();
        assert_eq!(
            cli.command.request(),
            Some(RequestBody::Tasks {
                session: Some("bob".into()),
                all: true,
                limit: Some(agentd_proto::control::MAX_TASKS_PAGE),
                cursor: None,
            })
        );
    }

    #[test]
    fn an_empty_socket_is_a_usage_error() {
        let err = parse(&["--socket", "", "ping"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--socket"), "{err}");
    }
    #[test]
    fn chat_completions_man_and_the_output_flags() {
        let cli = parse(&["chat", "--session", "alice", "--mode", "steer"]).unwrap();
        let Command::Chat(args) = &cli.command else {
            panic!("not chat: {cli:?}");
        };
        assert_eq!(cli.command.request(), None);
        assert_eq!(
            args.request("/status"),
            RequestBody::Send {
                session: "alice".into(),
                text: "/status".into(),
                message_id: None,
                priority: None,
                mode: Some(QueueMode::Steer),
                timeout_ms: None,
            }
        );
        usage_error(&["chat"]);
        for shell in ["bash", "zsh", "fish"] {
            let cli = parse(&["completions", shell]).unwrap();
            assert!(matches!(cli.command, Command::Completions(_)), "{shell}");
        }
        let err = usage_error(&["completions", "cmd.exe"]);
        assert!(err.contains("bash") && err.contains("zsh"), "{err}");
        let cli = parse(&["man", "/tmp/pages"]).unwrap();
        assert!(
            matches!(&cli.command, Command::Man(m) if m.dir.as_deref() == Some(std::path::Path::new("/tmp/pages")))
        );
        let cli = parse(&["tasks", "--full", "--color", "never"]).unwrap();
        assert!(cli.full);
        assert_eq!(cli.color, ColorWhen::Never);
        assert_eq!(parse(&["ping"]).unwrap().color, ColorWhen::Auto);
        usage_error(&["ping", "--color", "sometimes"]);
    }
}
