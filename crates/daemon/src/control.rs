//! Client connections on the control socket.
//!
//! Every connection is accepted and first served on the fast lane ([`FastLane`], a
//! thread `agentd-fast` with a current-thread runtime of its own): it reads request
//! lines (each bounded by [`MAX_REQUEST_BYTES`]) and answers `hello`, `ping` and
//! `status` (without a task id, from the loop's snapshot) itself, so a `status` never
//! waits behind the loop thread's bursts. On a connection's first request of any
//! other kind the connection moves, for good, to the loop's runtime, where one task
//! reads its requests, answers `hello` and `ping` itself, and hands every other
//! request to the supervisor with a [`Replier`], which queues the answer on this
//! connection's output from whichever thread answers. Replies are written by a
//! writer task as they come, so a `stop` that waits for its task to end does not
//! hold up a `status` sent after it on the same connection.
//!
//! **Invariants:** nothing here waits on an agent. Bad input (invalid JSON, unknown
//! commands, oversized lines, random bytes) gets a structured error; an oversized line
//! also closes the connection, since the rest of it cannot be trusted to be a request.
//! Every connection is bounded: at most [`Limits::max_connections`] connections (one
//! past it gets `too_many_connections` and is closed; idle connections count), at
//! most [`MAX_IN_FLIGHT`] requests in flight each (and [`MAX_WATCHES`] live
//! watches), a begun request line must end
//! within the request timeout (else `request_timeout` and the connection closes),
//! and its output is bounded by [`OUTPUT_BUDGET`] (see [`crate::outbox`]).
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentd_proto::control::{
    Answer, ErrorBody, ErrorCode, HelloReply, PingReply, Request, RequestBody, Response,
    CONTROL_PROTOCOL_VERSION, MAX_REQUEST_BYTES,
};
use interprocess::local_socket::tokio::{prelude::*, Listener, Stream};
use interprocess::local_socket::traits::StreamCommon;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

use crate::config::ControlSettings;
pub use crate::outbox::EventSink;
use crate::outbox::{encode_line, Outbox, MAX_IN_FLIGHT, MAX_WATCHES, OUTPUT_BUDGET};
use crate::socket::SocketFile;

mod fast_stream;
use fast_stream::FastStream;

/// What the supervisor answers: a typed result or a structured error.
pub type Reply = Result<Answer, ErrorBody>;

/// A request handed to the supervisor.
#[derive(Debug)]
pub struct ControlRequest {
    pub body: RequestBody,
    /// Where the supervisor sends the answer (possibly much later, for `stop`).
    pub reply: Replier,
    /// For `watch`: where the supervisor sends the events (delivered after the
    /// answer). Dropping it ends the watch.
    pub events: Option<EventSink>,
    /// Counts the request as handed to the supervisor until dropped (see
    /// [`ServerInfo::status`]). The loop drops it once the request is handled and
    /// the status snapshot is up to date.
    pub handed: Option<Handed>,
}

pub use crate::info::{Handed, ServerInfo, StatusSnapshot};
pub use crate::replier::Replier;

/// How long a refused connection may take to receive its refusal, and a closing one
/// its last lines.
const LAST_WORDS: Duration = Duration::from_secs(1);

/// The writer reports progress after each this many bytes of a line.
const WRITE_CHUNK: usize = 64 * 1024;

/// How long a refused connection's input is read (and discarded) before it closes.
const REFUSAL_DRAIN: Duration = Duration::from_millis(200);

/// How often the accept loop checks that its socket file is still there.
pub const SOCKET_CHECK: Duration = Duration::from_secs(1);

/// The connection limits in force; SIGHUP may change them while agentd runs.
#[derive(Debug)]
pub struct Limits {
    max_connections: AtomicUsize,
    request_timeout_ms: AtomicU64,
    /// Connections being served now.
    live: AtomicUsize,
    /// Whether the last connection was refused (to log refusals once per burst).
    refusing: AtomicBool,
    /// The outputs of the connections being served, for [`Limits::flush_all`].
    outboxes: std::sync::Mutex<Vec<std::sync::Weak<Outbox>>>,
}

