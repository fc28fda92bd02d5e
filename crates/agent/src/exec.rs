//! agent-exec's logic: run one command line as an agentd task.
//!
//! The command runs in its own process group with a clean signal mask and default
//! signal dispositions, without the IPC fd, and with `AGENTD_TASK_ID`/`AGENTD_SESSION`
//! in its environment. It is started like agentd's agents, without a `fork` of
//! agent-exec ([`agentd_spawn`]), with SIGKILL as its parent-death signal. Its
//! stdout and stderr share one pipe, so their lines keep the order the command
//! wrote them in; each line becomes progress and feeds a bounded tail that
//! becomes the result text. When the command exits, the rest of its group is
//! killed after [`ExecConfig::drain_timeout`] (background processes must not hold
//! the pipe open), and what is still in the pipe is relayed before the result,
//! however slowly agentd reads. Cancel turns into SIGINT for the group, and EOF (or
//! garbage) on the channel means agentd is gone: the group gets SIGTERM + SIGCONT,
//! then SIGKILL after a grace period.
//!
//! **Steering** ([`ExecConfig::steer`], `--steer`) is off unless asked for, since
//! only a command that reads its stdin can take it: without it the command's
//! stdin is `/dev/null`, the Hello says `steer: false`, and agentd queues steered
//! messages as follow-ups. With it, each steer is written to the command's stdin
//! as one line in the [line framing](escape_line) and acknowledged `accepted` once
//! the command has read the whole line from the pipe; a steer still unread when
//! the command ends (or written into a closed stdin) is acknowledged `false`, and
//! agentd queues it as a follow-up.
//!
//! **Checkpoints** ([`ExecConfig::checkpoints`], `--checkpoints`): the command
//! gets fd 3 ([`ENV_CHECKPOINT_FD`]), a pipe on which each line, in the line
//! framing, is one checkpoint, relayed to agentd as `Checkpoint`.
//!
//! **Resuming**: when agentd resumes a task, the command finds
//! [`ENV_RESUMING`]`=1`, [`ENV_PREVIOUS_TASK_ID`], and the last checkpoint in the
//! file named by [`ENV_CHECKPOINT_FILE`] (and in [`ENV_CHECKPOINT`] itself when it
//! is small).
//!
//! Threads: the caller's thread spawns the command and waits for it; one thread
//! for the output pipe; one for the checkpoint pipe; one IPC reader; one stdin
//! writer (steering only); the heartbeat; and in [`run`] one thread that forwards
//! agent-exec's own SIGTERM/SIGINT to the group.
//!
//! The command's group is never signalled after the command has been reaped: the
//! command is first waited for with `WNOWAIT`, so its zombie keeps the pid (and
//! the group id) reserved while the leftovers of the group are killed.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agentd_proto::ipc::{
    AgentFeatures, AgentHello, AgentMsg, Capabilities, CommandExit, Outcome, SupervisorMsg,
    TaskResult, TaskStart, ENV_IPC_FD, ENV_SESSION, ENV_TASK_ID, MAX_CHECKPOINT_BYTES,
};
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::{setpgid, Pid};

use crate::channel::{
    hello as hello_for, message_name, spawn_heartbeat, AgentChannel, AgentReceiver, AgentSender,
    Resume,
};

/// Default size of the output tail sent as the result text, in bytes.
pub const DEFAULT_RESULT_BYTES: usize = 16 * 1024;
/// Longest output line relayed as one progress message, in bytes; longer lines are cut.
pub const MAX_LINE_BYTES: usize = 4096;
/// Marker appended to a progress line that was cut at [`MAX_LINE_BYTES`].
pub const CUT_MARKER: &str = " […]";

/// Exit code: the command exited 0 and no cancel was requested.
pub const EXIT_SUCCEEDED: i32 = 0;
/// Exit code: the command failed, or agentd went away while it ran.
pub const EXIT_FAILED: i32 = 1;
/// Exit code: no channel to agentd (not started by agentd, handshake refused).
pub const EXIT_NO_CHANNEL: i32 = 2;
/// Exit code: the command could not be started.
pub const EXIT_CANNOT_RUN: i32 = 127;
/// Exit code: a cancel was requested and the command then ended.
pub const EXIT_CANCELLED: i32 = 130;

