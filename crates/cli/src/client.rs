//! A blocking client for agentd's control socket.
//!
//! [`Client`] connects to the control socket (a Unix local socket), says `hello`, and
//! then sends [`RequestBody`] values and waits for their answers. Answers are matched
//! by request id, so requests may be pipelined ([`Client::submit`] then
//! [`Client::wait`]) and answered out of order.
//!
//! [`Client::watch`] subscribes to a task's or a session's events and returns a
//! [`WatchStream`], an iterator over the events as they arrive (read without a
//! timeout; a task watch ends after the task has ended).
//!
//! ```no_run
//! use agentd_cli::client::Client;
//! use agentd_proto::control::{PingReply, RequestBody};
//!
//! let mut client = Client::connect(agentd_proto::paths::default_socket_path())?;
//! let pong: PingReply = client.call(RequestBody::Ping)?;
//! println!("agentd {} (pid {})", pong.version, pong.pid);
//! # Ok::<(), agentd_cli::client::ClientError>(())
//! ```
//!
//! ```no_run
//! use agentd_cli::client::Client;
//!
//! let mut client = Client::connect(agentd_proto::paths::default_socket_path())?;
//! for event in client.watch_task("01a1fb45")? {
//!     let event = event?;
//!     println!("{:?} {}", event.kind, event.text.unwrap_or_default());
//! }
//! # Ok::<(), agentd_cli::client::ClientError>(())
//! ```

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentd_proto::control::{
    ErrorBody, ErrorCode, EventKind, EventView, HelloReply, Request, RequestBody, Response,
    WatchReply, CONTROL_PROTOCOL_VERSION,
};
use interprocess::local_socket::{prelude::*, GenericFilePath, Stream};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{EXIT_DAEMON_ERROR, EXIT_FAILURE, EXIT_UNREACHABLE};

/// How long to wait for the answer to most requests.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long to wait for the answer to `stop`.
///
/// agentd answers a stop only when the stopped tasks have ended, which can take the
/// configured cancel and term graces (5 s + 5 s by default) plus reaping.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(300);

/// Largest answer line accepted from agentd, in bytes.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// How long [`Client::request`] waits for the answer to `body`:
/// [`STOP_TIMEOUT`] for `stop`, [`DEFAULT_TIMEOUT`] for everything else.
pub fn timeout_for(body: &RequestBody) -> Duration {
    match body {
        RequestBody::Stop { .. } => STOP_TIMEOUT,
        _ => DEFAULT_TIMEOUT,
    }
}

/// The client name sent in `hello` by default: `agentctl <version>`.
pub fn default_client_name() -> String {
    format!("agentctl {}", env!("CARGO_PKG_VERSION"))
}

/// Why a request to agentd did not produce a result.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens at the socket path: no socket file, or a stale one.
    #[error(
        "agentd is not running at {} ({reason}): start it with `agentd &` or \
         `systemctl --user start agentd`, or give agentctl its socket with \
         --socket PATH or AGENTD_SOCKET",
        path.display()
    )]
    NotRunning {
        path: PathBuf,
        /// `no socket` or `connection refused`.
        reason: &'static str,
    },
    /// The socket exists but could not be connected to (permissions, bad path…).
    #[error("cannot connect to agentd at {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The socket path names a directory or another file that is no socket.
    #[error("{0}")]
    NotASocket(String),
    /// agentd refused this client's protocol version in `hello`.
    #[error("agentd does not support control protocol version {ours}: {}", error.message)]
    UnsupportedProtocol { ours: u32, error: ErrorBody },
    /// agentd answered the request with an error.
    #[error("{}", .0.message)]
    Daemon(ErrorBody),
    /// No answer arrived in time. The request may still take effect in agentd.
    #[error("agentd did not answer within {} s", .0.as_secs())]
    Timeout(Duration),
    /// agentd closed the connection before answering.
    #[error("agentd closed the connection before answering")]
    Closed,
    /// agentd closed the connection while a watch was still running.
    #[error("agentd closed the connection")]
    Disconnected,
    /// The request cannot be used this way (e.g. [`Client::watch`] without a `watch`
    /// request). Nothing was sent.
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
    /// The connection failed after it was established.
    #[error("connection to agentd failed: {0}")]
    Io(#[source] io::Error),
    /// agentd's answer could not be understood.
    #[error("unexpected answer from agentd: {0}")]
    BadResponse(String),
}

