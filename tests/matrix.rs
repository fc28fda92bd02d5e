//! agentd-matrix against a real Synapse homeserver on loopback, driven by a second
//! Matrix client (plain HTTP calls of the client-server API) in the test.
//!
//! Synapse comes from the virtualenv named by `AGENTD_SYNAPSE` (scripts/test.sh sets
//! it to `.ci/venv-synapse`, which `.ci/run` installs). Without it the test prints a
//! loud SKIP, except under `CI=true`, where a missing Synapse is a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::{json, Value};

use crate::support::*;

const AGENTD_MATRIX: &str = env!("CARGO_BIN_EXE_agentd-matrix");
/// Synapse's first start (database schema) on a loaded machine.
const SYNAPSE_START: Duration = Duration::from_secs(60);

/// The virtualenv with Synapse, or `None` (after a loud SKIP) for a developer
/// without it. Under CI a missing Synapse fails the test.
fn synapse_venv() -> Option<PathBuf> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    match std::env::var_os("AGENTD_SYNAPSE").map(PathBuf::from) {
        Some(venv) if venv.join("bin/python").exists() => Some(venv),
        Some(venv) => panic!(
            "AGENTD_SYNAPSE={} has no bin/python: install Synapse with .ci/run \
             (python3 -m venv .ci/venv-synapse && .ci/venv-synapse/bin/pip install matrix-synapse)",
            venv.display()
        ),
        None if ci => panic!(
            "CI=true but AGENTD_SYNAPSE is not set: the Matrix bridge test needs Synapse \
             (.ci/run installs it and scripts/test.sh sets AGENTD_SYNAPSE)"
        ),
        None => {
            eprintln!(
                "\n\
                 ************************************************************************\n\
                 SKIP matrix: AGENTD_SYNAPSE is not set, so agentd-matrix was NOT tested\n\
                 against a real homeserver. Run scripts/test.sh after .ci/run installed\n\
                 Synapse (or set AGENTD_SYNAPSE to a virtualenv with matrix-synapse).\n\
                 ************************************************************************\n"
            );
            None
        }
    }
}

/// A child process killed (SIGTERM, then SIGKILL) by pid when dropped.
struct Owned {
    child: Child,
    name: &'static str,
}

impl Owned {
    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        kill(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop on SIGTERM: SIGKILL", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// `status`, JSON body of one request.
fn call(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut builder = ureq::http::Request::builder().method(method).uri(url);
    if let Some(token) = token {
        builder = builder.header("Authorization", format!("Bearer {token}"));
    }
    let response = match body {
        Some(body) => agent.run(
            builder
                .header("Content-Type", "application/json")
                .body(body.to_string())
                .unwrap(),
        ),
        None => agent.run(builder.body(()).unwrap()),
    }
    .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .read_json::<Value>()
        .unwrap_or(Value::Null);
    (status, body)
}

/// Prints the bridge's log if the test fails.
struct ShowLogOnFailure(PathBuf);

impl Drop for ShowLogOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.0).unwrap_or_default();
            eprintln!("---- agentd-matrix log ----\n{log}---- end of log ----");
        }
    }
}

