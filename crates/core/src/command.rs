//! Control commands typed as chat text (`/status`, `/stop`, `/tasks`, `/queue`, `/help`).
//!
//! They are recognised here, before anything could queue them, and answered by the
//! control plane at once. Text that is not one of these commands is work.

use std::time::Duration;

use crate::names::Named;
use crate::queue::{DropPolicy, Mode, QueueSettings, MAX_DEBOUNCE};

/// A control command found in a chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatCommand {
    /// `/status` or `/status <task id>`.
    Status { task: Option<String> },
    /// `/stop`, `/stop <task id>` or `/stop all`.
    Stop(StopArg),
    /// `/tasks`.
    Tasks,
    /// `/resume` or `/resume <task id>`: run an interrupted, cancelled or failed task
    /// of this chat again (without an id: the chat's latest such task).
    Resume { task: Option<String> },
    /// `/help`.
    Help,
    /// `/queue …` that changes or shows settings.
    Queue(QueueCommand),
    /// `/queue <mode> <text…>`: work, with a mode for this message only.
    WorkWithMode { mode: Mode, text: String },
    /// A command with a mistake in it; `reply` says what.
    Invalid { reply: String },
    /// `/<word>` where the word names no command (a typo such as `/stauts`): refused,
    /// never run as work. `command` is the word, in lower case, without `@botname`.
    Unknown { command: String },
    /// `//text…`: work whose text starts with a slash (one slash is removed).
    Work { text: String },
}

/// The commands a chat can give, in the order `/help` and refusals list them.
pub const COMMANDS: &[&str] = &["status", "stop", "tasks", "resume", "queue", "help"];

/// What a `/queue` command asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueCommand {
    /// `/queue`: show the settings in force.
    Show,
    /// `/queue reset` (or `default`, `clear`): back to the daemon's defaults.
    Reset,
    /// `/queue [mode] [debounce:2s] [cap:25] [drop:summarize]`: change what is given.
    Set(QueueChange),
}

/// The settings a `/queue` command changes; `None` keeps the current value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueChange {
    pub mode: Option<Mode>,
    pub debounce: Option<Duration>,
    pub cap: Option<u32>,
    pub drop: Option<DropPolicy>,
}

impl QueueChange {
    /// Applies the change to `settings`.
    pub fn apply(&self, mut settings: QueueSettings) -> QueueSettings {
        if let Some(mode) = self.mode {
            settings.mode = mode;
        }
        if let Some(debounce) = self.debounce {
            settings.debounce = debounce;
        }
        if let Some(cap) = self.cap {
            settings.cap = cap;
        }
        if let Some(drop) = self.drop {
            settings.drop = drop;
        }
        settings
    }
}

/// Parses a duration such as `500ms`, `2s`, `1.5s`, `3m`, `1h`, `1d` (a bare number
/// is milliseconds).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let millis = match unit {
        "" | "ms" => 1.0,
        "s" => 1_000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        _ => return None,
    };
    let total = value * millis;
    (total.is_finite() && (0.0..1e12).contains(&total)).then(|| Duration::from_millis(total as u64))
}

/// Parses one `key:value` option of `/queue`. `Ok(false)`: not an option at all.
fn parse_option(word: &str, change: &mut QueueChange) -> Result<bool, String> {
    let Some((key, value)) = word.split_once(':') else {
        return Ok(false);
    };
    match key.to_ascii_lowercase().as_str() {
        "debounce" => {
            change.debounce = Some(parse_duration(value).filter(|d| *d <= MAX_DEBOUNCE).ok_or(
                format!("invalid debounce {value:?} (examples: 500ms, 2s, 1m; at most 24h)"),
            )?)
        }
        "cap" => match value.parse::<u32>() {
            Ok(cap) if cap >= 1 => change.cap = Some(cap),
            _ => {
                return Err(format!(
                    "invalid cap {value:?} (a number of messages, at least 1)"
                ))
            }
        },
        "drop" => change.drop = Some(DropPolicy::parse_name(value)?),
        _ => return Ok(false),
    }
    Ok(true)
}

