//! Agents that crash, hang, break the protocol or leak: each ends in a recorded state
//! and every other session carries on.

use serde_json::json;

use crate::support::*;

#[test]
fn agent_exec_reports_output_progress_and_exit_status() {
    let d = Daemon::with_agent_exec(&[]);
    let ok = d.submit("alice", "echo one; echo two");
    let view = d.wait_state(&ok, "succeeded");
    assert_eq!(view["result"], json!("one\ntwo"));
    assert_eq!(view["exit"]["code"], json!(0));

    let failing = d.submit("bob", "echo oops >&2; exit 3");
    let view = d.wait_state(&failing, "failed");
    assert_eq!(view["exit"]["command_code"], json!(3), "{view}");
    assert!(
        view["exit"]["error"]
            .as_str()
            .unwrap()
            .contains("exit code 3"),
        "{view}"
    );
    assert!(view["result"].as_str().unwrap().contains("oops"), "{view}");
}

/// Where build.rs could link agent-exec's unwinder statically, a running agent-exec
/// has no libgcc_s mapped (its loading is a tenth of agent-exec's CPU per task).
#[test]
fn agent_exec_runs_without_libgcc_s_where_it_was_linked_so() {
    if option_env!("AGENT_EXEC_STATIC_UNWINDER").is_none() {
        eprintln!("SKIPPED: build.rs found no libgcc_eh.a; agent-exec loads libgcc_s");
        return;
    }
    let d = Daemon::with_agent_exec(&[]);
    // The command's parent is agent-exec.
    let task = d.submit("alice", "grep -c -e libgcc_s -e libc.so /proc/$PPID/maps | head -1; grep -c libgcc_s /proc/$PPID/maps");
    let view = d.wait_state(&task, "failed");
    // grep -c exits 1 when it counts nothing: that is the task's failure here.
    let result = view["result"].as_str().unwrap();
    let counts: Vec<&str> = result.lines().collect();
    assert_eq!(counts.len(), 2, "{view}");
    assert_ne!(
        counts[0], "0",
        "no libc mapped either: not agent-exec's maps? {view}"
    );
    assert_eq!(counts[1], "0", "libgcc_s is mapped: {view}");
}

#[test]
fn a_crashing_agent_fails_its_task_and_the_next_one_runs() {
    let d = Daemon::with_test_agent(&["--max-concurrent", "1"]);
    let crash = d.submit("alice", "crash");
    let next = d.submit("bob", "result:fine");
    let view = d.wait_state(&crash, "failed");
    assert!(
        view["exit"]["error"]
            .as_str()
            .unwrap()
            .contains("without reporting a result"),
        "{view}"
    );
    assert_eq!(view["exit"]["signal"], json!(libc::SIGABRT));
    d.wait_state(&next, "succeeded");
}

#[test]
fn garbage_and_oversized_frames_fail_the_task_not_the_daemon() {
    let d = Daemon::with_test_agent(&["--max-concurrent", "2"]);
    let garbage = d.submit("alice", "garbage");
    let oversized = d.submit("bob", "oversized");
    for id in [&garbage, &oversized] {
        let view = d.wait_state(id, "failed");
        assert!(
            view["exit"]["error"].as_str().unwrap().contains("protocol"),
            "{view}"
        );
    }
    let after = d.submit("carol", "result:still-fine");
    d.wait_state(&after, "succeeded");
    d.assert_nothing_left();
}

#[test]
fn handshake_failures_are_recorded() {
    let d = Daemon::with_test_agent(&["--handshake-timeout", "500ms"]);
    let silent = d.submit("alice", "no-hello");
    let view = d.wait_state(&silent, "failed");
    assert!(
        view["exit"]["error"]
            .as_str()
            .unwrap()
            .contains("no handshake"),
        "{view}"
    );

    let wrong = d.submit("bob", "bad-version");
    let view = d.wait_state(&wrong, "failed");
    assert!(
        view["exit"]["error"].as_str().unwrap().contains("protocol"),
        "{view}"
    );
}

#[test]
fn an_agent_command_that_does_not_exist_fails_with_a_clear_reason() {
    // agentd refuses to start without its agent program: this one went after.
    let d = Daemon::with_removed_agent();
    let task = d.submit("alice", "anything");
    let view = d.wait_state(&task, "failed");
    assert!(
        view["exit"]["error"]
            .as_str()
            .unwrap()
            .contains("cannot start the agent"),
        "{view}"
    );
    let task = d.submit("alice", "again");
    d.wait_state(&task, "failed");
}

#[test]
fn agents_inherit_only_their_channel() {
    let d = Daemon::with_test_agent(&[]);
    // `env` reports the descriptors open at the agent's start (besides its channel)
    // as its last progress line.
    let task = d.submit("alice", "env");
    let view = d.wait_state(&task, "succeeded");
    let fds = view["progress"].as_str().unwrap();
    assert_eq!(
        fds.trim(),
        "open-fds: 0,1,2",
        "the agent inherited more than its channel: {fds}"
    );
}

#[test]
fn agents_stop_when_agentd_dies() {
    let mut d = Daemon::with_agent_exec(&[]);
    let pidfile = d.dir.path().join("pids");
    let task = d.submit(
        "alice",
        &format!("echo $$ > {}; echo up; sleep 300", pidfile.display()),
    );
    d.wait_progress(&task, "up");
    let agents = d.live_children();
    let command = read_pids(&pidfile);
    assert_eq!(agents.len(), 1);
    kill(d.pid(), libc::SIGKILL);
    let _ = d.child.wait();
    for pid in agents.iter().chain(&command) {
        wait_for(
            &format!("process {pid} ends after agentd died"),
            DEADLINE,
            || (!alive(*pid)).then_some(()),
        );
    }
}