impl ClientError {
    /// The process exit code agentctl uses for this error: [`EXIT_DAEMON_ERROR`] when
    /// agentd answered with an error, [`EXIT_UNREACHABLE`] when it could not be reached,
    /// [`EXIT_FAILURE`] otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Daemon(_) | ClientError::UnsupportedProtocol { .. } => EXIT_DAEMON_ERROR,
            ClientError::NotRunning { .. }
            | ClientError::Connect { .. }
            | ClientError::NotASocket(_) => EXIT_UNREACHABLE,
            ClientError::Timeout(_)
            | ClientError::Closed
            | ClientError::Disconnected
            | ClientError::InvalidRequest(_)
            | ClientError::Io(_)
            | ClientError::BadResponse(_) => EXIT_FAILURE,
        }
    }

    /// The error agentd answered with, if it answered with one.
    pub fn error_body(&self) -> Option<&ErrorBody> {
        match self {
            ClientError::Daemon(e) | ClientError::UnsupportedProtocol { error: e, .. } => Some(e),
            _ => None,
        }
    }

    fn from_io(e: io::Error) -> ClientError {
        match e.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::UnexpectedEof => ClientError::Closed,
            _ => ClientError::Io(e),
        }
    }
}

/// One connection to agentd's control socket, after a successful `hello`.
///
/// Blocking; one request at a time unless [`submit`](Client::submit) and
/// [`wait`](Client::wait) are used to pipeline. At most one [`watch`](Client::watch)
/// at a time: while its [`WatchStream`] lives it borrows the client, and further
/// requests go through [`WatchStream::request`].
#[derive(Debug)]
pub struct Client {
    conn: BufReader<Stream>,
    path: PathBuf,
    next_id: u64,
    /// Bytes of an answer line read so far.
    line: Vec<u8>,
    /// Answers that arrived while another request's answer was awaited.
    early: HashMap<u64, Response>,
    /// The request id of the open watch, whose event lines are kept in `events`
    /// when they arrive while an answer is awaited. Event lines of any other id
    /// (a watch that was dropped) are discarded.
    watch_id: Option<u64>,
    events: VecDeque<EventView>,
    server: HelloReply,
}

