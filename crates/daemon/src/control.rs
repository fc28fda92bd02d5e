//! Client connections on the control socket.
//!
//! One task per connection reads request lines (each bounded by
//! [`MAX_REQUEST_BYTES`]), answers `hello` and `ping` itself, and hands every other
//! request to the supervisor with a reply channel. Replies are written by a writer
//! task as they come, so a `stop` that waits for its task to end does not hold up a
//! `status` sent after it on the same connection.
//!
//! **Order on a connection:** the answer to a request that is answered at once (all
//! but `stop` and a chat `/stop`) is written before any event published while the
//! supervisor handled it, so a bridge that watches its chat learns a task's id from
//! the `send` answer before it sees an event about that task. [`OrderGate`] does it.
//!
//! **Invariant:** nothing here waits on an agent. Bad input (invalid JSON, unknown
//! commands, oversized lines, random bytes) gets a structured error; an oversized line
//! also closes the connection, since the rest of it cannot be trusted to be a request.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use agentd_core::{parse_chat_command, ChatCommand};
use agentd_proto::control::{
    ErrorCode, EventView, HelloReply, PingReply, Request, RequestBody, Response,
    CONTROL_PROTOCOL_VERSION, MAX_REQUEST_BYTES,
};
use interprocess::local_socket::tokio::{prelude::*, Listener, Stream};
use interprocess::local_socket::traits::StreamCommon;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

/// What the supervisor answers: a JSON result or a structured error.
pub type Reply = Result<serde_json::Value, (ErrorCode, String)>;

/// A request handed to the supervisor.
#[derive(Debug)]
pub struct ControlRequest {
    pub body: RequestBody,
    /// Where the supervisor sends the answer (possibly much later, for `stop`).
    pub reply: oneshot::Sender<Reply>,
    /// For `watch`: where the supervisor sends the events, after the answer.
    pub events: Option<mpsc::UnboundedSender<EventView>>,
}

/// Facts `hello` and `ping` answer without asking the supervisor.
#[derive(Debug)]
pub struct ServerInfo {
    pub started: Instant,
}

