//! agentctl as a user meets it: one-line answers, JSON, errors and exit codes.

use std::process::Command;

use serde_json::{json, Value};

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
    // It says what to do: start agentd, or point agentctl at the socket it uses.
    assert!(err.contains("start it with `agentd &`"), "{err}");
    assert!(err.contains("--socket PATH or AGENTD_SOCKET"), "{err}");
    // The same for a socket file nobody listens on (agentd killed by SIGKILL).
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let out = Command::new(AGENTCTL)
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("(connection refused)"), "{err}");
    assert!(err.contains("start it with `agentd &`"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// `--socket` naming a directory (or a file that is no socket) says so and which file
/// to give; an empty `--socket` is a usage error, not the default socket in disguise
/// (an empty `AGENTD_SOCKET` still counts as unset, as for agentd).
#[test]
fn agentctl_says_when_its_socket_is_a_directory_or_empty() {
    let dir = tempfile::tempdir().unwrap();
    let run = |socket: &std::ffi::OsStr, env: Option<&str>| {
        let mut command = Command::new(AGENTCTL);
        command.arg("--socket").arg(socket).arg("ping");
        if let Some(env) = env {
            command.env("AGENTD_SOCKET", env);
        }
        command.output().unwrap()
    };
    let out = run(dir.path().as_os_str(), None);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!(
            "{} is a directory, not agentd's socket: give the socket file, e.g. {}",
            dir.path().display(),
            dir.path().join("agentd.sock").display()
        )),
        "{err}"
    );
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "x").unwrap();
    let out = run(file.as_os_str(), None);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{} is a regular file, not agentd's socket: give the socket agentd listens on",
            file.display()
        )),
        "{err}"
    );

    let out = run("".as_ref(), None);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("--socket"), "{err}");
    assert!(!err.contains("agentd is not running"), "{err}");

    // An empty AGENTD_SOCKET is unset: the default path (here under XDG_RUNTIME_DIR).
    let out = Command::new(AGENTCTL)
        .arg("ping")
        .env("AGENTD_SOCKET", "")
        .env("XDG_RUNTIME_DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let default = dir.path().join("agentd").join("agentd.sock");
    assert!(
        stderr(&out).contains(&default.display().to_string()),
        "{}",
        stderr(&out)
    );
}

/// A task id agentctl cannot use (too short, ambiguous) is refused with what to give
/// instead, by every command that takes one; a short prefix of existing tasks is not
/// reported as if no such task existed.
#[test]
fn a_short_or_ambiguous_task_id_says_what_to_give_instead() {
    let d = Daemon::with_agent_exec(&[]);
    let mut ids = Vec::new();
    for n in 0..2 {
        let out = d.agentctl(&["send", "--session", &format!("s{n}"), "true"]);
        assert!(out.status.success(), "{}", stderr(&out));
        ids.push(stdout(&out).split_whitespace().nth(1).unwrap().to_string());
    }
    // Two ids made within a second share their first 8 characters.
    let common = ids[0]
        .chars()
        .zip(ids[1].chars())
        .take_while(|(a, b)| a == b)
        .count();
    assert!(common >= 8, "{ids:?}");
    let shared = &ids[0][..common.min(12)];
    for cmd in ["status", "log", "stop", "resume"] {
        let out = d.agentctl(&[cmd, shared]);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(
            err.trim_end(),
            format!(
                "agentctl: task id prefix {shared} is ambiguous (2 tasks): give more of the id"
            ),
            "{cmd}"
        );

        let out = d.agentctl(&[cmd, &ids[0][..3]]);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("a task id or a unique prefix of at least 4 characters"),
            "{cmd}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");

        // A blank id (an empty shell variable, quoted) says that no id was given.
        let out = d.agentctl(&[cmd, " "]);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.starts_with("agentctl: no task id given: give a task id"),
            "{cmd}: {err}"
        );
    }
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

