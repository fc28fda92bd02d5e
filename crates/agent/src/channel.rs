//! The agent's end of the IPC channel: taking the inherited fd, the handshake, a
//! shareable sender, a receiver for a reader thread, and the heartbeat thread.

use std::io::BufReader;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use agentd_proto::codec::{self, FrameError};
use agentd_proto::ipc::{
    AgentHello, AgentMsg, Capabilities, SupervisorMsg, TaskStart, ENV_IPC_FD, IPC_PROTOCOL_VERSION,
};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};

/// Environment variable with the heartbeat period in milliseconds.
pub const ENV_HEARTBEAT_MS: &str = "AGENTD_HEARTBEAT_MS";
/// Heartbeat period when [`ENV_HEARTBEAT_MS`] is unset or invalid.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(2000);

/// Set once the inherited fd has been wrapped, so that it never has two owners.
static IPC_FD_TAKEN: AtomicBool = AtomicBool::new(false);

/// Why an agent could not set up its channel to agentd.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "{ENV_IPC_FD} is not set: this program is an agentd agent and must be started by agentd"
    )]
    NotStartedByAgentd,
    #[error("{ENV_IPC_FD}={value:?} is not a file descriptor number")]
    InvalidFdNumber { value: String },
    #[error("{ENV_IPC_FD}={fd} is not an open file descriptor ({errno}): was this program started by agentd?")]
    FdNotOpen { fd: RawFd, errno: nix::errno::Errno },
    #[error("{ENV_IPC_FD}={fd} is not a socket: was this program started by agentd?")]
    NotASocket { fd: RawFd },
    #[error("the agentd channel ({ENV_IPC_FD}) was already taken by this process")]
    AlreadyTaken,
    #[error("cannot set up the agentd channel: {0}")]
    Setup(std::io::Error),
    #[error("agentd refused this agent: {reason}")]
    Rejected { reason: String },
    #[error("agentd closed the channel during the handshake")]
    ClosedDuringHandshake,
    #[error("agentd speaks IPC protocol {theirs}, this agent speaks {ours}")]
    ProtocolMismatch { ours: u32, theirs: u32 },
    #[error("unexpected message from agentd during the handshake: expected {expected}, got {got}")]
    UnexpectedMessage {
        expected: &'static str,
        got: &'static str,
    },
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// A `Hello` for this crate's protocol version.
pub fn hello(agent: impl Into<String>, capabilities: Capabilities) -> AgentHello {
    AgentHello {
        protocol: IPC_PROTOCOL_VERSION,
        agent: agent.into(),
        capabilities,
    }
}

/// Takes ownership of the socket whose number is in `$AGENTD_IPC_FD`, without any
/// handshake. The fd is checked to be an open socket, made close-on-exec (so that
/// commands the agent spawns cannot inherit it) and put in blocking mode.
///
/// Succeeds at most once per process. Most agents want [`AgentChannel::from_env`].
pub fn ipc_stream_from_env() -> Result<UnixStream, AgentError> {
    let value = std::env::var_os(ENV_IPC_FD).ok_or(AgentError::NotStartedByAgentd)?;
    let text = value.to_string_lossy();
    let fd: RawFd = text
        .trim()
        .parse()
        .ok()
        .filter(|fd| *fd >= 0)
        .ok_or_else(|| AgentError::InvalidFdNumber {
            value: text.to_string(),
        })?;
    // SAFETY: F_GETFD only inspects the descriptor table; no memory is involved.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(AgentError::FdNotOpen {
            fd,
            errno: nix::errno::Errno::last(),
        });
    }
    // SAFETY: `st` is a properly sized, zeroed out-parameter for fstat.
    let is_socket = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK
    };
    if !is_socket {
        return Err(AgentError::NotASocket { fd });
    }
    if IPC_FD_TAKEN.swap(true, Ordering::SeqCst) {
        return Err(AgentError::AlreadyTaken);
    }
    // SAFETY: the fd is open and a socket (checked above), agentd handed it to this
    // process for exclusive use, and the flag above makes this the only owner.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    fcntl(&stream, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| AgentError::Setup(e.into()))?;
    stream.set_nonblocking(false).map_err(AgentError::Setup)?;
    Ok(stream)
}

