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
//!   [`Procs::recover`] kills what a crashed agentd left in its task cgroups. See
//!   [`cgroup`].
//! - [`Containment::ProcessTree`]: the fallback. A task's processes are its agent's
//!   process group, the agent's descendants, and processes carrying the task's
//!   `AGENTD_TASK_ID`; one that double-forks *and* scrubs its environment escapes.
//!   See [`TaskTree`].
//!
//! # Signals without pid races
//!
//! The agent's pidfd is opened right after the fork while it is an unreaped child
//! ([`reap_children`] and the spawn exclude each other), and the agent is signalled
//! only through it: a reaped agent's pid is never signalled. Other members, found by
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
//! startup:  procs = Procs::detect(&CgroupOptions::new(instance_of_socket));
//!           procs.recover();                       // after the socket lock is held
//!           become_subreaper();
//!           killer = Killer::start(|r| loop_tx.send(r))
//! spawn:    let s = procs.spawn(&cmd)?;            // on the loop: fork + mkdir, cheap
//!           pids.insert(s.pid, task); killer.track(s.procs);
//! SIGTERM:  killer.signal(task, SIGTERM)           // returns at once
//! SIGKILL:  killer.kill(task)
//! SIGCHLD:  for r in reap_children() { killer.agent_exited(task_of(r.pid)) }
//! report:   TreeReport::Empty { task, .. }         // now free the slot
//! ```
//!
//! The older [`spawn_agent`] and [`TaskTree::kill_all`] remain for the daemon of
//! today; `kill_all` sleeps and scans, so it must not run on the event loop.
//!
//! - [`reap_children`]: the one place that waits for children.
//! - [`become_subreaper`]: orphaned descendants of agents come back to agentd.

pub mod cgroup;
mod contain;
mod killer;
mod pidfd;
mod reap;
mod spawn;
mod tree;

pub use cgroup::{CgroupOptions, Cgroups, Leftover, TaskCgroup, DAEMON_LEAF};
pub use contain::{Containment, Procs, Spawned, TaskProcs};
pub use killer::{Killer, KillerOptions, TreeReport};
pub use pidfd::PidFd;
pub use reap::{become_subreaper, reap_children, Reaped};
pub use spawn::{spawn_agent, spawn_agent_in, AgentCommand, SpawnedAgent, AGENT_IPC_FD};
pub use tree::{process_exists, TaskTree};