/// Set to `1` in the command's environment when the task resumes an earlier one.
pub const ENV_RESUMING: &str = "AGENTD_RESUMING";
/// The id of the task a resumed task resumes.
pub const ENV_PREVIOUS_TASK_ID: &str = "AGENTD_PREVIOUS_TASK_ID";
/// A file holding the last checkpoint of the resumed task, exactly as saved (set
/// only when there is one). The file is removed when the command has ended.
pub const ENV_CHECKPOINT_FILE: &str = "AGENTD_CHECKPOINT_FILE";
/// The last checkpoint itself, when it is at most [`MAX_CHECKPOINT_ENV_BYTES`]
/// and holds no NUL character; larger ones are only in [`ENV_CHECKPOINT_FILE`].
pub const ENV_CHECKPOINT: &str = "AGENTD_CHECKPOINT";
/// Largest checkpoint also passed in [`ENV_CHECKPOINT`], in bytes.
pub const MAX_CHECKPOINT_ENV_BYTES: usize = 64 * 1024;
/// With checkpoints on: the fd number (always 3) on which the command writes
/// checkpoints, one per line in the [line framing](escape_line).
pub const ENV_CHECKPOINT_FD: &str = "AGENTD_CHECKPOINT_FD";
/// The fd number the command writes checkpoints to.
pub const CHECKPOINT_FD: RawFd = 3;

/// How agent-exec runs its command.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    /// Accept steering (`--steer`): the command reads its stdin, so announce
    /// steering in the handshake and write steer text to the command's stdin.
    /// Off by default: the command's stdin is `/dev/null` and steers are refused.
    pub steer: bool,
    /// Ask for collected prompts (`--collect`): messages held while a task ran may
    /// come as one merged prompt. Off by default, since a command line wants one
    /// task per message.
    pub collect: bool,
    /// Offer the command the checkpoint fd (`--checkpoints`, see
    /// [`ENV_CHECKPOINT_FD`]) and announce checkpoints in the handshake.
    pub checkpoints: bool,
    /// Size of the output tail sent as the result text.
    pub result_bytes: usize,
    /// The command line; empty means `sh -c <task text>`.
    pub command: Vec<OsString>,
    /// After the command exits, how long to wait for its output pipes to close
    /// before the rest of its process group is killed.
    pub drain_timeout: Duration,
    /// When agentd is gone: time between SIGTERM and SIGKILL for the group.
    pub kill_grace: Duration,
}

impl Default for ExecConfig {
    fn default() -> Self {
        ExecConfig {
            steer: false,
            collect: false,
            checkpoints: false,
            result_bytes: DEFAULT_RESULT_BYTES,
            command: Vec::new(),
            drain_timeout: Duration::from_millis(300),
            kill_grace: Duration::from_millis(500),
        }
    }
}

/// The name agent-exec gives in its `Hello`.
pub fn agent_name() -> String {
    format!("agent-exec {}", env!("CARGO_PKG_VERSION"))
}

/// The `Hello` agent-exec sends with `config`: steering only with [`ExecConfig::steer`].
pub fn hello(config: &ExecConfig) -> AgentHello {
    hello_for(
        agent_name(),
        Capabilities {
            steer: config.steer,
        },
    )
}

/// The `Features` agent-exec sends with `config`.
pub fn features(config: &ExecConfig) -> AgentFeatures {
    AgentFeatures {
        collected_prompts: config.collect,
        checkpoints: config.checkpoints,
    }
}

/// agent-exec's whole life: forward SIGTERM/SIGINT to the command's group, take
/// the channel from the environment, run the task. Returns the process exit code.
///
/// Installs process-wide signal handlers: call it from `main` only.
pub fn run(config: &ExecConfig) -> i32 {
    let group = Arc::new(Group::default());
    match signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT]) {
        Ok(mut signals) => {
            let group = Arc::clone(&group);
            spawn_thread("agent-exec-signals", move || {
                for raw in signals.forever() {
                    if let Ok(sig) = Signal::try_from(raw) {
                        group.forward(sig);
                    }
                }
            });
        }
        Err(e) => warn(format_args!(
            "cannot handle SIGTERM/SIGINT ({e}): they will end agent-exec at once"
        )),
    }
    match AgentChannel::from_env_with(hello(config), features(config)) {
        Ok((channel, task)) => supervise(channel, task, config, group),
        Err(e) => {
            warn(format_args!("{e}"));
            EXIT_NO_CHANNEL
        }
    }
}

/// Runs `task` on an established channel: spawns the command, relays its output,
/// obeys cancel/steer/EOF, sends the result. Returns the exit code agent-exec
/// uses. Does not touch process-wide signal handling (usable in tests).
pub fn run_task(channel: AgentChannel, task: TaskStart, config: &ExecConfig) -> i32 {
    supervise(channel, task, config, Arc::new(Group::default()))
}

fn warn(msg: std::fmt::Arguments<'_>) {
    eprintln!("agent-exec: {msg}");
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) -> bool {
    spawn_joinable(name, f).is_some()
}

