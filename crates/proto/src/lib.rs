//! Wire types shared by `agentd`, `agentctl` and agents.
//!
//! Two protocols live here, and nothing else does:
//!
//! - [`control`]: clients (agentctl, IM bridges, scripts) ↔ agentd, newline-delimited
//!   JSON over the control socket.
//! - [`ipc`]: agentd ↔ one agent subprocess, length-prefixed bincode frames over an
//!   inherited socketpair. All bincode use sits behind [`codec`], which always decodes
//!   with a size limit.
//!
//! These are the only serializable types of the project: the core state machine keeps
//! its own types and the daemon converts at the edge. The exceptions are the small
//! vocabulary enums (queue modes, drop policies, priorities, stop steps): they are
//! core's own, spelled on the wire by their one name table ([`names`],
//! [`agentd_core::Named`]). See `docs/protocol.md`.

pub mod codec;
pub mod config_text;
pub mod control;
pub mod ipc;
pub mod names;
pub mod paths;
pub mod text;