impl Client {
    /// Connects to the socket at `path` and says `hello` as `agentctl <version>`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        Client::connect_as(path, &default_client_name())
    }

    /// Connects to the socket at `path` and says `hello` with the given client name
    /// (e.g. `telegram-bridge 1.2`), which agentd may log.
    pub fn connect_as(path: impl AsRef<Path>, client_name: &str) -> Result<Client, ClientError> {
        let path = path.as_ref().to_path_buf();
        let stream = connect_stream(&path)?;
        let mut client = Client {
            conn: BufReader::new(stream),
            path,
            next_id: 1,
            line: Vec::new(),
            early: HashMap::new(),
            watch_id: None,
            events: VecDeque::new(),
            server: HelloReply {
                protocol: CONTROL_PROTOCOL_VERSION,
                server: String::new(),
            },
        };
        let hello = RequestBody::Hello {
            protocol: CONTROL_PROTOCOL_VERSION,
            client: Some(client_name.to_string()),
        };
        let answer = match client.call::<HelloReply>(hello) {
            // agentd may have refused the connection (e.g. too many connections) and
            // closed it before the hello arrived: its last line says why.
            Err(ClientError::Closed) => match client.read_response(
                Some(Instant::now() + Duration::from_secs(1)),
                Duration::from_secs(1),
            ) {
                Ok(response) if !response.ok => {
                    Err(into_result(response).err().unwrap_or(ClientError::Closed))
                }
                _ => Err(ClientError::Closed),
            },
            other => other,
        };
        client.server = match answer {
            Ok(reply) => reply,
            Err(ClientError::Daemon(error)) if error.code == ErrorCode::UnsupportedProtocol => {
                return Err(ClientError::UnsupportedProtocol {
                    ours: CONTROL_PROTOCOL_VERSION,
                    error,
                })
            }
            Err(e) => return Err(e),
        };
        Ok(client)
    }

    /// agentd's answer to `hello` (its protocol version and name, e.g. `agentd 0.1.0`).
    pub fn server(&self) -> &HelloReply {
        &self.server
    }

    /// The socket path this client connected to.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Sends `body` and waits for its result, up to [`timeout_for`]`(&body)`.
    ///
    /// Returns the response's `result` (JSON `null` if agentd sent none), or
    /// [`ClientError::Daemon`] when agentd answered with an error.
    pub fn request(&mut self, body: RequestBody) -> Result<Value, ClientError> {
        let timeout = timeout_for(&body);
        self.request_timeout(body, timeout)
    }

    /// Like [`request`](Client::request), with an explicit timeout.
    pub fn request_timeout(
        &mut self,
        body: RequestBody,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let id = self.submit(body)?;
        self.wait(id, timeout)
    }

    /// Like [`request`](Client::request), decoding the result into `T`
    /// (e.g. [`PingReply`](agentd_proto::control::PingReply) for `ping`).
    pub fn call<T: DeserializeOwned>(&mut self, body: RequestBody) -> Result<T, ClientError> {
        let value = self.request(body)?;
        serde_json::from_value(value).map_err(|e| ClientError::BadResponse(e.to_string()))
    }

    /// Sends `body` without waiting; returns the request id to [`wait`](Client::wait) on.
    pub fn submit(&mut self, body: RequestBody) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = serde_json::to_vec(&Request { id, body })
            .map_err(|e| ClientError::Io(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        line.push(b'\n');
        let stream = self.conn.get_mut();
        stream
            .set_send_timeout(Some(DEFAULT_TIMEOUT))
            .map_err(ClientError::Io)?;
        stream
            .write_all(&line)
            .and_then(|()| stream.flush())
            .map_err(ClientError::from_io)?;
        Ok(id)
    }

    /// Waits up to `timeout` for the answer to request `id`, keeping answers to other
    /// requests for their own `wait` (and events of the open watch for its stream).
    ///
    /// An error answer without an id (agentd could not parse a request line at all) is
    /// returned to whichever request is being waited for.
    pub fn wait(&mut self, id: u64, timeout: Duration) -> Result<Value, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(response) = self.early.remove(&id) {
                return into_result(response);
            }
            let mut response = self.read_response(Some(deadline), timeout)?;
            if let Some(event) = response.event.take() {
                if response.id.is_some() && response.id == self.watch_id {
                    self.events.push_back(event);
                }
                continue;
            }
            match response.id {
                Some(got) if got == id => return into_result(response),
                Some(got) => {
                    self.early.insert(got, response);
                }
                None if !response.ok => return into_result(response),
                None => {
                    return Err(ClientError::BadResponse(
                        "a successful answer without a request id".into(),
                    ))
                }
            }
        }
    }

    /// Subscribes to events with a `watch` request (see [`RequestBody::Watch`]) and
    /// returns the stream of its events once agentd has accepted it.
    ///
    /// agentd's watch is authoritative: its first events are a snapshot (a merged
    /// message's `merged` steps, then the followed task's `position`, `started` or
    /// `finished`), so a task watch of an ended task ends at once. A session watch
    /// runs until the connection closes.
    pub fn watch(&mut self, body: RequestBody) -> Result<WatchStream<'_>, ClientError> {
        let RequestBody::Watch { task_id, .. } = &body else {
            return Err(ClientError::InvalidRequest("watch needs a watch request"));
        };
        let requested_task = task_id.clone();
        let id = self.submit(body)?;
        self.watch_id = Some(id);
        self.events.clear();
        let mut stream = WatchStream {
            client: self,
            id,
            reply: WatchReply::default(),
            task: None,
            done: false,
            skipped: 0,
        };
        let value = stream.client.wait(id, DEFAULT_TIMEOUT)?;
        stream.reply =
            serde_json::from_value(value).map_err(|e| ClientError::BadResponse(e.to_string()))?;
        stream.task = stream.reply.task_id.clone().or(requested_task);
        Ok(stream)
    }

    /// [`watch`](Client::watch) one task until it ends.
    pub fn watch_task(&mut self, task_id: &str) -> Result<WatchStream<'_>, ClientError> {
        self.watch(RequestBody::Watch {
            task_id: Some(task_id.to_string()),
            session: None,
        })
    }

    /// [`watch`](Client::watch) every task of a session, until the connection closes.
    pub fn watch_session(&mut self, session: &str) -> Result<WatchStream<'_>, ClientError> {
        self.watch(RequestBody::Watch {
            task_id: None,
            session: Some(session.to_string()),
        })
    }

    /// Reads the next non-empty answer line and parses it; without a deadline it
    /// waits as long as it takes.
    fn read_response(
        &mut self,
        deadline: Option<Instant>,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        loop {
            let remaining = match deadline {
                Some(deadline) => {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    if remaining.is_zero() {
                        return Err(ClientError::Timeout(timeout));
                    }
                    Some(remaining)
                }
                None => None,
            };
            self.conn
                .get_ref()
                .set_recv_timeout(remaining)
                .map_err(ClientError::Io)?;
            let room = (MAX_RESPONSE_BYTES + 1).saturating_sub(self.line.len()) as u64;
            let read = (&mut self.conn)
                .take(room)
                .read_until(b'\n', &mut self.line);
            match read {
                Ok(0) => return Err(ClientError::Closed),
                Ok(_) if self.line.last() == Some(&b'\n') => {
                    let line = std::mem::take(&mut self.line);
                    let text = trim_line(&line);
                    if text.is_empty() {
                        continue;
                    }
                    return serde_json::from_slice(text)
                        .map_err(|e| ClientError::BadResponse(e.to_string()));
                }
                Ok(_) if self.line.len() > MAX_RESPONSE_BYTES => {
                    return Err(ClientError::BadResponse(format!(
                        "an answer longer than {MAX_RESPONSE_BYTES} bytes"
                    )))
                }
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ClientError::Timeout(timeout))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ClientError::from_io(e)),
            }
        }
    }
}

