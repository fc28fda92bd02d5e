//! Durability: the store survives kill -9 (queued work back with its ids and order,
//! running work interrupted, no old agent left), acknowledged messages are never lost
//! and never run twice, one agentd per state dir, a corrupt store refuses to start.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

/// Starts another agentd on `daemon`'s socket and state dir (after the first died).
pub(crate) fn respawn(daemon: &mut Daemon, args: &[&str], log_name: &str) {
    let log = std::fs::File::create(daemon.dir.path().join(log_name)).expect("log file");
    daemon.child = Command::new(AGENTD)
        .arg("--socket")
        .arg(&daemon.socket)
        .arg("--state-dir")
        .arg(daemon.dir.path().join("state"))
        .args(args)
        .env("AGENTD_LOG", "debug")
        .env_remove("AGENTD_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn agentd");
    wait_for("the new agentd answers a ping", DEADLINE, || {
        if let Ok(Some(status)) = daemon.child.try_wait() {
            panic!(
                "agentd exited early with {status}:\n{}",
                std::fs::read_to_string(daemon.dir.path().join(log_name)).unwrap_or_default()
            );
        }
        daemon.try_request(json!({"cmd": "ping"})).ok()
    });
}

/// SIGKILLs agentd by pid; returns the pids of its descendants at that moment (its
/// agents, which are nobody's children once it is gone).
pub(crate) fn kill9(daemon: &mut Daemon) -> Vec<u32> {
    let orphans = daemon.descendants();
    kill(daemon.pid(), libc::SIGKILL);
    daemon.child.wait().expect("reap agentd");
    orphans
}

/// Ends (by pid) whatever is left of `pids`, so a failing test leaves nothing behind.
pub(crate) struct Reaper(pub(crate) Vec<u32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in &self.0 {
            if alive(*pid) {
                kill(*pid, libc::SIGKILL);
            }
        }
    }
}

pub(crate) fn echo_agent_args() -> Vec<String> {
    let script = r#"case "$1" in hold\ *) f=${1#hold }; f=${f%% *}; while [ ! -e "$f" ]; do sleep 0.02; done;; esac; printf %s "$1""#;
    vec![
        "--agent".into(),
        format!("{AGENT_EXEC} -- sh -c '{script}' echo-agent {{text}}"),
        "--max-concurrent".into(),
        "1".into(),
        "--queue-mode".into(),
        "followup".into(),
        "--debounce".into(),
        "0s".into(),
    ]
}