fn spawn_joinable(name: &str, f: impl FnOnce() + Send + 'static) -> Option<JoinHandle<()>> {
    match std::thread::Builder::new().name(name.into()).spawn(f) {
        Ok(handle) => Some(handle),
        Err(e) => {
            warn(format_args!("cannot start thread {name}: {e}"));
            None
        }
    }
}

/// The command's process group, and whether it may still be signalled.
#[derive(Default)]
struct Group {
    state: Mutex<GroupState>,
    cancel_requested: AtomicBool,
    supervisor_gone: AtomicBool,
    /// The command (group leader) has exited; it may not be reaped yet.
    exited: AtomicBool,
    /// The result is decided: EOF on the channel is no longer news.
    finished: AtomicBool,
}

#[derive(Default)]
struct GroupState {
    pgid: Option<Pid>,
    /// Set before the command is reaped; from then on the group is never signalled.
    reaped: bool,
    /// A SIGTERM/SIGINT agent-exec received before the command existed.
    early_signal: Option<Signal>,
}

impl Group {
    fn lock(&self) -> MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn signal_locked(state: &GroupState, sig: Signal) {
        if state.reaped {
            return;
        }
        if let Some(pgid) = state.pgid {
            match killpg(pgid, sig) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => warn(format_args!(
                    "cannot send {sig} to process group {pgid}: {e}"
                )),
            }
        }
    }

    /// Signals the command's group if it was spawned and is not reaped yet.
    fn signal(&self, sig: Signal) {
        Self::signal_locked(&self.lock(), sig);
    }

    /// Passes a signal agent-exec received on to the command (SIGCONT after SIGTERM
    /// so that a stopped command can act on it), or remembers it if the command
    /// has not been started.
    fn forward(&self, sig: Signal) {
        let mut state = self.lock();
        if state.pgid.is_none() && !state.reaped {
            state.early_signal.get_or_insert(sig);
            return;
        }
        Self::signal_locked(&state, sig);
        if sig == Signal::SIGTERM {
            Self::signal_locked(&state, Signal::SIGCONT);
        }
    }

    /// agentd is gone: SIGTERM + SIGCONT now, SIGKILL after `grace` if the command
    /// has not exited by then.
    fn stop_now(&self, grace: Duration) {
        if self.finished.load(Ordering::SeqCst) {
            return;
        }
        self.supervisor_gone.store(true, Ordering::SeqCst);
        self.signal(Signal::SIGTERM);
        self.signal(Signal::SIGCONT);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && !self.exited.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !self.exited.load(Ordering::SeqCst) {
            self.signal(Signal::SIGKILL);
        }
    }
}

