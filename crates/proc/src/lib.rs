//! The only crate of agentd that creates processes, sends signals or waits for them.
//!
//! - [`spawn_agent`]: one agent subprocess per task, in its own process group, with
//!   the task's end of a socketpair as its IPC channel and nothing else inherited.
//! - [`TaskTree`]: find every process that belongs to a task (its process group, its
//!   descendants, and orphans that carry the task's `AGENTD_TASK_ID`), and signal them.
//! - [`reap_children`]: the one place that waits for children.
//! - [`become_subreaper`]: orphaned descendants of agents come back to agentd.

mod reap;
mod spawn;
mod tree;

pub use reap::{become_subreaper, reap_children, Reaped};
pub use spawn::{spawn_agent, AgentCommand, SpawnedAgent, AGENT_IPC_FD};
pub use tree::{process_exists, TaskTree};
