//! End-to-end checks of the built `agent-exec` and `agentd-test-agent` binaries
//! (root package), with this test playing agentd over a real inherited fd.
//!
//! The binaries belong to another package, so cargo does not build them for this
//! test: each test looks for them next to its own executable's profile directory
//! and is skipped, with a message, when they are missing. Build them first:
//! `cargo build --features test-agent --bin agent-exec --bin agentd-test-agent` (the
//! root package's own tests build both).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use agentd_agent::{
    AgentFeatures, AgentMsg, AgentSettings, Outcome, SupervisorMsg, TaskResult, TaskStart,
    IPC_PROTOCOL_VERSION,
};
use agentd_proto::codec::{read_frame, write_frame, FrameError};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let path = profile_dir.join(name);
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED: {} not found; run `cargo build --features test-agent --bin {name}` first",
            path.display()
        );
        None
    }
}

/// The agentd side of one agent process.
struct Agent {
    child: Child,
    stream: UnixStream,
    /// `socket:[inode]` of the agent's end, as /proc/PID/fd shows it.
    agent_socket: String,
    /// The Features a v2 agent sent.
    features: Option<AgentFeatures>,
}

impl Agent {
    /// Spawns `program args…` with the agent end of a socketpair as fd 3.
    fn spawn(program: &PathBuf, args: &[&str]) -> Agent {
        Self::spawn_inner(program, args, false, Stdio::inherit())
    }

    /// [`Agent::spawn`] with fds 0, 1 and 2 closed.
    fn spawn_with_closed_stdio(program: &PathBuf, args: &[&str]) -> Agent {
        Self::spawn_inner(program, args, true, Stdio::inherit())
    }

    /// [`Agent::spawn`] with `stderr` as the agent's stderr.
    fn spawn_with_stderr(program: &PathBuf, args: &[&str], stderr: Stdio) -> Agent {
        Self::spawn_inner(program, args, false, stderr)
    }

    fn spawn_inner(program: &PathBuf, args: &[&str], close_stdio: bool, stderr: Stdio) -> Agent {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let fd = theirs.as_raw_fd();
        let agent_socket = format!(
            "socket:[{}]",
            nix::sys::stat::fstat(&theirs).unwrap().st_ino
        );
        let mut command = Command::new(program);
        command
            .args(args)
            .env("AGENTD_IPC_FD", "3")
            .env("AGENTD_TASK_ID", "task-9")
            .env("AGENTD_SESSION", "sess-9")
            .env("AGENTD_HEARTBEAT_MS", "100")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // SAFETY: dup2/fcntl/close/setpgid are async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0);
                } else {
                    libc::dup2(fd, 3);
                }
                // Whatever this test process inherited without close-on-exec
                // (e.g. from the shell that runs cargo) is not the agent's business.
                for stray in 4..=20 {
                    libc::close(stray);
                }
                if close_stdio {
                    for fd in 0..=2 {
                        libc::close(fd);
                    }
                }
                libc::setpgid(0, 0);
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        drop(theirs);
        Agent {
            child,
            stream: ours,
            agent_socket,
            features: None,
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    fn read(&mut self) -> Result<Option<AgentMsg>, FrameError> {
        loop {
            match read_frame::<AgentMsg>(&mut self.stream) {
                Ok(Some(AgentMsg::Heartbeat)) => continue,
                other => return other,
            }
        }
    }

    fn next(&mut self) -> Option<AgentMsg> {
        self.read().expect("read from the agent")
    }

    fn send(&mut self, msg: &SupervisorMsg) {
        write_frame(&mut self.stream, msg).unwrap();
    }

    /// Reads the Hello and answers Welcome (for the lower protocol) + Start;
    /// returns the Hello. A v2 agent's Features are checked to follow the Welcome
    /// and kept in `self.features`.
    fn handshake(&mut self, text: &str) -> agentd_agent::AgentHello {
        self.handshake_with(text, &[])
    }

    /// [`Agent::handshake`] that sends `extra` (Settings, Resume) before Start.
    fn handshake_with(&mut self, text: &str, extra: &[SupervisorMsg]) -> agentd_agent::AgentHello {
        let hello = match self.next() {
            Some(AgentMsg::Hello(h)) => h,
            other => panic!("expected Hello, got {other:?}"),
        };
        let protocol = hello.protocol.min(IPC_PROTOCOL_VERSION);
        self.send(&SupervisorMsg::Welcome { protocol });
        if protocol >= 2 {
            match self.next() {
                Some(AgentMsg::Features(f)) => self.features = Some(f),
                other => panic!("expected Features, got {other:?}"),
            }
        }
        for msg in extra {
            self.send(msg);
        }
        self.send(&SupervisorMsg::Start(TaskStart {
            task_id: "task-9".into(),
            session: "sess-9".into(),
            text: text.into(),
        }));
        hello
    }

    fn wait_progress(&mut self, line: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            match self.next() {
                Some(AgentMsg::Progress { text }) if text == line => return seen,
                Some(AgentMsg::Progress { text }) => seen.push(text),
                other => panic!("waiting for {line:?}, got {other:?}"),
            }
        }
    }