/// The agent's end of the channel after a successful handshake.
pub struct AgentChannel {
    sender: AgentSender,
    receiver: AgentReceiver,
}

impl std::fmt::Debug for AgentChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentChannel").finish_non_exhaustive()
    }
}

impl AgentChannel {
    /// Takes the inherited channel ([`ipc_stream_from_env`]) and runs the handshake
    /// ([`AgentChannel::handshake`]). Returns the channel and the task to run.
    pub fn from_env(hello: AgentHello) -> Result<(AgentChannel, TaskStart), AgentError> {
        Self::handshake(ipc_stream_from_env()?, hello)
    }

    /// Runs the handshake on an already connected stream: sends `hello`, then
    /// expects `Welcome` (for the protocol `hello` names) followed by `Start`.
    pub fn handshake(
        stream: UnixStream,
        hello: AgentHello,
    ) -> Result<(AgentChannel, TaskStart), AgentError> {
        let ours = hello.protocol;
        let write_half = stream.try_clone().map_err(AgentError::Setup)?;
        let sender = AgentSender {
            inner: Arc::new(Mutex::new(SenderState {
                stream: write_half,
                result_sent: false,
            })),
        };
        let mut receiver = AgentReceiver {
            reader: BufReader::new(stream),
        };
        sender.send(&AgentMsg::Hello(hello))?;
        match receiver.recv()? {
            None => return Err(AgentError::ClosedDuringHandshake),
            Some(SupervisorMsg::Welcome { protocol }) if protocol == ours => {}
            Some(SupervisorMsg::Welcome { protocol }) => {
                return Err(AgentError::ProtocolMismatch {
                    ours,
                    theirs: protocol,
                })
            }
            Some(SupervisorMsg::Reject { reason }) => return Err(AgentError::Rejected { reason }),
            Some(other) => {
                return Err(AgentError::UnexpectedMessage {
                    expected: "Welcome",
                    got: message_name(&other),
                })
            }
        }
        let task = match receiver.recv()? {
            None => return Err(AgentError::ClosedDuringHandshake),
            Some(SupervisorMsg::Start(task)) => task,
            Some(SupervisorMsg::Reject { reason }) => return Err(AgentError::Rejected { reason }),
            Some(other) => {
                return Err(AgentError::UnexpectedMessage {
                    expected: "Start",
                    got: message_name(&other),
                })
            }
        };
        Ok((AgentChannel { sender, receiver }, task))
    }

    /// A handle that sends on this channel; clone it freely across threads.
    pub fn sender(&self) -> AgentSender {
        self.sender.clone()
    }

    /// Sends one message (see [`AgentSender::send`]).
    pub fn send(&self, msg: &AgentMsg) -> Result<(), FrameError> {
        self.sender.send(msg)
    }

    /// Receives one message (see [`AgentReceiver::recv`]).
    pub fn recv(&mut self) -> Result<Option<SupervisorMsg>, FrameError> {
        self.receiver.recv()
    }

    /// Splits the channel so that the receiver can move to a reader thread.
    pub fn into_parts(self) -> (AgentSender, AgentReceiver) {
        (self.sender, self.receiver)
    }
}

struct SenderState {
    stream: UnixStream,
    result_sent: bool,
}

/// Sends frames to agentd. Cheap to clone; every clone writes through one mutex, so
/// frames from different threads never interleave.
#[derive(Clone)]
pub struct AgentSender {
    inner: Arc<Mutex<SenderState>>,
}

impl std::fmt::Debug for AgentSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSender").finish_non_exhaustive()
    }
}

impl AgentSender {
    fn lock(&self) -> MutexGuard<'_, SenderState> {
        // A panic while holding the lock cannot leave the stream in a state that is
        // worse than a half-written frame, which agentd detects anyway.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends one message and flushes it.
    ///
    /// The result ends the conversation: once a [`AgentMsg::Result`] was sent, the
    /// heartbeat thread ([`spawn_heartbeat`]) stops and every further `send` fails
    /// without writing, so that agentd never sees a message after the result.
    pub fn send(&self, msg: &AgentMsg) -> Result<(), FrameError> {
        let mut state = self.lock();
        if state.result_sent {
            return Err(FrameError::Io(std::io::Error::other(
                "a result was already sent on this channel",
            )));
        }
        if matches!(msg, AgentMsg::Result(_)) {
            state.result_sent = true;
        }
        codec::write_frame(&mut state.stream, msg)
    }