fn supervise(
    channel: AgentChannel,
    task: TaskStart,
    config: &ExecConfig,
    group: Arc<Group>,
) -> i32 {
    let interval = channel.heartbeat_interval();
    let resume = channel.resume().cloned();
    let (sender, receiver) = channel.into_parts();
    if let Err(e) = spawn_heartbeat(sender.clone(), interval) {
        warn(format_args!("cannot start the heartbeat thread: {e}"));
    }
    let argv = command_line(config, &task);
    let program = argv[0].to_string_lossy().into_owned();
    let fail_early = |what: &str, e: io::Error| {
        let text = format!("cannot {what} for `{program}`: {e}");
        warn(format_args!("{text}"));
        finish(
            &sender,
            &group,
            Outcome::Failed,
            text,
            None,
            EXIT_CANNOT_RUN,
        )
    };
    let mut command = build_command(&argv, &task);
    // One pipe for stdout and stderr: the kernel keeps the order of the writes, so
    // progress and the result's tail show lines in the order the command wrote them.
    let (output, output_end) = match pipe() {
        Ok(pipe) => pipe,
        Err(e) => return fail_early("make a pipe", e),
    };
    let checkpoints = if config.checkpoints {
        command.env(ENV_CHECKPOINT_FD, CHECKPOINT_FD.to_string());
        match pipe() {
            Ok(pipe) => Some(pipe),
            Err(e) => return fail_early("make the checkpoint pipe", e),
        }
    } else {
        None
    };
    // With steering, the command reads a pipe we write; else /dev/null.
    let steer_pipe = if config.steer {
        match pipe() {
            Ok((read, write)) => Some((OwnedFd::from(read), std::fs::File::from(write))),
            Err(e) => return fail_early("make a pipe", e),
        }
    } else {
        None
    };
    // Removed (with the checkpoint file) when this function returns.
    let _resume_dir = match resume_env(&mut command, resume.as_ref()) {
        Ok(dir) => dir,
        Err(e) => return fail_early("write the checkpoint file", e),
    };
    let null = match agentd_spawn::dev_null() {
        Ok(null) => null,
        Err(e) => return fail_early("open /dev/null", e),
    };
    let mut fds = vec![
        steer_pipe.as_ref().map_or(null, |(read, _)| read.as_fd()),
        output_end.as_fd(),
        output_end.as_fd(),
    ];
    if let Some((_, write)) = &checkpoints {
        fds.push(write.as_fd());
    }

    let spawned = {
        let mut state = group.lock();
        if let Some(sig) = state.early_signal {
            drop(state);
            let text = format!("agent-exec received {sig} before `{program}` was started");
            return finish(&sender, &group, Outcome::Failed, text, None, EXIT_FAILED);
        }
        command.spawn(&fds, None).inspect(|child| {
            let pid = Pid::from_raw(child.pid as libc::pid_t);
            // The child did setpgid(0, 0) before its exec, which the spawn waited
            // for; a belt. EACCES: it has exec'd.
            match setpgid(pid, pid) {
                Ok(()) | Err(Errno::EACCES) | Err(Errno::ESRCH) => {}
                Err(e) => warn(format_args!("setpgid({pid}) failed: {e}")),
            }
            state.pgid = Some(pid);
        })
    };
    // agent-exec's copies of the command's ends: close them, or the pipes never
    // report EOF.
    drop(fds);
    drop(output_end);
    let checkpoints = checkpoints.map(|(read, _write)| read);
    let stdin = steer_pipe.map(|(_read, write)| write);
    let child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let reason = match e.raw_os_error() {
                Some(code) => Errno::from_raw(code).desc().to_string(),
                None => e.to_string(),
            };
            let text = format!("cannot run `{program}`: {reason}");
            warn(format_args!("{text}"));
            return finish(
                &sender,
                &group,
                Outcome::Failed,
                text,
                None,
                EXIT_CANNOT_RUN,
            );
        }
    };
    let pid = Pid::from_raw(child.pid as libc::pid_t);

    let tail = Arc::new(Mutex::new(Tail::new(config.result_bytes)));
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let relay = Arc::new(Relay::default());
    let mut pumps = 0;
    {
        let (sender, tail, done) = (sender.clone(), Arc::clone(&tail), done_tx.clone());
        let relay = Arc::clone(&relay);
        pumps += usize::from(spawn_thread("agent-exec-output", move || {
            pump(output, &sender, &tail, &relay);
            let _ = done.send(());
        }));
    }
    if let Some(read) = checkpoints {
        let (sender, done) = (sender.clone(), done_tx.clone());
        let relay = Arc::clone(&relay);
        pumps += usize::from(spawn_thread("agent-exec-checkpoints", move || {
            relay_checkpoints(read, &sender, &relay);
            let _ = done.send(());
        }));
    }
    drop(done_tx);
    let steering = Arc::new(Mutex::new(None::<mpsc::Sender<StdinInput>>));
    let mut stdin_writer = None;
    if let Some(stdin) = stdin {
        let (tx, rx) = mpsc::channel::<StdinInput>();
        let sender = sender.clone();
        stdin_writer = spawn_joinable("agent-exec-stdin", move || write_steers(stdin, rx, &sender));
        if stdin_writer.is_some() {
            *lock(&steering) = Some(tx);
        }
    }
    {
        let (sender, group, grace) = (sender.clone(), Arc::clone(&group), config.kill_grace);
        let steering = Arc::clone(&steering);
        spawn_thread("agent-exec-ipc", move || {
            read_ipc(receiver, &sender, &group, &steering, grace)
        });
    }

    wait_exited(pid);
    group.exited.store(true, Ordering::SeqCst);

    // Grandchildren may still hold the pipes: give them a moment, then kill what is
    // left of the group (the zombie keeps the group id ours) so the pipes close.
    let mut open = pumps;
    let deadline = Instant::now() + config.drain_timeout;
    open -= wait_done(&done_rx, open, deadline);
    group.signal(Signal::SIGKILL);
    // A pump still relaying what the command wrote (agentd reads slowly, so the pipe
    // waits behind a full channel) is waited for: that output is the task's, and the
    // result comes after it. A pipe silent for 200 ms is held by a process that left
    // the group: it is not waited for long.
    let limit = Instant::now() + RELAY_LIMIT;
    let mut steps = relay.steps();
    while open > 0 {
        open -= wait_done(&done_rx, open, Instant::now() + Duration::from_millis(200));
        let now = relay.steps();
        if (now == steps && !relay.sending()) || Instant::now() >= limit {
            break;
        }
        steps = now;
    }
    // Nothing of the group reads stdin any more: steers not read by now never will
    // be. Their acks go out before the result; later steers are refused at once.
    if let Some(tx) = lock(&steering).take() {
        let _ = tx.send(StdinInput::CommandEnded);
    }
    if let Some(writer) = stdin_writer {
        let _ = writer.join();
    }

    group.lock().reaped = true;
    let exit = match reap(pid) {
        Ok(exit) => exit,
        Err(e) => {
            warn(format_args!("cannot reap the command: {e}"));
            let text = format!("lost track of `{program}`: {e}");
            return finish(&sender, &group, Outcome::Failed, text, None, EXIT_FAILED);
        }
    };
    let text = lock(&tail).text();
    if group.supervisor_gone.load(Ordering::SeqCst) {
        // No result: nobody is listening, or the channel is garbled.
        group.finished.store(true, Ordering::SeqCst);
        sender.shutdown();
        return EXIT_FAILED;
    }
    let (outcome, code) = if group.cancel_requested.load(Ordering::SeqCst) {
        (Outcome::Cancelled, EXIT_CANCELLED)
    } else if exit.code == Some(0) {
        (Outcome::Succeeded, EXIT_SUCCEEDED)
    } else {
        (Outcome::Failed, EXIT_FAILED)
    };
    finish(&sender, &group, outcome, text, Some(exit), code)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends the result and closes the channel; returns `code`.
