//! Defaults a new user meets: chat `/stop` answers at once, `agentctl stop` waits
//! unless told not to, collected messages suit the default shell agent, and the
//! README's first command, `scripts/demo.sh`, shows what it says and cleans up.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

/// A command that ignores the cooperative cancel (SIGINT) and SIGTERM.
const STUBBORN: &str = "trap '' INT TERM; echo stubborn; sleep 60; sleep 60";

#[test]
fn chat_stop_answers_at_once_and_the_final_state_comes_as_an_event() {
    let d = Daemon::with_agent_exec(&["--cancel-grace", "5s", "--term-grace", "1s"]);
    let task = d.submit("alice", STUBBORN);
    d.wait_progress(&task, "stubborn");
    let mut watch = Watch::session(&d, "alice");

    let reply = d.send("alice", "/stop");
    assert_eq!(reply["command"], json!("stop"), "{reply}");
    assert_eq!(
        reply["reply"],
        json!(format!(
            "task {task}  stopping: cancel sent, SIGTERM in 5 s"
        )),
        "{reply}"
    );
    let stopping = &reply["data"]["stopped"][0];
    assert_eq!(stopping["state"], json!("stopping"), "{reply}");
    assert_eq!(
        reply["data"]["stopping"][0]["next"],
        json!("sigterm"),
        "{reply}"
    );

    let events = watch.until(|e| e["kind"] == json!("finished"));
    let finished = events.last().unwrap();
    assert_eq!(finished["task_id"], json!(task));
    assert_eq!(finished["task"]["state"], json!("cancelled"), "{finished}");
    assert_eq!(finished["task"]["exit"]["ended_by"], json!("sigkill"));
}

#[test]
fn agentctl_stop_waits_for_the_end_unless_told_not_to() {
    let d = Daemon::with_agent_exec(&["--cancel-grace", "1s", "--term-grace", "1s"]);
    let task = d.submit("alice", STUBBORN);
    d.wait_progress(&task, "stubborn");
    let out = d.agentctl(&["stop", "--no-wait", &task]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim_end(),
        format!("task {task}  stopping: cancel sent, SIGTERM in 1 s")
    );
    d.wait_state(&task, "cancelled");

    // By default it waits until the task has ended, like `systemctl stop`.
    let task = d.submit("alice", STUBBORN);
    d.wait_progress(&task, "stubborn");
    let start = Instant::now();
    let out = d.agentctl(&["stop", &task]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        start.elapsed() >= Duration::from_millis(1900),
        "returned before both graces"
    );
    assert!(
        stdout(&out).contains(&format!("task {task}  cancelled (ended by SIGKILL after")),
        "{}",
        stdout(&out)
    );
}

#[test]
fn collected_messages_with_the_default_agent_run_as_commands_without_shell_errors() {
    // The default agent (agent-exec running `sh -c {text}`) and the default mode.
    let d = Daemon::start(&["--debounce", "100ms"]);
    let gate = d.gate("g");
    let first = d.submit(
        "alice",
        &format!("while [ ! -e {gate} ]; do sleep 0.02; done; echo first"),
    );
    d.wait_state(&first, "running");
    let two = d.submit("alice", "echo two");
    let three = d.submit("alice", "echo three");
    d.release(&gate);
    for (task, result) in [(&first, "first"), (&two, "two"), (&three, "three")] {
        let view = d.wait_state(task, "succeeded");
        assert_eq!(view["result"], json!(result), "{view}");
    }
    let logs = d.dir.path().join("state").join("logs");
    for entry in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        assert!(
            !text.contains("not found"),
            "{}: {text}",
            entry.path().display()
        );
    }
}

#[test]
fn a_message_dropped_on_overflow_never_runs_with_the_default_agent() {
    // The default agent runs each message as a shell command, and the default drop
    // policy is `summarize`: the overflow note must not be prepended to the next
    // command, where `- <preview>` would run part of the dropped message.
    let d = Daemon::start(&["--debounce", "0ms"]);
    let gate = d.gate("g");
    let ran = d.dir.path().join("dropped-ran");
    let first = d.submit(
        "alice",
        &format!("while [ ! -e {gate} ]; do sleep 0.02; done; echo first"),
    );
    d.wait_state(&first, "running");
    d.send("alice", "/queue followup cap:1");
    let dropped = d.submit("alice", &format!("true; touch {}", ran.display()));
    let reply = d.send("alice", "echo kept");
    assert_eq!(reply["dropped"][0]["task_id"], json!(dropped), "{reply}");
    let kept = reply["task"]["task_id"].as_str().unwrap().to_string();
    d.release(&gate);
    let view = d.wait_state(&kept, "succeeded");
    assert_eq!(view["text"], json!("echo kept"), "{view}");
    assert_eq!(view["result"], json!("kept"), "{view}");
    assert_eq!(d.task(&dropped)["state"], json!("dropped"));
    assert!(!ran.exists(), "a dropped message ran: {view}");
}

