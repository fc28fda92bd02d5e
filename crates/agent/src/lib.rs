//! Agent-side SDK for agentd, in blocking std (no async runtime).
//!
//! An agent is a program that agentd starts for one task, connected to it by an
//! inherited socketpair whose fd number is in `$AGENTD_IPC_FD`. This crate owns
//! the agent's end of that channel:
//!
//! - [`AgentChannel::from_env`]: take the fd, say `Hello`, receive `Welcome` and
//!   the task ([`TaskStart`]).
//! - [`AgentSender`] (clone it into any thread) and [`AgentReceiver`] (move it to
//!   one reader thread; `Ok(None)` means agentd is gone: stop at once).
//! - [`spawn_heartbeat`]: heartbeats every `$AGENTD_HEARTBEAT_MS` (default 2 s).
//! - [`exec`]: the logic of `agent-exec`, which wraps any command line as an agent.
//!
//! ```no_run
//! use agentd_agent::{hello, AgentChannel, AgentMsg, Capabilities, Outcome, TaskResult};
//!
//! let (channel, task) = AgentChannel::from_env(hello("my-agent 1.0", Capabilities::default()))?;
//! let (sender, mut receiver) = channel.into_parts();
//! agentd_agent::spawn_heartbeat(sender.clone(), agentd_agent::heartbeat_interval_from_env())?;
//! std::thread::spawn(move || {
//!     while let Ok(Some(_msg)) = receiver.recv() { /* Cancel, Steer */ }
//!     std::process::exit(1); // EOF or garbage: agentd is gone
//! });
//! sender.progress(format!("working on {}", task.text))?;
//! sender.send(&AgentMsg::Result(TaskResult {
//!     outcome: Outcome::Succeeded,
//!     text: "done".into(),
//!     command_exit: None,
//! }))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod channel;
pub mod exec;

pub use agentd_proto::codec::FrameError;
pub use agentd_proto::ipc::{
    AgentHello, AgentMsg, Capabilities, CommandExit, Outcome, SupervisorMsg, TaskResult, TaskStart,
    ENV_IPC_FD, ENV_SESSION, ENV_TASK_ID, IPC_PROTOCOL_VERSION,
};
pub use channel::{
    heartbeat_interval_from_env, hello, ipc_stream_from_env, message_name, spawn_heartbeat,
    AgentChannel, AgentError, AgentReceiver, AgentSender, DEFAULT_HEARTBEAT, ENV_HEARTBEAT_MS,
};