fn ids_of(list: &Value) -> Vec<(String, String, String)> {
    list.as_array()
        .expect("a list")
        .iter()
        .map(|t| {
            (
                t["session"].as_str().unwrap().to_string(),
                t["task_id"].as_str().unwrap().to_string(),
                t["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn kill9_with_one_running_and_30_queued_restarts_with_the_queue_and_an_interrupted_task() {
    let args = echo_agent_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start(&args);
    let gate = daemon.gate("never");
    let running = daemon.submit("chat-0", &format!("hold {gate} first"));
    daemon.wait_state(&running, "running");
    let mut queued: Vec<(String, String)> = Vec::new();
    for i in 0..30 {
        let session = format!("chat-{}", i % 6);
        let id = daemon.submit(&session, &format!("hold {gate} message {i}"));
        queued.push((session, id));
    }
    let orphans = kill9(&mut daemon);
    let _reaper = Reaper(orphans.clone());
    assert!(!orphans.is_empty(), "the running task had an agent");

    respawn(&mut daemon, &args, "agentd2.log");
    let old = daemon.task(&running);
    assert_eq!(old["state"], json!("interrupted"), "{old}");
    // It says why, and times no stop (none was made).
    assert_eq!(old["exit"], json!({"reason": "daemon crashed"}), "{old}");
    let out = daemon.agentctl(&["status", &running]);
    assert!(
        stdout(&out).contains("exit      interrupted: daemon crashed"),
        "{}",
        stdout(&out)
    );
    // Every queued task is back with its id, each chat's in the order sent. One of
    // them may have started already (the queue runs on after a restart).
    let list = daemon.request(json!({"cmd": "tasks"}));
    let now: Vec<(String, String, String)> = ids_of(&list);
    assert_eq!(now.len(), 30, "{list}");
    for session in (0..6).map(|i| format!("chat-{i}")) {
        let sent: Vec<&String> = queued
            .iter()
            .filter(|(s, _)| *s == session)
            .map(|(_, id)| id)
            .collect();
        let back: Vec<&String> = now
            .iter()
            .filter(|(s, _, _)| *s == session)
            .map(|(_, id, _)| id)
            .collect();
        assert_eq!(back, sent, "chat {session}");
    }
    let status = daemon.request(json!({"cmd": "status"}));
    assert_eq!(
        status["recovery"],
        json!({"queued": 30, "over_limits": 0, "interrupted": 1, "killed": status["recovery"]["killed"], "crashed": true}),
        "{status}"
    );
    let out = daemon.agentctl(&["status"]);
    assert!(
        stdout(&out).contains("recovered 30 queued, 1 interrupted"),
        "{}",
        stdout(&out)
    );
    // No process of the old agentd's agents is left.
    wait_for("the old agents are gone", DEADLINE, || {
        orphans.iter().all(|pid| !alive(*pid)).then_some(())
    });
}

/// How many kill -9 rounds the storm test runs: `AGENTD_KILL_ROUNDS`, default 3 (the
/// issue's 20 rounds: `AGENTD_KILL_ROUNDS=20 cargo test --test integration storm`).
fn kill_rounds() -> u32 {
    std::env::var("AGENTD_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

#[test]
fn acknowledged_messages_survive_kill9_exactly_once_and_dedup_after_restart() {
    // The moment of each kill is random (printed, so a failure can be replayed with
    // AGENTD_KILL_SEED): after 50 to 300 messages are queued.
    let mut seed: u64 = std::env::var("AGENTD_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("storm: AGENTD_KILL_SEED={seed}");
    for round in 0..kill_rounds() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let threshold = 50 + seed % 250;
        println!("storm: round {round}: kill -9 once {threshold} are queued");
        storm_round(threshold);
    }
}

#[test]
fn duplicates_pipelined_behind_their_original_get_its_task_id_and_it_survives_kill9() {
    let mut daemon = Daemon::with_echo_agent(&["--max-concurrent", "1"]);
    let gate = daemon.gate("never");
    let first = daemon.submit("chat", &format!("hold {gate} first"));
    daemon.wait_state(&first, "running");
    // The original and two re-deliveries in one write: the duplicates are answered
    // (with its commit) with the original's task id, and nothing runs twice.
    let send = |id: u64| {
        json!({"id": id, "cmd": "send", "session": "chat", "message_id": "evt-pipelined",
            "text": format!("hold {gate} pipelined")})
    };
    let answers = crate::status::exchange(&daemon, vec![send(1), send(2), send(3)]);
    let original = crate::status::answer_to(&answers, 1);
    assert_ne!(original["result"]["duplicate"], json!(true), "{original}");
    let task_id = original["result"]["task"]["task_id"].clone();
    for id in [2, 3] {
        let r = crate::status::answer_to(&answers, id);
        assert_eq!(r["result"]["duplicate"], json!(true), "{r}");
        assert_eq!(r["result"]["task"]["task_id"], task_id, "{r}");
    }
    // Acknowledged, so durable: there after kill -9, once.
    let _reaper = Reaper(kill9(&mut daemon));
    let args = echo_agent_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    respawn(&mut daemon, &args, "agentd2.log");
    let task = daemon.task(task_id.as_str().unwrap());
    // The first task was interrupted by the kill: this one may have started since.
    assert!(task["finished_at"].is_null(), "{task}");
    let again = daemon.request(send(4));
    assert_eq!(again["duplicate"], json!(true), "{again}");
    assert_eq!(again["task"]["task_id"], task_id, "{again}");
}

/// One round: a client enqueues up to 5,000 messages with message ids while agentd
/// is killed with SIGKILL once `threshold` are queued; after a restart every
/// acknowledged message is present exactly once, and re-sending one returns its
/// original task id.
fn storm_round(threshold: u64) {
    let args = echo_agent_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start(&args);
    let gate = daemon.gate("never");
    // A client sends as fast as it can from another thread; agentd is killed while
    // it does.
    let socket = daemon.socket.clone();
    let sender = std::thread::spawn(move || {
        let mut acked: Vec<(String, String, String)> = Vec::new();
        for i in 0..5000 {
            // 250 chats, so the per-chat cap (20) never drops what the storm sends.
            let session = format!("chat-{}", i % 250);
            let message_id = format!("evt-{i}");
            let body = json!({"id": 1, "cmd": "send", "session": session,
                "text": format!("hold {gate} {i}"), "message_id": message_id});
            match request_on(&socket, &body) {
                Some(r) if r["ok"] == json!(true) => acked.push((
                    session,
                    message_id,
                    r["result"]["task"]["task_id"].as_str().unwrap().to_string(),
                )),
                _ => break,
            }
        }
        acked
    });
    // One client waiting for each commit: slow on a loaded disk, hence the deadline.
    wait_for("some messages are acknowledged", 3 * DEADLINE, || {
        let status = daemon.try_request(json!({"cmd": "status"})).ok()?;
        (status["result"]["queued"].as_u64()? >= threshold).then_some(())
    });
    let orphans = kill9(&mut daemon);
    let _reaper = Reaper(orphans);
    let acked = sender.join().unwrap();
    assert!(acked.len() as u64 >= threshold);
    respawn(&mut daemon, &args, "agentd2.log");
    // Queued ones are back; the one that was running is interrupted (in the history).
    // A loaded machine may have queued many hundreds before the kill: paged.
    let list = daemon.all_tasks();
    let now = ids_of(&list);
    assert_eq!(
        now.iter()
            .filter(|(_, _, state)| state == "interrupted")
            .count(),
        1,
        "{list}"
    );
    for (_, _, id) in &acked {
        assert_eq!(
            now.iter().filter(|(_, t, _)| t == id).count(),
            1,
            "acknowledged task {id} is present exactly once"
        );
    }
    assert!(
        now.len() <= acked.len() + 1,
        "at most the one unacknowledged in flight"
    );
    // Re-delivered messages get their original task ids and do not run again.
    for (session, message_id, id) in acked.iter().step_by(17) {
        let reply = daemon.request(json!({"cmd": "send", "session": session,
            "text": "again", "message_id": message_id}));
        assert_eq!(reply["duplicate"], json!(true), "{reply}");
        assert_eq!(reply["task"]["task_id"], json!(id), "{reply}");
    }
}

fn request_on(socket: &std::path::Path, body: &Value) -> Option<Value> {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    let mut writer = stream.try_clone().ok()?;
    writeln!(writer, "{body}").ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}

#[test]
fn finished_tasks_are_queryable_after_a_restart() {
    let args = echo_agent_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start(&args);
    let id = daemon.submit("chat", "hello from before");
    let done = daemon.wait_state(&id, "succeeded");
    assert_eq!(done["result"], json!("hello from before"));
    // A clean stop this time.
    kill(daemon.pid(), libc::SIGTERM);
    daemon.child.wait().unwrap();
    respawn(&mut daemon, &args, "agentd2.log");
    let view = daemon.task(&id);
    assert_eq!(view["state"], json!("succeeded"), "{view}");
    assert_eq!(view["result"], json!("hello from before"), "{view}");
    let status = daemon.request(json!({"cmd": "status"}));
    assert_eq!(status["recovery"]["crashed"], json!(false), "{status}");
}

/// A finished task is shown after a restart as it was before: how a stop ended it
/// (the step, how long it took, the command's exit) is not lost, whether agentd
/// reads it from memory or from the store.
#[test]
fn a_stopped_tasks_ending_is_the_same_after_a_restart() {
    let mut daemon = Daemon::with_agent_exec(&["--cancel-grace", "2s"]);
    let id = daemon.submit("chat", "echo up; exec sleep 60");
    daemon.wait_progress(&id, "up");
    let stopped = daemon.request(json!({"cmd": "stop", "task_id": id}));
    let before = stopped["stopped"][0].clone();
    assert_eq!(before["state"], json!("cancelled"), "{stopped}");
    assert_eq!(
        before["exit"]["ended_by"],
        json!("cooperative_cancel"),
        "{before}"
    );
    assert_eq!(before["exit"]["command_signal"], json!(2), "{before}");
    let shown_before = stdout(&daemon.agentctl(&["status", &id]));
    kill(daemon.pid(), libc::SIGTERM);
    daemon.child.wait().unwrap();
    daemon.restart();
    assert_eq!(daemon.task(&id), before, "status after the restart");
    let listed = daemon.request(json!({"cmd": "tasks", "all": true}));
    let listed = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["task_id"] == json!(id))
        .cloned();
    assert_eq!(
        listed,
        Some(before.clone()),
        "tasks --all after the restart"
    );
    let shown_after = stdout(&daemon.agentctl(&["status", &id]));
    let exit_line = |shown: &str| {
        shown
            .lines()
            .find(|l| l.trim_start().starts_with("exit "))
            .map(str::to_string)
    };
    assert_eq!(
        exit_line(&shown_after),
        exit_line(&shown_before),
        "{shown_after}"
    );
}

#[test]
fn a_second_agentd_on_the_same_state_dir_exits_at_once() {
    let daemon = Daemon::start(&[]);
    let other_socket = daemon.dir.path().join("other.sock");
    let mut second: Child = Command::new(AGENTD)
        .arg("--socket")
        .arg(&other_socket)
        .arg("--state-dir")
        .arg(daemon.dir.path().join("state"))
        .env_remove("AGENTD_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for("the second agentd exits", DEADLINE, || {
        second.try_wait().unwrap()
    });
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(75), "{err}");
    assert!(
        err.contains("another agentd") && err.contains(&format!("pid {}", daemon.pid())),
        "{err}"
    );
    assert!(
        !other_socket.exists(),
        "the second agentd touched no socket"
    );
    // The first one is unharmed.
    daemon.request(json!({"cmd": "ping"}));
}

#[test]
fn a_corrupt_store_refuses_to_start_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let db = state.join("agentd.db");
    std::fs::write(&db, vec![0x42u8; 16384]).unwrap();
    let out = Command::new(AGENTD)
        .arg("--socket")
        .arg(dir.path().join("run/agentd.sock"))
        .arg("--state-dir")
        .arg(&state)
        .env_remove("AGENTD_SOCKET")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains(&db.display().to_string()), "{err}");
    assert!(err.contains("Move it aside"), "{err}");
    assert_eq!(
        std::fs::read(&db).unwrap(),
        vec![0x42u8; 16384],
        "left as it was"
    );
}

/// Every file and directory under `dir` with its permission bits.
fn modes_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        found.push((entry.path(), meta.permissions().mode() & 0o777));
        if meta.is_dir() {
            found.extend(modes_under(&entry.path()));
        }
    }
    found
}