/// Accepts connections until the listener fails or the task is dropped.
pub async fn accept_loop(
    listener: Listener,
    requests: mpsc::Sender<ControlRequest>,
    info: Arc<ServerInfo>,
) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                tokio::spawn(serve(stream, requests.clone(), info.clone()));
            }
            Err(e) => {
                tracing::warn!("accept on the control socket failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// A line for the connection's writer, in the order it was handed over.
#[derive(Debug)]
enum Out {
    /// A request answered at once went to the supervisor: hold events until its answer.
    Pending(u64),
    /// The answer to a request (or an error line); `true` when it is the answer a
    /// [`Out::Pending`] announced.
    Answer(Response, bool),
    /// An event line of a watch.
    Event(Response),
}

/// Puts each at-once answer before the events published while its request was being
/// handled. The reader queues [`Out::Pending`] before it hands a request over, so every
/// event the request causes reaches the writer after it; those events wait until the
/// answer is written. Only at-once requests are held for: the wait is the time the
/// supervisor takes to reach and handle them.
#[derive(Debug, Default)]
struct OrderGate {
    /// Ids of at-once requests not answered yet (a client may reuse ids).
    pending: Vec<u64>,
    held: VecDeque<Response>,
}

impl OrderGate {
    /// The lines to write now, in order.
    fn admit(&mut self, out: Out) -> Vec<Response> {
        match out {
            Out::Pending(id) => {
                self.pending.push(id);
                Vec::new()
            }
            Out::Event(event) if !self.pending.is_empty() => {
                self.held.push_back(event);
                Vec::new()
            }
            Out::Event(event) => vec![event],
            Out::Answer(answer, announced) => {
                if let Some(i) = answer
                    .id
                    .filter(|_| announced)
                    .and_then(|id| self.pending.iter().position(|p| *p == id))
                {
                    self.pending.swap_remove(i);
                }
                let mut lines = vec![answer];
                if self.pending.is_empty() {
                    lines.extend(self.held.drain(..));
                }
                lines
            }
        }
    }
}

/// True for requests the supervisor answers while handling them; a `stop` (also as a
/// chat `/stop`) answers only when its tasks have ended.
fn answered_at_once(body: &RequestBody) -> bool {
    match body {
        RequestBody::Stop { .. } => false,
        RequestBody::Send { text, .. } => {
            !matches!(parse_chat_command(text), Some(ChatCommand::Stop(_)))
        }
        _ => true,
    }
}

enum LineRead {
    Line,
    Eof,
    TooLong,
}

/// Reads one line (without its newline) into `buf`, refusing more than `max` bytes.
async fn read_line_limited(
    reader: &mut (impl AsyncBufRead + Unpin),
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<LineRead> {
    buf.clear();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(if buf.is_empty() {
                LineRead::Eof
            } else {
                LineRead::Line
            });
        }
        if let Some(newline) = available.iter().position(|b| *b == b'\n') {
            let fits = buf.len() + newline <= max;
            if fits {
                buf.extend_from_slice(&available[..newline]);
            }
            reader.consume(newline + 1);
            return Ok(if fits {
                LineRead::Line
            } else {
                LineRead::TooLong
            });
        }
        let n = available.len();
        if buf.len() + n > max {
            return Ok(LineRead::TooLong);
        }
        buf.extend_from_slice(available);
        reader.consume(n);
    }
}

/// The connection's writer, as the reader and the answer relays see it.
#[derive(Clone)]
struct Answers(mpsc::UnboundedSender<Out>);

impl Answers {
    fn send(&self, answer: Response) -> Result<(), ()> {
        self.0.send(Out::Answer(answer, false)).map_err(drop)
    }

    /// The answer to a request announced with [`Answers::pending`].
    fn announced(&self, answer: Response) -> Result<(), ()> {
        self.0.send(Out::Answer(answer, true)).map_err(drop)
    }

    fn event(&self, event: Response) -> Result<(), ()> {
        self.0.send(Out::Event(event)).map_err(drop)
    }

    fn pending(&self, id: u64) {
        let _ = self.0.send(Out::Pending(id));
    }
}

async fn serve(stream: Stream, requests: mpsc::Sender<ControlRequest>, info: Arc<ServerInfo>) {
    let euid = nix::unistd::geteuid().as_raw();
    match stream.peer_creds() {
        Ok(creds) if creds.euid() == Some(euid) => {}
        Ok(creds) => {
            tracing::warn!("refused a control connection from uid {:?}", creds.euid());
            return;
        }
        Err(e) => {
            tracing::warn!("cannot check the peer of a control connection: {e}");
            return;
        }
    }
    // `&Stream` reads and writes: the reader and the writer task share it.
    let stream = Arc::new(stream);
    let (out, mut outgoing) = mpsc::unbounded_channel::<Out>();
    let write_stream = stream.clone();
    let writer = tokio::spawn(async move {
        let mut send_half = &*write_stream;
        let mut gate = OrderGate::default();
        while let Some(next) = outgoing.recv().await {
            for response in gate.admit(next) {
                let mut line = serde_json::to_vec(&response).unwrap_or_else(|e| {
                    format!(
                        r#"{{"id":null,"ok":false,"error":{{"code":"internal","message":"{e}"}}}}"#
                    )
                    .into_bytes()
                });
                line.push(b'\n');
                if send_half.write_all(&line).await.is_err() {
                    return;
                }
            }
        }
    });
    let responses = Answers(out);

    let mut reader = BufReader::new(&*stream);
    let mut buf = Vec::new();
    loop {
        match read_line_limited(&mut reader, &mut buf, MAX_REQUEST_BYTES).await {
            Ok(LineRead::Line) => {}
            Ok(LineRead::Eof) | Err(_) => break,
            Ok(LineRead::TooLong) => {
                let _ = responses.send(Response::err(
                    None,
                    ErrorCode::RequestTooLarge,
                    format!(
                        "request line exceeds {MAX_REQUEST_BYTES} bytes; closing the connection"
                    ),
                ));
                break;
            }
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let request: Request = match serde_json::from_slice(&buf) {
            Ok(request) => request,
            Err(e) => {
                // Echo the id when the line is JSON with a numeric id, so the client can match it.
                let id = serde_json::from_slice::<serde_json::Value>(&buf)
                    .ok()
                    .and_then(|v| v.get("id")?.as_u64());
                let _ = responses.send(Response::err(
                    id,
                    ErrorCode::BadRequest,
                    format!("invalid request: {e}"),
                ));
                continue;
            }
        };
        let id = request.id;
        match request.body {
            RequestBody::Hello { protocol, .. } => {
                if protocol != CONTROL_PROTOCOL_VERSION {
                    let _ = responses.send(Response::err(
                        Some(id),
                        ErrorCode::UnsupportedProtocol,
                        format!("agentd speaks control protocol {CONTROL_PROTOCOL_VERSION}, not {protocol}"),
                    ));
                    break;
                }
                let _ = responses.send(Response::ok(
                    id,
                    HelloReply {
                        protocol: CONTROL_PROTOCOL_VERSION,
                        server: format!("agentd {}", env!("CARGO_PKG_VERSION")),
                    },
                ));
            }
            RequestBody::Ping => {
                let _ = responses.send(Response::ok(
                    id,
                    PingReply {
                        pong: true,
                        version: env!("CARGO_PKG_VERSION").to_string(),
                        pid: std::process::id(),
                        uptime_ms: info.started.elapsed().as_millis() as u64,
                    },
                ));
            }
            body => {
                let announced = answered_at_once(&body);
                if announced {
                    responses.pending(id);
                }
                let (reply, answer) = oneshot::channel();
                let (events, mut event_rx) = match body {
                    RequestBody::Watch { .. } => {
                        let (tx, rx) = mpsc::unbounded_channel();
                        (Some(tx), Some(rx))
                    }
                    _ => (None, None),
                };
                if requests
                    .send(ControlRequest {
                        body,
                        reply,
                        events,
                    })
                    .await
                    .is_err()
                {
                    let _ = responses.announced(Response::err(
                        Some(id),
                        ErrorCode::ShuttingDown,
                        "agentd is shutting down",
                    ));
                    break;
                }
                let responses = responses.clone();
                tokio::spawn(async move {
                    let response = match answer.await {
                        Ok(Ok(result)) => Response::ok(id, result),
                        Ok(Err((code, message))) => Response::err(Some(id), code, message),
                        Err(_) => Response::err(
                            Some(id),
                            ErrorCode::ShuttingDown,
                            "agentd is shutting down",
                        ),
                    };
                    let watching = response.ok;
                    let _ = if announced {
                        responses.announced(response)
                    } else {
                        responses.send(response)
                    };
                    // A watch streams its events after the answer, until the
                    // supervisor drops the subscription or the client goes away.
                    if let (Some(rx), true) = (event_rx.as_mut(), watching) {
                        while let Some(event) = rx.recv().await {
                            if responses.event(Response::event(id, event)).is_err() {
                                break;
                            }
                        }
                    }
                });
            }
        }
    }
    drop(responses);
    // Let pending answers (e.g. a stop in progress) still reach a half-closed client.
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], max: usize) -> Vec<Result<String, &'static str>> {
        let mut reader = BufReader::with_capacity(4, input);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        loop {
            match read_line_limited(&mut reader, &mut buf, max).await.unwrap() {
                LineRead::Line => out.push(Ok(String::from_utf8_lossy(&buf).into_owned())),
                LineRead::TooLong => {
                    out.push(Err("too long"));
                    break;
                }
                LineRead::Eof => break,
            }
        }
        out
    }

    #[test]
    fn at_once_answers_come_before_the_events_of_their_handling() {
        let event = |n: u64| Out::Event(Response::ok(n, "event"));
        let ids = |lines: Vec<Response>| lines.iter().map(|r| r.id).collect::<Vec<_>>();
        let mut gate = OrderGate::default();
        assert_eq!(ids(gate.admit(event(9))), [Some(9)]);
        gate.admit(Out::Pending(1));
        gate.admit(Out::Pending(2));
        assert!(gate.admit(event(9)).is_empty());
        // An answer to a request not held for (a stop) goes out at once.
        assert_eq!(
            ids(gate.admit(Out::Answer(Response::ok(7, ""), false))),
            [Some(7)]
        );
        assert_eq!(
            ids(gate.admit(Out::Answer(Response::ok(2, ""), true))),
            [Some(2)]
        );
        assert!(gate.admit(event(8)).is_empty());
        // A ping that reuses id 1 does not release what the pending request 1 holds.
        assert_eq!(
            ids(gate.admit(Out::Answer(Response::ok(1, ""), false))),
            [Some(1)]
        );
        assert_eq!(
            ids(gate.admit(Out::Answer(Response::ok(1, ""), true))),
            [Some(1), Some(9), Some(8)]
        );
        assert_eq!(ids(gate.admit(event(9))), [Some(9)]);
    }

    #[test]
    fn stops_are_not_waited_for() {
        let send = |text: &str| RequestBody::Send {
            session: "s".into(),
            text: text.into(),
            message_id: None,
            priority: None,
            mode: None,
        };
        assert!(answered_at_once(&send("build it")));
        assert!(answered_at_once(&send("/status")));
        assert!(!answered_at_once(&send("/stop all")));
        assert!(!answered_at_once(&RequestBody::Stop {
            task_id: None,
            session: None,
            all: true
        }));
    }

    #[tokio::test]
    async fn bounded_lines() {
        assert_eq!(
            lines(b"ab\ncd\n", 5).await,
            vec![Ok("ab".into()), Ok("cd".into())]
        );
        assert_eq!(
            lines(b"ab\ncd", 5).await,
            vec![Ok("ab".into()), Ok("cd".into())]
        );
        assert_eq!(lines(b"abcde\n", 5).await, vec![Ok("abcde".into())]);
        assert_eq!(lines(b"abcdef\nx\n", 5).await, vec![Err("too long")]);
        assert_eq!(lines(b"abcdefghijkl", 5).await, vec![Err("too long")]);
        assert_eq!(lines(b"", 5).await, vec![]);
    }
}
