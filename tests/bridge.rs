//! examples/bridge.py, the Python bridge written from docs/protocol.md, against a real
//! agentd: a long task, `/status`, `/stop`, a restart of agentd under it, and a watch
//! that lags while the bridge is stopped; output cleaned of terminal escapes as
//! agentd-matrix cleans it.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::*;

/// A child process killed (by pid) when dropped.
struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        for pid in descendants_of(self.0.id()) {
            kill(pid, libc::SIGKILL);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The bridge, its chat side on stdin/stdout.
struct Bridge {
    process: Owned,
    stdin: ChildStdin,
    lines: Receiver<Value>,
    /// Everything posted, for failure messages.
    seen: Vec<Value>,
    /// Posts no `expect` has matched yet.
    unclaimed: Vec<Value>,
}

impl Bridge {
    /// The bridge with its state file beside `stderr` (one per test).
    fn start(socket: &Path, stderr: &Path) -> Bridge {
        Bridge::start_with_state(socket, stderr, &stderr.with_extension("state.json"))
    }

    fn start_with_state(socket: &Path, stderr: &Path, state: &Path) -> Bridge {
        Bridge::start_with_env(socket, stderr, state, &[])
    }

    /// Like [`Bridge::start_with_state`], with these environment variables set
    /// (test hooks).
    fn start_with_env(socket: &Path, stderr: &Path, state: &Path, env: &[(&str, &str)]) -> Bridge {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/bridge.py");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(stderr)
            .expect("stderr file");
        let mut child = Command::new("python3")
            .arg(script)
            .arg("--socket")
            .arg(socket)
            .arg("--state")
            .arg(state)
            .args(["--max-delay", "0.2"])
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("run python3 examples/bridge.py");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| json!({"unparsable": line, "error": e.to_string()}));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        Bridge {
            process: Owned(child),
            stdin,
            lines,
            seen: Vec::new(),
            unclaimed: Vec::new(),
        }
    }

    /// A message typed in the chat.
    fn say(&mut self, chat: &str, message_id: &str, text: &str) {
        let line = json!({"chat": chat, "message_id": message_id, "text": text});
        writeln!(self.stdin, "{line}").expect("write to the bridge");
    }

    /// The first post `want` matches (posts of different tasks or requests may come
    /// in any order), waiting for more posts as needed.
    fn expect(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.unclaimed.iter().position(&want) {
            return self.unclaimed.remove(i);
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if want(&line) {
                        return line;
                    }
                    self.unclaimed.push(line);
                }
                Err(_) => panic!(
                    "the bridge never posted {what}; it posted:\n{}",
                    self.seen
                        .iter()
                        .map(Value::to_string)
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            }
        }
    }
}

fn text(line: &Value) -> &str {
    line["text"].as_str().unwrap_or("")
}

