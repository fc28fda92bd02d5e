//! Control commands typed as chat text (`/status`, `/stop`, `/tasks`, `/help`).
//!
//! They are recognised here, before anything could queue them, and answered by the
//! control plane at once. Text that is not one of these commands is work.

/// A control command found in a chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatCommand {
    /// `/status` or `/status <task id>`.
    Status { task: Option<String> },
    /// `/stop`, `/stop <task id>` or `/stop all`.
    Stop(StopArg),
    /// `/tasks`.
    Tasks,
    /// `/help`.
    Help,
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
  /help             this text
Anything else is work for the agent.";

/// Recognises a control command. Returns `None` for work text, including text that
/// merely starts with a slash (`/usr/bin/env is broken`).
///
/// The command word is case-insensitive and may carry a Telegram-style `@botname`.
pub fn parse_chat_command(text: &str) -> Option<ChatCommand> {
    let text = text.trim();
    let rest = text.strip_prefix('/')?;
    let mut words = rest.split_whitespace();
    let word = words.next()?;
    let word = word.split('@').next().unwrap_or(word).to_ascii_lowercase();
    let args: Vec<&str> = words.collect();
    let single_arg = || match args.as_slice() {
        [] => Some(None),
        [one] => Some(Some(one.to_string())),
        _ => None,
    };
    match word.as_str() {
        "status" => single_arg().map(|task| ChatCommand::Status { task }),
        "tasks" if args.is_empty() => Some(ChatCommand::Tasks),
        "help" if args.is_empty() => Some(ChatCommand::Help),
        "stop" => single_arg().map(|arg| {
            ChatCommand::Stop(match arg {
                None => StopArg::Current,
                Some(a) if a.eq_ignore_ascii_case("all") => StopArg::All,
                Some(a) => StopArg::Task(a),
            })
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            ("/help", Some(ChatCommand::Help)),
            // Work, not commands.
            ("/usr/bin/env is broken", None),
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
}
