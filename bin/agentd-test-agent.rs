//! `agentd-test-agent`: an agent that misbehaves on demand, for agentd's tests.
//!
//! Owns nothing but this test double. agentd starts it as e.g.
//! `--agent 'agentd-test-agent {text}'`; every argv element is split on whitespace
//! and every resulting word is a behaviour word. Words combine freely; all are
//! optional. Without any word the agent says Hello, sends Result Succeeded "done"
//! and exits 0.
//!
//! Work:
//! - `sleep:MS`      work for MS milliseconds, sending Progress "tick N" every 100 ms
//!   (default 0). With `no-hello` it bounds the silent sleep instead.
//! - `progress:N`    first send N progress lines "line 1" … "line N".
//! - `result:TEXT`   the result text (default "done"; one word, no spaces).
//! - `fail`          outcome Failed and exit code 1.
//! - `exit:CODE`     exit with CODE after the result (whatever the outcome).
//! - `linger:MS`     after sending the result, stay alive MS milliseconds more
//!   (an agent whose slot must not be freed before it is reaped).
//! - `touch:MS:PATH` MS milliseconds after sending the result (while lingering),
//!   create PATH: a mark a test can wait for that is known to come MS later than
//!   the result.
//!
//! Cancel and signals:
//! - default         on Cancel: stop working, send Result Cancelled
//!   ("cancelled after N ticks"), exit 0.
//! - `ignore-cancel` ignore Cancel (keep working).
//! - `ignore-term`   ignore SIGTERM (default disposition otherwise: die).
//! - `ignore-int`    ignore SIGINT.
//! - `close-on-term:MS` after the handshake read nothing (agentd's Cancel stays
//!   unread) and send nothing; on SIGTERM close the channel, which agentd then sees
//!   reset, and exit MS milliseconds later.
//!
//! Endings:
//! - `crash`         after the work, `abort()` (SIGABRT) without a result.
//! - `exit-silently` after the work, exit 0 without a result.
//! - `hang`          after the handshake send nothing (no heartbeat either), read
//!   nothing, never exit (signals still act unless ignored).
//! - `quiet:MS`      work for MS milliseconds sending heartbeats only (no ticks): a
//!   live agent with nothing to say.
//! - `stdout:MB`     before the work, write MB mebibytes of `x` lines on stdout.
//!
//! Descendants (spawned right after the handshake, before any other word acts):
//! - `children:N`    N `sleep 1000` children in the agent's own process group.
//! - `escapee`       a double fork: a child forks a grandchild that calls `setsid()`
//!   and execs `sleep 1000`, and the child exits, so the grandchild has left the
//!   agent's process group and session and is reparented (to agentd, the
//!   subreaper).
//! - `pidfile:PATH`  append one line per descendant pid (children and the escapee
//!   grandchild) to PATH, fsynced and closed before any work.
//!
//! Descendants get /dev/null as stdin/stdout/stderr and default SIGTERM/SIGINT
//! dispositions (`ignore-term`/`ignore-int` only concern the agent itself).
//!
//! Protocol abuse:
//! - `garbage`       after the handshake write a huge length prefix (0xFEEDFACE)
//!   and 64 pseudo-random bytes onto the IPC fd, then sleep forever.
//! - `oversized`     after the handshake write a 1 GiB length prefix and 4 bytes,
//!   then sleep forever.
//! - `huge-length`   after the handshake write a length prefix of 0xFFFFFFFF (a frame
//!   that claims 4 GiB) and nothing else, then sleep forever.
//! - `trickle`       after the handshake send a valid Progress frame one byte per
//!   second (a frame begun and never completed in time), then sleep forever.
//! - `truncated`     after the handshake write half a Progress frame, then shut the
//!   channel down for writing, and sleep forever (still alive).
//! - `undecodable`   after the handshake send a frame of 8 bytes that is no message
//!   (variant 200), then sleep forever.
//! - `early-progress` send a Progress frame before the Hello, then Hello, then work.
//! - `no-hello`      never send Hello; sleep `sleep:MS` (default forever), exit 0.
//! - `bad-version`   send Hello with protocol 999 (expect Reject).
//! - `huge-checkpoint` after the handshake write a well-formed Checkpoint frame
//!   whose data is one byte over agentd's 1 MiB limit, then sleep forever.
//! - `v1`            speak IPC protocol 1: Hello says 1, no Features, no Checkpoint.
//!
//! Protocol 2 (the default): the Hello says 2 and, after a v2 Welcome, Features
//! `collected_prompts: true, checkpoints: true` follows. When the handshake carried
//! a Resume, the first progress line is "resumed: PREVIOUS_TASK_ID CHECKPOINT"
//! (`<none>` without a checkpoint).
//! - `checkpoint:DATA` right after the handshake send Checkpoint DATA and Progress
//!   "checkpoint: DATA" (nothing is sent to a v1 agentd).
//!
//! Steering and environment:
//! - `steer`         announce `capabilities.steer`; answer each Steer with SteerAck
//!   accepted and Progress "steered: TEXT". Without it: SteerAck not accepted.
//! - `refuse-steer`  announce `capabilities.steer` but answer each Steer with SteerAck
//!   not accepted (an agent that offers steering and then cannot take a message).
//! - `steer-gate:PATH` answer a Steer only once PATH exists.
//! - `env`           send Progress "AGENTD_TASK_ID=…", "AGENTD_SESSION=…" (`<unset>`
//!   if missing) and "open-fds: 0,1,2" listing the fds among 0..=20 that were open
//!   at startup, other than the IPC fd.
//!
//! Threads:
//! - `leader-exit`   the agent's main thread exits (`SYS_exit`, as `pthread_exit`
//!   does) right away and a second thread does everything the other words say: the
//!   process runs on while its thread group leader is a zombie.
//!
//! EOF or garbage from agentd while working: exit 1 at once (a well-behaved agent).
//!
//! `agentd-test-agent --echo` is another agent altogether: it answers every task
//! with the task's text as it received it in Start (a stand-in for an LLM agent,
//! which takes collected prompts). A text starting with `hold PATH` waits until PATH
//! exists first.
//!
//! `agentd-test-agent --hold-memory MB PIDFILE` is no agent: a plain process (a
//! tool an agent runs) that writes to every page of MB mebibytes, then appends its
//! pid to PIDFILE and sleeps until a signal ends it. Killed, it takes the kernel a
//! while to free that memory: for that time it is neither a zombie nor has it an
//! address space (`/proc/PID/environ` cannot be read) or closed its files, which is
//! how a process can look while a stop waits for it.
//! `--hold-memory MB PIDFILE LOCKFILE` also holds resources a test can probe from
//! outside: before it writes its pid it takes an exclusive `flock` on LOCKFILE and
//! listens on a loopback TCP port, whose number it writes into LOCKFILE.
//!
//! `agentd-test-agent --leader-exit LOCKFILE PIDFILE` is no agent either: a plain
//! process that takes an exclusive `flock` on LOCKFILE, appends its pid to PIDFILE,
//! and lets its main thread exit (`SYS_exit`) while a second thread, holding the
//! lock, sleeps until a signal ends the process. Its `/proc/PID/stat` then says
//! zombie, and its `/proc/PID/environ` cannot be read, while it runs and holds the
//! lock: a test probes the lock to know whether it still runs.
//!
//! Exit codes: 0 done (or cancelled), 1 `fail` or agentd gone, 2 unknown or
//! malformed behaviour word (after sending Result Failed "unknown behaviour word:
//! X" / "bad behaviour word: X (…)"), 3 no channel or failed handshake (e.g. the
//! Reject answering `bad-version`), `exit:CODE` as given, SIGABRT for `crash`.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use agentd_agent::{
    hello, ipc_stream_from_env, spawn_heartbeat, AgentChannel, AgentFeatures, AgentMsg,
    AgentSender, Capabilities, Outcome, SupervisorMsg, TaskResult, ENV_IPC_FD, ENV_SESSION,
    ENV_TASK_ID, IPC_PROTOCOL_VERSION,
};

