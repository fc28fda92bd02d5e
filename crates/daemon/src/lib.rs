//! The agentd supervisor daemon: the IO shell around [`agentd_core::Dispatcher`].
//!
//! - [`args`]: the `agentd` command line (flags), for the binary and its man page.
//! - [`socket`]: the control socket's directory and listener (0700 dir, 0600 socket,
//!   peer uid checked per connection).
//! - [`control`]: one task per client connection: bounded line reads with a deadline,
//!   JSON parsing, out-of-order responses, the connection cap.
//! - [`info`]: what connections answer without the loop: pid, uptime, and the
//!   `status` snapshot the loop keeps current.
//! - [`outbox`]: each connection's bounded output: coalesced progress, `lagged`
//!   watches.
//! - [`listing`]: pages of the `tasks` listing.
//! - [`supervisor`]: the single event loop that owns the dispatcher, the agents, the
//!   timers, the reaper and the history ([`History`]), and executes the dispatcher's
//!   actions; split by concern (executor, agents, one module per request family,
//!   history).
//! - [`agent_io`]: per-agent reader and writer tasks on the IPC socketpair.
//! - [`logfmt`]: plain Display forms for log fields (no Debug dumps in logs).
//! - [`notify`]: systemd readiness (`READY=1`, `STOPPING=1` to `$NOTIFY_SOCKET`).
//! - [`views`]: conversion of core types to the wire views of `agentd-proto` (the
//!   texts users read are in `agentd_proto::text`).
//!
//! [`run`] takes an already-bound listener and a shutdown future, so the binary only
//! parses flags, binds and installs signal handlers.

pub mod agent_io;
pub mod args;
pub mod config;
pub mod control;
pub mod durable;
pub mod events;
pub mod info;
pub mod listing;
pub mod logfmt;
pub mod notify;
pub mod outbox;
mod output;
pub mod reads;
pub mod replier;
pub mod socket;
pub mod supervisor;
pub mod views;

pub use config::DaemonConfig;
pub use supervisor::history::{History, MemoryHistory};
pub use supervisor::run;

/// How agentd gives the memory its allocator holds free back to the system. The
/// binary chooses the allocator, so it sets this (once, before [`run`]); recovery
/// calls it once the queue is back, so the tables' and records' transient memory
/// does not stay in agentd's RSS for as long as it runs.
static RELEASE_FREE_MEMORY: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets how free memory is released (see [`RELEASE_FREE_MEMORY`]); the first call wins.
pub fn set_release_free_memory(release: fn()) {
    let _ = RELEASE_FREE_MEMORY.set(release);
}

pub(crate) fn release_free_memory() {
    if let Some(release) = RELEASE_FREE_MEMORY.get() {
        release();
    }
}
