//! agentctl's command line, as clap types.
//!
//! [`Cli`] holds the global flags (`--socket`, `--json`, accepted before or after the
//! subcommand) and one [`Command`]. Each command that maps to exactly one control
//! request says so through [`Command::request`]; commands that will stream or
//! converse (`watch`, `chat`) return `None` there and are run by their own code.

use std::path::PathBuf;

use agentd_proto::control::RequestBody;
use agentd_proto::paths::{default_socket_path, ENV_SOCKET};
use clap::builder::{OsStringValueParser, TypedValueParser};
use clap::{ArgGroup, Args, Parser, Subcommand};

/// `agentctl [--socket PATH] [--json] <command>`
#[derive(Debug, Clone, Parser)]
#[command(
    name = "agentctl",
    version,
    about = "Control agentd, the supervisor daemon for AI agents",
    after_help = "Exit status: 0 success, 1 agentd answered with an error, 2 usage error, \
                  3 agentd is not running or cannot be reached, 4 other failure \
                  (timeout, lost connection, unexpected answer)."
)]
pub struct Cli {
    /// The control socket [default: $XDG_RUNTIME_DIR/agentd/agentd.sock,
    /// else /tmp/agentd-$UID/agentd.sock]
    // Empty values are accepted here and mean "unset" (see `socket_path`), so that
    // `AGENTD_SOCKET=` behaves as in agentd.
    #[arg(
        long,
        global = true,
        env = ENV_SOCKET,
        value_name = "PATH",
        value_parser = OsStringValueParser::new().map(PathBuf::from)
    )]
    pub socket: Option<PathBuf>,

    /// Print agentd's answer as one JSON value on stdout
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The socket to connect to: `--socket`, else `$AGENTD_SOCKET`, else the default
    /// path (an empty value counts as unset).
    pub fn socket_path(&self) -> PathBuf {
        match &self.socket {
            Some(path) if !path.as_os_str().is_empty() => path.clone(),
            _ => default_socket_path(),
        }
    }
}

/// agentctl's subcommands.
///
/// `resume`, `queue`, `watch` and `chat` are not implemented yet; they will be added
/// here as variants with their own argument structs.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Send a chat message to a session: work, or a control command such as /status
    Send(SendArgs),
    /// Show agentd's status, or one task's
    Status(StatusArgs),
    /// List running and queued tasks
    Tasks(TasksArgs),
    /// Stop a task, a session's tasks, or every task; waits until they have ended
    Stop(StopArgs),
    /// Check that agentd is running
    Ping,
}

impl Command {
    /// The one control request this command makes, or `None` for commands that are
    /// not a single request/answer (none yet; `watch` and `chat` will be).
    pub fn request(&self) -> Option<RequestBody> {
        Some(match self {
            Command::Send(a) => RequestBody::Send {
                session: a.session.clone(),
                text: a.text.join(" "),
                message_id: a.message_id.clone(),
            },
            Command::Status(a) => RequestBody::Status {
                task_id: a.task_id.clone(),
            },
            Command::Tasks(a) => RequestBody::Tasks {
                session: a.session.clone(),
                all: a.all,
            },
            Command::Stop(a) => RequestBody::Stop {
                task_id: a.task_id.clone(),
                session: a.session.clone(),
                all: a.all,
            },
            Command::Ping => RequestBody::Ping,
        })
    }
}

/// `send --session S [--message-id ID] TEXT...`
#[derive(Debug, Clone, Args)]
pub struct SendArgs {
    /// The session (chat) the message belongs to
    #[arg(long, value_name = "S")]
    pub session: String,

    /// The sender's own id for the message; a re-delivery with the same id is not run twice
    #[arg(long, value_name = "ID")]
    pub message_id: Option<String>,

    /// The message; words are joined by single spaces (use `--` before text that
    /// starts with `-`)
    #[arg(required = true, value_name = "TEXT")]
    pub text: Vec<String>,
}

/// `status [TASK_ID]`
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Show this task instead of the daemon
    #[arg(value_name = "TASK_ID")]
    pub task_id: Option<String>,
}

/// `tasks [--session S] [--all]`
#[derive(Debug, Clone, Args)]
pub struct TasksArgs {
    /// Only this session's tasks
    #[arg(long, value_name = "S")]
    pub session: Option<String>,

    /// Include ended tasks
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("agentctl").chain(args.iter().copied()))
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
            })
        );
        assert!(parse(&["send", "--session", "a"]).is_err());
        assert!(parse(&["send", "hello"]).is_err());
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
            })
        );
    }

    #[test]
    fn an_empty_socket_means_the_default() {
        let cli = parse(&["--socket", "", "ping"]).unwrap();
        assert_eq!(cli.socket_path(), default_socket_path());
    }
}