/// The README's first command, `scripts/demo.sh`, run on the binaries under test
/// (`BIN=DIR`, no build) with its own `TMPDIR`.
fn demo(tmp: &std::path::Path) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let bin = std::path::Path::new(AGENTD).parent().unwrap();
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo.sh"))
        .env("BIN", bin)
        .env("TMPDIR", tmp)
        .env("XDG_CONFIG_HOME", tmp.join("no-config"))
        .env_remove("AGENTD_SOCKET")
        .env_remove("AGENTD_CONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0);
    cmd
}

/// Processes whose command line or environment names `path` (the demo's agentd has
/// its state dir there, its agents the socket in `AGENTD_SOCKET`).
fn processes_mentioning(path: &std::path::Path) -> Vec<u32> {
    let needle = path.to_string_lossy().into_owned().into_bytes();
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        for file in ["cmdline", "environ"] {
            let bytes = std::fs::read(entry.path().join(file)).unwrap_or_default();
            if bytes.windows(needle.len()).any(|w| w == needle.as_slice()) {
                found.push(pid);
                break;
            }
        }
    }
    found
}

/// Kills (by pid) what the demo left, after a failed assertion as after a pass.
struct DemoGuard(std::path::PathBuf);

impl Drop for DemoGuard {
    fn drop(&mut self) {
        for pid in processes_mentioning(&self.0) {
            kill(pid, libc::SIGKILL);
        }
    }
}

/// Waits for `child` to exit (polling, generous deadline) and returns its output.
fn demo_output(child: std::process::Child, within: Duration) -> (Option<i32>, String) {
    let pid = child.id();
    let deadline = Instant::now() + within;
    let mut child = child;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            kill(pid, libc::SIGKILL);
            let out = child.wait_with_output().unwrap();
            panic!(
                "the demo did not end within {within:?}:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn the_demo_shows_what_it_says_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let _guard = DemoGuard(tmp.path().to_path_buf());
    let child = demo(tmp.path()).spawn().expect("run scripts/demo.sh");
    let (code, out) = demo_output(child, Duration::from_secs(120));
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("Building"), "BIN=DIR builds nothing: {out}");
    for shown in [
        "1. Alice starts a long task",
        "(the /status chat command took",
        "hello from bob",
        "queued: position 1 (2/2 agents busy)",
        "stopping: cancel sent",
        "no process of it is left",
        "steered into running task",
        "got: use Python 3.12",
    ] {
        assert!(out.contains(shown), "the demo shows {shown:?}:\n{out}");
    }
    // Each command is shown as it would be typed, quoted for the shell, so that a
    // reader can copy it; the long task's and Bob's commands are shown too.
    for typed in [
        "$ agentd --max-concurrent 2 --cancel-grace 2s --term-grace 2s \
         --agent 'agent-exec --steer -- sh -c {text}' --state-dir ",
        r#"$ agentctl send --session alice 'for i in $(seq 1 60); do echo "step $i/60"; sleep 1; done'"#,
        r#"$ agentctl send --session bob 'echo "hello from bob"; uname -sr'"#,
        r#"$ agentctl send --session dave 'echo "dave ran after a slot freed"'"#,
        "$ agentctl send --session erin '/queue steer'",
        "$ agentctl send --session erin 'use Python 3.12'",
        "$ agentctl send --session alice /stop",
    ] {
        assert!(out.contains(typed), "the demo shows {typed:?}:\n{out}");
    }
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().collect();
    assert!(left.is_empty(), "the demo left {left:?}:\n{out}");
    assert_eq!(processes_mentioning(tmp.path()), Vec::<u32>::new(), "{out}");
}

#[test]
fn ctrl_c_ends_the_demo_at_once_and_it_cleans_up() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let _guard = DemoGuard(tmp.path().to_path_buf());
    let mut child = demo(tmp.path()).spawn().expect("run scripts/demo.sh");
    // Read until the long task runs, then Ctrl-C: SIGINT to the demo's process group,
    // as a terminal sends it.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("2. While it runs") {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            panic!("the demo ended early:\n{seen}");
        }
        seen.push_str(&line);
    }
    unsafe { libc::kill(-(child.id() as i32), libc::SIGINT) };
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut rest);
    });
    let (code, out) = demo_output(child, Duration::from_secs(30));
    assert_eq!(code, Some(130), "{seen}{out}");
    assert!(
        !out.contains("is not running"),
        "it stops at once:\n{seen}{out}"
    );
    wait_for("the demo's processes are gone", DEADLINE, || {
        processes_mentioning(tmp.path()).is_empty().then_some(())
    });
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().collect();
    assert!(left.is_empty(), "the demo left {left:?}");
}
