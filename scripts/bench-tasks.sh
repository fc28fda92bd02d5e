#!/usr/bin/env bash
# Trivial tasks end to end (issue 6, section 2b). Starts a release agentd with the
# default agent (agent-exec running `sh -c {text}`) and `--max-concurrent 2`, sends
# N tasks `true`, one per session, and waits until every one has ended. Prints:
#   baseline: the machine's spawn rate, `sh -c true` started twice in parallel by
#             a small Python loop (fork+exec+wait, the floor of any supervisor);
#   agentd:   tasks per second end to end, and agentd's own CPU time per task
#             (utime+stime from /proc/PID/stat, before and after);
#   pueue:    the same N tasks with `pueue` and `--parallel 2`, when pueue and
#             pueued are on PATH (skipped otherwise).
# Not a test: it asserts nothing, it reports. N=2000 by default.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2000}

cargo build --release --quiet --bin agentd --bin agentctl --bin agent-exec
BIN="$PWD/target/release"
WORK="$(mktemp -d -t agentd-bench-tasks.XXXXXX)"
chmod 700 "$WORK"
export AGENTD_SOCKET="$WORK/agentd.sock"
PID=""
cleanup() {
    if [[ -n "$PID" ]]; then
        kill -TERM "$PID" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "== baseline: sh -c true, two at a time ($N in all)"
base=$(python3 - "$N" <<'PY'
import os, sys, threading, time
n = int(sys.argv[1])
def worker(count):
    for _ in range(count):
        pid = os.posix_spawn("/bin/sh", ["sh", "-c", "true"], os.environ)
        os.waitpid(pid, 0)
t = time.perf_counter()
threads = [threading.Thread(target=worker, args=(n // 2,)) for _ in range(2)]
for th in threads: th.start()
for th in threads: th.join()
print(f"{n / (time.perf_counter() - t):.1f}")
PY
)
echo "   $base spawns/s"

"$BIN/agentd" --max-concurrent 2 --max-queued $((N + 10)) \
    --state-dir "$WORK/state" 2>"$WORK/agentd.log" &
PID=$!
for _ in $(seq 1 200); do "$BIN/agentctl" ping >/dev/null 2>&1 && break; sleep 0.05; done
"$BIN/agentctl" ping >/dev/null || { echo "agentd did not start:"; cat "$WORK/agentd.log"; exit 1; }

echo "== agentd: $N trivial tasks, one per session, --max-concurrent 2"
python3 - "$N" "$AGENTD_SOCKET" "$PID" "$base" <<'PY'
import json, os, socket, sys, time
n, path, pid, base = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
tick = os.sysconf("SC_CLK_TCK")
def cpu():
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick
s = socket.socket(socket.AF_UNIX); s.connect(path)
r = s.makefile("r")
def call(body, id=1):
    s.sendall((json.dumps({"id": id, **body}) + "\n").encode())
    while True:
        line = json.loads(r.readline())
        if line.get("id") == id and "event" not in line:
            return line
cpu0 = cpu(); t0 = time.perf_counter()
# Pipelined: every send on the one connection, answers read after.
batch = 200
for start in range(0, n, batch):
    lines = "".join(json.dumps({"id": 10 + i, "cmd": "send", "session": f"bench-{i}", "text": "true"}) + "\n"
                    for i in range(start, min(n, start + batch)))
    s.sendall(lines.encode())
    for _ in range(min(n, start + batch) - start):
        line = json.loads(r.readline())
        assert line["ok"], line
sent = time.perf_counter() - t0
while True:
    st = call({"cmd": "status"})["result"]
    if st["queued"] == 0 and st["capacity"]["busy"] == 0:
        break
    time.sleep(0.02)
took = time.perf_counter() - t0
rate = n / took
per_task = (cpu() - cpu0) / n * 1000
print(f"   sent in {sent:.2f} s; all {n} ended in {took:.2f} s: {rate:.1f} tasks/s "
      f"({rate / base:.2f}x the spawn baseline; target >= 400 tasks/s)")
print(f"   agentd CPU per task: {per_task:.3f} ms (target < 0.5 ms)")
PY

if command -v pueue >/dev/null 2>&1 && command -v pueued >/dev/null 2>&1; then
    echo "== pueue: $N tasks 'true', --parallel 2"
    PUEUE_DIR="$WORK/pueue"
    mkdir -p "$PUEUE_DIR"
    pueued --config "$PUEUE_DIR/pueue.yml" -d >/dev/null 2>&1 || true
    sleep 1
    pueue --config "$PUEUE_DIR/pueue.yml" parallel 2 >/dev/null
    t0=$(date +%s.%N)
    for _ in $(seq 1 "$N"); do pueue --config "$PUEUE_DIR/pueue.yml" add -- true >/dev/null; done
    pueue --config "$PUEUE_DIR/pueue.yml" wait >/dev/null
    t1=$(date +%s.%N)
    python3 -c "import sys; print(f'   {int(sys.argv[1]) / (float(sys.argv[3]) - float(sys.argv[2])):.1f} tasks/s')" "$N" "$t0" "$t1"
    pueue --config "$PUEUE_DIR/pueue.yml" shutdown >/dev/null 2>&1 || true
else
    echo "== pueue: not on PATH, skipped"
fi
