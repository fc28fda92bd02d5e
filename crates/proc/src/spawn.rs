//! Spawning an agent subprocess.
//!
//! The child gets: its own process group, the task's end of a socketpair as fd
//! [`AGENT_IPC_FD`], a clean signal mask and default signal dispositions,
//! `PR_SET_PDEATHSIG` = SIGTERM (a belt: the agent also treats EOF on its channel as
//! "stop now"), stdin from /dev/null, stdout and stderr to a log file or a pipe.
//! Every other descriptor is close-on-exec in the child, including ones agentd
//! inherited without the flag, so nothing else leaks.
//!
//! The spawn is [`agentd_spawn::Command::spawn`]: a vfork-style `clone`, not `fork`
//! (`fork` copied agentd's page tables and made every page copy-on-write, so the
//! spawn and every thread's next writes paid for agentd's whole address space; that
//! dominated agentd's CPU per trivial task). With a [`TaskCgroup`]
//! ([`spawn_agent_in`]) the child's first act is to write itself into the task
//! cgroup's `cgroup.procs` (through a descriptor the parent opened), long before
//! exec: every descendant is born inside the cgroup. If that write fails the spawn
//! fails. The clone returns only once the child has exec'd, so its process group
//! exists and it is in its cgroup when the spawn returns: a stop that comes right
//! after finds both. The parent sets the group too, a no-op belt.
//!
//! The pidfd comes from the clone itself (`CLONE_PIDFD`): it names this child and
//! nothing else. The spawn holds [`crate::reap`]'s lock, so that the child of a
//! failed exec is reaped by the spawn and never reported to the daemon's reaper.
//!
//! Spawn from a thread that lives as long as agentd: the parent-death signal fires
//! when the *thread* that spawned exits.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use agentd_proto::ipc::{ENV_IPC_FD, ENV_SESSION, ENV_TASK_ID};
use nix::unistd::{self, Pid};

use crate::cgroup::TaskCgroup;
use crate::pidfd::PidFd;
use crate::reap::reap_lock;

/// The descriptor number the agent finds its IPC channel at.
pub const AGENT_IPC_FD: i32 = 3;

/// What to run for a task.
#[derive(Debug, Clone)]
pub struct AgentCommand {
    pub program: String,
    pub args: Vec<String>,
    pub task_id: String,
    pub session: String,
    /// Where the agent's own stdout and stderr go (appended), unless
    /// `capture_output` is set.
    pub log_path: Option<PathBuf>,
    /// Give the agent one pipe as its stdout and stderr and return the read end
    /// ([`SpawnedAgent::output`]), so that agentd can cap what it keeps. Wins over
    /// `log_path`.
    pub capture_output: bool,
    /// Extra environment variables for the agent (e.g. `AGENTD_HEARTBEAT_MS`); a
    /// later one wins over an earlier one and over agentd's own environment.
    pub env: Vec<(String, String)>,
}

/// A freshly spawned agent.
#[derive(Debug)]
pub struct SpawnedAgent {
    /// The agent's pid, which is also its process group id.
    pub pid: u32,
    /// agentd's end of the IPC socketpair (blocking mode, close-on-exec).
    pub channel: UnixStream,
    /// The read end of the agent's stdout and stderr with `capture_output`
    /// (blocking mode, close-on-exec).
    pub output: Option<File>,
    /// The agent's start time (field 22 of `/proc/PID/stat`, clock ticks since boot)
    /// when the spawn could tell it without reading `/proc` (see [`start_between`]).
    pub start_time: Option<u64>,
}

/// Spawns an agent in its own process group with its IPC channel on fd 3.
pub fn spawn_agent(cmd: &AgentCommand) -> io::Result<SpawnedAgent> {
    let (agent, _pidfd) = spawn_agent_in(cmd, None)?;
    Ok(agent)
}

/// Spawns an agent like [`spawn_agent`], inside `cgroup` when one is given, and
/// returns its pidfd too (`None` only on kernels before 5.2).
pub fn spawn_agent_in(
    cmd: &AgentCommand,
    cgroup: Option<&TaskCgroup>,
) -> io::Result<(SpawnedAgent, Option<PidFd>)> {
    spawn_agent_with(cmd, cgroup, None)
}