/// With AGENTD_SOCKET set, as under a service or in a test, a usage error's usage
/// line is the command's own: `--socket` is not shown as if it were required.
#[test]
fn a_usage_error_does_not_show_the_socket_from_the_environment_as_required() {
    let out = Command::new(AGENTCTL)
        .args(["send", "--session", "a"])
        .env("AGENTD_SOCKET", "/tmp/agentd-test-none.sock")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("Usage: agentctl send --session <S> <TEXT>..."),
        "{err}"
    );
    assert!(!err.contains("--socket"), "{err}");
    // The help still says where the socket comes from.
    let out = Command::new(AGENTCTL)
        .args(["send", "--help"])
        .output()
        .unwrap();
    assert!(stdout(&out).contains("$AGENTD_SOCKET"), "{}", stdout(&out));
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
    // A configuration error exits 78 (EX_CONFIG), a usage error 2, the rest 1.
    let out = run(&["--socket", socket, "--max-concurrent", "0"]);
    assert_eq!(out.status.code(), Some(78));
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
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("unterminated single quote"),
        "{}",
        stderr(&out)
    );

    // A log filter that does not parse: one line, saying it once.
    let out = Command::new(AGENTD)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--socket", socket])
        .env("AGENTD_LOG", "bogus===")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = stderr(&out);
    assert!(
        err.starts_with("agentd: invalid $AGENTD_LOG \"bogus===\": "),
        "{err}"
    );
    assert_eq!(
        err.matches("error parsing level filter").count(),
        1,
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

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

/// Runs `tests/support/pty_session.py` (python3's `pty`): `cmd` on a pseudo-terminal,
/// driven by `steps`; returns (transcript, exit status), panicking on a step that
/// timed out.
fn on_a_pty(cmd: &[&str], env: &[(&str, &str)], steps: Value) -> (String, Option<i32>) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/pty_session.py");
    let env: serde_json::Map<String, Value> =
        env.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    let spec = json!({"cmd": cmd, "env": env, "timeout": DEADLINE.as_secs(), "steps": steps});
    let out = Command::new("python3")
        .arg(script)
        .arg(spec.to_string())
        .env_remove("NO_COLOR")
        .env_remove("CLICOLOR_FORCE")
        .env_remove("AGENTD_SOCKET")
        .output()
        .expect("run python3");
    assert!(out.status.success(), "pty driver: {}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("pty driver report");
    let transcript = report["transcript"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        report["ok"] == json!(true),
        "{}\n--- transcript ---\n{transcript}",
        report["error"]
    );
    (transcript, report["status"].as_i64().map(|s| s as i32))
}

/// `text` as a regular expression matching itself.
fn literal(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let special = "\\.^$|?*+()[]{}".contains(c);
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

#[test]
fn chat_on_a_terminal_sends_lines_answers_commands_and_shows_results() {
    let d = Daemon::with_collecting_echo_agent(&["--max-concurrent", "2"]);
    let gate = d.gate("report");
    let socket = d.socket.to_str().unwrap();
    let (transcript, status) = on_a_pty(
        &[AGENTCTL, "--socket", socket, "chat", "--session", "alice"],
        &[("NO_COLOR", "1"), ("TZ", "UTC0")],
        json!([
            ["expect", "chatting with session alice"],
            ["type", format!("hold {gate} write the report")],
            ["expect", r"\d\d:\d\d:\d\d  task \S+  started"],
            // A chat command is answered at once, while the task runs.
            ["type", "/status"],
            ["expect", r"1/2 agents busy, 0 queued overall"],
            ["touch", gate],
            ["expect", r"task \S+  finished: succeeded \(ran [0-9.]+ s\)"],
            // The result, indented under the event.
            [
                "expect",
                format!(
                    r"\n {{10}}{}",
                    literal(&format!("hold {gate} write the report"))
                )
            ],
            ["type", "/quit"],
            ["wait"],
        ]),
    );
    assert_eq!(status, Some(0), "{transcript}");
    assert!(!transcript.contains('\x1b'), "NO_COLOR: {transcript:?}");
    // One task ran, and /status and /quit were not work.
    let tasks = d.agentctl_json(&["tasks", "--all", "--session", "alice"]);
    let tasks = tasks.as_array().unwrap();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0]["state"], json!("succeeded"));

    // Ctrl-D leaves too; on a terminal without NO_COLOR the clock is styled.
    let (transcript, status) = on_a_pty(
        &[AGENTCTL, "--socket", socket, "chat", "--session", "bob"],
        &[],
        json!([
            ["expect", "chatting with session bob"],
            ["type", "hello"],
            ["expect", r"finished: \S*succeeded"],
            ["eof"],
            ["wait"],
        ]),
    );
    assert_eq!(status, Some(0), "{transcript}");
    assert!(transcript.contains("\x1b[2m"), "{transcript:?}");
}