impl Limits {
    pub fn new(settings: &ControlSettings) -> Arc<Limits> {
        let limits = Arc::new(Limits {
            max_connections: AtomicUsize::new(0),
            request_timeout_ms: AtomicU64::new(0),
            live: AtomicUsize::new(0),
            refusing: AtomicBool::new(false),
            outboxes: std::sync::Mutex::new(Vec::new()),
        });
        limits.update(settings);
        limits
    }

    /// Applies new settings to new connections and new request lines.
    pub fn update(&self, settings: &ControlSettings) {
        self.max_connections
            .store(settings.max_connections.max(1), Ordering::SeqCst);
        let ms = u64::try_from(settings.request_timeout.as_millis()).unwrap_or(u64::MAX);
        self.request_timeout_ms.store(ms.max(1), Ordering::SeqCst);
    }

    /// Registers a connection's output (and forgets those of connections gone).
    fn register(&self, outbox: &Arc<Outbox>) {
        let mut outboxes = self.outboxes.lock().unwrap_or_else(|e| e.into_inner());
        outboxes.retain(|o| o.strong_count() > 0);
        outboxes.push(Arc::downgrade(outbox));
    }

    /// agentd is stopping: every connection writes what waits for it (the last
    /// events of a shutdown among them) and closes, within `within`.
    pub async fn flush_all(&self, within: Duration) {
        let outboxes: Vec<Arc<Outbox>> = self
            .outboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        for outbox in &outboxes {
            outbox.close_after_flush();
        }
        let deadline = tokio::time::Instant::now() + within;
        while outboxes.iter().any(|o| !o.is_done()) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn max_connections(&self) -> usize {
        self.max_connections.load(Ordering::SeqCst)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.load(Ordering::SeqCst))
    }

    /// Counts a new connection in, unless the cap is reached.
    fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let max = self.max_connections();
        self.live
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |live| {
                (live < max).then_some(live + 1)
            })
            .ok()?;
        self.refusing.store(false, Ordering::SeqCst);
        Some(Admitted {
            limits: self.clone(),
        })
    }
}

