//! Integration tests: each drives the real `agentd`, `agentctl`, `agent-exec` and
//! `agentd-test-agent` binaries over real sockets, with real signals, in its own temp
//! dir, and kills what it started by pid (see `support::Daemon`).

mod support;

/// Misbehaving agents: crashes, garbage frames, handshake failures, descriptor leaks.
mod agents;
/// Bounds: stopped and slow clients, connection floods, slowloris, paging, SIGHUP,
/// a removed socket.
mod bounds;
/// examples/bridge.py (Python, from the doc alone) against a real agentd.
mod bridge;
/// Capacity: live agents never exceed the cap; sessions don't block each other.
mod capacity;
/// agentctl's user-facing behaviour: words, JSON, errors and exit codes.
mod cli;
/// docs/protocol.md replayed against the daemon; the wire guarantees it states.
mod conformance;
/// Containment (cgroup and fallback), parent death, hung and timed-out agents,
/// hostile frames and floods.
mod contain;
/// Control plane: answers at once, queue positions, bad input.
mod control;
/// Defaults a new user meets: chat /stop, agentctl stop, collect with the shell agent,
/// and scripts/demo.sh.
mod defaults;
/// Durability: restarts after kill -9, acknowledged means stored, one agentd per
/// state dir, corrupt stores.
mod durability;
/// Client fields at their extremes and store rows agentd did not write.
mod hostile_input;
/// agentd-matrix against a real Synapse homeserver on loopback.
mod matrix;
/// One spelling per variant on every surface, in any case.
mod names;
/// The stdlib-only Python example agent under a real agentd.
mod python_agent;
/// Queue modes, caps, fairness, priorities, expiry, de-duplication, live events.
mod queue;
/// Timers, stops and events that cross each other.
mod races;
/// Restarts with a long queue: every task back, whatever the pages recovery reads.
mod restart;
/// What a restarted agentd still knows: history from the store, re-deliveries,
/// queued messages' time limits, recovered work past the new limits.
mod restarts;
/// agentd as a service: default config file, systemd readiness, logs, private state.
mod service;
/// `status`: answered by the connection, in order, bounded.
mod status;
/// Steering fallbacks: refused steers, shutdown, steer-backlog answers.
mod steer;
/// What clients read of one loop step against the `status` snapshot, across the
/// connections' and the loop's threads.
mod step_order;
/// Stops: cooperative cancel, SIGTERM, SIGKILL, process trees, chat scoping.
mod stop;