#[test]
fn the_python_bridge_runs_a_long_task_answers_status_stops_it_and_survives_a_restart() {
    let mut d = Daemon::with_agent_exec(&["--max-concurrent", "1"]);
    let mut bridge = Bridge::start(&d.socket, &d.dir.path().join("bridge.log"));
    let chat = "tg:1001";

    bridge.say(chat, "m-1", "echo working; exec sleep 60");
    let reply = bridge.expect("the task's start", |l| l["kind"] == "reply");
    assert!(text(&reply).ends_with("started"), "{reply}");
    let task = reply["task_id"].as_str().expect("a task id").to_string();
    assert_eq!(reply["chat"], json!(chat));
    bridge.expect("the task's progress", |l| {
        l["kind"] == "progress" && text(l) == "working" && l["task_id"] == json!(task)
    });

    bridge.say(chat, "m-2", "/status");
    let status = bridge.expect("the /status answer", |l| l["command"] == "status");
    assert!(
        text(&status).contains(&format!("task {task}  running")),
        "{status}"
    );
    assert!(text(&status).contains("latest: working"), "{status}");
    assert_eq!(d.task(&task)["state"], json!("running"));

    // /stop is answered at once with where the stop stands; the chat then sees the
    // task's end, from its `finished` event.
    bridge.say(chat, "m-3", "/stop");
    let stopped = bridge.expect("the /stop answer", |l| l["command"] == "stop");
    assert_eq!(
        text(&stopped),
        format!("task {task}  stopping: cancel sent, SIGTERM in 5 s"),
        "{stopped}"
    );
    assert!(
        !bridge.unclaimed.iter().any(|l| l["kind"] == "finished"),
        "the end was posted before the /stop answer: {:?}",
        bridge.unclaimed
    );
    let end = bridge.expect("the task's end", |l| {
        l["kind"] == "finished" && l["task_id"] == json!(task)
    });
    assert_eq!(end["state"], json!("cancelled"), "{end}");
    assert_eq!(text(&end), format!("task {task}  cancelled: working"));
    assert_eq!(d.task(&task)["state"], json!("cancelled"));

    // agentd goes away; a message arrives meanwhile; a new agentd comes up on the
    // same socket. The bridge reconnects, watches the chat again and delivers it.
    kill(d.pid(), libc::SIGTERM);
    let status = d.child.wait().expect("agentd exits");
    assert!(status.success(), "agentd exited with {status}");
    bridge.say(chat, "m-4", "echo back again");
    let log = std::fs::File::create(d.dir.path().join("agentd2.log")).unwrap();
    let agent = format!("{AGENT_EXEC} -- sh -c {{text}}");
    let second = Owned(
        Command::new(AGENTD)
            .arg("--socket")
            .arg(&d.socket)
            .arg("--state-dir")
            .arg(d.dir.path().join("state2"))
            .args(["--agent", &agent])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start a second agentd"),
    );
    let reply = bridge.expect("the answer after the restart", |l| {
        l["kind"] == "reply" && text(l).ends_with("started")
    });
    let again = reply["task_id"].as_str().unwrap().to_string();
    assert_ne!(again, task);
    let end = bridge.expect("the new task's end", |l| {
        l["kind"] == "finished" && l["task_id"] == json!(again)
    });
    assert_eq!(end["state"], json!("succeeded"), "{end}");
    assert_eq!(text(&end), format!("task {again}  succeeded: back again"));
    let log = std::fs::read_to_string(d.dir.path().join("bridge.log")).unwrap_or_default();
    assert_eq!(
        log.matches("connected to agentd").count(),
        2,
        "the bridge should have connected twice:\n{log}"
    );
    drop(second);
}

fn posts_of<'a>(
    bridge: &'a Bridge,
    kind: &'a str,
    task: &'a str,
) -> impl Iterator<Item = &'a Value> {
    bridge
        .seen
        .iter()
        .filter(move |l| l["kind"] == kind && l["task_id"] == json!(task))
}

