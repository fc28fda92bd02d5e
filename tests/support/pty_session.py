"""Drives a program on a pseudo-terminal for the tests (standard library only).

Usage: pty_session.py SPEC_JSON, where SPEC is
  {"cmd": [...], "env": {...}, "timeout": seconds, "steps": [STEP, ...]}
and a STEP is one of
  ["expect", REGEX]  wait until REGEX matches the output after the previous match
  ["type", LINE]     type LINE and Enter
  ["touch", PATH]    create the file PATH
  ["eof"]            type Ctrl-D
  ["wait"]           wait until the program exits
Prints one JSON object on stdout: {"ok": bool, "error": str|null, "status": int|null,
"transcript": str} and exits 0; the program is killed (by pid) if still running.
"""

import json
import os
import pty
import re
import select
import signal
import sys
import time

spec = json.loads(sys.argv[1])
timeout = spec.get("timeout", 20)
env = dict(os.environ)
env.update(spec.get("env", {}))

pid, fd = pty.fork()
if pid == 0:
    try:
        os.execvpe(spec["cmd"][0], spec["cmd"], env)
    finally:
        os._exit(127)

out = b""
pos = 0
status = None


def pump(deadline):
    """Reads what the program wrote until the deadline; False once it closed."""
    global out
    wait = max(0.0, deadline - time.time())
    ready, _, _ = select.select([fd], [], [], min(wait, 0.05))
    if not ready:
        return True
    try:
        data = os.read(fd, 65536)
    except OSError:
        return False
    if not data:
        return False
    out += data
    return True


def reap(deadline):
    global status
    while status is None and time.time() < deadline:
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(code)
            break
        pump(deadline)
    return status is not None


def finish(error):
    if status is None:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
    print(json.dumps({
        "ok": error is None,
        "error": error,
        "status": status,
        "transcript": out.decode("utf-8", "replace"),
    }))
    sys.exit(0)


for step in spec["steps"]:
    kind = step[0]
    deadline = time.time() + timeout
    if kind == "expect":
        rx = re.compile(step[1].encode(), re.M)
        while True:
            m = rx.search(out, pos)
            if m:
                pos = m.end()
                break
            if time.time() > deadline:
                finish("timed out waiting for %r" % step[1])
            if not pump(deadline):
                m = rx.search(out, pos)
                if m:
                    pos = m.end()
                    break
                finish("the program closed the terminal before %r" % step[1])
    elif kind == "type":
        os.write(fd, step[1].encode() + b"\r")
    elif kind == "touch":
        open(step[1], "w").close()
    elif kind == "eof":
        os.write(fd, b"\x04")
    elif kind == "wait":
        if not reap(deadline):
            finish("the program did not exit")
    else:
        finish("unknown step %r" % kind)

finish(None)