/// One admitted connection, counted against the cap until dropped.
struct Admitted {
    limits: Arc<Limits>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.limits.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The control socket as the accept loop serves it: the listener, the socket file it
/// re-creates if it is removed, and the limits.
pub struct Endpoint {
    pub listener: Listener,
    /// `None`: the listener's file is not watched (e.g. a test's own listener).
    pub socket: Option<SocketFile>,
    pub limits: Arc<Limits>,
}

impl From<Listener> for Endpoint {
    fn from(listener: Listener) -> Endpoint {
        Endpoint {
            listener,
            socket: None,
            limits: Limits::new(&ControlSettings::default()),
        }
    }
}

/// The fast lane: a thread `agentd-fast` with a current-thread runtime of its own
/// that accepts every control connection and serves it while it asks only
/// read-only control (`hello`, `ping`, `status` without a task id, the last from
/// the loop's snapshot). On its first request of any other kind the connection is
/// handed to the loop's runtime (its stream, the bytes read beyond that line, the
/// parsed request), which serves it from then on as before; it never comes back.
/// So a `status` on a connection that never sent work waits for nothing the loop's
/// thread does (a group commit's burst of acknowledgements and sends), only for its
/// own thread to be woken. Stopped (and joined) by [`FastLane::stop`] or when
/// dropped; it is idle (no timers but the socket check) while no client talks.
pub struct FastLane {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    closing: Arc<Closing>,
}

/// What the fast lane needs to hand a connection to the loop's runtime.
struct MainLane {
    runtime: tokio::runtime::Handle,
    requests: mpsc::Sender<ControlRequest>,
    info: Arc<ServerInfo>,
    limits: Arc<Limits>,
    closing: Arc<Closing>,
}

/// Set when agentd stops: the fast lane's connections read no further, write what
/// they owe (an answer being written to a client that reads it late), and close.
#[derive(Debug, Default)]
struct Closing {
    set: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Closing {
    fn close(&self) {
        self.set.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }
}

impl FastLane {
    /// Starts the fast lane on `endpoint`. Call it on the loop's runtime (whose
    /// handle receives the handed-over connections), in a thread whose signal mask
    /// every agentd thread shares (the new thread inherits it).
    pub fn start(
        endpoint: Endpoint,
        requests: mpsc::Sender<ControlRequest>,
        info: Arc<ServerInfo>,
    ) -> std::io::Result<FastLane> {
        let Endpoint {
            listener,
            socket,
            limits,
        } = endpoint;
        // The listener leaves this runtime's reactor and joins the fast lane's.
        let Listener::UdSocket(listener) = listener;
        let listener = std::os::fd::OwnedFd::try_from(listener)?;
        let closing = Arc::new(Closing::default());
        let main = Arc::new(MainLane {
            runtime: tokio::runtime::Handle::current(),
            requests,
            info,
            limits,
            closing: closing.clone(),
        });
        // Built here, so that a failure is this function's error; run on the thread.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = {
            let _inside = runtime.enter();
            Listener::UdSocket(
                interprocess::os::unix::uds_local_socket::tokio::Listener::try_from(listener)?,
            )
        };
        let (stop, stopped) = oneshot::channel();
        // The runtime goes to the thread once it runs: were the thread not started,
        // it is still here to be shut down (dropping it inside the loop's runtime
        // would panic).
        let (give, take) = std::sync::mpsc::sync_channel::<(tokio::runtime::Runtime, Listener)>(1);
        let thread = std::thread::Builder::new()
            .name("agentd-fast".into())
            .spawn(move || {
                let Ok((runtime, listener)) = take.recv() else {
                    return;
                };
                ask_short_slice();
                runtime.block_on(async move {
                    // Each connection holds a clone until it is done.
                    let (open, mut all_done) = mpsc::channel::<()>(1);
                    tokio::select! {
                        () = accept_loop(listener, socket, main, open) => {}
                        _ = stopped => {}
                    }
                    // The listener is closed: what the connections owe goes out (each
                    // bounds its own last writes by LAST_WORDS), then they close.
                    let _ = tokio::time::timeout(LAST_WORDS, all_done.recv()).await;
                });
            });
        let thread = match thread {
            Ok(thread) => thread,
            Err(e) => {
                drop(listener);
                runtime.shutdown_background();
                return Err(e);
            }
        };
        if let Err(std::sync::mpsc::SendError((runtime, listener))) = give.send((runtime, listener))
        {
            drop(listener);
            runtime.shutdown_background();
            return Err(std::io::Error::other(
                "the fast lane's thread ended at its start",
            ));
        }
        Ok(FastLane {
            stop: Some(stop),
            thread: Some(thread),
            closing,
        })
    }

