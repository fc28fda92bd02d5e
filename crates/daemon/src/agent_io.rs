//! The IPC channel of one agent: a reader task that decodes frames into events for the
//! supervisor, and a writer task that encodes the supervisor's messages.
//!
//! Both sides make few system calls: the reader reads through a buffer (a frame's
//! length prefix and payload, often several frames, in one `recv`), and the writer
//! encodes every message queued by the time it runs into one buffer and writes that
//! once (the handshake's Welcome, Settings and Start are one `send`, and one wake-up
//! of the agent).
//!
//! The reader sends into a bounded channel, so an agent that floods progress is slowed
//! down at its own socket instead of growing agentd's memory. A frame that does not
//! decode, exceeds the size limit (checked at its length prefix, before anything is
//! allocated), or has begun but is not complete within the frame deadline ends the
//! reader with [`AgentInput::Broken`].

use std::os::unix::net::UnixStream as StdUnixStream;

use agentd_core::TaskId;
use agentd_proto::codec::{encode_frame, read_frame_async_within};
use agentd_proto::ipc::{AgentMsg, SupervisorMsg};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// The reader's buffer: a frame and the prefix of the next are typically one read.
const READ_BUFFER: usize = 8 * 1024;

/// The writer stops adding queued messages to one write past this many bytes.
const WRITE_BATCH: usize = 64 * 1024;

/// What the reader saw on an agent's channel.
#[derive(Debug)]
pub enum AgentInput {
    Msg(AgentMsg),
    /// Clean end of stream: the agent closed its end (usually because it is exiting).
    Closed,
    /// The channel broke: undecodable or oversized frame, truncated frame, i/o error.
    Broken(String),
}

/// An [`AgentInput`] of one task.
#[derive(Debug)]
pub struct AgentEvent {
    pub task_id: TaskId,
    pub input: AgentInput,
}

/// Starts the reader and writer tasks for a freshly spawned agent's channel and
/// returns the sender for messages to the agent. Dropping the sender closes agentd's
/// side for writing, which the agent sees as EOF.
pub fn start(
    task_id: TaskId,
    channel: StdUnixStream,
    events: mpsc::Sender<AgentEvent>,
    frame_timeout: std::time::Duration,
) -> std::io::Result<mpsc::UnboundedSender<SupervisorMsg>> {
    channel.set_nonblocking(true)?;
    let stream = UnixStream::from_std(channel)?;
    let (read_half, mut write_half) = stream.into_split();
    let mut read_half = BufReader::with_capacity(READ_BUFFER, read_half);
    let (to_agent, mut outbox) = mpsc::unbounded_channel::<SupervisorMsg>();

    tokio::spawn(async move {
        loop {
            let input =
                match read_frame_async_within::<AgentMsg>(&mut read_half, frame_timeout).await {
                    Ok(Some(msg)) => AgentInput::Msg(msg),
                    Ok(None) => AgentInput::Closed,
                    Err(e) => AgentInput::Broken(e.to_string()),
                };
            let last = !matches!(input, AgentInput::Msg(_));
            if events.send(AgentEvent { task_id, input }).await.is_err() || last {
                break;
            }
        }
    });
    tokio::spawn(async move {
        let mut batch = Vec::new();
        while let Some(msg) = outbox.recv().await {
            batch.clear();
            let mut next = Some(msg);
            let mut unencodable = false;
            while let Some(msg) = next.take() {
                match encode_frame(&msg) {
                    Ok(frame) => batch.extend_from_slice(&frame),
                    // As a failed write: what came before it is written, then the
                    // writer ends (the agent sees EOF).
                    Err(_) => {
                        unencodable = true;
                        break;
                    }
                }
                if batch.len() < WRITE_BATCH {
                    next = outbox.try_recv().ok();
                }
            }
            if write_half.write_all(&batch).await.is_err() || unencodable {
                break;
            }
        }
    });
    Ok(to_agent)
}
