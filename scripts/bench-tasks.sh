#!/usr/bin/env bash
# Trivial tasks end to end (issue 6, section 2b). Starts a release agentd with the
# default agent (agent-exec running `sh -c {text}`) and `--max-concurrent 2`, sends
# N tasks `true`, one per session, and waits until every one has ended. Prints:
#   baseline: the machine's spawn rate, `sh -c true` started twice in parallel by
#             a small Python loop (fork+exec+wait, the floor of any supervisor);
#   agentd:   tasks per second end to end and its ratio to the baseline, agentd's own
#             CPU time per task (utime+stime of all its threads, /proc/PID/stat,
#             before and after), split by thread name (threads that ended during
#             the run, such as per-agent log pumps, are summed as "ended threads"),
#             and how often each thread was woken per task (voluntary context
#             switches: the loop's CPU per task is mostly the cost of being woken),
#             and the agents' CPU per task (agentd's reaped children: agent-exec
#             and its `sh`);
#   pueue:    the same N tasks with `pueue` and `--parallel 2`, when pueue and
#             pueued are on PATH (skipped otherwise).
# Not a test: it asserts nothing, it reports. N=2000 by default. The machine's load
# average is printed before and after: on a shared machine, compare ratios.
# PERF=FILE records agentd with `perf record -g` into FILE during the run.
# BIN=DIR runs the agentd, agentctl and agent-exec in DIR instead of building them
# (to compare two builds one after the other).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2000}

if [[ -z "${BIN:-}" ]]; then
    cargo build --release --quiet --bin agentd --bin agentctl --bin agent-exec
    BIN="$PWD/target/release"
fi
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

echo "== load average: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores)"
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

PERF_PID=""
if [[ -n "${PERF:-}" ]]; then
    perf record -g -o "$PERF" -p "$PID" 2>"$WORK/perf.log" &
    PERF_PID=$!
    sleep 1
fi

echo "== agentd: $N trivial tasks, one per session, --max-concurrent 2"
python3 - "$N" "$AGENTD_SOCKET" "$PID" "$base" <<'PY'
import json, os, socket, sys, time
n, path, pid, base = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
tick = os.sysconf("SC_CLK_TCK")
def fields(stat):
    return open(stat).read().rsplit(")", 1)[1].split()
def cpu():
    f = fields(f"/proc/{pid}/stat")
    # utime, stime (all threads, ended ones too), cutime, cstime (reaped children)
    return (int(f[11]) + int(f[12])) / tick, (int(f[13]) + int(f[14])) / tick
def wakeups(tid):
    # Voluntary context switches: how often the thread slept and was woken.
    for line in open(f"/proc/{pid}/task/{tid}/status"):
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0
def threads():
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            f = fields(f"/proc/{pid}/task/{tid}/stat")
            name = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            woken = wakeups(tid)
        except OSError:
            continue
        out[tid] = (name, (int(f[11]) + int(f[12])) / tick, woken)
    return out
s = socket.socket(socket.AF_UNIX); s.connect(path)
r = s.makefile("r")
def call(body, id=1):
    s.sendall((json.dumps({"id": id, **body}) + "\n").encode())
    while True:
        line = json.loads(r.readline())
        if line.get("id") == id and "event" not in line:
            return line
(cpu0, kids0), threads0 = cpu(), threads(); t0 = time.perf_counter()
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
(cpu1, kids1), threads1 = cpu(), threads()
rate = n / took
per_task = (cpu1 - cpu0) / n * 1000
print(f"   sent in {sent:.2f} s; all {n} ended in {took:.2f} s: {rate:.1f} tasks/s "
      f"({rate / base:.2f}x the spawn baseline of {base:.1f}/s; target >= 400 tasks/s)")
print(f"   agentd CPU per task: {per_task:.3f} ms (target < 0.5 ms)")
split, woken = {}, {}
for tid, (name, t, w) in threads1.items():
    before = threads0.get(tid, (name, 0.0, 0))
    split[name] = split.get(name, 0.0) + t - before[1]
    woken[name] = woken.get(name, 0) + w - before[2]
split["ended threads"] = (cpu1 - cpu0) - sum(split.values())
print("   by thread: " + ", ".join(f"{k} {v / n * 1000:.3f} ms" for k, v in
                                   sorted(split.items(), key=lambda kv: -kv[1]) if v > 0))
print("   wake-ups per task (voluntary context switches): " + ", ".join(
    f"{k} {v / n:.1f}" for k, v in sorted(woken.items(), key=lambda kv: -kv[1]) if v > 0))
print(f"   agents' CPU per task (agent-exec and sh, reaped): {(kids1 - kids0) / n * 1000:.3f} ms")
PY
if [[ -n "$PERF_PID" ]]; then
    kill -INT "$PERF_PID"; wait "$PERF_PID" || true
    echo "   perf data in $PERF"
fi
echo "== load average: $(cut -d' ' -f1-3 /proc/loadavg)"

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