/// `!room:server` etc. as one path segment.
fn seg(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A Synapse homeserver in a temp dir, on a free loopback port.
struct Synapse {
    process: Owned,
    dir: tempfile::TempDir,
    base: String,
    secret: String,
    http: ureq::Agent,
}

impl Synapse {
    fn start(venv: &Path) -> Synapse {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let port = free_port();
        let python = venv.join("bin/python");
        let key = d.join("signing.key");
        let made = Command::new(&python)
            .arg("-c")
            .arg("import sys, signedjson.key as k; k.write_signing_keys(open(sys.argv[1], 'w'), [k.generate_signing_key('a_1')])")
            .arg(&key)
            .status()
            .expect("run the venv's python");
        assert!(
            made.success(),
            "cannot make a signing key with {}",
            python.display()
        );
        let secret = "agentd-test-shared-secret".to_string();
        let many = "{per_second: 1000, burst_count: 1000}";
        let config = format!(
            r#"server_name: "localhost"
pid_file: "{d}/homeserver.pid"
listeners:
  - port: {port}
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
database:
  name: sqlite3
  args:
    database: "{d}/homeserver.db"
media_store_path: "{d}/media"
registration_shared_secret: "{secret}"
enable_registration: false
report_stats: false
macaroon_secret_key: "agentd-test-macaroon"
form_secret: "agentd-test-form"
signing_key_path: "{key}"
trusted_key_servers: []
suppress_key_server_warning: true
presence:
  enabled: false
enable_metrics: false
url_preview_enabled: false
rc_message: {many}
rc_registration: {many}
rc_login:
  address: {many}
  account: {many}
  failed_attempts: {many}
rc_joins:
  local: {many}
  remote: {many}
rc_invites:
  per_room: {many}
  per_user: {many}
  per_issuer: {many}
"#,
            d = d.display(),
            key = key.display(),
        );
        let config_path = d.join("homeserver.yaml");
        std::fs::write(&config_path, config).expect("write homeserver.yaml");
        let log = std::fs::File::create(d.join("synapse.log")).expect("log file");
        let child = Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "--config-path"])
            .arg(&config_path)
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start Synapse");
        let mut synapse = Synapse {
            process: Owned {
                child,
                name: "synapse",
            },
            dir,
            base: format!("http://127.0.0.1:{port}"),
            secret,
            http: http(),
        };
        let started = Instant::now();
        wait_for("Synapse answers /versions", SYNAPSE_START, || {
            if let Ok(Some(status)) = synapse.process.child.try_wait() {
                panic!("Synapse exited with {status}:\n{}", synapse.log());
            }
            let url = format!("{}/_matrix/client/versions", synapse.base);
            let ok = synapse
                .http
                .get(&url)
                .call()
                .is_ok_and(|r| r.status().as_u16() == 200);
            ok.then_some(())
        });
        eprintln!("Synapse up in {:?}", started.elapsed());
        synapse
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("synapse.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Registers a user with the shared secret (admin API, HMAC-SHA1).
    fn register(&self, name: &str, password: &str) -> User {
        let url = format!("{}/_synapse/admin/v1/register", self.base);
        let (_, nonce) = call(&self.http, "GET", &url, None, None);
        let nonce = nonce["nonce"]
            .as_str()
            .expect("a registration nonce")
            .to_string();
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(self.secret.as_bytes()).unwrap();
        for (i, part) in [nonce.as_str(), name, password, "notadmin"]
            .iter()
            .enumerate()
        {
            if i > 0 {
                mac.update(b"\0");
            }
            mac.update(part.as_bytes());
        }
        let mac: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let body = json!({"nonce": nonce, "username": name, "password": password,
                          "mac": mac, "admin": false});
        let (status, answer) = call(&self.http, "POST", &url, None, Some(body));
        assert_eq!(status, 200, "register {name}: {answer}");
        User {
            base: self.base.clone(),
            id: answer["user_id"].as_str().unwrap().to_string(),
            token: answer["access_token"].as_str().unwrap().to_string(),
            http: http(),
            txn: AtomicU64::new(0),
            since: std::sync::Mutex::new(None),
        }
    }
}

/// The test's own Matrix client.
struct User {
    base: String,
    id: String,
    token: String,
    http: ureq::Agent,
    txn: AtomicU64,
    since: std::sync::Mutex<Option<String>>,
}

impl User {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let (status, answer) = call(&self.http, method, &url, Some(&self.token), body);
        assert_eq!(status, 200, "{} {method} {path}: {answer}", self.id);
        answer
    }

    fn create_room(&self, name: &str, invite: &[&str]) -> String {
        let answer = self.call(
            "POST",
            "/_matrix/client/v3/createRoom",
            Some(json!({"name": name, "preset": "private_chat", "invite": invite})),
        );
        answer["room_id"].as_str().unwrap().to_string()
    }

    fn invite(&self, room: &str, user: &str) {
        let path = format!("/_matrix/client/v3/rooms/{}/invite", seg(room));
        self.call("POST", &path, Some(json!({"user_id": user})));
    }

    fn join(&self, room: &str) {
        let path = format!("/_matrix/client/v3/join/{}", seg(room));
        self.call("POST", &path, Some(json!({})));
    }

    fn send_content(&self, room: &str, content: Value) -> String {
        let txn = format!("t{}", self.txn.fetch_add(1, Ordering::Relaxed));
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
            seg(room)
        );
        let answer = self.call("PUT", &path, Some(content));
        answer["event_id"].as_str().unwrap().to_string()
    }

    fn say(&self, room: &str, text: &str) -> String {
        self.send_content(room, json!({"msgtype": "m.text", "body": text}))
    }

    fn say_in_thread(&self, room: &str, root: &str, text: &str) -> String {
        self.send_content(
            room,
            json!({"msgtype": "m.text", "body": text,
                   "m.relates_to": {"rel_type": "m.thread", "event_id": root}}),
        )
    }

    fn members(&self, room: &str) -> Vec<String> {
        let path = format!("/_matrix/client/v3/rooms/{}/joined_members", seg(room));
        let answer = self.call("GET", &path, None);
        answer["joined"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The room's latest events (up to 500), oldest first.
    fn events(&self, room: &str) -> Vec<Value> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=500",
            seg(room)
        );
        let answer = self.call("GET", &path, None);
        let mut events: Vec<Value> = answer["chunk"].as_array().cloned().unwrap_or_default();
        events.reverse();
        events
    }

    /// Whether an `m.typing` notice from `who` arrived in `room` since the last call.
    fn saw_typing(&self, room: &str, who: &str) -> bool {
        let mut since = self.since.lock().unwrap();
        let filter = json!({"room": {"rooms": [room], "timeline": {"limit": 1}}}).to_string();
        let mut path = format!("/_matrix/client/v3/sync?timeout=0&filter={}", seg(&filter));
        if let Some(s) = since.as_deref() {
            path.push_str(&format!("&since={}", seg(s)));
        }
        let answer = self.call("GET", &path, None);
        *since = answer["next_batch"].as_str().map(str::to_string);
        answer["rooms"]["join"][room]["ephemeral"]["events"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| {
                e["type"] == "m.typing"
                    && e["content"]["user_ids"]
                        .as_array()
                        .is_some_and(|ids| ids.iter().any(|id| id == who))
            })
    }
}

/// The bot's messages in a room (not edits), oldest first.
fn bot_posts(events: &[Value], bot: &str) -> Vec<Value> {
    events
        .iter()
        .filter(|e| {
            e["type"] == "m.room.message"
                && e["sender"] == bot
                && e["content"]["m.relates_to"]["rel_type"] != "m.replace"
        })
        .cloned()
        .collect()
}

