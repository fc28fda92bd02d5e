//! The agent's end of the IPC channel: taking the inherited fd, the handshake
//! (protocol 2 with a fallback to 1), a shareable sender with helpers for every
//! message an agent sends, a receiver for a reader thread, and the heartbeat thread.

use std::io::BufReader;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use agentd_proto::codec::{self, FrameError};
use agentd_proto::ipc::{
    AgentFeatures, AgentHello, AgentMsg, AgentSettings, Capabilities, Outcome, SupervisorMsg,
    TaskResult, TaskStart, ENV_IPC_FD, IPC_PROTOCOL_VERSION, MAX_CHECKPOINT_BYTES,
    MIN_IPC_PROTOCOL_VERSION,
};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};

/// Environment variable with the heartbeat period in milliseconds, used when
/// agentd sends no [`SupervisorMsg::Settings`] (protocol 1).
pub const ENV_HEARTBEAT_MS: &str = "AGENTD_HEARTBEAT_MS";
/// Heartbeat period when agentd sends no settings and [`ENV_HEARTBEAT_MS`] is unset
/// or invalid.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(2000);

/// Set once the inherited fd has been wrapped, so that it never has two owners.
static IPC_FD_TAKEN: AtomicBool = AtomicBool::new(false);

/// Why an agent could not set up its channel to agentd.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// `$AGENTD_IPC_FD` is not set: the program was not started by agentd.
    #[error(
        "{ENV_IPC_FD} is not set: this program is an agentd agent and must be started by agentd"
    )]
    NotStartedByAgentd,
    /// `$AGENTD_IPC_FD` does not hold a descriptor number.
    #[error("{ENV_IPC_FD}={value:?} is not a file descriptor number")]
    InvalidFdNumber {
        /// What the variable holds.
        value: String,
    },
    /// The descriptor named by `$AGENTD_IPC_FD` is not open.
    #[error("{ENV_IPC_FD}={fd} is not an open file descriptor ({errno}): was this program started by agentd?")]
    FdNotOpen {
        /// The descriptor number.
        fd: RawFd,
        /// Why `fcntl(F_GETFD)` failed.
        errno: nix::errno::Errno,
    },
    /// The descriptor named by `$AGENTD_IPC_FD` is not a socket.
    #[error("{ENV_IPC_FD}={fd} is not a socket: was this program started by agentd?")]
    NotASocket {
        /// The descriptor number.
        fd: RawFd,
    },
    /// The channel was taken before ([`ipc_stream_from_env`] succeeds once).
    #[error("the agentd channel ({ENV_IPC_FD}) was already taken by this process")]
    AlreadyTaken,
    /// The socket could not be made close-on-exec and blocking, or cloned.
    #[error("cannot set up the agentd channel: {0}")]
    Setup(std::io::Error),
    /// agentd answered the Hello with `Reject`.
    #[error("agentd refused this agent: {reason}")]
    Rejected {
        /// agentd's reason.
        reason: String,
    },
    /// agentd closed the channel before the task was received.
    #[error("agentd closed the channel during the handshake")]
    ClosedDuringHandshake,
    /// agentd's Welcome named a protocol this agent does not speak.
    #[error("agentd speaks IPC protocol {theirs}, this agent speaks {MIN_IPC_PROTOCOL_VERSION} to {ours}")]
    ProtocolMismatch {
        /// The newest protocol this agent offered in its Hello.
        ours: u32,
        /// The protocol agentd's Welcome named.
        theirs: u32,
    },
    /// agentd sent a message that does not belong in the handshake.
    #[error("unexpected message from agentd during the handshake: expected {expected}, got {got}")]
    UnexpectedMessage {
        /// What was expected.
        expected: &'static str,
        /// The variant that came.
        got: &'static str,
    },
    /// A frame could not be read or written.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// A resumed attempt: agentd's [`SupervisorMsg::Resume`], received before the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// The task this attempt resumes.
    pub previous_task_id: String,
    /// The last checkpoint that task saved ([`AgentSender::checkpoint`]), if any.
    pub checkpoint: Option<String>,
}

