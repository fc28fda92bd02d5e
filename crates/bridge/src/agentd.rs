//! The bridge's one connection to agentd's control socket (JSON lines,
//! docs/protocol.md): session watches, `send` for every inbound message, and a
//! reader that turns what agentd writes into [`Note`]s. When the connection breaks it
//! reconnects with a growing delay, watches its sessions again and re-sends every
//! message whose answer never came, with the same `message_id`; the core then asks
//! ([`Link::status`]) how the tasks it knew were live stand, since those that ended
//! while the connection was down are in no watch's snapshot.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentd_proto::control::{EventView, SendReply, TaskView, CONTROL_PROTOCOL_VERSION};
use agentd_proto::text;
use anyhow::{bail, Context};
use serde_json::{json, Value};

/// The longest line agentd may write that the bridge reads (a `/tasks` answer is
/// at most about 1 MiB of views).
const MAX_LINE_BYTES: u64 = 8 * 1024 * 1024;
/// The longest wait between two connection attempts.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
/// A connection lost sooner than this after it was made counts as a failed attempt
/// (the delay before the next one grows); one that lasted is retried at once.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// A message handed to agentd.
#[derive(Debug, Clone)]
pub struct Sent {
    pub session: String,
    pub message_id: String,
    pub text: String,
    /// Sent again after a reconnect: its first answer never came.
    pub resent: bool,
}

/// What the reader reports.
#[derive(Debug)]
pub enum Note {
    /// agentd answered a `send`.
    Answer {
        sent: Sent,
        /// The answer, or the error's message for the chat.
        answer: Result<SendReply, String>,
    },
    /// An event of a watched session.
    Event(EventView),
    /// agentd answered a [`Link::status`] of `task_id`: the task's view, or the
    /// error's code (`not_found`: this agentd does not know the task).
    Status {
        task_id: String,
        answer: Result<TaskView, String>,
    },
    /// Connected (again): `server` is agentd's hello answer. Every session is
    /// watched again; tasks that ended meanwhile are not in the new snapshots.
    Connected { server: String },
    /// The watch of `session` lagged and was made again: tasks of the session that
    /// ended in between are not in its snapshot.
    Rewatched { session: String },
    /// agentd refused to watch `session` (`message` says why): it is not watched
    /// again on this connection.
    WatchRefused { session: String, message: String },
    /// The connection broke; messages wait until it is back.
    Lost,
}

#[derive(Default)]
struct LinkState {
    stream: Option<UnixStream>,
    sessions: BTreeSet<String>,
    /// Request id of each session's watch on the current connection.
    watches: HashMap<u64, String>,
    /// Sends not answered yet, by request id on the current connection.
    pending: HashMap<u64, Sent>,
    /// `status` requests not answered yet: the task each asks about.
    statuses: HashMap<u64, String>,
}

/// The control-socket link; cheap to clone.
#[derive(Clone)]
pub struct Link {
    shared: Arc<Shared>,
}

struct Shared {
    socket: PathBuf,
    client: String,
    next_id: AtomicU64,
    state: Mutex<LinkState>,
    notes: Sender<Note>,
}

impl Link {
    pub fn new(socket: PathBuf, client: String, notes: Sender<Note>) -> Link {
        Link {
            shared: Arc::new(Shared {
                socket,
                client,
                next_id: AtomicU64::new(1),
                state: Mutex::new(LinkState::default()),
                notes,
            }),
        }
    }

    /// Starts the reader thread, which connects and keeps reconnecting.
    pub fn spawn(&self) -> std::thread::JoinHandle<()> {
        let link = self.clone();
        std::thread::Builder::new()
            .name("agentd-link".into())
            .spawn(move || link.run())
            .expect("spawn the agentd link thread")
    }

    /// Watches `session` from now on (and after every reconnect).
    pub fn watch(&self, session: &str) {
        let mut state = self.lock();
        if state.sessions.insert(session.to_string()) && state.stream.is_some() {
            self.write_watch(&mut state, session);
        }
    }

    /// Hands a chat message to agentd (after watching its session, so the answer
    /// comes before the task's events). Without a connection it waits for one:
    /// false then.
    pub fn send(&self, session: &str, message_id: &str, text: &str) -> bool {
        self.watch(session);
        let mut state = self.lock();
        let sent = Sent {
            session: session.to_string(),
            message_id: message_id.to_string(),
            text: text.to_string(),
            resent: false,
        };
        let id = self.id();
        let request = send_request(id, &sent);
        state.pending.insert(id, sent);
        if state.stream.is_none() {
            return false;
        }
        write_line(&mut state, &request);
        true
    }