/// The state dir is 0700 and everything agentd creates in it (the store and its
/// write-ahead log and shared-memory file, the lock, the tasks' output logs) is
/// 0600 whatever the umask; a store an older agentd left readable is made private.
#[test]
fn the_state_dir_and_every_file_in_it_are_created_private() {
    use std::os::unix::fs::PermissionsExt;
    let mut daemon = Daemon::with_agent_exec(&[]);
    let state = daemon.dir.path().join("state");
    let mode = std::fs::metadata(&state).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    let task = daemon.submit("alice", "echo some output");
    daemon.wait_state(&task, "succeeded");
    let private = |modes: &[(std::path::PathBuf, u32)]| {
        let open: Vec<_> = modes
            .iter()
            .filter(|(path, mode)| *mode != if path.is_dir() { 0o700 } else { 0o600 })
            .collect();
        let shown: Vec<String> = open
            .iter()
            .map(|(p, m)| format!("{} {m:o}", p.display()))
            .collect();
        assert!(open.is_empty(), "not private: {shown:?}");
    };
    let modes = modes_under(&state);
    let names: Vec<String> = modes
        .iter()
        .map(|(p, _)| p.strip_prefix(&state).unwrap().display().to_string())
        .collect();
    for name in [
        "agentd.db",
        "agentd.db-wal",
        "agentd.db-shm",
        "agentd.lock",
        "logs",
    ] {
        assert!(names.iter().any(|n| n == name), "no {name} in {names:?}");
    }
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("logs/") && n.ends_with(".log")),
        "{names:?}"
    );
    private(&modes);

    kill(daemon.pid(), libc::SIGKILL);
    let _ = daemon.child.wait();
    for name in ["agentd.db", "agentd.db-wal", "agentd.db-shm"] {
        let path = state.join(name);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    daemon.restart();
    private(&modes_under(&state));
}

