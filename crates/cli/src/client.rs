//! A blocking client for agentd's control socket.
//!
//! [`Client`] connects to the control socket (a Unix local socket), says `hello`, and
//! then sends [`RequestBody`] values and waits for their answers. Answers are matched
//! by request id, so requests may be pipelined ([`Client::submit`] then
//! [`Client::wait`]) and answered out of order.
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

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentd_proto::control::{
    ErrorBody, ErrorCode, HelloReply, Request, RequestBody, Response, CONTROL_PROTOCOL_VERSION,
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
    #[error("agentd is not running at {} ({reason})", path.display())]
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
            ClientError::NotRunning { .. } | ClientError::Connect { .. } => EXIT_UNREACHABLE,
            ClientError::Timeout(_)
            | ClientError::Closed
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
/// [`wait`](Client::wait) are used to pipeline.
#[derive(Debug)]
pub struct Client {
    conn: BufReader<Stream>,
    path: PathBuf,
    next_id: u64,
    /// Bytes of an answer line read so far.
    line: Vec<u8>,
    /// Answers that arrived while another request's answer was awaited.
    early: HashMap<u64, Response>,
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
            server: HelloReply {
                protocol: CONTROL_PROTOCOL_VERSION,
                server: String::new(),
            },
        };
        let hello = RequestBody::Hello {
            protocol: CONTROL_PROTOCOL_VERSION,
            client: Some(client_name.to_string()),
        };
        client.server = match client.call::<HelloReply>(hello) {
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
    /// requests for their own `wait`.
    ///
    /// An error answer without an id (agentd could not parse a request line at all) is
    /// returned to whichever request is being waited for.
    pub fn wait(&mut self, id: u64, timeout: Duration) -> Result<Value, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(response) = self.early.remove(&id) {
                return into_result(response);
            }
            let response = self.read_response(deadline, timeout)?;
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

    /// Reads the next non-empty answer line and parses it.
    fn read_response(
        &mut self,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(ClientError::Timeout(timeout));
            }
            self.conn
                .get_ref()
                .set_recv_timeout(Some(remaining))
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

fn connect_stream(path: &Path) -> Result<Stream, ClientError> {
    let connect_error = |source: io::Error| match source.kind() {
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
    };
    let name = path
        .to_fs_name::<GenericFilePath>()
        .map_err(connect_error)?;
    Stream::connect(name).map_err(connect_error)
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
    use agentd_proto::control::PingReply;
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
            format!("agentd is not running at {} (no socket)", path.display())
        );
        assert_eq!(err.exit_code(), EXIT_UNREACHABLE);
    }

    #[test]
    fn stale_socket_means_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agentd.sock");
        drop(UnixListener::bind(&path).unwrap());
        let err = Client::connect(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "agentd is not running at {} (connection refused)",
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

    #[test]
    fn stop_waits_longer_than_other_requests() {
        let stop = RequestBody::Stop {
            task_id: Some("t".into()),
            session: None,
            all: false,
        };
        assert!(timeout_for(&stop) >= Duration::from_secs(120));
        assert_eq!(timeout_for(&RequestBody::Ping), DEFAULT_TIMEOUT);
    }
}
