//! The stdlib-only Python agent (`examples/python/`), with this test playing agentd
//! over a real inherited socket: the v2 handshake, resume, progress, checkpoints,
//! steering, heartbeats at agentd's interval and cooperative cancel; the v1
//! fallback; garbage from agentd. Also runs the module's own test against the
//! vectors of `docs/agent-ipc.md`.
//!
//! Skipped, with a message, when `python3` is not on PATH.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use agentd_agent::{
    AgentFeatures, AgentMsg, AgentSettings, Outcome, SupervisorMsg, TaskResult, TaskStart,
};
use agentd_proto::codec::{read_frame, write_frame};

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/python")
}

fn python() -> Option<&'static str> {
    let found = Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("SKIPPED: python3 is not on PATH");
    }
    found.then_some("python3")
}

/// The agentd side of the example agent.
struct PyAgent {
    child: Child,
    stream: UnixStream,
    heartbeats: usize,
    /// Where the agent's stderr goes.
    stderr: tempfile::NamedTempFile,
}

impl PyAgent {
    fn spawn(python: &str, text: &str) -> PyAgent {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let fd = theirs.as_raw_fd();
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let mut command = Command::new(python);
        command
            .arg(examples().join("example_agent.py"))
            .arg(text)
            .env("AGENTD_IPC_FD", "3")
            .env("AGENTD_TASK_ID", "task-p")
            .env("AGENTD_SESSION", "sess-p")
            .env_remove("AGENTD_HEARTBEAT_MS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr.reopen().unwrap());
        // SAFETY: dup2/fcntl/close are async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0);
                } else {
                    libc::dup2(fd, 3);
                }
                for stray in 4..=20 {
                    libc::close(stray);
                }
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        drop(theirs);
        PyAgent {
            child,
            stream: ours,
            heartbeats: 0,
            stderr,
        }
    }

    /// The next message that is not a heartbeat (counted); `None` at EOF.
    fn next(&mut self) -> Option<AgentMsg> {
        loop {
            match read_frame::<AgentMsg>(&mut self.stream).expect("a frame from the agent") {
                Some(AgentMsg::Heartbeat) => self.heartbeats += 1,
                other => return other,
            }
        }
    }

    fn send(&mut self, msg: &SupervisorMsg) {
        write_frame(&mut self.stream, msg).unwrap();
    }

    fn progress_until(&mut self, needle: &str) -> Vec<AgentMsg> {
        let mut seen = Vec::new();
        loop {
            match self.next() {
                Some(AgentMsg::Progress { text }) if text.contains(needle) => return seen,
                Some(msg @ (AgentMsg::Progress { .. } | AgentMsg::Checkpoint { .. })) => {
                    seen.push(msg)
                }
                other => panic!("waiting for progress {needle:?}, got {other:?} after {seen:?}"),
            }
        }
    }

    fn result(&mut self) -> TaskResult {
        loop {
            match self.next() {
                Some(AgentMsg::Result(r)) => return r,
                Some(AgentMsg::Progress { .. } | AgentMsg::Checkpoint { .. }) => {}
                other => panic!("expected the result, got {other:?}"),
            }
        }
    }

    /// What the agent wrote to stderr so far.
    fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap()
    }

    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the agent did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for PyAgent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn start(text: &str) -> SupervisorMsg {
    SupervisorMsg::Start(TaskStart {
        task_id: "task-p".into(),
        session: "sess-p".into(),
        text: text.into(),
    })
}

