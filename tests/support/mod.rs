//! Test harness: a real `agentd` per test, in its own temp dir with its own socket,
//! driven through the real `agentctl` binary or raw control-socket requests.
//!
//! [`Daemon`]'s `Drop` kills, by pid, every descendant of its agentd (agents, their
//! tools, and orphans that came back to agentd as its subreaper) and then agentd.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const AGENTD: &str = env!("CARGO_BIN_EXE_agentd");
pub const AGENTCTL: &str = env!("CARGO_BIN_EXE_agentctl");
pub const AGENT_EXEC: &str = env!("CARGO_BIN_EXE_agent-exec");
pub const TEST_AGENT: &str = env!("CARGO_BIN_EXE_agentd-test-agent");

/// Generous deadline for conditions that normally hold within milliseconds.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `cond` every 20 ms until it returns `Some`, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = cond() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running agentd owned by one test.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub child: Child,
    /// The flags it was started with (for [`Daemon::restart`]).
    pub args: Vec<String>,
    /// The environment changes it was started with (kept for a restart).
    pub env: Vec<(String, Option<String>)>,
}

impl Daemon {
    /// Starts agentd with `args` (plus `--socket` and `--state-dir` in a fresh temp dir)
    /// and waits until it answers a ping.
    pub fn start(args: &[&str]) -> Daemon {
        Daemon::start_in(tempfile::tempdir().expect("temp dir"), args, &[])
    }

    /// Like [`Daemon::start`], in `dir` (which may hold files the test put there),
    /// with `env` set (`None` removes a variable). By default `AGENTD_LOG=debug`, and
    /// `XDG_CONFIG_HOME` is `dir/config`, so a user's own config file never applies.
    pub fn start_in(dir: tempfile::TempDir, args: &[&str], env: &[(&str, Option<&str>)]) -> Daemon {
        let socket = dir.path().join("run").join("agentd.sock");
        let env: Vec<(String, Option<String>)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
            .collect();
        let child = spawn_agentd(dir.path(), &socket, args, &env);
        let mut daemon = Daemon {
            dir,
            socket,
            child,
            args: args.iter().map(|a| a.to_string()).collect(),
            env,
        };
        daemon.wait_ready();
        daemon
    }

    /// Starts a new agentd on the same socket, state dir and flags, after the previous
    /// one ended (however it ended); its log is appended to the same file.
    pub fn restart(&mut self) {
        self.respawn();
        self.wait_ready();
    }

    /// Like [`Daemon::restart`], but returns as soon as the new agentd is spawned,
    /// without waiting for its first answer (to act while it starts up).
    pub fn respawn(&mut self) {
        let _ = self.child.wait();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.child = spawn_agentd(self.dir.path(), &self.socket, &args, &self.env);
    }

