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
//! One thread does it all, in a `poll(2)` loop: the IPC socket, the output pipe,
//! the checkpoint pipe, the command's stdin (steering), the command's pidfd and,
//! in [`run`], a signalfd for agent-exec's own SIGTERM/SIGINT (forwarded to the
//! group); the heartbeat is one of its timers. A process that starts for one
//! short command pays for every thread it starts, so it starts none.
//!
//! The command's group is never signalled after the command has been reaped: the
//! command is first waited for with `WNOWAIT`, so its zombie keeps the pid (and
//! the group id) reserved while the leftovers of the group are killed.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use agentd_proto::ipc::{
    AgentFeatures, AgentHello, AgentMsg, Capabilities, CommandExit, Outcome, SupervisorMsg,
    TaskResult, TaskStart, ENV_IPC_FD, ENV_SESSION, ENV_TASK_ID, MAX_CHECKPOINT_BYTES,
};
use nix::errno::Errno;
use nix::sys::signal::{killpg, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::{setpgid, Pid};

use crate::channel::{
    hello as hello_for, message_name, AgentChannel, AgentReceiver, AgentSender, Resume,
};

/// Default size of the output tail sent as the result text, in bytes.
pub const DEFAULT_RESULT_BYTES: usize = 16 * 1024;
/// Largest output tail sent as the result text: [`ExecConfig::result_bytes`] past
/// it is taken as it (a larger one would not fit in one frame, and agentd keeps
/// 64 KiB of a result anyway).
pub const MAX_RESULT_BYTES: usize = 1024 * 1024;
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
/// Blocks SIGTERM and SIGINT in the calling thread and takes them from a signalfd
/// (the command starts with an empty signal mask): call it from `main` only,
/// before any other thread exists.
pub fn run(config: &ExecConfig) -> i32 {
    let signals = match block_signals() {
        Ok(fd) => Some(fd),
        Err(e) => {
            warn(format_args!(
                "cannot handle SIGTERM/SIGINT ({e}): they will end agent-exec at once"
            ));
            None
        }
    };
    match AgentChannel::from_env_with(hello(config), features(config)) {
        Ok((channel, task)) => supervise(channel, task, config, signals.as_ref()),
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
    supervise(channel, task, config, None)
}

/// A warning on agent-exec's stderr. Never panics (as `eprintln!` does): when
/// agentd dies, the pipe it read agent-exec's stderr from is broken, and
/// agent-exec still has to stop its command.
fn warn(msg: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(io::stderr(), "agent-exec: {msg}");
}

/// SIGTERM and SIGINT, blocked in this thread, readable from the returned signalfd.
fn block_signals() -> nix::Result<SignalFd> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.thread_block()?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC).inspect_err(|_| {
        let _ = mask.thread_unblock();
    })
}

/// The next SIGTERM/SIGINT agent-exec received, if one is pending.
fn next_signal(signals: &SignalFd) -> Option<Signal> {
    loop {
        match signals.read_signal() {
            Ok(Some(info)) => match Signal::try_from(info.ssi_signo as libc::c_int) {
                Ok(sig) => return Some(sig),
                Err(_) => continue,
            },
            Ok(None) => return None,
            Err(Errno::EINTR) => continue,
            Err(_) => return None,
        }
    }
}

/// The command's process group, and whether it may still be signalled.
#[derive(Default)]
struct Group {
    pgid: Option<Pid>,
    /// Set before the command is reaped; from then on the group is never signalled.
    reaped: bool,
    cancel_requested: bool,
    supervisor_gone: bool,
    /// The command (group leader) has exited; it may not be reaped yet.
    exited: bool,
}

impl Group {
    /// Signals the command's group if it was spawned and is not reaped yet.
    fn signal(&self, sig: Signal) {
        if self.reaped {
            return;
        }
        if let Some(pgid) = self.pgid {
            match killpg(pgid, sig) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => warn(format_args!(
                    "cannot send {sig} to process group {pgid}: {e}"
                )),
            }
        }
    }

    /// Passes a signal agent-exec received on to the command (SIGCONT after SIGTERM
    /// so that a stopped command can act on it).
    fn forward(&self, sig: Signal) {
        self.signal(sig);
        if sig == Signal::SIGTERM {
            self.signal(Signal::SIGCONT);
        }
    }
}

