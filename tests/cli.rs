//! agentctl as a user meets it: one-line answers, JSON, errors and exit codes.

use std::process::Command;

use serde_json::json;

use crate::support::*;

#[test]
fn agentctl_says_clearly_when_agentd_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nothing.sock");
    let out = Command::new(AGENTCTL)
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("agentd is not running at"), "{err}");
    assert!(err.contains(&socket.display().to_string()), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn agentctl_uses_agentd_socket_from_the_environment() {
    let d = Daemon::with_agent_exec(&[]);
    let out = Command::new(AGENTCTL)
        .arg("ping")
        .env("AGENTD_SOCKET", &d.socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("is running"), "{}", stdout(&out));
}

#[test]
fn send_status_and_unknown_tasks_in_words_and_json() {
    let d = Daemon::with_agent_exec(&["--max-concurrent", "1"]);
    let out = d.agentctl(&["send", "--session", "alice", "sleep", "30"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let line = stdout(&out);
    assert!(
        line.starts_with("task ") && line.trim_end().ends_with("started"),
        "{line}"
    );
    let task_id = line.split_whitespace().nth(1).unwrap().to_string();

    let view = d.agentctl_json(&["status", &task_id]);
    assert_eq!(view["task_id"], json!(task_id));
    assert_eq!(view["text"], json!("sleep 30"));
    // A unique prefix is enough.
    let view = d.agentctl_json(&["status", &task_id[..13]]);
    assert_eq!(view["task_id"], json!(task_id));

    let out = d.agentctl(&["status", "01234567-89ab-7def-8123-456789abcdef"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no task"), "{}", stderr(&out));

    let out = d.agentctl(&["stop"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a stop without a target is a usage error"
    );
}

#[test]
fn a_second_agentd_on_the_same_socket_refuses_to_start_and_the_first_keeps_serving() {
    let d = Daemon::with_agent_exec(&[]);
    let out = Command::new(AGENTD)
        .arg("--socket")
        .arg(&d.socket)
        .arg("--state-dir")
        .arg(d.dir.path().join("state2"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("agentd is already running at"), "{err}");
    assert!(d.agentctl(&["ping"]).status.success());
}

#[test]
fn agentd_refuses_bad_flags_and_an_open_socket_directory_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(AGENTD)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(args)
            .output()
            .unwrap()
    };
    let socket = dir.path().join("private").join("agentd.sock");
    let socket = socket.to_str().unwrap();
    let out = run(&["--socket", socket, "--max-concurrent", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--max-concurrent must be at least 1"),
        "{}",
        stderr(&out)
    );

    let out = run(&["--socket", socket, "--cancel-grace", "soon"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad duration is a usage error"
    );

    let out = run(&["--socket", socket, "--agent", "'unterminated"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("unterminated single quote"),
        "{}",
        stderr(&out)
    );

    // A socket directory others can enter is refused, not used.
    use std::os::unix::fs::PermissionsExt;
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = run(&["--socket", open.join("agentd.sock").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("must be 0700") && err.trim().lines().count() == 1,
        "{err}"
    );
    assert!(!open.join("agentd.sock").exists());
}

#[test]
fn sigterm_stops_every_task_removes_the_socket_and_exits_cleanly() {
    let mut d = Daemon::with_agent_exec(&["--cancel-grace", "500ms", "--term-grace", "500ms"]);
    let pidfile = d.dir.path().join("pids");
    let task = d.submit(
        "alice",
        &format!("sleep 300 & echo $! > {}; echo up; wait", pidfile.display()),
    );
    d.wait_progress(&task, "up");
    let tool = read_pids(&pidfile);
    assert_eq!(tool.len(), 1);
    let agents = d.live_children();
    kill(d.pid(), libc::SIGTERM);
    let status = wait_for("agentd exits after SIGTERM", DEADLINE, || {
        d.child.try_wait().unwrap()
    });
    assert!(status.success(), "agentd exited with {status}");
    assert!(!d.socket.exists(), "the socket was left behind");
    for pid in agents.iter().chain(&tool) {
        assert!(!alive(*pid), "process {pid} outlived agentd");
    }
    assert!(d.log().contains("shutting down"), "{}", d.log());
}