    fn wait_ready(&mut self) {
        wait_for("agentd answers a ping", DEADLINE, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("agentd exited early with {status}:\n{}", self.log());
            }
            self.try_request(json!({"cmd": "ping"})).ok()
        });
    }

    /// agentd whose agent is the misbehaving test agent, given its words as the task text.
    pub fn with_test_agent(extra: &[&str]) -> Daemon {
        let agent = format!("{TEST_AGENT} {{text}}");
        let mut args = vec!["--agent", agent.as_str()];
        args.extend_from_slice(extra);
        Daemon::start(&args)
    }

    /// agentd with agent-exec running `sh -c {text}`.
    pub fn with_agent_exec(extra: &[&str]) -> Daemon {
        let agent = format!("{AGENT_EXEC} -- sh -c {{text}}");
        let mut args = vec!["--agent", agent.as_str()];
        args.extend_from_slice(extra);
        Daemon::start(&args)
    }

    /// agentd whose agent answers every task with its own text (the result is the
    /// text as the agent received it). A text starting with `hold PATH` waits until
    /// PATH exists first; [`Daemon::release`] creates it.
    pub fn with_echo_agent(extra: &[&str]) -> Daemon {
        let script = r#"case "$1" in hold\ *) f=${1#hold }; f=${f%% *}; while [ ! -e "$f" ]; do sleep 0.02; done;; esac; printf %s "$1""#;
        let agent = format!("{AGENT_EXEC} -- sh -c '{script}' echo-agent {{text}}");
        let mut args = vec!["--agent", agent.as_str()];
        args.extend_from_slice(extra);
        Daemon::start(&args)
    }

    /// agentd whose agent, like an LLM agent, takes collected prompts (a v1 agent:
    /// `agentd-test-agent --echo`) and answers every task with its text as received.
    /// A text starting with `hold PATH` waits until PATH exists first.
    pub fn with_collecting_echo_agent(extra: &[&str]) -> Daemon {
        let agent = format!("{TEST_AGENT} --echo");
        let mut args = vec!["--agent", agent.as_str()];
        args.extend_from_slice(extra);
        Daemon::start(&args)
    }

    /// agentd whose agent program was removed after agentd started (it refuses to
    /// start without one): every task's spawn fails.
    pub fn with_removed_agent() -> Daemon {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let program = dir.path().join("removed-agent");
        std::fs::write(&program, "#!/bin/sh\nexit 1\n").expect("agent program");
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        let agent = format!("{} {{text}}", program.display());
        let daemon = Daemon::start_in(dir, &["--agent", agent.as_str()], &[]);
        std::fs::remove_file(&program).expect("remove the agent program");
        daemon
    }

    /// A path under this daemon's temp dir that a `hold PATH` task waits for.
    pub fn gate(&self, name: &str) -> String {
        self.dir
            .path()
            .join(format!("gate-{name}"))
            .display()
            .to_string()
    }

    /// Opens the gate: tasks holding on it finish.
    pub fn release(&self, gate: &str) {
        std::fs::write(gate, "").expect("open the gate");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agentd.log")).unwrap_or_default()
    }

    /// Runs agentctl against this daemon.
    pub fn agentctl(&self, args: &[&str]) -> Output {
        Command::new(AGENTCTL)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_remove("AGENTD_SOCKET")
            .stdin(Stdio::null())
            .output()
            .expect("run agentctl")
    }

    /// Runs `agentctl --json ARGS`, asserts success, parses stdout.
    pub fn agentctl_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.agentctl(&all);
        assert!(
            out.status.success(),
            "agentctl {args:?} failed: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "agentctl {args:?} printed invalid JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Sends one request (an `id` is added) on a fresh connection; returns the response.
    pub fn try_request(&self, mut body: Value) -> std::io::Result<Value> {
        body["id"] = json!(1);
        let stream = UnixStream::connect(&self.socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut writer = stream.try_clone()?;
        writeln!(writer, "{body}")?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        serde_json::from_str(&line).map_err(std::io::Error::other)
    }

    /// Like [`Daemon::try_request`] but asserts `ok` and returns the result.
    pub fn request(&self, body: Value) -> Value {
        let response = self.try_request(body.clone()).expect("control request");
        assert_eq!(
            response["ok"],
            json!(true),
            "request {body} failed: {response}"
        );
        response["result"].clone()
    }

    /// Every task, finished ones too (`tasks --all`), a page at a time: one answer
    /// cannot hold many hundreds.
    pub fn all_tasks(&self) -> Value {
        let mut all = Vec::new();
        let mut cursor = Value::Null;
        loop {
            let mut request = json!({"cmd": "tasks", "all": true, "limit": 200});
            if !cursor.is_null() {
                request["cursor"] = cursor;
            }
            let page = self.request(request);
            all.extend(
                page["tasks"]
                    .as_array()
                    .expect("a page of tasks")
                    .iter()
                    .cloned(),
            );
            cursor = page.get("next_cursor").cloned().unwrap_or(Value::Null);
            if cursor.is_null() {
                return Value::Array(all);
            }
        }
    }

    /// Sends a chat message; returns the `SendReply`.
    pub fn send(&self, session: &str, text: &str) -> Value {
        self.request(json!({"cmd": "send", "session": session, "text": text}))
    }

    /// Sends work and returns its task id.
    pub fn submit(&self, session: &str, text: &str) -> String {
        let reply = self.send(session, text);
        assert_eq!(reply["accepted"], json!(true), "not accepted: {reply}");
        reply["task"]["task_id"]
            .as_str()
            .expect("task id")
            .to_string()
    }

    pub fn task(&self, task_id: &str) -> Value {
        self.request(json!({"cmd": "status", "task_id": task_id}))
    }

    /// Waits until the task is in `state`; returns its view.
    pub fn wait_state(&self, task_id: &str, state: &str) -> Value {
        self.wait_state_within(task_id, state, DEADLINE)
    }

    /// [`Daemon::wait_state`] for a task whose work takes time in proportion to the
    /// machine's speed (a flood of output), with its own `timeout`.
    pub fn wait_state_within(&self, task_id: &str, state: &str, timeout: Duration) -> Value {
        let mut last = Value::Null;
        let deadline = Instant::now() + timeout;
        loop {
            let view = self.task(task_id);
            if view["state"] == json!(state) {
                return view;
            }
            let terminal = [
                "succeeded",
                "failed",
                "cancelled",
                "interrupted",
                "expired",
                "dropped",
                "merged",
            ];
            if view["state"]
                .as_str()
                .is_some_and(|s| terminal.contains(&s))
                && view["state"] != last["state"]
            {
                // A terminal state never changes: fail now with the details.
                panic!(
                    "task {task_id} ended {} while waiting for {state}: {view}\n{}",
                    view["state"],
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "task {task_id} never reached {state}; last: {view}\n{}",
                self.log()
            );
            last = view;
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the task's agent reported progress containing `needle`: as its
    /// latest progress, or as an earlier line of its log (where agentd appends every
    /// progress line). A line the agent follows at once with others (ticks every
    /// 100 ms, the next step) is seldom the latest when a loaded machine polls.
    /// Returns the task's view.
    pub fn wait_progress(&self, task_id: &str, needle: &str) -> Value {
        wait_for(
            &format!("task {task_id} reports progress {needle:?}"),
            DEADLINE,
            || {
                let view = self.task(task_id);
                if view["progress"]
                    .as_str()
                    .is_some_and(|p| p.contains(needle))
                {
                    return Some(view);
                }
                // (No log yet is an error answer: not yet, then.)
                let log = self
                    .try_request(json!({"cmd": "log", "task_id": task_id}))
                    .ok()?;
                log["result"]["data"]
                    .as_str()
                    .is_some_and(|d| d.contains(needle))
                    .then_some(view)
            },
        )
    }

    /// Every live descendant of agentd (agents, their tools, adopted orphans), but
    /// not its cgroup guardian.
    pub fn descendants(&self) -> Vec<u32> {
        let guardian = self.guardian();
        descendants_of(self.pid())
            .into_iter()
            .filter(|pid| Some(*pid) != guardian)
            .collect()
    }

    /// Asserts that agentd has no descendant left (agents, tools, orphans).
    pub fn assert_nothing_left(&self) {
        let left = self.descendants();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    /// Live direct children of agentd that are agents (the live-agent count): not its
    /// cgroup guardian.
    pub fn live_children(&self) -> Vec<u32> {
        let table = process_table();
        let guardian = self.guardian();
        table
            .iter()
            .filter(|(pid, p)| p.ppid == self.pid() && !p.zombie && Some(**pid) != guardian)
            .map(|(pid, _)| *pid)
            .collect()
    }

    /// agentd's cgroup guardian (`sh -c … agentd-guardian DIR`), when cgroups are in
    /// use: it outlives agentd on purpose.
    pub fn guardian(&self) -> Option<u32> {
        process_table()
            .iter()
            .filter(|(_, p)| p.ppid == self.pid() && !p.zombie)
            .map(|(pid, _)| *pid)
            .find(|pid| is_guardian(*pid))
    }

    /// Whether agentd put tasks in cgroups (from `status --json`).
    pub fn uses_cgroups(&self) -> bool {
        let status = self.request(json!({"cmd": "status"}));
        status["containment"]["kind"] == "cgroup"
    }

    /// agentd's instance cgroup (its task cgroups' parent) and its guardian's cgroup
    /// beside it, when cgroups are in use (from `status`).
    pub fn cgroup_dirs(&self) -> Option<(PathBuf, PathBuf)> {
        let status = self.request(json!({"cmd": "status"}));
        let root = PathBuf::from(status["containment"]["cgroup"].as_str()?);
        let name = root.file_name()?.to_string_lossy().into_owned();
        let guardian = root.with_file_name(format!("{name}.guardian"));
        Some((root, guardian))
    }
}

/// Whether `pid` is an agentd cgroup guardian.
pub fn is_guardian(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == b"agentd-guardian"))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // The guardian is left alone: when agentd dies it empties and removes the
        // task cgroups, then exits.
        for _ in 0..5 {
            let pids = self.descendants();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                kill(pid, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns agentd with its socket and state dir under `dir`, logging to
/// `dir/agentd.log` (appended).
fn spawn_agentd(
    dir: &Path,
    socket: &Path,
    args: &[&str],
    env: &[(String, Option<String>)],
) -> Child {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(dir.join("agentd.log"))
        .expect("log file");
    let mut command = Command::new(AGENTD);
    command
        .arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(args)
        .env("AGENTD_LOG", "debug")
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env_remove("AGENTD_CONFIG")
        .env_remove("AGENTD_SOCKET")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    for (key, value) in env {
        match value {
            Some(value) => command.env(key, value),
            None => command.env_remove(key),
        };
    }
    command.spawn().expect("spawn agentd")
}

pub fn kill(pid: u32, signal: i32) {
    // SAFETY: plain kill(2) on a pid this test started (or found under its daemon).
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ProcInfo {
    pub ppid: u32,
    pub zombie: bool,
}

pub fn process_table() -> HashMap<u32, ProcInfo> {
    let mut table = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let mut fields = stat[close + 1..].split_whitespace();
        let state = fields.next().unwrap_or("");
        let ppid = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        table.insert(
            pid,
            ProcInfo {
                ppid,
                zombie: is_zombie(pid, state),
            },
        );
    }
    table
}

pub fn descendants_of(root: u32) -> Vec<u32> {
    let table = process_table();
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        for (child, info) in &table {
            if info.ppid == pid && !info.zombie {
                out.push(*child);
                stack.push(*child);
            }
        }
    }
    out
}

/// True if the pid exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    process_table().get(&pid).is_some_and(|p| !p.zombie)
}

/// A process named for good: its pid and its start time (field 22 of
/// `/proc/PID/stat`, clock ticks after boot), so that a pid reused by another
/// process after this one was reaped is never taken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub pid: u32,
    pub start: u64,
}

/// Whether the process at `pid`, whose `/proc/PID/stat` shows `state`, is a zombie:
/// its stat shows its thread group leader's state, and a leader that exited
/// (`pthread_exit`) is a zombie while the other threads run on; so only a process none
/// of whose threads runs is one.
pub fn is_zombie(pid: u32, state: &str) -> bool {
    if state != "Z" && state != "X" {
        return false;
    }
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"));
    !threads.into_iter().flatten().flatten().any(|thread| {
        std::fs::read_to_string(thread.path().join("stat")).is_ok_and(|stat| {
            let state = stat
                .rfind(')')
                .and_then(|close| stat[close + 1..].split_whitespace().next());
            state.is_some_and(|s| s != "Z" && s != "X")
        })
    })
}

/// `/proc/PID/stat`'s state letter and start time, if the process exists.
fn state_and_start(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.to_string();
    // Field 22 of stat, the 20th after the command name.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

impl Identity {
    /// The identity of the process now at `pid`, if there is one.
    pub fn of(pid: u32) -> Option<Identity> {
        state_and_start(pid).map(|(_, start)| Identity { pid, start })
    }

    /// This very process still exists and is not a zombie: it has not finished
    /// exiting (a process being killed stays "running" until its memory is freed and
    /// its files are closed).
    pub fn running(&self) -> bool {
        state_and_start(self.pid)
            .is_some_and(|(state, start)| start == self.start && !is_zombie(self.pid, &state))
    }
}

/// The identities of the pids in `path` (one a line, as `echo $$ >> path` writes
/// them) once it has at least `n`, each read while its process runs: a pid written
/// by a process that is already gone fails the test.
pub fn wait_identities(path: &Path, n: usize, within: Duration) -> Vec<Identity> {
    let pids = wait_for(&format!("{n} pids in {}", path.display()), within, || {
        let pids = read_pids(path);
        (pids.len() >= n).then_some(pids)
    });
    pids.iter()
        .map(|&pid| {
            Identity::of(pid)
                .filter(Identity::running)
                .unwrap_or_else(|| panic!("pid {pid} in {} is not running", path.display()))
        })
        .collect()
}

/// Those of `processes` that still run (see [`Identity::running`]).
pub fn running(processes: &[Identity]) -> Vec<Identity> {
    processes
        .iter()
        .copied()
        .filter(Identity::running)
        .collect()
}

/// Resident memory of `pid` in KiB (`VmRSS`), 0 once it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The pids in `path` (one a line) once it has at least `n`.
pub fn wait_pids(path: &Path, n: usize) -> Vec<u32> {
    wait_for(&format!("{n} pids in {}", path.display()), DEADLINE, || {
        let pids = read_pids(path);
        (pids.len() >= n).then_some(pids)
    })
}

/// Waits until none of `pids` runs (a zombie counts as gone), and says how long it took.
pub fn wait_gone(pids: &[u32], within: Duration, what: &str) {
    let started = Instant::now();
    wait_for(what, within, || {
        pids.iter().all(|pid| !alive(*pid)).then_some(())
    });
    eprintln!("{what}: {:?}", started.elapsed());
}

/// Pids written one per line by the test agent's `pidfile:PATH`.
pub fn read_pids(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A raw `watch` subscription on its own connection.
pub struct Watch {
    reader: BufReader<UnixStream>,
}

impl Watch {
    /// Sends the `watch` request `body` and checks that it was accepted.
    pub fn open(d: &Daemon, body: Value) -> Watch {
        let mut stream = UnixStream::connect(&d.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut body = body;
        body["id"] = json!(7);
        writeln!(stream, "{body}").unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let answer: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(answer["ok"], json!(true), "{answer}");
        Watch { reader }
    }

    pub fn task(d: &Daemon, task_id: &str) -> Watch {
        Watch::open(d, json!({"cmd": "watch", "task_id": task_id}))
    }

    pub fn session(d: &Daemon, session: &str) -> Watch {
        Watch::open(d, json!({"cmd": "watch", "session": session}))
    }

    /// The next event (waits up to 30 s). A coalesced progress event gets the line's
    /// `skipped` count as its own `skipped` field.
    pub fn next(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("an event line");
        let response: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad event line {line:?}: {e}"));
        assert_eq!(response["id"], json!(7));
        let mut event = response["event"].clone();
        // Coalesced progress: the line carries how many earlier ones it replaced.
        if let (Some(skipped), Some(event)) = (response.get("skipped"), event.as_object_mut()) {
            event.insert("skipped".into(), skipped.clone());
        }
        event
    }

    /// Event kinds up to and including the first of `last`.
    pub fn kinds_until(&mut self, last: &str) -> Vec<String> {
        let mut kinds = Vec::new();
        loop {
            let event = self.next();
            let kind = event["kind"].as_str().unwrap().to_string();
            kinds.push(kind.clone());
            if kind == last {
                return kinds;
            }
        }
    }

    /// `(kind, position)` of each event up to and including `finished`.
    pub fn kinds_and_positions_until_finished(&mut self) -> Vec<(String, Option<u64>)> {
        self.until(|e| e["kind"] == json!("finished"))
            .into_iter()
            .map(|e| {
                (
                    e["kind"].as_str().unwrap().to_string(),
                    e["position"].as_u64(),
                )
            })
            .collect()
    }

    /// Events up to and including the first that `last` matches.
    pub fn until(&mut self, mut last: impl FnMut(&Value) -> bool) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            let event = self.next();
            let done = last(&event);
            events.push(event);
            if done {
                return events;
            }
        }
    }
}
