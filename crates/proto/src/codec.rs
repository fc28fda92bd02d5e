//! The one place that knows the agent IPC frame format: a 4-byte big-endian payload
//! length followed by a bincode 2 payload (standard config, serde).
//!
//! Every decode is bounded twice: the length prefix is checked against
//! [`MAX_FRAME_BYTES`] before any payload byte is read, and bincode itself decodes
//! with the same limit, so a hostile length inside the payload (a string that claims
//! to be 4 GiB) cannot make us allocate it.

use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest payload accepted in one frame, in bytes.
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

const LEN_PREFIX: usize = 4;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_BYTES>()
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes")]
    TooLarge { len: usize },
    #[error("undecodable frame: {0}")]
    Decode(String),
    #[error("cannot encode frame: {0}")]
    Encode(String),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("a frame begun was not complete within {}ms ({got} of {want} bytes arrived)", .deadline.as_millis())]
    Stalled {
        deadline: std::time::Duration,
        got: usize,
        want: usize,
    },
    #[error("i/o error on the agent channel: {0}")]
    Io(#[from] io::Error),
}

/// Encodes `msg` as one complete frame (length prefix included).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; LEN_PREFIX];
    bincode::serde::encode_into_std_write(msg, &mut buf, config())
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = buf.len() - LEN_PREFIX;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { len });
    }
    buf[..LEN_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

/// Decodes one frame payload (without its length prefix). Trailing bytes are an error.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    if payload.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { len: payload.len() });
    }
    let (msg, used) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| FrameError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(FrameError::Decode(format!(
            "{} trailing bytes after the message",
            payload.len() - used
        )));
    }
    Ok(msg)
}

fn checked_len(prefix: [u8; LEN_PREFIX]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { len });
    }
    Ok(len)
}

/// Reads one frame from a blocking reader. `Ok(None)` means a clean end of stream
/// at a frame boundary.
pub fn read_frame<T: DeserializeOwned>(reader: &mut impl Read) -> Result<Option<T>, FrameError> {
    let mut prefix = [0u8; LEN_PREFIX];
    let mut filled = 0;
    while filled < LEN_PREFIX {
        match reader.read(&mut prefix[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let len = checked_len(prefix)?;
    let mut payload = vec![0u8; len];
    reader
        .read_exact(&mut payload)
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => FrameError::Truncated,
            _ => FrameError::Io(e),
        })?;
    decode_payload(&payload).map(Some)
}

/// Writes one frame to a blocking writer and flushes it.
pub fn write_frame<T: Serialize>(writer: &mut impl Write, msg: &T) -> Result<(), FrameError> {
    writer.write_all(&encode_frame(msg)?)?;
    writer.flush()?;
    Ok(())
}

/// Async twin of [`read_frame`].
pub async fn read_frame_async<T: DeserializeOwned>(
    reader: &mut (impl AsyncRead + Unpin),
) -> Result<Option<T>, FrameError> {
    let mut prefix = [0u8; LEN_PREFIX];
    let mut filled = 0;
    while filled < LEN_PREFIX {
        match reader.read(&mut prefix[filled..]).await? {
            0 if filled == 0 => return Ok(None),
            0 => return Err(FrameError::Truncated),
            n => filled += n,
        }
    }
    let len = checked_len(prefix)?;
    let mut payload = vec![0u8; len];
    reader
        .read_exact(&mut payload)
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => FrameError::Truncated,
            _ => FrameError::Io(e),
        })?;
    decode_payload(&payload).map(Some)
}

/// Like [`read_frame_async`], but once the first byte of a frame has arrived the
/// whole frame must arrive within `deadline` ([`FrameError::Stalled`] otherwise): a
/// peer that trickles a frame cannot hold its reader forever. Waiting for a frame to
/// begin is not limited. The payload buffer grows with the bytes that arrive, so a
/// frame that claims the maximum size but never sends it costs almost nothing.
pub async fn read_frame_async_within<T: DeserializeOwned>(
    reader: &mut (impl AsyncRead + Unpin),
    deadline: std::time::Duration,
) -> Result<Option<T>, FrameError> {
    let mut prefix = [0u8; LEN_PREFIX];
    if reader.read(&mut prefix[..1]).await? == 0 {
        return Ok(None);
    }
    let until = tokio::time::Instant::now() + deadline;
    let mut filled = 1;
    let mut payload = Vec::new();
    let mut want = LEN_PREFIX;
    let rest = async {
        while filled < LEN_PREFIX {
            match reader.read(&mut prefix[filled..]).await? {
                0 => return Err(FrameError::Truncated),
                n => filled += n,
            }
        }
        let len = checked_len(prefix)?;
        want = LEN_PREFIX + len;
        payload.reserve(len.min(64 * 1024));
        let mut chunk = [0u8; 16 * 1024];
        while payload.len() < len {
            let room = (len - payload.len()).min(chunk.len());
            match reader.read(&mut chunk[..room]).await? {
                0 => return Err(FrameError::Truncated),
                n => payload.extend_from_slice(&chunk[..n]),
            }
        }
        Ok(())
    };
    match tokio::time::timeout_at(until, rest).await {
        Ok(Ok(())) => decode_payload(&payload).map(Some),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(FrameError::Stalled {
            deadline,
            got: filled + payload.len(),
            want,
        }),
    }
}

