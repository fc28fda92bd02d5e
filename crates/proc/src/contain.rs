//! Which containment holds on this host, and spawning a task under it.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use agentd_spawn::Environment;

use crate::cgroup::{CgroupOptions, Cgroups, Leftover, TaskCgroup};
use crate::guardian::Guardian;
use crate::pidfd::PidFd;
use crate::spawn::{spawn_agent_with, AgentCommand};
use crate::tree::{read_stat, TaskTree};

/// How long recovery waits for the previous guardian to finish, and for each old
/// task cgroup to empty.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(5);

/// The guarantee agentd can give that a finished task leaves nothing running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Containment {
    /// Each task runs in its own cgroup v2 under `root`: every descendant is found and
    /// killed, however it detached. `controllers` are the ones task cgroups get
    /// (`pids` means each task has `pids.max`).
    Cgroup {
        root: PathBuf,
        controllers: Vec<String>,
    },
    /// No writable cgroup (`reason` says why): a task's processes are found by process
    /// group, parent links and the `AGENTD_TASK_ID` variable. A process that both
    /// left the tree (double fork) and scrubbed its environment escapes.
    ProcessTree { reason: String },
}

impl Containment {
    pub fn is_cgroup(&self) -> bool {
        matches!(self, Containment::Cgroup { .. })
    }
}

/// agentd's process containment: detected once at startup, used for every spawn.
#[derive(Debug)]
pub struct Procs {
    cgroups: Option<Cgroups>,
    reason: String,
    guardian: Option<Guardian>,
    /// agentd's environment, taken at the first spawn (agentd changes its own only
    /// first thing in `main`): each agent's starts from it, so that a spawn neither
    /// reads nor copies it. `None` if it could not be taken: read at each spawn.
    environment: OnceLock<Option<Arc<Environment>>>,
}

impl Procs {
    /// Uses a cgroup per task where [`Cgroups::detect`] finds one, else the process
    /// tree search.
    pub fn detect(opts: &CgroupOptions) -> Procs {
        match Cgroups::detect(opts) {
            Ok(cgroups) => Procs::with_cgroups(cgroups),
            Err(reason) => Procs::process_tree(reason),
        }
    }

    /// Forces the process-tree fallback (configuration, tests).
    pub fn process_tree(reason: impl Into<String>) -> Procs {
        Procs {
            cgroups: None,
            reason: reason.into(),
            guardian: None,
            environment: OnceLock::new(),
        }
    }

    pub fn with_cgroups(cgroups: Cgroups) -> Procs {
        Procs {
            cgroups: Some(cgroups),
            reason: String::new(),
            guardian: None,
            environment: OnceLock::new(),
        }
    }

    pub fn containment(&self) -> Containment {
        match &self.cgroups {
            Some(c) => Containment::Cgroup {
                root: c.root().to_path_buf(),
                controllers: c.controllers().to_vec(),
            },
            None => Containment::ProcessTree {
                reason: self.reason.clone(),
            },
        }
    }

    pub fn cgroups(&self) -> Option<&Cgroups> {
        self.cgroups.as_ref()
    }

    /// Kills and removes what a previous agentd left in this instance's task cgroups
    /// (see [`Cgroups::recover`]); nothing to do for the process-tree fallback, whose
    /// orphans the parent-death signal and the channel's EOF end. Blocking: call it at
    /// startup, before the event loop runs, and after [`Procs::start_guardian`] (then
    /// the new guardian ends what is left should agentd die while it recovers).
    pub fn recover(&self) -> Vec<Leftover> {
        match (&self.cgroups, &self.guardian) {
            // The previous guardian is done: ours runs in its cgroup.
            (Some(c), Some(_)) => c.kill_leftovers(RECOVERY_DEADLINE),
            (Some(c), None) => c.recover(RECOVERY_DEADLINE),
            (None, _) => Vec::new(),
        }
    }

