//! Spawning an agent subprocess.
//!
//! The child gets: its own process group, the task's end of a socketpair as fd
//! [`AGENT_IPC_FD`], a clean signal mask and default signal dispositions,
//! `PR_SET_PDEATHSIG` = SIGTERM (a belt: the agent also treats EOF on its channel as
//! "stop now"), stdin from /dev/null, stdout and stderr to a log file or a pipe.
//! Every other descriptor is close-on-exec in the child, including ones agentd
//! inherited without the flag, so nothing else leaks.
//!
//! # How: a vfork-style clone, not fork
//!
//! `fork` copies agentd's page tables and makes every page copy-on-write, so the
//! spawn and every thread's next writes (the loop's, the store writer's) pay for
//! agentd's whole address space; that dominated agentd's CPU per trivial task.
//! [`spawn_agent_in`] instead does what glibc's `posix_spawn` does: `clone` with
//! `CLONE_VM | CLONE_VFORK` on a small stack of its own, so the child borrows
//! agentd's memory until it calls `execve`, and the calling thread sleeps until then.
//! Everything the child needs (argv, envp, the candidate paths of the program, the
//! descriptors) is prepared by the parent before the clone; the child ([`child`])
//! only makes async-signal-safe system calls, in this order:
//!
//! 1. with a [`TaskCgroup`], write itself into the task cgroup's `cgroup.procs`
//!    (through a descriptor the parent opened): first, so that everything it ever
//!    starts is born inside the cgroup; if the write fails the spawn fails;
//! 2. `dup2` stdin, stdout, stderr and the channel onto 0-3, then mark every
//!    descriptor above 3 close-on-exec;
//! 3. `setpgid(0, 0)`;
//! 4. every signal's disposition to the default, then an empty signal mask;
//! 5. `PR_SET_PDEATHSIG`, and a `getppid` check that agentd did not die before it;
//! 6. `execve` of each candidate path in turn (`PATH` search as `execvp` does it).
//!
//! A failing step stores its `errno` and its step in memory the parent shares and
//! `_exit`s; the parent then reaps that child itself (it was never visible to anyone
//! else: see below) and returns the error, so a missing program is an
//! [`io::ErrorKind::NotFound`] from the spawn, as with `std::process::Command`. All
//! signals are blocked in the calling thread around the clone, so no signal handler
//! of agentd ever runs in the child on agentd's memory.
//!
//! The clone returns in the parent only once the child has exec'd (or exited), so its
//! process group exists and it is in its cgroup when the spawn returns: a stop that
//! comes right after finds both. The parent sets the group too, a no-op belt.
//!
//! The pidfd comes from the clone itself (`CLONE_PIDFD`): it names this child and
//! nothing else. The spawn still holds [`crate::reap`]'s lock, so that the child of a
//! failed exec is reaped by the spawn and never reported to the daemon's reaper.
//!
//! Spawn from a thread that lives as long as agentd: the parent-death signal fires
//! when the *thread* that spawned exits.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, OnceLock};

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
    let exec = Exec::prepare(cmd)?;
    let (ours, theirs) = UnixStream::pair()?;
    let null = dev_null()?;
    let mut captured = None;
    // Every source above 3, so that no dup2 onto 0-3 in the child overwrites another
    // source and none is its own target (dup2 onto itself would keep close-on-exec).
    let output: Option<OwnedFd> = if cmd.capture_output {
        let (read, write) = unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        captured = Some(File::from(read));
        Some(above_ipc_fd(write)?)
    } else if let Some(path) = &cmd.log_path {
        // 0600: the log holds the task's output, for its owner only.
        let file = File::options()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Some(above_ipc_fd(file.into())?)
    } else {
        None
    };
    let output_fd = output.as_ref().map_or(null, AsRawFd::as_raw_fd);
    let channel: OwnedFd = above_ipc_fd(theirs.into())?;
    let args = ChildArgs {
        cgroup_procs: cgroup.map_or(-1, TaskCgroup::procs_fd),
        fds: [
            (null, 0),
            (output_fd, 1),
            (output_fd, 2),
            (channel.as_raw_fd(), AGENT_IPC_FD),
        ],
        parent: unistd::getpid().as_raw(),
        argv: exec.argv_ptrs.as_ptr(),
        envp: exec.envp_ptrs.as_ptr(),
        paths: &exec.paths,
        failure: AtomicI32::new(0),
        step: AtomicI32::new(0),
    };
    // No other thread reaps while the child of a failed exec waits for us.
    let guard = reap_lock();
    let (pid, pidfd) = clone_child(&args)?;
    let failure = args.failure.load(Ordering::SeqCst);
    if failure != 0 {
        // The child exited without exec: reap it here, it was never an agent.
        while let Err(nix::errno::Errno::EINTR) = nix::sys::wait::waitpid(Pid::from_raw(pid), None)
        {
        }
        drop(guard);
        let err = io::Error::from_raw_os_error(failure);
        return Err(match Step::from(args.step.load(Ordering::SeqCst)) {
            Step::Exec => err,
            step => io::Error::new(err.kind(), format!("{}: {err}", step.what())),
        });
    }
    drop(guard);
    // Closes agentd's copies of the child's ends (its pipe end, its channel end).
    drop((output, channel));
    let pidfd = match pidfd {
        Some(fd) => Some(fd),
        None => PidFd::open(pid as u32).ok(),
    };
    // A belt: the child ran setpgid before the clone returned (EACCES: it has exec'd;
    // ESRCH: it is gone already, and the reaper will see it).
    match unistd::setpgid(Pid::from_raw(pid), Pid::from_raw(pid)) {
        Ok(()) | Err(nix::errno::Errno::EACCES) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => return Err(io::Error::from(e)),
    }
    Ok((
        SpawnedAgent {
            pid: pid as u32,
            channel: ours,
            output: captured,
        },
        pidfd,
    ))
}

