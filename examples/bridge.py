#!/usr/bin/env python3
"""A chat bridge for agentd, written from docs/protocol.md alone (standard library only).

It stands between a chat app and agentd. The "chat app" here is this process's stdin
and stdout, one JSON object per line, so the bridge can be tried by hand and driven by
tests; a real bridge replaces `read_chat` and `post` with the chat app's API.

    in  (stdin):  {"chat": "tg:42", "message_id": "1001", "text": "build the docs"}
    out (stdout): {"chat": "tg:42", "kind": "reply", "text": "task 01a1…  started", "task_id": "01a1…",
                   "key": "answer.1001"}
                  {"chat": "tg:42", "kind": "progress", "text": "building", "task_id": "01a1…",
                   "html": "<pre><code>building</code></pre>"}
                  {"chat": "tg:42", "kind": "finished", "text": "task 01a1…  succeeded: done",
                   "task_id": "01a1…", "state": "succeeded", "key": "end.01a1…",
                   "html": "task 01a1…  succeeded<pre><code>done</code></pre>"}

`key`, where given, names the post the same way in every run of the bridge: a post
made again after a crash of the bridge (it had posted, but not yet saved its state)
has the key of the first, so a chat app that de-duplicates by key (Matrix: the
transaction id) shows it once. `html`, where given, is the text as HTML for chats
that format text, with an agent's output (a result, a progress line) in
`<pre><code>`, escaped, as agentd-matrix's `formatted_body`.

What it does (docs/protocol.md, "Writing a bridge"):
- connects to agentd's control socket and says `hello` (protocol 1);
- watches every chat it has seen (`watch` with `session`), so it can relay progress and
  the end of every task of the chat, including queued ones that start later;
- sends every chat message with `send`, with the chat as `session` and the chat app's
  message id as `message_id`; control commands (`/status`, `/stop`, `/tasks`, `/queue`,
  `/help`) are sent the same way, and agentd answers them at once;
- shows each answer's `reply` (or an error's `message`) in the chat; a `/stop` answers
  where the stop stands ("stopping: cancel sent, SIGTERM in 5 s"), and the task's final
  state follows from its `finished` event;
- when a watch ends with `lagged` (the bridge read too slowly), watches the chat again
  and asks `status` for the tasks it knew were live, so a task that ended meanwhile is
  still reported, once;
- when the connection is lost (agentd restarted), reconnects with a growing delay,
  says hello again, watches its chats again, asks `status` for the tasks it knew were
  live (a restart interrupts them), and re-sends every message whose answer never
  came, with the same `message_id`, so agentd does not run one twice;
- keeps a state file (`--state`): the chats it watches, the tasks it told a chat
  about that had not ended, and the messages whose answer had not come. After a
  restart of the bridge itself it watches those chats again, asks `status` of
  those tasks, so one that ended while the bridge was down is still reported, and
  sends those messages again with their `message_id`;
- cleans what it shows in the chat (`chat_text`): agents write for a terminal, and
  their escape sequences (colours, cursor moves, OSC 8 hyperlinks) are dropped, a
  `\r` progress redraw keeps its last state (`50%\r60%\r` shows `60%`), and other
  control characters except newline and tab are dropped, as agentd-matrix does;
- a task agentd no longer knows (`not_found`: a new agentd on another state dir)
  is forgotten, and its chat is told so once, instead of being asked about forever;
- posts a task's end before it saves that the task ended, and an answer before it
  saves that the message was answered, so a crash in between posts it again after
  the restart, with the same `key`: never lost, and shown once by a chat that
  de-duplicates by key.

Usage: bridge.py [--socket PATH] [--client NAME] [--max-delay SECONDS] [--state FILE]
"""

import argparse
import collections
import html
import itertools
import json
import os
import re
import socket
import sys
import threading
import time

PROTOCOL = 1


def default_socket():
    """Where agentd listens by default (docs/protocol.md, "Transport")."""
    if os.environ.get("AGENTD_SOCKET"):
        return os.environ["AGENTD_SOCKET"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "agentd", "agentd.sock")
    return "/tmp/agentd-%d/agentd.sock" % os.getuid()


def default_state_file():
    """$XDG_STATE_HOME/agentd/bridge-py-state.json, else ~/.local/state/agentd/…."""
    base = os.environ.get("XDG_STATE_HOME")
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "agentd", "bridge-py-state.json")