/// What the handshake settled besides the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// The protocol both sides speak: agentd's `Welcome` (1 with an older agentd).
    pub protocol: u32,
    /// agentd's settings ([`SupervisorMsg::Settings`]; protocol 2 only).
    pub settings: Option<AgentSettings>,
    /// Set when this task resumes an earlier one.
    pub resume: Option<Resume>,
}

impl Handshake {
    /// How often to send heartbeats: agentd's setting, else
    /// [`heartbeat_interval_from_env`].
    pub fn heartbeat_interval(&self) -> Duration {
        self.settings
            .map(|s| s.heartbeat_interval_ms)
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis)
            .unwrap_or_else(heartbeat_interval_from_env)
    }
}

/// A `Hello` for this crate's protocol version ([`IPC_PROTOCOL_VERSION`]).
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
    handshake: Handshake,
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

    /// [`AgentChannel::from_env`] with the [`AgentFeatures`] to announce.
    pub fn from_env_with(
        hello: AgentHello,
        features: AgentFeatures,
    ) -> Result<(AgentChannel, TaskStart), AgentError> {
        Self::handshake_with(ipc_stream_from_env()?, hello, features)
    }

    /// Runs the handshake on an already connected stream, announcing
    /// [`AgentFeatures::default`] (collected prompts, no checkpoints: what a v1
    /// agent is taken to want). See [`AgentChannel::handshake_with`].
    pub fn handshake(
        stream: UnixStream,
        hello: AgentHello,
    ) -> Result<(AgentChannel, TaskStart), AgentError> {
        Self::handshake_with(stream, hello, AgentFeatures::default())
    }

    /// Runs the handshake on an already connected stream: sends `hello`, expects
    /// `Welcome` for a protocol from [`MIN_IPC_PROTOCOL_VERSION`] to the one `hello`
    /// names; with protocol 2 sends `Features(features)` and takes `Settings` and
    /// `Resume`; then expects `Start`. [`AgentChannel::handshake_info`] tells what
    /// was settled.
    ///
    /// Features go out only after a v2 Welcome, so that an agentd that speaks only
    /// protocol 1 never sees a message it does not know.
    pub fn handshake_with(
        stream: UnixStream,
        hello: AgentHello,
        features: AgentFeatures,
    ) -> Result<(AgentChannel, TaskStart), AgentError> {
        let ours = hello.protocol;
        let write_half = stream.try_clone().map_err(AgentError::Setup)?;
        let sender = AgentSender {
            inner: Arc::new(Mutex::new(SenderState {
                stream: write_half,
                result_sent: false,
                protocol: MIN_IPC_PROTOCOL_VERSION,
            })),
        };
        let mut receiver = AgentReceiver {
            reader: BufReader::new(stream),
        };
        sender.send(&AgentMsg::Hello(hello))?;
        let protocol = match receiver.recv()? {
            None => return Err(AgentError::ClosedDuringHandshake),
            Some(SupervisorMsg::Welcome { protocol })
                if (MIN_IPC_PROTOCOL_VERSION..=ours).contains(&protocol) =>
            {
                protocol
            }
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
        };
        sender.lock().protocol = protocol;
        if protocol >= 2 {
            sender.send(&AgentMsg::Features(features))?;
        }
        let mut handshake = Handshake {
            protocol,
            settings: None,
            resume: None,
        };
        let task = loop {
            match receiver.recv()? {
                None => return Err(AgentError::ClosedDuringHandshake),
                Some(SupervisorMsg::Start(task)) => break task,
                Some(SupervisorMsg::Settings(settings)) => handshake.settings = Some(settings),
                Some(SupervisorMsg::Resume {
                    previous_task_id,
                    checkpoint,
                }) => {
                    handshake.resume = Some(Resume {
                        previous_task_id,
                        checkpoint,
                    })
                }
                Some(SupervisorMsg::Reject { reason }) => {
                    return Err(AgentError::Rejected { reason })
                }
                Some(other) => {
                    return Err(AgentError::UnexpectedMessage {
                        expected: "Start",
                        got: message_name(&other),
                    })
                }
            }
        };
        Ok((
            AgentChannel {
                sender,
                receiver,
                handshake,
            },
            task,
        ))
    }

    /// What the handshake settled: the protocol, agentd's settings, resume info.
    pub fn handshake_info(&self) -> &Handshake {
        &self.handshake
    }

    /// Set when this task resumes an earlier one: its id and last checkpoint.
    pub fn resume(&self) -> Option<&Resume> {
        self.handshake.resume.as_ref()
    }

    /// How often to send heartbeats ([`Handshake::heartbeat_interval`]).
    pub fn heartbeat_interval(&self) -> Duration {
        self.handshake.heartbeat_interval()
    }

    /// Starts the heartbeat thread ([`spawn_heartbeat`]) at agentd's interval.
    pub fn spawn_heartbeat(&self) -> std::io::Result<JoinHandle<()>> {
        spawn_heartbeat(self.sender(), self.heartbeat_interval())
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

    /// Splits the channel so that the receiver can move to a reader thread. Read
    /// [`AgentChannel::handshake_info`] first if you need it.
    pub fn into_parts(self) -> (AgentSender, AgentReceiver) {
        (self.sender, self.receiver)
    }
}

