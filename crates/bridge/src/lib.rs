//! Chat bridges for agentd. The chat-independent part ([`core`]: sessions, the
//! allow-list, de-duplication, progress edits, results, typing, retries, and the
//! agentd link in [`agentd`]) is apart from each chat system's adapter, which
//! implements [`chat::Chat`]: [`matrix`] is the Matrix client-server API. A bridge for
//! another chat system is one more file like `matrix.rs`. Everything the core shows
//! in a chat is cleaned of terminal escapes first ([`clean`]), so an adapter gets
//! chat text.

pub mod agentd;
pub mod chat;
pub mod clean;
pub mod config;
pub mod core;
pub mod matrix;