/// The bodies of the edits of `message`, oldest first.
fn edits_of(events: &[Value], message: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| {
            e["content"]["m.relates_to"]["rel_type"] == "m.replace"
                && e["content"]["m.relates_to"]["event_id"] == message
        })
        .filter_map(|e| {
            e["content"]["m.new_content"]["body"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

fn body(event: &Value) -> &str {
    event["content"]["body"].as_str().unwrap_or_default()
}

/// Writes the bridge's config file `config`: agentd `d`'s socket, the homeserver
/// at `homeserver`, `bot`'s login, `alice` allowed, the state file `state`, and
/// `more` lines of the `[matrix]` table.
fn write_bridge_config(
    config: &Path,
    d: &Daemon,
    homeserver: &str,
    bot: &User,
    alice: &User,
    state: &Path,
    more: &str,
) {
    std::fs::write(
        config,
        format!(
            r#"socket = "{socket}"

[matrix]
homeserver = "{homeserver}"
user = "{bot}"
password = "bot-password"
allowed-users = ["{alice}"]
state-file = "{state}"
{more}"#,
            socket = d.socket.display(),
            bot = bot.id,
            alice = alice.id,
            state = state.display(),
        ),
    )
    .unwrap();
}

/// agentd-matrix, started with the shared config file.
fn start_bridge(config: &Path, log: &Path) -> Owned {
    start_bridge_with(config, log, &[])
}

/// Like [`start_bridge`], with these environment variables set (test hooks).
fn start_bridge_with(config: &Path, log: &Path, env: &[(&str, &str)]) -> Owned {
    let child = Command::new(AGENTD_MATRIX)
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        .env("AGENTD_LOG", "agentd_bridge=debug,info")
        .env_remove("AGENTD_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .spawn()
        .expect("start agentd-matrix");
    Owned {
        child,
        name: "agentd-matrix",
    }
}

/// The bot's posts (not edits) in `events` that name `task_id`.
fn posts_about(events: &[Value], bot: &str, task_id: &str) -> Vec<Value> {
    bot_posts(events, bot)
        .into_iter()
        .filter(|e| body(e).contains(task_id))
        .collect()
}

/// `user` says `text` in `room`; waits until agentd runs it as a task and the bot's
/// post about that task has been edited to show `output`. The task's id and the
/// post's event id.
fn say_and_see_it_run(
    d: &Daemon,
    user: &User,
    room: &str,
    bot: &str,
    text: &str,
    output: &str,
) -> (String, String) {
    user.say(room, text);
    let task = wait_for("agentd runs the task", DEADLINE, || {
        tasks_with_text(d, text)
            .into_iter()
            .find(|t| t["state"] == "running")
    });
    let task_id = task["task_id"].as_str().unwrap().to_string();
    let post = wait_for("the bridge answers the task", DEADLINE, || {
        posts_about(&user.events(room), bot, &task_id)
            .into_iter()
            .next()
    });
    let post_id = post["event_id"].as_str().unwrap().to_string();
    wait_for(
        "the bridge's post shows the task's output",
        DEADLINE,
        || {
            edits_of(&user.events(room), &post_id)
                .into_iter()
                .find(|e| e.contains(output))
        },
    );
    (task_id, post_id)
}

/// Tasks agentd knows (active, queued and finished) whose text is `text`.
fn tasks_with_text(d: &Daemon, text: &str) -> Vec<Value> {
    let all = d.request(json!({"cmd": "tasks", "all": true}));
    let list = all
        .as_array()
        .cloned()
        .or_else(|| all["tasks"].as_array().cloned());
    list.unwrap_or_default()
        .into_iter()
        .filter(|t| t["text"] == text)
        .collect()
}

#[test]
fn a_matrix_room_drives_agentd_through_a_real_synapse() {
    let Some(venv) = synapse_venv() else { return };
    let synapse = Synapse::start(&venv);
    let bot = synapse.register("agentd", "bot-password");
    let alice = synapse.register("alice", "alice-password");
    let mallory = synapse.register("mallory", "mallory-password");

    // agentd and the bridge share one config file.
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("config.toml");
    let state = home.path().join("matrix-state.json");
    let bridge_log = home.path().join("agentd-matrix.log");
    let _show_log = ShowLogOnFailure(bridge_log.clone());
    let agent = format!("{AGENT_EXEC} -- sh -c {{text}}");
    let mut d = {
        // The socket path is Daemon's; write the file once it is known.
        let d = Daemon::start(&["--agent", agent.as_str(), "--max-concurrent", "4"]);
        std::fs::write(
            &config,
            format!(
                r#"socket = "{socket}"
max-concurrent = 4

[matrix]
homeserver = "{base}"
user = "{bot}"
password = "bot-password"
allowed-users = ["{alice}"]
state-file = "{state}"
progress-interval = "300ms"
"#,
                socket = d.socket.display(),
                base = synapse.base,
                bot = bot.id,
                alice = alice.id,
                state = state.display(),
            ),
        )
        .unwrap();
        d
    };
    // agentd itself loads the same file, [matrix] table and all.
    let check = Command::new(AGENTD)
        .arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(home.path().join("run").join("second.sock"))
        .arg("--state-dir")
        .arg(home.path().join("second-state"))
        .arg("--agent")
        .arg(&agent)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a second agentd on the shared config");
    let mut check = Owned {
        child: check,
        name: "agentd (config check)",
    };
    let second = home.path().join("run").join("second.sock");
    wait_for("agentd runs with the shared config file", DEADLINE, || {
        if let Ok(Some(status)) = check.child.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            check
                .child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .ok();
            panic!("agentd refused the config file with [matrix] ({status}): {err}");
        }
        second.exists().then_some(())
    });
    check.stop();

    let room_a = alice.create_room("a", &[&bot.id]);
    let room_b = alice.create_room("b", &[&bot.id]);
    let mut bridge = start_bridge(&config, &bridge_log);
    let log = || std::fs::read_to_string(&bridge_log).unwrap_or_default();
    for room in [&room_a, &room_b] {
        wait_for(
            "the bridge joins the rooms alice invited it to",
            DEADLINE,
            || alice.members(room).contains(&bot.id).then_some(()),
        );
    }

    // A long task: one message, edited in place with its progress.
    let long = "for i in $(seq 1 400); do echo step $i; sleep 0.05; done";
    alice.say(&room_a, long);
    let task = wait_for("agentd runs the long task", DEADLINE, || {
        tasks_with_text(&d, long).into_iter().next()
    });
    let task_id = task["task_id"].as_str().unwrap().to_string();
    let progress_message = wait_for("the bridge answers the task", DEADLINE, || {
        bot_posts(&alice.events(&room_a), &bot.id)
            .into_iter()
            .find(|e| body(e).contains(&task_id))
    });
    let progress_id = progress_message["event_id"].as_str().unwrap().to_string();
    let edits = wait_for("the progress message is edited twice", DEADLINE, || {
        let edits = edits_of(&alice.events(&room_a), &progress_id);
        (edits.len() >= 2).then_some(edits)
    });
    assert!(
        edits
            .iter()
            .all(|e| e.contains(&task_id) && e.contains("step ")),
        "progress edits: {edits:?}"
    );
    assert_ne!(edits[0], edits[1], "each edit shows newer progress");
    wait_for("a typing notice while the task runs", DEADLINE, || {
        alice.saw_typing(&room_a, &bot.id).then_some(())
    });

    // /status is answered at once while the task runs.
    let status_event = alice.say(&room_a, "/status");
    let events_after = |room: &str, after: &str| -> Vec<Value> {
        let events = alice.events(room);
        let at = events
            .iter()
            .position(|e| e["event_id"] == after)
            .expect("the event is in the room");
        bot_posts(&events[at + 1..], &bot.id)
    };
    let status_reply = wait_for("the bridge answers /status", DEADLINE, || {
        events_after(&room_a, &status_event).into_iter().next()
    });
    let events = alice.events(&room_a);
    let sent_at = events
        .iter()
        .find(|e| e["event_id"] == status_event)
        .unwrap()["origin_server_ts"]
        .as_u64()
        .unwrap();
    let answered_in = status_reply["origin_server_ts"].as_u64().unwrap() - sent_at;
    assert!(
        answered_in < 1000,
        "/status answered after {answered_in} ms: {status_reply}"
    );
    assert!(body(&status_reply).contains(&task_id), "{status_reply}");
    assert_eq!(d.task(&task_id)["state"], "running");

    // A second room is not blocked by the first one's task.
    let quick = "echo hello from b";
    let quick_event = alice.say(&room_b, quick);
    let result_b = wait_for("room b's result", DEADLINE, || {
        events_after(&room_b, &quick_event)
            .into_iter()
            .find(|e| body(e).contains("succeeded"))
    });
    assert!(body(&result_b).contains("hello from b"), "{result_b}");
    assert_eq!(d.task(&task_id)["state"], "running", "a's task still runs");

    // Output written for a terminal reaches the room cleaned: colours, OSC 8
    // hyperlinks, a `\r` progress redraw. Raw, its escapes would take the result
    // past one event (an ESC is 6 bytes in the event's JSON), so it would come in
    // parts; cleaned first, it is one message.
    let coloured = r"for i in $(seq 250); do printf '\033[1;31merror\033[0m[\033]8;;file:///src/a.rs\033\\E0308\033]8;;\033\\] line %d\n' $i; done; printf '50%%\r100%%\n'";
    let coloured_event = alice.say(&room_b, coloured);
    let coloured_result = wait_for("the coloured task's result", DEADLINE, || {
        events_after(&room_b, &coloured_event)
            .into_iter()
            .find(|e| body(e).contains("succeeded"))
    });
    let coloured_id = tasks_with_text(&d, coloured)[0]["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    let lines: String = (1..=250)
        .map(|i| format!("error[E0308] line {i}\n"))
        .collect();
    assert_eq!(
        body(&coloured_result),
        format!("task {coloured_id}  succeeded\n{lines}100%"),
    );
    let answer = events_after(&room_b, &coloured_event)
        .into_iter()
        .find(|e| body(e).contains(&coloured_id))
        .expect("the coloured task's answer");
    let answer_id = answer["event_id"].as_str().unwrap().to_string();
    let final_edit = wait_for(
        "the coloured task's progress shows its end",
        DEADLINE,
        || {
            edits_of(&alice.events(&room_b), &answer_id)
                .into_iter()
                .rfind(|e| e.contains("succeeded"))
        },
    );
    assert_eq!(final_edit, format!("task {coloured_id}  succeeded\n100%"));

    // Someone not on the allow-list gets a refusal, and nothing runs.
    alice.invite(&room_a, &mallory.id);
    mallory.join(&room_a);
    let marker = home.path().join("mallory-was-here");
    let evil = format!("touch {}", marker.display());
    let evil_event = mallory.say(&room_a, &evil);
    let refusal = wait_for("the bridge refuses mallory", DEADLINE, || {
        events_after(&room_a, &evil_event)
            .into_iter()
            .find(|e| body(e).contains(&mallory.id))
    });
    assert!(body(&refusal).contains("allowed"), "{refusal}");
    // Told once: mallory's next messages get no refusal of their own.
    let evil_again = format!("{evil} again");
    mallory.say(&room_a, &evil_again);
    mallory.say(&room_a, "please?");

    // /stop ends the long task; its end is posted.
    let stop_event = alice.say(&room_a, "/stop");
    wait_for("the bridge answers /stop", DEADLINE, || {
        events_after(&room_a, &stop_event).into_iter().next()
    });
    let ended = wait_for("the cancelled task's end is posted", DEADLINE, || {
        events_after(&room_a, &stop_event)
            .into_iter()
            .find(|e| body(e).contains(&task_id) && body(e).contains("cancelled"))
    });
    assert_eq!(d.wait_state(&task_id, "cancelled")["state"], "cancelled");
    // The chat writer posts in order: a second refusal would be before /stop's answer.
    let refusals: Vec<Value> = events_after(&room_a, &evil_event)
        .into_iter()
        .filter(|e| body(e).contains(&mallory.id))
        .collect();
    assert_eq!(
        refusals.len(),
        1,
        "mallory was refused more than once: {refusals:?}"
    );
    for text in [&evil, &evil_again] {
        assert!(tasks_with_text(&d, text).is_empty(), "mallory's text ran");
    }
    assert!(!marker.exists());
    let final_edit = wait_for("the progress message shows the end", DEADLINE, || {
        edits_of(&alice.events(&room_a), &progress_id)
            .into_iter()
            .rfind(|e| e.contains("cancelled"))
    });
    assert!(final_edit.contains("step "), "{final_edit}");
    // Progress came every 50 ms; edits at most one per progress-interval (300 ms;
    // the homeserver's clock, so allow for latency). The last edit, at the end, is
    // not held back.
    let events = alice.events(&room_a);
    let stamps: Vec<u64> = events
        .iter()
        .filter(|e| e["content"]["m.relates_to"]["event_id"] == progress_id.as_str())
        .filter_map(|e| e["origin_server_ts"].as_u64())
        .collect();
    assert!(stamps.len() >= 3, "{} edits", stamps.len());
    let gaps: Vec<u64> = stamps[..stamps.len() - 1]
        .windows(2)
        .map(|w| w[1] - w[0])
        .collect();
    assert!(
        gaps.iter().all(|g| *g >= 200),
        "edits closer than the rate limit: {gaps:?} ms"
    );

    // A thread is its own session; answers go into the thread.
    let root = ended["event_id"].as_str().unwrap().to_string();
    let threaded = "echo in the thread";
    alice.say_in_thread(&room_a, &root, threaded);
    let in_thread = wait_for("the thread's result", DEADLINE, || {
        bot_posts(&alice.events(&room_a), &bot.id)
            .into_iter()
            .find(|e| body(e).contains("succeeded") && body(e).contains("in the thread"))
    });
    assert_eq!(in_thread["content"]["m.relates_to"]["rel_type"], "m.thread");
    assert_eq!(in_thread["content"]["m.relates_to"]["event_id"], root);
    let thread_task = &tasks_with_text(&d, threaded)[0];
    assert_eq!(thread_task["session"], format!("matrix:{room_a}/{root}"));

    // The homeserver sends an event again: the bridge restarted from an older
    // `since` token (it crashed before saving its position).
    let snapshot = std::fs::read(&state).expect("the bridge saved its state");
    let once = "echo only once";
    let once_event = alice.say(&room_b, once);
    wait_for("room b's second result", DEADLINE, || {
        events_after(&room_b, &once_event)
            .into_iter()
            .find(|e| body(e).contains("only once"))
    });
    bridge.stop();
    std::fs::write(&state, &snapshot).unwrap();
    let before = log().len();
    let mut bridge = start_bridge(&config, &bridge_log);
    wait_for(
        "the restarted bridge gets the event again",
        DEADLINE,
        || {
            log()[before..]
                .contains("a re-delivered message, not run again")
                .then_some(())
        },
    );
    // Restarted without any state (no `since` token, no handled ids): history is
    // not acted on, even though Synapse may answer its first syncs from its cache of
    // the first run's, which carry every message again.
    bridge.stop();
    std::fs::remove_file(&state).unwrap();
    let posts_in_a = bot_posts(&alice.events(&room_a), &bot.id).len();
    let before = log().len();
    let bridge = start_bridge(&config, &bridge_log);
    // A fresh start acts only on messages written after it: wait until it is up.
    wait_for("the bridge starts afresh", DEADLINE, || {
        log()[before..].contains("ready for messages").then_some(())
    });
    let after_restart = "echo after the restarts";
    let last_event = alice.say(&room_b, after_restart);
    wait_for(
        "the bridge answers after restarting twice",
        DEADLINE,
        || {
            events_after(&room_b, &last_event)
                .into_iter()
                .find(|e| body(e).contains("after the restarts") && body(e).contains("succeeded"))
        },
    );
    let replayed: Vec<String> = bot_posts(&alice.events(&room_a), &bot.id)[posts_in_a..]
        .iter()
        .map(|e| body(e).to_string())
        .collect();
    assert!(
        replayed.is_empty(),
        "old messages were acted on again: {replayed:?}"
    );
    for text in [long, quick, once, threaded, after_restart] {
        assert_eq!(
            tasks_with_text(&d, text).len(),
            1,
            "{text:?} ran more than once"
        );
    }
    let once_id = tasks_with_text(&d, once)[0]["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    let posts_about_once = events_after(&room_b, &once_event)
        .into_iter()
        .filter(|e| body(e).contains(&once_id))
        .count();
    assert_eq!(
        posts_about_once, 2,
        "one answer and one result, not repeated"
    );

    // agentd restarts under the bridge: a message written while it is down waits,
    // and runs once the bridge has reconnected.
    let _ = d.child.kill();
    let _ = d.child.wait();
    let down = "echo while agentd was down";
    let down_event = alice.say(&room_b, down);
    let restarted = Command::new(AGENTD)
        .arg("--socket")
        .arg(&d.socket)
        .arg("--state-dir")
        .arg(d.dir.path().join("state"))
        .args(["--agent", agent.as_str()])
        .env_remove("AGENTD_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("restart agentd");
    d.child = restarted;
    let result = wait_for(
        "the message written while agentd was down runs",
        DEADLINE,
        || {
            events_after(&room_b, &down_event).into_iter().find(|e| {
                body(e).contains("while agentd was down") && body(e).contains("succeeded")
            })
        },
    );
    assert_eq!(tasks_with_text(&d, down).len(), 1, "{result}");

    // agentd is down, a message waits in the bridge (the room is told so), and the
    // bridge itself restarts before agentd is back: the waiting message was kept in
    // its state file, and runs once agentd is back.
    let _ = d.child.kill();
    let _ = d.child.wait();
    let kept = "echo kept across a restart of the bridge";
    let kept_event = alice.say(&room_b, kept);
    wait_for("the room is told that agentd is down", DEADLINE, || {
        events_after(&room_b, &kept_event)
            .into_iter()
            .find(|e| body(e).contains("not running"))
    });
    let mut bridge = bridge;
    bridge.stop();
    d.child = Command::new(AGENTD)
        .arg("--socket")
        .arg(&d.socket)
        .arg("--state-dir")
        .arg(d.dir.path().join("state"))
        .args(["--agent", agent.as_str()])
        .env_remove("AGENTD_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("restart agentd");
    let bridge = start_bridge(&config, &bridge_log);
    let result = wait_for(
        "the message kept across the bridge's restart runs",
        DEADLINE,
        || {
            events_after(&room_b, &kept_event)
                .into_iter()
                .find(|e| body(e).contains("kept across") && body(e).contains("succeeded"))
        },
    );
    assert_eq!(tasks_with_text(&d, kept).len(), 1, "{result}");
    drop(bridge);
}

/// agentd dies (kill -9) under a task a room started, and comes back on the same
/// state dir, where the task is `interrupted` (daemon crashed): no `finished` was
/// ever written for it. The bridge, reconnected, asks how the task stands and tells
/// the room, once: its progress message shows the end and the end is posted. Then
/// the same for a task that ends while the bridge itself is stopped.
#[test]
fn a_task_that_ended_while_agentd_or_the_bridge_was_down_is_reported_in_its_room() {
    let Some(venv) = synapse_venv() else { return };
    let synapse = Synapse::start(&venv);
    let bot = synapse.register("agentd", "bot-password");
    let alice = synapse.register("alice", "alice-password");
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("config.toml");
    let bridge_log = home.path().join("agentd-matrix.log");
    let _show_log = ShowLogOnFailure(bridge_log.clone());
    let mut d = Daemon::with_agent_exec(&[]);
    write_bridge_config(
        &config,
        &d,
        &synapse.base,
        &bot,
        &alice,
        &home.path().join("matrix-state.json"),
        "progress-interval = \"100ms\"\n",
    );
    let room = alice.create_room("crash", &[&bot.id]);
    let bridge = start_bridge(&config, &bridge_log);
    wait_for("the bridge joins the room", DEADLINE, || {
        alice.members(&room).contains(&bot.id).then_some(())
    });

    let work = "echo working; exec sleep 60";
    let (task_id, progress_id) = say_and_see_it_run(&d, &alice, &room, &bot.id, work, "working");
    let about_task = |events: &[Value]| posts_about(events, &bot.id, &task_id);

    let log = || std::fs::read_to_string(&bridge_log).unwrap_or_default();
    let before = log().len();
    kill(d.pid(), libc::SIGKILL);
    // A message written while agentd is down waits; the room is told why nothing
    // happens yet.
    wait_for("the bridge sees agentd gone", DEADLINE, || {
        log()[before..]
            .contains("connection to agentd lost")
            .then_some(())
    });
    let down = "echo written while agentd was down";
    let down_event = alice.say(&room, down);
    wait_for("the bridge says agentd is not running", DEADLINE, || {
        let events = alice.events(&room);
        let at = events.iter().position(|e| e["event_id"] == down_event)?;
        bot_posts(&events[at + 1..], &bot.id)
            .into_iter()
            .find(|e| body(e).contains("agentd is not running"))
    });
    d.restart();
    assert_eq!(d.task(&task_id)["exit"]["reason"], "daemon crashed");
    wait_for(
        "the waiting message runs once agentd is back",
        DEADLINE,
        || {
            bot_posts(&alice.events(&room), &bot.id)
                .into_iter()
                .find(|e| {
                    body(e).contains("written while agentd was down")
                        && body(e).contains("succeeded")
                })
        },
    );
    let end = wait_for("the bridge posts the task's end", DEADLINE, || {
        about_task(&alice.events(&room))
            .into_iter()
            .find(|e| body(e).contains("interrupted"))
    });
    assert!(body(&end).contains("daemon crashed"), "{end}");
    wait_for("the progress message shows the end", DEADLINE, || {
        edits_of(&alice.events(&room), &progress_id)
            .into_iter()
            .rfind(|e| e.contains("interrupted") && e.contains("working"))
    });
    // The bridge still serves the room, and has said the end only once.
    let next = "echo after the crash";
    alice.say(&room, next);
    wait_for("the next message's result", DEADLINE, || {
        bot_posts(&alice.events(&room), &bot.id)
            .into_iter()
            .find(|e| body(e).contains("after the crash") && body(e).contains("succeeded"))
    });
    let posts: Vec<String> = about_task(&alice.events(&room))
        .iter()
        .map(|e| body(e).to_string())
        .collect();
    assert_eq!(posts.len(), 2, "one answer and one end: {posts:?}");

    // The bridge itself stops while a task runs, and the task ends before the
    // bridge is back: its state file names the task, so the end is still shown.
    let mut bridge = bridge;
    let gate = home.path().join("go");
    let held = format!(
        "echo holding; while [ ! -e {} ]; do sleep 0.05; done; echo released",
        gate.display()
    );
    let (held_id, held_message) = say_and_see_it_run(&d, &alice, &room, &bot.id, &held, "holding");
    let about_held = |events: &[Value]| posts_about(events, &bot.id, &held_id);
    bridge.stop();
    std::fs::write(&gate, "").unwrap();
    d.wait_state(&held_id, "succeeded");
    let bridge = start_bridge(&config, &bridge_log);
    let end = wait_for(
        "the restarted bridge posts the held task's end",
        DEADLINE,
        || {
            about_held(&alice.events(&room))
                .into_iter()
                .find(|e| body(e).contains("succeeded"))
        },
    );
    assert!(body(&end).contains("released"), "{end}");
    wait_for(
        "the held task's progress message shows the end",
        DEADLINE,
        || {
            edits_of(&alice.events(&room), &held_message)
                .into_iter()
                .rfind(|e| e.contains("succeeded") && e.contains("released"))
        },
    );
    let next = "echo after the bridge restarted";
    alice.say(&room, next);
    wait_for("the next message's result", DEADLINE, || {
        bot_posts(&alice.events(&room), &bot.id)
            .into_iter()
            .find(|e| {
                body(e).contains("after the bridge restarted") && body(e).contains("succeeded")
            })
    });
    assert_eq!(
        about_held(&alice.events(&room)).len(),
        2,
        "one answer and one end"
    );
    drop(bridge);
}

/// A loopback HTTP proxy in front of the homeserver that hands every request on
/// and, for the first `lose` sends of an event (`PUT …/send/…`), drops the
/// connection instead of passing the homeserver's answer back: the event was
/// made, the bridge never learns it. Returns the proxy's base URL.
fn lossy_proxy(upstream: &str, lose: usize) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};
    let upstream = upstream
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let lose = Arc::new(Mutex::new(lose));
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let (upstream, lose) = (upstream.clone(), lose.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(client.try_clone().unwrap());
                // One request (the proxy answers with `Connection: close`): its
                // head, then a Content-Length body.
                let mut head = Vec::new();
                let mut length = 0;
                let mut first = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if first.is_empty() {
                        first = line.clone();
                    }
                    if line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    if !lower.starts_with("connection:") {
                        head.extend_from_slice(line.as_bytes());
                    }
                }
                head.extend_from_slice(b"Connection: close\r\n\r\n");
                let mut body = vec![0; length];
                if reader.read_exact(&mut body).is_err() {
                    return;
                }
                let Ok(mut server) = TcpStream::connect(&upstream) else {
                    return;
                };
                let mut answer = Vec::new();
                if server.write_all(&head).is_err()
                    || server.write_all(&body).is_err()
                    || server.read_to_end(&mut answer).is_err()
                {
                    return;
                }
                let is_send = first.starts_with("PUT ") && first.contains("/send/");
                if is_send {
                    let mut lose = lose.lock().unwrap();
                    if *lose > 0 {
                        *lose -= 1;
                        let _ = client.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                }
                // The homeserver closes after its answer: so does the proxy.
                let _ = (&client).write_all(&answer);
                let _ = client.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    base
}

/// Synapse takes the bridge's answer to a task, but the answer to that send is
/// lost, again and again, until the adapter gives up and the core makes the post
/// again later: the later attempt has the same transaction id, so Synapse makes
/// no second event and the room shows the answer once, then the result once.
#[test]
fn a_post_whose_answers_were_lost_shows_once_in_the_room() {
    let Some(venv) = synapse_venv() else { return };
    let synapse = Synapse::start(&venv);
    let bot = synapse.register("agentd", "bot-password");
    let alice = synapse.register("alice", "alice-password");
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("config.toml");
    let bridge_log = home.path().join("agentd-matrix.log");
    let _show_log = ShowLogOnFailure(bridge_log.clone());
    let d = Daemon::with_agent_exec(&[]);
    // The bridge's attempts of one request (matrix.rs ATTEMPTS), all answered lost.
    let proxy = lossy_proxy(&synapse.base, 5);
    write_bridge_config(
        &config,
        &d,
        &proxy,
        &bot,
        &alice,
        &home.path().join("matrix-state.json"),
        "",
    );
    let room = alice.create_room("lossy", &[&bot.id]);
    let _bridge = start_bridge(&config, &bridge_log);
    wait_for("the bridge joins the room", DEADLINE, || {
        alice.members(&room).contains(&bot.id).then_some(())
    });
    let work = "echo made once";
    alice.say(&room, work);
    let task = wait_for("agentd runs the task", DEADLINE, || {
        tasks_with_text(&d, work).into_iter().next()
    });
    let task_id = task["task_id"].as_str().unwrap().to_string();
    let about_task = || -> Vec<String> {
        bot_posts(&alice.events(&room), &bot.id)
            .into_iter()
            .map(|e| body(&e).to_string())
            .filter(|b| b.contains(&task_id))
            .collect()
    };
    // The result is posted after the answer that was made again: once it is in
    // the room, a second copy of the answer would be too.
    wait_for("the task's result is posted", DEADLINE, || {
        about_task()
            .iter()
            .any(|b| b.contains("succeeded") && b.contains("made once"))
            .then_some(())
    });
    let posts = about_task();
    assert_eq!(
        posts.len(),
        2,
        "the answer and the result, once each: {posts:?}"
    );
    let log = std::fs::read_to_string(&bridge_log).unwrap_or_default();
    assert!(log.contains("will try again"), "no send was lost:\n{log}");
}

/// The bridge posts a task's end and is killed (SIGKILL) before its state file
/// records that (the test hook `AGENTD_BRIDGE_TEST_HOLD_AFTER_POST` holds it in that
/// window). The restarted bridge still follows the task, asks how it stands and
/// posts its end again, and its final edit, with the transaction ids of the first
/// attempts (made of the task's id and the part), so Synapse makes no second event:
/// the room shows the end once. So does an answer posted just before a kill.
#[test]
fn a_task_end_posted_just_before_the_bridge_was_killed_shows_once() {
    let Some(venv) = synapse_venv() else { return };
    let synapse = Synapse::start(&venv);
    let bot = synapse.register("agentd", "bot-password");
    let alice = synapse.register("alice", "alice-password");
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("config.toml");
    let state = home.path().join("matrix-state.json");
    let bridge_log = home.path().join("agentd-matrix.log");
    let _show_log = ShowLogOnFailure(bridge_log.clone());
    let d = Daemon::with_agent_exec(&[]);
    write_bridge_config(
        &config,
        &d,
        &synapse.base,
        &bot,
        &alice,
        &state,
        "progress-interval = \"100ms\"\n",
    );
    let room = alice.create_room("killed", &[&bot.id]);
    let log = || std::fs::read_to_string(&bridge_log).unwrap_or_default();
    let held = |log: &str| log.matches("(a test hook)").count();
    for (hold, text, killed_in) in [
        ("succeeded", "echo the end shows once", "the end"),
        ("started", "echo the answer shows once", "the answer"),
    ] {
        let holds = held(&log());
        let mut bridge = start_bridge_with(
            &config,
            &bridge_log,
            &[("AGENTD_BRIDGE_TEST_HOLD_AFTER_POST", hold)],
        );
        wait_for("the bridge is in the room", DEADLINE, || {
            alice.members(&room).contains(&bot.id).then_some(())
        });
        alice.say(&room, text);
        let task = wait_for("agentd runs the task", DEADLINE, || {
            tasks_with_text(&d, text).into_iter().next()
        });
        let task_id = task["task_id"].as_str().unwrap().to_string();
        d.wait_state(&task_id, "succeeded");
        wait_for("the bridge holds after the post", DEADLINE, || {
            (held(&log()) > holds).then_some(())
        });
        let about_task = || -> Vec<String> {
            posts_about(&alice.events(&room), &bot.id, &task_id)
                .iter()
                .map(|e| body(e).to_string())
                .collect()
        };
        let posted = about_task();
        assert!(
            posted.iter().any(|b| b.contains(hold)),
            "{killed_in} was posted before the kill: {posted:?}"
        );
        if hold == "succeeded" {
            // The end shows the output as a code block to clients that read HTML.
            let end = posts_about(&alice.events(&room), &bot.id, &task_id)
                .into_iter()
                .find(|e| body(e).contains("succeeded"))
                .unwrap();
            assert_eq!(end["content"]["format"], "org.matrix.custom.html", "{end}");
            let html = end["content"]["formatted_body"]
                .as_str()
                .unwrap_or_default();
            assert!(
                html.ends_with("succeeded<pre><code>the end shows once</code></pre>"),
                "{end}"
            );
        }
        let kept = std::fs::read_to_string(&state).unwrap();
        assert!(
            kept.contains(&task_id) || kept.contains("unanswered\":[{"),
            "the state file does not know yet that {killed_in} was posted: {kept}"
        );
        kill(bridge.child.id(), libc::SIGKILL);
        let _ = bridge.child.wait();
        let restarted = start_bridge(&config, &bridge_log);
        wait_for(
            "the restarted bridge reported the task and recorded it",
            DEADLINE,
            || {
                let kept = std::fs::read_to_string(&state).unwrap_or_default();
                (!kept.contains(&task_id) && kept.contains("\"unanswered\":[]")).then_some(())
            },
        );
        let next = format!("echo after {killed_in}");
        alice.say(&room, &next);
        wait_for("the next message's result", DEADLINE, || {
            bot_posts(&alice.events(&room), &bot.id)
                .into_iter()
                .find(|e| body(e).contains(&next[5..]) && body(e).contains("succeeded"))
        });
        let posts = about_task();
        assert_eq!(
            posts.len(),
            2,
            "the answer and the end once each, after a kill just after {killed_in}: {posts:?}"
        );
        drop(restarted);
    }
}

/// A `[matrix]` table that does not load (a misspelt key, a value of the wrong type,
/// a bad duration or URL) stops agentd-matrix with one line naming the file, the line
/// and the key, as agentd names its own keys' errors. No homeserver needed.
#[test]
fn a_bad_matrix_config_is_one_line_naming_the_file_line_and_key() {
    let good = "homeserver = \"http://127.0.0.1:9\"\nuser = \"@bot:example.org\"\n\
                password = \"x\"\nallowed-users = [\"@alice:example.org\"]\n";
    for (extra, want) in [
        (
            "progres-interval = \"1s\"\n",
            "line 8: unknown field `progres-interval`",
        ),
        (
            "progress-interval = 1\n",
            "line 8: [matrix] progress-interval: invalid type",
        ),
        (
            "refusal-interval = \"soon\"\n",
            "line 8: [matrix] refusal-interval: invalid duration",
        ),
        ("rooms = \"!a:b\"\n", "line 8: [matrix] rooms: invalid type"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            format!("max-concurrent = 2\n\n[matrix]\n{good}{extra}"),
        )
        .unwrap();
        let out = Command::new(AGENTD_MATRIX)
            .arg("--config")
            .arg(&path)
            .env_remove("AGENTD_SOCKET")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{extra}: one line: {err}"
        );
        assert!(
            err.contains(&format!("invalid config file {}: {want}", path.display())),
            "{extra}: {err}"
        );
    }
    // A homeserver that is no URL: its line, too.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let text = good.replace("http://127.0.0.1:9", "127.0.0.1:9");
    std::fs::write(&path, format!("[matrix]\n{text}")).unwrap();
    let out = Command::new(AGENTD_MATRIX)
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "invalid config file {}: line 2: [matrix] homeserver: must be an http:// or https:// URL",
            path.display()
        )),
        "{err}"
    );
}