/// The events of one `watch`, as they arrive: an iterator of
/// `Result<`[`EventView`]`, `[`ClientError`]`>`, from [`Client::watch`].
///
/// Reads block without a timeout. A task watch follows its message: a `merged`
/// event of the watched task moves the watch to the task it went into
/// ([`task_id`](WatchStream::task_id) changes), and the stream ends (`None`) after
/// the `finished` event of the task it follows. A session watch ends only when the
/// connection does. An error (agentd closed the connection:
/// [`ClientError::Disconnected`]; an error answer to the watch; an unreadable line)
/// is yielded once, and then the stream ends.
///
/// Dropping the stream ends the subscription on the client's side: later event
/// lines of this watch are discarded.
#[derive(Debug)]
pub struct WatchStream<'a> {
    client: &'a mut Client,
    id: u64,
    reply: WatchReply,
    /// For a task watch, the task followed now (the full id once agentd sent it).
    task: Option<String>,
    done: bool,
    /// `skipped` of the last event yielded.
    skipped: u64,
}

impl WatchStream<'_> {
    /// agentd's answer to the `watch` request.
    pub fn reply(&self) -> &WatchReply {
        &self.reply
    }

    /// How many progress lines agentd left out right before the event yielded last
    /// (it coalesces progress for a client that reads slower than it comes).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// The id of the `watch` request, which agentd's event lines carry.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// For a task watch, the task it follows now: the watched one, or the task its
    /// message was merged into, as far as the events yielded so far tell.
    pub fn task_id(&self) -> Option<&str> {
        self.task.as_deref()
    }

    /// Sends another request on the same connection and waits for its answer (up to
    /// [`timeout_for`]`(&body)`); events that arrive meanwhile are kept for the stream.
    pub fn request(&mut self, body: RequestBody) -> Result<Value, ClientError> {
        self.client.request(body)
    }

    /// Like [`request`](WatchStream::request), decoding the result into `T`.
    pub fn call<T: DeserializeOwned>(&mut self, body: RequestBody) -> Result<T, ClientError> {
        self.client.call(body)
    }

    /// Yields `event`, following the task it went into or ending the stream after it.
    fn deliver(&mut self, event: EventView) -> Option<Result<EventView, ClientError>> {
        if let Some(task) = &self.task {
            match step(task, &event) {
                Step::Follow(into) => self.task = Some(into),
                Step::End => self.done = true,
                Step::Stay => {}
            }
        }
        Some(Ok(event))
    }

    /// Yields `error` and ends the stream.
    fn fail(&mut self, error: ClientError) -> Option<Result<EventView, ClientError>> {
        self.done = true;
        Some(Err(match error {
            ClientError::Closed => ClientError::Disconnected,
            e => e,
        }))
    }
}

impl Iterator for WatchStream<'_> {
    type Item = Result<EventView, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        self.skipped = 0;
        if let Some(event) = self.client.events.pop_front() {
            return self.deliver(event);
        }
        loop {
            let mut response = match self.client.read_response(None, Duration::ZERO) {
                Ok(response) => response,
                Err(e) => return self.fail(e),
            };
            match (response.id, response.event.take()) {
                (Some(id), Some(event)) if id == self.id => {
                    self.skipped = response.skipped.unwrap_or(0);
                    return self.deliver(event);
                }
                // A watch dropped earlier on this connection.
                (_, Some(_)) => continue,
                (Some(id), None) if id == self.id => {
                    if let Err(e) = into_result(response) {
                        return self.fail(e);
                    }
                    // A later success line for the watch carries nothing for the stream.
                }
                (Some(id), None) => {
                    // The answer to a request pipelined before the watch.
                    self.client.early.insert(id, response);
                }
                (None, None) => {
                    let error = match into_result(response) {
                        Err(e) => e,
                        Ok(_) => ClientError::BadResponse(
                            "a successful answer without a request id".into(),
                        ),
                    };
                    return self.fail(error);
                }
            }
        }
    }
}

impl Drop for WatchStream<'_> {
    fn drop(&mut self) {
        self.client.watch_id = None;
        self.client.events.clear();
    }
}

/// What an event does to a task watch that follows `task`.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Stay,
    /// The message went into this task; follow it.
    Follow(String),
    /// The task ended: the stream ends after this event.
    End,
}