#[test]
fn sigterm_interrupts_running_tasks_keeps_the_queue_and_it_runs_after_a_restart() {
    let mut args = echo_agent_args();
    args[3] = "2".into(); // --max-concurrent 2
    args.extend([
        "--cancel-grace".into(),
        "300ms".into(),
        "--term-grace".into(),
        "300ms".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start(&args);
    let gate = daemon.gate("never");
    let running: Vec<String> = (0..2)
        .map(|i| daemon.submit(&format!("busy-{i}"), &format!("hold {gate} {i}")))
        .collect();
    for id in &running {
        daemon.wait_state(id, "running");
    }
    let queued: Vec<String> = (0..10)
        .map(|i| daemon.submit(&format!("chat-{}", i % 3), &format!("queued {i}")))
        .collect();
    kill(daemon.pid(), libc::SIGTERM);
    let status = wait_for("agentd exits after SIGTERM", DEADLINE, || {
        daemon.child.try_wait().unwrap()
    });
    assert!(status.success(), "agentd exited with {status}");
    respawn(&mut daemon, &args, "agentd2.log");
    for id in &running {
        let view = daemon.task(id);
        assert_eq!(view["state"], json!("interrupted"), "{view}");
        assert_eq!(view["exit"]["reason"], json!("shutdown"), "{view}");
    }
    for id in &queued {
        daemon.wait_state(id, "succeeded");
    }
    let status = daemon.request(json!({"cmd": "status"}));
    assert_eq!(status["recovery"]["queued"], json!(10), "{status}");
    assert_eq!(status["recovery"]["crashed"], json!(false), "{status}");
}

/// A client watching a task that a shutdown stops hears how it ended before agentd
/// closes the connection, in the state the next agentd shows (`interrupted`), as a
/// bridge must tell its chat.
#[test]
fn a_watcher_hears_that_a_shutdown_interrupted_its_task() {
    let mut daemon = Daemon::with_agent_exec(&["--cancel-grace", "2s"]);
    let id = daemon.submit("chat", "echo up; exec sleep 60");
    daemon.wait_progress(&id, "up");
    let mut watch = Watch::session(&daemon, "chat");
    kill(daemon.pid(), libc::SIGTERM);
    let events = watch.until(|e| e["kind"] == json!("finished"));
    let finished = events.last().unwrap();
    assert_eq!(finished["task_id"], json!(id), "{finished}");
    assert_eq!(
        finished["task"]["state"],
        json!("interrupted"),
        "{finished}"
    );
    assert_eq!(
        finished["task"]["exit"]["ended_by"],
        json!("cooperative_cancel"),
        "{finished}"
    );
    assert_eq!(
        finished["task"]["exit"]["reason"],
        json!("shutdown"),
        "{finished}"
    );
    let status = wait_for("agentd exits after SIGTERM", DEADLINE, || {
        daemon.child.try_wait().unwrap()
    });
    assert!(status.success(), "agentd exited with {status}");
    daemon.restart();
    let view = daemon.task(&id);
    assert_eq!(view, finished["task"], "the same after the restart");
}

/// Runs `cmd` in agentd's mount namespace (as root).
fn in_namespace(pid: u32, cmd: &str) {
    let ok = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "sh", "-c", cmd])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("nsenter")
        .success();
    assert!(ok, "{cmd} failed in agentd's namespace");
}

