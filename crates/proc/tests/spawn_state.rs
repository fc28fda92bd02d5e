//! What a spawned agent starts with, whoever spawned it and from whatever state:
//! a clean signal mask and no ignored signal although the spawning thread blocked
//! and ignored signals (and installed a handler), the parent-death signal tied to the
//! spawning thread, only fds 0-3 (not even a descriptor agentd inherited without
//! close-on-exec), stdout and stderr on one pipe, its environment with agentd's
//! overrides applied once, the program found on `PATH`, and a clear error (with no
//! child left behind) when the program cannot be run. One test function, because it
//! checks that no child is left unreaped.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;

use agentd_proc::{spawn_agent, AgentCommand};
use nix::sys::signal::{self, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

fn command(script: &str) -> AgentCommand {
    AgentCommand {
        program: "sh".into(),
        args: vec!["-c".into(), script.into()],
        task_id: "t-state".into(),
        session: "s".into(),
        log_path: None,
        capture_output: true,
        env: Vec::new(),
    }
}

/// Waits for `pid` (our own child) and returns how it ended.
fn wait(pid: u32) -> WaitStatus {
    loop {
        match waitpid(Pid::from_raw(pid as i32), None) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => return other.unwrap(),
        }
    }
}

fn read_all(mut from: impl Read) -> String {
    let mut out = String::new();
    from.read_to_string(&mut out).unwrap();
    out
}

extern "C" fn on_usr2(_: libc::c_int) {}

#[test]
fn spawned_agents_start_clean_and_failures_are_clear() {
    // The spawning thread's own signal state, as odd as agentd's can be: SIGUSR1
    // blocked, SIGQUIT and a realtime signal ignored, a handler for SIGUSR2.
    let mut blocked = SigSet::empty();
    blocked.add(Signal::SIGUSR1);
    signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&blocked), None).unwrap();
    // SAFETY: setting dispositions in a test process; the handler does nothing.
    unsafe {
        signal::signal(Signal::SIGQUIT, SigHandler::SigIgn).unwrap();
        libc::signal(libc::SIGRTMIN() + 3, libc::SIG_IGN);
        signal::signal(Signal::SIGUSR2, SigHandler::Handler(on_usr2)).unwrap();
    }
    // A descriptor "inherited" without close-on-exec, like a jobserver pipe.
    let (leak_r, _leak_w) = nix::unistd::pipe().unwrap();
    // SAFETY: F_DUPFD (without close-on-exec) of a descriptor this test owns; the
    // copy lives until the test ends.
    let leaked = unsafe { libc::fcntl(leak_r.as_raw_fd(), libc::F_DUPFD, 10) };
    assert!(leaked >= 10);

    // The agent itself (no shell in between) reports its signal state.
    let mut cmd = command("");
    cmd.program = "grep".into();
    cmd.args = vec![
        "-E".into(),
        "^Sig(Blk|Ign):".into(),
        "/proc/self/status".into(),
    ];
    let agent = spawn_agent(&cmd).unwrap();
    let out = read_all(agent.output.unwrap());
    assert!(matches!(wait(agent.pid), WaitStatus::Exited(_, 0)), "{out}");
    assert_eq!(out.lines().count(), 2, "{out}");
    for line in out.lines() {
        let mask = line.split_whitespace().nth(1).unwrap();
        assert!(mask.chars().all(|c| c == '0'), "not clean: {line}");
    }

    let mut cmd = command(
        r#"
        echo "home=$HOME count=$(env | grep -c '^HOME=') extra=$AGENTD_EXTRA"
        echo to-stderr >&2
        "#,
    );
    cmd.env = vec![
        ("HOME".into(), "/first".into()),
        ("AGENTD_EXTRA".into(), "x".into()),
        ("HOME".into(), "/spawned-home".into()),
    ];
    let agent = spawn_agent(&cmd).unwrap();
    drop(agent.channel);
    let out = read_all(agent.output.unwrap());
    assert!(matches!(wait(agent.pid), WaitStatus::Exited(_, 0)), "{out}");

    // Its descriptors, listed by the agent itself.
    let mut cmd = command("");
    cmd.program = "ls".into();
    cmd.args = vec!["/proc/self/fd".into()];
    let agent = spawn_agent(&cmd).unwrap();
    let fds_out = read_all(agent.output.unwrap());
    assert!(matches!(wait(agent.pid), WaitStatus::Exited(_, 0)));
    let fds: Vec<i32> = fds_out.lines().map(|w| w.parse().unwrap()).collect();
    // 0-3, and ls's own directory descriptor (4 or above, opened after the exec).
    assert!(
        fds.starts_with(&[0, 1, 2, 3]) && fds.len() <= 5 && !fds.contains(&leaked),
        "leaked descriptors: {fds:?}"
    );
    assert!(
        out.contains("home=/spawned-home count=1 extra=x"),
        "environment: {out}"
    );
    assert!(out.contains("to-stderr"), "stderr not captured: {out}");

    // The parent-death signal is tied to the thread that spawned: when it ends, the
    // agent gets SIGTERM.
    let pid = std::thread::spawn(|| {
        let agent = spawn_agent(&command("exec sleep 300")).unwrap();
        agent.pid
    })
    .join()
    .unwrap();
    assert_eq!(
        wait(pid),
        WaitStatus::Signaled(Pid::from_raw(pid as i32), Signal::SIGTERM, false)
    );

    // Programs that cannot be run: a clear error, of the right kind, and no child
    // left behind (not even a zombie).
    let dir = tempfile::tempdir().unwrap();
    let not_executable = dir.path().join("not-executable");
    std::fs::write(&not_executable, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&not_executable, std::fs::Permissions::from_mode(0o644)).unwrap();
    for (program, kind) in [
        ("/nonexistent/agent", std::io::ErrorKind::NotFound),
        (
            "agentd-no-such-program-on-path",
            std::io::ErrorKind::NotFound,
        ),
        (
            not_executable.to_str().unwrap(),
            std::io::ErrorKind::PermissionDenied,
        ),
    ] {
        let mut cmd = command("");
        cmd.program = program.into();
        let err = spawn_agent(&cmd).unwrap_err();
        assert_eq!(err.kind(), kind, "{program}: {err}");
        assert_eq!(
            waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)),
            Err(nix::errno::Errno::ECHILD),
            "a failed spawn of {program} left a child"
        );
    }
    let mut cmd = command("");
    cmd.program = "sh\0".into();
    assert_eq!(
        spawn_agent(&cmd).unwrap_err().kind(),
        std::io::ErrorKind::InvalidInput
    );

    // A program found on PATH as the agent's environment sets it.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let script = bin.join("agentd-test-on-path");
    std::fs::write(&script, "#!/bin/sh\necho found-on-path\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = command("");
    cmd.program = "agentd-test-on-path".into();
    cmd.args.clear();
    cmd.env = vec![(
        "PATH".into(),
        format!("/nonexistent:{}:/usr/bin:/bin", bin.display()),
    )];
    let agent = spawn_agent(&cmd).unwrap();
    let out = read_all(agent.output.unwrap());
    assert!(matches!(wait(agent.pid), WaitStatus::Exited(_, 0)));
    assert_eq!(out, "found-on-path\n");
}