fn finish(
    sender: &AgentSender,
    group: &Group,
    outcome: Outcome,
    text: String,
    command_exit: Option<CommandExit>,
    code: i32,
) -> i32 {
    group.finished.store(true, Ordering::SeqCst);
    let result = AgentMsg::Result(TaskResult {
        outcome,
        text,
        command_exit,
    });
    if let Err(e) = sender.send(&result) {
        warn(format_args!("cannot send the result to agentd: {e}"));
    }
    sender.shutdown();
    code
}

/// Waits for up to `n` "pipe closed" notices until `deadline`; returns how many came.
fn wait_done(done: &mpsc::Receiver<()>, n: usize, deadline: Instant) -> usize {
    let mut got = 0;
    while got < n {
        match done.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(()) => got += 1,
            Err(RecvTimeoutError::Timeout) => break,
            // Every pump thread is gone (a panicked one never reports).
            Err(RecvTimeoutError::Disconnected) => return n,
        }
    }
    got
}

/// Blocks until `pid` has exited, leaving it a zombie (not reaped).
fn wait_exited(pid: Pid) {
    loop {
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(_) => return,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                warn(format_args!("waiting for the command failed: {e}"));
                return;
            }
        }
    }
}

fn command_line(config: &ExecConfig, task: &TaskStart) -> Vec<OsString> {
    if config.command.is_empty() {
        vec!["sh".into(), "-c".into(), task.text.clone().into()]
    } else {
        config.command.clone()
    }
}

/// The command: `argv` with agent-exec's environment, minus the IPC channel and any
/// resume variables agent-exec itself was given. Started (see [`agentd_spawn`]) in its
/// own process group, with a clean signal mask and default dispositions, and with
/// SIGKILL as its parent-death signal (a belt: agent-exec dies → the command dies;
/// it fires when the spawning thread exits, which is agent-exec's main thread).
fn build_command(argv: &[OsString], task: &TaskStart) -> agentd_spawn::Command {
    let mut command = agentd_spawn::Command::new(&argv[0]);
    command.args(&argv[1..]);
    command.env_remove(ENV_IPC_FD);
    for var in [
        ENV_RESUMING,
        ENV_PREVIOUS_TASK_ID,
        ENV_CHECKPOINT_FILE,
        ENV_CHECKPOINT,
        ENV_CHECKPOINT_FD,
    ] {
        command.env_remove(var);
    }
    // agentd sets these for us and the command inherits them; fill them in from
    // the task only if they are missing (agentd attributes orphans by them).
    if std::env::var_os(ENV_TASK_ID).is_none() {
        command.env(ENV_TASK_ID, &task.task_id);
    }
    if std::env::var_os(ENV_SESSION).is_none() {
        command.env(ENV_SESSION, &task.session);
    }
    command.death_signal(libc::SIGKILL);
    command
}

/// A new pipe (both ends close-on-exec): the read end, the write end.
fn pipe() -> io::Result<(std::fs::File, OwnedFd)> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((std::fs::File::from(read), write))
}