def load_state(path):
    """The state a previous run kept, or an empty one (no file, or no path).

    A state file that cannot be read, or is not what this bridge writes, is not
    silently replaced: the bridge says so in one line and stops."""
    empty = {"chats": [], "live": {}, "unanswered": []}
    if not path:
        return empty

    def invalid(why):
        return SystemExit("bridge.py: state file %s is not valid (%s): move it aside "
                          "(or delete it) to start with no state, or give another one "
                          "with --state FILE" % (path, why))

    try:
        with open(path, "rb") as f:
            state = json.loads(f.read())
    except FileNotFoundError:
        return empty
    except (OSError, ValueError) as e:
        raise invalid(e)
    if not isinstance(state, dict):
        raise invalid("not an object")
    chats = state.get("chats", [])
    live = state.get("live", {})
    unanswered = state.get("unanswered", [])
    if not isinstance(chats, list) or not all(isinstance(c, str) for c in chats):
        raise invalid("chats is not a list of chats")
    if not isinstance(live, dict) or not all(isinstance(c, str) for c in live.values()):
        raise invalid("live is not an object of task ids and chats")
    if not isinstance(unanswered, list) or not all(
            isinstance(e, list) and len(e) == 3 and all(isinstance(w, str) for w in e)
            for e in unanswered):
        raise invalid("unanswered is not a list of [chat, message_id, text]")
    return {
        "chats": list(chats),
        "live": dict(live),
        "unanswered": [tuple(e) for e in unanswered],
    }