/// The behaviour words, parsed.
#[derive(Debug, Default)]
struct Behaviour {
    sleep_ms: Option<u64>,
    progress: u32,
    result: Option<String>,
    fail: bool,
    exit: Option<i32>,
    linger_ms: u64,
    ignore_cancel: bool,
    ignore_term: bool,
    ignore_int: bool,
    crash: bool,
    exit_silently: bool,
    hang: bool,
    children: u32,
    escapee: bool,
    pidfile: Option<PathBuf>,
    garbage: bool,
    oversized: bool,
    huge_length: bool,
    trickle: bool,
    truncated: bool,
    early_progress: bool,
    undecodable: bool,
    quiet_ms: Option<u64>,
    stdout_mb: u64,
    huge_checkpoint: bool,
    no_hello: bool,
    bad_version: bool,
    v1: bool,
    checkpoint: Option<String>,
    steer: bool,
    refuse_steer: bool,
    steer_gate: Option<PathBuf>,
    touch: Option<(u64, PathBuf)>,
    close_on_term: Option<u64>,
    env: bool,
    leader_exit: bool,
}

/// Parses every word; returns what was understood and the first problem, if any.
fn parse(words: &[String]) -> (Behaviour, Option<String>) {
    fn num<T: std::str::FromStr>(word: &str, value: &str) -> Result<T, String>
    where
        T::Err: std::fmt::Display,
    {
        value
            .parse()
            .map_err(|e| format!("bad behaviour word: {word} ({e})"))
    }
    let mut b = Behaviour::default();
    let mut problem = None;
    for word in words {
        let outcome: Result<(), String> = match word.split_once(':') {
            Some(("sleep", v)) => num(word, v).map(|ms| b.sleep_ms = Some(ms)),
            Some(("progress", v)) => num(word, v).map(|n| b.progress = n),
            Some(("result", v)) => {
                b.result = Some(v.to_string());
                Ok(())
            }
            Some(("exit", v)) => num(word, v).map(|c| b.exit = Some(c)),
            Some(("linger", v)) => num(word, v).map(|ms| b.linger_ms = ms),
            Some(("quiet", v)) => num(word, v).map(|ms| b.quiet_ms = Some(ms)),
            Some(("stdout", v)) => num(word, v).map(|mb| b.stdout_mb = mb),
            Some(("close-on-term", v)) => num(word, v).map(|ms| b.close_on_term = Some(ms)),
            Some(("children", v)) => num(word, v).and_then(|n: u32| {
                if n > 1000 {
                    Err(format!("bad behaviour word: {word} (at most 1000)"))
                } else {
                    b.children = n;
                    Ok(())
                }
            }),
            Some(("checkpoint", v)) => {
                b.checkpoint = Some(v.to_string());
                Ok(())
            }
            Some(("pidfile", v)) if !v.is_empty() => {
                b.pidfile = Some(PathBuf::from(v));
                Ok(())
            }
            Some(("steer-gate", v)) if !v.is_empty() => {
                b.steer_gate = Some(PathBuf::from(v));
                Ok(())
            }
            Some(("touch", v)) => match v.split_once(':') {
                Some((ms, path)) if !path.is_empty() => {
                    num(word, ms).map(|ms| b.touch = Some((ms, PathBuf::from(path))))
                }
                _ => Err(format!("bad behaviour word: {word} (touch:MS:PATH)")),
            },
            Some(_) => Err(format!("unknown behaviour word: {word}")),
            None => {
                let flag = match word.as_str() {
                    "fail" => &mut b.fail,
                    "ignore-cancel" => &mut b.ignore_cancel,
                    "ignore-term" => &mut b.ignore_term,
                    "ignore-int" => &mut b.ignore_int,
                    "crash" => &mut b.crash,
                    "exit-silently" => &mut b.exit_silently,
                    "hang" => &mut b.hang,
                    "escapee" => &mut b.escapee,
                    "garbage" => &mut b.garbage,
                    "oversized" => &mut b.oversized,
                    "huge-length" => &mut b.huge_length,
                    "trickle" => &mut b.trickle,
                    "truncated" => &mut b.truncated,
                    "early-progress" => &mut b.early_progress,
                    "undecodable" => &mut b.undecodable,
                    "huge-checkpoint" => &mut b.huge_checkpoint,
                    "no-hello" => &mut b.no_hello,
                    "bad-version" => &mut b.bad_version,
                    "v1" => &mut b.v1,
                    "steer" => &mut b.steer,
                    "refuse-steer" => &mut b.refuse_steer,
                    "env" => &mut b.env,
                    "leader-exit" => &mut b.leader_exit,
                    _ => {
                        problem.get_or_insert(format!("unknown behaviour word: {word}"));
                        continue;
                    }
                };
                *flag = true;
                Ok(())
            }
        };
        if let Err(e) = outcome {
            problem.get_or_insert(e);
        }
    }
    (b, problem)
}

