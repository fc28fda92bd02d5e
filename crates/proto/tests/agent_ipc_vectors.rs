//! Holds `docs/agent-ipc.md` to the wire: every ```` ```vector ```` block in the doc
//! names a message (by its Rust `Debug` form) and gives its frame in hex; this test
//! encodes the message with the real codec and compares byte for byte, decodes the
//! doc's bytes back, and checks that the doc has a vector for every message here
//! (which covers every variant of both enums).
//!
//! A missing or wrong vector fails with the block to put in the doc.

use agentd_proto::codec::{decode_payload, encode_frame};
use agentd_proto::ipc::{
    AgentFeatures, AgentHello, AgentMsg, AgentSettings, Capabilities, CommandExit, Outcome,
    SupervisorMsg, TaskResult, TaskStart,
};

const DOC: &str = include_str!("../../../docs/agent-ipc.md");

fn agent_messages() -> Vec<AgentMsg> {
    vec![
        AgentMsg::Hello(AgentHello {
            protocol: 2,
            agent: "py 1".into(),
            capabilities: Capabilities { steer: true },
        }),
        AgentMsg::Progress {
            text: "step 1/3 ✓".into(),
        },
        AgentMsg::Result(TaskResult {
            outcome: Outcome::Succeeded,
            text: "done".into(),
            command_exit: None,
        }),
        AgentMsg::Result(TaskResult {
            outcome: Outcome::Failed,
            text: "".into(),
            command_exit: Some(CommandExit {
                code: Some(-1),
                signal: None,
            }),
        }),
        AgentMsg::Result(TaskResult {
            outcome: Outcome::Cancelled,
            text: "stopped".into(),
            command_exit: Some(CommandExit {
                code: None,
                signal: Some(2),
            }),
        }),
        AgentMsg::Heartbeat,
        AgentMsg::SteerAck { accepted: true },
        AgentMsg::SteerAck { accepted: false },
        AgentMsg::Features(AgentFeatures {
            collected_prompts: false,
            checkpoints: true,
        }),
        AgentMsg::Checkpoint {
            data: "{\"step\":2}".into(),
        },
    ]
}

fn supervisor_messages() -> Vec<SupervisorMsg> {
    vec![
        SupervisorMsg::Welcome { protocol: 2 },
        SupervisorMsg::Reject {
            reason: "no".into(),
        },
        SupervisorMsg::Start(TaskStart {
            task_id: "t1".into(),
            session: "s".into(),
            text: "hi\nthere".into(),
        }),
        SupervisorMsg::Cancel,
        SupervisorMsg::Steer {
            text: "use 3.12".into(),
        },
        SupervisorMsg::Settings(AgentSettings {
            heartbeat_interval_ms: 2000,
        }),
        SupervisorMsg::Settings(AgentSettings {
            heartbeat_interval_ms: 250,
        }),
        SupervisorMsg::Settings(AgentSettings {
            heartbeat_interval_ms: 70000,
        }),
        SupervisorMsg::Settings(AgentSettings {
            heartbeat_interval_ms: 1 << 32,
        }),
        SupervisorMsg::Resume {
            previous_task_id: "t0".into(),
            checkpoint: Some("s2".into()),
        },
        SupervisorMsg::Resume {
            previous_task_id: "t0".into(),
            checkpoint: None,
        },
    ]
}

/// One vector of the doc: direction, Debug form, frame bytes.
struct Vector {
    direction: String,
    debug: String,
    bytes: Vec<u8>,
}

fn doc_vectors() -> Vec<Vector> {
    let mut out = Vec::new();
    let mut lines = DOC.lines();
    while let Some(line) = lines.next() {
        if line.trim() != "```vector" {
            continue;
        }
        let head = lines.next().expect("a vector block has a first line");
        let (direction, debug) = head
            .split_once(' ')
            .unwrap_or_else(|| panic!("vector head {head:?}: `agent|agentd DEBUG`"));
        let mut bytes = Vec::new();
        for line in lines.by_ref() {
            if line.trim() == "```" {
                break;
            }
            for byte in line.split_whitespace() {
                bytes.push(
                    u8::from_str_radix(byte, 16)
                        .unwrap_or_else(|e| panic!("{byte:?} in vector {head}: {e}")),
                );
            }
        }
        out.push(Vector {
            direction: direction.to_string(),
            debug: debug.trim().to_string(),
            bytes,
        });
    }
    out
}

fn hex_block(direction: &str, debug: &str, frame: &[u8]) -> String {
    let hex: Vec<String> = frame.iter().map(|b| format!("{b:02x}")).collect();
    let (prefix, payload) = hex.split_at(4);
    let mut body = prefix.join(" ");
    for chunk in payload.chunks(16) {
        body.push('\n');
        body.push_str(&chunk.join(" "));
    }
    format!("```vector\n{direction} {debug}\n{body}\n```")
}

fn check<T>(direction: &str, messages: Vec<T>, vectors: &[Vector], missing: &mut Vec<String>)
where
    T: serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug + PartialEq,
{
    for msg in messages {
        let debug = format!("{msg:?}");
        let frame = encode_frame(&msg).unwrap();
        let Some(v) = vectors
            .iter()
            .find(|v| v.direction == direction && v.debug == debug)
        else {
            missing.push(hex_block(direction, &debug, &frame));
            continue;
        };
        assert_eq!(
            v.bytes,
            frame,
            "the doc's bytes for {debug} differ from the encoder's; they are:\n{}",
            hex_block(direction, &debug, &frame)
        );
        let len = u32::from_be_bytes(v.bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len, v.bytes.len() - 4, "length prefix of {debug}");
        let back: T = decode_payload(&v.bytes[4..]).unwrap();
        assert_eq!(back, msg, "the doc's bytes decode to another message");
    }
}

#[test]
fn the_docs_test_vectors_match_the_encoder() {
    let vectors = doc_vectors();
    let mut missing = Vec::new();
    check("agent", agent_messages(), &vectors, &mut missing);
    check("agentd", supervisor_messages(), &vectors, &mut missing);
    assert!(
        missing.is_empty(),
        "docs/agent-ipc.md lacks these vectors:\n\n{}",
        missing.join("\n\n")
    );
    let known: Vec<String> = agent_messages()
        .iter()
        .map(|m| format!("agent {m:?}"))
        .chain(
            supervisor_messages()
                .iter()
                .map(|m| format!("agentd {m:?}")),
        )
        .collect();
    for v in &vectors {
        let head = format!("{} {}", v.direction, v.debug);
        assert!(
            known.contains(&head),
            "the doc's vector {head} is not checked by this test: add it here"
        );
    }
}
