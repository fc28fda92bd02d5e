#!/usr/bin/env bash
# Status latency while a 300-process task tree is stopped (issue 6 §2, issue 8), on
# both containment paths (a cgroup per task where this host allows it, and the
# process-tree fallback with --no-cgroup). For each: `status` round trips over the
# socket while idle, then while the tree's stop runs (the kill rounds run on agentd's
# Killer thread, not on its event loop), printed as p50/p99/max and the ratio of the
# p50s; and how long the stop took from the request to `cancelled`.
# Not a test: it asserts nothing, it reports. Override with PROCS (default 300) and
# PROFILE (default release; `debug` reuses a debug build).
# BIN=DIR runs the agentd, agentctl and agent-exec in DIR instead of building them
# (to compare two builds one after the other); PROFILE is then not used.
set -euo pipefail
cd "$(dirname "$0")/.."
PROCS=${PROCS:-300}
PROFILE=${PROFILE:-release}

if [[ -n "${BIN:-}" ]]; then
    BIN="$(cd "$BIN" && pwd)"
elif [ "$PROFILE" = release ]; then
    cargo build --release --quiet --bin agentd --bin agentctl --bin agent-exec
    BIN="$PWD/target/release"
else
    cargo build --quiet --bin agentd --bin agentctl --bin agent-exec
    BIN="$PWD/target/debug"
fi
for b in agentd agentctl agent-exec; do
    [[ -x "$BIN/$b" ]] || { echo "bench-stop-tree: no $b in $BIN" >&2; exit 1; }
done
WORK="$(mktemp -d -t agentd-stoptree.XXXXXX)"; chmod 700 "$WORK"
PID=
cleanup() {
    [ -n "$PID" ] && { kill -KILL "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
    rm -rf "$WORK"
}
trap cleanup EXIT

run() {
    local label=$1; shift
    local sock="$WORK/$label.sock"
    "$BIN/agentd" --socket "$sock" --state-dir "$WORK/$label-state" \
        --cancel-grace 100ms --term-grace 300ms "$@" 2>"$WORK/$label.log" &
    PID=$!
    for _ in $(seq 1 100); do "$BIN/agentctl" --socket "$sock" ping >/dev/null 2>&1 && break; sleep 0.05; done
    python3 - "$sock" "$PROCS" "$WORK/$label.pids" "$label" <<'PY'
import json, socket, statistics, sys, threading, time

sock_path, procs, pidfile, label = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

class Conn:
    def __init__(self):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(sock_path)
        self.f = self.s.makefile("rb")
        self.n = 0
    def ask(self, body):
        self.n += 1
        body["id"] = self.n
        self.s.sendall((json.dumps(body) + "\n").encode())
        while True:
            line = json.loads(self.f.readline())
            if line.get("id") == self.n and "event" not in line:
                return line

def latencies(conn, until):
    out = []
    while not until():
        t = time.perf_counter()
        conn.ask({"cmd": "status"})
        out.append(time.perf_counter() - t)
    return out

def fmt(xs):
    xs = sorted(xs)
    p = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))] * 1e6
    return f"p50 {p(0.5):.0f} µs, p99 {p(0.99):.0f} µs, max {xs[-1] * 1e6:.0f} µs ({len(xs)} answers)"

status = Conn()
kind = status.ask({"cmd": "status"})["result"].get("containment", {}).get("kind", "?")
count = [0]
def enough():
    count[0] += 1
    return count[0] > 500
idle = latencies(status, enough)

script = (f"i=0; while [ $i -lt {procs} ]; do sh -c 'trap \"\" TERM; echo $$ >> {pidfile}; "
          f"exec sleep 600' & i=$((i+1)); done; echo up; wait")
ctl = Conn()
task = ctl.ask({"cmd": "send", "session": "bench", "text": script})["result"]["task"]["task_id"]
def lines():
    try:
        with open(pidfile) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0
while lines() < procs:
    time.sleep(0.02)

state = ["running"]
def watch_state():
    c = Conn()
    while state[0] != "cancelled":
        state[0] = c.ask({"cmd": "status", "task_id": task})["result"]["state"]
        time.sleep(0.005)
watcher = threading.Thread(target=watch_state)
t0 = time.perf_counter()
ctl.ask({"cmd": "stop", "task_id": task, "wait": False})
watcher.start()
during = latencies(status, lambda: state[0] == "cancelled")
took = time.perf_counter() - t0
watcher.join()
ratio = statistics.median(during) / statistics.median(idle)
print(f"{label} ({kind}): status idle: {fmt(idle)}")
print(f"{label} ({kind}): status during the stop of {procs} processes: {fmt(during)}")
print(f"{label} ({kind}): p50 during/idle = {ratio:.2f}x; stop to cancelled {took * 1000:.0f} ms")
PY
    kill -TERM "$PID"; wait "$PID" 2>/dev/null || true; PID=
}

run default
run fallback --no-cgroup