    /// Sends `Progress { text }`.
    pub fn progress(&self, text: impl Into<String>) -> Result<(), FrameError> {
        self.send(&AgentMsg::Progress { text: text.into() })
    }

    /// Sends a heartbeat unless a result was already sent. `Ok(false)`: not sent.
    pub fn heartbeat(&self) -> Result<bool, FrameError> {
        let mut state = self.lock();
        if state.result_sent {
            return Ok(false);
        }
        codec::write_frame(&mut state.stream, &AgentMsg::Heartbeat)?;
        Ok(true)
    }

    /// Whether a result has been sent on this channel.
    pub fn result_sent(&self) -> bool {
        self.lock().result_sent
    }

    /// Shuts the socket down in both directions: agentd sees EOF, and a thread blocked
    /// in [`AgentReceiver::recv`] on the same channel returns `Ok(None)`.
    pub fn shutdown(&self) {
        let _ = self.lock().stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Receives frames from agentd. Owned by exactly one reader (thread).
pub struct AgentReceiver {
    reader: BufReader<UnixStream>,
}

impl std::fmt::Debug for AgentReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentReceiver").finish_non_exhaustive()
    }
}

impl AgentReceiver {
    /// Blocks for the next message. `Ok(None)` is EOF: agentd is gone, and the agent
    /// must stop its work at once. An error (garbled or oversized frame, i/o error)
    /// leaves the channel unusable and should be handled the same way.
    pub fn recv(&mut self) -> Result<Option<SupervisorMsg>, FrameError> {
        codec::read_frame(&mut self.reader)
    }
}

/// The variant name of a supervisor message, for error messages and logs.
pub fn message_name(msg: &SupervisorMsg) -> &'static str {
    match msg {
        SupervisorMsg::Welcome { .. } => "Welcome",
        SupervisorMsg::Reject { .. } => "Reject",
        SupervisorMsg::Start(_) => "Start",
        SupervisorMsg::Cancel => "Cancel",
        SupervisorMsg::Steer { .. } => "Steer",
    }
}

/// The heartbeat period from `$AGENTD_HEARTBEAT_MS` (a positive number of
/// milliseconds), else [`DEFAULT_HEARTBEAT`].
pub fn heartbeat_interval_from_env() -> Duration {
    std::env::var(ENV_HEARTBEAT_MS)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_HEARTBEAT)
}

