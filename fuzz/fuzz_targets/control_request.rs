//! A client's bytes on the control socket, decoded as agentd decodes them
//! (crates/daemon/src/control.rs): split into lines, a line longer than
//! `MAX_REQUEST_BYTES` refused, blank lines skipped, every other line decoded as a
//! `Request` (the JSON of crates/proto/src/control.rs: `id` plus a `cmd`-tagged,
//! flattened body), and for a line that is not a request, its `id` recovered for
//! the error answer. The client side (agentctl) decodes `Response` lines.
//!
//! Checks: nothing panics; a decoded request re-encodes, and decodes back to itself.

#![no_main]

use agentd_proto::control::{Request, Response, MAX_REQUEST_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for line in data.split(|b| *b == b'\n') {
        if line.len() > MAX_REQUEST_BYTES || line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Request>(line) {
            Ok(request) => {
                let encoded = serde_json::to_vec(&request).expect("a decoded request encodes");
                let back: Request = serde_json::from_slice(&encoded).unwrap_or_else(|e| {
                    panic!("a re-encoded request does not decode ({e}): {request:?}")
                });
                assert_eq!(back, request, "a request changed in a round trip");
            }
            Err(_) => {
                let _id = serde_json::from_slice::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("id")?.as_u64());
            }
        }
        let _ = serde_json::from_slice::<Response>(line);
    }
});