/// A typo or a command that fails is answered in the chat, which goes on: the user
/// is not thrown out of the chat for it.
#[test]
fn chat_answers_a_mistaken_command_and_goes_on() {
    let d = Daemon::with_collecting_echo_agent(&[]);
    let socket = d.socket.to_str().unwrap();
    let (transcript, status) = on_a_pty(
        &[AGENTCTL, "--socket", socket, "chat", "--session", "alice"],
        &[("NO_COLOR", "1")],
        json!([
            ["expect", "chatting with session alice"],
            ["type", "/stauts"],
            ["expect", "unknown command /stauts: nothing was run"],
            ["type", "/stop 0000"],
            ["expect", "no task 0000"],
            ["type", "/status"],
            ["expect", r"0/2 agents busy, 0 queued overall"],
            ["type", "/quit"],
            ["wait"],
        ]),
    );
    assert_eq!(status, Some(0), "{transcript}");
}

/// `agentctl chat --session SESSION` against `d`, its standard streams piped.
fn start_chat(d: &Daemon, session: &str) -> std::process::Child {
    Command::new(AGENTCTL)
        .arg("--socket")
        .arg(&d.socket)
        .args(["chat", "--session", session])
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Ctrl-C leaves the chat as `watch --session` does: saying that the session's tasks
/// go on and how to stop them, with exit 130, and the task still runs.
#[test]
fn ctrl_c_in_chat_says_the_tasks_go_on() {
    use std::io::{BufRead, BufReader, Write};
    let d = Daemon::with_agent_exec(&[]);
    let task = d.submit("alice", "echo up; sleep 300");
    d.wait_progress(&task, "up");
    let mut child = start_chat(&d, "alice");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // The banner comes once the session is watched; the snapshot shows the task.
    assert!(lines
        .next()
        .unwrap()
        .unwrap()
        .starts_with("chatting with session alice"));
    writeln!(stdin, "/status").unwrap();
    let answered = lines.find(|l| {
        l.as_ref()
            .is_ok_and(|l| l.contains("1/2 agents busy, 0 queued overall"))
    });
    assert!(answered.is_some(), "the chat answered /status");
    kill(child.id(), libc::SIGINT);
    let status = wait_for("agentctl chat exits on SIGINT", DEADLINE, || {
        child.try_wait().unwrap()
    });
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert_eq!(
        err.trim(),
        "agentctl: left the chat; the tasks of session alice go on (stop them with \
         `agentctl stop --session alice`)"
    );
    assert_eq!(d.task(&task)["state"], json!("running"));
}

/// A chat fed from a pipe (or left with Ctrl-D right after a message) still shows
/// what became of every message it sent before it leaves: the answer is not lost
/// because stdin ended before the session's event came.
#[test]
fn chat_whose_input_ends_at_once_still_shows_each_message_was_accepted() {
    use std::io::Write;
    let d = Daemon::with_agent_exec(&[]);
    for round in 0..3 {
        let session = format!("piped-{round}");
        let mut child = start_chat(&d, &session);
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "echo first\necho second").unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        let tasks = d.agentctl_json(&["tasks", "--all", "--session", &session]);
        let tasks = tasks.as_array().unwrap();
        assert_eq!(tasks.len(), 2, "{tasks:?}");
        for task in tasks {
            let id = task["task_id"].as_str().unwrap();
            assert!(
                text.contains(&format!("task {id}  accepted")),
                "round {round}: no word on task {id}:\n{text}"
            );
        }
    }
}