/// Spawns a thread that sends a heartbeat every `interval` until sending fails
/// (agentd is gone) or a result has been sent.
pub fn spawn_heartbeat(sender: AgentSender, interval: Duration) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("agentd-heartbeat".into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            match sender.heartbeat() {
                Ok(true) => {}
                Ok(false) | Err(_) => break,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentd_proto::ipc::TaskResult;

    fn start() -> TaskStart {
        TaskStart {
            task_id: "t1".into(),
            session: "s1".into(),
            text: "do it".into(),
        }
    }

    /// Plays agentd: queues `replies` and returns the supervisor end.
    fn supervisor(replies: &[SupervisorMsg]) -> (UnixStream, UnixStream) {
        let (agent, mut sup) = UnixStream::pair().unwrap();
        for r in replies {
            codec::write_frame(&mut sup, r).unwrap();
        }
        (agent, sup)
    }

    #[test]
    fn handshake_sends_hello_and_returns_the_task() {
        let (agent, mut sup) = supervisor(&[
            SupervisorMsg::Welcome {
                protocol: IPC_PROTOCOL_VERSION,
            },
            SupervisorMsg::Start(start()),
            SupervisorMsg::Cancel,
        ]);
        let (mut chan, task) =
            AgentChannel::handshake(agent, hello("test 1", Capabilities { steer: true })).unwrap();
        assert_eq!(task, start());
        let got: AgentMsg = codec::read_frame(&mut sup).unwrap().unwrap();
        assert_eq!(
            got,
            AgentMsg::Hello(AgentHello {
                protocol: IPC_PROTOCOL_VERSION,
                agent: "test 1".into(),
                capabilities: Capabilities { steer: true },
            })
        );
        // Messages queued right behind Start are not lost to the handshake's buffer.
        assert_eq!(chan.recv().unwrap(), Some(SupervisorMsg::Cancel));
        chan.sender().progress("p").unwrap();
        let got: AgentMsg = codec::read_frame(&mut sup).unwrap().unwrap();
        assert_eq!(got, AgentMsg::Progress { text: "p".into() });
        drop(sup);
        assert_eq!(chan.recv().unwrap(), None);
    }

    #[test]
    fn reject_is_an_error_with_the_reason() {
        let (agent, _sup) = supervisor(&[SupervisorMsg::Reject {
            reason: "protocol 999 unsupported".into(),
        }]);
        let err = AgentChannel::handshake(agent, hello("x", Capabilities::default())).unwrap_err();
        assert!(matches!(err, AgentError::Rejected { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "agentd refused this agent: protocol 999 unsupported"
        );
    }

    #[test]
    fn eof_and_wrong_order_during_the_handshake() {
        let (agent, sup) = supervisor(&[]);
        drop(sup);
        let err = AgentChannel::handshake(agent, hello("x", Capabilities::default())).unwrap_err();
        // The Hello write may fail first (EPIPE) or the read sees EOF: both are errors.
        assert!(
            matches!(
                err,
                AgentError::ClosedDuringHandshake | AgentError::Frame(_)
            ),
            "{err}"
        );

        let (agent, _sup) = supervisor(&[SupervisorMsg::Start(start())]);
        let err = AgentChannel::handshake(agent, hello("x", Capabilities::default())).unwrap_err();
        assert!(
            matches!(
                err,
                AgentError::UnexpectedMessage {
                    expected: "Welcome",
                    got: "Start"
                }
            ),
            "{err}"
        );

        let (agent, _sup) = supervisor(&[SupervisorMsg::Welcome { protocol: 7 }]);
        let err = AgentChannel::handshake(agent, hello("x", Capabilities::default())).unwrap_err();
        assert!(matches!(err, AgentError::ProtocolMismatch { .. }), "{err}");
    }

    #[test]
    fn garbage_from_agentd_is_an_error_not_a_panic() {
        let (agent, mut sup) = UnixStream::pair().unwrap();
        use std::io::Write;
        sup.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).unwrap();
        let err = AgentChannel::handshake(agent, hello("x", Capabilities::default())).unwrap_err();
        assert!(
            matches!(err, AgentError::Frame(FrameError::TooLarge { .. })),
            "{err}"
        );
    }

    #[test]
    fn heartbeats_stop_after_the_result() {
        let (agent, mut sup) = supervisor(&[
            SupervisorMsg::Welcome {
                protocol: IPC_PROTOCOL_VERSION,
            },
            SupervisorMsg::Start(start()),
        ]);
        let (chan, _) =
            AgentChannel::handshake(agent, hello("x", Capabilities::default())).unwrap();
        let _: AgentMsg = codec::read_frame(&mut sup).unwrap().unwrap(); // Hello
        let sender = chan.sender();
        let hb = spawn_heartbeat(sender.clone(), Duration::from_millis(10)).unwrap();
        for _ in 0..2 {
            let got: AgentMsg = codec::read_frame(&mut sup).unwrap().unwrap();
            assert_eq!(got, AgentMsg::Heartbeat);
        }
        let result = AgentMsg::Result(TaskResult {
            outcome: agentd_proto::ipc::Outcome::Succeeded,
            text: "ok".into(),
            command_exit: None,
        });
        sender.send(&result).unwrap();
        hb.join().unwrap();
        sender.shutdown();
        let mut rest = Vec::new();
        while let Some(msg) = codec::read_frame::<AgentMsg>(&mut sup).unwrap() {
            rest.push(msg);
        }
        // Only heartbeats sent before the result, then the result, then nothing.
        assert_eq!(rest.last(), Some(&result));
        assert!(rest[..rest.len() - 1]
            .iter()
            .all(|m| *m == AgentMsg::Heartbeat));
    }

    #[test]
    fn env_errors_are_clear() {
        // Only the parsing paths that do not depend on this process's environment
        // racing with other tests: the not-set message is the one users see first.
        assert_eq!(
            AgentError::NotStartedByAgentd.to_string(),
            "AGENTD_IPC_FD is not set: this program is an agentd agent and must be started by agentd"
        );
    }
}