fn supervise(
    channel: AgentChannel,
    task: TaskStart,
    config: &ExecConfig,
    signals: Option<&SignalFd>,
) -> i32 {
    let interval = channel.heartbeat_interval();
    // A next beat beyond what an Instant holds is never.
    let heartbeat = Instant::now()
        .checked_add(interval)
        .map(|at| (at, interval));
    let resume = channel.resume().cloned();
    let (sender, receiver) = channel.into_parts();
    let argv = command_line(config, &task);
    let program = argv[0].to_string_lossy().into_owned();
    let fail_early = |what: &str, e: io::Error| {
        let text = format!("cannot {what} for `{program}`: {e}");
        warn(format_args!("{text}"));
        finish(&sender, Outcome::Failed, text, None, EXIT_CANNOT_RUN)
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

    // A SIGTERM/SIGINT that came before the command existed (during the handshake):
    // there is nothing to pass it on to.
    if let Some(sig) = signals.and_then(next_signal) {
        let text = format!("agent-exec received {sig} before `{program}` was started");
        return finish(&sender, Outcome::Failed, text, None, EXIT_FAILED);
    }
    let spawned = command.spawn(&fds, None);
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
            return finish(&sender, Outcome::Failed, text, None, EXIT_CANNOT_RUN);
        }
    };
    let pid = Pid::from_raw(child.pid as libc::pid_t);
    // The child did setpgid(0, 0) before its exec, which the spawn waited for; a
    // belt. EACCES: it has exec'd.
    match setpgid(pid, pid) {
        Ok(()) | Err(Errno::EACCES) | Err(Errno::ESRCH) => {}
        Err(e) => warn(format_args!("setpgid({pid}) failed: {e}")),
    }

    let mut run = Supervision {
        config,
        sender: &sender,
        group: Group {
            pgid: Some(pid),
            ..Group::default()
        },
        pid,
        pidfd: child.pidfd,
        receiver: Some(receiver),
        signals,
        output: Some(Pump::new(output, MAX_LINE_BYTES)),
        // Escaping at most doubles the size.
        checkpoints: checkpoints.map(|read| Pump::new(read, 2 * MAX_CHECKPOINT_BYTES)),
        tail: Tail::new(config.result_bytes.min(MAX_RESULT_BYTES)),
        steers: stdin.map(SteerWriter::new),
        steps: 0,
        heartbeat,
        kill_at: None,
    };
    run.until_relayed();

    run.group.reaped = true;
    let exit = match reap(pid) {
        Ok(exit) => exit,
        Err(e) => {
            warn(format_args!("cannot reap the command: {e}"));
            let text = format!("lost track of `{program}`: {e}");
            return finish(&sender, Outcome::Failed, text, None, EXIT_FAILED);
        }
    };
    let text = run.tail.text();
    if run.group.supervisor_gone {
        // No result: nobody is listening, or the channel is garbled.
        sender.shutdown();
        return EXIT_FAILED;
    }
    let (outcome, code) = if run.group.cancel_requested {
        (Outcome::Cancelled, EXIT_CANCELLED)
    } else if exit.code == Some(0) {
        (Outcome::Succeeded, EXIT_SUCCEEDED)
    } else {
        (Outcome::Failed, EXIT_FAILED)
    };
    finish(&sender, outcome, text, Some(exit), code)
}

/// Sends the result and closes the channel; returns `code`.
fn finish(
    sender: &AgentSender,
    outcome: Outcome,
    text: String,
    command_exit: Option<CommandExit>,
    code: i32,
) -> i32 {
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

/// Longest agent-exec relays output after its command exited, while a pipe keeps
/// delivering (a process that left the group may hold it and write on).
const RELAY_LIMIT: Duration = Duration::from_secs(10);
/// After the command exited and its group was killed: a pipe silent this long is
/// held by a process that left the group, and is not waited for.
const RELAY_SILENCE: Duration = Duration::from_millis(200);
/// Without a pidfd (kernels before 5.2): how often to look whether the command exited.
const EXIT_POLL: Duration = Duration::from_millis(10);

/// One running command, watched by one thread: a `poll(2)` loop over the IPC
/// socket, the output and checkpoint pipes, the command's stdin (steering), the
/// signalfd and the command's pidfd, with the heartbeat, the kill grace and the
/// steer-ack checks as its timers.
struct Supervision<'a> {
    config: &'a ExecConfig,
    sender: &'a AgentSender,
    group: Group,
    pid: Pid,
    pidfd: Option<OwnedFd>,
    /// `None` once agentd is gone (EOF, garbage, Reject): nothing more is read.
    receiver: Option<AgentReceiver>,
    signals: Option<&'a SignalFd>,
    /// `None` once the pipe reported EOF.
    output: Option<Pump>,
    checkpoints: Option<Pump>,
    tail: Tail,
    /// `None` without steering, and once the command's end made steering end.
    steers: Option<SteerWriter>,
    /// Bumped by every read from a pipe and every message sent for one.
    steps: u64,
    /// The next heartbeat and the interval; `None` once a heartbeat could not go out.
    heartbeat: Option<(Instant, Duration)>,
    /// agentd is gone: SIGKILL for the group at this time unless the command exited.
    kill_at: Option<Instant>,
}