#[test]
fn a_full_disk_refuses_new_work_loses_nothing_and_recovers_when_space_returns() {
    // The state dir is a 2 MiB tmpfs in agentd's own mount namespace.
    let can = nix::unistd::geteuid().is_root()
        && Command::new("unshare")
            .args(["--mount", "true"])
            .status()
            .is_ok_and(|s| s.success());
    if !can {
        eprintln!("skipped: needs root and unshare(1) for a private tmpfs");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let socket = dir.path().join("run").join("agentd.sock");
    let args = echo_agent_args();
    let log = std::fs::File::create(dir.path().join("agentd.log")).unwrap();
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o size=2m,mode=0700 tmpfs "$0" && exec "$@""#)
        .arg(&state)
        .arg(AGENTD)
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state)
        .args(&args)
        .args(["--max-queued", "100000"])
        .env_remove("AGENTD_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let daemon = Daemon {
        dir,
        socket,
        child,
        args: Vec::new(),
        env: Vec::new(),
    };
    wait_for("agentd answers a ping", DEADLINE, || {
        daemon.try_request(json!({"cmd": "ping"})).ok()
    });
    let gate = daemon.gate("never");
    let mut acked = vec![daemon.submit("chat", &format!("hold {gate} before"))];
    let fill = format!(
        "dd if=/dev/zero of={}/filler bs=4k 2>/dev/null; true",
        state.display()
    );
    in_namespace(daemon.pid(), &fill);
    let mut refused = 0;
    let mut n = 0;
    while refused == 0 {
        n += 1;
        assert!(n < 5000, "the full disk never refused a message");
        let text = format!("hold {gate} {n} {}", "x".repeat(500));
        let r = daemon
            .try_request(json!({"cmd": "send", "session": format!("chat-{}", n % 5), "text": text}))
            .unwrap();
        if r["ok"] == json!(true) {
            acked.push(r["result"]["task"]["task_id"].as_str().unwrap().to_string());
        } else {
            assert_eq!(r["error"]["code"], json!("store_failed"), "{r}");
            assert!(
                r["error"]["message"].as_str().unwrap().contains("full"),
                "{r}"
            );
            refused += 1;
        }
    }
    // Still refusing, still alive and answering.
    let r = daemon
        .try_request(
            json!({"cmd": "send", "session": "chat", "text": format!("hold {gate} again")}),
        )
        .unwrap();
    assert_eq!(r["error"]["code"], json!("store_failed"), "{r}");
    // A bridge's message refused now is not "seen": re-sent later, it is new work.
    let redelivered = json!({"cmd": "send", "session": "chat", "message_id": "evt-full",
        "text": format!("hold {gate} redelivered")});
    let r = daemon.try_request(redelivered.clone()).unwrap();
    assert_eq!(r["error"]["code"], json!("store_failed"), "{r}");
    // A duplicate pipelined right behind its original (still in flight) gets the
    // original's outcome, not an answer at once from the de-duplication window: the
    // original's record is not written, so neither is accepted. Also when the
    // original's task is stopped before its commit comes back.
    for (round, stop_between) in [(0, false), (1, true)] {
        let mut send = json!({"cmd": "send", "session": "chat-dup",
            "message_id": format!("evt-dup-{round}"), "text": format!("hold {gate} dup")});
        send["id"] = json!(1);
        let mut requests = vec![send.clone()];
        if stop_between {
            requests.push(json!({"id": 2, "cmd": "stop", "session": "chat-dup", "wait": false}));
        }
        send["id"] = json!(3);
        requests.push(send);
        let answers = crate::status::exchange(&daemon, requests);
        if stop_between {
            // The original's task ended before its commit came back.
            let stop = crate::status::answer_to(&answers, 2);
            assert_eq!(
                stop["result"]["stopped"][0]["state"],
                json!("cancelled"),
                "{stop}"
            );
        }
        for id in [1, 3] {
            let r = crate::status::answer_to(&answers, id);
            assert_eq!(
                r["error"]["code"],
                json!("store_failed"),
                "round {round}: {r}"
            );
        }
    }
    // Queue settings the store cannot save are not answered as saved.
    let r = daemon
        .try_request(json!({"cmd": "queue", "session": "chat-q", "debounce_ms": 1234}))
        .unwrap();
    assert_eq!(r["error"]["code"], json!("store_failed"), "{r}");
    daemon.request(json!({"cmd": "status"}));
    // Space returns: work is accepted again, without a restart.
    in_namespace(daemon.pid(), &format!("rm {}/filler", state.display()));
    let after = wait_for("work is accepted again", DEADLINE, || {
        let r = daemon
            .try_request(
                json!({"cmd": "send", "session": "chat", "text": format!("hold {gate} after")}),
            )
            .ok()?;
        (r["ok"] == json!(true))
            .then(|| r["result"]["task"]["task_id"].as_str().unwrap().to_string())
    });
    acked.push(after);
    let again = daemon.request(redelivered);
    assert_ne!(again["duplicate"], json!(true), "{again}");
    assert_eq!(again["task"]["state"], json!("queued"), "{again}");
    acked.push(again["task"]["task_id"].as_str().unwrap().to_string());
    // Everything acknowledged is there; nothing refused is.
    let list = daemon.request(json!({"cmd": "tasks"}));
    let mut now: Vec<String> = ids_of(&list).into_iter().map(|(_, id, _)| id).collect();
    now.sort();
    acked.sort();
    assert_eq!(now, acked);
}

#[test]
fn agentctl_log_prints_a_tasks_whole_output_also_after_a_restart() {
    let args = ["--agent", &format!("{AGENT_EXEC} -- sh -c {{text}}")].map(String::from);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start(&args);
    let id = daemon.submit(
        "chat",
        "for i in 1 2 3; do echo line $i; done; echo oops >&2",
    );
    daemon.wait_state(&id, "succeeded");
    let expected_lines = ["line 1", "line 2", "line 3", "oops"];
    let printed = wait_for("the log has every line", DEADLINE, || {
        let out = daemon.agentctl(&["log", &id]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        expected_lines
            .iter()
            .all(|l| text.lines().any(|x| x == *l))
            .then_some(text)
    });
    kill(daemon.pid(), libc::SIGTERM);
    daemon.child.wait().unwrap();
    respawn(&mut daemon, &args, "agentd2.log");
    let out = daemon.agentctl(&["log", &id[..8]]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), printed, "the same log after a restart");
    let out = daemon.agentctl(&["log", "0000aaaa-0000-0000-0000-000000000000"]);
    assert!(
        !out.status.success(),
        "a task that never existed has no log"
    );
}

#[test]
fn a_tasks_log_is_capped_with_a_truncation_marker() {
    let agent = format!("{AGENT_EXEC} -- sh -c {{text}}");
    let daemon = Daemon::start(&["--agent", &agent, "--log-cap", "200"]);
    let id = daemon.submit(
        "chat",
        "i=0; while [ $i -lt 100 ]; do echo line-$i; i=$((i+1)); done",
    );
    daemon.wait_state(&id, "succeeded");
    let text = wait_for("the log is complete", DEADLINE, || {
        let out = daemon.agentctl(&["log", &id]);
        let text = stdout(&out);
        text.contains("more bytes of output were not kept")
            .then_some(text)
    });
    let (kept, rest) = text
        .split_once("\n[agentd: output truncated: this log keeps the first 200 bytes]\n")
        .expect("one truncation marker");
    assert_eq!(kept.len(), 200, "{text}");
    assert!(kept.starts_with("line-0\nline-1\n"), "{text}");
    assert!(!rest.contains("line-99"), "{text}");
}