/// [`spawn_agent_in`], the agent's environment starting from `environment` (a copy
/// of agentd's taken earlier) when one is given, else from agentd's at the spawn.
pub(crate) fn spawn_agent_with(
    cmd: &AgentCommand,
    cgroup: Option<&TaskCgroup>,
    environment: Option<std::sync::Arc<agentd_spawn::Environment>>,
) -> io::Result<(SpawnedAgent, Option<PidFd>)> {
    let mut command = agentd_spawn::Command::new(&cmd.program);
    if let Some(environment) = environment {
        command.environment(environment);
    }
    command
        .args(&cmd.args)
        .env(ENV_IPC_FD, AGENT_IPC_FD.to_string())
        .env(ENV_TASK_ID, &cmd.task_id)
        .env(ENV_SESSION, &cmd.session)
        .death_signal(libc::SIGTERM);
    for (key, value) in &cmd.env {
        command.env(key, value);
    }
    let null = agentd_spawn::dev_null()?;
    let (ours, theirs) = UnixStream::pair()?;
    let mut captured = None;
    let output: Option<OwnedFd> = if cmd.capture_output {
        let (read, write) = unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        captured = Some(File::from(read));
        Some(write)
    } else if let Some(path) = &cmd.log_path {
        // 0600: the log holds the task's output, for its owner only.
        let file = File::options()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Some(file.into())
    } else {
        None
    };
    let out = output.as_ref().map_or(null, |fd| fd.as_fd());
    let fds = [null, out, out, theirs.as_fd()];
    debug_assert_eq!(fds.len(), AGENT_IPC_FD as usize + 1);
    // No other thread reaps while the child of a failed exec waits for the spawn.
    let guard = reap_lock();
    let child = command.spawn(&fds, cgroup.map(TaskCgroup::procs_fd))?;
    drop(guard);
    let start_time = child
        .started_within
        .and_then(|(before, after)| start_between(before, after));
    // Closes agentd's copies of the child's ends (its output, its channel end).
    drop((output, theirs));
    let pid = child.pid;
    let pidfd = match child.pidfd {
        Some(fd) => Some(PidFd::from_owned(fd, pid)),
        None => PidFd::open(pid).ok(),
    };
    // A belt: the child ran setpgid before the clone returned (EACCES: it has exec'd;
    // ESRCH: it is gone already, and the reaper will see it).
    let group = Pid::from_raw(pid as i32);
    match unistd::setpgid(group, group) {
        Ok(()) | Err(nix::errno::Errno::EACCES) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => return Err(io::Error::from(e)),
    }
    Ok((
        SpawnedAgent {
            pid,
            channel: ours,
            output: captured,
            start_time,
        },
        pidfd,
    ))
}

/// The start time `/proc/PID/stat` shows (field 22) for a child stamped between two
/// readings of `CLOCK_BOOTTIME` (nanoseconds), if they fall in the same clock tick.
///
/// The kernel stamps a new task with the boot-time clock inside `clone`
/// (`start_boottime`), and `/proc` shows that stamp divided down to clock ticks
/// (`USER_HZ`, `sysconf(_SC_CLK_TCK)`), shifted by the time namespace's offset as
/// `clock_gettime` is. The parent reads the clock right before the `clone` and the
/// child first thing ([`agentd_spawn::Child::started_within`]): when both readings
/// are in one tick, so is the stamp; when they straddle a tick boundary (rare: tens
/// of microseconds against a 10 ms tick) `None`, and the caller reads `/proc`. Saves
/// that read (an `open`, the kernel's whole `stat` formatting, two `read`s and a
/// `close`) on the spawn path.
pub(crate) fn start_between(before: u64, after: u64) -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 || 1_000_000_000 % hz != 0 {
        return None;
    }
    let per_tick = 1_000_000_000 / hz as u64;
    let (before, after) = (before / per_tick, after / per_tick);
    (before == after).then_some(before)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_time_is_told_only_within_one_clock_tick() {
        // SAFETY: sysconf has no preconditions.
        let per_tick = 1_000_000_000 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        let tick = 123_456;
        let at = |ns: u64| tick * per_tick + ns;
        assert_eq!(start_between(at(0), at(per_tick - 1)), Some(tick));
        assert_eq!(start_between(at(per_tick - 1), at(per_tick)), None);
    }
}
