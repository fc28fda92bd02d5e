//! An agent's bytes on its IPC channel, read as agentd reads them: a stream of
//! length-prefixed bincode frames (crates/proto/src/codec.rs `read_frame`, which
//! checks the length against `MAX_FRAME_BYTES` before reading and decodes the
//! payload with `decode_payload`, itself size-limited). The same bytes are also
//! read as agentd's messages to an agent, and as one bare payload.
//!
//! Checks: nothing panics or allocates past the limits (libFuzzer's malloc and
//! RSS limits catch that); every decoded message re-encodes into a frame that
//! decodes back to the same message.

#![no_main]

use std::fmt::Debug;

use agentd_proto::codec::{decode_payload, encode_frame, read_frame};
use agentd_proto::ipc::{AgentMsg, SupervisorMsg};
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(msg: &T) {
    let frame = encode_frame(msg).expect("a decoded message encodes");
    let back: T = read_frame(&mut &frame[..])
        .unwrap_or_else(|e| panic!("a re-encoded message does not decode ({e}): {msg:?}"))
        .expect("a frame, not the end of the stream");
    assert_eq!(&back, msg, "a message changed in a round trip");
}

/// Reads frames until the end of the stream or the first error, as the channel's
/// reader does (an error fails the task).
fn read_stream<T: Serialize + DeserializeOwned + PartialEq + Debug>(mut bytes: &[u8]) {
    while let Ok(Some(msg)) = read_frame::<T>(&mut bytes) {
        round_trip(&msg);
    }
}

fuzz_target!(|data: &[u8]| {
    read_stream::<AgentMsg>(data);
    read_stream::<SupervisorMsg>(data);
    if let Ok(msg) = decode_payload::<AgentMsg>(data) {
        round_trip(&msg);
    }
    if let Ok(msg) = decode_payload::<SupervisorMsg>(data) {
        round_trip(&msg);
    }
});