    /// Progress lines up to the result, then the exit status.
    fn finish(mut self) -> (Vec<String>, TaskResult, ExitStatus) {
        let mut progress = Vec::new();
        let result = loop {
            match self.next() {
                Some(AgentMsg::Progress { text }) => progress.push(text),
                Some(AgentMsg::Result(r)) => break r,
                other => panic!("expected progress or result, got {other:?} ({progress:?})"),
            }
        };
        let status = self.wait();
        (progress, result, status)
    }

    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the agent did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = nix::sys::signal::killpg(self.pid(), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
            .unwrap_or(true)
}

fn wait_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(pid) {
        assert!(Instant::now() < deadline, "{pid} is still alive");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- agent-exec

#[test]
fn agent_exec_without_agentd_explains_itself() {
    let Some(bin) = binary("agent-exec") else {
        return;
    };
    let out = Command::new(bin)
        .env_remove("AGENTD_IPC_FD")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("AGENTD_IPC_FD is not set: this program is an agentd agent and must be started by agentd"),
        "{err}"
    );
}

/// A result tail past what agentd can be sent is refused as a usage error, before
/// anything runs (it once ran the task and then could not send its result).
#[test]
fn agent_exec_refuses_a_result_tail_larger_than_it_can_send() {
    let Some(bin) = binary("agent-exec") else {
        return;
    };
    let out = Command::new(bin)
        .args(["--result-bytes", "8000000", "--", "true"])
        .env_remove("AGENTD_IPC_FD")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--result-bytes") && err.contains("0..=1048576"),
        "{err}"
    );
    assert!(!err.contains("AGENTD_IPC_FD"), "{err}");
}