    /// Stops accepting, and has the connections the fast lane still serves read no
    /// further, write what they owe (for at most [`LAST_WORDS`]) and close (those
    /// handed to the loop's runtime stay there). Returns at once: [`FastLane::stop`]
    /// waits for it.
    pub fn begin_stop(&mut self) {
        self.closing.close();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// [`FastLane::begin_stop`], then waits until the fast lane's connections are
    /// closed and its thread has ended (at most about [`LAST_WORDS`]).
    pub fn stop(&mut self) {
        self.begin_stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for FastLane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Accepts connections until the task is dropped. Checks every [`SOCKET_CHECK`] that
/// the socket file is still there, and re-creates it if it was removed.
async fn accept_loop(
    mut listener: Listener,
    mut socket: Option<SocketFile>,
    main: Arc<MainLane>,
    open: mpsc::Sender<()>,
) {
    let limits = main.limits.clone();
    let mut check = tokio::time::interval(SOCKET_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(stream) => match limits.admit() {
                    Some(admitted) => {
                        let (main, open) = (main.clone(), open.clone());
                        tokio::spawn(async move {
                            serve_fast(stream, main, admitted).await;
                            drop(open);
                        });
                    }
                    None => {
                        if !limits.refusing.swap(true, Ordering::SeqCst) {
                            tracing::warn!(
                                "refusing control connections: {} connections already open (max-connections)",
                                limits.max_connections()
                            );
                        }
                        tokio::spawn(refuse(stream, limits.max_connections()));
                    }
                },
                Err(e) => {
                    tracing::warn!("accept on the control socket failed: {e}");
                    // e.g. EMFILE: let connections end before trying again.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = check.tick(), if socket.is_some() => {
                if let Some(new) = socket.as_mut().and_then(SocketFile::ensure) {
                    listener = new;
                }
            }
        }
    }
}

/// Whether the peer of `stream` is agentd's own user (logs a refusal).
fn peer_is_us(stream: &Stream) -> bool {
    let euid = nix::unistd::geteuid().as_raw();
    match stream.peer_creds() {
        Ok(creds) if creds.euid() == Some(euid) => true,
        Ok(creds) => {
            match creds.euid() {
                Some(uid) => tracing::warn!("refused a control connection from uid {uid}"),
                None => tracing::warn!("refused a control connection from an unknown uid"),
            }
            false
        }
        Err(e) => {
            tracing::warn!("cannot check the peer of a control connection: {e}");
            false
        }
    }
}

/// What the fast lane does with a request it read.
enum FastStep {
    /// Answered (or nothing to answer): read the next line.
    Next,
    /// Said its last words: close the connection.
    Close,
    /// Not read-only control: the connection goes to the loop's runtime.
    HandOver(Request),
}

/// Serves a connection on the fast lane while it asks only `hello`, `ping` and
/// `status` (without a task id); hands it to the loop's runtime on any other request
/// (or a `status` before the loop's first snapshot). Answers are written by this
/// task itself, those of requests already read together in one write; a client that
/// does not read its answers is not read further (the write waits).
async fn serve_fast(stream: Stream, main: Arc<MainLane>, admitted: Admitted) {
    if !peer_is_us(&stream) {
        return;
    }
    tracing::debug!(
        connections = main.limits.live.load(Ordering::Relaxed),
        "control connection accepted"
    );
    // Woken when agentd stops (see `Closing`); registered before the flag is read,
    // so that a stop between the two is not missed.
    let closed = main.closing.notify.notified();
    tokio::pin!(closed);
    closed.as_mut().enable();
    let stream = match FastStream::new(unix_stream(stream)) {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!("cannot serve a control connection: {e}");
            return;
        }
    };
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    let mut out = Vec::new();
    loop {
        // `out` is empty whenever a read waits (what it held was written first).
        if main.closing.is_set() {
            return;
        }
        let timeout = main.limits.request_timeout();
        let read = tokio::select! {
            biased;
            read = read_line_limited(&mut reader, &mut buf, MAX_REQUEST_BYTES, timeout) => read,
            () = &mut closed => return,
        };
        let step = match read {
            Ok(LineRead::Line) => fast_request(&buf, &main.info, &mut out),
            Ok(LineRead::Eof) | Err(_) => {
                let _ = write_owed(reader.get_mut(), &out, closed.as_mut()).await;
                return;
            }
            Ok(LineRead::TooLong) => {
                out.extend(too_long());
                FastStep::Close
            }
            Ok(LineRead::TimedOut) => {
                out.extend(timed_out(timeout));
                FastStep::Close
            }
        };
        match step {
            FastStep::Next => {
                // The next request is already here: its answer goes out with this one.
                // Bounded: the reader refills only once its buffer is used up, so what
                // waits here answers at most one buffer (8 KiB) of request lines.
                if reader.buffer().contains(&b'\n') && !main.closing.is_set() {
                    continue;
                }
                if !write_owed(reader.get_mut(), &out, closed.as_mut()).await {
                    return;
                }
                out.clear();
            }
            FastStep::Close => {
                let _ = tokio::time::timeout(LAST_WORDS, reader.get_mut().write_all(&out)).await;
                return;
            }
            FastStep::HandOver(request) => {
                // What was answered goes first: the loop's runtime answers the rest,
                // unless agentd is stopping (then nothing more is read or answered).
                if !write_owed(reader.get_mut(), &out, closed.as_mut()).await
                    || main.closing.is_set()
                {
                    return;
                }
                let read_ahead = reader.buffer().to_vec();
                let stream = match reader.into_inner().into_std() {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::warn!("cannot hand a control connection over: {e}");
                        return;
                    }
                };
                let to = main.clone();
                main.runtime.spawn(async move {
                    let stream = match tokio::net::UnixStream::from_std(stream) {
                        Ok(stream) => stream,
                        Err(e) => {
                            tracing::warn!("cannot take a control connection over: {e}");
                            return;
                        }
                    };
                    serve(
                        stream,
                        read_ahead,
                        Some(request),
                        to.requests.clone(),
                        to.info.clone(),
                        to.limits.clone(),
                        admitted,
                    )
                    .await;
                });
                return;
            }
        }
    }
}

/// Writes `out` (answers the fast lane owes its client). Should agentd begin to stop
/// meanwhile (`closed`), the write goes on for at most [`LAST_WORDS`] more, so that a
/// client that reads late still gets whole answers. True if it was written before
/// agentd was seen to stop.
async fn write_owed(
    stream: &mut (impl AsyncWrite + Unpin),
    out: &[u8],
    closed: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
) -> bool {
    let write = stream.write_all(out);
    tokio::pin!(write);
    tokio::select! {
        biased;
        written = &mut write => written.is_ok(),
        () = closed => {
            let _ = tokio::time::timeout(LAST_WORDS, write).await;
            false
        }
    }
}

/// A request line read on the fast lane: answers read-only control into `out`.
fn fast_request(line: &[u8], info: &ServerInfo, out: &mut Vec<u8>) -> FastStep {
    agentd_store::timeline::mark(agentd_store::timeline::Stage::Read, 0);
    if line.iter().all(u8::is_ascii_whitespace) {
        return FastStep::Next;
    }
    let request = match Request::from_line(line) {
        Ok(request) => request,
        Err(e) => {
            out.extend(bad_request(line, &e));
            return FastStep::Next;
        }
    };
    let id = request.id;
    match &request.body {
        RequestBody::Hello { protocol, .. } => {
            let (line, step) = hello(id, *protocol);
            out.extend(line);
            step
        }
        RequestBody::Ping => {
            out.extend(ping(id, info));
            FastStep::Next
        }
        RequestBody::Status { task_id: None } => match info.status() {
            Some(status) => {
                out.extend(encode_line(&Response::<Answer>::answer(id, status.into())));
                FastStep::Next
            }
            // Before the loop's first snapshot: the loop answers it.
            None => FastStep::HandOver(request),
        },
        _ => FastStep::HandOver(request),
    }
}

/// The answer to `hello`, and whether the connection goes on.
fn hello(id: u64, protocol: u32) -> (Vec<u8>, FastStep) {
    if protocol != CONTROL_PROTOCOL_VERSION {
        return (
            encode_line(&Response::<Answer>::err(
                Some(id),
                ErrorCode::UnsupportedProtocol,
                format!(
                    "agentd speaks control protocol {CONTROL_PROTOCOL_VERSION}, not {protocol}"
                ),
            )),
            FastStep::Close,
        );
    }
    (
        encode_line(&Response::<Answer>::answer(
            id,
            HelloReply {
                protocol: CONTROL_PROTOCOL_VERSION,
                server: format!("agentd {}", env!("CARGO_PKG_VERSION")),
            }
            .into(),
        )),
        FastStep::Next,
    )
}

fn ping(id: u64, info: &ServerInfo) -> Vec<u8> {
    encode_line(&Response::<Answer>::answer(
        id,
        PingReply {
            pong: true,
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: info.pid,
            uptime_ms: info.uptime_ms(),
        }
        .into(),
    ))
}

fn bad_request(line: &[u8], e: &impl std::fmt::Display) -> Vec<u8> {
    // Echo the id when the line is JSON with a numeric id, so the client can match it.
    let id = serde_json::from_slice::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v.get("id")?.as_u64());
    encode_line(&Response::<Answer>::err(
        id,
        ErrorCode::BadRequest,
        format!("invalid request: {e}"),
    ))
}