def save_state(path, state):
    """Writes the state atomically (a temp file renamed over it), mode 0600."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    # A temp file left by an earlier run keeps its mode: make it 0600 all the same.
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def log(*words):
    print("bridge:", *words, file=sys.stderr, flush=True)


class Bridge:
    def __init__(self, path, client, max_delay, state_file=None):
        self.path = path
        self.state_file = state_file
        self.client = client
        self.max_delay = max_delay
        self.lock = threading.Lock()
        self.out_lock = threading.Lock()
        self.ids = itertools.count(1)
        self.sock = None
        # Chats we watch, and which request id is each chat's watch on this connection.
        self.chats = []
        self.watch_ids = {}
        # Messages sent but not answered: request id -> (chat, message_id, text).
        # Kept across reconnects and sent again (same message_id) until answered.
        self.unanswered = {}
        # Live tasks the chat was told about: task id -> chat. After a lagged watch
        # these are asked for with `status`, since their end may have been missed.
        self.live = {}
        # `status` requests of that catch-up: request id -> chat.
        self.catch_up = {}
        # Tasks whose start and end were posted, so a re-watch's snapshot (or a
        # catch-up `status`) does not post them twice. Bounded: oldest forgotten.
        self.posted_started = collections.OrderedDict()
        self.posted_finished = collections.OrderedDict()
        self.connected = threading.Event()
        # What a previous run kept: its chats are watched and its tasks asked about
        # at the first connection, its unanswered messages sent again.
        state = load_state(state_file)
        self.chats = state["chats"]
        self.live = state["live"]
        for task_id in self.live:
            self.posted_started[task_id] = True
        for entry in state["unanswered"]:
            self.unanswered[next(self.ids)] = entry
        self.kept = None

    def _keep(self):
        """Saves the state when it changed (called with `self.lock` held)."""
        if not self.state_file:
            return
        state = {
            "chats": list(self.chats),
            "live": dict(self.live),
            # Only messages with an id: agentd de-duplicates those when sent again.
            "unanswered": [list(e) for _, e in sorted(self.unanswered.items())
                           if e[1] is not None],
        }
        if state == self.kept:
            return
        try:
            save_state(self.state_file, state)
            self.kept = state
        except OSError as e:
            log("cannot save the state file %s: %s" % (self.state_file, e))

    # ----- the chat side -----

    def post(self, chat, kind, text, html=None, **extra):
        """Posts `text`; `html`, if given, is (lead, output): the same as HTML, the
        agent's output as a code block."""
        line = {"chat": chat, "kind": kind, "text": chat_text(text)}
        if html is not None:
            line["html"] = chat_html(chat_text(html[0]), chat_text(html[1]))
        line.update(extra)
        with self.out_lock:
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
        hold = os.environ.get(TEST_HOLD_AFTER_POST)
        if hold and hold in line["text"]:
            log("%s (a test hook): stops after this post until killed" % TEST_HOLD_AFTER_POST)
            while True:
                time.sleep(3600)

    def on_chat_message(self, chat, message_id, text):
        with self.lock:
            if chat not in self.chats:
                self.chats.append(chat)
                self._keep()
                if self.sock is not None:
                    self._watch(chat)
            request_id = next(self.ids)
            self.unanswered[request_id] = (chat, None if message_id is None else str(message_id),
                                           text)
            # Kept before agentd sees it: a restart of the bridge sends it again.
            self._keep()
            if self.sock is not None:
                self._send_message(request_id)
            # Otherwise it goes out when the connection is back.

    # ----- the agentd side -----

    def _write(self, request):
        """Writes one request line; a broken connection is noticed by the reader."""
        try:
            self.sock.sendall((json.dumps(request) + "\n").encode())
        except OSError as e:
            log("write failed:", e)

    def _watch(self, chat):
        request_id = next(self.ids)
        self.watch_ids[request_id] = chat
        self._write({"id": request_id, "cmd": "watch", "session": chat})

    def _rewatch(self, chat):
        """Watches `chat` again (after a lagged watch or a reconnect), and asks how the
        tasks it knew were live stand: those that ended meanwhile are not in the new
        watch's snapshot."""
        self._watch(chat)
        for task_id, task_chat in list(self.live.items()):
            if task_chat == chat:
                request_id = next(self.ids)
                self.catch_up[request_id] = (chat, task_id)
                self._write({"id": request_id, "cmd": "status", "task_id": task_id})

    def _send_message(self, request_id):
        chat, message_id, text = self.unanswered[request_id]
        request = {"id": request_id, "cmd": "send", "session": chat, "text": text}
        if message_id is not None:
            request["message_id"] = str(message_id)
        self._write(request)

    def connect(self):
        """Connects and says hello; retries with a growing delay until it works."""
        delay = 0.1
        while True:
            sock = None
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(self.path)
                reader = sock.makefile("rb")
                hello = {"id": 0, "cmd": "hello", "protocol": PROTOCOL, "client": self.client}
                sock.sendall((json.dumps(hello) + "\n").encode())
                answer = json.loads(reader.readline() or b"null")
                if not answer or not answer.get("ok"):
                    error = (answer or {}).get("error", {})
                    raise OSError("hello refused: %s" % error.get("message", answer))
                log("connected to agentd:", (answer.get("result") or {}).get("server"),
                    "at", self.path)
                return sock, reader
            except (OSError, ValueError) as e:
                log("cannot reach agentd (%s); retrying in %.1f s" % (e, delay))
                if sock is not None:
                    sock.close()
                time.sleep(delay)
                delay = min(delay * 2, self.max_delay)

    def run_connection(self):
        """Keeps a connection to agentd and dispatches what it writes, forever."""
        while True:
            sock, reader = self.connect()
            with self.lock:
                self.sock = sock
                self.watch_ids = {}
                self.catch_up = {}
                # Tasks that were live may have ended while agentd was down (a restart
                # interrupts them): the new watches' snapshots list only what still
                # runs, so ask how the others ended (a new agentd on another state
                # dir does not know them: `not_found`, and nothing is posted).
                for chat in self.chats:
                    self._rewatch(chat)
                # Unanswered messages get new request ids on the new connection.
                pending = list(self.unanswered.values())
                self.unanswered = {}
                for entry in pending:
                    request_id = next(self.ids)
                    self.unanswered[request_id] = entry
                    self._send_message(request_id)
            self.connected.set()
            try:
                for raw in reader:
                    try:
                        self.on_line(raw)
                    except (KeyError, TypeError, AttributeError, ValueError) as e:
                        # A line of an unexpected shape: the bridge goes on reading.
                        log("cannot read a line agentd wrote (%r): %s" % (e, raw[:200]))
            except OSError as e:
                log("read failed:", e)
            log("connection to agentd lost; reconnecting")
            self.connected.clear()
            with self.lock:
                self.sock = None
            try:
                sock.close()
            except OSError:
                pass

    def on_line(self, raw):
        try:
            line = json.loads(raw)
        except ValueError:
            log("agentd wrote a line that is not JSON:", raw[:200])
            return
        request_id = line.get("id")
        with self.lock:
            watch_chat = self.watch_ids.get(request_id)
            message = self.unanswered.pop(request_id, None)
            catch_up_chat = self.catch_up.pop(request_id, None)
        if "event" in line:
            if watch_chat is not None:
                self.on_event(watch_chat, line["event"])
            return
        if catch_up_chat is not None:
            if line.get("ok"):
                task = line["result"]
                if task.get("state") in TERMINAL:
                    self.on_finished(catch_up_chat[0], task)
            elif (line.get("error") or {}).get("code") == "not_found":
                task_id = catch_up_chat[1]
                with self.lock:
                    known = task_id in self.live
                if known and remember(self.posted_finished, task_id, self.lock):
                    self.post(catch_up_chat[0], "unknown",
                              "task %s  unknown to agentd now: how it ended cannot be shown"
                              % task_id, task_id=task_id, key="end.%s" % task_id)
                with self.lock:
                    self.live.pop(task_id, None)
                    self._keep()
            return
        if message is not None:
            chat = message[0]
            # The answer is posted before the state file forgets the message: a
            # crash in between sends it again after the restart, and posts the
            # answer again with this key.
            key = {} if message[1] is None else {"key": "answer.%s" % message[1]}
            if line.get("ok"):
                try:
                    result = line["result"]
                    reply = result["reply"]
                    task = result.get("task")
                    task_id = task["task_id"] if task else None
                    if not isinstance(reply, str) or (task and not isinstance(task_id, str)):
                        raise TypeError("reply or task_id is not a string")
                except (KeyError, TypeError, AttributeError) as e:
                    # The details are for the log; the chat gets a short message.
                    log("agentd's answer to a send cannot be read (%r): %s" % (e, raw[:200]))
                    self.post(chat, "error", UNREADABLE, **key)
                    with self.lock:
                        self._keep()
                    return
                extra = dict(key)
                if task:
                    extra["task_id"] = task_id
                    if task.get("state") not in TERMINAL:
                        with self.lock:
                            self.live[task_id] = chat
                if result.get("command"):
                    extra["command"] = result["command"]
                self.post(chat, "reply", reply, **extra)
                if task and result.get("duplicate") and task.get("state") in TERMINAL:
                    # A message sent again whose task ended meanwhile (the bridge
                    # was killed before it saved the answer): its end, once.
                    self.on_finished(chat, task)
                with self.lock:
                    self._keep()
            else:
                error = line.get("error", {})
                self.post(chat, "error", error.get("message", "agentd refused the message"),
                          code=error.get("code"), **key)
                with self.lock:
                    self._keep()
            return
        if watch_chat is not None and not line.get("ok"):
            error = line.get("error") or {}
            with self.lock:
                self.watch_ids.pop(request_id, None)
                if error.get("code") == "lagged":
                    log("the watch of", watch_chat, "fell behind; watching again")
                    self._rewatch(watch_chat)
                    return
            log("watch of", watch_chat, "refused:", error)

    def on_event(self, chat, event):
        kind = event.get("kind")
        task_id = event.get("task_id")
        task = event.get("task") or {}
        if kind in ("accepted", "started", "progress") and task.get("state") not in TERMINAL:
            with self.lock:
                if self.live.get(task_id) != chat:
                    self.live[task_id] = chat
                    self._keep()
        if kind == "progress":
            line = event.get("text", "")
            self.post(chat, "progress", line, html=("", line), task_id=task_id)
        elif kind == "started":
            if remember(self.posted_started, task_id, self.lock):
                self.post(chat, "started", "task %s  started" % task_id, task_id=task_id)
        elif kind == "accepted" and event.get("text"):
            # A steered message the agent refused, queued as a follow-up.
            self.post(chat, "notice", event["text"], task_id=task_id)
        elif kind == "finished":
            self.on_finished(chat, task)

    def on_finished(self, chat, task):
        """Posts a task's end, once (a watch's `finished`, or a catch-up `status`),
        then saves that the task ended: a crash in between posts it again after
        the restart, with the same key."""
        task_id = task.get("task_id")
        state = task.get("state", "finished")
        # A merged task's message went into another task; that one's end is reported.
        if remember(self.posted_finished, task_id, self.lock) and state != "merged":
            lead = "task %s  %s" % (task_id, state)
            text, html = lead, None
            if task.get("result"):
                text += ": " + task["result"]
                html = (lead, task["result"])
            self.post(chat, "finished", text, html=html, task_id=task_id, state=state,
                      key="end.%s" % task_id)
        with self.lock:
            self.live.pop(task_id, None)
            self._keep()


