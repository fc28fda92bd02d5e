//! `agentctl`: the command-line client of agentd. Everything lives in `agentd_cli`;
//! the binary adds agentd's command line, for `agentctl man DIR` to write agentd.1.

use std::process::ExitCode;

fn main() -> ExitCode {
    agentd_cli::main_with_pages(&[agentd_daemon::args::command()])
}