fn die(code: i32, msg: impl std::fmt::Display) -> ! {
    eprintln!("agentd-test-agent: {msg}");
    std::process::exit(code)
}

fn sleep_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Which of fds 0..=20 are open, other than the IPC fd. Call before opening anything.
fn open_fds_at_start() -> Vec<i32> {
    let ipc_fd: Option<i32> = std::env::var(ENV_IPC_FD)
        .ok()
        .and_then(|v| v.trim().parse().ok());
    (0..=20)
        // SAFETY: F_GETFD only inspects the descriptor table.
        .filter(|fd| Some(*fd) != ipc_fd && unsafe { libc::fcntl(*fd, libc::F_GETFD) } != -1)
        .collect()
}

/// Spawns the requested descendants and records their pids; returns the pids.
fn spawn_descendants(b: &Behaviour) -> Vec<i32> {
    let mut pids = Vec::new();
    for _ in 0..b.children {
        let mut command = Command::new("sleep");
        command
            .arg("1000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls (signal) between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::signal(libc::SIGTERM, libc::SIG_DFL);
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        match command.spawn() {
            // The child is never waited for: agentd has to clean it up.
            Ok(child) => pids.push(child.id() as i32),
            Err(e) => die(1, format_args!("cannot spawn `sleep 1000`: {e}")),
        }
    }
    if b.escapee {
        match spawn_escapee() {
            Ok(pid) => pids.push(pid),
            Err(e) => die(1, format_args!("cannot spawn the escapee: {e}")),
        }
    }
    if let Some(path) = &b.pidfile {
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            // One write: processes that append to the same file at once do not
            // interleave their lines (O_APPEND keeps each write whole).
            let lines: String = pids.iter().map(|pid| format!("{pid}\n")).collect();
            file.write_all(lines.as_bytes())?;
            file.sync_all()
        };
        if let Err(e) = write() {
            die(
                1,
                format_args!("cannot write pidfile {}: {e}", path.display()),
            );
        }
    }
    pids
}