/// A bridge that stops reading (here: SIGSTOP) falls behind a flood of progress; its
/// watch ends `lagged`. It watches the chat again, and a task that ended meanwhile is
/// still reported to the chat, once.
#[test]
fn the_python_bridge_watches_again_after_a_lagged_watch_and_misses_no_end() {
    let d = Daemon::with_agent_exec(&["--max-concurrent", "1"]);
    let log = d.dir.path().join("bridge.log");
    let mut bridge = Bridge::start(&d.socket, &log);
    let chat = "tg:2002";
    bridge.say(chat, "m-1", "seq 1 1000000000");
    let reply = bridge.expect("the flood's start", |l| l["kind"] == "reply");
    let flood = reply["task_id"].as_str().expect("a task id").to_string();
    bridge.expect("the flood's progress", |l| {
        l["kind"] == "progress" && l["task_id"] == json!(flood)
    });

    // The bridge stops reading; agentd ends its watch once 5 s pass with events
    // waiting (the flood keeps them coming).
    let bridge_pid = bridge.process.0.id();
    kill(bridge_pid, libc::SIGSTOP);
    wait_for(
        "agentd ends the lagging watch",
        Duration::from_secs(60),
        || d.log().contains("was ended (lagged)").then_some(()),
    );
    // The flood is stopped while the bridge cannot see it.
    let stop = d.request(json!({"cmd": "stop", "task_id": flood}));
    assert_eq!(stop["stopped"][0]["state"], json!("cancelled"));
    kill(bridge_pid, libc::SIGCONT);

    let end = bridge.expect("the flood's end, after the lag", |l| {
        l["kind"] == "finished" && l["task_id"] == json!(flood)
    });
    assert_eq!(end["state"], json!("cancelled"));
    // The chat works as before: a new task is reported from start to end.
    bridge.say(chat, "m-2", "echo after the lag");
    let reply = bridge.expect("the next task's start", |l| {
        l["kind"] == "reply" && l["task_id"] != json!(flood)
    });
    let next = reply["task_id"].as_str().unwrap().to_string();
    let done = bridge.expect("the next task's end", |l| {
        l["kind"] == "finished" && l["task_id"] == json!(next)
    });
    assert_eq!(
        text(&done),
        format!("task {next}  succeeded: after the lag")
    );
    assert_eq!(
        posts_of(&bridge, "finished", &flood).count(),
        1,
        "the end twice"
    );
    assert_eq!(
        posts_of(&bridge, "started", &flood).count(),
        1,
        "the start twice"
    );
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(log.contains("fell behind; watching again"), "{log}");
}

/// agentd dies (kill -9) under a running task and comes back on the same state dir,
/// where the task is `interrupted`: the bridge, reconnected, tells the chat so
/// instead of leaving the task looking as if it still ran.
#[test]
fn the_python_bridge_reports_a_task_that_ended_while_agentd_was_down() {
    let mut d = Daemon::with_agent_exec(&[]);
    let mut bridge = Bridge::start(&d.socket, &d.dir.path().join("bridge.log"));
    let chat = "tg:1002";
    bridge.say(chat, "m-1", "echo working; exec sleep 60");
    let reply = bridge.expect("the task's start", |l| l["kind"] == "reply");
    let task = reply["task_id"].as_str().expect("a task id").to_string();
    bridge.expect("the task's progress", |l| {
        l["kind"] == "progress" && l["task_id"] == json!(task)
    });
    kill(d.pid(), libc::SIGKILL);
    d.restart();
    let end = bridge.expect("the task's end", |l| {
        l["kind"] == "finished" && l["task_id"] == json!(task)
    });
    assert_eq!(end["state"], json!("interrupted"), "{end}");
}