/// See [`Step`]. `task` may be a prefix of the id (as the user typed it).
fn step(task: &str, event: &EventView) -> Step {
    if !event.task_id.starts_with(task) {
        return Step::Stay;
    }
    match event.kind {
        EventKind::Merged => {
            let into = event
                .into
                .clone()
                .or_else(|| event.task.as_ref().and_then(|t| t.merged_into.clone()));
            match into {
                Some(into) if into != event.task_id => Step::Follow(into),
                _ => Step::End,
            }
        }
        EventKind::Finished => Step::End,
        _ => Step::Stay,
    }
}

/// What `path` is when it is there but is no socket (looked at only once a connect
/// failed): a directory, or another kind of file.
fn not_a_socket(path: &Path) -> Option<ClientError> {
    use agentd_proto::text;
    use std::os::unix::fs::FileTypeExt;
    let kind = std::fs::metadata(path).ok()?.file_type();
    if kind.is_socket() {
        return None;
    }
    let message = if kind.is_dir() {
        text::socket_is_a_directory(path, &path.join("agentd.sock"))
    } else {
        let what = if kind.is_file() {
            "a regular file"
        } else if kind.is_fifo() {
            "a named pipe"
        } else {
            "a device or other special file"
        };
        text::socket_is_not_a_socket(path, what)
    };
    Some(ClientError::NotASocket(message))
}

fn connect_stream(path: &Path) -> Result<Stream, ClientError> {
    let connect_error =
        |source: io::Error| not_a_socket(path).unwrap_or_else(|| connect_failed(path, source));
    let name = path
        .to_fs_name::<GenericFilePath>()
        .map_err(connect_error)?;
    Stream::connect(name).map_err(connect_error)
}

fn connect_failed(path: &Path, source: io::Error) -> ClientError {
    match source.kind() {
        io::ErrorKind::NotFound => ClientError::NotRunning {
            path: path.to_path_buf(),
            reason: "no socket",
        },
        io::ErrorKind::ConnectionRefused => ClientError::NotRunning {
            path: path.to_path_buf(),
            reason: "connection refused",
        },
        _ => ClientError::Connect {
            path: path.to_path_buf(),
            source,
        },
    }
}

