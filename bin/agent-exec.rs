//! `agent-exec`: wraps any command line as an agentd agent.
//!
//! Owns only the command-line interface; the behaviour lives in
//! `agentd_agent::exec` (see its docs): the command runs in its own process group,
//! its output lines become progress and its output tail the result, steer text goes
//! to its stdin, a cancel becomes SIGINT, and EOF from agentd stops it.
//!
//! Exit codes: 0 succeeded, 1 failed (or agentd went away), 2 no channel to agentd
//! or bad usage, 127 the command could not be started, 130 cancelled.

use std::ffi::OsString;

use agentd_agent::exec::{self, ExecConfig, DEFAULT_RESULT_BYTES};
use clap::Parser;

/// Run a command line as an agentd agent (agentd starts this program, not you).
///
/// Without a command after `--`, runs `sh -c <task text>`. agentd substitutes
/// `{text}` in its `--agent` command line, e.g. `agent-exec -- sh -c {text}`.
#[derive(Debug, Parser)]
#[command(name = "agent-exec", version)]
struct Args {
    /// Refuse steering: the command's stdin is /dev/null and steer messages are declined.
    #[arg(long)]
    no_steer: bool,

    /// Send at most the last N bytes of the command's output as the result text.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_RESULT_BYTES)]
    result_bytes: usize,

    /// The command to run and its arguments.
    #[arg(last = true, value_name = "CMD ARGS")]
    command: Vec<OsString>,
}

fn main() {
    let args = Args::parse();
    let config = ExecConfig {
        steer: !args.no_steer,
        result_bytes: args.result_bytes,
        command: args.command,
        ..ExecConfig::default()
    };
    std::process::exit(exec::run(&config));
}
