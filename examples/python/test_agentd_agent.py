#!/usr/bin/env python3
"""Checks agentd_agent.py against the test vectors of docs/agent-ipc.md.

Run: python3 examples/python/test_agentd_agent.py  (the Rust suite runs it too).
Every vector of the doc must be known here: agent vectors are encoded and
compared byte for byte, agentd vectors are decoded and compared field by field.
"""

import os
import struct
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import agentd_agent as a  # noqa: E402

DOC = os.path.join(HERE, "..", "..", "docs", "agent-ipc.md")

AGENT = {
    'Hello(AgentHello { protocol: 2, agent: "py 1", capabilities: Capabilities { steer: true } })':
        a.encode_hello(2, "py 1", True),
    'Progress { text: "step 1/3 \u2713" }': a.encode_progress("step 1/3 \u2713"),
    'Result(TaskResult { outcome: Succeeded, text: "done", command_exit: None })':
        a.encode_result(a.SUCCEEDED, "done"),
    'Result(TaskResult { outcome: Failed, text: "", command_exit: Some(CommandExit '
    '{ code: Some(-1), signal: None }) })': a.encode_result(a.FAILED, "", (-1, None)),
    'Result(TaskResult { outcome: Cancelled, text: "stopped", command_exit: Some(CommandExit '
    '{ code: None, signal: Some(2) }) })': a.encode_result(a.CANCELLED, "stopped", (None, 2)),
    "Heartbeat": a.encode_heartbeat(),
    "SteerAck { accepted: true }": a.encode_steer_ack(True),
    "SteerAck { accepted: false }": a.encode_steer_ack(False),
    "Features(AgentFeatures { collected_prompts: false, checkpoints: true })":
        a.encode_features(False, True),
    'Checkpoint { data: "{\\"step\\":2}" }': a.encode_checkpoint('{"step":2}'),
}

AGENTD = {
    "Welcome { protocol: 2 }": (a.Welcome, {"protocol": 2}),
    'Reject { reason: "no" }': (a.Reject, {"reason": "no"}),
    'Start(TaskStart { task_id: "t1", session: "s", text: "hi\\nthere" })':
        (a.Start, {"task_id": "t1", "session": "s", "text": "hi\nthere"}),
    "Cancel": (a.Cancel, {}),
    'Steer { text: "use 3.12" }': (a.Steer, {"text": "use 3.12"}),
    "Settings(AgentSettings { heartbeat_interval_ms: 2000 })":
        (a.Settings, {"heartbeat_interval_ms": 2000}),
    "Settings(AgentSettings { heartbeat_interval_ms: 250 })":
        (a.Settings, {"heartbeat_interval_ms": 250}),
    "Settings(AgentSettings { heartbeat_interval_ms: 70000 })":
        (a.Settings, {"heartbeat_interval_ms": 70000}),
    "Settings(AgentSettings { heartbeat_interval_ms: 4294967296 })":
        (a.Settings, {"heartbeat_interval_ms": 4294967296}),
    'Resume { previous_task_id: "t0", checkpoint: Some("s2") }':
        (a.Resume, {"previous_task_id": "t0", "checkpoint": "s2"}),
    'Resume { previous_task_id: "t0", checkpoint: None }':
        (a.Resume, {"previous_task_id": "t0", "checkpoint": None}),
}


def doc_vectors():
    with open(DOC, encoding="utf-8") as f:
        lines = iter(f.read().splitlines())
    for line in lines:
        if line.strip() != "```vector":
            continue
        direction, debug = next(lines).split(" ", 1)
        data = bytearray()
        for line in lines:
            if line.strip() == "```":
                break
            data.extend(int(b, 16) for b in line.split())
        yield direction, debug.strip(), bytes(data)


class Vectors(unittest.TestCase):
    def test_every_vector_of_the_doc(self):
        seen = set()
        for direction, debug, data in doc_vectors():
            seen.add((direction, debug))
            (length,) = struct.unpack(">I", data[:4])
            self.assertEqual(length, len(data) - 4, debug)
            if direction == "agent":
                self.assertIn(debug, AGENT, "a vector this test does not know")
                self.assertEqual(a.frame(AGENT[debug]).hex(), data.hex(), debug)
            else:
                self.assertIn(debug, AGENTD, "a vector this test does not know")
                cls, fields = AGENTD[debug]
                msg = a.decode_supervisor_msg(data[4:])
                self.assertIsInstance(msg, cls, debug)
                self.assertEqual({k: getattr(msg, k) for k in fields}, fields, debug)
        expected = {("agent", k) for k in AGENT} | {("agentd", k) for k in AGENTD}
        self.assertEqual(seen, expected, "the doc and this test list different vectors")


class BoundedDecoding(unittest.TestCase):
    def test_hostile_string_length_is_refused_without_allocating(self):
        # Steer { text } claiming 2^64-1 bytes.
        with self.assertRaises(a.ProtocolError):
            a.decode_supervisor_msg(b"\x04\xfd" + b"\xff" * 8)

    def test_bad_bytes_are_errors(self):
        for payload in [b"", b"\x07", b"\x03\x00", b"\x06\x00\x02", b"\x04\x01\xff",
                        b"\x00\xfd\x01\x00\x00\x00\x00\x00\x00\x00"]:
            with self.assertRaises(a.ProtocolError, msg=payload.hex()):
                a.decode_supervisor_msg(payload)

    def test_oversized_frame_is_refused_before_reading(self):
        import socket
        ours, theirs = socket.socketpair()
        theirs.sendall(struct.pack(">I", a.MAX_FRAME_BYTES + 1))
        with self.assertRaises(a.ProtocolError):
            a.read_frame(ours)
        theirs.sendall(b"\x00\x00")
        theirs.close()
        with self.assertRaises(a.ProtocolError):
            a.read_frame(ours)  # truncated prefix
        ours.close()

    def test_varints_round_trip(self):
        for n in [0, 250, 251, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]:
            r = a._Reader(a._varint(n))
            self.assertEqual(r.u64(), n)
            r.end()
        for n in [0, -1, 1, -(2**31), 2**31 - 1]:
            self.assertEqual(a._Reader(a._i32(n)).i32(), n)


if __name__ == "__main__":
    unittest.main()