fn too_long() -> Vec<u8> {
    encode_line(&Response::<Answer>::err(
        None,
        ErrorCode::RequestTooLarge,
        format!("request line exceeds {MAX_REQUEST_BYTES} bytes; closing the connection"),
    ))
}

fn timed_out(timeout: Duration) -> Vec<u8> {
    tracing::debug!(
        "closing a control connection whose request line did not end within {}",
        crate::logfmt::Secs(timeout)
    );
    encode_line(&Response::<Answer>::err(
        None,
        ErrorCode::RequestTimeout,
        agentd_proto::text::request_timeout(timeout),
    ))
}

/// Tells a connection past the cap why it is closed, then closes it.
async fn refuse(stream: Stream, max: usize) {
    let line = encode_line(&Response::<Answer>::err(
        None,
        ErrorCode::TooManyConnections,
        agentd_proto::text::too_many_connections(max),
    ));
    let mut send_half = &stream;
    let _ = tokio::time::timeout(LAST_WORDS, send_half.write_all(&line)).await;
    // Take in what the client sent meanwhile (usually its hello): closing with
    // unread input would reset the connection before the client reads the refusal.
    let mut sink = [0u8; 4096];
    let mut recv_half = &stream;
    let _ = tokio::time::timeout(REFUSAL_DRAIN, async {
        let mut taken = 0;
        while taken < 64 * 1024 {
            match tokio::io::AsyncReadExt::read(&mut recv_half, &mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => taken += n,
            }
        }
    })
    .await;
}