#[test]
fn agent_exec_runs_the_command_after_the_double_dash() {
    let Some(bin) = binary("agent-exec") else {
        return;
    };
    let script = r#"echo "env:$AGENTD_TASK_ID/$AGENTD_SESSION/${AGENTD_IPC_FD:-unset}"
        for f in /proc/$$/fd/*; do echo "fd:$(readlink "$f")"; done"#;
    let mut agent = Agent::spawn(&bin, &["--result-bytes", "100", "--", "sh", "-c", script]);
    let hello = agent.handshake("ignored text");
    let agent_socket = agent.agent_socket.clone();
    assert_eq!(
        hello.agent,
        format!("agent-exec {}", env!("CARGO_PKG_VERSION"))
    );
    assert!(
        !hello.capabilities.steer,
        "steering is off unless asked for"
    );
    assert_eq!(
        agent.features,
        Some(AgentFeatures {
            collected_prompts: false,
            checkpoints: false
        })
    );
    let (progress, result, status) = agent.finish();
    assert_eq!(status.code(), Some(0), "{result:?}");
    assert_eq!(result.outcome, Outcome::Succeeded);
    assert!(
        progress.contains(&"env:task-9/sess-9/unset".to_string()),
        "{progress:?}"
    );
    let sockets: Vec<_> = progress
        .iter()
        .filter(|p| p.contains(&agent_socket))
        .collect();
    assert!(sockets.is_empty(), "the IPC socket leaked: {sockets:?}");
}

#[test]
fn agent_exec_runs_the_task_text_with_sh_and_announces_its_flags() {
    let Some(bin) = binary("agent-exec") else {
        return;
    };
    let mut agent = Agent::spawn(&bin, &["--steer", "--collect", "--checkpoints"]);
    assert!(
        agent
            .handshake("echo from-the-task; exit 4")
            .capabilities
            .steer
    );
    assert_eq!(
        agent.features,
        Some(AgentFeatures {
            collected_prompts: true,
            checkpoints: true
        })
    );
    let (_, result, status) = agent.finish();
    assert_eq!(status.code(), Some(1));
    assert_eq!(result.outcome, Outcome::Failed);
    assert_eq!(result.text, "from-the-task");
    assert_eq!(result.command_exit.unwrap().code, Some(4));
}

#[test]
fn agent_exec_forwards_sigterm_and_waits_for_the_command() {
    let Some(bin) = binary("agent-exec") else {
        return;
    };
    let script =
        "trap 'sleep 0.3; echo bye; exit 0' TERM; echo ready; while :; do sleep 0.05; done";
    let mut agent = Agent::spawn(&bin, &["--", "sh", "-c", script]);
    agent.handshake("");
    agent.wait_progress("ready");
    kill(agent.pid(), Signal::SIGTERM).unwrap();
    let (_, result, status) = agent.finish();
    assert_eq!(status.code(), Some(0), "{result:?}");
    // sh may report its `sleep` child's death ("Terminated") in between.
    assert!(result.text.starts_with("ready\n"), "{:?}", result.text);
    assert!(result.text.ends_with("\nbye"), "{:?}", result.text);
    assert_eq!(result.outcome, Outcome::Succeeded);
}

#[test]
fn agent_exec_fails_the_task_after_a_sigterm_that_came_before_its_command() {
    let Some(bin) = binary("agent-exec") else {
        return;
    };
    let mut agent = Agent::spawn(&bin, &["--", "sh", "-c", "echo started"]);
    // The Hello comes once agent-exec handles SIGTERM itself.
    let hello = match agent.next() {
        Some(AgentMsg::Hello(h)) => h,
        other => panic!("expected Hello, got {other:?}"),
    };
    kill(agent.pid(), Signal::SIGTERM).unwrap();
    agent.send(&SupervisorMsg::Welcome {
        protocol: hello.protocol.min(IPC_PROTOCOL_VERSION),
    });
    assert!(matches!(agent.next(), Some(AgentMsg::Features(_))));
    agent.send(&SupervisorMsg::Start(TaskStart {
        task_id: "task-9".into(),
        session: "sess-9".into(),
        text: String::new(),
    }));
    let (progress, result, status) = agent.finish();
    assert_eq!(status.code(), Some(1));
    assert!(progress.is_empty(), "{progress:?}");
    assert_eq!(result.outcome, Outcome::Failed);
    assert_eq!(
        result.text,
        "agent-exec received SIGTERM before `sh` was started"
    );
    assert_eq!(result.command_exit, None);
}

/// agent-exec started with fds 0-2 closed fills them with /dev/null before it opens
/// anything, so that its own descriptors (the signalfd, the pipes) never become
/// its stdin, stdout or stderr.
#[test]
fn agent_exec_started_without_stdio_gives_itself_dev_null() {
    let Some(bin) = binary("agent-exec") else {
        return;
    };
    let mut agent =
        Agent::spawn_with_closed_stdio(&bin, &["--", "sh", "-c", "echo ready; exec sleep 30"]);
    agent.handshake("");
    agent.wait_progress("ready");
    for fd in 0..=2 {
        let target = std::fs::read_link(format!("/proc/{}/fd/{fd}", agent.pid())).unwrap();
        assert_eq!(target, PathBuf::from("/dev/null"), "fd {fd}");
    }
    agent.send(&SupervisorMsg::Cancel);
    let (_, result, status) = agent.finish();
    assert_eq!(status.code(), Some(130));
    assert_eq!(result.outcome, Outcome::Cancelled);
}

#[test]
fn agent_exec_cancel_and_cannot_run() {
    let Some(bin) = binary("agent-exec") else {
        return;
    };
    let mut agent = Agent::spawn(&bin, &["--", "sh", "-c", "echo ready; exec sleep 30"]);
    agent.handshake("");
    agent.wait_progress("ready");
    agent.send(&SupervisorMsg::Cancel);
    let (_, result, status) = agent.finish();
    assert_eq!(status.code(), Some(130));
    assert_eq!(result.outcome, Outcome::Cancelled);
    assert_eq!(result.command_exit.unwrap().signal, Some(libc::SIGINT));

    let mut agent = Agent::spawn(&bin, &["--", "no-such-program-for-agentd"]);
    agent.handshake("");
    let (_, result, status) = agent.finish();
    assert_eq!(status.code(), Some(127));
    assert_eq!(
        result.text,
        "cannot run `no-such-program-for-agentd`: No such file or directory"
    );
}

#[test]
fn agent_exec_stops_when_agentd_goes_away() {
    let Some(bin) = binary("agent-exec") else {
        return;
    };
    let mut agent = Agent::spawn(&bin, &["--", "sh", "-c", "echo pid:$$; exec sleep 30"]);
    agent.handshake("");
    let pid: i32 = loop {
        match agent.next() {
            Some(AgentMsg::Progress { text }) => {
                if let Some(pid) = text.strip_prefix("pid:") {
                    break pid.parse().unwrap();
                }
            }
            None => panic!("the agent closed its channel before reporting its pid"),
            Some(_) => {}
        }
    };
    let _ = agent.stream.shutdown(std::net::Shutdown::Both);
    let status = agent.wait();
    assert_eq!(status.code(), Some(1));
    wait_gone(pid);
}

/// When agentd dies, agent-exec's stderr (a pipe agentd read) is broken too: its
/// warnings fail to print, and it still stops the command's whole group.
#[test]
fn agent_exec_stops_the_group_when_agentd_goes_away_with_its_stderr() {
    let Some(bin) = binary("agent-exec") else {
        return;
    };
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    let script = "sleep 30 & echo bg:$!; exec sleep 30";
    let mut agent = Agent::spawn_with_stderr(&bin, &["--", "sh", "-c", script], write.into());
    agent.handshake("");
    let pid: i32 = loop {
        match agent.next() {
            Some(AgentMsg::Progress { text }) => {
                if let Some(pid) = text.strip_prefix("bg:") {
                    break pid.parse().unwrap();
                }
            }
            other => panic!("expected the background pid, got {other:?}"),
        }
    };
    let _ = agent.stream.shutdown(std::net::Shutdown::Both);
    let status = agent.wait();
    assert_eq!(status.code(), Some(1), "{status:?}");
    wait_gone(pid);
}

#[test]
fn agent_exec_resumes_with_the_checkpoint_and_relays_new_ones() {
    let Some(bin) = binary("agent-exec") else {
        return;
    };
    let script = r#"echo "resuming:${AGENTD_RESUMING:-0} prev:$AGENTD_PREVIOUS_TASK_ID"
        echo "env:$AGENTD_CHECKPOINT"
        echo "file:$(cat "$AGENTD_CHECKPOINT_FILE")"
        printf '%s\n' 'step 2\nof 3' >&$AGENTD_CHECKPOINT_FD"#;
    let mut agent = Agent::spawn(&bin, &["--checkpoints", "--", "sh", "-c", script]);
    agent.handshake_with(
        "",
        &[
            SupervisorMsg::Settings(AgentSettings {
                heartbeat_interval_ms: 50,
            }),
            SupervisorMsg::Resume {
                previous_task_id: "task-8".into(),
                checkpoint: Some("step 1".into()),
            },
        ],
    );
    let mut progress = Vec::new();
    let mut checkpoints = Vec::new();
    let result = loop {
        match agent.next() {
            Some(AgentMsg::Progress { text }) => progress.push(text),
            Some(AgentMsg::Checkpoint { data }) => checkpoints.push(data),
            Some(AgentMsg::Result(r)) => break r,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(result.outcome, Outcome::Succeeded, "{result:?}");
    assert_eq!(
        progress,
        ["resuming:1 prev:task-8", "env:step 1", "file:step 1"]
    );
    assert_eq!(checkpoints, ["step 2\nof 3"]);
    assert_eq!(agent.wait().code(), Some(0));
}

// ------------------------------------------------------- agentd-test-agent

#[test]
fn test_agent_default_and_work_words() {
    let Some(bin) = binary("agentd-test-agent") else {
        return;
    };
    let mut agent = Agent::spawn(&bin, &[]);
    let hello = agent.handshake("");
    assert!(!hello.capabilities.steer);
    let (progress, result, status) = agent.finish();
    assert!(progress.is_empty());
    assert_eq!(
        (result.outcome, result.text.as_str()),
        (Outcome::Succeeded, "done")
    );
    assert_eq!(status.code(), Some(0));

    let mut agent = Agent::spawn(&bin, &["progress:2 sleep:250", "result:ok"]);
    agent.handshake("");
    let (progress, result, status) = agent.finish();
    assert_eq!(progress, ["line 1", "line 2", "tick 1", "tick 2"]);
    assert_eq!(result.text, "ok");
    assert_eq!(status.code(), Some(0));

    let mut agent = Agent::spawn(&bin, &["fail exit:7"]);
    agent.handshake("");
    let (_, result, status) = agent.finish();
    assert_eq!(result.outcome, Outcome::Failed);
    assert_eq!(status.code(), Some(7));
}

#[test]
fn test_agent_unknown_word() {
    let Some(bin) = binary("agentd-test-agent") else {
        return;
    };
    let mut agent = Agent::spawn(&bin, &["sleep:10 frobnicate"]);
    agent.handshake("");
    let (_, result, status) = agent.finish();
    assert_eq!(result.outcome, Outcome::Failed);
    assert_eq!(result.text, "unknown behaviour word: frobnicate");
    assert_eq!(status.code(), Some(2));
}

#[test]
fn test_agent_cancel_and_steer() {
    let Some(bin) = binary("agentd-test-agent") else {
        return;
    };
    let mut agent = Agent::spawn(&bin, &["sleep:20000 steer"]);
    assert!(agent.handshake("").capabilities.steer);
    agent.wait_progress("tick 1");
    agent.send(&SupervisorMsg::Steer {
        text: "hi there".into(),
    });
    assert_eq!(agent.next(), Some(AgentMsg::SteerAck { accepted: true }));
    agent.wait_progress("steered: hi there");
    agent.send(&SupervisorMsg::Cancel);
    let (_, result, status) = agent.finish();
    assert_eq!(result.outcome, Outcome::Cancelled);
    assert_eq!(status.code(), Some(0));

    let mut agent = Agent::spawn(&bin, &["sleep:20000 ignore-cancel ignore-term"]);
    agent.handshake("");
    agent.wait_progress("tick 1");
    agent.send(&SupervisorMsg::Steer { text: "x".into() });
    assert_eq!(agent.next(), Some(AgentMsg::SteerAck { accepted: false }));
    agent.send(&SupervisorMsg::Cancel);
    kill(agent.pid(), Signal::SIGTERM).unwrap();
    agent.wait_progress("tick 3");
    kill(agent.pid(), Signal::SIGKILL).unwrap();
    assert_eq!(agent.wait().signal(), Some(libc::SIGKILL));
}

#[test]
fn test_agent_endings() {
    let Some(bin) = binary("agentd-test-agent") else {
        return;
    };
    let mut agent = Agent::spawn(&bin, &["crash"]);
    agent.handshake("");
    assert_eq!(agent.next(), None);
    assert_eq!(agent.wait().signal(), Some(libc::SIGABRT));

    let mut agent = Agent::spawn(&bin, &["exit-silently"]);
    agent.handshake("");
    assert_eq!(agent.next(), None);
    assert_eq!(agent.wait().code(), Some(0));

    let mut agent = Agent::spawn(&bin, &["no-hello sleep:200"]);
    assert_eq!(agent.next(), None);
    assert_eq!(agent.wait().code(), Some(0));

    let mut agent = Agent::spawn(&bin, &["v1 checkpoint:c1"]);
    assert_eq!(agent.handshake("").protocol, 1);
    assert_eq!(agent.features, None, "a v1 agent sends no Features");
    let (progress, result, _) = agent.finish();
    assert!(
        progress.is_empty(),
        "no checkpoint to a v1 agentd: {progress:?}"
    );
    assert_eq!(result.text, "done");

    let mut agent = Agent::spawn(&bin, &["checkpoint:c1"]);
    agent.handshake_with(
        "",
        &[SupervisorMsg::Resume {
            previous_task_id: "t0".into(),
            checkpoint: None,
        }],
    );
    assert_eq!(
        agent.next(),
        Some(AgentMsg::Progress {
            text: "resumed: t0 <none>".into()
        })
    );
    assert_eq!(
        agent.next(),
        Some(AgentMsg::Checkpoint { data: "c1".into() })
    );
    let (progress, _, _) = agent.finish();
    assert_eq!(progress, ["checkpoint: c1"]);

    let mut agent = Agent::spawn(&bin, &["bad-version"]);
    match agent.next() {
        Some(AgentMsg::Hello(h)) => assert_eq!(h.protocol, 999),
        other => panic!("{other:?}"),
    }
    agent.send(&SupervisorMsg::Reject {
        reason: "protocol 999 unsupported".into(),
    });
    assert_eq!(agent.wait().code(), Some(3));

    let mut agent = Agent::spawn(&bin, &["hang"]);
    agent.handshake("");
    agent
        .stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(agent.read().is_err(), "hang sends nothing");
    kill(agent.pid(), Signal::SIGTERM).unwrap();
    assert_eq!(agent.wait().signal(), Some(libc::SIGTERM));
}

#[test]
fn test_agent_bad_frames() {
    let Some(bin) = binary("agentd-test-agent") else {
        return;
    };
    let mut agent = Agent::spawn(&bin, &["garbage"]);
    agent.handshake("");
    assert!(matches!(agent.read(), Err(FrameError::TooLarge { .. })));

    let mut agent = Agent::spawn(&bin, &["oversized"]);
    agent.handshake("");
    match agent.read() {
        Err(FrameError::TooLarge { len }) => assert_eq!(len, 1 << 30),
        other => panic!("{other:?}"),
    }
}

#[test]
fn test_agent_env_and_descendants() {
    let Some(bin) = binary("agentd-test-agent") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("agentd-agent-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pidfile = dir.join("pids");
    let words = format!("env children:2 escapee pidfile:{}", pidfile.display());
    let mut agent = Agent::spawn(&bin, &[&words]);
    let agent_pgid = agent.child.id() as i32;
    agent.handshake("");
    let (progress, result, status) = agent.finish();
    assert_eq!(status.code(), Some(0), "{result:?}");
    assert_eq!(
        progress,
        [
            "AGENTD_TASK_ID=task-9",
            "AGENTD_SESSION=sess-9",
            "open-fds: 0,1,2"
        ]
    );
    let pids: Vec<i32> = std::fs::read_to_string(&pidfile)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    std::fs::remove_dir_all(&dir).unwrap();
    let _cleanup = KillOnDrop(pids.clone());
    assert_eq!(pids.len(), 3);
    for (i, pid) in pids.iter().enumerate() {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert_eq!(cmdline.split(|b| *b == 0).nth(1), Some(&b"1000"[..]));
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
        let (pgrp, sid): (i32, i32) = (fields[2].parse().unwrap(), fields[3].parse().unwrap());
        if i < 2 {
            assert_eq!(pgrp, agent_pgid, "children stay in the agent's group");
        } else {
            assert_eq!(
                (pgrp, sid),
                (*pid, *pid),
                "the escapee leads its own session"
            );
        }
    }
}

/// Kills the test agent's descendants (this test started them) when it ends.
struct KillOnDrop(Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
    }
}