/// `/dev/null`, opened once (read-write, close-on-exec, above fd 3) and kept.
fn dev_null() -> io::Result<RawFd> {
    static DEV_NULL: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = DEV_NULL.get() {
        return Ok(fd.as_raw_fd());
    }
    let file = File::options().read(true).write(true).open("/dev/null")?;
    let fd = above_ipc_fd(file.into())?;
    Ok(DEV_NULL.get_or_init(|| fd).as_raw_fd())
}

/// `fd` itself if its number is above [`AGENT_IPC_FD`], else a close-on-exec copy
/// that is.
fn above_ipc_fd(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > AGENT_IPC_FD {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new one or -1.
    let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, AGENT_IPC_FD + 1) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// The child's argv, envp and the paths to try, as C strings, built in the parent.
struct Exec {
    paths: Vec<CString>,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
}

fn c_string(bytes: impl Into<Vec<u8>>) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "nul byte found in the agent's command line or environment",
        )
    })
}

impl Exec {
    fn prepare(cmd: &AgentCommand) -> io::Result<Exec> {
        let argv: Vec<CString> = std::iter::once(cmd.program.as_str())
            .chain(cmd.args.iter().map(String::as_str))
            .map(c_string)
            .collect::<io::Result<_>>()?;
        // agentd's environment, then ours over it (a later entry wins).
        let mut vars: Vec<(OsString, OsString)> = std::env::vars_os().collect();
        let ipc_fd = AGENT_IPC_FD.to_string();
        let ours = [
            (ENV_IPC_FD, ipc_fd.as_str()),
            (ENV_TASK_ID, cmd.task_id.as_str()),
            (ENV_SESSION, cmd.session.as_str()),
        ]
        .into_iter()
        .chain(cmd.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        for (key, value) in ours {
            vars.retain(|(k, _)| k.as_os_str() != OsStr::new(key));
            vars.push((key.into(), value.into()));
        }
        let path_var = vars
            .iter()
            .find(|(k, _)| k.as_os_str() == OsStr::new("PATH"))
            .map(|(_, v)| v.as_bytes().to_vec());
        let envp: Vec<CString> = vars
            .into_iter()
            .map(|(k, v)| {
                let mut entry = k.into_vec();
                entry.push(b'=');
                entry.extend_from_slice(v.as_bytes());
                c_string(entry)
            })
            .collect::<io::Result<_>>()?;
        let paths = candidates(cmd.program.as_bytes(), path_var.as_deref())?;
        let argv_ptrs = pointers(&argv);
        let envp_ptrs = pointers(&envp);
        Ok(Exec {
            paths,
            _argv: argv,
            argv_ptrs,
            _envp: envp,
            envp_ptrs,
        })
    }
}

/// A NULL-terminated array of pointers into `strings` (which must outlive it).
fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// The paths `execvp` would try for `program`: itself if it names a path, else each
/// directory of the agent's `PATH` (glibc's default when it has none; an empty entry
/// is the working directory).
fn candidates(program: &[u8], path: Option<&[u8]>) -> io::Result<Vec<CString>> {
    if program.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    if program.contains(&b'/') {
        return Ok(vec![c_string(program)?]);
    }
    let path = path.unwrap_or(b"/bin:/usr/bin");
    path.split(|b| *b == b':')
        .map(|dir| {
            let mut full = Vec::with_capacity(dir.len() + 1 + program.len());
            if !dir.is_empty() {
                full.extend_from_slice(dir);
                full.push(b'/');
            }
            full.extend_from_slice(program);
            c_string(full)
        })
        .collect()
}

/// Which step of the child failed (for the error's wording).
#[derive(Clone, Copy)]
enum Step {
    Cgroup = 1,
    Fds,
    Group,
    Signals,
    ParentDeath,
    Exec,
}

impl Step {
    fn from(n: i32) -> Step {
        match n {
            1 => Step::Cgroup,
            2 => Step::Fds,
            3 => Step::Group,
            4 => Step::Signals,
            5 => Step::ParentDeath,
            _ => Step::Exec,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Step::Cgroup => "cannot enter the task's cgroup",
            Step::Fds => "cannot set up the agent's descriptors",
            Step::Group => "cannot give the agent its own process group",
            Step::Signals => "cannot reset the agent's signal mask",
            Step::ParentDeath => "cannot set the agent's parent-death signal",
            Step::Exec => "cannot run the agent",
        }
    }
}

/// What the child reads (and, on failure, writes) in the memory it shares with the
/// parent. Everything is prepared before the clone and outlives it.
struct ChildArgs<'a> {
    /// The task cgroup's `cgroup.procs`, or -1.
    cgroup_procs: RawFd,
    /// `dup2(from, to)`, every `from` above 3.
    fds: [(RawFd, RawFd); 4],
    parent: libc::pid_t,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    paths: &'a [CString],
    /// The errno of the step that failed; 0 while none did.
    failure: AtomicI32,
    step: AtomicI32,
}

