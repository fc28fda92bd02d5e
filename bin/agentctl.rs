//! `agentctl`: the command-line client of agentd. Everything lives in `agentd_cli`.

use std::process::ExitCode;

fn main() -> ExitCode {
    agentd_cli::main()
}