/// Reaps the command (after [`wait_exited`] saw it exit).
fn reap(pid: Pid) -> nix::Result<CommandExit> {
    loop {
        match nix::sys::wait::waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => {
                return Ok(CommandExit {
                    code: Some(code),
                    signal: None,
                })
            }
            Ok(WaitStatus::Signaled(_, signal, _)) => {
                return Ok(CommandExit {
                    code: None,
                    signal: Some(signal as i32),
                })
            }
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Sets the resume variables for the command; with a checkpoint, writes it into
/// a private temporary directory, returned so that it lives as long as the command.
fn resume_env(
    command: &mut agentd_spawn::Command,
    resume: Option<&Resume>,
) -> io::Result<Option<tempfile::TempDir>> {
    let Some(resume) = resume else {
        return Ok(None);
    };
    command
        .env(ENV_RESUMING, "1")
        .env(ENV_PREVIOUS_TASK_ID, &resume.previous_task_id);
    let Some(checkpoint) = &resume.checkpoint else {
        return Ok(None);
    };
    // tempfile creates the directory 0700.
    let dir = tempfile::Builder::new().prefix("agent-exec-").tempdir()?;
    let file = dir.path().join("checkpoint");
    std::fs::write(&file, checkpoint)?;
    command.env(ENV_CHECKPOINT_FILE, &file);
    if checkpoint.len() <= MAX_CHECKPOINT_ENV_BYTES && !checkpoint.contains('\0') {
        command.env(ENV_CHECKPOINT, checkpoint);
    }
    Ok(Some(dir))
}

/// The IPC reader: cancel, steer, and "agentd is gone".
fn read_ipc(
    mut receiver: AgentReceiver,
    sender: &AgentSender,
    group: &Group,
    steering: &Mutex<Option<mpsc::Sender<StdinInput>>>,
    grace: Duration,
) {
    loop {
        let msg = match receiver.recv() {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                if !group.finished.load(Ordering::SeqCst) {
                    warn(format_args!(
                        "agentd closed the channel: stopping the command"
                    ));
                }
                return group.stop_now(grace);
            }
            Err(e) => {
                if !group.finished.load(Ordering::SeqCst) {
                    warn(format_args!(
                        "bad data from agentd ({e}): stopping the command"
                    ));
                }
                return group.stop_now(grace);
            }
        };
        match msg {
            SupervisorMsg::Cancel => {
                group.cancel_requested.store(true, Ordering::SeqCst);
                group.signal(Signal::SIGINT);
            }
            SupervisorMsg::Steer { text } => {
                // Under the lock, so that no steer slips in after the writer was
                // told that the command has ended.
                let queued = lock(steering)
                    .as_ref()
                    .is_some_and(|tx| tx.send(StdinInput::Steer(text)).is_ok());
                if !queued {
                    let _ = sender.steer_ack(false);
                }
            }
            SupervisorMsg::Reject { reason } => {
                warn(format_args!(
                    "agentd rejected the task ({reason}): stopping the command"
                ));
                return group.stop_now(grace);
            }
            other @ (SupervisorMsg::Welcome { .. }
            | SupervisorMsg::Start(_)
            | SupervisorMsg::Settings(_)
            | SupervisorMsg::Resume { .. }) => {
                warn(format_args!(
                    "ignoring an unexpected {} from agentd",
                    message_name(&other)
                ));
            }
        }
    }
}

/// What the stdin writer is told.
enum StdinInput {
    /// A steer to write.
    Steer(String),
    /// The command and its group are gone: refuse what is still unread, and stop.
    CommandEnded,
}

/// The stdin writer. Each steer is written as one line in the line framing; it is
/// acknowledged `accepted` once the command has read all of it from the pipe
/// (the pipe's unread byte count, `FIONREAD`, has dropped past its end), and
/// `false` if the pipe breaks or the command ends first. Acks keep the steers'
/// order. Writes never block, so a command that does not read cannot stall this
/// thread, however much is steered.
fn write_steers(stdin: std::fs::File, inputs: mpsc::Receiver<StdinInput>, sender: &AgentSender) {
    let fd = stdin.as_raw_fd();
    let nonblocking = nix::fcntl::fcntl(&stdin, nix::fcntl::FcntlArg::F_GETFL)
        .map(nix::fcntl::OFlag::from_bits_retain)
        .and_then(|flags| {
            nix::fcntl::fcntl(
                &stdin,
                nix::fcntl::FcntlArg::F_SETFL(flags | nix::fcntl::OFlag::O_NONBLOCK),
            )
        });
    let mut broken = nonblocking.is_err();
    let mut outbox: VecDeque<u8> = VecDeque::new();
    // Stream offsets: bytes written into the pipe, and the end of each unacked steer.
    let mut written: u64 = 0;
    let mut queued: u64 = 0;
    let mut pending: VecDeque<u64> = VecDeque::new();
    let mut ended = false;
    let mut poll = Duration::from_millis(5);
    while !ended {
        let input = if pending.is_empty() {
            inputs.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            inputs.recv_timeout(poll)
        };
        match input {
            Ok(StdinInput::Steer(text)) => {
                if broken {
                    let _ = sender.steer_ack(false);
                } else {
                    let line = escape_line(&text);
                    outbox.extend(line.as_bytes());
                    outbox.push_back(b'\n');
                    queued += line.len() as u64 + 1;
                    pending.push_back(queued);
                    poll = Duration::from_millis(5);
                }
            }
            Ok(StdinInput::CommandEnded) | Err(RecvTimeoutError::Disconnected) => ended = true,
            Err(RecvTimeoutError::Timeout) => poll = (poll * 2).min(Duration::from_millis(100)),
        }
        while !broken && !outbox.is_empty() {
            let (front, _) = outbox.as_slices();
            // SAFETY: write(2) from a live slice into a descriptor this thread owns.
            let n = unsafe { libc::write(fd, front.as_ptr().cast(), front.len()) };
            if n >= 0 {
                outbox.drain(..n as usize);
                written += n as u64;
                continue;
            }
            match Errno::last() {
                Errno::EINTR => continue,
                Errno::EAGAIN => break,
                _ => broken = true, // EPIPE: nobody reads stdin any more
            }
        }
        let mut unread: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int; it reports a pipe's unread bytes from
        // either end.
        let counted = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut unread) } == 0;
        if counted {
            let read = written.saturating_sub(unread.max(0) as u64);
            while pending.front().is_some_and(|end| *end <= read) {
                pending.pop_front();
                let _ = sender.steer_ack(true);
            }
        }
        if broken || ended || !counted {
            broken = true;
            outbox.clear();
            for _ in pending.drain(..) {
                let _ = sender.steer_ack(false);
            }
        }
    }
    // Steers that raced with the end (none can come after CommandEnded).
    while let Ok(StdinInput::Steer(_)) = inputs.try_recv() {
        let _ = sender.steer_ack(false);
    }
}