/// True for requests the supervisor answers while handling them: all but a `stop`
/// that waits for its tasks to end (a chat `/stop` answers at once).
fn answered_at_once(body: &RequestBody) -> bool {
    !matches!(body, RequestBody::Stop { wait: true, .. })
}

enum LineRead {
    Line,
    Eof,
    TooLong,
    /// The line began but did not end within the request timeout.
    TimedOut,
}

/// Reads one line (without its newline) into `buf`, refusing more than `max` bytes.
/// Waiting for a line to begin has no deadline (idle connections are fine); once it
/// has begun it must end within `timeout`.
async fn read_line_limited(
    reader: &mut (impl AsyncBufRead + Unpin),
    buf: &mut Vec<u8>,
    max: usize,
    timeout: Duration,
) -> std::io::Result<LineRead> {
    buf.clear();
    if reader.fill_buf().await?.is_empty() {
        return Ok(LineRead::Eof);
    }
    match tokio::time::timeout(timeout, read_rest(reader, buf, max)).await {
        Ok(read) => read,
        Err(_) => Ok(LineRead::TimedOut),
    }
}

async fn read_rest(
    reader: &mut (impl AsyncBufRead + Unpin),
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<LineRead> {
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

/// How a connection's reader ended.
enum Ending {
    /// The client closed its side: answers in flight still reach it.
    Eof,
    /// agentd gave up on the client: its last lines are flushed (briefly), then the
    /// connection closes.
    Abort,
}

/// Serves a connection handed over by the fast lane on the loop's runtime, from
/// `first` (its first request that is not read-only control) and `read_ahead` (what
/// the fast lane had read beyond it) on, until it closes.
async fn serve(
    stream: tokio::net::UnixStream,
    read_ahead: Vec<u8>,
    first: Option<Request>,
    requests: mpsc::Sender<ControlRequest>,
    info: Arc<ServerInfo>,
    limits: Arc<Limits>,
    _admitted: Admitted,
) {
    // Tokio's own halves: a read that does not fill the buffer tells tokio the socket
    // is drained, so the next line is awaited without a read that fails with EAGAIN
    // (one syscall per request less than interprocess's `&Stream`).
    let (recv_half, mut send_half) = stream.into_split();
    let recv = tokio::io::AsyncReadExt::chain(std::io::Cursor::new(read_ahead), recv_half);
    let outbox = Outbox::new(OUTPUT_BUDGET);
    limits.register(&outbox);
    let write_outbox = outbox.clone();
    let mut writer = tokio::spawn(async move {
        'lines: while let Some(line) = write_outbox.next().await {
            // In chunks, so that a client reading a long answer slowly still counts
            // as reading (see `Outbox::progressed`).
            for chunk in line.chunks(WRITE_CHUNK) {
                if send_half.write_all(chunk).await.is_err() {
                    break 'lines;
                }
                write_outbox.progressed();
            }
            agentd_store::timeline::mark(agentd_store::timeline::Stage::Wrote, 0);
            write_outbox.wrote();
        }
        // The client is gone (or everything was said): watches on it end.
        write_outbox.close();
    });

    let ending = read_requests(recv, first, &outbox, &requests, &info, &limits).await;
    outbox.finish_reading();
    match ending {
        // Let pending answers (e.g. a stop in progress) still reach a half-closed client.
        Ending::Eof => {
            let _ = (&mut writer).await;
        }
        Ending::Abort => {
            outbox.close_after_flush();
            if tokio::time::timeout(LAST_WORDS, &mut writer).await.is_err() {
                writer.abort();
            }
            outbox.close();
        }
    }
}

/// The Unix stream under a local socket stream.
fn unix_stream(stream: Stream) -> tokio::net::UnixStream {
    match stream {
        Stream::UdSocket(stream) => stream.into(),
    }
}

/// What [`read_request`] read.
enum Read {
    Request(Request),
    /// A line that is no request, answered by this error line.
    Answered(Vec<u8>),
    /// A blank line.
    Skip,
    /// The connection ends, after this last line if any.
    End(Ending, Option<Vec<u8>>),
}

/// Reads the next request line of a connection and parses it.
async fn read_request(
    reader: &mut (impl AsyncBufRead + Unpin),
    buf: &mut Vec<u8>,
    limits: &Limits,
) -> Read {
    let timeout = limits.request_timeout();
    match read_line_limited(reader, buf, MAX_REQUEST_BYTES, timeout).await {
        Ok(LineRead::Line) => {
            agentd_store::timeline::mark(agentd_store::timeline::Stage::Read, 0);
        }
        Ok(LineRead::Eof) | Err(_) => return Read::End(Ending::Eof, None),
        Ok(LineRead::TooLong) => return Read::End(Ending::Abort, Some(too_long())),
        Ok(LineRead::TimedOut) => return Read::End(Ending::Abort, Some(timed_out(timeout))),
    }
    if buf.iter().all(u8::is_ascii_whitespace) {
        return Read::Skip;
    }
    match Request::from_line(buf) {
        Ok(request) => Read::Request(request),
        Err(e) => Read::Answered(bad_request(buf, &e)),
    }
}

/// Reads and dispatches requests until the client closes or agentd gives up on it.
async fn read_requests(
    stream: impl tokio::io::AsyncRead + Unpin,
    mut first: Option<Request>,
    outbox: &Arc<Outbox>,
    requests: &mpsc::Sender<ControlRequest>,
    info: &ServerInfo,
    limits: &Limits,
) -> Ending {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    let mut watches = 0u64;
    // This connection's requests not yet handled by the supervisor.
    let handed = Arc::new(AtomicUsize::new(0));
    loop {
        // A client that sends without reading its answers is not read further.
        outbox.wait_for_room(MAX_IN_FLIGHT).await;
        if outbox.is_closed() {
            return Ending::Abort;
        }
        let request = match first.take() {
            Some(request) => request,
            None => match read_request(&mut reader, &mut buf, limits).await {
                Read::Request(request) => request,
                Read::Answered(line) => {
                    outbox.push_encoded(line);
                    continue;
                }
                Read::Skip => continue,
                Read::End(ending, last) => {
                    if let Some(line) = last {
                        outbox.push_encoded(line);
                    }
                    return ending;
                }
            },
        };
        let id = request.id;
        // `status` from the loop's snapshot, unless a request of this connection is
        // still on its way to the loop (then behind it, in order).
        if matches!(request.body, RequestBody::Status { task_id: None })
            && handed.load(Ordering::SeqCst) == 0
        {
            if let Some(status) = info.status() {
                outbox.push(&Response::<Answer>::answer(id, status.into()));
                continue;
            }
        }
        match request.body {
            RequestBody::Hello { protocol, .. } => {
                let (line, step) = hello(id, protocol);
                outbox.push_encoded(line);
                if matches!(step, FastStep::Close) {
                    return Ending::Abort;
                }
            }
            RequestBody::Ping => outbox.push_encoded(ping(id, info)),
            body => {
                // A page of `tasks` can be large: the next request is read only once
                // it is queued, so at most one page waits beyond the output budget.
                let (queued, page_queued) = match body {
                    RequestBody::Tasks { .. } => {
                        let (tx, rx) = oneshot::channel();
                        (Some(tx), Some(rx))
                    }
                    _ => (None, None),
                };
                // Events wait for the answer of a request answered at once.
                let slot = outbox.answering(answered_at_once(&body));
                if matches!(body, RequestBody::Watch { .. }) && outbox.watches() >= MAX_WATCHES {
                    let refused = Response::<Answer>::err(
                        Some(id),
                        ErrorCode::BadRequest,
                        agentd_proto::text::too_many_watches(MAX_WATCHES),
                    );
                    slot.answer(encode_line(&refused));
                    continue;
                }
                let (events, watch_answer) = match body {
                    RequestBody::Watch { .. } => {
                        watches += 1;
                        let (sink, answer) = EventSink::new(outbox, watches, id);
                        (Some(sink), Some(answer))
                    }
                    _ => (None, None),
                };
                let request = ControlRequest {
                    body,
                    reply: Replier::to_connection(id, slot, watch_answer, queued),
                    events,
                    handed: Some(Handed::new(&handed)),
                };
                if let Err(mpsc::error::SendError(request)) = requests.send(request).await {
                    request.reply.send(Err(ErrorBody::new(
                        ErrorCode::ShuttingDown,
                        "agentd is shutting down",
                    )));
                    return Ending::Eof;
                }
                if let Some(page_queued) = page_queued {
                    let _ = page_queued.await;
                }
            }
        }
    }
}

/// The slice the fast lane's thread asks the scheduler for (the shortest Linux
/// takes).
const FAST_SLICE: Duration = Duration::from_micros(100);

/// Asks the scheduler (EEVDF, Linux 6.12 and later) for a short time slice for the
/// calling thread, keeping its policy (normal or batch; any other is left alone)
/// and nice value: a thread woken with a slice shorter than the running thread's
/// preempts it at once instead of waiting for the rest of that thread's slice (the
/// default base slice, 0.7–0.75 ms by kernel version, times 1 + log2 of the CPUs:
/// seen as the fast lane's run-queue wait behind the loop and the store's writer,
/// up to 0.8 ms under the benchmark's load). The fast lane runs a few tens of
/// microseconds per request, well within it, so it gets no more CPU for it, only
/// sooner. Older kernels ignore the value; a refusal is logged and changes nothing.
fn ask_short_slice() {
    // SAFETY: no preconditions; 0 is the calling thread.
    let policy = unsafe { libc::sched_getscheduler(0) } & !libc::SCHED_RESET_ON_FORK;
    if policy != libc::SCHED_OTHER && policy != libc::SCHED_BATCH {
        return;
    }
    // SAFETY: getpriority has no preconditions; for PRIO_PROCESS and 0 it reads the
    // calling thread's nice value.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let attr = libc::sched_attr {
        size: std::mem::size_of::<libc::sched_attr>() as u32,
        sched_policy: policy as u32,
        sched_flags: 0,
        sched_nice: nice,
        sched_priority: 0,
        sched_runtime: FAST_SLICE.as_nanos() as u64,
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: the calling thread (0), a valid sched_attr whose size field says its
    // size, no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            0,
            &attr as *const libc::sched_attr,
            0,
        )
    };
    if rc != 0 {
        tracing::debug!(
            "the fast lane keeps the default time slice: sched_setattr: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], max: usize) -> Vec<Result<String, &'static str>> {
        let mut reader = BufReader::with_capacity(4, input);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        loop {
            match read_line_limited(&mut reader, &mut buf, max, Duration::from_secs(5))
                .await
                .unwrap()
            {
                LineRead::Line => out.push(Ok(String::from_utf8_lossy(&buf).into_owned())),
                LineRead::TooLong => {
                    out.push(Err("too long"));
                    break;
                }
                LineRead::Eof => break,
                LineRead::TimedOut => {
                    out.push(Err("timed out"));
                    break;
                }
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