struct SenderState {
    stream: UnixStream,
    result_sent: bool,
    /// The protocol agentd's Welcome named (1 until then).
    protocol: u32,
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

    /// Sends `Progress { text }`: one line of human-readable progress.
    pub fn progress(&self, text: impl Into<String>) -> Result<(), FrameError> {
        self.send(&AgentMsg::Progress { text: text.into() })
    }

    /// Reports the task's result (`Result`) with no command exit status. Sent once;
    /// the agent should then exit. Report [`Outcome::Cancelled`] after a `Cancel`
    /// that stopped the work.
    pub fn result(&self, outcome: Outcome, text: impl Into<String>) -> Result<(), FrameError> {
        self.send(&AgentMsg::Result(TaskResult {
            outcome,
            text: text.into(),
            command_exit: None,
        }))
    }

    /// Answers one `Steer` (`SteerAck`): `accepted` says whether its text reached
    /// the work. Answer every steer, in the order they came; a refused one becomes
    /// a follow-up task.
    pub fn steer_ack(&self, accepted: bool) -> Result<(), FrameError> {
        self.send(&AgentMsg::SteerAck { accepted })
    }

    /// Saves a checkpoint (`Checkpoint { data }`): the state a resumed attempt
    /// needs to carry on, opaque to agentd, which keeps the latest one. `Ok(false)`:
    /// not sent, because agentd speaks protocol 1 and would not understand it.
    /// Data over [`MAX_CHECKPOINT_BYTES`] is refused with an error.
    pub fn checkpoint(&self, data: impl Into<String>) -> Result<bool, FrameError> {
        let data = data.into();
        if data.len() > MAX_CHECKPOINT_BYTES {
            return Err(FrameError::Encode(format!(
                "a checkpoint of {} bytes exceeds the limit of {MAX_CHECKPOINT_BYTES} bytes",
                data.len()
            )));
        }
        if self.protocol() < 2 {
            return Ok(false);
        }
        self.send(&AgentMsg::Checkpoint { data })?;
        Ok(true)
    }

    /// The protocol agentd's Welcome named.
    pub fn protocol(&self) -> u32 {
        self.lock().protocol
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

    /// The socket, for `poll(2)`.
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.reader.get_ref().as_raw_fd()
    }