/// The bridge itself is killed while a task runs, and the task ends before it is
/// back: its state file named the chat and the task, so the restarted bridge asks
/// how it stands and reports its end. A message the bridge took while agentd was
/// down, and that it could not deliver before it was killed, is delivered by the
/// next run of the bridge, once.
#[test]
fn the_python_bridge_keeps_its_state_across_its_own_restart() {
    let mut d = Daemon::with_agent_exec(&[]);
    let log = d.dir.path().join("bridge.log");
    let state = d.dir.path().join("bridge-state.json");
    let mut bridge = Bridge::start_with_state(&d.socket, &log, &state);
    let chat = "tg:3003";
    bridge.say(chat, "m-1", "echo working; exec sleep 60");
    let reply = bridge.expect("the task's start", |l| l["kind"] == "reply");
    let task = reply["task_id"].as_str().expect("a task id").to_string();
    bridge.expect("the task's progress", |l| {
        l["kind"] == "progress" && l["task_id"] == json!(task)
    });
    drop(bridge);
    let stop = d.request(json!({"cmd": "stop", "task_id": task}));
    assert_eq!(stop["stopped"][0]["state"], json!("cancelled"), "{stop}");
    let mut bridge = Bridge::start_with_state(&d.socket, &log, &state);
    let end = bridge.expect("the end of the task, after the bridge's restart", |l| {
        l["kind"] == "finished" && l["task_id"] == json!(task)
    });
    assert_eq!(end["state"], json!("cancelled"), "{end}");
    assert_eq!(end["chat"], json!(chat), "reported in its chat: {end}");

    // agentd is down: the message waits in the bridge, which is killed.
    kill(d.pid(), libc::SIGTERM);
    let _ = d.child.wait();
    bridge.say(chat, "m-2", "echo delivered later");
    wait_for("the bridge keeps the waiting message", DEADLINE, || {
        let kept = std::fs::read_to_string(&state).unwrap_or_default();
        kept.contains("delivered later").then_some(())
    });
    drop(bridge);
    d.restart();
    let mut bridge = Bridge::start_with_state(&d.socket, &log, &state);
    let reply = bridge.expect("the answer to the waiting message", |l| {
        l["kind"] == "reply" && l["task_id"].is_string()
    });
    let later = reply["task_id"].as_str().unwrap().to_string();
    let end = bridge.expect("its end", |l| {
        l["kind"] == "finished" && l["task_id"] == json!(later)
    });
    assert_eq!(
        text(&end),
        format!("task {later}  succeeded: delivered later")
    );
    let all = d.request(json!({"cmd": "tasks", "all": true}));
    let ran: Vec<Value> = all
        .as_array()
        .or_else(|| all["tasks"].as_array())
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t["text"] == "echo delivered later")
        .collect();
    assert_eq!(ran.len(), 1, "{ran:?}");

    // A task running when agentd is killed and replaced by one on another state
    // dir, which never heard of it: the chat is told so once, and the bridge stops
    // asking about it.
    bridge.say(chat, "m-3", "echo working; exec sleep 60");
    let reply = bridge.expect("the third task's start", |l| {
        l["kind"] == "reply" && l["task_id"].is_string() && l["task_id"] != json!(later)
    });
    let lost = reply["task_id"].as_str().unwrap().to_string();
    bridge.expect("its progress", |l| {
        l["kind"] == "progress" && l["task_id"] == json!(lost)
    });
    kill(d.pid(), libc::SIGKILL);
    let _ = d.child.wait();
    let agent = format!("{AGENT_EXEC} -- sh -c {{text}}");
    let other = Owned(
        Command::new(AGENTD)
            .arg("--socket")
            .arg(&d.socket)
            .arg("--state-dir")
            .arg(d.dir.path().join("other-state"))
            .args(["--agent", &agent])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start another agentd"),
    );
    let unknown = bridge.expect("the chat is told the task is unknown now", |l| {
        l["kind"] == "unknown" && l["task_id"] == json!(lost)
    });
    assert!(text(&unknown).contains("unknown to agentd"), "{unknown}");
    wait_for("the bridge forgets the task", DEADLINE, || {
        let kept = std::fs::read_to_string(&state).unwrap_or_default();
        (!kept.contains(&lost)).then_some(())
    });
    drop(other);
}

/// agentd answers a `send` with a result the bridge cannot read (here: no
/// `reply`): the chat gets a short message saying so, not a Python traceback,
/// and the bridge goes on reading, so the next message is answered as usual.
#[test]
fn the_python_bridge_survives_an_answer_it_cannot_read() {
    use std::os::unix::net::UnixListener;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agentd.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let mut bridge = Bridge::start(&socket, &dir.path().join("bridge.log"));
    let (stream, _) = listener.accept().unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut next = || -> Value {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    };
    let write = |line: Value| (&stream).write_all(format!("{line}\n").as_bytes()).unwrap();
    assert_eq!(next()["cmd"], "hello");
    write(json!({"id": 0, "ok": true, "result": {"protocol": 1, "server": "fake"}}));
    let mut answer = |bridge: &mut Bridge, message_id: &str, result: Value| {
        bridge.say("tg:9", message_id, "work");
        let send = loop {
            let line = next();
            if line["cmd"] == "send" {
                break line;
            }
        };
        assert_eq!(send["message_id"], json!(message_id), "{send}");
        write(json!({"id": send["id"], "ok": true, "result": result}));
    };
    answer(&mut bridge, "m-1", json!({"accepted": true, "task": 7}));
    let error = bridge.expect("a short error", |l| l["kind"] == "error");
    assert!(text(&error).contains("could not be read"), "{error}");
    answer(
        &mut bridge,
        "m-2",
        json!({"reply": "all fine", "accepted": false}),
    );
    let reply = bridge.expect("the next answer", |l| l["kind"] == "reply");
    assert_eq!(text(&reply), "all fine");
}