fn trim_line(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn into_result(response: Response) -> Result<Value, ClientError> {
    if response.ok {
        Ok(response.result.unwrap_or(Value::Null))
    } else {
        match response.error {
            Some(error) => Err(ClientError::Daemon(error)),
            None => Err(ClientError::BadResponse(
                "an error answer without an error".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentd_proto::control::{PingReply, TaskState};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::thread;

    /// A fake agentd: accepts one connection and hands it to `script`.
    fn fake_server<F>(script: F) -> (tempfile::TempDir, PathBuf, thread::JoinHandle<()>)
    where
        F: FnOnce(BufReader<UnixStream>, UnixStream) + Send + 'static,
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agentd.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let reader = BufReader::new(stream.try_clone().unwrap());
            script(reader, stream);
        });
        (dir, path, handle)
    }

    fn read_request(reader: &mut BufReader<UnixStream>) -> Request {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.ends_with('\n'), "request line not newline-terminated");
        serde_json::from_str(&line).unwrap()
    }

    fn answer(writer: &mut UnixStream, response: &Response) {
        let mut line = serde_json::to_string(response).unwrap();
        line.push('\n');
        writer.write_all(line.as_bytes()).unwrap();
    }

    fn answer_hello(reader: &mut BufReader<UnixStream>, writer: &mut UnixStream) {
        let hello = read_request(reader);
        assert_eq!(
            hello.body,
            RequestBody::Hello {
                protocol: CONTROL_PROTOCOL_VERSION,
                client: Some(format!("agentctl {}", env!("CARGO_PKG_VERSION"))),
            }
        );
        answer(
            writer,
            &Response::ok(
                hello.id,
                HelloReply {
                    protocol: CONTROL_PROTOCOL_VERSION,
                    server: "agentd 0.1.0".into(),
                },
            ),
        );
    }

    fn pong() -> PingReply {
        PingReply {
            pong: true,
            version: "0.1.0".into(),
            pid: 42,
            uptime_ms: 3_000,
        }
    }

    #[test]
    fn says_hello_then_answers_one_request() {
        let (_dir, path, server) = fake_server(|mut reader, mut writer| {
            answer_hello(&mut reader, &mut writer);
            let request = read_request(&mut reader);
            assert_eq!(request.body, RequestBody::Ping);
            answer(&mut writer, &Response::ok(request.id, pong()));
        });
        let mut client = Client::connect(&path).unwrap();
        assert_eq!(client.server().server, "agentd 0.1.0");
        assert_eq!(client.socket_path(), path);
        let reply: PingReply = client.call(RequestBody::Ping).unwrap();
        assert_eq!(reply, pong());
        server.join().unwrap();
    }

    #[test]
    fn matches_out_of_order_answers_by_id() {
        let (_dir, path, server) = fake_server(|mut reader, mut writer| {
            answer_hello(&mut reader, &mut writer);
            let first = read_request(&mut reader);
            let second = read_request(&mut reader);
            // Blank lines are tolerated; the second answer comes first.
            writer.write_all(b"\n").unwrap();
            answer(&mut writer, &Response::ok(second.id, "second"));
            answer(&mut writer, &Response::ok(first.id, "first"));
        });
        let mut client = Client::connect(&path).unwrap();
        let stop = RequestBody::Stop {
            task_id: None,
            session: None,
            all: true,
            wait: true,
        };
        let first = client.submit(stop).unwrap();
        let second = client.submit(RequestBody::Ping).unwrap();
        assert_eq!(client.wait(first, DEFAULT_TIMEOUT).unwrap(), "first");
        assert_eq!(client.wait(second, DEFAULT_TIMEOUT).unwrap(), "second");
        server.join().unwrap();
    }

    #[test]
    fn daemon_errors_are_returned_with_their_code() {
        let (_dir, path, server) = fake_server(|mut reader, mut writer| {
            answer_hello(&mut reader, &mut writer);
            let request = read_request(&mut reader);
            answer(
                &mut writer,
                &Response::err(Some(request.id), ErrorCode::NotFound, "no task abc"),
            );
        });
        let mut client = Client::connect(&path).unwrap();
        let err = client
            .request(RequestBody::Status {
                task_id: Some("abc".into()),
            })
            .unwrap_err();
        assert_eq!(err.to_string(), "no task abc");
        assert_eq!(err.exit_code(), EXIT_DAEMON_ERROR);
        assert_eq!(err.error_body().map(|e| e.code), Some(ErrorCode::NotFound));
        server.join().unwrap();
    }

    #[test]
    fn unsupported_protocol_is_one_clear_error() {
        let (_dir, path, server) = fake_server(|mut reader, mut writer| {
            let hello = read_request(&mut reader);
            answer(
                &mut writer,
                &Response::err(
                    Some(hello.id),
                    ErrorCode::UnsupportedProtocol,
                    "agentd 9.0 speaks control protocol 9",
                ),
            );
        });
        let err = Client::connect(&path).unwrap_err();
        assert!(matches!(
            err,
            ClientError::UnsupportedProtocol { ours: 1, .. }
        ));
        assert_eq!(
            err.to_string(),
            "agentd does not support control protocol version 1: \
             agentd 9.0 speaks control protocol 9"
        );
        assert_eq!(err.exit_code(), EXIT_DAEMON_ERROR);
        server.join().unwrap();
    }

    #[test]
    fn missing_socket_means_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope").join("agentd.sock");
        let err = Client::connect(&path).unwrap_err();
        assert!(matches!(err, ClientError::NotRunning { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "agentd is not running at {} (no socket){HINT}",
                path.display()
            )
        );
        assert_eq!(err.exit_code(), EXIT_UNREACHABLE);
    }

    /// What a not-running error says to do.
    const HINT: &str = ": start it with `agentd &` or `systemctl --user start agentd`, \
                        or give agentctl its socket with --socket PATH or AGENTD_SOCKET";

    #[test]
    fn stale_socket_means_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agentd.sock");
        drop(UnixListener::bind(&path).unwrap());
        let err = Client::connect(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "agentd is not running at {} (connection refused){HINT}",
                path.display()
            )
        );
        assert_eq!(err.exit_code(), EXIT_UNREACHABLE);
    }

    #[test]
    fn a_closed_connection_is_reported() {
        let (_dir, path, server) = fake_server(|mut reader, mut writer| {
            answer_hello(&mut reader, &mut writer);
            let _ = read_request(&mut reader);
            // Half an answer, then hang up.
            writer.write_all(br#"{"id":2,"ok":tr"#).unwrap();
        });
        let mut client = Client::connect(&path).unwrap();
        let err = client.request(RequestBody::Ping).unwrap_err();
        server.join().unwrap();
        assert!(matches!(err, ClientError::Closed), "{err:?}");
        assert_eq!(err.exit_code(), EXIT_FAILURE);
    }

    #[test]
    fn a_silent_daemon_times_out() {
        let (_dir, path, server) = fake_server(|mut reader, mut writer| {
            answer_hello(&mut reader, &mut writer);
            let _ = read_request(&mut reader);
            // Hold the connection open without answering until the client gives up.
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
        });
        let mut client = Client::connect(&path).unwrap();
        let started = Instant::now();
        let err = client
            .request_timeout(RequestBody::Ping, Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(err, ClientError::Timeout(_)), "{err:?}");
        assert!(started.elapsed() >= Duration::from_millis(200));
        drop(client);
        server.join().unwrap();
    }

    #[test]
    fn garbage_answers_are_bad_responses() {
        let (_dir, path, server) = fake_server(|mut reader, mut writer| {
            answer_hello(&mut reader, &mut writer);
            let _ = read_request(&mut reader);
            writer.write_all(b"this is not json\n").unwrap();
        });
        let mut client = Client::connect(&path).unwrap();
        let err = client.request(RequestBody::Ping).unwrap_err();
        assert!(matches!(err, ClientError::BadResponse(_)), "{err:?}");
        server.join().unwrap();
    }

    fn event(kind: EventKind, task_id: &str, text: Option<&str>) -> EventView {
        EventView {
            kind,
            task_id: task_id.into(),
            session: "alice".into(),
            position: None,
            text: text.map(String::from),
            into: None,
            task: None,
            at: None,
        }
    }

    fn view(task_id: &str, state: TaskState) -> agentd_proto::control::TaskView {
        crate::fixtures::task(task_id, "alice", state, "x")
    }

    /// Reads the watch request and answers it with `reply`; returns its id.
    fn answer_watch(
        reader: &mut BufReader<UnixStream>,
        writer: &mut UnixStream,
        expected: RequestBody,
        reply: WatchReply,
    ) -> u64 {
        let watch = read_request(reader);
        assert_eq!(watch.body, expected);
        answer(writer, &Response::ok(watch.id, reply));
        watch.id
    }

    #[test]
    fn a_task_watch_streams_events_until_the_task_has_ended() {
        const FULL: &str = "0190aaaa-0000-7000-8000-000000000001";
        let (_dir, path, server) = fake_server(|mut reader, mut writer| {
            answer_hello(&mut reader, &mut writer);
            let ping = read_request(&mut reader);
            let watch = answer_watch(
                &mut reader,
                &mut writer,
                RequestBody::Watch {
                    task_id: Some("0190aaaa".into()),
                    session: None,
                },
                WatchReply {
                    task_id: Some(FULL.into()),
                    session: None,
                    task: None,
                },
            );
            // Kept for the stream while the client waits for the ping's answer.
            answer(
                &mut writer,
                &Response::event(watch, event(EventKind::Started, FULL, None)),
            );
            // An event of another (earlier) watch is ignored; the pipelined ping's
            // answer is kept for its `wait`.
            answer(
                &mut writer,
                &Response::event(99, event(EventKind::Started, "other", None)),
            );
            answer(&mut writer, &Response::ok(ping.id, pong()));
            let events = [
                event(EventKind::Progress, FULL, Some("half")),
                // The message is merged into another task: the watch follows it.
                EventView {
                    into: Some("t-2".into()),
                    ..event(EventKind::Merged, FULL, None)
                },
                event(EventKind::Progress, "t-2", Some("more")),
                EventView {
                    task: Some(view("t-2", TaskState::Succeeded)),
                    ..event(EventKind::Finished, "t-2", None)
                },
            ];
            for e in events {
                answer(&mut writer, &Response::event(watch, e));
            }
            // An event past the end, which the stream must not yield. The client may
            // be gone by now (it stops at `finished`), so this write may fail.
            let past: Response =
                Response::event(watch, event(EventKind::Progress, "t-2", Some("never read")));
            let mut line = serde_json::to_string(&past).unwrap();
            line.push('\n');
            let _ = writer.write_all(line.as_bytes());
            // Keep the connection open until the client is done.
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
        });
        let mut client = Client::connect(&path).unwrap();
        let ping = client.submit(RequestBody::Ping).unwrap();
        let mut stream = client.watch_task("0190aaaa").unwrap();
        assert_eq!(stream.task_id(), Some(FULL));
        assert_eq!(stream.reply().task_id.as_deref(), Some(FULL));
        let kinds: Vec<(EventKind, Option<String>)> = stream
            .by_ref()
            .map(|e| {
                let e = e.unwrap();
                (e.kind, e.text)
            })
            .collect();
        assert_eq!(
            kinds,
            [
                (EventKind::Started, None),
                (EventKind::Progress, Some("half".into())),
                (EventKind::Merged, None),
                (EventKind::Progress, Some("more".into())),
                (EventKind::Finished, None),
            ]
        );
        assert!(stream.next().is_none());
        assert_eq!(stream.task_id(), Some("t-2"));
        drop(stream);
        let reply: PingReply =
            serde_json::from_value(client.wait(ping, DEFAULT_TIMEOUT).unwrap()).unwrap();
        assert_eq!(reply, pong());
        drop(client);
        server.join().unwrap();
    }

    #[test]
    fn a_watch_of_an_ended_task_ends_with_agentds_snapshot_and_asks_nothing_more() {
        let (_dir, path, server) = fake_server(|mut reader, mut writer| {
            answer_hello(&mut reader, &mut writer);
            // As agentd does: t-1 went into t-0, which has ended too; the answer names
            // the followed task and the snapshot events follow it.
            let watch = answer_watch(
                &mut reader,
                &mut writer,
                RequestBody::Watch {
                    task_id: Some("t-1".into()),
                    session: None,
                },
                WatchReply {
                    task_id: Some("t-0".into()),
                    session: None,
                    task: Some(view("t-0", TaskState::Failed)),
                },
            );
            let merged = EventView {
                into: Some("t-0".into()),
                ..event(EventKind::Merged, "t-1", None)
            };
            let done = EventView {
                task: Some(view("t-0", TaskState::Failed)),
                ..event(EventKind::Finished, "t-0", None)
            };
            answer(&mut writer, &Response::event(watch, merged));
            answer(&mut writer, &Response::event(watch, done));
            // The client sends nothing more (no catch-up status).
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
            assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
        });
        let mut client = Client::connect(&path).unwrap();
        let mut stream = client.watch_task("t-1").unwrap();
        assert_eq!(
            stream.reply().task.as_ref().map(|t| t.state),
            Some(TaskState::Failed)
        );
        let events: Vec<EventView> = stream.by_ref().map(Result::unwrap).collect();
        assert_eq!(stream.task_id(), Some("t-0"));
        drop(stream);
        let seen: Vec<_> = events
            .iter()
            .map(|e| (e.kind, e.task_id.as_str(), e.into.as_deref()))
            .collect();
        assert_eq!(
            seen,
            [
                (EventKind::Merged, "t-1", Some("t-0")),
                (EventKind::Finished, "t-0", None),
            ]
        );
        drop(client);
        server.join().unwrap();
    }

    #[test]
    fn a_session_watch_ends_when_the_connection_closes() {
        let (_dir, path, server) = fake_server(|mut reader, mut writer| {
            answer_hello(&mut reader, &mut writer);
            let watch = answer_watch(
                &mut reader,
                &mut writer,
                RequestBody::Watch {
                    task_id: None,
                    session: Some("alice".into()),
                },
                WatchReply {
                    task_id: None,
                    session: Some("alice".into()),
                    task: None,
                },
            );
            // A finished task does not end a session watch.
            let done = EventView {
                task: Some(view("t-1", TaskState::Succeeded)),
                ..event(EventKind::Finished, "t-1", None)
            };
            answer(&mut writer, &Response::event(watch, done));
            answer(
                &mut writer,
                &Response::event(watch, event(EventKind::Accepted, "t-2", None)),
            );
        });
        let mut client = Client::connect(&path).unwrap();
        let err = client.watch(RequestBody::Ping).unwrap_err();
        assert!(matches!(err, ClientError::InvalidRequest(_)), "{err:?}");
        let mut stream = client.watch_session("alice").unwrap();
        assert_eq!(stream.task_id(), None);
        assert_eq!(stream.next().unwrap().unwrap().task_id, "t-1");
        assert_eq!(stream.next().unwrap().unwrap().task_id, "t-2");
        let err = stream.next().unwrap().unwrap_err();
        assert!(matches!(err, ClientError::Disconnected), "{err:?}");
        assert_eq!(err.to_string(), "agentd closed the connection");
        assert_eq!(err.exit_code(), EXIT_FAILURE);
        assert!(stream.next().is_none());
        drop(stream);
        server.join().unwrap();
    }

    #[test]
    fn an_error_for_the_watch_ends_the_stream() {
        let (_dir, path, server) = fake_server(|mut reader, mut writer| {
            answer_hello(&mut reader, &mut writer);
            let watch = answer_watch(
                &mut reader,
                &mut writer,
                RequestBody::Watch {
                    task_id: None,
                    session: Some("alice".into()),
                },
                WatchReply {
                    task_id: None,
                    session: Some("alice".into()),
                    task: None,
                },
            );
            answer(
                &mut writer,
                &Response::err(
                    Some(watch),
                    ErrorCode::ShuttingDown,
                    "agentd is shutting down",
                ),
            );
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
        });
        let mut client = Client::connect(&path).unwrap();
        let mut stream = client.watch_session("alice").unwrap();
        let err = stream.next().unwrap().unwrap_err();
        assert_eq!(
            err.error_body().map(|e| e.code),
            Some(ErrorCode::ShuttingDown)
        );
        assert!(stream.next().is_none());
        drop(stream);
        drop(client);
        server.join().unwrap();
    }

    #[test]
    fn stop_waits_longer_than_other_requests() {
        let stop = RequestBody::Stop {
            task_id: Some("t".into()),
            session: None,
            all: false,
            wait: true,
        };
        assert!(timeout_for(&stop) >= Duration::from_secs(120));
        assert_eq!(timeout_for(&RequestBody::Ping), DEFAULT_TIMEOUT);
    }
}
