//! Agent IPC: the messages agentd and one agent subprocess exchange.
//!
//! The channel is one end of a socketpair that agentd creates per task and the
//! agent inherits as file descriptor `$AGENTD_IPC_FD` (no other process can connect
//! to it). Each message is one frame written by [`crate::codec`].
//!
//! Sequence: the agent sends [`AgentMsg::Hello`] first; agentd answers
//! [`SupervisorMsg::Welcome`] with the protocol both speak (the lower of the two
//! versions) and then [`SupervisorMsg::Start`] (or [`SupervisorMsg::Reject`] and
//! closes). After that the agent sends progress, heartbeats and exactly one result;
//! agentd may send cancel and steer. EOF on the channel means agentd is gone: the
//! agent must stop its work at once.
//!
//! Protocol 2 adds, when both sides speak it (`Welcome { protocol: 2 }`):
//! the agent's [`AgentMsg::Features`] as its first message after Hello, agentd's
//! [`SupervisorMsg::Settings`] between Welcome and Start and
//! [`SupervisorMsg::Resume`] right before the Start of a resumed attempt, and the
//! agent's [`AgentMsg::Checkpoint`] at any time while it runs. A side that speaks
//! protocol 1 never sends nor receives them. `docs/agent-ipc.md` gives every byte.
//!
//! **Wire compatibility:** bincode is not self-describing. Variants are encoded by
//! index, so variants are only ever appended, never reordered or removed, and the
//! handshake variants stay first so that a version mismatch is still detected.

use serde::{Deserialize, Serialize};

/// The newest version of this protocol, spoken by this crate. A version adds
/// messages (appended variants); it never changes an existing one.
pub const IPC_PROTOCOL_VERSION: u32 = 2;
/// The oldest version still accepted: agentd answers a Hello of any version from
/// this one to [`IPC_PROTOCOL_VERSION`] with `Welcome { protocol: min(theirs, ours) }`.
pub const MIN_IPC_PROTOCOL_VERSION: u32 = 1;

/// Largest checkpoint agentd keeps, in bytes of [`AgentMsg::Checkpoint`] data.
pub const MAX_CHECKPOINT_BYTES: usize = 1024 * 1024;

/// Environment variable that holds the number of the inherited IPC file descriptor.
pub const ENV_IPC_FD: &str = "AGENTD_IPC_FD";
/// Environment variable that holds the task id the agent runs. Descendants inherit it,
/// which is how agentd attributes orphaned tool processes to their task.
pub const ENV_TASK_ID: &str = "AGENTD_TASK_ID";
/// Environment variable that holds the session the task belongs to.
pub const ENV_SESSION: &str = "AGENTD_SESSION";

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
    /// What the agent can do.
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
    /// Acks answer steers one for one, in order; `false` makes agentd queue the text
    /// as a follow-up instead.
    SteerAck { accepted: bool },
    /// Since v2. What the agent wants beyond v1; its first message after Hello,
    /// sent only when agentd's Welcome said protocol 2 or later.
    Features(AgentFeatures),
    /// Since v2. The agent's latest resumable state, opaque to agentd, which keeps
    /// the last one (at most [`MAX_CHECKPOINT_BYTES`]) and hands it to a resumed
    /// attempt in [`SupervisorMsg::Resume`].
    Checkpoint { data: String },
}

/// What a v2 agent tells agentd about itself right after the handshake. Since v2.
///
/// An agent that sends no `Features` (every v1 agent) counts as
/// [`AgentFeatures::default`]: collected prompts, no checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentFeatures {
    /// Several messages held while a task ran may be merged into one
    /// "[Queued messages while agent was busy]" prompt (what LLM agents want).
    /// `false`: each held message is its own follow-up task (what commands want).
    pub collected_prompts: bool,
    /// The agent saves checkpoints ([`AgentMsg::Checkpoint`]) and can resume from one.
    pub checkpoints: bool,
}

impl Default for AgentFeatures {
    /// What a v1 agent is taken to want: collected prompts, no checkpoints.
    fn default() -> Self {
        AgentFeatures {
            collected_prompts: true,
            checkpoints: false,
        }
    }
}

/// agentd's settings for one agent. Since v2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSettings {
    /// Send [`AgentMsg::Heartbeat`] this often, in milliseconds; agentd counts an
    /// agent that stays silent for a few intervals as hung.
    pub heartbeat_interval_ms: u64,
}

/// How a task ended, in the agent's own words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The work was done.
    Succeeded,
    /// The work could not be done.
    Failed,
    /// The agent honoured a cooperative cancel.
    Cancelled,
}

/// Exit status of the command an agent ran on the task's behalf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandExit {
    /// The exit code, if the command exited.
    pub code: Option<i32>,
    /// The signal that ended the command, if one did.
    pub signal: Option<i32>,
}

/// The result an agent reports. Since v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    /// How the task ended.
    pub outcome: Outcome,
    /// The final output (agents keep it short: agent-exec sends the tail of the output).
    pub text: String,
    /// Exit status of the wrapped command, where the agent wraps one.
    pub command_exit: Option<CommandExit>,
}

/// What agentd asks the agent to run. Since v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStart {
    /// The task's id (a UUID), also in `$AGENTD_TASK_ID`.
    pub task_id: String,
    /// The session (chat) the task belongs to, also in `$AGENTD_SESSION`.
    pub session: String,
    /// The work: one message, or several collected into one prompt.
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
    /// Since v2. Sent to v2 agents after Welcome and before Start.
    Settings(AgentSettings),
    /// Since v2. Sent to v2 agents right before the Start of a resumed attempt: the
    /// task this one resumes, and the last checkpoint that task saved, if any.
    Resume {
        /// The id of the task this attempt resumes.
        previous_task_id: String,
        /// The last [`AgentMsg::Checkpoint`] data of that task.
        checkpoint: Option<String>,
    },
}