# Terminal escape sequences (ECMA-48), as a terminal parser reads them: CSI (`ESC [`,
# parameters, intermediates, a final byte), OSC (`ESC ]`, ended by BEL or ST = `ESC \`),
# DCS/SOS/PM/APC strings (ended by ST), and the other `ESC` sequences (intermediates
# and a final byte). A sequence the text ends in the middle of is dropped too; an ESC
# inside a string ends it (and starts a sequence of its own), as in a terminal.
ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*(?:[@-~]|(?=\x1b)|\Z)"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"
    r"|\x1b[ -/]*[0-~]?"
)
# Control characters (Unicode category Cc, C1 included) but newline, tab and CR.
CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def chat_text(text):
    """`text` as a chat should show it: without terminal escape sequences; a carriage
    return starts the line over, so each line shows its last non-empty redraw (and
    `\r\n` is a line end); other control characters are dropped, newlines and tabs
    kept. The same as agentd-matrix's cleaning (crates/bridge/src/clean.rs)."""
    if not isinstance(text, str):
        return text
    text = CONTROLS.sub("", ESCAPES.sub("", text))
    lines = []
    for line in text.split("\n"):
        redraws = [part for part in line.split("\r") if part]
        lines.append(redraws[-1] if redraws else "")
    return "\n".join(lines)