/// The chat's `/help` also says how to leave the chat, which only agentctl knows.
#[test]
fn chat_help_says_how_to_leave() {
    use std::io::Write;
    let d = Daemon::with_agent_exec(&[]);
    let mut child = start_chat(&d, "alice");
    writeln!(child.stdin.take().unwrap(), "/help").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let help = text
        .split_once("Commands (answered at once")
        .map(|(_, h)| h);
    assert!(
        help.is_some_and(|h| h.lines().any(|l| l.trim_start().starts_with("/quit"))),
        "{text}"
    );
}

/// A task that fails before its agent runs (here: its agent program was removed) is told
/// once by `send --wait`, with how it ended, not once as the send's answer and again
/// as its end.
#[test]
fn send_wait_of_a_task_that_failed_at_once_says_so_once() {
    let d = Daemon::with_removed_agent();
    let out = d.agentctl(&["send", "--session", "alice", "--wait", "hello"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.matches("cannot start the agent").count(), 1, "{text}");
    assert!(
        text.starts_with("task ") && text.contains("failed"),
        "{text}"
    );
}

/// `resume` says that it resumes, and whether from a checkpoint, before the new
/// attempt's line, in words as in the chat's reply.
#[test]
fn resume_says_what_it_resumes() {
    let d = Daemon::with_agent_exec(&["--cancel-grace", "1s"]);
    let task = d.submit("alice", "echo up; exec sleep 60");
    d.wait_progress(&task, "up");
    d.request(json!({"cmd": "stop", "task_id": task}));
    let mut previous = task.clone();
    for chat in [false, true] {
        let args = if chat {
            vec!["send", "--session", "alice", "/resume"]
        } else {
            vec!["resume", previous.as_str()]
        };
        let out = d.agentctl(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let text = stdout(&out);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines.first().copied(),
            Some(
                format!("resuming task {previous} (no checkpoint saved), as a new attempt:")
                    .as_str()
            ),
            "{args:?}: {text}"
        );
        assert!(
            lines
                .get(1)
                .is_some_and(|l| l.starts_with("task ") && l.ends_with("  started")),
            "{args:?}: {text}"
        );
        let attempt = lines[1].split_whitespace().nth(1).unwrap().to_string();
        d.wait_progress(&attempt, "up");
        d.request(json!({"cmd": "stop", "task_id": attempt}));
        // The chat's `/resume` takes the chat's latest task: this attempt.
        previous = attempt;
    }
}

#[test]
fn chat_says_so_when_agentd_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nothing.sock");
    let out = Command::new(AGENTCTL)
        .arg("--socket")
        .arg(&socket)
        .args(["chat", "--session", "a"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("agentd is not running at"));
}

#[test]
fn send_wait_prints_the_output_once_and_how_long_the_task_ran() {
    let d = Daemon::with_agent_exec(&[]);
    let out = d.agentctl(&[
        "send",
        "--session",
        "alice",
        "--wait",
        "echo alpha; sleep 0.2; echo beta",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[0].starts_with("task ") && lines[0].ends_with("  started"),
        "{text}"
    );
    assert_eq!(lines[1..3], ["  alpha", "  beta"], "{text}");
    let id = lines[0].split_whitespace().nth(1).unwrap();
    assert!(
        // How long it ran, whatever the machine's load made of the 0.2 s.
        lines[3].starts_with(&format!("task {id}  succeeded (ran ")) && lines[3].ends_with(" s)"),
        "{text}"
    );
    assert_eq!(text.matches("alpha").count(), 1, "{text}");
}

/// `send --wait` of a message steered into a running task follows that task from
/// the middle: the end prints the task's output less the lines it already showed
/// as progress, though it did not see the output's start.
#[test]
fn send_wait_of_a_steered_message_prints_no_line_twice() {
    let agent = format!("{AGENT_EXEC} --steer -- sh -c {{text}}");
    let d = Daemon::start(&["--agent", agent.as_str(), "--queue-mode", "steer"]);
    let task = d.submit(
        "alice",
        "echo building; read answer; echo got $answer; echo done",
    );
    d.wait_progress(&task, "building");
    let out = d.agentctl(&["send", "--session", "alice", "--wait", "yes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(&format!("task {task}  succeeded")), "{text}");
    for line in ["got yes", "done"] {
        assert_eq!(text.matches(line).count(), 1, "{line:?} not once:\n{text}");
    }
    // The start of the output, which this client did not see as progress, is
    // under the end.
    assert_eq!(text.matches("building").count(), 1, "{text}");
}

/// A client that reads promptly gets every progress line, however quickly the agent
/// writes them: `send --wait` prints each once, in order, and no result line again.
#[test]
fn send_wait_prints_every_line_of_a_quick_task_once() {
    let d = Daemon::with_agent_exec(&[]);
    let out = d.agentctl(&[
        "send",
        "--session",
        "alice",
        "--wait",
        "for i in $(seq 1 30); do echo line $i; done",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    let progress: Vec<String> = (1..=30).map(|i| format!("  line {i}")).collect();
    assert_eq!(lines.len(), 32, "{text}");
    assert_eq!(lines[1..31], progress[..], "{text}");
    assert!(lines[31].contains("  succeeded (ran "), "{text}");
}

/// A pipe filled to the brim, its reader, its writer and how many bytes it holds: a
/// process given the writer as its stdout blocks on its first write.
// std's pipe is newer (1.87) than the crate's MSRV; the tests used it before this
// helper, where clippy's MSRV lint did not flag it, and it flags it here.
#[allow(clippy::incompatible_msrv)]
fn full_pipe() -> (std::io::PipeReader, std::io::PipeWriter, usize) {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let (reader, mut writer) = std::io::pipe().unwrap();
    let fd = writer.as_raw_fd();
    // SAFETY: fcntl on a pipe descriptor this test owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    assert!(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } == 0);
    let mut filled = 0;
    while let Ok(n) = writer.write(&[b'#'; 4096]) {
        filled += n;
    }
    assert!(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } == 0);
    (reader, writer, filled)
}

/// `send --wait` prints every progress line of its task, also those the agent wrote
/// before agentctl got to reading events: here agentctl is held up writing its first
/// line (its stdout is a full pipe) until the agent has reported.
#[test]
fn send_wait_prints_the_progress_reported_before_it_read_any_event() {
    use std::io::Read;
    use std::process::Stdio;
    let d = Daemon::with_agent_exec(&[]);
    let gate = d.gate("end");
    // A full pipe, so that agentctl's first write blocks.
    let (mut reader, writer, filled) = full_pipe();
    let mut child = Command::new(AGENTCTL)
        .arg("--socket")
        .arg(&d.socket)
        .args(["send", "--session", "s", "--wait"])
        .arg(format!(
            "echo up; while [ ! -e {gate} ]; do sleep 0.02; done"
        ))
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let task = wait_for("the task is accepted", DEADLINE, || {
        let tasks = d.request(json!({"cmd": "tasks", "session": "s"}));
        tasks[0]["task_id"].as_str().map(str::to_string)
    });
    d.wait_progress(&task, "up");
    d.release(&gate);
    let mut filler = vec![0; filled];
    reader.read_exact(&mut filler).unwrap();
    let mut text = String::new();
    reader.read_to_string(&mut text).unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status}: {err}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[0], format!("task {task}  started"), "{text}");
    assert_eq!(lines[1], "  up", "{text}");
    assert!(
        lines[2].starts_with(&format!("task {task}  succeeded (ran ")),
        "{text}"
    );
}

/// `send --wait` that fell behind a flood of output (its stdout blocked) says that
/// progress lines were left out, as `watch` does, rather than leaving a silent gap.
#[test]
fn send_wait_says_when_progress_lines_were_skipped() {
    use std::io::Read;
    use std::process::Stdio;
    let d = Daemon::with_agent_exec(&[]);
    let gate = d.gate("flooded");
    // A full pipe, so that agentctl's first write blocks.
    let (mut reader, writer, filled) = full_pipe();
    let mut child = Command::new(AGENTCTL)
        .arg("--socket")
        .arg(&d.socket)
        .args(["send", "--session", "s", "--wait"])
        .arg(format!("seq 1 20000; touch {gate}; echo last"))
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the flood was written", DEADLINE, || {
        std::path::Path::new(&gate).exists().then_some(())
    });
    let mut filler = vec![0; filled];
    reader.read_exact(&mut filler).unwrap();
    let mut text = String::new();
    reader.read_to_string(&mut text).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("  (") && l.ends_with(" progress lines skipped)")),
        "{text}"
    );
    assert!(text.contains("  succeeded (ran "), "{text}");
}

