//! `agent-exec`: wraps any command line as an agentd agent.
//!
//! Owns only the command-line interface; the behaviour lives in
//! `agentd_agent::exec` (see its docs): the command runs in its own process group,
//! its output lines (stdout and stderr, in order) become progress and its output
//! tail the result, a cancel becomes SIGINT, and EOF from agentd stops it. With
//! `--steer`, steer text goes to its stdin; with `--checkpoints`, it saves
//! checkpoints on fd 3; a resumed task finds its checkpoint in the environment.
//!
//! Exit codes: 0 succeeded, 1 failed (or agentd went away), 2 no channel to agentd
//! or bad usage, 127 the command could not be started, 130 cancelled.

// Under `cargo test` the test harness brings its own `main`.
#![cfg_attr(not(test), no_main)]

use std::ffi::OsString;

use agentd_agent::exec::{self, ExecConfig, DEFAULT_RESULT_BYTES, MAX_RESULT_BYTES};
use clap::Parser;

/// Run a command line as an agentd agent (agentd starts this program, not you).
///
/// Without a command after `--`, runs `sh -c <task text>`. agentd substitutes
/// `{text}` in its `--agent` command line, e.g. `agent-exec -- sh -c {text}`.
#[derive(Debug, Parser)]
#[command(
    name = "agent-exec",
    version,
    after_long_help = "\
OUTPUT
  The command's stdout and stderr share one pipe, so its lines keep their order.
  Each non-blank line is a progress line; the last --result-bytes of the output,
  from the first whole line in them, are the result text; exit 0 is `succeeded`, anything else `failed`, and a
  command that ends after a cancel (SIGINT) is `cancelled`.

STEERING (--steer)
  Only for a command that reads its stdin. Each steered message is written to
  the command's stdin as ONE line: a backslash is written as \\\\, a line feed as
  \\n and a carriage return as \\r; nothing else changes (so `read -r line` in sh
  gets a one-line message verbatim). A steer counts as delivered once the command
  has read the whole line; a steer it has not read when it ends is handed back to
  agentd, which runs it as a follow-up task. Without --steer stdin is /dev/null
  and agentd queues steered messages as follow-ups (and says so).

CHECKPOINTS (--checkpoints)
  The command gets fd 3 ($AGENTD_CHECKPOINT_FD) to save its resumable state: each
  line written there, in the same framing as steers, replaces the last checkpoint
  (UTF-8 text, at most 1 MiB), e.g. `echo \"step 3\" >&3`. agentd keeps the latest
  one for a later `/resume`.

RESUMING
  When agentd resumes an earlier task, the command's environment has
  AGENTD_RESUMING=1 and AGENTD_PREVIOUS_TASK_ID=<id>; if that task saved a
  checkpoint, AGENTD_CHECKPOINT_FILE names a private file holding it exactly as
  saved (removed after the command ends) and, when it is at most 64 KiB,
  AGENTD_CHECKPOINT holds it too. AGENTD_TASK_ID and AGENTD_SESSION are always set.

EXIT CODES
  0 succeeded, 1 failed (or agentd went away), 2 no channel to agentd or bad
  usage, 127 the command could not be started, 130 cancelled."
)]
struct Args {
    /// The command reads steered messages from its stdin (see STEERING below).
    #[arg(long)]
    steer: bool,

    /// Take several messages held while a task ran as one collected prompt (for an
    /// LLM command); by default each becomes its own task.
    #[arg(long)]
    collect: bool,

    /// Give the command fd 3 to save checkpoints on (see CHECKPOINTS below).
    #[arg(long)]
    checkpoints: bool,

    /// Send at most the last N bytes of the command's output as the result text
    /// (at most 1048576).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_RESULT_BYTES as u64,
          value_parser = clap::value_parser!(u64).range(..=MAX_RESULT_BYTES as u64))]
    result_bytes: u64,

    /// The command to run and its arguments.
    #[arg(last = true, value_name = "CMD ARGS")]
    command: Vec<OsString>,
}

/// The C `main`, without Rust's runtime set-up (`#![no_main]`): agentd starts an
/// agent-exec for every task, and that set-up (the main thread's stack guard, read
/// from `/proc/self/maps`, and its alternate signal stack) is a measurable part of
/// a short task's CPU (scripts/bench-tasks.sh). What of it agent-exec relies on is
/// done here: SIGPIPE ignored (a closed pipe is an error, not death), fds 0-2 open,
/// and a panic exits with 101.
#[cfg_attr(not(test), no_mangle)]
#[cfg_attr(test, allow(dead_code))]
extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    // SAFETY: setting a disposition to SIG_IGN, and F_GETFD/open on fds 0-2, before
    // anything else in this process runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        for fd in 0..=2 {
            if libc::fcntl(fd, libc::F_GETFD) == -1
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::EBADF)
                && libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) != fd
            {
                libc::abort();
            }
        }
    }
    let code = std::panic::catch_unwind(|| {
        let args = Args::parse();
        let config = ExecConfig {
            steer: args.steer,
            collect: args.collect,
            checkpoints: args.checkpoints,
            result_bytes: args.result_bytes as usize,
            command: args.command,
            ..ExecConfig::default()
        };
        exec::run(&config)
    })
    .unwrap_or(101);
    std::process::exit(code);
}