/// An agent's output written for a terminal (colours, an OSC 8 hyperlink, a `\r`
/// progress redraw) reaches the chat cleaned: in its progress lines and its result.
#[test]
fn the_python_bridge_shows_output_without_terminal_escapes() {
    let d = Daemon::with_agent_exec(&[]);
    let mut bridge = Bridge::start(&d.socket, &d.dir.path().join("bridge.log"));
    let chat = "tg:4004";
    bridge.say(
        chat,
        "m-1",
        r"printf '\033[1;31mred\033[0m \033]8;;file:///a\033\\link\033]8;;\033\\\n'; printf '50%%\r100%%\n'",
    );
    let reply = bridge.expect("the task's start", |l| l["kind"] == "reply");
    let task = reply["task_id"].as_str().expect("a task id").to_string();
    let end = bridge.expect("the task's end", |l| {
        l["kind"] == "finished" && l["task_id"] == json!(task)
    });
    assert_eq!(
        text(&end),
        format!("task {task}  succeeded: red link\n100%")
    );
    let progress: Vec<&str> = posts_of(&bridge, "progress", &task).map(text).collect();
    assert_eq!(progress, ["red link", "100%"], "{:?}", bridge.seen);
}

/// `call` (an expression over `names` of examples/bridge.py, imported as `bridge`) applied by
/// python3 to each of `inputs` (sent as JSON), the strings it gave back.
fn bridge_py_map(call: &str, names: &str, inputs: &Value) -> Vec<String> {
    let script = format!(
        "import json, sys\nsys.path.insert(0, sys.argv[1])\nimport bridge\n\
         print(json.dumps([{call} for {names} in json.load(sys.stdin)]))\n"
    );
    let mut python = Command::new("python3")
        .args([
            "-c",
            &script,
            concat!(env!("CARGO_MANIFEST_DIR"), "/examples"),
        ])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run python3");
    let mut stdin = python.stdin.take().unwrap();
    stdin
        .write_all(serde_json::to_string(inputs).unwrap().as_bytes())
        .unwrap();
    drop(stdin);
    let output = python.wait_with_output().expect("python3 runs");
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).expect("a JSON list")
}