#[test]
fn the_python_module_matches_the_docs_vectors() {
    let Some(python) = python() else { return };
    let out = Command::new(python)
        .arg(examples().join("test_agentd_agent.py"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_example_resumes_reports_checkpoints_takes_steers_and_honours_cancel() {
    let Some(python) = python() else { return };
    let text = "steps:100000 delay:20ms count";
    let mut agent = PyAgent::spawn(python, text);
    match agent.next() {
        Some(AgentMsg::Hello(h)) => {
            assert_eq!(h.protocol, 2);
            assert!(h.capabilities.steer);
            assert_eq!(h.agent, "example_agent.py 1.0");
        }
        other => panic!("expected Hello, got {other:?}"),
    }
    agent.send(&SupervisorMsg::Welcome { protocol: 2 });
    assert_eq!(
        agent.next(),
        Some(AgentMsg::Features(AgentFeatures {
            collected_prompts: true,
            checkpoints: true
        }))
    );
    agent.send(&SupervisorMsg::Settings(AgentSettings {
        heartbeat_interval_ms: 50,
    }));
    agent.send(&SupervisorMsg::Resume {
        previous_task_id: "task-0".into(),
        checkpoint: Some(r#"{"step": 41, "notes": ["earlier"]}"#.into()),
    });
    agent.send(&start(text));
    agent.progress_until("resumed from task-0 at step 41");
    let seen = agent.progress_until("step 43/100000: count");
    assert_eq!(
        seen,
        [
            AgentMsg::Progress {
                text: "step 42/100000: count".into()
            },
            AgentMsg::Checkpoint {
                data: r#"{"step": 42, "notes": ["earlier"]}"#.into()
            },
            AgentMsg::Progress {
                text: "checkpoint saved: step 42".into()
            },
        ]
    );

    agent.send(&SupervisorMsg::Steer {
        text: "also\nthis".into(),
    });
    loop {
        match agent.next() {
            Some(AgentMsg::SteerAck { accepted }) => {
                assert!(accepted);
                break;
            }
            Some(AgentMsg::Progress { .. } | AgentMsg::Checkpoint { .. }) => {}
            other => panic!("expected the steer's ack, got {other:?}"),
        }
    }
    agent.progress_until("steered: also\nthis");
    // The note is in the next checkpoint.
    loop {
        match agent.next() {
            Some(AgentMsg::Checkpoint { data }) => {
                assert!(
                    data.contains(r#""notes": ["earlier", "also\nthis"]"#),
                    "{data}"
                );
                break;
            }
            Some(AgentMsg::Progress { .. }) => {}
            other => panic!("expected a checkpoint, got {other:?}"),
        }
    }
    // Heartbeats come at agentd's 50 ms, not the 2 s default.
    let t = Instant::now();
    while agent.heartbeats < 3 {
        agent.next();
        assert!(t.elapsed() < Duration::from_secs(10), "no heartbeats");
    }

    agent.send(&SupervisorMsg::Cancel);
    let result = agent.result();
    assert_eq!(result.outcome, Outcome::Cancelled);
    assert!(
        result.text.starts_with("cancelled after step "),
        "{result:?}"
    );
    assert_eq!(result.command_exit, None);
    assert_eq!(agent.next(), None, "nothing after the result");
    assert_eq!(agent.wait().code(), Some(0));
}

#[test]
fn the_example_speaks_protocol_1_to_an_older_agentd() {
    let Some(python) = python() else { return };
    let text = "steps:2 delay:1ms two steps";
    let mut agent = PyAgent::spawn(python, text);
    assert!(matches!(agent.next(), Some(AgentMsg::Hello(_))));
    agent.send(&SupervisorMsg::Welcome { protocol: 1 });
    agent.send(&start(text));
    let mut seen = Vec::new();
    let result = loop {
        match agent.next() {
            Some(AgentMsg::Result(r)) => break r,
            Some(msg) => seen.push(msg),
            None => panic!("EOF before the result"),
        }
    };
    // No Features, no Checkpoint: only what protocol 1 knows.
    assert_eq!(
        seen,
        [
            AgentMsg::Progress {
                text: "step 1/2: two steps".into()
            },
            AgentMsg::Progress {
                text: "step 2/2: two steps".into()
            },
        ]
    );
    assert_eq!(result.outcome, Outcome::Succeeded);
    assert_eq!(result.text, "done: 2 steps; notes: ");
    assert_eq!(agent.wait().code(), Some(0));
}

#[test]
fn garbage_or_eof_from_agentd_ends_the_example() {
    let Some(python) = python() else { return };
    for bad in [
        &[0xffu8, 0xff, 0xff, 0xff][..],
        &[0, 0, 0, 2, 0x07, 0x00][..],
    ] {
        let text = "steps:100000 delay:20ms";
        let mut agent = PyAgent::spawn(python, text);
        assert!(matches!(agent.next(), Some(AgentMsg::Hello(_))));
        agent.send(&SupervisorMsg::Welcome { protocol: 2 });
        agent.next(); // Features
        agent.send(&start(text));
        agent.progress_until("step 1/");
        use std::io::Write;
        agent.stream.write_all(bad).unwrap();
        assert_eq!(agent.wait().code(), Some(1), "after {bad:?}");
    }
    // EOF while the agent keeps sending (a checkpoint and progress every
    // millisecond): whichever of its threads meets the closed channel first, the
    // agent ends quietly with 1, no traceback.
    for _ in 0..5 {
        let text = "steps:100000 delay:1ms";
        let mut agent = PyAgent::spawn(python, text);
        agent.next();
        agent.send(&SupervisorMsg::Welcome { protocol: 2 });
        agent.next();
        agent.send(&start(text));
        agent.progress_until("step 1/");
        agent.stream.shutdown(std::net::Shutdown::Both).unwrap();
        assert_eq!(agent.wait().code(), Some(1), "after EOF");
        let stderr = agent.stderr();
        assert!(!stderr.contains("Traceback"), "after EOF: {stderr}");
    }
}
