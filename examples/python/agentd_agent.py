"""A stdlib-only agentd agent module: the agent IPC of docs/agent-ipc.md in Python.

An agentd agent is a program agentd starts for one task, connected to it by an
inherited socket whose descriptor number is in $AGENTD_IPC_FD. This module speaks
the protocol (version 2, falling back to 1 with an older agentd):

    import agentd_agent

    agent = agentd_agent.Agent.connect("my-agent 1.0", steer=True, checkpoints=True)
    task = agent.task                       # Start: task_id, session, text
    if agent.resume:                        # a resumed attempt: its last checkpoint
        state = agent.resume.checkpoint
    agent.progress("working")
    for text in agent.take_steers():        # steered messages; acknowledge each
        agent.steer_ack(True)
    agent.checkpoint('{"step": 3}')         # the state a resumed attempt needs
    if agent.cancelled.is_set():            # cooperative cancel: stop, report
        agent.result(agentd_agent.CANCELLED, "stopped at step 3")
    agent.result(agentd_agent.SUCCEEDED, "done")

Every frame read is bounded: the length prefix is checked against MAX_FRAME_BYTES
before the payload is read, and every string length against the bytes left in its
frame, so a bad peer cannot make this module allocate more than one frame.

When agentd goes away (EOF on the channel, a frame that does not decode, or a send
that finds the channel closed or reset), the agent must stop at once: by default
the module calls ``os._exit(1)`` from the thread that noticed; pass ``on_gone`` to
do something else first (it must still end the process soon).
"""

import os
import queue
import socket
import struct
import threading

PROTOCOL_VERSION = 2
MIN_PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 4 * 1024 * 1024
MAX_CHECKPOINT_BYTES = 1024 * 1024
DEFAULT_HEARTBEAT_MS = 2000

# Outcome variants (the index is the wire value).
SUCCEEDED, FAILED, CANCELLED = 0, 1, 2

# Variant indexes of AgentMsg (agent -> agentd).
_HELLO, _PROGRESS, _RESULT, _HEARTBEAT, _STEER_ACK, _FEATURES, _CHECKPOINT = range(7)
# Variant indexes of SupervisorMsg (agentd -> agent).
_WELCOME, _REJECT, _START, _CANCEL, _STEER, _SETTINGS, _RESUME = range(7)


class ProtocolError(Exception):
    """A frame that breaks the protocol: too large, truncated or undecodable."""


class HandshakeError(Exception):
    """The handshake failed: not started by agentd, refused, or unexpected messages."""


# ----------------------------------------------------------------- encoding


def _varint(n):
    """An unsigned integer as a bincode 2 varint."""
    if n < 0:
        raise ValueError("unsigned varint of a negative number")
    if n <= 250:
        return bytes([n])
    if n <= 0xFFFF:
        return b"\xfb" + struct.pack("<H", n)
    if n <= 0xFFFFFFFF:
        return b"\xfc" + struct.pack("<I", n)
    if n <= 0xFFFFFFFFFFFFFFFF:
        return b"\xfd" + struct.pack("<Q", n)
    raise ValueError("integer too large for u64")


def _i32(n):
    """A signed 32-bit integer: zigzag, then varint."""
    if not -(2**31) <= n < 2**31:
        raise ValueError("integer out of i32 range")
    return _varint(((n << 1) ^ (n >> 31)) & 0xFFFFFFFF)


def _bool(b):
    return b"\x01" if b else b"\x00"


def _string(s):
    data = s.encode("utf-8")
    return _varint(len(data)) + data


def _option(value, encode):
    return b"\x00" if value is None else b"\x01" + encode(value)


def frame(payload):
    """One frame: the 4-byte big-endian length, then the payload."""
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError("frame of %d bytes exceeds %d" % (len(payload), MAX_FRAME_BYTES))
    return struct.pack(">I", len(payload)) + payload


def encode_hello(protocol, agent, steer):
    return _varint(_HELLO) + _varint(protocol) + _string(agent) + _bool(steer)