impl Drop for Supervision<'_> {
    /// A belt: should agent-exec panic while its command runs, the command's group
    /// does not outlive it (the panic ends agent-exec, which has no other thread).
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.group.signal(Signal::SIGKILL);
        }
    }
}

impl Supervision<'_> {
    fn pipes_open(&self) -> bool {
        self.output.is_some() || self.checkpoints.is_some()
    }

    /// Watches the command until it has exited and its output is relayed (or given
    /// up on), then ends steering. The command is left a zombie, not reaped.
    fn until_relayed(&mut self) {
        while !self.group.exited {
            self.turn(None);
        }
        // Grandchildren may still hold the pipes: give them a moment, then kill
        // what is left of the group (the zombie keeps the group id ours) so the
        // pipes close.
        let deadline = Instant::now() + self.config.drain_timeout;
        while self.pipes_open() && Instant::now() < deadline {
            self.turn(Some(deadline));
        }
        self.group.signal(Signal::SIGKILL);
        // A pipe still delivering what the command wrote (agentd reads slowly, so
        // sends wait behind a full channel) is relayed: that output is the task's,
        // and the result comes after it. A pipe silent for RELAY_SILENCE is held by
        // a process that left the group: it is not waited for long.
        let limit = Instant::now() + RELAY_LIMIT;
        while self.pipes_open() {
            let steps = self.steps;
            let window = Instant::now() + RELAY_SILENCE;
            while self.pipes_open() && Instant::now() < window {
                self.turn(Some(window));
            }
            if self.steps == steps || Instant::now() >= limit {
                break;
            }
        }
        // Nothing of the group reads stdin any more: steers not read by now never
        // will be. Their acks go out before the result; later steers are refused.
        if let Some(steers) = self.steers.take() {
            steers.end(self.sender);
        }
    }

    /// Waits for one round of events (or `until`, or a timer) and handles them.
    fn turn(&mut self, until: Option<Instant>) {
        // Frames already read into the receiver's buffer (behind the handshake's,
        // or behind the last one) are not announced by poll.
        if self.receiver.as_ref().is_some_and(AgentReceiver::buffered) {
            return self.read_ipc();
        }
        const IPC: usize = 0;
        const OUTPUT: usize = 1;
        const CHECKPOINTS: usize = 2;
        const STDIN: usize = 3;
        const SIGNALS: usize = 4;
        const EXIT: usize = 5;
        let stdin = (self.steers.as_ref())
            .filter(|s| s.wants_to_write())
            .map(SteerWriter::raw_fd);
        let exit = (self.pidfd.as_ref())
            .filter(|_| !self.group.exited)
            .map(AsRawFd::as_raw_fd);
        let mut fds = [
            (
                self.receiver.as_ref().map(AgentReceiver::raw_fd),
                libc::POLLIN,
            ),
            (self.output.as_ref().map(Pump::raw_fd), libc::POLLIN),
            (self.checkpoints.as_ref().map(Pump::raw_fd), libc::POLLIN),
            (stdin, libc::POLLOUT),
            (self.signals.map(AsRawFd::as_raw_fd), libc::POLLIN),
            (exit, libc::POLLIN),
        ]
        .map(|(fd, events)| libc::pollfd {
            fd: fd.unwrap_or(-1),
            events,
            revents: 0,
        });
        let now = Instant::now();
        let mut wake = until;
        let mut wake_at = |at: Option<Instant>| {
            if let Some(at) = at {
                wake = Some(wake.map_or(at, |w| w.min(at)));
            }
        };
        wake_at(self.heartbeat.map(|(at, _)| at));
        wake_at(self.kill_at);
        wake_at(self.steers.as_ref().and_then(|s| s.check_at));
        if self.pidfd.is_none() && !self.group.exited {
            wake_at(Some(now + EXIT_POLL));
        }
        let timeout = wake.map_or(-1, |at| {
            // Rounded up, so that a timer is never woken for just before it is due.
            let left = at.saturating_duration_since(now);
            left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32
        });
        // SAFETY: poll(2) on an array of pollfd this function owns; negative fds are
        // ignored by the kernel.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 && Errno::last() != Errno::EINTR {
            warn(format_args!("poll failed: {}", Errno::last()));
            std::thread::sleep(EXIT_POLL);
        }
        let ready = |i: usize| n > 0 && fds[i].fd >= 0 && fds[i].revents != 0;
        if ready(OUTPUT) {
            self.read_output();
        }
        if ready(CHECKPOINTS) {
            self.read_checkpoints();
        }
        if ready(IPC) {
            self.read_ipc();
        }
        if ready(SIGNALS) {
            while let Some(sig) = self.signals.and_then(next_signal) {
                self.group.forward(sig);
            }
        }
        if ready(STDIN) {
            if let Some(steers) = &mut self.steers {
                steers.flush();
                steers.check(self.sender, Instant::now());
            }
        }
        let now = Instant::now();
        if let Some(steers) = &mut self.steers {
            if steers.check_at.is_some_and(|at| at <= now) {
                steers.on_timer(self.sender, now);
            }
        }
        if let Some((at, interval)) = self.heartbeat {
            if at <= now {
                self.heartbeat = match self.sender.heartbeat() {
                    Ok(true) => now.checked_add(interval).map(|at| (at, interval)),
                    Ok(false) | Err(_) => None,
                };
            }
        }
        if !self.group.exited && (ready(EXIT) || self.pidfd.is_none()) {
            self.group.exited = has_exited(self.pid);
            if self.group.exited {
                self.kill_at = None;
            }
        }
        if self.kill_at.is_some_and(|at| at <= now) {
            self.kill_at = None;
            self.group.signal(Signal::SIGKILL);
        }
    }

    /// One read from the output pipe: each line feeds the tail and goes out as
    /// progress. Errors sending mean agentd is gone; the IPC side handles that.
    /// Reading goes on, so that the command never blocks on a full pipe.
    fn read_output(&mut self) {
        let Some(pump) = &mut self.output else {
            return;
        };
        let (tail, sender, steps) = (&mut self.tail, self.sender, &mut self.steps);
        let open = pump.read(|line, cut| {
            tail.push_line(line);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let mut text = String::from_utf8_lossy(line).into_owned();
            if cut {
                text.push_str(CUT_MARKER);
            }
            if !text.trim().is_empty() {
                let _ = sender.progress(text);
                *steps += 1;
            }
        });
        self.steps += 1;
        if !open {
            self.output = None;
        }
    }

    /// One read from the checkpoint pipe: each line (in the line framing) is one
    /// checkpoint. A line whose checkpoint would exceed [`MAX_CHECKPOINT_BYTES`] is
    /// dropped with a warning on agent-exec's stderr.
    fn read_checkpoints(&mut self) {
        let Some(pump) = &mut self.checkpoints else {
            return;
        };
        let (sender, steps) = (self.sender, &mut self.steps);
        let open = pump.read(|line, cut| {
            let text = String::from_utf8_lossy(line.strip_suffix(b"\r").unwrap_or(line));
            let data = unescape_line(&text);
            if cut || data.len() > MAX_CHECKPOINT_BYTES {
                warn(format_args!(
                    "dropped a checkpoint over {MAX_CHECKPOINT_BYTES} bytes"
                ));
                return;
            }
            if let Err(e) = sender.checkpoint(data) {
                warn(format_args!("cannot send a checkpoint to agentd: {e}"));
            }
            *steps += 1;
        });
        self.steps += 1;
        if !open {
            self.checkpoints = None;
        }
    }

    /// One message from agentd: cancel, steer, or "agentd is gone".
    fn read_ipc(&mut self) {
        let Some(receiver) = &mut self.receiver else {
            return;
        };
        let msg = match receiver.recv() {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                warn(format_args!(
                    "agentd closed the channel: stopping the command"
                ));
                return self.stop_now();
            }
            Err(e) => {
                warn(format_args!(
                    "bad data from agentd ({e}): stopping the command"
                ));
                return self.stop_now();
            }
        };
        match msg {
            SupervisorMsg::Cancel => {
                self.group.cancel_requested = true;
                self.group.signal(Signal::SIGINT);
            }
            SupervisorMsg::Steer { text } => match &mut self.steers {
                Some(steers) => steers.steer(text, self.sender, Instant::now()),
                None => {
                    let _ = self.sender.steer_ack(false);
                }
            },
            SupervisorMsg::Reject { reason } => {
                warn(format_args!(
                    "agentd rejected the task ({reason}): stopping the command"
                ));
                self.stop_now();
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

    /// agentd is gone: stop reading it; SIGTERM + SIGCONT now, SIGKILL after the
    /// kill grace if the command has not exited by then.
    fn stop_now(&mut self) {
        self.receiver = None;
        self.group.supervisor_gone = true;
        self.group.signal(Signal::SIGTERM);
        self.group.signal(Signal::SIGCONT);
        if !self.group.exited {
            self.kill_at = Some(Instant::now() + self.config.kill_grace);
        }
    }
}

/// Whether `pid` has exited, leaving it a zombie (not reaped).
fn has_exited(pid: Pid) -> bool {
    loop {
        match waitid(
            Id::Pid(pid),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::WNOHANG,
        ) {
            Ok(WaitStatus::StillAlive) => return false,
            Ok(_) => return true,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                warn(format_args!("waiting for the command failed: {e}"));
                return true;
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

/// Reaps the command (after [`has_exited`] saw it exit).
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

/// The command's stdin with steering. Each steer is written as one line in the line
/// framing; it is acknowledged `accepted` once the command has read all of it from
/// the pipe (the pipe's unread byte count, `FIONREAD`, has dropped past its end),
/// and `false` if the pipe breaks or the command ends first. Acks keep the steers'
/// order. Writes never block, so a command that does not read cannot stall
/// agent-exec, however much is steered; while acks are due, the pipe is looked at
/// after 5 ms, then ever less often (up to every 100 ms).
struct SteerWriter {
    stdin: std::fs::File,
    outbox: VecDeque<u8>,
    /// Stream offsets: bytes written into the pipe, and bytes queued in all.
    written: u64,
    queued: u64,
    /// The end offset of each unacked steer.
    pending: VecDeque<u64>,
    broken: bool,
    poll: Duration,
    /// When to look at the pipe again for acks.
    check_at: Option<Instant>,
}

impl SteerWriter {
    fn new(stdin: std::fs::File) -> Self {
        let nonblocking = nix::fcntl::fcntl(&stdin, nix::fcntl::FcntlArg::F_GETFL)
            .map(nix::fcntl::OFlag::from_bits_retain)
            .and_then(|flags| {
                nix::fcntl::fcntl(
                    &stdin,
                    nix::fcntl::FcntlArg::F_SETFL(flags | nix::fcntl::OFlag::O_NONBLOCK),
                )
            });
        SteerWriter {
            stdin,
            outbox: VecDeque::new(),
            written: 0,
            queued: 0,
            pending: VecDeque::new(),
            broken: nonblocking.is_err(),
            poll: STEER_POLL_FIRST,
            check_at: None,
        }
    }

    fn raw_fd(&self) -> RawFd {
        self.stdin.as_raw_fd()
    }

    fn wants_to_write(&self) -> bool {
        !self.broken && !self.outbox.is_empty()
    }

    fn steer(&mut self, text: String, sender: &AgentSender, now: Instant) {
        if self.broken {
            let _ = sender.steer_ack(false);
        } else {
            let line = escape_line(&text);
            self.outbox.extend(line.as_bytes());
            self.outbox.push_back(b'\n');
            self.queued += line.len() as u64 + 1;
            self.pending.push_back(self.queued);
            self.poll = STEER_POLL_FIRST;
        }
        self.flush();
        self.check(sender, now);
    }

    fn on_timer(&mut self, sender: &AgentSender, now: Instant) {
        self.poll = (self.poll * 2).min(STEER_POLL_MAX);
        self.flush();
        self.check(sender, now);
    }

    /// Writes what the pipe takes without blocking.
    fn flush(&mut self) {
        let fd = self.stdin.as_raw_fd();
        while !self.broken && !self.outbox.is_empty() {
            let (front, _) = self.outbox.as_slices();
            // SAFETY: write(2) from a live slice into a descriptor this writer owns.
            let n = unsafe { libc::write(fd, front.as_ptr().cast(), front.len()) };
            if n >= 0 {
                self.outbox.drain(..n as usize);
                self.written += n as u64;
                continue;
            }
            match Errno::last() {
                Errno::EINTR => continue,
                Errno::EAGAIN => break,
                _ => self.broken = true, // EPIPE: nobody reads stdin any more
            }
        }
    }

    /// Acks the steers the command has read; with a broken pipe, refuses the rest.
    fn check(&mut self, sender: &AgentSender, now: Instant) {
        let mut unread: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int; it reports a pipe's unread bytes from
        // either end.
        let counted =
            unsafe { libc::ioctl(self.stdin.as_raw_fd(), libc::FIONREAD, &mut unread) } == 0;
        if counted {
            let read = self.written.saturating_sub(unread.max(0) as u64);
            while self.pending.front().is_some_and(|end| *end <= read) {
                self.pending.pop_front();
                let _ = sender.steer_ack(true);
            }
        }
        if self.broken || !counted {
            self.broken = true;
            self.outbox.clear();
            for _ in self.pending.drain(..) {
                let _ = sender.steer_ack(false);
            }
        }
        self.check_at = (!self.pending.is_empty()).then(|| now + self.poll);
    }

    /// The command and its group are gone: ack what was read, refuse the rest.
    fn end(mut self, sender: &AgentSender) {
        self.flush();
        self.broken = true;
        self.check(sender, Instant::now());
    }
}

/// The first wait before a steer's ack is looked for, and the longest.
const STEER_POLL_FIRST: Duration = Duration::from_millis(5);
const STEER_POLL_MAX: Duration = Duration::from_millis(100);

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

/// One of the command's output pipes, split into lines.
struct Pump {
    src: std::fs::File,
    lines: LineSplitter,
}

impl Pump {
    fn new(src: std::fs::File, max_line: usize) -> Self {
        Pump {
            src,
            lines: LineSplitter::new(max_line),
        }
    }

    fn raw_fd(&self) -> RawFd {
        self.src.as_raw_fd()
    }

    /// One read (the pipe was reported readable), each complete line to `emit`.
    /// `false` at EOF (or a read error), after the last partial line went to `emit`.
    fn read(&mut self, mut emit: impl FnMut(&[u8], bool)) -> bool {
        let mut buf = [0u8; 8192];
        loop {
            match self.src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    self.lines.feed(&buf[..n], &mut emit);
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        self.lines.finish(&mut emit);
        false
    }
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

    /// The tail as trimmed text. Once something was dropped it starts at the first
    /// whole line it holds (so not in the middle of a line, of a terminal escape
    /// sequence or of a UTF-8 character); a tail that is one cut line starts at its
    /// first whole character instead.
    fn text(&self) -> String {
        let bytes: Vec<u8> = self.buf.iter().copied().collect();
        let start = if self.dropped {
            match bytes.iter().position(|&b| b == b'\n') {
                Some(nl) if bytes[nl + 1..].iter().any(|b| !b.is_ascii_whitespace()) => nl + 1,
                _ => bytes
                    .iter()
                    .take(3)
                    .take_while(|b| (**b & 0xC0) == 0x80)
                    .count(),
            }
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
        let mut t = Tail::new(7);
        t.push_line(b"first line");
        // One cut line: 'é€x' is 2 + 3 + 1 bytes, with its newline 7.
        t.push_line("é€x".as_bytes());
        assert_eq!(t.text(), "é€x");
        t.push_line("é€".as_bytes());
        // The 7 bytes 'x\né€\n' begin with a whole line after the cut: "x" is the
        // rest of a line, so the text starts at the next one.
        assert_eq!(t.text(), "é€");
        let mut t = Tail::new(5);
        t.push_line("é€x".as_bytes());
        // The 5 bytes start inside 'é': its second byte is skipped, not garbled.
        assert_eq!(t.text(), "€x");
        let mut t = Tail::new(0);
        t.push_line(b"abc");
        assert_eq!(t.text(), "");
    }

    #[test]
    fn a_cut_tail_starts_at_a_whole_line_not_inside_an_escape_sequence() {
        let mut t = Tail::new(24);
        t.push_line(b"\x1b[1;31merror: first\x1b[0m");
        t.push_line(b"\x1b[1;31mnext\x1b[0m");
        // The cut falls inside the first line's text; the tail starts at "next".
        assert_eq!(t.text(), "\x1b[1;31mnext\x1b[0m");
        // Nothing dropped: the tail is all the output.
        let mut t = Tail::new(100);
        t.push_line(b"a");
        t.push_line(b"b");
        assert_eq!(t.text(), "a\nb");
    }
}