    /// Whether bytes already read from the socket wait in the buffer: `poll(2)` on
    /// the socket does not announce them.
    pub(crate) fn buffered(&self) -> bool {
        !self.reader.buffer().is_empty()
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
        SupervisorMsg::Settings(_) => "Settings",
        SupervisorMsg::Resume { .. } => "Resume",
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
        let got: AgentMsg = codec::read_frame(&mut sup).unwrap().unwrap();
        assert_eq!(got, AgentMsg::Features(AgentFeatures::default()));
        assert_eq!(
            chan.handshake_info(),
            &Handshake {
                protocol: 2,
                settings: None,
                resume: None
            }
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

        for theirs in [0, IPC_PROTOCOL_VERSION + 1] {
            let (agent, _sup) = supervisor(&[SupervisorMsg::Welcome { protocol: theirs }]);
            let err =
                AgentChannel::handshake(agent, hello("x", Capabilities::default())).unwrap_err();
            assert!(matches!(err, AgentError::ProtocolMismatch { .. }), "{err}");
        }
        // A v1 agent (its Hello says 1) does not take a v2 Welcome.
        let (agent, _sup) = supervisor(&[SupervisorMsg::Welcome { protocol: 2 }]);
        let mut v1 = hello("x", Capabilities::default());
        v1.protocol = 1;
        let err = AgentChannel::handshake(agent, v1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "agentd speaks IPC protocol 2, this agent speaks 1 to 1"
        );
    }

    #[test]
    fn a_v2_handshake_sends_features_and_takes_settings_and_resume() {
        let (agent, mut sup) = supervisor(&[
            SupervisorMsg::Welcome { protocol: 2 },
            SupervisorMsg::Settings(AgentSettings {
                heartbeat_interval_ms: 250,
            }),
            SupervisorMsg::Resume {
                previous_task_id: "t0".into(),
                checkpoint: Some("step 3\nof 5".into()),
            },
            SupervisorMsg::Start(start()),
        ]);
        let features = AgentFeatures {
            collected_prompts: false,
            checkpoints: true,
        };
        let (chan, task) =
            AgentChannel::handshake_with(agent, hello("x", Capabilities::default()), features)
                .unwrap();
        assert_eq!(task, start());
        assert_eq!(chan.heartbeat_interval(), Duration::from_millis(250));
        assert_eq!(
            chan.resume(),
            Some(&Resume {
                previous_task_id: "t0".into(),
                checkpoint: Some("step 3\nof 5".into()),
            })
        );
        assert!(matches!(
            codec::read_frame::<AgentMsg>(&mut sup).unwrap(),
            Some(AgentMsg::Hello(_))
        ));
        assert_eq!(
            codec::read_frame::<AgentMsg>(&mut sup).unwrap(),
            Some(AgentMsg::Features(features))
        );
        let sender = chan.sender();
        assert!(sender.checkpoint("step 4").unwrap());
        sender.steer_ack(true).unwrap();
        sender.result(Outcome::Cancelled, "stopped at 4").unwrap();
        for want in [
            AgentMsg::Checkpoint {
                data: "step 4".into(),
            },
            AgentMsg::SteerAck { accepted: true },
            AgentMsg::Result(TaskResult {
                outcome: Outcome::Cancelled,
                text: "stopped at 4".into(),
                command_exit: None,
            }),
        ] {
            assert_eq!(codec::read_frame::<AgentMsg>(&mut sup).unwrap(), Some(want));
        }
        let too_big = "x".repeat(MAX_CHECKPOINT_BYTES + 1);
        assert!(chan.sender().checkpoint(too_big).is_err());
    }

    #[test]
    fn with_a_v1_agentd_no_v2_message_is_sent() {
        let (agent, mut sup) = supervisor(&[
            SupervisorMsg::Welcome { protocol: 1 },
            SupervisorMsg::Start(start()),
        ]);
        let (chan, _) =
            AgentChannel::handshake(agent, hello("x", Capabilities::default())).unwrap();
        assert_eq!(chan.handshake_info().protocol, 1);
        assert_eq!(chan.resume(), None);
        // No settings: the interval from the environment (or the default).
        assert_eq!(chan.heartbeat_interval(), heartbeat_interval_from_env());
        let sender = chan.sender();
        assert!(
            !sender.checkpoint("state").unwrap(),
            "not sent to a v1 agentd"
        );
        sender.progress("p").unwrap();
        sender.shutdown();
        let mut got = Vec::new();
        while let Some(msg) = codec::read_frame::<AgentMsg>(&mut sup).unwrap() {
            got.push(msg);
        }
        assert!(matches!(got[0], AgentMsg::Hello(_)), "{got:?}");
        assert_eq!(got[1..], [AgentMsg::Progress { text: "p".into() }]);
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
        let _: AgentMsg = codec::read_frame(&mut sup).unwrap().unwrap(); // Features
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
