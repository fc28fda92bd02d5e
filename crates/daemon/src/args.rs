//! agentd's command line: the flags of the `agentd` binary, here so that its man page
//! (`agentctl man DIR` writes agentd.1) comes from the same definition as the parser.

use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser};

/// Supervisor daemon for AI agents: per-session queues, a cap on live agent processes,
/// control commands answered at once, and stops that end the whole process tree.
#[derive(Debug, Clone, Parser)]
#[command(name = "agentd", version, after_help = agentd_proto::text::AGENTD_AFTER_HELP)]
pub struct Args {
    /// Control socket path [default: $AGENTD_SOCKET, else $XDG_RUNTIME_DIR/agentd/agentd.sock,
    /// else /tmp/agentd-$UID/agentd.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Directory for agentd's durable state: the store agentd.db (tasks, queue,
    /// settings), the lock agentd.lock, logs/TASK.log, and only after the disk failed to
    /// sync agentd.refused (the tasks refused then) [default: $XDG_STATE_HOME/agentd,
    /// else ~/.local/state/agentd]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Most agent processes alive at once [default: 2]
    #[arg(long, value_name = "N")]
    pub max_concurrent: Option<u32>,
    /// Time from the cooperative cancel to SIGTERM, e.g. 500ms, 5s [default: 5s]
    #[arg(long, value_name = "DUR", value_parser = crate::config::parse_duration)]
    pub cancel_grace: Option<Duration>,
    /// Time from SIGTERM to SIGKILL [default: 5s]
    #[arg(long, value_name = "DUR", value_parser = crate::config::parse_duration)]
    pub term_grace: Option<Duration>,
    /// How long a new agent may take to complete its handshake [default: 10s]
    #[arg(long, value_name = "DUR", value_parser = crate::config::parse_duration)]
    pub handshake_timeout: Option<Duration>,
    /// The agent command; `{text}` in an argument is replaced by the task text
    /// [default: 'agent-exec -- sh -c {text}']
    #[arg(long, value_name = "'CMD ARGS…'")]
    pub agent: Option<String>,
    /// What a message does while its chat's task runs: collect, followup, steer,
    /// steer-backlog or interrupt [default: collect]
    #[arg(long, value_name = "MODE", value_parser = crate::config::parse_mode)]
    pub queue_mode: Option<agentd_core::Mode>,
    /// Quiet time before a follow-up starts [default: 1s]
    #[arg(long, value_name = "DUR", value_parser = crate::config::parse_duration)]
    pub debounce: Option<Duration>,
    /// Most held messages per chat [default: 20]
    #[arg(long, value_name = "N")]
    pub cap: Option<u32>,
    /// Past the cap: old, new or summarize [default: summarize]
    #[arg(long, value_name = "POLICY", value_parser = crate::config::parse_drop)]
    pub drop: Option<agentd_core::DropPolicy>,
    /// Most queued tasks in all; past it new work is refused [default: 1000]
    #[arg(long, value_name = "N")]
    pub max_queued: Option<u32>,
    /// Most background agents alive at once [default: no own cap]
    #[arg(long, value_name = "N")]
    pub max_background: Option<u32>,
    /// Queued work expires after this long [default: never]
    #[arg(long, value_name = "DUR", value_parser = crate::config::parse_duration)]
    pub queue_timeout: Option<Duration>,
    /// Never put tasks in cgroups: use the process-tree fallback even where a cgroup
    /// v2 subtree is writable (see `agentctl status`)
    #[arg(long)]
    pub no_cgroup: bool,
    /// How often agents heartbeat; told to them in AGENTD_HEARTBEAT_MS [default: 2s]
    #[arg(long, value_name = "DUR", value_parser = crate::config::parse_duration)]
    pub heartbeat: Option<Duration>,
    /// An agent silent this long is hung: stopped, and failed as `hung`; `off` to
    /// disable [default: 5 heartbeat intervals]
    #[arg(long, value_name = "DUR|off", value_parser = crate::config::parse_limit)]
    pub hung_after: Option<crate::config::Limit>,
    /// A task running this long is stopped and failed as `timed out` [default: off]
    #[arg(long, value_name = "DUR|off", value_parser = crate::config::parse_limit)]
    pub task_timeout: Option<crate::config::Limit>,
    /// A frame an agent has begun to send must complete within this [default: 10s]
    #[arg(long, value_name = "DUR", value_parser = crate::config::parse_duration)]
    pub frame_timeout: Option<Duration>,
    /// Most bytes kept of one task's output log (its agent's stdout and stderr,
    /// and its progress lines); past it a truncation marker
    /// [default: 16777216]
    #[arg(long, value_name = "BYTES")]
    pub log_cap: Option<u64>,
    /// Finished tasks (and their logs) older than this are pruned [default: 30d]
    #[arg(long, value_name = "DUR", value_parser = crate::config::parse_duration)]
    pub retention_age: Option<Duration>,
    /// At most this many finished tasks are kept [default: 10000]
    #[arg(long, value_name = "N")]
    pub retention_count: Option<u64>,
    /// Most client connections open at once, idle ones included; past it a new
    /// connection is refused with `too_many_connections` [default: 2048]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// How long a request line may take from its first byte to its end; a slower one
    /// is answered `request_timeout` and its connection closed [default: 10s]
    #[arg(long, value_name = "DUR", value_parser = crate::config::parse_duration)]
    pub request_timeout: Option<Duration>,
    /// Log lines on stderr: text (plain key=value fields) or json (one object a
    /// line). The level comes from $AGENTD_LOG, else $RUST_LOG, else info [default: text]
    #[arg(long, value_name = "FORMAT", value_parser = crate::config::LogFormat::parse)]
    pub log_format: Option<crate::config::LogFormat>,
    /// TOML config file with the same keys as the flags (flags win); see
    /// examples/config.toml. SIGHUP re-reads it: max-connections and request-timeout
    /// take effect at once, the rest at restart. Without this flag, $AGENTD_CONFIG
    /// names it (agentd-matrix reads the same variable)
    /// [default: $XDG_CONFIG_HOME/agentd/config.toml if it exists]
    #[arg(long, value_name = "FILE", env = "AGENTD_CONFIG")]
    pub config: Option<PathBuf>,
}

