//! Starting a program without `fork`, the way agentd starts its agents and
//! agent-exec its command.
//!
//! `fork` copies the parent's page tables and makes every page copy-on-write, so the
//! spawn and every thread's next writes pay for the parent's whole address space.
//! [`Command::spawn`] instead does what glibc's `posix_spawn` does: `clone` with
//! `CLONE_VM | CLONE_VFORK` on a small stack of its own, so the child borrows the
//! parent's memory until it calls `execve`, and the calling thread sleeps until then.
//! Unlike `posix_spawn` it can also put the child in a cgroup and give it a
//! parent-death signal before the exec. Everything the child needs (argv, envp, the
//! candidate paths of the program, the descriptors) is prepared by the parent before
//! the clone; the child only makes async-signal-safe system calls, in this order:
//!
//! 0. read `CLOCK_BOOTTIME` (the vDSO, no system call), so that the parent can tell
//!    the child's start time without reading `/proc` ([`Child::started_within`]);
//! 1. with a cgroup, write itself into that cgroup's `cgroup.procs` (a descriptor the
//!    caller opened): first, so that everything it ever starts is born inside it;
//! 2. `dup2` the given descriptors onto 0, 1, 2, …, then mark every descriptor above
//!    them close-on-exec (also those the parent inherited without the flag);
//! 3. `setpgid(0, 0)`: its own process group;
//! 4. every signal's disposition to the default, then an empty signal mask;
//! 5. with a death signal, `PR_SET_PDEATHSIG` and a `getppid` check that the parent
//!    did not die before it (the signal fires when the *thread* that spawned exits);
//!    after [`disable_thp_for_this_process`], `PR_SET_THP_DISABLE` off (see there);
//! 6. `execve` of each candidate path in turn (`PATH` search as `execvp` does it,
//!    with the child's own `PATH`).
//!
//! A failing step stores its `errno` and its step in memory the parent shares and
//! `_exit`s; [`Command::spawn`] then reaps that child itself and returns the error: a
//! missing program is an [`io::ErrorKind::NotFound`], as with `std::process::Command`.
//! (A caller that reaps with `waitpid(-1)` on another thread must keep that reaper
//! out while it spawns.) All signals are blocked in the calling thread around the
//! clone, so no signal handler of the parent ever runs in the child on its memory.
//!
//! The clone returns only once the child has exec'd (or exited), so when
//! [`Command::spawn`] returns the child's process group exists and it is in its
//! cgroup. Its pidfd comes from the clone itself (`CLONE_PIDFD`): it names this child
//! and nothing else.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Set by [`disable_thp_for_this_process`]: children get transparent huge pages back.
static CHILDREN_GET_THP: AtomicBool = AtomicBool::new(false);

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`), unless
/// they are off already, without passing that on: every later [`Command::spawn`]
/// child starts its program with them on again, as this process was started.
/// Returns whether it turned them off. Call it while the process has one thread.
///
/// The setting belongs to the process's memory, and the child of a spawn shares the
/// parent's memory until its `execve` (whose new memory takes the setting as it is
/// then): so the child clears the setting (huge pages allowed again) for both right
/// before its `execve`, and the parent sets it again once the clone returns, before
/// the next spawn can begin. In between, other threads of the parent may be given
/// huge pages.
pub fn disable_thp_for_this_process() -> io::Result<bool> {
    // SAFETY: prctl with integer arguments only.
    let disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
    if disabled < 0 {
        return Err(io::Error::last_os_error());
    }
    if disabled != 0 {
        return Ok(false);
    }
    set_thp_disabled(true)?;
    CHILDREN_GET_THP.store(true, Ordering::SeqCst);
    Ok(true)
}

/// Whether [`disable_thp_for_this_process`] turned transparent huge pages off here,
/// so that a child started otherwise than by [`Command::spawn`] (with its own copy
/// of the memory, as after `fork`) should turn them on again before its exec.
pub fn children_get_thp() -> bool {
    CHILDREN_GET_THP.load(Ordering::SeqCst)
}

fn set_thp_disabled(disabled: bool) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, disabled as libc::c_ulong, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A program to start: its command line, its environment (the parent's, edited), and
/// what it gets besides (see the crate doc).
#[derive(Debug, Clone)]
pub struct Command {
    program: OsString,
    args: Vec<OsString>,
    /// Edits of the parent's environment, in order: `None` removes the variable.
    env: Vec<(OsString, Option<OsString>)>,
    /// The parent's environment as taken once ([`Environment::capture`]); `None`:
    /// read at each spawn.
    base: Option<Arc<Environment>>,
    death_signal: Option<libc::c_int>,
}

/// A copy of the process's environment, ready to hand to children: for a parent
/// that spawns often and never changes its environment after taking it, so that a
/// spawn neither reads the environment nor copies the entries it keeps.
#[derive(Debug)]
pub struct Environment {
    /// Each variable as `KEY=VALUE`, in the environment's order, with its key's
    /// length.
    entries: Vec<(CString, usize)>,
}

impl Environment {
    /// The process's environment now.
    pub fn capture() -> io::Result<Environment> {
        let entries = std::env::vars_os()
            .map(|(k, v)| {
                let key_len = k.len();
                let mut entry = k.into_vec();
                entry.push(b'=');
                entry.extend_from_slice(v.as_bytes());
                Ok((c_string(entry)?, key_len))
            })
            .collect::<io::Result<_>>()?;
        Ok(Environment { entries })
    }

    fn key(entry: &(CString, usize)) -> &[u8] {
        &entry.0.as_bytes()[..entry.1]
    }
}

/// A started child: its pid (also its process group id) and its pidfd (`None` only
/// on kernels before 5.2). Nobody has waited for it: reap it.
#[derive(Debug)]
pub struct Child {
    pub pid: u32,
    pub pidfd: Option<OwnedFd>,
    /// `CLOCK_BOOTTIME` (nanoseconds) read by the parent right before the `clone` and
    /// by the child first thing: the kernel stamped the child's start
    /// (`start_boottime`, field 22 of `/proc/PID/stat` in clock ticks) in between.
    /// `None` if the clock could not be read.
    pub started_within: Option<(u64, u64)>,
}

impl Command {
    /// Runs `program` (looked up on the child's `PATH` unless it holds a `/`), with
    /// `program` as its `argv[0]`.
    pub fn new(program: impl Into<OsString>) -> Command {
        Command {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            base: None,
            death_signal: None,
        }
    }

    pub fn args<I, S>(&mut self, args: I) -> &mut Command
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets a variable of the child's environment (a later setting wins).
    pub fn env(&mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> &mut Command {
        self.env.push((key.into(), Some(value.into())));
        self
    }

    /// Removes a variable from the child's environment.
    pub fn env_remove(&mut self, key: impl Into<OsString>) -> &mut Command {
        self.env.push((key.into(), None));
        self
    }

    /// Starts from `env` instead of the environment the process has at the spawn
    /// (the edits still apply).
    pub fn environment(&mut self, env: Arc<Environment>) -> &mut Command {
        self.base = Some(env);
        self
    }

    /// The signal the child gets when the thread that spawned it exits
    /// (`PR_SET_PDEATHSIG`); none by default.
    pub fn death_signal(&mut self, signal: libc::c_int) -> &mut Command {
        self.death_signal = Some(signal);
        self
    }

    /// Starts the program in its own process group. `fds[i]` becomes the child's
    /// descriptor `i` (give at least stdin, stdout and stderr; [`dev_null`] for
    /// none); every other descriptor is closed at its exec. With `cgroup_procs` (an
    /// open `cgroup.procs` of a cgroup v2), the child enters that cgroup before
    /// anything else; if it cannot, the spawn fails and nothing ran.
    pub fn spawn(
        &self,
        fds: &[BorrowedFd<'_>],
        cgroup_procs: Option<BorrowedFd<'_>>,
    ) -> io::Result<Child> {
        let exec = Exec::prepare(self)?;
        // Every source above the targets, so that no dup2 onto 0..n overwrites another
        // source and none is its own target (dup2 onto itself would keep
        // close-on-exec).
        let n = fds.len() as RawFd;
        let mut copies: Vec<OwnedFd> = Vec::new();
        let mut sources: Vec<RawFd> = Vec::with_capacity(fds.len());
        for fd in fds {
            if fd.as_raw_fd() >= n {
                sources.push(fd.as_raw_fd());
            } else {
                // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller keeps open returns a
                // new descriptor (then ours) or -1.
                let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, n) };
                if copy < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: the kernel just returned this descriptor; nothing else owns it.
                let copy = unsafe { OwnedFd::from_raw_fd(copy) };
                sources.push(copy.as_raw_fd());
                copies.push(copy);
            }
        }
        let args = ChildArgs {
            cgroup_procs: cgroup_procs.map_or(-1, |fd| fd.as_raw_fd()),
            fds: &sources,
            death_signal: self.death_signal,
            restore_thp: CHILDREN_GET_THP.load(Ordering::SeqCst),
            // SAFETY: getpid cannot fail.
            parent: unsafe { libc::getpid() },
            argv: exec.argv_ptrs.as_ptr(),
            envp: exec.envp_ptrs.as_ptr(),
            paths: &exec.paths,
            failure: AtomicI32::new(0),
            step: AtomicI32::new(0),
            entered: AtomicU64::new(0),
        };
        let before = boottime_ns();
        let (pid, pidfd) = clone_child(&args)?;
        let entered = args.entered.load(Ordering::SeqCst);
        drop(copies);
        let failure = args.failure.load(Ordering::SeqCst);
        if failure != 0 {
            // The child exited without exec: reap it here, it never ran the program.
            let mut status = 0;
            // SAFETY: waitpid for our own child, with a valid status pointer.
            while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
                && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
            {}
            let err = io::Error::from_raw_os_error(failure);
            return Err(match Step::from(args.step.load(Ordering::SeqCst)) {
                Step::Exec => err,
                step => io::Error::new(err.kind(), format!("{}: {err}", step.what())),
            });
        }
        Ok(Child {
            pid: pid as u32,
            pidfd,
            started_within: before.filter(|_| entered != 0).map(|b| (b, entered)),
        })
    }
}

/// `/dev/null`, opened once (read-write, close-on-exec) and kept: a child's stdin, or
/// an output nobody keeps.
pub fn dev_null() -> io::Result<BorrowedFd<'static>> {
    static DEV_NULL: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = DEV_NULL.get() {
        return Ok(fd.as_fd());
    }
    let file = File::options().read(true).write(true).open("/dev/null")?;
    Ok(DEV_NULL.get_or_init(|| file.into()).as_fd())
}

/// The child's argv, envp and the paths to try, as C strings, built in the parent.
struct Exec {
    paths: Vec<CString>,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    /// Keeps the entries `envp_ptrs` points into that `_envp` does not own.
    _base: Option<Arc<Environment>>,
    envp_ptrs: Vec<*const libc::c_char>,
}

fn c_string(bytes: impl Into<Vec<u8>>) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "nul byte found in a command line or environment",
        )
    })
}

impl Exec {
    fn prepare(cmd: &Command) -> io::Result<Exec> {
        let argv: Vec<CString> = std::iter::once(&cmd.program)
            .chain(&cmd.args)
            .map(|a| c_string(a.as_bytes()))
            .collect::<io::Result<_>>()?;
        if let Some(base) = &cmd.base {
            return Exec::prepare_from(cmd, argv, base.clone());
        }
        let mut vars: Vec<(OsString, OsString)> = std::env::vars_os().collect();
        for (key, value) in &cmd.env {
            vars.retain(|(k, _)| k != key);
            if let Some(value) = value {
                vars.push((key.clone(), value.clone()));
            }
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
            _base: None,
            envp_ptrs,
        })
    }

    /// Like [`Exec::prepare`], from a captured environment: the same variables in
    /// the same order (the base's in its order but those an edit names, then the
    /// edits' in theirs), pointing into the base's entries rather than copying them.
    fn prepare_from(cmd: &Command, argv: Vec<CString>, base: Arc<Environment>) -> io::Result<Exec> {
        let mut edits: Vec<(&OsString, &OsString)> = Vec::with_capacity(cmd.env.len());
        for (key, value) in &cmd.env {
            edits.retain(|(k, _)| *k != key);
            if let Some(value) = value {
                edits.push((key, value));
            }
        }
        let edited = |key: &[u8]| cmd.env.iter().any(|(k, _)| k.as_bytes() == key);
        let kept: Vec<&(CString, usize)> = base
            .entries
            .iter()
            .filter(|e| !edited(Environment::key(e)))
            .collect();
        let envp: Vec<CString> = edits
            .iter()
            .map(|(k, v)| {
                let mut entry = k.as_bytes().to_vec();
                entry.push(b'=');
                entry.extend_from_slice(v.as_bytes());
                c_string(entry)
            })
            .collect::<io::Result<_>>()?;
        let path_var = match edits
            .iter()
            .find(|(k, _)| k.as_os_str() == OsStr::new("PATH"))
        {
            Some((_, v)) => Some(v.as_bytes()),
            None => kept
                .iter()
                .find(|e| Environment::key(e) == b"PATH")
                .map(|e| &e.0.as_bytes()[e.1 + 1..]),
        };
        let paths = candidates(cmd.program.as_bytes(), path_var)?;
        let envp_ptrs = kept
            .iter()
            .map(|e| e.0.as_ptr())
            .chain(envp.iter().map(|e| e.as_ptr()))
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let argv_ptrs = pointers(&argv);
        Ok(Exec {
            paths,
            _argv: argv,
            argv_ptrs,
            _envp: envp,
            _base: Some(base),
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
/// directory of the child's `PATH` (glibc's default when it has none; an empty entry
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
            Step::Cgroup => "cannot enter the cgroup",
            Step::Fds => "cannot set up the descriptors",
            Step::Group => "cannot make a process group",
            Step::Signals => "cannot reset the signal mask",
            Step::ParentDeath => "cannot set the parent-death signal",
            Step::Exec => "cannot run the program",
        }
    }
}

/// What the child reads (and, on failure, writes) in the memory it shares with the
/// parent. Everything is prepared before the clone and outlives it.
struct ChildArgs<'a> {
    /// A cgroup's `cgroup.procs`, or -1.
    cgroup_procs: RawFd,
    /// `fds[i]` becomes descriptor `i`; every one is at least `fds.len()`.
    fds: &'a [RawFd],
    death_signal: Option<libc::c_int>,
    /// Turn `PR_SET_THP_DISABLE` off before the exec ([`disable_thp_for_this_process`]).
    restore_thp: bool,
    parent: libc::pid_t,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    paths: &'a [CString],
    /// The errno of the step that failed; 0 while none did.
    failure: AtomicI32,
    step: AtomicI32,
    /// `CLOCK_BOOTTIME` in nanoseconds when the child began (0: unread).
    entered: AtomicU64,
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

fn clone_child(args: &ChildArgs<'_>) -> io::Result<(libc::pid_t, Option<OwnedFd>)> {
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
    if args.restore_thp {
        // The child turned them on for the memory it shared with us (see
        // `disable_thp_for_this_process`): off again for ours, before another spawn
        // can begin (the stack's lock is held), so every child execs with them on.
        let _ = set_thp_disabled(true);
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
) -> io::Result<(libc::pid_t, Option<OwnedFd>)> {
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
    let pidfd = (with_pidfd && pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd) });
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

/// `CLOCK_BOOTTIME` now, in nanoseconds (`None` if the clock cannot be read).
/// Async-signal-safe: the child calls it too.
fn boottime_ns() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec through a valid pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// The child, between the clone and the exec. See the crate doc for its steps.
///
/// It runs in the parent's memory on [`ChildStack`], with every signal blocked, while the
/// spawning thread waits: only raw, async-signal-safe system calls; no allocation,
/// no lock, no panic, no return (it ends in `execve` or `_exit`).
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` that `clone_with` passed, alive for as long as
    // this function runs (the parent waits).
    let args = unsafe { &*(arg as *const ChildArgs<'_>) };
    // 0. When it began (clock_gettime is async-signal-safe: a vDSO read, no lock).
    args.entered
        .store(boottime_ns().unwrap_or(0), Ordering::SeqCst);
    // SAFETY (for each call below): plain system calls on descriptors and memory the
    // parent prepared; none of them allocates or takes a lock.
    unsafe {
        // 1. First, so that nothing this child ever starts is born outside the cgroup.
        if args.cgroup_procs >= 0 && libc::write(args.cgroup_procs, b"0".as_ptr().cast(), 1) != 1 {
            fail(args, Step::Cgroup);
        }
        // 2. dup2 clears close-on-exec on the target; every source is above the
        //    targets, so none is overwritten before it is copied.
        for (to, &from) in args.fds.iter().enumerate() {
            if libc::dup2(from, to as RawFd) < 0 {
                fail(args, Step::Fds);
            }
        }
        mark_inherited_fds_cloexec(args.fds.len() as libc::c_uint);
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
        if let Some(signal) = args.death_signal {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) < 0 {
                fail(args, Step::ParentDeath);
            }
            // The parent may have died before the prctl: then nobody would signal us.
            if libc::getppid() != args.parent {
                libc::_exit(1);
            }
        }
        // Last before the exec, since it is the parent's too until then; a failure
        // (it cannot fail where the parent's prctl succeeded) leaves them off.
        if args.restore_thp {
            libc::prctl(libc::PR_SET_THP_DISABLE, 0, 0, 0, 0);
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
    // SAFETY: _exit ends this process at once, running nothing of the parent's.
    unsafe { libc::_exit(127) }
}

/// Sets every signal's disposition to the default, in the child.
///
/// Handlers are reset by exec anyway, but an *ignored* signal stays ignored across
/// exec: whatever the parent inherited as ignored (SIGQUIT from a shell's background job,
/// a realtime signal from a sandbox, SIGPIPE from the Rust runtime) would reach the
/// program. The raw `rt_sigaction` is used because libc's wrapper refuses the signals it
/// reserves for itself (32 and 33 in glibc), which can be inherited ignored too. The
/// child has its own copy of the dispositions (no `CLONE_SIGHAND`): the parent's stay.
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

/// Marks every descriptor from `first` on close-on-exec, in the child.
///
/// A parent such as agentd opens its own descriptors close-on-exec, but may have inherited some from
/// whoever started it (a build tool's jobserver pipe, a terminal multiplexer's socket);
/// those must not reach the child's program. The child has its own descriptor table
/// (no `CLONE_FILES`): the parent's flags stay.
fn mark_inherited_fds_cloexec(first: libc::c_uint) {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
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