/// Async twin of [`write_frame`].
pub async fn write_frame_async<T: Serialize>(
    writer: &mut (impl AsyncWrite + Unpin),
    msg: &T,
) -> Result<(), FrameError> {
    writer.write_all(&encode_frame(msg)?).await?;
    writer.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::{AgentHello, AgentMsg, Capabilities, SupervisorMsg, TaskStart};
    use proptest::prelude::*;
    use std::time::Duration;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(msg: T) {
        let frame = encode_frame(&msg).unwrap();
        let back: T = read_frame(&mut &frame[..]).unwrap().unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn messages_round_trip() {
        round_trip(AgentMsg::Hello(AgentHello {
            protocol: crate::ipc::IPC_PROTOCOL_VERSION,
            agent: "test".into(),
            capabilities: Capabilities { steer: true },
        }));
        round_trip(AgentMsg::Progress {
            text: "line ✓".into(),
        });
        round_trip(SupervisorMsg::Start(TaskStart {
            task_id: "t".into(),
            session: "s".into(),
            text: "hello".into(),
        }));
        round_trip(SupervisorMsg::Cancel);
    }

    #[test]
    fn oversized_length_prefix_is_refused_before_reading_the_payload() {
        let mut bytes = (u32::MAX).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        let err = read_frame::<AgentMsg>(&mut &bytes[..]).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn hostile_inner_length_is_refused() {
        // Progress { text } with a varint string length of u64::MAX.
        let payload = [1u8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(decode_payload::<AgentMsg>(&payload).is_err());
    }

    #[test]
    fn truncated_and_empty_streams() {
        let frame = encode_frame(&AgentMsg::Heartbeat).unwrap();
        assert!(read_frame::<AgentMsg>(&mut &[][..]).unwrap().is_none());
        let err = read_frame::<AgentMsg>(&mut &frame[..frame.len() - 1]).unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err}");
        let err = read_frame::<AgentMsg>(&mut &[0u8, 0][..]).unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err}");
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut frame = encode_frame(&AgentMsg::Heartbeat).unwrap();
        frame.push(7);
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        assert!(read_frame::<AgentMsg>(&mut &frame[..]).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = read_frame::<AgentMsg>(&mut &bytes[..]);
            let _ = read_frame::<SupervisorMsg>(&mut &bytes[..]);
            let _ = decode_payload::<AgentMsg>(&bytes);
        }

        /// The reader with a deadline (the daemon's) reads the same messages from any
        /// bytes as the plain reader, and fails where it fails.
        #[test]
        fn the_deadline_reader_agrees_with_the_plain_reader(
            frames in proptest::collection::vec(".{0,40}", 0..4),
            noise in proptest::collection::vec(any::<u8>(), 0..64),
            cut in any::<proptest::sample::Index>(),
        ) {
            let mut bytes = Vec::new();
            for text in frames {
                bytes.extend(encode_frame(&AgentMsg::Progress { text }).unwrap());
            }
            bytes.extend(noise);
            let bytes = bytes[..cut.index(bytes.len() + 1)].to_vec();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            let mut plain = &bytes[..];
            let mut timed = &bytes[..];
            loop {
                let a = read_frame::<AgentMsg>(&mut plain);
                let b = rt.block_on(read_frame_async_within::<AgentMsg>(
                    &mut timed,
                    Duration::from_secs(1),
                ));
                match (a, b) {
                    (Ok(Some(x)), Ok(Some(y))) => prop_assert_eq!(x, y),
                    (Ok(None), Ok(None)) => break,
                    (Err(_), Err(_)) => break,
                    (a, b) => prop_assert!(false, "plain {:?}, with deadline {:?}", a, b),
                }
            }
        }

        #[test]
        fn progress_text_round_trips(text in ".{0,200}") {
            round_trip(AgentMsg::Progress { text });
        }
    }

    #[tokio::test]
    async fn async_round_trip_over_a_socketpair() {
        let (mut a, mut b) = tokio::net::UnixStream::pair().unwrap();
        write_frame_async(&mut a, &AgentMsg::Progress { text: "x".into() })
            .await
            .unwrap();
        drop(a);
        let got: AgentMsg = read_frame_async(&mut b).await.unwrap().unwrap();
        assert_eq!(got, AgentMsg::Progress { text: "x".into() });
        assert!(read_frame_async::<AgentMsg>(&mut b)
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_frame_begun_must_complete_within_the_deadline() {
        let (mut ours, mut theirs) = tokio::io::duplex(64);
        let frame = encode_frame(&AgentMsg::Progress { text: "x".into() }).unwrap();
        // Three bytes, then silence: the reader gives up at the deadline.
        theirs.write_all(&frame[..3]).await.unwrap();
        let err = read_frame_async_within::<AgentMsg>(&mut ours, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::Stalled {
                    got: 3,
                    want: 4,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_a_frame_to_begin_is_not_limited_and_whole_frames_pass() {
        let (mut ours, mut theirs) = tokio::io::duplex(64);
        let frame = encode_frame(&AgentMsg::Heartbeat).unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            theirs.write_all(&frame).await.unwrap();
            theirs
        });
        let msg = read_frame_async_within::<AgentMsg>(&mut ours, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(msg, Some(AgentMsg::Heartbeat));
        drop(writer.await.unwrap());
        assert!(
            read_frame_async_within::<AgentMsg>(&mut ours, Duration::from_secs(1))
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_claimed_4_gib_frame_is_refused_at_its_prefix() {
        let (mut ours, mut theirs) = tokio::io::duplex(64);
        theirs.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let err = read_frame_async_within::<AgentMsg>(&mut ours, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { len } if len == u32::MAX as usize),
            "{err}"
        );
    }

    #[tokio::test]
    async fn truncated_frames_within_the_deadline_say_so() {
        let (mut ours, mut theirs) = tokio::io::duplex(64);
        let frame = encode_frame(&AgentMsg::Progress { text: "abc".into() }).unwrap();
        theirs.write_all(&frame[..frame.len() - 1]).await.unwrap();
        drop(theirs);
        let err = read_frame_async_within::<AgentMsg>(&mut ours, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "{err}");
    }
}