#[test]
fn agentctl_log_follow_prints_a_running_task_from_its_first_line_until_it_ends() {
    let agent = format!("{AGENT_EXEC} -- sh -c {{text}}");
    let daemon = Daemon::start(&["--agent", &agent]);
    let gate = daemon.gate("go");
    let id = daemon.submit(
        "chat",
        &format!("echo first; while [ ! -e {gate} ]; do sleep 0.02; done; echo second"),
    );
    daemon.wait_progress(&id, "first");
    let mut follow = Command::new(AGENTCTL)
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["log", "-f", &id])
        .env_remove("AGENTD_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(follow.stdout.take().unwrap()));
    assert_eq!(lines.next().unwrap().unwrap(), "first");
    daemon.release(&gate);
    assert_eq!(lines.next().unwrap().unwrap(), "second");
    assert!(lines.next().is_none(), "ends with the task");
    let status = wait_for("agentctl log -f exits", DEADLINE, || {
        follow.try_wait().unwrap()
    });
    assert!(status.success());
}

#[test]
fn a_leftover_agent_that_outlived_a_killed_agentd_is_ended_at_restart() {
    let agent = format!("{TEST_AGENT} {{text}}");
    // In a task cgroup the guardian would end the agent with agentd: the process-tree
    // fallback is where an agent outlives agentd and only its stored identity finds it.
    let args = ["--agent", agent.as_str(), "--no-cgroup"];
    let mut daemon = Daemon::start(&args);
    let pidfile = daemon.dir.path().join("pids");
    // Ignores SIGTERM (so its parent-death signal too) and never reads its channel.
    let id = daemon.submit(
        "chat",
        &format!("hang ignore-term children:2 pidfile:{}", pidfile.display()),
    );
    let view = daemon.wait_state(&id, "running");
    let agent_pid = view["pid"].as_u64().unwrap() as u32;
    let children = wait_pids(&pidfile, 2);
    let orphans = kill9(&mut daemon);
    let _reaper = Reaper(orphans);
    assert!(
        alive(agent_pid),
        "the agent outlives agentd (that is the point)"
    );
    respawn(&mut daemon, &args, "agentd2.log");
    let status = daemon.request(json!({"cmd": "status"}));
    assert_eq!(status["recovery"]["killed"], json!(1), "{status}");
    assert_eq!(daemon.task(&id)["state"], json!("interrupted"));
    wait_for("the old agent and its children are gone", DEADLINE, || {
        (!alive(agent_pid) && children.iter().all(|p| !alive(*p))).then_some(())
    });
}

#[test]
fn a_finished_task_older_than_the_in_memory_history_is_read_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agentd.toml");
    std::fs::write(&config, "history = 1\n").unwrap();
    let agent = format!("{AGENT_EXEC} -- sh -c {{text}}");
    let daemon = Daemon::start(&["--agent", &agent, "--config", config.to_str().unwrap()]);
    let ids: Vec<String> = (0..3)
        .map(|i| {
            let id = daemon.submit("chat", &format!("echo result-{i}"));
            daemon.wait_state(&id, "succeeded");
            id
        })
        .collect();
    let listed = daemon.request(json!({"cmd": "tasks", "all": true}));
    assert_eq!(
        listed.as_array().unwrap().len(),
        3,
        "memory holds one, the store all: {listed}"
    );
    let oldest = daemon.task(&ids[0][..13]);
    assert_eq!(oldest["task_id"], json!(ids[0]), "{oldest}");
    assert_eq!(oldest["state"], json!("succeeded"), "{oldest}");
    assert_eq!(oldest["result"], json!("result-0"), "{oldest}");
}

#[test]
fn a_redelivered_message_of_a_task_that_finished_before_a_restart_is_not_run_again() {
    let agent = format!("{AGENT_EXEC} -- sh -c {{text}}");
    let args = ["--agent", agent.as_str()];
    let mut daemon = Daemon::start(&args);
    let marks = daemon.dir.path().join("runs");
    let text = format!("echo ran >> {}", marks.display());
    let first = daemon
        .request(json!({"cmd": "send", "session": "chat", "text": text, "message_id": "evt-1"}));
    let id = first["task"]["task_id"].as_str().unwrap().to_string();
    daemon.wait_state(&id, "succeeded");
    kill(daemon.pid(), libc::SIGTERM);
    daemon.child.wait().unwrap();
    respawn(&mut daemon, &args, "agentd2.log");
    let again = daemon
        .request(json!({"cmd": "send", "session": "chat", "text": text, "message_id": "evt-1"}));
    assert_eq!(again["duplicate"], json!(true), "{again}");
    assert_eq!(again["task"]["task_id"], json!(id), "{again}");
    assert_eq!(again["task"]["state"], json!("succeeded"), "{again}");
    // Give a wrongly started run every chance to show up before looking.
    daemon.request(json!({"cmd": "stop", "all": true}));
    assert_eq!(
        std::fs::read_to_string(&marks).unwrap(),
        "ran\n",
        "it ran once"
    );
    let all = daemon.request(json!({"cmd": "tasks", "all": true}));
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
}