/// The full path of `sleep`, resolved before forking (no PATH search after fork).
fn sleep_program() -> CString {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join("sleep"))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .and_then(|p| CString::new(p.into_os_string().into_encoded_bytes()).ok())
        .unwrap_or_else(|| c"/bin/sleep".to_owned())
}

/// Double fork: child → grandchild that `setsid()`s and execs `sleep 1000`; the
/// child reports the grandchild's pid through a pipe and exits at once, and the
/// pipe reaches EOF once the grandchild has exec'd.
fn spawn_escapee() -> Result<i32, String> {
    let program = sleep_program();
    let arg = c"1000";
    let devnull = c"/dev/null";
    let argv: [*const libc::c_char; 3] = [program.as_ptr(), arg.as_ptr(), std::ptr::null()];
    let (read_end, write_end) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let write_fd = std::os::fd::AsRawFd::as_raw_fd(&write_end);
    // SAFETY: this runs before the agent starts any thread; after the forks only
    // async-signal-safe calls are made, on memory prepared above.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: see above (fork, setsid, open, dup2, signal, execv, write, _exit).
        unsafe {
            let grandchild = libc::fork();
            if grandchild == 0 {
                libc::setsid();
                let null = libc::open(devnull.as_ptr(), libc::O_RDWR);
                if null >= 0 {
                    libc::dup2(null, 0);
                    libc::dup2(null, 1);
                    libc::dup2(null, 2);
                }
                libc::signal(libc::SIGTERM, libc::SIG_DFL);
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                libc::execv(program.as_ptr(), argv.as_ptr());
                libc::_exit(127);
            }
            let bytes = grandchild.to_ne_bytes();
            libc::write(write_fd, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(if grandchild > 0 { 0 } else { 1 });
        }
    }
    if child < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    drop(write_end);
    let mut bytes = [0u8; 4];
    let mut pipe = std::fs::File::from(read_end);
    let read = pipe.read_exact(&mut bytes);
    // The grandchild holds the close-on-exec write end until it execs: EOF means it
    // has called setsid() and is `sleep 1000`, so the reported pid is what it claims.
    let _ = pipe.read_to_end(&mut Vec::new());
    // Reap the intermediate child so that only the grandchild is left.
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None);
    read.map_err(|e| format!("no pid from the intermediate child: {e}"))?;
    match i32::from_ne_bytes(bytes) {
        pid if pid > 0 => Ok(pid),
        _ => Err("the intermediate child could not fork".into()),
    }
}