    /// Asks agentd how task `task_id` stands; the answer comes as [`Note::Status`].
    /// Without a connection nothing is asked: the next [`Note::Connected`] is the
    /// time to ask again.
    pub fn status(&self, task_id: &str) {
        let mut state = self.lock();
        if state.stream.is_none() {
            return;
        }
        let id = self.id();
        state.statuses.insert(id, task_id.to_string());
        write_line(
            &mut state,
            &json!({"id": id, "cmd": "status", "task_id": task_id}),
        );
    }

    fn id(&self) -> u64 {
        self.shared.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write_watch(&self, state: &mut LinkState, session: &str) {
        let id = self.id();
        state.watches.insert(id, session.to_string());
        write_line(
            state,
            &json!({"id": id, "cmd": "watch", "session": session}),
        );
    }

    fn run(&self) {
        let mut delay = FIRST_RETRY_DELAY;
        loop {
            match self.connect() {
                Ok((stream, reader, server)) => {
                    let since = Instant::now();
                    tracing::info!(socket = %self.shared.socket.display(), %server, "connected to agentd");
                    self.adopt(stream);
                    let _ = self.shared.notes.send(Note::Connected { server });
                    self.read(reader);
                    let stream = self.lock().stream.take();
                    if let Some(stream) = stream {
                        let _ = stream.shutdown(std::net::Shutdown::Both);
                    }
                    let _ = self.shared.notes.send(Note::Lost);
                    if since.elapsed() >= STABLE_CONNECTION {
                        tracing::warn!("connection to agentd lost; reconnecting");
                        delay = FIRST_RETRY_DELAY;
                    } else {
                        // Lost as soon as it was made: a failed attempt, not a
                        // reason to hammer agentd with new connections.
                        tracing::warn!(
                            "connection to agentd lost right after it was made; retrying in {delay:?}"
                        );
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(MAX_RETRY_DELAY);
                    }
                }
                Err(e) => {
                    tracing::warn!("cannot reach agentd ({e:#}); retrying in {delay:?}");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(MAX_RETRY_DELAY);
                }
            }
        }
    }

    fn connect(&self) -> anyhow::Result<(UnixStream, BufReader<UnixStream>, String)> {
        let stream = UnixStream::connect(&self.shared.socket)
            .with_context(|| format!("connect to {}", self.shared.socket.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let hello = json!({"id": 0, "cmd": "hello", "protocol": CONTROL_PROTOCOL_VERSION,
                           "client": self.shared.client});
        (&stream).write_all(format!("{hello}\n").as_bytes())?;
        let answer = read_line(&mut reader)?.context("agentd closed the connection")?;
        if answer["ok"] != true {
            bail!(
                "hello refused: {}",
                answer["error"]["message"].as_str().unwrap_or("no message")
            );
        }
        stream.set_read_timeout(None)?;
        let server = answer["result"]["server"]
            .as_str()
            .unwrap_or("agentd")
            .to_string();
        Ok((stream, reader, server))
    }

    /// Makes `stream` the connection: watches every session, re-sends every
    /// unanswered message under a new request id.
    fn adopt(&self, stream: UnixStream) {
        let mut state = self.lock();
        state.stream = Some(stream);
        state.watches.clear();
        state.statuses.clear();
        let sessions: Vec<String> = state.sessions.iter().cloned().collect();
        for session in sessions {
            self.write_watch(&mut state, &session);
        }
        let mut pending: Vec<(u64, Sent)> = state.pending.drain().collect();
        pending.sort_by_key(|(id, _)| *id);
        for (_, mut sent) in pending {
            sent.resent = true;
            let id = self.id();
            let request = send_request(id, &sent);
            state.pending.insert(id, sent);
            write_line(&mut state, &request);
        }
    }

    fn read(&self, mut reader: BufReader<UnixStream>) {
        loop {
            let line = match read_line(&mut reader) {
                Ok(Some(line)) => line,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!("reading from agentd: {e:#}");
                    return;
                }
            };
            self.dispatch(line);
        }
    }

    fn dispatch(&self, line: Value) {
        let id = line["id"].as_u64();
        if let Some(event) = line.get("event") {
            match serde_json::from_value::<EventView>(event.clone()) {
                Ok(event) => {
                    let _ = self.shared.notes.send(Note::Event(event));
                }
                Err(e) => tracing::warn!("an event agentd wrote does not parse ({e}): {event}"),
            }
            return;
        }
        let mut state = self.lock();
        if let Some(sent) = id.and_then(|id| state.pending.remove(&id)) {
            drop(state);
            let answer = if line["ok"] == true {
                serde_json::from_value::<SendReply>(line["result"].clone()).map_err(|e| {
                    // The details are for the log; the chat gets a short message.
                    tracing::error!(session = %sent.session, message_id = %sent.message_id,
                        "agentd's answer to a send does not parse ({e}): {line}");
                    text::bridge_answer_unreadable()
                })
            } else {
                Err(line["error"]["message"]
                    .as_str()
                    .unwrap_or("agentd refused the message")
                    .to_string())
            };
            let _ = self.shared.notes.send(Note::Answer { sent, answer });
            return;
        }
        if let Some(task_id) = id.and_then(|id| state.statuses.remove(&id)) {
            drop(state);
            let answer = if line["ok"] == true {
                serde_json::from_value::<TaskView>(line["result"].clone()).map_err(|e| {
                    tracing::error!(%task_id, "agentd's answer to a status does not parse ({e}): {line}");
                    "unreadable".to_string()
                })
            } else {
                Err(line["error"]["code"]
                    .as_str()
                    .unwrap_or("error")
                    .to_string())
            };
            let _ = self.shared.notes.send(Note::Status { task_id, answer });
            return;
        }
        if line["ok"] != true {
            let message = line["error"]["message"]
                .as_str()
                .unwrap_or("no message")
                .to_string();
            let Some(session) = id.and_then(|id| state.watches.remove(&id)) else {
                tracing::warn!("agentd: {message}");
                return;
            };
            if line["error"]["code"] == "lagged" {
                // The watch fell behind and was ended: watch again.
                tracing::warn!(%session, "watch ended: {message}; watching again");
                self.write_watch(&mut state, &session);
                drop(state);
                let _ = self.shared.notes.send(Note::Rewatched { session });
            } else {
                // Refused (a session agentd does not accept): watching again would
                // only be refused again, in a loop.
                drop(state);
                let _ = self
                    .shared
                    .notes
                    .send(Note::WatchRefused { session, message });
            }
        }
    }
}

fn send_request(id: u64, sent: &Sent) -> Value {
    json!({"id": id, "cmd": "send", "session": sent.session, "text": sent.text,
           "message_id": sent.message_id})
}

/// Writes one line; on failure shuts the stream down so the reader reconnects.
fn write_line(state: &mut LinkState, request: &Value) {
    if let Some(stream) = &state.stream {
        let mut line = request.to_string();
        line.push('\n');
        let mut writer = stream;
        if let Err(e) = writer.write_all(line.as_bytes()) {
            tracing::warn!("writing to agentd: {e}");
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// One JSON line, at most [`MAX_LINE_BYTES`]; `None` at the end of the stream.
fn read_line(reader: &mut BufReader<UnixStream>) -> anyhow::Result<Option<Value>> {
    loop {
        let mut buf = Vec::new();
        let n = reader
            .by_ref()
            .take(MAX_LINE_BYTES + 1)
            .read_until(b'\n', &mut buf)?;
        if n == 0 {
            return Ok(None);
        }
        if buf.last() != Some(&b'\n') {
            if n as u64 > MAX_LINE_BYTES {
                bail!("agentd wrote a line longer than {MAX_LINE_BYTES} bytes");
            }
            return Ok(None);
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        return serde_json::from_slice(&buf)
            .map(Some)
            .context("agentd wrote a line that is not JSON");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// agentd's end of a link's connection, faked: reads the link's requests and
    /// writes answers, one JSON line each.
    struct FakeAgentd {
        stream: std::os::unix::net::UnixStream,
        reader: BufReader<std::os::unix::net::UnixStream>,
    }

    impl FakeAgentd {
        /// Accepts the link's connection and answers its `hello`.
        fn accept(listener: &UnixListener) -> FakeAgentd {
            let (stream, _) = listener.accept().unwrap();
            let reader = BufReader::new(stream.try_clone().unwrap());
            let mut agentd = FakeAgentd { stream, reader };
            assert_eq!(agentd.next()["cmd"], "hello");
            agentd
                .write(json!({"id": 0, "ok": true, "result": {"protocol": 1, "server": "agentd"}}));
            agentd
        }

        fn next(&mut self) -> Value {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
        }

        fn write(&self, line: Value) {
            (&self.stream)
                .write_all(format!("{line}\n").as_bytes())
                .unwrap();
        }
    }

    /// An agentd that answers `hello` and hangs up at once, every time (a server
    /// that is failing): the bridge does not reconnect in a tight loop, the delay
    /// between attempts grows as when it cannot connect at all.
    #[test]
    fn a_connection_lost_right_after_hello_is_retried_with_a_growing_delay() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agentd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let (tx, _notes) = std::sync::mpsc::channel();
        Link::new(socket, "test".into(), tx).spawn();
        let started = Instant::now();
        let mut accepted = Vec::new();
        while accepted.len() < 5 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the bridge stopped reconnecting"
            );
            let (stream, _) = listener.accept().unwrap();
            accepted.push(Instant::now());
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut hello = String::new();
            reader.read_line(&mut hello).unwrap();
            (&stream)
                .write_all(b"{\"id\": 0, \"ok\": true, \"result\": {\"protocol\": 1, \"server\": \"agentd\"}}\n")
                .unwrap();
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        // 100 + 200 + 400 + 800 ms of waiting at the least between the five.
        let waited = accepted[4] - accepted[0];
        assert!(
            waited >= Duration::from_millis(1500),
            "five connections in {waited:?}"
        );
    }

    /// agentd answers a `send` with a result the bridge cannot read (a newer or a
    /// broken agentd): the chat gets the short message of text.rs, not serde's
    /// detail, which goes to the log.
    #[test]
    fn an_answer_that_does_not_parse_gives_the_chat_a_short_message() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agentd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let (tx, notes) = std::sync::mpsc::channel();
        let link = Link::new(socket, "test".into(), tx);
        link.spawn();
        let mut agentd = FakeAgentd::accept(&listener);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(
            notes.recv_timeout(Duration::from_secs(30)),
            Ok(Note::Connected { .. })
        ) {
            assert!(Instant::now() < deadline, "never connected");
        }
        assert!(link.send("s", "$m", "work"));
        let send = loop {
            let line = agentd.next();
            if line["cmd"] == "send" {
                break line;
            }
        };
        agentd.write(
            json!({"id": send["id"], "ok": true, "result": {"reply": 42, "accepted": "yes"}}),
        );
        let answer = loop {
            match notes.recv_timeout(Duration::from_secs(30)) {
                Ok(Note::Answer { answer, .. }) => break answer,
                Ok(_) => {}
                Err(e) => panic!("no answer: {e}"),
            }
        };
        assert_eq!(answer.unwrap_err(), text::bridge_answer_unreadable());
    }

    /// agentd refuses a watch (here `bad_request`, as for a session name longer
    /// than 256 bytes): the link does not watch again, which would be refused again
    /// at once, in a tight loop. Only a `lagged` watch is made again.
    #[test]
    fn a_refused_watch_is_not_repeated_but_a_lagged_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agentd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let (tx, notes) = std::sync::mpsc::channel();
        let link = Link::new(socket, "test".into(), tx);
        link.watch("s");
        link.spawn();
        let mut agentd = FakeAgentd::accept(&listener);
        let refuse = |agentd: &mut FakeAgentd, code: &str| {
            let watch = agentd.next();
            assert_eq!(watch["cmd"], "watch", "{watch}");
            agentd.write(json!({"id": watch["id"], "ok": false,
                         "error": {"code": code, "message": "no"}}));
        };
        let wait_note = |what: &str| loop {
            let note = notes
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no note of the {what} watch"));
            if matches!(note, Note::Rewatched { .. } | Note::WatchRefused { .. }) {
                return note;
            }
        };
        refuse(&mut agentd, "lagged");
        assert!(matches!(wait_note("lagged"), Note::Rewatched { session } if session == "s"));
        refuse(&mut agentd, "bad_request");
        let note = wait_note("refused");
        link.status("t");
        let after = agentd.next();
        assert_eq!(
            after["cmd"], "status",
            "watched again after a refusal: {after}"
        );
        assert!(
            matches!(&note, Note::WatchRefused { session, message } if session == "s" && message == "no"),
            "{note:?}"
        );
    }
}
