//! Agent-side SDK for agentd, in blocking std (no async runtime).
//!
//! An agent is a program that agentd starts for one task, connected to it by an
//! inherited socketpair whose fd number is in `$AGENTD_IPC_FD`. This crate owns
//! the agent's end of that channel (protocol 2, falling back to 1 with an older
//! agentd; every byte is in `docs/agent-ipc.md`):
//!
//! - [`AgentChannel::from_env_with`] (or [`AgentChannel::from_env`]): take the fd,
//!   say `Hello` and `Features`, receive `Welcome`, agentd's settings, the resume
//!   info of a resumed attempt ([`AgentChannel::resume`]) and the task
//!   ([`TaskStart`]).
//! - [`AgentSender`] (clone it into any thread) with a helper per message:
//!   [`progress`](AgentSender::progress), [`steer_ack`](AgentSender::steer_ack),
//!   [`checkpoint`](AgentSender::checkpoint), [`result`](AgentSender::result).
//! - [`AgentReceiver`] (move it to one reader thread; `Ok(None)` means agentd is
//!   gone: stop at once) for `Cancel` and `Steer`.
//! - [`AgentChannel::spawn_heartbeat`]: heartbeats at agentd's interval
//!   (`Settings`), else every `$AGENTD_HEARTBEAT_MS` (default 2 s).
//! - [`exec`]: the logic of `agent-exec`, which wraps any command line as an agent.
//!
//! ```no_run
//! use agentd_agent::{hello, AgentChannel, AgentFeatures, Capabilities, Outcome, SupervisorMsg};
//!
//! let features = AgentFeatures { collected_prompts: true, checkpoints: true };
//! let (channel, task) =
//!     AgentChannel::from_env_with(hello("my-agent 1.0", Capabilities { steer: true }), features)?;
//! let start_at: u32 = match channel.resume().and_then(|r| r.checkpoint.as_deref()) {
//!     Some(step) => step.parse()?, // carry on where the interrupted attempt stopped
//!     None => 0,
//! };
//! channel.spawn_heartbeat()?;
//! let (sender, mut receiver) = channel.into_parts();
//! let cancelled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
//! let (flag, acks) = (cancelled.clone(), sender.clone());
//! std::thread::spawn(move || {
//!     while let Ok(Some(msg)) = receiver.recv() {
//!         match msg {
//!             SupervisorMsg::Cancel => flag.store(true, std::sync::atomic::Ordering::SeqCst),
//!             SupervisorMsg::Steer { text } => { let _ = acks.steer_ack(!text.is_empty()); }
//!             _ => {}
//!         }
//!     }
//!     std::process::exit(1); // EOF or garbage: agentd is gone
//! });
//! for step in start_at..10 {
//!     if cancelled.load(std::sync::atomic::Ordering::SeqCst) {
//!         sender.result(Outcome::Cancelled, format!("stopped before step {step}"))?;
//!         return Ok(());
//!     }
//!     sender.progress(format!("step {step} of {}", task.text))?;
//!     sender.checkpoint(step.to_string())?;
//! }
//! sender.result(Outcome::Succeeded, "done")?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod channel;
pub mod exec;

pub use agentd_proto::codec::FrameError;
pub use agentd_proto::ipc::{
    AgentFeatures, AgentHello, AgentMsg, AgentSettings, Capabilities, CommandExit, Outcome,
    SupervisorMsg, TaskResult, TaskStart, ENV_IPC_FD, ENV_SESSION, ENV_TASK_ID,
    IPC_PROTOCOL_VERSION, MAX_CHECKPOINT_BYTES, MIN_IPC_PROTOCOL_VERSION,
};
pub use channel::{
    heartbeat_interval_from_env, hello, ipc_stream_from_env, message_name, spawn_heartbeat,
    AgentChannel, AgentError, AgentReceiver, AgentSender, Handshake, Resume, DEFAULT_HEARTBEAT,
    ENV_HEARTBEAT_MS,
};