fn send_result(sender: &AgentSender, outcome: Outcome, text: String) {
    let result = AgentMsg::Result(TaskResult {
        outcome,
        text,
        command_exit: None,
    });
    if let Err(e) = sender.send(&result) {
        die(1, format_args!("cannot send the result: {e}"));
    }
}

/// Pseudo-random bytes (a fixed LCG seeded by the pid): enough to be garbage.
fn garbage_bytes(n: usize) -> Vec<u8> {
    let mut x = u64::from(std::process::id()) | 1;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 56) as u8
        })
        .collect()
}

enum Event {
    Cancel,
}

/// `--hold-memory MB PIDFILE`: see the module docs.
fn hold_memory() -> ! {
    let args: Vec<String> = std::env::args().skip(2).collect();
    let (Some(mb), Some(pidfile), 2 | 3) = (
        args.first().and_then(|a| a.parse::<usize>().ok()),
        args.get(1),
        args.len(),
    ) else {
        die(
            2,
            "usage: agentd-test-agent --hold-memory MB PIDFILE [LOCKFILE]",
        );
    };
    let mut memory = vec![0u8; mb << 20];
    // A zeroed allocation is not yet backed by pages: write to each one.
    for page in memory.chunks_mut(4096) {
        page[0] = 1;
    }
    std::hint::black_box(&memory);
    // Held until the process ends: the lock and the listening socket close with it.
    let _held = args.get(2).map(|lockfile| {
        let mut lock = take_lock(lockfile);
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| die(1, format_args!("cannot listen on loopback: {e}")));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        write!(lock, "{port}")
            .and_then(|()| lock.sync_all())
            .unwrap_or_else(|e| die(1, format_args!("{lockfile}: {e}")));
        (lock, listener)
    });
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(pidfile)
        .unwrap_or_else(|e| die(1, format_args!("{pidfile}: {e}")));
    // One write (`writeln!` makes two: the number, then the newline), so that two
    // processes appending at once cannot interleave into "12341235\n\n".
    file.write_all(format!("{}\n", std::process::id()).as_bytes())
        .and_then(|()| file.sync_all())
        .unwrap_or_else(|e| die(1, format_args!("{pidfile}: {e}")));
    drop(file);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Ends the calling thread alone (the raw `exit` system call, as `pthread_exit` ends
/// a thread, without unwinding): called on the main thread, the thread group leader
/// becomes a zombie while the other threads run on.
fn exit_this_thread() -> ! {
    loop {
        // SAFETY: SYS_exit ends only the calling thread; nothing it owns is used again.
        unsafe { libc::syscall(libc::SYS_exit, 0) };
    }
}

/// Opens (creates) `path` and takes an exclusive `flock` on it, waiting for it.
fn take_lock(path: &str) -> std::fs::File {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| die(1, format_args!("{path}: {e}")));
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        die(
            1,
            format_args!("flock {path}: {}", std::io::Error::last_os_error()),
        );
    }
    lock
}