fn parse_queue(args: &[&str], rest_of_text: &str) -> ChatCommand {
    let mut change = QueueChange::default();
    let mut words = args.iter().peekable();
    match words.peek().map(|w| w.to_ascii_lowercase()) {
        None => return ChatCommand::Queue(QueueCommand::Show),
        Some(w) if matches!(w.as_str(), "reset" | "default" | "clear") && args.len() == 1 => {
            return ChatCommand::Queue(QueueCommand::Reset)
        }
        Some(w) => {
            if let Some(mode) = Mode::parse(&w) {
                change.mode = Some(mode);
                words.next();
            }
        }
    }
    let options: Vec<&&str> = words.collect();
    let mut all_options = true;
    for word in &options {
        match parse_option(word, &mut change) {
            Ok(true) => {}
            Ok(false) => {
                all_options = false;
                break;
            }
            Err(reply) => return ChatCommand::Invalid { reply },
        }
    }
    if all_options {
        return ChatCommand::Queue(QueueCommand::Set(change));
    }
    match change.mode {
        // `/queue steer fix the tests`: the rest of the text is the message.
        Some(mode) => {
            let text = rest_of_text.trim_start();
            let text = text.split_once(char::is_whitespace).map_or("", |(_, rest)| rest).trim();
            ChatCommand::WorkWithMode { mode, text: text.to_string() }
        }
        None => ChatCommand::Invalid {
            reply: format!(
                "unknown queue setting {:?}; use /queue [{}] [debounce:2s] [cap:25] [drop:{}] or /queue reset",
                options.first().map(|w| **w).unwrap_or_default(),
                Mode::joined("|"),
                DropPolicy::joined("|"),
            ),
        },
    }
}

/// What a chat `/stop` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopArg {
    /// The chat's active task.
    Current,
    /// The chat's queued messages and its active task.
    All,
    Task(String),
}