/// agentd's command line as clap sees it: for its man page and completions.
pub fn command() -> clap::Command {
    Args::command()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `agentd --help` ends with examples, and each is a command line agentd parses.
    #[test]
    fn the_help_gives_examples_that_parse() {
        let help = command().render_long_help().to_string();
        let (_, examples) = help
            .split_once("Examples:\n")
            .unwrap_or_else(|| panic!("no examples:\n{help}"));
        let lines: Vec<&str> = examples
            .lines()
            .map(str::trim)
            .take_while(|l| !l.is_empty())
            .collect();
        assert!(lines.len() >= 2, "{help}");
        for line in lines {
            let line = line.split("  # ").next().unwrap();
            let line = line.trim_end().trim_end_matches('&').trim_end();
            // Shell words: single quotes around a word with blanks.
            let mut argv = Vec::new();
            for (i, part) in line.split('\'').enumerate() {
                if i % 2 == 1 {
                    argv.push(part.to_string());
                } else {
                    argv.extend(part.split_whitespace().map(str::to_string));
                }
            }
            assert_eq!(argv.first().map(String::as_str), Some("agentd"), "{line}");
            if let Err(e) = Args::try_parse_from(&argv) {
                panic!("`{line}` does not parse: {e}");
            }
        }
        assert!(
            help.contains(agentd_proto::text::AGENTD_EXIT_STATUS),
            "{help}"
        );
    }

    #[test]
    fn the_definition_is_consistent_and_parses_flags() {
        command().debug_assert();
        let args = Args::try_parse_from(["agentd", "--max-concurrent", "3", "--hung-after", "off"])
            .unwrap();
        assert_eq!(args.max_concurrent, Some(3));
        assert!(args.hung_after.is_some());
    }
}
