//! Client connections on the control socket.
//!
//! One task per connection reads request lines (each bounded by
//! [`MAX_REQUEST_BYTES`]), answers `hello` and `ping` itself, and hands every other
//! request to the supervisor with a reply channel. Replies are written by a writer
//! task as they come, so a `stop` that waits for its task to end does not hold up a
//! `status` sent after it on the same connection.
//!
//! **Invariant:** nothing here waits on an agent. Bad input (invalid JSON, unknown
//! commands, oversized lines, random bytes) gets a structured error; an oversized line
//! also closes the connection, since the rest of it cannot be trusted to be a request.

use std::sync::Arc;
use std::time::Instant;

use agentd_proto::control::{
    Answer, ErrorBody, ErrorCode, EventView, HelloReply, PingReply, Request, RequestBody, Response,
    CONTROL_PROTOCOL_VERSION, MAX_REQUEST_BYTES,
};
use interprocess::local_socket::tokio::{prelude::*, Listener, Stream};
use interprocess::local_socket::traits::StreamCommon;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

/// What the supervisor answers: a typed result or a structured error.
pub type Reply = Result<Answer, ErrorBody>;

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
    let (responses, mut outgoing) = mpsc::unbounded_channel::<Response<Answer>>();
    let write_stream = stream.clone();
    let writer = tokio::spawn(async move {
        let mut send_half = &*write_stream;
        while let Some(response) = outgoing.recv().await {
            let mut line = serde_json::to_vec(&response).unwrap_or_else(|e| {
                format!(r#"{{"id":null,"ok":false,"error":{{"code":"internal","message":"{e}"}}}}"#)
                    .into_bytes()
            });
            line.push(b'\n');
            if send_half.write_all(&line).await.is_err() {
                break;
            }
        }
    });

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
                let _ = responses.send(Response::answer(
                    id,
                    HelloReply {
                        protocol: CONTROL_PROTOCOL_VERSION,
                        server: format!("agentd {}", env!("CARGO_PKG_VERSION")),
                    }
                    .into(),
                ));
            }
            RequestBody::Ping => {
                let _ = responses.send(Response::answer(
                    id,
                    PingReply {
                        pong: true,
                        version: env!("CARGO_PKG_VERSION").to_string(),
                        pid: std::process::id(),
                        uptime_ms: info.started.elapsed().as_millis() as u64,
                    }
                    .into(),
                ));
            }
            body => {
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
                    let _ = responses.send(Response::err(
                        Some(id),
                        ErrorCode::ShuttingDown,
                        "agentd is shutting down",
                    ));
                    break;
                }
                let responses = responses.clone();
                tokio::spawn(async move {
                    let response = match answer.await {
                        Ok(Ok(result)) => Response::answer(id, result),
                        Ok(Err(error)) => Response::failed(Some(id), error),
                        Err(_) => Response::err(
                            Some(id),
                            ErrorCode::ShuttingDown,
                            "agentd is shutting down",
                        ),
                    };
                    let watching = response.ok;
                    let _ = responses.send(response);
                    // A watch streams its events after the answer, until the
                    // supervisor drops the subscription or the client goes away.
                    if let (Some(rx), true) = (event_rx.as_mut(), watching) {
                        while let Some(event) = rx.recv().await {
                            if responses.send(Response::event(id, event)).is_err() {
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