/// Shown by `/help`.
pub const HELP_TEXT: &str = "\
Commands (answered at once, never queued):
  /status [task]    what is running and queued; one task's details
  /stop [task|all]  stop this chat's running task (or one task, or everything queued too)
  /tasks            this chat's running and queued tasks
  /resume [task]    run an interrupted, cancelled or failed task again, from its
                    last checkpoint (without a task: this chat's latest one)
  /queue [mode] [debounce:2s] [cap:25] [drop:old|new|summarize]
                    show or change what messages do while a task runs
                    (modes: collect, followup, steer, steer-backlog, interrupt)
  /queue reset      back to the defaults
  /queue <mode> <message>
                    send one message with that mode
  /help             this text
Anything else is work for the agent; to send work that starts with a slash,
begin it with // (//tmp is full).";

/// Recognises a control command. Returns `None` for work text, including text whose
/// first word is a path rather than a command word (`/usr/bin/env is broken`,
/// `/123`). A command word that names no command (`/stauts`) is
/// [`ChatCommand::Unknown`]; `//…` is [`ChatCommand::Work`] with one slash removed.
///
/// The command word is case-insensitive and may carry a Telegram-style `@botname`.
pub fn parse_chat_command(text: &str) -> Option<ChatCommand> {
    let text = text.trim();
    let rest = text.strip_prefix('/')?;
    if rest.starts_with('/') {
        return Some(ChatCommand::Work {
            text: rest.to_string(),
        });
    }
    let mut words = rest.split_whitespace();
    let word = words.next()?;
    let word = word.split('@').next().unwrap_or(word).to_ascii_lowercase();
    // Only a word such as `status` or `steer-now` can be a command: a path or a
    // number is work.
    let command_shaped = word.starts_with(|c: char| c.is_ascii_alphabetic())
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let args: Vec<&str> = words.collect();
    let single_arg = || match args.as_slice() {
        [] => Some(None),
        [one] => Some(Some(one.to_string())),
        _ => None,
    };
    match word.as_str() {
        "status" => single_arg().map(|task| ChatCommand::Status { task }),
        "tasks" if args.is_empty() => Some(ChatCommand::Tasks),
        "resume" => single_arg().map(|task| ChatCommand::Resume { task }),
        "queue" => {
            let after_word = rest
                .trim_start()
                .split_once(char::is_whitespace)
                .map_or("", |(_, r)| r);
            Some(parse_queue(&args, after_word))
        }
        "help" if args.is_empty() => Some(ChatCommand::Help),
        "stop" => single_arg().map(|arg| {
            ChatCommand::Stop(match arg {
                None => StopArg::Current,
                Some(a) if a.eq_ignore_ascii_case("all") => StopArg::All,
                Some(a) => StopArg::Task(a),
            })
        }),
        known if COMMANDS.contains(&known) => None,
        _ if command_shaped => Some(ChatCommand::Unknown { command: word }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("250"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("-1s"), None);
    }

    #[test]
    fn commands() {
        let cases: &[(&str, Option<ChatCommand>)] = &[
            ("/status", Some(ChatCommand::Status { task: None })),
            (
                "  /STATUS abc ",
                Some(ChatCommand::Status {
                    task: Some("abc".into()),
                }),
            ),
            (
                "/status@agent_bot",
                Some(ChatCommand::Status { task: None }),
            ),
            ("/stop", Some(ChatCommand::Stop(StopArg::Current))),
            ("/stop all", Some(ChatCommand::Stop(StopArg::All))),
            ("/stop ALL", Some(ChatCommand::Stop(StopArg::All))),
            (
                "/stop 0192abcd",
                Some(ChatCommand::Stop(StopArg::Task("0192abcd".into()))),
            ),
            ("/tasks", Some(ChatCommand::Tasks)),
            ("/resume", Some(ChatCommand::Resume { task: None })),
            (
                "/Resume 0192abcd",
                Some(ChatCommand::Resume {
                    task: Some("0192abcd".into()),
                }),
            ),
            ("/resume it from where it was", None),
            ("/help", Some(ChatCommand::Help)),
            ("/queue", Some(ChatCommand::Queue(QueueCommand::Show))),
            (
                "/queue reset",
                Some(ChatCommand::Queue(QueueCommand::Reset)),
            ),
            (
                "/queue steer debounce:2s cap:25 drop:summarize",
                Some(ChatCommand::Queue(QueueCommand::Set(QueueChange {
                    mode: Some(Mode::Steer),
                    debounce: Some(Duration::from_secs(2)),
                    cap: Some(25),
                    drop: Some(DropPolicy::Summarize),
                }))),
            ),
            (
                "/queue cap:2 drop:new",
                Some(ChatCommand::Queue(QueueCommand::Set(QueueChange {
                    cap: Some(2),
                    drop: Some(DropPolicy::New),
                    ..QueueChange::default()
                }))),
            ),
            (
                "/queue interrupt  do this now, please",
                Some(ChatCommand::WorkWithMode {
                    mode: Mode::Interrupt,
                    text: "do this now, please".into(),
                }),
            ),
            (
                "/queue cap:0",
                Some(ChatCommand::Invalid {
                    reply: "invalid cap \"0\" (a number of messages, at least 1)".into(),
                }),
            ),
            (
                "/queue debounce:25h",
                Some(ChatCommand::Invalid {
                    reply: "invalid debounce \"25h\" (examples: 500ms, 2s, 1m; at most 24h)".into(),
                }),
            ),
            // A command word that names no command is refused, not run as work.
            (
                "/stauts",
                Some(ChatCommand::Unknown {
                    command: "stauts".into(),
                }),
            ),
            (
                " /Deploy@agent_bot now ",
                Some(ChatCommand::Unknown {
                    command: "deploy".into(),
                }),
            ),
            // `//` sends text that starts with a slash as work, one slash removed.
            (
                "//stauts is a typo",
                Some(ChatCommand::Work {
                    text: "/stauts is a typo".into(),
                }),
            ),
            (
                "  //usr/bin/env  ",
                Some(ChatCommand::Work {
                    text: "/usr/bin/env".into(),
                }),
            ),
            // Work, not commands.
            ("/usr/bin/env is broken", None),
            ("/123 is a number", None),
            ("/stop the build and then rebuild", None),
            ("/tasks please", None),
            ("status", None),
            ("please /stop", None),
            ("/", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(&parse_chat_command(text), want, "{text:?}");
        }
    }

    /// Every command in the list that refusals and `/help` show is one the parser
    /// knows.
    #[test]
    fn the_command_list_names_known_commands() {
        for command in COMMANDS {
            let parsed = parse_chat_command(&format!("/{command}"));
            assert!(
                !matches!(parsed, None | Some(ChatCommand::Unknown { .. })),
                "/{command}: {parsed:?}"
            );
            assert!(HELP_TEXT.contains(&format!("/{command}")), "/{command}");
        }
    }
}
