#!/usr/bin/env bash
# Control-plane latency benchmark. Prints the median and p90 time of whole
# `agentctl` processes, and ratios against a baseline measured in the same run:
#   baseline: `agentctl ping` against an idle agentd (answered by the connection,
#             without the supervisor loop);
#   then:     `agentctl status` idle, and `agentctl status` / `send /status` while
#             2 agents flood progress lines as fast as they can and 50 messages wait.
# Not a test: it asserts nothing, it reports.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-40}

cargo build --release --quiet --bin agentd --bin agentctl --bin agent-exec
BIN="$PWD/target/release"
WORK="$(mktemp -d -t agentd-bench.XXXXXX)"; chmod 700 "$WORK"
export AGENTD_SOCKET="$WORK/agentd.sock"
"$BIN/agentd" --max-concurrent 2 --state-dir "$WORK/state" 2>"$WORK/agentd.log" &
PID=$!
trap 'kill -TERM $PID 2>/dev/null; sleep 1; kill -KILL $PID 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 1 100); do "$BIN/agentctl" ping >/dev/null 2>&1 && break; sleep 0.05; done

# Times N runs of a command; prints "median p90" in microseconds.
measure() {
    python3 - "$N" "$@" <<'PY'
import subprocess, sys, time
n = int(sys.argv[1]); cmd = sys.argv[2:]
samples = []
for _ in range(n):
    t = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
    samples.append((time.perf_counter() - t) * 1e6)
samples.sort()
print(int(samples[len(samples) // 2]), int(samples[int(len(samples) * 0.9)]))
PY
}

report() { # name median p90 base
    python3 -c "import sys; n,m,p,b=sys.argv[1],int(sys.argv[2]),int(sys.argv[3]),int(sys.argv[4]); print(f'{n:<44} median {m/1000:7.2f} ms  p90 {p/1000:7.2f} ms  ratio {m/b:5.2f}x')" "$@"
}

read -r base base90 < <(measure "$BIN/agentctl" ping)
report "baseline: agentctl ping (idle)" "$base" "$base90" "$base"
read -r m p < <(measure "$BIN/agentctl" status)
report "agentctl status (idle)" "$m" "$p" "$base"

for s in flood1 flood2; do "$BIN/agentctl" send --session "$s" 'yes progress-line-of-some-length | head -n 3000000' >/dev/null; done
for i in $(seq 1 50); do "$BIN/agentctl" send --session "waiting$((i % 10))" "echo $i" >/dev/null; done
sleep 0.5
read -r m p < <(measure "$BIN/agentctl" status)
report "agentctl status (2 floods, 50 queued)" "$m" "$p" "$base"
read -r m p < <(measure "$BIN/agentctl" send --session flood1 /status)
report "agentctl send /status (2 floods, 50 queued)" "$m" "$p" "$base"
read -r m p < <(measure "$BIN/agentctl" tasks)
report "agentctl tasks (2 floods, 50 queued)" "$m" "$p" "$base"
"$BIN/agentctl" status | head -n 1