#[test]
fn agent_logs_are_kept_only_when_the_agent_wrote_something() {
    let d = Daemon::with_test_agent(&[]);
    let quiet = d.submit("alice", "result:fine");
    d.wait_state(&quiet, "succeeded");
    // Unknown words make the test agent complain on its stderr.
    let noisy = d.submit("bob", "no-such-word");
    d.wait_state(&noisy, "failed");
    let logs = d.dir.path().join("state").join("logs");
    assert!(
        !logs.join(format!("{quiet}.log")).exists(),
        "an empty log was kept"
    );
    // The task may end a moment before its log's copy thread has written it.
    wait_for("the noisy agent's log", DEADLINE, || {
        let text = std::fs::read_to_string(logs.join(format!("{noisy}.log"))).ok()?;
        text.contains("unknown behaviour word").then_some(())
    });
}

#[test]
fn agents_of_ipc_protocol_1_and_2_both_run() {
    let d = Daemon::with_test_agent(&[]);
    let v1 = d.submit("alice", "v1 result:one");
    // A v2 agent's Features and Checkpoint are not protocol errors.
    let v2 = d.submit("bob", "checkpoint:state-1 result:two");
    assert_eq!(d.wait_state(&v1, "succeeded")["result"], json!("one"));
    assert_eq!(d.wait_state(&v2, "succeeded")["result"], json!("two"));
}

#[test]
fn a_steer_into_a_command_that_does_not_read_stdin_is_not_reported_as_delivered() {
    // The default agent-exec (no --steer) says it cannot take steering.
    let d = Daemon::with_agent_exec(&["--queue-mode", "steer", "--debounce", "0ms"]);
    let running = d.submit("alice", "sleep 2; echo A");
    d.wait_state(&running, "running");
    let reply = d.send("alice", "echo B");
    let text = reply["reply"].as_str().unwrap();
    assert!(!text.contains("steered into"), "{reply}");
    assert_eq!(reply["task"]["state"], json!("queued"), "{reply}");
    assert!(
        reply["notice"]
            .as_str()
            .is_some_and(|n| n.contains("does not accept steering")),
        "{reply}"
    );
    assert_eq!(d.wait_state(&running, "succeeded")["result"], json!("A"));
    let follow_up = reply["task"]["task_id"].as_str().unwrap();
    assert_eq!(d.wait_state(follow_up, "succeeded")["result"], json!("B"));
}

/// The signal mask (`SigBlk`) in a `/proc/PID/status` text.
fn blocked_mask(status: &str) -> u64 {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .unwrap_or_else(|| panic!("no SigBlk line in {status}"));
    u64::from_str_radix(hex.trim(), 16).unwrap_or_else(|e| panic!("{e}: {hex:?}"))
}

#[test]
fn agents_do_not_inherit_agentds_blocked_sigchld() {
    // agentd blocks SIGCHLD in every thread (it reads it from a signalfd); an agent
    // starts with nothing blocked. agent-exec then blocks SIGTERM and SIGINT itself
    // (read from its own signalfd), and its command starts with nothing blocked.
    let d = Daemon::with_agent_exec(&[]);
    let bit = |signal: i32| 1u64 << (signal - 1);
    // `exec`: the command itself reads its mask (a shell blocks signals around forks).
    let id = d.submit("masks", "exec grep SigBlk: /proc/self/status");
    let view = d.wait_state(&id, "succeeded");
    let result = view["result"].as_str().expect("result");
    assert_eq!(
        blocked_mask(result),
        0,
        "the command starts with signals blocked: {result}"
    );
    // agent-exec's own mask, read once it relays its command's output: while it
    // starts the command it blocks every signal for a moment (around the clone), so
    // the command cannot read it reliably itself.
    let id = d.submit("agent", "echo up; exec sleep 60");
    let view = d.wait_progress(&id, "up");
    let pid = view["pid"].as_u64().expect("the agent's pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mask = blocked_mask(&status);
    assert_eq!(
        mask & bit(libc::SIGCHLD),
        0,
        "agent-exec started with SIGCHLD blocked: {mask:x}"
    );
    assert_eq!(
        mask & !(bit(libc::SIGTERM) | bit(libc::SIGINT)),
        0,
        "agent-exec blocks more than SIGTERM and SIGINT: {mask:x}"
    );
    let _ = d.request(json!({"cmd": "stop", "task_id": id}));
}

/// The `THP_enabled` line of a process's `/proc/PID/status` (0: transparent huge
/// pages are disabled for it by `PR_SET_THP_DISABLE`).
fn thp_enabled(status: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .unwrap_or_else(|| panic!("no THP_enabled line in {status}"))
        .trim()
        .to_string()
}

#[test]
fn agentd_runs_without_transparent_huge_pages_and_its_agents_as_it_was_started() {
    let d = Daemon::with_agent_exec(&[]);
    let own = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    assert_eq!(thp_enabled(&own), "0", "agentd's own heap");
    // An agent and what it runs get the setting agentd was started with (this test's).
    let ours = thp_enabled(&std::fs::read_to_string("/proc/self/status").unwrap());
    let task = d.submit("chat", "grep THP_enabled /proc/self/status");
    let view = d.wait_state(&task, "succeeded");
    assert_eq!(
        thp_enabled(view["result"].as_str().unwrap()),
        ours,
        "{view}"
    );
    // And agentd's own are off again after the spawn.
    let own = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    assert_eq!(thp_enabled(&own), "0", "agentd's own heap after a spawn");
}