/// bridge.py's `chat_text` cleans as agentd-matrix's does (crates/bridge/src/clean.rs):
/// each case gives the expected text in both, and texts put together from pieces
/// of terminal output give the same text in both.
#[test]
fn the_python_bridge_cleans_text_as_the_rust_bridge_does() {
    use agentd_bridge::clean::chat_text;
    let cases = [
        ("plain\ttext\n", "plain\ttext\n"),
        ("é ü ✓ 日本", "é ü ✓ 日本"),
        ("\x1b[31mred\x1b[0m", "red"),
        ("\x1b[1;32m   Compiling\x1b[m a\n", "   Compiling a\n"),
        ("\x1b[38;5;196mx\x1b[38:2::255:0:0my\x1b[39m", "xy"),
        (
            "see \x1b]8;;https://e.com/a?b\x1b\\the docs\x1b]8;;\x1b\\.",
            "see the docs.",
        ),
        ("\x1b]8;;file:///tmp/x\x07x\x1b]8;;\x07", "x"),
        ("\x1b]0;title\x07done", "done"),
        ("\x1b[2K\x1b[1Gstep 3\x1b[K", "step 3"),
        ("\x1b[?25lhidden\x1b[?25h", "hidden"),
        ("\x1b[3A\x1b[10;20Hat", "at"),
        ("\x1b=\x1b(Bok\x1b>", "ok"),
        ("\x1bPq#0;2;0;0;0\x1b\\after", "after"),
        ("50%\r60%\r100%\n", "100%\n"),
        ("50%\r60%\r", "60%"),
        ("one\r\ntwo\r\n", "one\ntwo\n"),
        (
            "a\n\x1b[2K\r[=> ] 1\r\x1b[2K[==>] 2\nend",
            "a\n[==>] 2\nend",
        ),
        ("\rleading", "leading"),
        ("x\r\ty", "\ty"),
        ("50%\r\x07", "50%"),
        ("bell\x07 back\x08space\x00\x7f\x0c", "bell backspace"),
        ("a\u{9b}b", "ab"),
        ("text\x1b", "text"),
        ("text\x1b[31", "text"),
        ("text\x1b]8;;http://x", "text"),
        ("a\x1bZb", "ab"),
        ("a\x1b\x1b[31mb", "ab"),
    ];
    // Texts put together from pieces, as a deterministic mix (an LCG).
    let pieces = [
        "word",
        " ",
        "\t",
        "\n",
        "\r",
        "\r\n",
        "é",
        "\x1b[31m",
        "\x1b[0m",
        "\x1b[2K",
        "\x1b[?25l",
        "\x1b]8;;http://h/p\x1b\\",
        "\x1b]8;;\x07",
        "\x1b]0;t\x07",
        "\x1b(B",
        "\x1b=",
        "\x07",
        "\x08",
        "50%",
        "\x1bP1$r\x1b\\",
    ];
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut mixed: Vec<String> = (0..300)
        .map(|_| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let n = (seed >> 60) as usize + 1;
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    pieces[(seed >> 33) as usize % pieces.len()]
                })
                .collect()
        })
        .collect();
    // Some end in the middle of a sequence.
    for (i, end) in ["\x1b", "\x1b[1;3", "\x1b]8;;http://x"].iter().enumerate() {
        for text in mixed.iter_mut().skip(i).step_by(10) {
            text.push_str(end);
        }
    }
    let inputs: Vec<&str> = cases
        .iter()
        .map(|(input, _)| *input)
        .chain(mixed.iter().map(String::as_str))
        .collect();
    let cleaned = bridge_py_map("bridge.chat_text(t)", "t", &json!(inputs));
    assert_eq!(cleaned.len(), inputs.len());
    for ((input, want), python) in cases.iter().zip(&cleaned) {
        assert_eq!(chat_text(input), *want, "Rust, {input:?}");
        assert_eq!(python, want, "Python, {input:?}");
    }
    for (input, python) in inputs.iter().zip(&cleaned).skip(cases.len()) {
        assert_eq!(*python, chat_text(input), "{input:?}");
    }
}

/// The bridge is killed (SIGKILL) right after it posted a task's end, before it
/// saved that (the test hook `AGENTD_BRIDGE_TEST_HOLD_AFTER_POST` holds it there):
/// the restarted bridge posts the end again, with the same `key` (`end.<task>`),
/// so a chat that de-duplicates by key shows it once; it is never lost. The same
/// for an answer (`answer.<message id>`): the message is sent again, agentd knows
/// it, and its task's end, which the killed bridge never posted, follows.
#[test]
fn the_python_bridge_posts_again_with_the_same_key_after_a_kill_right_after_a_post() {
    let d = Daemon::with_agent_exec(&[]);
    let log = d.dir.path().join("bridge.log");
    let state = d.dir.path().join("bridge-state.json");
    let chat = "tg:5005";
    for (hold, message_id, work) in [
        ("succeeded", "m-1", "echo the end once"),
        ("started", "m-2", "echo the answer once"),
    ] {
        let env = [("AGENTD_BRIDGE_TEST_HOLD_AFTER_POST", hold)];
        let mut bridge = Bridge::start_with_env(&d.socket, &log, &state, &env);
        bridge.say(chat, message_id, work);
        let reply = bridge.expect("the task's start", |l| l["kind"] == "reply");
        assert_eq!(reply["key"], format!("answer.{message_id}"), "{reply}");
        let task = reply["task_id"].as_str().expect("a task id").to_string();
        let first = if hold == "succeeded" {
            bridge.expect("the task's end", |l| l["kind"] == "finished")
        } else {
            reply
        };
        wait_for("the bridge holds after the post", DEADLINE, || {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            (log.matches("(a test hook)").count() == if hold == "succeeded" { 1 } else { 2 })
                .then_some(())
        });
        d.wait_state(&task, "succeeded");
        kill(bridge.process.0.id(), libc::SIGKILL);
        drop(bridge);
        let mut bridge = Bridge::start_with_state(&d.socket, &log, &state);
        if hold == "started" {
            let again = bridge.expect("the answer again", |l| l["kind"] == "reply");
            assert_eq!(again["key"], first["key"], "{again}");
            assert_eq!(again["task_id"], json!(task), "{again}");
        }
        let end = bridge.expect("the end, after the restart", |l| {
            l["kind"] == "finished" && l["task_id"] == json!(task)
        });
        assert_eq!(end["key"], format!("end.{task}"), "{end}");
        if hold == "succeeded" {
            assert_eq!(end, first, "the same post, the same key");
        }
        let html = end["html"].as_str().unwrap_or_default();
        assert!(
            html.starts_with(&format!("task {task}  succeeded<pre><code>")),
            "{end}"
        );
        wait_for("the bridge saves that the task ended", DEADLINE, || {
            let kept = std::fs::read_to_string(&state).unwrap_or_default();
            (!kept.contains(&task) && kept.contains("\"unanswered\": []")).then_some(())
        });
    }
}

