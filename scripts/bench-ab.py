#!/usr/bin/env python3
"""A/B benchmark: agentd's CPU time per control request, for two builds side by side.

Starts one agentd from each of two directories of release binaries (e.g. main's and
yours), then runs rounds of the same requests against each, alternating (A B, B A,
A B, ...), so both see the same machine load. A round's CPU is read from
/proc/PID/task/*/schedstat (nanoseconds, all threads, and the loop thread alone)
before and after it. Prints, per build, the median CPU per request over the rounds
and every round's figure. CPU time per request does not depend on how busy the
machine is the way a rate does, and alternating takes out most of what remains.

  KIND send:   CLIENTS connections (default 64, one process each) send N `send`
               requests per round over 10,000 sessions (each waits for its durable
               acknowledgement); the agents never start, so the queue grows by N a
               round.
  KIND send-id: the same, but as scripts/bench-store.sh's end-to-end clients send:
               each message with its own message id (checked against the
               de-duplication window, and the store's unique index), each client
               over 10 sessions of its own (640 in all).
  KIND status: one connection sends N `status` requests per round, one at a time.
  KIND ping:   likewise with `ping`.

Not a test: it asserts nothing but that every answer is ok, it reports.

Usage: scripts/bench-ab.py DIR_A DIR_B KIND N ROUNDS
       (PERF=FILE also records `perf record` of build A's loop thread per round,
        into FILE.ROUND, with CG=fp|dwarf,SIZE as its call graph.)
"""
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def cpu(pid):
    """(all threads, the main thread, the store's writer) CPU time of `pid` in ns."""
    total = loop = writer = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        total += ns
        if int(tid) == pid:
            loop = ns
        if comm == "agentd-store":
            writer = ns
    return total, loop, writer


def start(bindir, capacity):
    work = tempfile.mkdtemp(prefix="agentd-ab.")
    os.chmod(work, 0o700)
    sock = os.path.join(work, "agentd.sock")
    with open(os.path.join(work, "agentd.toml"), "w") as f:
        f.write(f"max-queued = {capacity}\ncap = {capacity}\nhistory = 1000\n")
    log = open(os.path.join(work, "agentd.log"), "w")
    p = subprocess.Popen(
        [f"{bindir}/agentd", "--config", f"{work}/agentd.toml", "--max-concurrent", "2",
         "--state-dir", f"{work}/state", "--socket", sock],
        stderr=log)
    for _ in range(200):
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            s.close()
            break
        except OSError:
            time.sleep(0.05)
    return p, sock, work


def round_trip(f, s, line):
    s.sendall(line)
    reply = f.readline()
    assert reply and b'"ok":true' in reply, reply
    return reply


def one_by_one(sock, line, n):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    f = s.makefile("rb")
    for _ in range(n):
        round_trip(f, s, line)
    s.close()


def sender(args):
    sock, c, clients, n, base, sessions = args
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    f = s.makefile("rb")
    for i in range(c, n, clients):
        k = base + i
        round_trip(f, s, ('{"id":%d,"cmd":"send","session":"s%d","text":"sleep 600"}\n'
                          % (k, k % sessions)).encode())
    s.close()


def sender_with_ids(args):
    sock, c, clients, n, base = args
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    f = s.makefile("rb")
    for i in range(c, n, clients):
        k = base + i
        round_trip(f, s, ('{"id":%d,"cmd":"send","session":"chat-%d-%d","text":"sleep 600 # %d",'
                          '"message_id":"m-%d-%d"}\n' % (k, c, k % 10, k, c, k)).encode())
    s.close()


def main():
    if len(sys.argv) != 6 or sys.argv[3] not in ("send", "send-id", "status", "ping"):
        sys.exit(__doc__)
    a, b, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    n, rounds = int(sys.argv[4]), int(sys.argv[5])
    clients = int(os.environ.get("CLIENTS", "64"))
    daemons = [start(d, 2 * n * rounds + 10) for d in (a, b)]
    results = {0: [], 1: []}
    pool = mp.Pool(clients) if kind.startswith("send") else None
    try:
        for r in range(rounds):
            for d in ((0, 1) if r % 2 == 0 else (1, 0)):
                p, sock, _ = daemons[d]
                perf = None
                if d == 0 and os.environ.get("PERF"):
                    perf = subprocess.Popen(
                        ["perf", "record", "-F", "1000", "--call-graph",
                         os.environ.get("CG", "fp"), "-o", f"{os.environ['PERF']}.{r}",
                         "-t", str(p.pid)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(0.3)
                before = cpu(p.pid)
                if kind == "send":
                    pool.map(sender, [(sock, c, clients, n, r * n, 10000)
                                      for c in range(clients)])
                elif kind == "send-id":
                    pool.map(sender_with_ids, [(sock, c, clients, n, r * n)
                                               for c in range(clients)])
                else:
                    one_by_one(sock, b'{"id":1,"cmd":"%s"}\n' % kind.encode(), n)
                after = cpu(p.pid)
                if perf:
                    perf.send_signal(2)
                    perf.wait()
                results[d].append(tuple((after[i] - before[i]) / n / 1000 for i in range(3)))
        for d, name in ((0, "A " + a), (1, "B " + b)):
            every = [x[0] for x in results[d]]
            loop = [x[1] for x in results[d]]
            writer = [x[2] for x in results[d]]
            print(f"{name}: {kind} CPU per request, all threads median "
                  f"{statistics.median(every):6.2f} µs [{' '.join(f'{x:.1f}' for x in every)}]"
                  f"  loop thread {statistics.median(loop):6.2f} µs "
                  f"[{' '.join(f'{x:.1f}' for x in loop)}]"
                  f"  store writer {statistics.median(writer):6.2f} µs "
                  f"[{' '.join(f'{x:.1f}' for x in writer)}]")
    finally:
        for p, _, work in daemons:
            p.kill()
            p.wait()
            subprocess.run(["rm", "-rf", work])
        if pool:
            pool.terminate()


if __name__ == "__main__":
    main()