/// `--leader-exit LOCKFILE PIDFILE`: see the module docs.
fn leader_exit() -> ! {
    let args: Vec<String> = std::env::args().skip(2).collect();
    let [lockfile, pidfile] = args.as_slice() else {
        die(2, "usage: agentd-test-agent --leader-exit LOCKFILE PIDFILE");
    };
    let lock = take_lock(lockfile);
    let (ready_tx, ready) = mpsc::channel();
    let worker = move || {
        let _lock = lock;
        let _ = ready_tx.send(());
        sleep_forever();
    };
    if let Err(e) = std::thread::Builder::new()
        .name("worker".into())
        .spawn(worker)
    {
        die(1, format_args!("cannot start the worker thread: {e}"));
    }
    let _ = ready.recv();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(pidfile)
        .unwrap_or_else(|e| die(1, format_args!("{pidfile}: {e}")));
    // One write (`writeln!` makes two: the number, then the newline), so that two
    // processes appending at once cannot interleave into "12341235\n\n".
    file.write_all(format!("{}\n", std::process::id()).as_bytes())
        .and_then(|()| file.sync_all())
        .unwrap_or_else(|e| die(1, format_args!("{pidfile}: {e}")));
    drop(file);
    exit_this_thread()
}

/// `--echo`: see the module docs.
fn echo() -> ! {
    let stream = ipc_stream_from_env().unwrap_or_else(|e| die(3, e));
    let hello = hello(
        format!("agentd-test-agent {} --echo", env!("CARGO_PKG_VERSION")),
        Capabilities { steer: false },
    );
    let (channel, task) =
        AgentChannel::handshake(stream, hello).unwrap_or_else(|e| die(3, format_args!("{e}")));
    let (sender, _receiver) = channel.into_parts();
    if let Err(e) = spawn_heartbeat(sender.clone(), agentd_agent::heartbeat_interval_from_env()) {
        die(1, format_args!("cannot start the heartbeat: {e}"));
    }
    if let Some(rest) = task.text.strip_prefix("hold ") {
        let gate = PathBuf::from(rest.split_whitespace().next().unwrap_or_default());
        while !gate.exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    send_result(&sender, Outcome::Succeeded, task.text);
    std::process::exit(0)
}

fn main() {
    if std::env::args_os().nth(1).is_some_and(|a| a == "--echo") {
        echo();
    }
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "--hold-memory")
    {
        hold_memory();
    }
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "--leader-exit")
    {
        leader_exit();
    }
    let open_fds = open_fds_at_start();
    let words: Vec<String> = std::env::args_os()
        .skip(1)
        .flat_map(|arg| {
            arg.to_string_lossy()
                .split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect();
    let (b, problem) = parse(&words);
    if b.leader_exit {
        // The agent runs on a second thread; the main thread ends (its `exit` would
        // end the process, so it ends alone).
        let run = move || agent(b, problem, open_fds);
        if let Err(e) = std::thread::Builder::new().name("agent".into()).spawn(run) {
            die(1, format_args!("cannot start the agent thread: {e}"));
        }
        exit_this_thread();
    }
    agent(b, problem, open_fds)
}

/// The agent the behaviour words describe.
fn agent(b: Behaviour, problem: Option<String>, open_fds: Vec<i32>) -> ! {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for (wanted, sig) in [
        (b.ignore_term, Signal::SIGTERM),
        (b.ignore_int, Signal::SIGINT),
    ] {
        if wanted {
            // SAFETY: installs SIG_IGN, no handler code runs.
            if let Err(e) = unsafe { signal(sig, SigHandler::SigIgn) } {
                die(1, format_args!("cannot ignore {sig}: {e}"));
            }
        }
    }

    // Registered before the handshake, so that no SIGTERM can come before it.
    let term = b.close_on_term.map(|_| {
        signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM])
            .unwrap_or_else(|e| die(1, format_args!("cannot catch SIGTERM: {e}")))
    });

    let stream = ipc_stream_from_env().unwrap_or_else(|e| die(3, e));
    if b.no_hello && problem.is_none() {
        spawn_descendants(&b);
        match b.sleep_ms {
            Some(ms) => std::thread::sleep(Duration::from_millis(ms)),
            None => sleep_forever(),
        }
        drop(stream);
        std::process::exit(0);
    }
    let mut raw = stream.try_clone().unwrap_or_else(|e| die(3, e));
    if b.early_progress {
        let frame = agentd_proto::codec::encode_frame(&AgentMsg::Progress {
            text: "before hello".into(),
        })
        .unwrap_or_else(|e| die(1, e));
        if let Err(e) = raw.write_all(&frame) {
            die(1, format_args!("cannot write the early frame: {e}"));
        }
    }
    let protocol = if b.bad_version {
        999
    } else if b.v1 {
        1
    } else {
        IPC_PROTOCOL_VERSION
    };
    let mut hello = hello(
        format!("agentd-test-agent {}", env!("CARGO_PKG_VERSION")),
        Capabilities {
            steer: b.steer || b.refuse_steer,
        },
    );
    hello.protocol = protocol;
    let features = AgentFeatures {
        collected_prompts: true,
        checkpoints: true,
    };
    let (channel, _task) = AgentChannel::handshake_with(stream, hello, features)
        .unwrap_or_else(|e| die(3, format_args!("{e}")));
    let interval = channel.heartbeat_interval();
    let resume = channel.resume().cloned();
    let (sender, mut receiver) = channel.into_parts();
    if let Some(problem) = problem {
        send_result(&sender, Outcome::Failed, problem.clone());
        die(2, problem);
    }

    spawn_descendants(&b);
    if b.hang {
        sleep_forever();
    }
    if b.undecodable {
        let mut frame = 8u32.to_be_bytes().to_vec();
        frame.extend_from_slice(&[200, 1, 2, 3, 4, 5, 6, 7]);
        let _ = raw.write_all(&frame);
        sleep_forever();
    }
    if b.huge_length || b.trickle || b.truncated {
        let frame = agentd_proto::codec::encode_frame(&AgentMsg::Progress {
            text: "slow".into(),
        })
        .unwrap_or_else(|e| die(1, e));
        if b.huge_length {
            let _ = raw.write_all(&u32::MAX.to_be_bytes());
        } else if b.truncated {
            let _ = raw.write_all(&frame[..frame.len() / 2]);
            let _ = raw.shutdown(std::net::Shutdown::Write);
        } else {
            for byte in frame {
                if raw.write_all(&[byte]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        sleep_forever();
    }
    if b.garbage || b.oversized || b.huge_checkpoint {
        let mut bytes = Vec::new();
        if b.huge_checkpoint {
            let data = "x".repeat(agentd_proto::ipc::MAX_CHECKPOINT_BYTES + 1);
            match agentd_proto::codec::encode_frame(&AgentMsg::Checkpoint { data }) {
                Ok(frame) => bytes = frame,
                Err(e) => die(1, format_args!("cannot encode the checkpoint: {e}")),
            }
        } else if b.garbage {
            bytes.extend_from_slice(&0xFEED_FACE_u32.to_be_bytes());
            bytes.extend(garbage_bytes(64));
        } else {
            bytes.extend_from_slice(&(1u32 << 30).to_be_bytes());
            bytes.extend_from_slice(b"oops");
        }
        if let Err(e) = raw.write_all(&bytes) {
            eprintln!("agentd-test-agent: writing the bad frame failed: {e}");
        }
        sleep_forever();
    }
    drop(raw);
    if let (Some(ms), Some(mut term)) = (b.close_on_term, term) {
        let _ = term.forever().next();
        // Every descriptor of the channel closes here, with agentd's Cancel unread.
        drop(sender);
        drop(receiver);
        std::thread::sleep(Duration::from_millis(ms));
        std::process::exit(0);
    }

    if let Err(e) = spawn_heartbeat(sender.clone(), interval) {
        die(1, format_args!("cannot start the heartbeat: {e}"));
    }
    if let Some(resume) = resume {
        let checkpoint = resume.checkpoint.as_deref().unwrap_or("<none>");
        let _ = sender.progress(format!("resumed: {} {checkpoint}", resume.previous_task_id));
    }
    if let Some(data) = &b.checkpoint {
        if sender.checkpoint(data.clone()).unwrap_or(false) {
            let _ = sender.progress(format!("checkpoint: {data}"));
        }
    }
    let (events_tx, events) = mpsc::channel();
    {
        let sender = sender.clone();
        let (ignore_cancel, steer) = (b.ignore_cancel, b.steer && !b.refuse_steer);
        let steer_gate = b.steer_gate.clone();
        let reader = move || loop {
            match receiver.recv() {
                Ok(Some(SupervisorMsg::Cancel)) if !ignore_cancel => {
                    let _ = events_tx.send(Event::Cancel);
                }
                Ok(Some(SupervisorMsg::Steer { text })) => {
                    while steer_gate.as_ref().is_some_and(|gate| !gate.exists()) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    let _ = sender.send(&AgentMsg::SteerAck { accepted: steer });
                    if steer {
                        let _ = sender.progress(format!("steered: {text}"));
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) if sender.result_sent() => return,
                Ok(None) => die(1, "agentd closed the channel: exiting"),
                Err(e) => die(1, format_args!("bad data from agentd ({e}): exiting")),
            }
        };
        if let Err(e) = std::thread::Builder::new().name("ipc".into()).spawn(reader) {
            die(1, format_args!("cannot start the IPC reader: {e}"));
        }
    }

    let progress = |text: String| {
        if let Err(e) = sender.progress(text) {
            die(1, format_args!("cannot send progress: {e}"));
        }
    };
    if b.env {
        for var in [ENV_TASK_ID, ENV_SESSION] {
            let value = std::env::var(var).unwrap_or_else(|_| "<unset>".into());
            progress(format!("{var}={value}"));
        }
        let list: Vec<String> = open_fds.iter().map(i32::to_string).collect();
        progress(format!("open-fds: {}", list.join(",")));
    }
    for n in 1..=b.progress {
        progress(format!("line {n}"));
    }
    if b.stdout_mb > 0 {
        let line = [b"x".repeat(1023), b"\n".to_vec()].concat();
        let mut out = std::io::stdout().lock();
        for _ in 0..b.stdout_mb * 1024 {
            if out.write_all(&line).is_err() {
                break;
            }
        }
        let _ = out.flush();
    }
    if let Some(ms) = b.quiet_ms {
        match events.recv_timeout(Duration::from_millis(ms)) {
            Ok(Event::Cancel) => {
                send_result(&sender, Outcome::Cancelled, "cancelled while quiet".into());
                std::process::exit(0);
            }
            Err(_) => {}
        }
    }

    let work = Duration::from_millis(b.sleep_ms.unwrap_or(0));
    let started = Instant::now();
    let mut ticks = 0u64;
    let mut cancelled = false;
    while started.elapsed() < work {
        let next_tick = Duration::from_millis(100 * (ticks + 1));
        let wait = next_tick.min(work).saturating_sub(started.elapsed());
        match events.recv_timeout(wait) {
            Ok(Event::Cancel) => {
                cancelled = true;
                break;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
        }
        if started.elapsed() >= next_tick {
            ticks += 1;
            progress(format!("tick {ticks}"));
        }
    }
    cancelled |= matches!(events.try_recv(), Ok(Event::Cancel));
    if cancelled {
        send_result(
            &sender,
            Outcome::Cancelled,
            format!("cancelled after {ticks} ticks"),
        );
        std::process::exit(0);
    }
    if b.crash {
        std::process::abort();
    }
    if b.exit_silently {
        std::process::exit(0);
    }
    let outcome = if b.fail {
        Outcome::Failed
    } else {
        Outcome::Succeeded
    };
    let text = b.result.unwrap_or_else(|| "done".into());
    send_result(&sender, outcome, text);
    let lingering = Instant::now();
    if let Some((ms, path)) = &b.touch {
        std::thread::sleep(Duration::from_millis(*ms));
        if let Err(e) = std::fs::write(path, "") {
            die(1, format_args!("cannot create {}: {e}", path.display()));
        }
    }
    let linger = Duration::from_millis(b.linger_ms);
    std::thread::sleep(linger.saturating_sub(lingering.elapsed()));
    std::process::exit(b.exit.unwrap_or(if b.fail { 1 } else { 0 }));
}
