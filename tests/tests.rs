//! Integration tests: each drives the real `agentd`, `agentctl`, `agent-exec` and
//! `agentd-test-agent` binaries over real sockets, with real signals, in its own temp
//! dir, and kills what it started by pid (see `support::Daemon`).

mod support;

/// Misbehaving agents: crashes, garbage frames, handshake failures, descriptor leaks.
mod agents;
/// Capacity: live agents never exceed the cap; sessions don't block each other.
mod capacity;
/// agentctl's user-facing behaviour: words, JSON, errors and exit codes.
mod cli;
/// Control plane: answers at once, queue positions, bad input.
mod control;
/// Durability: restarts after kill -9, acknowledged means stored, one agentd per
/// state dir, corrupt stores.
mod durability;
/// Queue modes, caps, fairness, priorities, expiry, de-duplication, live events.
mod queue;
/// Stops: cooperative cancel, SIGTERM, SIGKILL, process trees, chat scoping.
mod stop;