/// Escapes `text` into one line of agent-exec's line framing, used for steers on
/// the command's stdin and checkpoints on its checkpoint fd: a backslash becomes
/// `\\`, a line feed `\n` and a carriage return `\r`; nothing else changes. The
/// line ends with the line feed that the caller writes after it.
///
/// A message without backslashes or line breaks (the usual chat message) is
/// written as it is, so `read -r line` in a shell gets it verbatim.
pub fn escape_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

/// Reverses [`escape_line`] on one line (without its line feed): `\\`, `\n` and
/// `\r` become a backslash, a line feed and a carriage return; any other
/// backslash is kept as it is, so a hand-written `C:\temp` survives.
pub fn unescape_line(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.peek() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            _ => {
                out.push('\\');
                continue;
            }
        }
        chars.next();
    }
    out
}

/// Relays the checkpoint pipe until EOF: each line (in the line framing) is one
/// checkpoint. A line whose checkpoint would exceed [`MAX_CHECKPOINT_BYTES`] is
/// dropped with a warning on agent-exec's stderr.
fn relay_checkpoints(mut src: impl Read, sender: &AgentSender, relay: &Relay) {
    // Escaping at most doubles the size.
    let mut lines = LineSplitter::new(2 * MAX_CHECKPOINT_BYTES);
    let mut buf = [0u8; 8192];
    let mut emit = |line: &[u8], cut: bool| {
        let text = String::from_utf8_lossy(line.strip_suffix(b"\r").unwrap_or(line));
        let data = unescape_line(&text);
        if cut || data.len() > MAX_CHECKPOINT_BYTES {
            warn(format_args!(
                "dropped a checkpoint over {MAX_CHECKPOINT_BYTES} bytes"
            ));
            return;
        }
        if let Err(e) = relay.send(|| sender.checkpoint(data)) {
            warn(format_args!("cannot send a checkpoint to agentd: {e}"));
        }
    };
    loop {
        match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                relay.step();
                lines.feed(&buf[..n], &mut emit);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    lines.finish(&mut emit);
}

/// How far the pumps are, for the wait after the command exited.
#[derive(Default)]
struct Relay {
    /// Bumped by every read from a pipe and every message sent.
    steps: AtomicU64,
    /// Pumps in the middle of a send to agentd.
    sending: AtomicUsize,
}

impl Relay {
    fn step(&self) {
        self.steps.fetch_add(1, Ordering::SeqCst);
    }

    fn steps(&self) -> u64 {
        self.steps.load(Ordering::SeqCst)
    }

    fn sending(&self) -> bool {
        self.sending.load(Ordering::SeqCst) > 0
    }

    /// Runs `send` (a message to agentd) as a step that may block on the channel.
    fn send<T>(&self, send: impl FnOnce() -> T) -> T {
        self.sending.fetch_add(1, Ordering::SeqCst);
        let result = send();
        self.sending.fetch_sub(1, Ordering::SeqCst);
        self.step();
        result
    }
}

/// Longest agent-exec relays output after its command exited, while a pump keeps
/// going (a process that left the group may hold the pipe and write on).
const RELAY_LIMIT: Duration = Duration::from_secs(10);

/// Relays one output pipe line by line until EOF.
fn pump(mut src: impl Read, sender: &AgentSender, tail: &Mutex<Tail>, relay: &Relay) {
    let mut lines = LineSplitter::new(MAX_LINE_BYTES);
    let mut buf = [0u8; 8192];
    let mut emit = |line: &[u8], cut: bool| {
        tail.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_line(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut text = String::from_utf8_lossy(line).into_owned();
        if cut {
            text.push_str(CUT_MARKER);
        }
        if !text.trim().is_empty() {
            // Errors mean agentd is gone; the IPC reader handles that. Keep
            // draining so that the command never blocks on a full pipe.
            let _ = relay.send(|| sender.progress(text));
        }
    };
    loop {
        match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                relay.step();
                lines.feed(&buf[..n], &mut emit);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    lines.finish(&mut emit);
}

/// Splits a byte stream into lines of at most `max` bytes; the rest of a longer
/// line is dropped and the line is reported as cut.
struct LineSplitter {
    line: Vec<u8>,
    max: usize,
    cut: bool,
}

impl LineSplitter {
    fn new(max: usize) -> Self {
        LineSplitter {
            line: Vec::new(),
            max,
            cut: false,
        }
    }

    fn take(&mut self, bytes: &[u8]) {
        let room = self.max - self.line.len();
        if bytes.len() > room {
            self.cut = true;
        }
        self.line.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn feed(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(&[u8], bool)) {
        while let Some(i) = bytes.iter().position(|&b| b == b'\n') {
            self.take(&bytes[..i]);
            emit(&self.line, self.cut);
            self.line.clear();
            self.cut = false;
            bytes = &bytes[i + 1..];
        }
        self.take(bytes);
    }

    fn finish(&mut self, emit: &mut impl FnMut(&[u8], bool)) {
        if !self.line.is_empty() || self.cut {
            emit(&self.line, self.cut);
        }
    }
}

/// The last `cap` bytes of the command's output lines.
struct Tail {
    buf: VecDeque<u8>,
    cap: usize,
    dropped: bool,
}

impl Tail {
    fn new(cap: usize) -> Self {
        Tail {
            buf: VecDeque::new(),
            cap,
            dropped: false,
        }
    }

    fn push_line(&mut self, line: &[u8]) {
        self.buf.extend(line);
        self.buf.push_back(b'\n');
        if self.buf.len() > self.cap {
            let excess = self.buf.len() - self.cap;
            self.buf.drain(..excess);
            self.dropped = true;
        }
    }

    /// The tail as trimmed text, not starting in the middle of a UTF-8 character.
    fn text(&self) -> String {
        let bytes: Vec<u8> = self.buf.iter().copied().collect();
        let start = if self.dropped {
            bytes
                .iter()
                .take(3)
                .take_while(|b| (**b & 0xC0) == 0x80)
                .count()
        } else {
            0
        };
        String::from_utf8_lossy(&bytes[start..]).trim().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]], max: usize) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        let mut s = LineSplitter::new(max);
        let mut emit = |l: &[u8], cut: bool| out.push((String::from_utf8_lossy(l).into(), cut));
        for c in chunks {
            s.feed(c, &mut emit);
        }
        s.finish(&mut emit);
        out
    }

    #[test]
    fn lines_are_split_across_chunks_and_capped() {
        assert_eq!(
            split(&[b"ab", b"c\nde", b"\n\nf"], 10),
            vec![
                ("abc".into(), false),
                ("de".into(), false),
                ("".into(), false),
                ("f".into(), false)
            ]
        );
        assert_eq!(
            split(&[b"0123", b"456789", b"\nxy\n"], 5),
            vec![("01234".into(), true), ("xy".into(), false)]
        );
        assert_eq!(split(&[b"01234567"], 5), vec![("01234".into(), true)]);
        assert!(split(&[b""], 5).is_empty());
    }

    #[test]
    fn tail_keeps_the_last_bytes_on_a_char_boundary() {
        let mut t = Tail::new(8);
        t.push_line(b"first line");
        t.push_line("é€x".as_bytes()); // 2 + 3 + 1 bytes + newline = 7
        assert_eq!(t.text(), "é€x");
        t.push_line(b"");
        assert_eq!(t.text(), "é€x");
        t.push_line(b"");
        // Now the 8 bytes start inside 'é': its second byte is skipped, not garbled.
        assert_eq!(t.text(), "€x");
        let mut t = Tail::new(0);
        t.push_line(b"abc");
        assert_eq!(t.text(), "");
    }
}
