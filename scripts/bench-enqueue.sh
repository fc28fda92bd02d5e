#!/usr/bin/env bash
# Enqueue benchmark (issue 6, section 2b). Starts a release agentd whose two agent
# slots hold tasks that never end, so every message waits, and runs
# examples/bench_enqueue.rs against it: bulk enqueue over the socket with 64
# clients, 100k messages over 10k sessions (the rate over the whole run, with an
# empty queue and at 90k–100k queued), and `status` p50 empty and full, each printed
# as a ratio against baselines measured in the same run (the machine's Unix-socket
# round trip and the same echo with 64 clients). The idle round trip is bimodal on a
# 2-core machine (server woken on the client's CPU, ~13 µs, or on the other, idle
# vCPU, 40-60 µs), and with one client alternating between two servers the kernel
# mostly keeps one on the client's CPU and sends the other across: the one that
# costs more CPU per request (agentd, against the echo), so the unpinned `status`
# ratio measures that placement more than agentd's own cost. Each `status` p50 is
# therefore also printed placement-matched, which is the figure the target is read
# on: the benchmark pinned to CPU 0, agentd left unpinned, and after each of
# agentd's replies the echo server moved to the CPU agentd's loop thread ran on,
# with how many samples had agentd's loop on the client's CPU and both p50s by that
# placement. At 100k queued it is also measured with agentd and the echo server
# pinned alike (both on the client's CPU, then both on the other), with their CPU
# per request beside it (itself placement-dependent: about twice as much on the
# other vCPU, so each CPU figure says where agentd's loop ran).
# Not a test: it asserts nothing, it reports. Override with CLIENTS, MESSAGES, SESSIONS
# (SESSIONS=1 puts every message in one session's queue; the cap is raised for it),
# and BIN=DIR to run the binaries in DIR (agentd, agentctl, examples/bench_enqueue)
# instead of building this tree's, e.g. to compare two builds one after the other.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-64}
MESSAGES=${MESSAGES:-100000}
SESSIONS=${SESSIONS:-10000}

if [ -z "${BIN:-}" ]; then
    cargo build --release --quiet --bin agentd --bin agentctl --bin agent-exec --example bench_enqueue
    BIN="$PWD/target/release"
fi
WORK="$(mktemp -d -t agentd-bench.XXXXXX)"; chmod 700 "$WORK"
export AGENTD_SOCKET="$WORK/agentd.sock"
cat >"$WORK/agentd.toml" <<TOML
max-queued = $((MESSAGES * 2))
cap = $((MESSAGES * 2))
history = 1000
TOML
"$BIN/agentd" --config "$WORK/agentd.toml" --max-concurrent 2 --state-dir "$WORK/state" \
    2>"$WORK/agentd.log" &
PID=$!
cleanup() {
    kill -KILL "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
for _ in $(seq 1 100); do "$BIN/agentctl" ping >/dev/null 2>&1 && break; sleep 0.05; done

"$BIN/examples/bench_enqueue" --socket "$AGENTD_SOCKET" --clients "$CLIENTS" \
    --messages "$MESSAGES" --sessions "$SESSIONS" --text 'sleep 600'
ps -o rss=,cputime= -p "$PID" | awk '{printf "agentd RSS %.1f MB, CPU time %s\n", $1/1024, $2}'