def chat_html(lead, output):
    """`lead`, then `output` (an agent's output) as a code block, in HTML: escaped,
    the lead's line ends as `<br>`. The same as agentd-matrix's `formatted_body`
    (`html` in crates/bridge/src/matrix.rs)."""
    text = html.escape(lead, quote=False).replace("\n", "<br>")
    if output:
        text += "<pre><code>" + html.escape(output, quote=False) + "</code></pre>"
    return text


# For the tests only (tests/bridge.rs), never for use: when set, the bridge stops
# for good right after it posted a text containing its value, before it saves its
# state, so a test can kill it in that window. agentd-matrix has the same hook.
TEST_HOLD_AFTER_POST = "AGENTD_BRIDGE_TEST_HOLD_AFTER_POST"

# What the chat is told when agentd's answer to its message cannot be read.
UNREADABLE = ("agentd's answer to this message could not be read (the bridge's log has "
              "the details); it may have started a task: /status shows what runs")

# Task states that never change again (docs/protocol.md, "TaskView").
TERMINAL = {"succeeded", "failed", "cancelled", "interrupted", "expired", "dropped", "merged"}


def remember(seen, key, lock, keep=10000):
    """Adds `key` to the bounded set `seen`; False if it was already there."""
    with lock:
        if key in seen:
            return False
        seen[key] = True
        while len(seen) > keep:
            seen.popitem(last=False)
        return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", default=default_socket(), help="agentd's control socket")
    parser.add_argument("--client", default="bridge.py", help="name sent in hello")
    parser.add_argument("--max-delay", type=float, default=2.0,
                        help="longest wait between reconnection attempts, in seconds")
    parser.add_argument("--state", default=default_state_file(),
                        help="the state file (chats, followed tasks, unanswered messages); "
                             "'' keeps none. Default: %(default)s")
    args = parser.parse_args()

    bridge = Bridge(args.socket, args.client, args.max_delay, args.state)
    threading.Thread(target=bridge.run_connection, daemon=True).start()
    for raw in sys.stdin:
        if not raw.strip():
            continue
        try:
            message = json.loads(raw)
            if not isinstance(message["text"], str):
                raise TypeError("text is not a string")
            bridge.on_chat_message(str(message["chat"]), message.get("message_id"),
                                   message["text"])
        except (ValueError, KeyError, TypeError) as e:
            log("ignoring a chat line (%s): %s" % (e, raw.strip()[:200]))
    # The chat side closed: give the answers still due a moment, then leave.
    deadline = time.monotonic() + 5
    while bridge.unanswered and time.monotonic() < deadline:
        time.sleep(0.05)


if __name__ == "__main__":
    main()