    /// Starts the [`Guardian`] that kills this instance's task cgroups when agentd
    /// dies, once the previous agentd's guardian has finished (waits for it, bounded,
    /// like [`Procs::recover`]); `Procs` keeps it. Call it as soon as the containment
    /// is detected, before [`Procs::recover`]: from then on, however agentd dies, no
    /// cgroup of its instance is left behind. Returns its pid (the reaper will see it
    /// exit only after [`Procs::shutdown`]), `None` for the process-tree fallback,
    /// where nothing could find the leftovers.
    pub fn start_guardian(&mut self) -> io::Result<Option<u32>> {
        let Some(c) = &self.cgroups else {
            return Ok(None);
        };
        if let Some(g) = &self.guardian {
            return Ok(Some(g.pid()));
        }
        c.wait_for_previous_guardian(RECOVERY_DEADLINE);
        let guardian = Guardian::start(c.root(), &c.guardian_dir())?;
        let pid = guardian.pid();
        self.guardian = Some(guardian);
        Ok(Some(pid))
    }

    /// At a clean exit, after every task ended: kills anything still in a task cgroup,
    /// removes the instance directory, and ends the guardian (a crash leaves this to
    /// the guardian and to [`Procs::recover`]). Blocking, like `recover`.
    pub fn shutdown(&mut self) -> io::Result<()> {
        let Some(c) = &self.cgroups else {
            return Ok(());
        };
        let removed = c.remove_all(Duration::from_secs(5));
        if let Some(guardian) = self.guardian.take() {
            crate::guardian::stop(guardian, &c.guardian_dir());
        }
        removed
    }

    /// Spawns the task's agent, inside a new task cgroup when cgroups are in use (a
    /// cgroup that cannot be created fails the spawn: the guarantee is not silently
    /// dropped). Hand [`Spawned::procs`] to [`crate::Killer::track`] at once.
    pub fn spawn(&self, cmd: &AgentCommand) -> io::Result<Spawned> {
        let cgroup = match &self.cgroups {
            Some(c) => Some(c.create_task(&cmd.task_id).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot create the task's cgroup in {}: {e}",
                        c.root().display()
                    ),
                )
            })?),
            None => None,
        };
        let environment = self
            .environment
            .get_or_init(|| Environment::capture().ok().map(Arc::new))
            .clone();
        let (agent, pidfd) = match spawn_agent_with(cmd, cgroup.as_ref(), environment) {
            Ok(spawned) => spawned,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    let _ = cg.remove();
                }
                return Err(e);
            }
        };
        // The agent is an unreaped child (only the daemon's reaper waits, and it has
        // not seen this pid yet), so its stat is its own (read only when the spawn
        // could not tell the start time from the clock).
        let start = agent
            .start_time
            .or_else(|| read_stat(agent.pid).map(|s| s.start));
        Ok(Spawned {
            pid: agent.pid,
            channel: agent.channel,
            output: agent.output,
            procs: TaskProcs {
                task_id: cmd.task_id.clone(),
                pid: agent.pid,
                start,
                pidfd,
                cgroup,
            },
        })
    }
}

/// A freshly spawned agent under [`Procs`].
#[derive(Debug)]
pub struct Spawned {
    /// The agent's pid (also its process group id), for the reaper's bookkeeping.
    /// Never signal it directly.
    pub pid: u32,
    /// agentd's end of the IPC socketpair (blocking mode, close-on-exec).
    pub channel: UnixStream,
    /// The agent's stdout and stderr, with [`AgentCommand::capture_output`].
    pub output: Option<std::fs::File>,
    /// Everything needed to signal and empty the task's tree: give it to the Killer.
    pub procs: TaskProcs,
}

/// A task's processes as the Killer knows them: the agent's pidfd and the task's
/// cgroup, or what the tree search needs.
#[derive(Debug)]
pub struct TaskProcs {
    pub(crate) task_id: String,
    pub(crate) pid: u32,
    pub(crate) start: Option<u64>,
    pub(crate) pidfd: Option<PidFd>,
    pub(crate) cgroup: Option<TaskCgroup>,
}

impl TaskProcs {
    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The agent's start time (field 22 of `/proc/PID/stat`), read right after the
    /// spawn while it was an unreaped child; `None` if that read failed.
    pub fn start_time(&self) -> Option<u64> {
        self.start
    }

    pub fn cgroup(&self) -> Option<&TaskCgroup> {
        self.cgroup.as_ref()
    }

    pub(crate) fn tree(&self) -> TaskTree {
        TaskTree::new(self.pid, self.task_id.clone()).with_agent_start(self.start)
    }
}
