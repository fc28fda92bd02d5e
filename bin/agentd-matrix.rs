//! `agentd-matrix`: connects agentd to a Matrix homeserver. Each room (or thread in
//! a room) is an agentd session; see README, "Matrix bridge". The work is done in
//! `agentd_bridge`: the chat-independent core, and the Matrix adapter.

use std::path::PathBuf;
use std::process::ExitCode;

use agentd_bridge::config::{default_config_file, MatrixConfig};
use agentd_bridge::core::{self, CoreConfig};
use agentd_bridge::matrix::Matrix;
use clap::Parser;

/// Connects agentd to a Matrix homeserver: messages in a room become tasks, commands
/// (/status, /stop, /tasks, /queue, /help) are answered at once, progress is shown in
/// one message edited in place and the result is posted when the task ends.
#[derive(Debug, Parser)]
#[command(name = "agentd-matrix", version)]
struct Args {
    /// agentd's config file, with a [matrix] table. Without this flag,
    /// $AGENTD_CONFIG names it (agentd reads the same variable)
    /// [default: $XDG_CONFIG_HOME/agentd/config.toml]
    #[arg(long, short, env = "AGENTD_CONFIG")]
    config: Option<PathBuf>,
    /// agentd's control socket [default: the file's `socket`, else $AGENTD_SOCKET,
    /// else agentd's default]
    #[arg(long)]
    socket: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AGENTD_LOG")
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentd-matrix: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let path = args.config.unwrap_or_else(default_config_file);
    let config = MatrixConfig::load(&path)?;
    let socket = args
        .socket
        .or_else(|| config.socket.clone())
        .unwrap_or_else(agentd_proto::paths::default_socket_path);
    let matrix = Matrix::connect(&config)?;
    core::run(
        matrix,
        CoreConfig {
            socket,
            client: format!("agentd-matrix {}", env!("CARGO_PKG_VERSION")),
            allowed_users: config.allowed_users,
            refusal_interval: config.refusal_interval,
            progress_interval: config.progress_interval,
            state_file: config.state_file,
        },
    )
}