#[test]
fn a_redelivered_message_that_left_the_de_duplication_window_is_still_a_duplicate() {
    let daemon = Daemon::with_echo_agent(&[
        "--max-concurrent",
        "1",
        "--max-queued",
        "20000",
        "--cap",
        "1000",
    ]);
    let send = |id: u64, session: &str, message_id: &str, text: &str| {
        json!({"id": id, "cmd": "send", "session": session, "message_id": message_id,
            "text": text})
    };
    let first = daemon.request(send(1, "chat", "evt-first", "first"));
    let first_id = first["task"]["task_id"].as_str().unwrap().to_string();
    daemon.wait_state(&first_id, "succeeded");
    let gate = daemon.gate("never");
    let hold = daemon.submit("hold", &format!("hold {gate} slot"));
    daemon.wait_state(&hold, "running");
    // As many other message ids as the window holds (10,000): the first leaves it.
    let answers = crate::status::exchange(
        &daemon,
        (0..10_000u64)
            .map(|i| {
                send(
                    i,
                    &format!("chat-{}", i % 20),
                    &format!("evt-{i}"),
                    &format!("hold {gate} {i}"),
                )
            })
            .collect(),
    );
    assert!(
        answers.iter().all(|a| a["ok"] == json!(true)),
        "{:?}",
        answers.iter().find(|a| a["ok"] != json!(true))
    );
    // Re-delivered, it is answered from the store with its finished task.
    let again = daemon.request(send(2, "chat", "evt-first", "first"));
    assert_eq!(again["duplicate"], json!(true), "{again}");
    assert_eq!(again["task"]["task_id"], json!(first_id), "{again}");
    assert_eq!(again["task"]["state"], json!("succeeded"), "{again}");
    // And a new message id past the window is new work.
    let new = daemon.request(send(3, "chat", "evt-new", &format!("hold {gate} new")));
    assert_ne!(new["duplicate"], json!(true), "{new}");
}

#[test]
fn retention_prunes_old_finished_tasks_and_their_logs() {
    let agent = format!("{AGENT_EXEC} -- sh -c {{text}}");
    let args = ["--agent", agent.as_str(), "--retention-count", "2"];
    let mut daemon = Daemon::start(&args);
    let ids: Vec<String> = (0..4)
        .map(|i| {
            let id = daemon.submit("chat", &format!("echo output-{i}"));
            daemon.wait_state(&id, "succeeded");
            id
        })
        .collect();
    let log = daemon
        .dir
        .path()
        .join("state/logs")
        .join(format!("{}.log", ids[0]));
    wait_for("the first task's log is written", DEADLINE, || {
        log.exists().then_some(())
    });
    kill(daemon.pid(), libc::SIGTERM);
    daemon.child.wait().unwrap();
    // The store prunes when it opens.
    respawn(&mut daemon, &args, "agentd2.log");
    let gone = daemon
        .try_request(json!({"cmd": "status", "task_id": ids[0]}))
        .unwrap();
    assert_eq!(gone["error"]["code"], json!("not_found"), "{gone}");
    assert!(!log.exists(), "its log went with it");
    for id in &ids[2..] {
        assert_eq!(daemon.task(id)["state"], json!("succeeded"));
    }
}

#[test]
fn a_refused_steer_becomes_a_durable_follow_up() {
    let agent = format!("{TEST_AGENT} {{text}}");
    let args = ["--agent", agent.as_str(), "--debounce", "0ms"];
    let mut daemon = Daemon::start(&args);
    daemon.send("chat", "/queue steer");
    // The agent offers steering but refuses every steer: the message comes back.
    let id = daemon.submit("chat", "refuse-steer sleep:60000");
    daemon.wait_state(&id, "running");
    let steered = daemon.send("chat", "result:also-this");
    assert_eq!(steered["task"]["state"], json!("merged"), "{steered}");
    wait_for(
        "the refused steer is queued as a follow-up",
        DEADLINE,
        || {
            let list = daemon.request(json!({"cmd": "tasks"}));
            list.as_array()
                .unwrap()
                .iter()
                .any(|t| t["text"] == json!("result:also-this") && t["state"] == json!("queued"))
                .then_some(())
        },
    );
    let orphans = kill9(&mut daemon);
    let _reaper = Reaper(orphans);
    respawn(&mut daemon, &args, "agentd2.log");
    // Back in the queue, it runs (no task is running now) and succeeds.
    let list = daemon.request(json!({"cmd": "tasks", "all": true}));
    let follow_up = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["text"] == json!("result:also-this") && t["state"] != json!("merged"))
        .unwrap_or_else(|| panic!("the follow-up survived: {list}"))
        .clone();
    let view = daemon.wait_state(follow_up["task_id"].as_str().unwrap(), "succeeded");
    assert_eq!(view["result"], json!("also-this"), "{view}");
}

/// Waits until the task's output log holds `needle` (progress lines go to the log,
/// so a line that was replaced by a later one is still found).
fn wait_log(daemon: &Daemon, task_id: &str, needle: &str) -> String {
    wait_for(
        &format!("task {task_id}'s log holds {needle:?}"),
        DEADLINE,
        || {
            let chunk = daemon.request(json!({"cmd": "log", "task_id": task_id}));
            let data = chunk["data"].as_str().unwrap_or_default().to_string();
            data.contains(needle).then_some(data)
        },
    )
}

