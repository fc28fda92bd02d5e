//! The only crate of agentd that creates processes, sends signals or waits for them.
//!
//! # Containment
//!
//! [`Procs::detect`] decides once, at startup, which guarantee holds
//! ([`Procs::containment`], for `agentctl status` and the README):
//!
//! - [`Containment::Cgroup`]: agentd can write a cgroup v2 subtree (its own cgroup as
//!   a systemd service with `Delegate=yes`, or the unified hierarchy as root). Each
//!   agent is started inside its own task cgroup from the spawn itself, so every
//!   descendant, however it detached (`setsid`, double fork, `env -i`), is killed by
//!   `cgroup.kill`; the tree is empty when `cgroup.events` says so, and the cgroup is
//!   removed. With the `pids` controller delegated each task has a `pids.max`.
//!   If agentd dies, however, its [`Guardian`] kills what is left in its task
//!   cgroups within seconds, and [`Procs::recover`] at the next start kills what
//!   even that missed. See [`cgroup`].
//! - [`Containment::ProcessTree`]: the fallback. A task's processes are its agent's
//!   process group, the agent's descendants, and processes carrying the task's
//!   `AGENTD_TASK_ID`; one that double-forks *and* scrubs its environment escapes.
//!   See [`TaskTree`].
//!
//! # Signals without pid races
//!
//! The agent's pidfd comes from the spawn's `clone` itself (`CLONE_PIDFD`), and the
//! agent is signalled only through it: a reaped agent's pid is never signalled. Other members, found by
//! reading `cgroup.procs` or `/proc`, are signalled through pidfds whose membership
//! was re-checked after they were opened; the whole-tree SIGKILL is `cgroup.kill`.
//!
//! # Off the event loop
//!
//! [`Killer`] is a worker thread: the daemon asks it to signal, kill or empty a task's
//! tree and gets [`TreeReport`]s back; kill rounds are timer-driven in the worker. An
//! agent that exits normally costs one read of `cgroup.events` (cgroups), or a look at
//! agentd's own children (fallback as a subreaper), not a scan of the machine.
//!
//! # How the daemon uses it
//!
//! ```text
//! startup (after the socket lock is held, before the loop runs):
//!     let procs = Procs::detect(&CgroupOptions::for_socket(&socket_path));
//!     procs.start_guardian()?;                      // Some with cgroups; after the
//!                                                   // previous guardian (bounded wait)
//!     for left in procs.recover() { log it }       // blocking, bounded
//!     become_subreaper()?;
//!     let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<TreeReport>();
//!     let killer = Killer::start(move |r| { let _ = tx.send(r); })?;
//!     // the loop selects on `rx` beside its other channels
//! spawn (on the loop thread, which lives as long as agentd: PR_SET_PDEATHSIG):
//!     let s = procs.spawn(&cmd)?;                   // mkdir + vfork-style clone, no scan
//!     pids.insert(s.pid, task_id);                  // same loop step
//!     killer.track(s.procs)                         // now, or (cgroup) before the first
//!                                                   // signal: keep them until then
//! stop steps:  Sigterm => killer.signal(&id, Signal::SIGTERM)
//!              Sigkill => killer.kill(&id)          // both return at once
//! SIGCHLD:     for r in reap_children() { if let Some(id) = pids.remove(&r.pid) {
//!                  remember r as the exit; killer.agent_exited(&id)   // tracked
//!                  or killer.untracked_exited(procs) } }   // Some(Empty) at once if
//!                                                   // one rmdir removed the cgroup
//! TreeReport::Empty { task_id, survivors, .. }: the tree is gone (log survivors):
//!              now the task may end and its slot be freed (with the drained channel).
//! TreeReport::Signalled { .. }: for the log only.
//! status:      procs.containment()                  // Cgroup { root, .. } | ProcessTree { reason }
//! clean exit:  drop(killer); procs.shutdown()        // ends the guardian too
//! ```
//!
//! The daemon uses exactly this. The older [`spawn_agent`] and [`TaskTree::kill_all`]
//! remain for tests and tools; `kill_all` sleeps and scans, so it must never run on
//! the event loop.
//!
//! - [`reap_children`]: the one place that waits for children.
//! - [`become_subreaper`]: orphaned descendants of agents come back to agentd.

pub mod cgroup;
mod contain;
mod guardian;
mod killer;
mod pidfd;
mod reap;
mod spawn;
mod tree;

pub use cgroup::{CgroupOptions, Cgroups, Leftover, TaskCgroup, DAEMON_LEAF};
pub use contain::{Containment, Procs, Spawned, TaskProcs};
pub use guardian::Guardian;
pub use killer::{Killer, KillerOptions, TreeReport};
pub use pidfd::PidFd;
pub use reap::{become_subreaper, reap_children, Reaped};
pub use spawn::{spawn_agent, spawn_agent_in, AgentCommand, SpawnedAgent, AGENT_IPC_FD};
pub use tree::{process_exists, TaskTree};
