//! Agent IPC: the messages agentd and one agent subprocess exchange.
//!
//! The channel is one end of a socketpair that agentd creates per task and the
//! agent inherits as file descriptor `$AGENTD_IPC_FD` (no other process can connect
//! to it). Each message is one frame written by [`crate::codec`].
//!
//! Sequence: the agent sends [`AgentMsg::Hello`] first; agentd answers
//! [`SupervisorMsg::Welcome`] and then [`SupervisorMsg::Start`] (or
//! [`SupervisorMsg::Reject`] and closes). After that the agent sends progress,
//! heartbeats and exactly one result; agentd may send cancel and steer. EOF on the
//! channel means agentd is gone: the agent must stop its work at once.
//!
//! **Wire compatibility:** bincode is not self-describing. Variants are encoded by
//! index, so variants are only ever appended, never reordered or removed, and the
//! handshake variants stay first so that a version mismatch is still detected.

use serde::{Deserialize, Serialize};

/// Version of this protocol. Bumped on any incompatible change.
pub const IPC_PROTOCOL_VERSION: u32 = 1;

/// Environment variable that holds the number of the inherited IPC file descriptor.
pub const ENV_IPC_FD: &str = "AGENTD_IPC_FD";
/// Environment variable that holds the task id the agent runs. Descendants inherit it,
/// which is how agentd attributes orphaned tool processes to their task.
pub const ENV_TASK_ID: &str = "AGENTD_TASK_ID";
/// Environment variable that holds the session the task belongs to.
pub const ENV_SESSION: &str = "AGENTD_SESSION";
/// Environment variable with the heartbeat interval agentd expects, in milliseconds
/// (v1 agents; v2 agents also get it in `Settings`).
pub const ENV_HEARTBEAT_MS: &str = "AGENTD_HEARTBEAT_MS";

/// What an agent can do beyond the required minimum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The agent accepts [`SupervisorMsg::Steer`] while a task runs.
    pub steer: bool,
}

/// First message of every agent. Since v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentHello {
    /// Must stay the first field: it is decodable whatever else changes.
    pub protocol: u32,
    /// Agent name and version, for status output and logs.
    pub agent: String,
    pub capabilities: Capabilities,
}

/// Messages from an agent to agentd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMsg {
    /// Since v1. Must stay the first variant.
    Hello(AgentHello),
    /// Since v1. One line of human-readable progress.
    Progress { text: String },
    /// Since v1. The task's result; sent once, then the agent exits.
    Result(TaskResult),
    /// Since v1. Sent periodically while the agent is alive.
    Heartbeat,
    /// Since v1. Answer to a [`SupervisorMsg::Steer`]: whether the text reached the work.
    SteerAck { accepted: bool },
}

/// How a task ended, in the agent's own words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Succeeded,
    Failed,
    /// The agent honoured a cooperative cancel.
    Cancelled,
}

/// Exit status of the command an agent ran on the task's behalf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// The result an agent reports. Since v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    pub outcome: Outcome,
    /// The final output (agents keep it short: agent-exec sends the tail of the output).
    pub text: String,
    /// Exit status of the wrapped command, where the agent wraps one.
    pub command_exit: Option<CommandExit>,
}

/// What agentd asks the agent to run. Since v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStart {
    pub task_id: String,
    pub session: String,
    pub text: String,
}

/// Messages from agentd to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SupervisorMsg {
    /// Since v1. Must stay the first variant: the answer to a compatible Hello.
    Welcome { protocol: u32 },
    /// Since v1. The Hello was refused (e.g. unsupported protocol); the channel closes.
    Reject { reason: String },
    /// Since v1. The task to run; sent once, right after Welcome.
    Start(TaskStart),
    /// Since v1. Cooperative cancel: finish the current step, report, exit.
    Cancel,
    /// Since v1. A message for the running task (only to agents that accept steering).
    Steer { text: String },
}