#[test]
fn agentctl_resume_runs_an_interrupted_task_again_with_its_last_checkpoint() {
    let agent = format!("{TEST_AGENT} {{text}}");
    let args = ["--agent", agent.as_str()];
    let mut daemon = Daemon::start(&args);
    let old = daemon.submit("chat", "checkpoint:step-2 sleep:60000");
    daemon.wait_progress(&old, "checkpoint: step-2");
    // The checkpoint came before that progress line and went to the writer then; a
    // send is answered only once its record is committed, by the same writer after
    // it: once this answer is in, the checkpoint is on disk too.
    daemon.submit("fence", "result:fenced");
    let orphans = kill9(&mut daemon);
    let _reaper = Reaper(orphans);
    respawn(&mut daemon, &args, "agentd2.log");
    daemon.wait_state(&old, "interrupted");

    let reply = daemon.agentctl_json(&["resume", &old[..13]]);
    let attempt = reply["task"]["task_id"].as_str().unwrap().to_string();
    assert_ne!(attempt, old, "{reply}");
    assert_eq!(reply["accepted"], json!(true), "{reply}");
    assert!(
        reply["reply"]
            .as_str()
            .unwrap()
            .contains(&format!("resuming task {old} from its last checkpoint")),
        "{reply}"
    );
    // Its agent was told, before its Start, which task it resumes and from where.
    wait_log(&daemon, &attempt, &format!("resumed: {old} step-2"));
    let view = daemon.task(&attempt);
    assert_eq!(view["session"], json!("chat"));
    assert_eq!(view["text"], json!("checkpoint:step-2 sleep:60000"));

    // One attempt at a time; a running task is not resumable.
    let again = daemon
        .try_request(json!({"cmd": "resume", "task_id": old}))
        .unwrap();
    assert_eq!(again["error"]["code"], json!("bad_request"), "{again}");
    assert!(
        again["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&attempt),
        "{again}"
    );
    let live = daemon
        .try_request(json!({"cmd": "resume", "task_id": attempt}))
        .unwrap();
    assert_eq!(live["error"]["code"], json!("bad_request"), "{live}");
    daemon.agentctl_json(&["stop", &attempt]);
}

#[test]
fn a_chats_resume_reruns_its_latest_stopped_task_from_its_checkpoint() {
    let daemon = Daemon::with_test_agent(&[]);
    let done = daemon.submit("alice", "result:fine");
    daemon.wait_state(&done, "succeeded");
    let refused = daemon
        .try_request(json!({"cmd": "send", "session": "alice", "text": "/resume"}))
        .unwrap();
    assert_eq!(refused["error"]["code"], json!("not_found"), "{refused}");
    let not_resumable = daemon
        .try_request(json!({"cmd": "resume", "task_id": done}))
        .unwrap();
    assert_eq!(
        not_resumable["error"]["code"],
        json!("bad_request"),
        "{not_resumable}"
    );

    let old = daemon.submit("alice", "checkpoint:half-way sleep:60000");
    daemon.wait_progress(&old, "checkpoint: half-way");
    daemon.agentctl_json(&["stop", &old]);
    daemon.wait_state(&old, "cancelled");
    // Another chat may not resume alice's task.
    let other = daemon
        .try_request(json!({"cmd": "send", "session": "bob", "text": format!("/resume {old}")}))
        .unwrap();
    assert_eq!(other["error"]["code"], json!("forbidden"), "{other}");

    let reply = daemon.send("alice", "/resume");
    let attempt = reply["task"]["task_id"].as_str().unwrap().to_string();
    wait_log(&daemon, &attempt, &format!("resumed: {old} half-way"));
    daemon.agentctl_json(&["stop", &attempt]);
    daemon.wait_state(&attempt, "cancelled");
    // The attempt saved its own checkpoint (the same text does it again); resumed
    // in turn, it is linked to the attempt.
    let reply = daemon.send("alice", &format!("/resume {attempt}"));
    let third = reply["task"]["task_id"].as_str().unwrap().to_string();
    wait_log(&daemon, &third, &format!("resumed: {attempt} half-way"));
    daemon.agentctl_json(&["stop", &third]);
}

#[test]
fn a_checkpoint_over_1_mib_is_a_protocol_error_and_the_task_fails_saying_so() {
    let daemon = Daemon::with_test_agent(&[]);
    let id = daemon.submit("chat", "huge-checkpoint");
    let view = daemon.wait_state(&id, "failed");
    let error = view["exit"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("checkpoint of 1048577 bytes"), "{view}");
    // agentd goes on.
    let next = daemon.submit("chat", "result:fine");
    daemon.wait_state(&next, "succeeded");
}

#[test]
fn agent_exec_hands_a_resumed_command_the_checkpoint_its_first_attempt_saved() {
    let agent = format!("{AGENT_EXEC} --checkpoints -- sh -c {{text}}");
    let daemon = Daemon::start(&["--agent", agent.as_str()]);
    // The first attempt saves a checkpoint on fd 3 and fails; a resumed one prints
    // what agent-exec handed it.
    let script = r#"if [ -n "$AGENTD_RESUMING" ]; then echo "resumed from $AGENTD_PREVIOUS_TASK_ID: $AGENTD_CHECKPOINT / $(cat "$AGENTD_CHECKPOINT_FILE")"; else echo step-7 >&3; exit 1; fi"#;
    let old = daemon.submit("chat", script);
    daemon.wait_state(&old, "failed");
    let reply = daemon.agentctl_json(&["resume", &old]);
    let attempt = reply["task"]["task_id"].as_str().unwrap().to_string();
    let view = daemon.wait_state(&attempt, "succeeded");
    assert_eq!(
        view["result"].as_str().map(str::trim),
        Some(format!("resumed from {old}: step-7 / step-7").as_str()),
        "{view}"
    );
}