/// The child's stack: mapped once, reused by every spawn (one at a time: the child
/// runs on it only while the spawning thread waits in `clone`), with a guard page
/// below it.
struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is only used while the mutex that holds it is locked.
unsafe impl Send for ChildStack {}

const CHILD_STACK_BYTES: usize = 64 * 1024;

fn clone_child(args: &ChildArgs<'_>) -> io::Result<(libc::pid_t, Option<PidFd>)> {
    static STACK: Mutex<Option<ChildStack>> = Mutex::new(None);
    let mut held = STACK.lock().unwrap_or_else(|p| p.into_inner());
    let stack = match &mut *held {
        Some(stack) => stack,
        empty => empty.insert(ChildStack::map()?),
    };
    // The top of the stack (it grows down), 16-byte aligned as the ABI wants.
    // SAFETY: base + len is the end of the mapping.
    let top = unsafe { stack.base.cast::<u8>().add(stack.len) };
    let top = (top as usize & !15) as *mut libc::c_void;

    let all = [!0u64; 1];
    let mut old = [0u64; 1];
    // SAFETY: rt_sigprocmask on the calling thread with valid 8-byte sets: blocks every
    // signal (glibc's own internal ones too, which pthread_sigmask would leave open).
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            all.as_ptr(),
            old.as_mut_ptr(),
            8usize,
        );
    }
    let mut result = clone_with(args, top, true);
    if let Err(e) = &result {
        if e.raw_os_error() == Some(libc::EINVAL) {
            // Kernels before 5.2 know no CLONE_PIDFD.
            result = clone_with(args, top, false);
        }
    }
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            old.as_ptr(),
            std::ptr::null_mut::<u64>(),
            8usize,
        );
    }
    result
}

