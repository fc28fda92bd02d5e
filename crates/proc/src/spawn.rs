//! Spawning an agent subprocess.
//!
//! The child gets: its own process group (set in the child *and* in the parent, so a
//! stop that arrives right after the spawn already finds the group), the task's end of
//! a socketpair as fd [`AGENT_IPC_FD`], a clean signal mask and default signal
//! dispositions, `PR_SET_PDEATHSIG` = SIGTERM (a belt: the agent also treats EOF on
//! its channel as "stop now"), stdin from /dev/null, stdout and stderr to a log file.
//! Every other descriptor of agentd is close-on-exec, so nothing else leaks.
//!
//! With a [`TaskCgroup`] ([`spawn_agent_in`]), the child's first act after the fork is
//! to write itself into the task cgroup's `cgroup.procs` (through a descriptor the
//! parent opened), before it changes anything else and long before exec: every
//! descendant is born inside the cgroup. If that write fails the spawn fails.
//!
//! The agent's pidfd is opened right after the fork, while [`crate::reap`]'s lock keeps
//! any thread from reaping it, so it names the agent and nothing else.
//!
//! Spawn from a thread that lives as long as agentd: the parent-death signal fires
//! when the *thread* that forked exits.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use agentd_proto::ipc::{ENV_IPC_FD, ENV_SESSION, ENV_TASK_ID};
use nix::sys::signal::{self, SigSet, SigmaskHow, Signal};
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
    /// Where the agent's own stdout and stderr go (appended).
    pub log_path: Option<PathBuf>,
}

/// A freshly spawned agent.
#[derive(Debug)]
pub struct SpawnedAgent {
    /// The agent's pid, which is also its process group id.
    pub pid: u32,
    /// agentd's end of the IPC socketpair (blocking mode, close-on-exec).
    pub channel: UnixStream,
}

/// Spawns an agent in its own process group with its IPC channel on fd 3.
pub fn spawn_agent(cmd: &AgentCommand) -> io::Result<SpawnedAgent> {
    let (agent, _pidfd) = spawn_agent_in(cmd, None)?;
    Ok(agent)
}

/// Spawns an agent like [`spawn_agent`], inside `cgroup` when one is given, and
/// returns its pidfd too (`None` only on kernels before 5.3).
pub fn spawn_agent_in(
    cmd: &AgentCommand,
    cgroup: Option<&TaskCgroup>,
) -> io::Result<(SpawnedAgent, Option<PidFd>)> {
    let (ours, theirs) = UnixStream::pair()?;
    let output = match &cmd.log_path {
        Some(path) => {
            // 0600: the log holds the task's output, for its owner only.
            let file = File::options()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)?;
            let copy = file.try_clone()?;
            (Stdio::from(file), Stdio::from(copy))
        }
        None => (Stdio::null(), Stdio::null()),
    };
    let parent = unistd::getpid();
    let child_fd = theirs.as_raw_fd();
    let cgroup_procs = cgroup.map(TaskCgroup::procs_fd);

    let mut command = Command::new(&cmd.program);
    command
        .args(&cmd.args)
        .env(ENV_IPC_FD, AGENT_IPC_FD.to_string())
        .env(ENV_TASK_ID, &cmd.task_id)
        .env(ENV_SESSION, &cmd.session)
        .stdin(Stdio::null())
        .stdout(output.0)
        .stderr(output.1);
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (write, dup2, fcntl, setpgid, sigprocmask,
    // sigaction, prctl, getppid, _exit); it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            // First, so that nothing this child ever starts is born outside the cgroup.
            if let Some(fd) = cgroup_procs {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if child_fd == AGENT_IPC_FD {
                let flags = libc::fcntl(child_fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(child_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(child_fd, AGENT_IPC_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            mark_inherited_fds_cloexec();
            if libc::setpgid(0, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
            for sig in [
                Signal::SIGINT,
                Signal::SIGTERM,
                Signal::SIGHUP,
                Signal::SIGQUIT,
                Signal::SIGPIPE,
            ] {
                signal::signal(sig, signal::SigHandler::SigDfl)?;
            }
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
                0,
                0,
                0,
            ) < 0
            {
                return Err(io::Error::last_os_error());
            }
            // agentd may have died between fork and prctl: then nobody would signal us.
            if libc::getppid() != parent.as_raw() {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    // No thread may reap between the fork and pidfd_open (see crate::reap).
    let guard = reap_lock();
    let child = command.spawn()?;
    drop(theirs);
    let pid = child.id();
    let pidfd = PidFd::open(pid).ok();
    drop(guard);
    // The other half of the process-group race: if the stop comes before the child
    // ran setpgid, the group must exist already. EACCES means the child has exec'd
    // (and so has set its group); ESRCH that it is gone (the reaper will see it).
    match unistd::setpgid(Pid::from_raw(pid as i32), Pid::from_raw(pid as i32)) {
        Ok(()) | Err(nix::errno::Errno::EACCES) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => return Err(io::Error::from(e)),
    }
    // Dropping `std::process::Child` neither kills nor waits: the reaper owns the pid.
    drop(child);
    Ok((SpawnedAgent { pid, channel: ours }, pidfd))
}

/// Marks every descriptor above the IPC channel close-on-exec, in the forked child.
///
/// agentd opens its own descriptors close-on-exec, but it may have inherited some from
/// whoever started it (a build tool's jobserver pipe, a terminal multiplexer's socket);
/// those must not reach agents. Marking instead of closing keeps std's own exec-error
/// pipe working.
fn mark_inherited_fds_cloexec() {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    let first = (AGENT_IPC_FD + 1) as libc::c_uint;
    // SAFETY: close_range only changes descriptor flags; async-signal-safe.
    let done = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    } == 0;
    if !done {
        // Kernels before 5.11: walk the descriptor table up to a sane bound.
        for fd in first as i32..4096 {
            // SAFETY: fcntl on a possibly closed descriptor just fails with EBADF.
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags >= 0 {
                    libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                }
            }
        }
    }
}