def encode_progress(text):
    return _varint(_PROGRESS) + _string(text)


def encode_result(outcome, text, command_exit=None):
    """``command_exit`` is None or a (code, signal) pair of ints or Nones."""
    if outcome not in (SUCCEEDED, FAILED, CANCELLED):
        raise ValueError("outcome must be SUCCEEDED, FAILED or CANCELLED")

    def exit_status(pair):
        code, signal = pair
        return _option(code, _i32) + _option(signal, _i32)

    return _varint(_RESULT) + _varint(outcome) + _string(text) + _option(command_exit, exit_status)


def encode_heartbeat():
    return _varint(_HEARTBEAT)


def encode_steer_ack(accepted):
    return _varint(_STEER_ACK) + _bool(accepted)


def encode_features(collected_prompts, checkpoints):
    return _varint(_FEATURES) + _bool(collected_prompts) + _bool(checkpoints)


def encode_checkpoint(data):
    return _varint(_CHECKPOINT) + _string(data)


# ----------------------------------------------------------------- decoding


class _Reader:
    """Reads bincode values from one payload; every read is bounds-checked."""

    def __init__(self, payload):
        self.data = payload
        self.pos = 0

    def take(self, n):
        if n > len(self.data) - self.pos:
            raise ProtocolError("a value runs past the end of its frame")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def varint(self, bits):
        first = self.take(1)[0]
        if first <= 250:
            return first
        widths = {0xFB: (16, "<H"), 0xFC: (32, "<I"), 0xFD: (64, "<Q")}
        if first not in widths or widths[first][0] > bits:
            raise ProtocolError("invalid varint marker 0x%02x for a u%d" % (first, bits))
        size, fmt = widths[first]
        return struct.unpack(fmt, self.take(size // 8))[0]

    def u32(self):
        return self.varint(32)

    def u64(self):
        return self.varint(64)

    def i32(self):
        z = self.varint(32)
        return (z >> 1) ^ -(z & 1)

    def bool(self):
        b = self.take(1)[0]
        if b > 1:
            raise ProtocolError("invalid bool byte 0x%02x" % b)
        return b == 1

    def string(self):
        n = self.u64()  # take() refuses a length beyond the frame before allocating
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError("invalid UTF-8 in a string: %s" % e)

    def option(self, read):
        tag = self.take(1)[0]
        if tag > 1:
            raise ProtocolError("invalid Option tag 0x%02x" % tag)
        return read() if tag == 1 else None

    def end(self):
        if self.pos != len(self.data):
            raise ProtocolError("%d trailing bytes after the message" % (len(self.data) - self.pos))


class Welcome:
    def __init__(self, protocol):
        self.protocol = protocol


class Reject:
    def __init__(self, reason):
        self.reason = reason


class Start:
    """The task: ``task_id``, ``session`` and ``text`` (the work)."""

    def __init__(self, task_id, session, text):
        self.task_id, self.session, self.text = task_id, session, text


class Cancel:
    pass


class Steer:
    def __init__(self, text):
        self.text = text


class Settings:
    def __init__(self, heartbeat_interval_ms):
        self.heartbeat_interval_ms = heartbeat_interval_ms


class Resume:
    """A resumed attempt: the task it resumes and that task's last checkpoint (or None)."""

    def __init__(self, previous_task_id, checkpoint):
        self.previous_task_id, self.checkpoint = previous_task_id, checkpoint


def decode_supervisor_msg(payload):
    """Decodes one agentd -> agent payload (without its length prefix)."""
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError("payload too large")
    r = _Reader(payload)
    index = r.u32()
    if index == _WELCOME:
        msg = Welcome(r.u32())
    elif index == _REJECT:
        msg = Reject(r.string())
    elif index == _START:
        msg = Start(r.string(), r.string(), r.string())
    elif index == _CANCEL:
        msg = Cancel()
    elif index == _STEER:
        msg = Steer(r.string())
    elif index == _SETTINGS:
        msg = Settings(r.u64())
    elif index == _RESUME:
        msg = Resume(r.string(), r.option(r.string))
    else:
        raise ProtocolError("unknown message variant %d from agentd" % index)
    r.end()
    return msg


def _read_exactly(sock, n, allow_eof):
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 65536))
        if not chunk:
            if got == 0 and allow_eof:
                return None
            raise ProtocolError("connection closed in the middle of a frame")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(sock):
    """Reads one frame's payload; None at a clean end of stream."""
    prefix = _read_exactly(sock, 4, allow_eof=True)
    if prefix is None:
        return None
    (length,) = struct.unpack(">I", prefix)
    if length > MAX_FRAME_BYTES:
        raise ProtocolError("frame of %d bytes exceeds the limit of %d" % (length, MAX_FRAME_BYTES))
    return _read_exactly(sock, length, allow_eof=False)