#[test]
fn ctrl_c_on_send_wait_or_watch_says_the_task_goes_on() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let d = Daemon::with_agent_exec(&[]);
    for watch in [false, true] {
        let session = if watch { "w" } else { "s" };
        let task = watch.then(|| {
            let id = d.submit(session, "echo up; sleep 300");
            d.wait_progress(&id, "up");
            id
        });
        let mut cmd = Command::new(AGENTCTL);
        cmd.arg("--socket").arg(&d.socket);
        match &task {
            Some(id) => cmd.args(["watch", id]),
            None => cmd.args(["send", "--session", session, "--wait", "echo up; sleep 300"]),
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        let id = task.unwrap_or_else(|| first.split_whitespace().nth(1).unwrap().to_string());
        // Once the task is under way (watch: its `started` event, or the output).
        if !watch {
            assert_eq!(lines.next().unwrap().unwrap(), "  up");
        }
        kill(child.id(), libc::SIGINT);
        let status = wait_for("agentctl exits on SIGINT", DEADLINE, || {
            child.try_wait().unwrap()
        });
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(130), "{err}");
        // In the words of the command: `send --wait` waited, `watch` watched.
        let verb = if watch { "watching" } else { "waiting" };
        assert_eq!(
            err.trim(),
            format!(
                "agentctl: stopped {verb}; task {id} goes on (stop it with `agentctl stop {id}`)"
            )
        );
        assert_eq!(d.task(&id)["state"], json!("running"));
    }
    // A session watch says how to stop the session's tasks.
    let mut child = Command::new(AGENTCTL)
        .arg("--socket")
        .arg(&d.socket)
        .args(["watch", "--session", "w"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its snapshot shows the running task: the watch is set up.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let _ = lines.next();
    kill(child.id(), libc::SIGINT);
    let status = wait_for("agentctl exits on SIGINT", DEADLINE, || {
        child.try_wait().unwrap()
    });
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(
        err.contains("the tasks of session w go on (stop them with `agentctl stop --session w`)"),
        "{err}"
    );
}

#[test]
fn tables_show_short_unique_ids_and_times_are_local() {
    let d = Daemon::with_agent_exec(&[]);
    let first = d.submit("alice", "sleep 30");
    let second = d.submit("bob", "sleep 30");
    let out = d.agentctl(&["tasks"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let shown: Vec<String> = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    assert_eq!(shown.len(), 2, "{table}");
    for (short, full) in shown.iter().zip([&first, &second]) {
        assert!(
            short.len() < full.len() && full.starts_with(short.as_str()),
            "{table}"
        );
        // agentd takes the short id wherever an id goes.
        assert_eq!(d.agentctl_json(&["status", short])["task_id"], json!(full));
    }
    assert!(
        !table.contains('\x1b'),
        "piped output has no colour: {table:?}"
    );
    let full = stdout(&d.agentctl(&["tasks", "--full"]));
    assert!(full.contains(&first) && full.contains(&second), "{full}");
    let json = d.agentctl_json(&["tasks"]);
    assert!(json.to_string().contains(&first));
    let coloured = stdout(&d.agentctl(&["tasks", "--color", "always"]));
    assert!(coloured.contains("\x1b[36mrunning\x1b[0m"), "{coloured:?}");

    // Times in the local zone, as TZ says.
    let created = d.task(&first)["created_at"].as_str().unwrap().to_string();
    let (hour, minute): (u32, u32) = (
        created[11..13].parse().unwrap(),
        created[14..16].parse().unwrap(),
    );
    let status_in = |tz: &str| {
        let out = Command::new(AGENTCTL)
            .arg("--socket")
            .arg(&d.socket)
            .args(["status", &first])
            .env("TZ", tz)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let utc = status_in("UTC0");
    assert!(
        utc.contains(&format!(
            "  created   {} {} UTC (",
            &created[..10],
            &created[11..19]
        )),
        "{utc}"
    );
    let shifted = (hour * 60 + minute + 5 * 60 + 45) % (24 * 60);
    let far = status_in("NPT-05:45");
    assert!(
        far.contains(&format!(
            "{:02}:{:02}:{} NPT (",
            shifted / 60,
            shifted % 60,
            &created[17..19]
        )),
        "{far}"
    );
}

#[test]
fn bash_loads_the_completions_and_they_complete_commands() {
    let out = Command::new(AGENTCTL)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("agentctl.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    let check = format!(
        "source {} && complete -p agentctl && COMP_WORDS=(agentctl ch) COMP_CWORD=1 && \
         _agentctl agentctl ch agentctl && echo \"words: ${{COMPREPLY[*]}}\"",
        script.display()
    );
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &check])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(said.contains("-F _agentctl agentctl"), "{said}");
    assert!(said.contains("words: chat"), "{said}");

    for (shell, marker) in [
        ("zsh", "#compdef agentctl"),
        ("fish", "complete -c agentctl"),
    ] {
        let out = Command::new(AGENTCTL)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let script = stdout(&out);
        assert!(
            script.contains(marker) && script.contains("chat"),
            "{shell}: {script}"
        );
    }
    let out = Command::new(AGENTCTL)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Renders a man page file to text: `man -l` (man-db), else `groff -man`.
fn render_man(page: &std::path::Path) -> String {
    let man = Command::new("man")
        .args(["-P", "cat", "-l"])
        .arg(page)
        .env("MANWIDTH", "100")
        .output();
    let out = match man {
        Ok(out) if out.status.success() => out,
        _ => Command::new("groff")
            .args(["-man", "-Tutf8"])
            .arg(page)
            .output()
            .expect("neither `man` nor `groff` is installed (.ci/run installs groff-base)"),
    };
    assert!(out.status.success(), "{}", stderr(&out));
    // Bold and underline are overstrikes: `c\x08c`, `_\x08c`.
    let text = stdout(&out);
    let mut plain = String::new();
    for c in text.chars() {
        if c == '\x08' {
            plain.pop();
        } else {
            plain.push(c);
        }
    }
    plain
}

#[test]
fn man_pages_are_generated_and_render() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(AGENTCTL).arg("man").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let page = dir.path().join("printed.1");
    std::fs::write(&page, &out.stdout).unwrap();
    let text = render_man(&page);
    for needle in [
        "NAME",
        "agentctl - Control agentd",
        "SYNOPSIS",
        "completions",
        "chat",
    ] {
        assert!(text.contains(needle), "{needle}: {text}");
    }

    let pages = dir.path().join("man1");
    std::fs::create_dir(&pages).unwrap();
    let out = Command::new(AGENTCTL)
        .arg("man")
        .arg(&pages)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(pages.join("agentctl.1").exists());
    let chat = render_man(&pages.join("agentctl-chat.1"));
    assert!(chat.contains("--session"), "{chat}");
    // agentd's page, from the daemon's own flag definitions: every flag its --help
    // lists is on it.
    let agentd = render_man(&pages.join("agentd.1"));
    let words = agentd.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(words.contains("agentd - Supervisor daemon"), "{agentd}");
    let help = Command::new(AGENTD).arg("--help").output().unwrap();
    assert!(help.status.success());
    let help = stdout(&help);
    let flags: Vec<&str> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches(','))
        .collect();
    assert!(flags.len() > 20, "{flags:?}");
    for flag in flags {
        assert!(agentd.contains(flag), "{flag} is not on agentd.1: {agentd}");
    }
    for command in [
        "send",
        "status",
        "tasks",
        "stop",
        "queue",
        "watch",
        "ping",
        "completions",
        "man",
    ] {
        assert!(
            pages.join(format!("agentctl-{command}.1")).exists(),
            "{command}"
        );
    }
    let out = Command::new(AGENTCTL)
        .arg("man")
        .arg(dir.path().join("missing/dir"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(
        stderr(&out).starts_with("agentctl: cannot write into "),
        "{}",
        stderr(&out)
    );
}

/// The long flags a `--help` output lists, less `--help` and `--version`, each with
/// its short form if it has one (`--follow` with `-f`).
fn help_flags(program: &str, args: &[&str]) -> Vec<(String, Option<String>)> {
    let out = Command::new(program)
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{program} {args:?} --help");
    let mut flags: Vec<(String, Option<String>)> = stdout(&out)
        .lines()
        .filter_map(|line| {
            // `-f, --follow`, or `--json`.
            let mut words = line.split_whitespace();
            let first = words.next()?;
            let (flag, short) =
                if first.len() == 3 && first.starts_with('-') && first.ends_with(',') {
                    (words.next()?, Some(first.trim_end_matches(',').to_string()))
                } else {
                    (first, None)
                };
            (flag.starts_with("--") && flag.len() > 2).then(|| (flag.to_string(), short))
        })
        .filter(|(f, _)| f != "--help" && f != "--version")
        .collect();
    flags.dedup();
    flags
}

/// The README's tables and synopses are what a newcomer reads: every flag of
/// `agentd --help` has its row in the README's agentd table and no row names a
/// flag agentd does not have, and each agentctl command's synopsis line names all
/// of its flags.
#[test]
fn the_readme_lists_every_flag_the_binaries_have() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let mut rows: Vec<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `--"))
        .map(|l| format!("--{}", l.split([' ', '`']).next().unwrap()))
        .collect();
    rows.sort();
    let mut flags: Vec<String> = help_flags(AGENTD, &[]).into_iter().map(|f| f.0).collect();
    flags.sort();
    assert_eq!(rows, flags, "README's agentd table against agentd --help");

    let global = help_flags(AGENTCTL, &["ping"]);
    let block = readme
        .split_once("### agentctl\n\n```\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("the README's agentctl synopsis")
        .0;
    let synopsis = |command: &str| -> String {
        block
            .lines()
            .find(|l| l.starts_with(&format!("agentctl {command}")))
            .unwrap_or_else(|| panic!("no README synopsis of agentctl {command}"))
            .to_string()
    };
    for (flag, _) in &global {
        assert!(synopsis("[--socket").contains(flag.as_str()), "{flag}");
    }
    for command in [
        "send",
        "chat",
        "status",
        "tasks",
        "stop",
        "queue",
        "watch",
        "log",
        "resume",
        "ping",
        "completions",
        "man",
    ] {
        let line = synopsis(command);
        for (flag, short) in help_flags(AGENTCTL, &[command]) {
            if global.iter().any(|(g, _)| *g == flag) {
                continue;
            }
            // The flag as a whole word (not `--session` for `--sess`).
            let word = |w: &str| {
                line.match_indices(w).any(|(at, _)| {
                    !line[at + w.len()..].starts_with(|c: char| c.is_ascii_lowercase() || c == '-')
                })
            };
            let named = word(&flag) || short.is_some_and(|s| word(&s));
            assert!(named, "README's `{line}` lacks {flag}");
        }
    }
}