fn clone_with(
    args: &ChildArgs<'_>,
    stack_top: *mut libc::c_void,
    with_pidfd: bool,
) -> io::Result<(libc::pid_t, Option<PidFd>)> {
    let mut pidfd: libc::c_int = -1;
    let mut flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD;
    if with_pidfd {
        flags |= libc::CLONE_PIDFD;
    }
    // SAFETY: `child` runs on its own stack (`stack_top`, mapped and unused by anyone
    // else while we hold its mutex) in memory it shares with us, and the calling thread
    // sleeps until it has exec'd or exited (CLONE_VFORK), so everything `args` points
    // to stays alive and unchanged. `child` makes only async-signal-safe system calls,
    // allocates nothing, takes no lock and never returns into Rust code of ours: it
    // ends in execve or _exit. Every signal is blocked (see `clone_child`), so no
    // handler runs in it before it resets them. The kernel writes the pidfd into
    // `pidfd` before the child runs.
    let pid = unsafe {
        libc::clone(
            child,
            stack_top,
            flags,
            args as *const ChildArgs<'_> as *mut libc::c_void,
            &mut pidfd as *mut libc::c_int,
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: with CLONE_PIDFD the kernel gave us this new descriptor (close-on-exec).
    let pidfd = (with_pidfd && pidfd >= 0)
        .then(|| PidFd::from_owned(unsafe { OwnedFd::from_raw_fd(pidfd) }, pid as u32));
    Ok((pid, pidfd))
}

impl ChildStack {
    fn map() -> io::Result<ChildStack> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = CHILD_STACK_BYTES + page;
        // SAFETY: a fresh anonymous private mapping, owned by the ChildStack.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // The guard page: an overflow faults instead of writing below the stack.
        // SAFETY: the first page of the mapping just made.
        if unsafe { libc::mprotect(base, page, libc::PROT_NONE) } != 0 {
            let err = io::Error::last_os_error();
            // SAFETY: unmapping what we mapped; nobody else knows it.
            unsafe { libc::munmap(base, len) };
            return Err(err);
        }
        Ok(ChildStack { base, len })
    }
}

/// The child, between the clone and the exec. See the module doc for its steps.
///
/// It runs in agentd's memory on [`ChildStack`], with every signal blocked, while the
/// spawning thread waits: only raw, async-signal-safe system calls; no allocation,
/// no lock, no panic, no return (it ends in `execve` or `_exit`).
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` that `clone_with` passed, alive for as long as
    // this function runs (the parent waits).
    let args = unsafe { &*(arg as *const ChildArgs<'_>) };
    // SAFETY (for each call below): plain system calls on descriptors and memory the
    // parent prepared; none of them allocates or takes a lock.
    unsafe {
        // 1. First, so that nothing this child ever starts is born outside the cgroup.
        if args.cgroup_procs >= 0 && libc::write(args.cgroup_procs, b"0".as_ptr().cast(), 1) != 1 {
            fail(args, Step::Cgroup);
        }
        // 2. dup2 clears close-on-exec on the target; every source is above 3.
        for (from, to) in args.fds {
            if libc::dup2(from, to) < 0 {
                fail(args, Step::Fds);
            }
        }
        mark_inherited_fds_cloexec();
        // 3.
        if libc::setpgid(0, 0) < 0 {
            fail(args, Step::Group);
        }
        // 4. Dispositions first: once the mask is open, only defaults can act.
        reset_signal_dispositions();
        let empty = [0u64; 1];
        if libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            empty.as_ptr(),
            std::ptr::null_mut::<u64>(),
            8usize,
        ) < 0
        {
            fail(args, Step::Signals);
        }
        // 5.
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGTERM as libc::c_ulong,
            0,
            0,
            0,
        ) < 0
        {
            fail(args, Step::ParentDeath);
        }
        // agentd may have died before the prctl: then nobody would signal us.
        if libc::getppid() != args.parent {
            libc::_exit(1);
        }
        // 6. As execvp: go on past the paths that are not there; report EACCES if
        // one existed but could not be run, else the last error.
        let mut denied = false;
        for path in args.paths {
            libc::execve(path.as_ptr(), args.argv, args.envp);
            match *libc::__errno_location() {
                libc::EACCES => denied = true,
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                _ => fail(args, Step::Exec),
            }
        }
        if denied {
            *libc::__errno_location() = libc::EACCES;
        }
        fail(args, Step::Exec)
    }
}

/// The child's end after a failed `step`: its errno and step for the parent, then
/// `_exit`.
fn fail(args: &ChildArgs<'_>, step: Step) -> ! {
    // SAFETY: errno is read right after the failed call. The child runs on the
    // spawning thread's TLS, whose errno that thread does not touch while it waits.
    let errno = unsafe { *libc::__errno_location() };
    args.step.store(step as i32, Ordering::SeqCst);
    args.failure
        .store(if errno == 0 { libc::EIO } else { errno }, Ordering::SeqCst);
    // SAFETY: _exit ends this process at once, running nothing of agentd's.
    unsafe { libc::_exit(127) }
}

/// Sets every signal's disposition to the default, in the child.
///
/// Handlers are reset by exec anyway, but an *ignored* signal stays ignored across
/// exec: whatever agentd inherited as ignored (SIGQUIT from a shell's background job,
/// a realtime signal from a sandbox, SIGPIPE from the Rust runtime) would reach every
/// agent. The raw `rt_sigaction` is used because libc's wrapper refuses the signals it
/// reserves for itself (32 and 33 in glibc), which can be inherited ignored too. The
/// child has its own copy of the dispositions (no `CLONE_SIGHAND`): agentd's stay.
fn reset_signal_dispositions() {
    // The kernel's `struct sigaction` with SIG_DFL, no flags, no restorer, an empty
    // mask: all zeros, and no larger than this on any architecture.
    let default = [0u64; 4];
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction with a valid (all-zero) action and no old action; a
        // signal number the kernel does not know just fails with EINVAL.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                default.as_ptr(),
                std::ptr::null_mut::<u64>(),
                8usize,
            );
        }
    }
}

/// Marks every descriptor above the IPC channel close-on-exec, in the child.
///
/// agentd opens its own descriptors close-on-exec, but it may have inherited some from
/// whoever started it (a build tool's jobserver pipe, a terminal multiplexer's socket);
/// those must not reach agents. The child has its own descriptor table (no
/// `CLONE_FILES`): agentd's flags stay.
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