/// bridge.py's `chat_html` makes the HTML agentd-matrix makes for a text with an
/// agent's output (`agentd_bridge::matrix::formatted`).
#[test]
fn the_python_bridge_formats_output_as_the_rust_bridge_does() {
    use agentd_bridge::matrix::formatted;
    let cases = [
        ("task T  succeeded", "done"),
        (
            "task T  failed (exit status 2)",
            "if a < b && c > d {\n\t\"x\" 'y'\n}\n",
        ),
        (
            "a <lead> & more\nsecond",
            "é ü ✓ 日本 &amp; </code></pre><script>",
        ),
        ("", "just output"),
        ("no output", ""),
    ];
    let made = bridge_py_map("bridge.chat_html(l, o)", "l, o", &json!(cases));
    assert_eq!(made.len(), cases.len());
    for ((lead, out), python) in cases.iter().zip(&made) {
        assert_eq!(*python, formatted(lead, out), "{lead:?} {out:?}");
    }
    assert_eq!(
        formatted("a <b>\nc", "x && y"),
        "a &lt;b&gt;<br>c<pre><code>x &amp;&amp; y</code></pre>"
    );
}

/// A state file that is not what the bridge wrote (not JSON, or JSON of another
/// shape) stops the bridge with one line naming the file and what to do, never a
/// Python traceback, and the file is left as it was.
#[test]
fn the_python_bridge_refuses_a_corrupt_state_file_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/bridge.py");
    let state = dir.path().join("bridge-state.json");
    for corrupt in [
        "garbage",
        "[1]",
        r#"{"chats": 3}"#,
        r#"{"chats": null}"#,
        r#"{"live": [1, 2]}"#,
        r#"{"unanswered": [["tg:1"]]}"#,
        r#"{"unanswered": 7}"#,
    ] {
        std::fs::write(&state, corrupt).unwrap();
        let out = Command::new("python3")
            .arg(script)
            .arg("--socket")
            .arg(dir.path().join("agentd.sock"))
            .arg("--state")
            .arg(&state)
            .stdin(Stdio::null())
            .output()
            .expect("run python3 examples/bridge.py");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{corrupt}: {err}");
        assert!(!err.contains("Traceback"), "{corrupt}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{corrupt}: one line: {err}"
        );
        assert!(
            err.contains(&format!("state file {} is not valid", state.display())),
            "{corrupt}: {err}"
        );
        assert!(err.contains("move it aside"), "{corrupt}: {err}");
        assert_eq!(std::fs::read_to_string(&state).unwrap(), corrupt);
    }
}