# ----------------------------------------------------------------- the agent


class Agent:
    """The agent's end of the channel after the handshake.

    Attributes: ``task`` (Start), ``protocol`` (what agentd's Welcome said),
    ``settings`` (Settings or None), ``resume`` (Resume or None), ``cancelled``
    (a threading.Event set on Cancel).
    """

    @classmethod
    def connect(cls, name, steer=False, collected_prompts=True, checkpoints=False,
                on_gone=None, heartbeat=True):
        """Takes the channel from $AGENTD_IPC_FD, runs the handshake, starts the
        reader thread (and the heartbeat thread unless ``heartbeat`` is False)."""
        value = os.environ.get("AGENTD_IPC_FD")
        if value is None:
            raise HandshakeError("AGENTD_IPC_FD is not set: this program is an agentd "
                                 "agent and must be started by agentd")
        try:
            fd = int(value)
            sock = socket.socket(fileno=fd)
        except (ValueError, OSError) as e:
            raise HandshakeError("AGENTD_IPC_FD=%r is not a socket: %s" % (value, e))
        sock.set_inheritable(False)  # commands this agent runs must not write on it
        sock.setblocking(True)
        return cls(sock, name, steer, collected_prompts, checkpoints, on_gone, heartbeat)

    def __init__(self, sock, name, steer=False, collected_prompts=True, checkpoints=False,
                 on_gone=None, heartbeat=True):
        """Runs the handshake on an already connected socket (see ``connect``)."""
        self._sock = sock
        self._lock = threading.Lock()
        self._result_sent = False
        self._steers = queue.Queue()
        self._on_gone = on_gone
        self._wake = threading.Event()
        self.cancelled = threading.Event()
        self.protocol = MIN_PROTOCOL_VERSION
        self.settings = None
        self.resume = None
        self._send(encode_hello(PROTOCOL_VERSION, name, steer))
        msg = self._recv_handshake("Welcome")
        if isinstance(msg, Reject):
            raise HandshakeError("agentd refused this agent: %s" % msg.reason)
        if not isinstance(msg, Welcome):
            raise HandshakeError("expected Welcome, got %s" % type(msg).__name__)
        if not MIN_PROTOCOL_VERSION <= msg.protocol <= PROTOCOL_VERSION:
            raise HandshakeError("agentd speaks IPC protocol %d, this agent %d to %d"
                                 % (msg.protocol, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION))
        self.protocol = msg.protocol
        if self.protocol >= 2:
            self._send(encode_features(collected_prompts, checkpoints))
        while True:
            msg = self._recv_handshake("Start")
            if isinstance(msg, Start):
                self.task = msg
                break
            if isinstance(msg, Settings):
                self.settings = msg
            elif isinstance(msg, Resume):
                self.resume = msg
            elif isinstance(msg, Reject):
                raise HandshakeError("agentd refused this agent: %s" % msg.reason)
            else:
                raise HandshakeError("expected Start, got %s" % type(msg).__name__)
        threading.Thread(target=self._read_loop, name="agentd-reader", daemon=True).start()
        if heartbeat:
            threading.Thread(target=self._heartbeat_loop, name="agentd-heartbeat",
                             daemon=True).start()

    def _recv_handshake(self, expected):
        payload = read_frame(self._sock)
        if payload is None:
            raise HandshakeError("agentd closed the channel while this agent waited for %s"
                                 % expected)
        return decode_supervisor_msg(payload)

    @property
    def heartbeat_interval(self):
        """Seconds between heartbeats: agentd's Settings, else $AGENTD_HEARTBEAT_MS."""
        if self.settings is not None and self.settings.heartbeat_interval_ms > 0:
            return self.settings.heartbeat_interval_ms / 1000.0
        try:
            ms = int(os.environ.get("AGENTD_HEARTBEAT_MS", ""))
        except ValueError:
            ms = 0
        return (ms if ms > 0 else DEFAULT_HEARTBEAT_MS) / 1000.0

    def _send(self, payload):
        data = frame(payload)
        with self._lock:
            if self._result_sent:
                raise ProtocolError("a result was already sent on this channel")
            is_result = payload[:1] == bytes([_RESULT])
            try:
                self._sock.sendall(data)
            except OSError:
                gone = True
            else:
                gone = False
                if is_result:
                    self._result_sent = True
        if gone:
            # The channel is closed or reset: agentd went away while this agent was
            # still talking. Stop the way an EOF seen by the reader stops.
            self._gone()

    def _gone(self):
        """agentd went away before this agent's result: stop now."""
        if self._on_gone is not None:
            self._on_gone()
        os._exit(1)

    def progress(self, text):
        """Sends one line of human-readable progress."""
        self._send(encode_progress(text))

    def steer_ack(self, accepted):
        """Answers one steer: whether its text reached the work. Answer every steer,
        in order; a refused one becomes a follow-up task."""
        self._send(encode_steer_ack(accepted))

    def checkpoint(self, data):
        """Saves the state a resumed attempt needs (a string, at most 1 MiB of UTF-8).
        Returns False, sending nothing, when agentd speaks protocol 1."""
        if len(data.encode("utf-8")) > MAX_CHECKPOINT_BYTES:
            raise ValueError("a checkpoint is at most %d bytes" % MAX_CHECKPOINT_BYTES)
        if self.protocol < 2:
            return False
        self._send(encode_checkpoint(data))
        return True

    def result(self, outcome, text, command_exit=None):
        """Reports the task's result (once), then closes the channel: the agent
        should exit next. ``outcome`` is SUCCEEDED, FAILED or CANCELLED."""
        self._send(encode_result(outcome, text, command_exit))
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def take_steers(self):
        """The steered messages received since the last call, oldest first."""
        out = []
        while True:
            try:
                out.append(self._steers.get_nowait())
            except queue.Empty:
                return out

    def wait(self, seconds):
        """Sleeps up to ``seconds``, waking early on Cancel or a steer. Returns
        True if a Cancel has come."""
        self._wake.clear()
        if not self.cancelled.is_set() and self._steers.empty():
            self._wake.wait(seconds)
        return self.cancelled.is_set()

    def _heartbeat_loop(self):
        interval = self.heartbeat_interval
        while True:
            threading.Event().wait(interval)
            try:
                with self._lock:
                    if self._result_sent:
                        return
                    self._sock.sendall(frame(encode_heartbeat()))
            except OSError:
                return

    def _read_loop(self):
        try:
            while True:
                payload = read_frame(self._sock)
                if payload is None:
                    break
                msg = decode_supervisor_msg(payload)
                if isinstance(msg, Cancel):
                    self.cancelled.set()
                    self._wake.set()
                elif isinstance(msg, Steer):
                    self._steers.put(msg.text)
                    self._wake.set()
                # Anything else after Start is not for a running agent: ignored.
        except (ProtocolError, OSError):
            pass
        with self._lock:
            done = self._result_sent
        if done:
            return  # the conversation is over; EOF is expected
        self._gone()
