#!/usr/bin/env bash
# Store benchmark (crates/store/examples/bench-store.rs). Prints rates as ratios
# against a baseline measured in the same run on the same disk:
#   baseline: one fsync'd commit per message (plain SQLite, WAL + synchronous=FULL);
#   then:     the store with 1 client and with 64 concurrent clients (group commit;
#             64 threads, and 64 clients on one thread answered by callback as agentd's
#             loop is, each with the writer's and the process's CPU per message),
#             a real agentd acknowledging 64 socket clients after each commit (and
#             its `status` latency p50/p90/p99 while they keep the writer busy, as
#             ratios to idle, beside the same clients against a bare echo server),
#             and a fresh process reopening 100,000 queued tasks over 10,000 sessions.
# The store goes under $BENCH_DIR (default: a new dir in /var/tmp, which is on disk
# rather than tmpfs on most systems; fsync on tmpfs would measure nothing).
# BIN=DIR runs the binaries already built in DIR (agentd, agent-exec and
# examples/{bench-store,bench_status}, as in target/release) instead of building
# this tree's: to compare two builds one after the other.
# Not a test: it asserts nothing, it reports.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${BIN:-}" ]; then
    cargo build --release --quiet -p agentd-store --example bench-store
    cargo build --release --quiet --bin agentd --bin agent-exec --example bench_status
    BIN="$PWD/target/release"
fi
RBIN="$BIN"
WORK="$(mktemp -d "${BENCH_DIR:-/var/tmp}/agentd-bench-store.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
echo "disk: $(df -P "$WORK" | awk 'NR==2 {print $1 " (" $6 ")"}'), $(nproc) cores"
mkdir -p "$WORK/enqueue" "$WORK/reopen"
"$RBIN/examples/bench-store" enqueue "$WORK/enqueue"
"$RBIN/examples/bench-store" reopen "$WORK/reopen"

# End to end: 64 clients send work to a real agentd over its socket, each waiting for
# its acknowledgement (which comes only after the commit). Nothing runs: the tasks
# wait behind a gate, so this measures accept + durable commit + answer, and
# `status` latency meanwhile (examples/bench_status.rs: p50/p90/p99 with the writer
# busy as ratios to idle, beside a bare echo server loaded by the same clients at the
# same rate, which is the machine's and the benchmark's own share of the tail).
E2E="$WORK/e2e"; mkdir -p "$E2E/run"; chmod 700 "$E2E" "$E2E/run"
"$RBIN/agentd" --socket "$E2E/run/agentd.sock" --state-dir "$E2E/state" \
    --max-concurrent 1 --max-queued 1000000 --cap 1000000 --queue-mode followup \
    --agent "$RBIN/agent-exec -- sh -c {text}" 2>"$E2E/agentd.log" &
APID=$!
trap 'kill -KILL $APID 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 200); do [ -S "$E2E/run/agentd.sock" ] && break; sleep 0.05; done
# CPU ticks (utime + stime) of agentd's thread named $1 (agentd-store: the store's
# writer; agentd-sync: its syncer, which answers; 0 if there is none): only the sends write.
thread_ticks() {
    local sum=0
    for t in /proc/$APID/task/*; do
        if [ "$(cat "$t/comm" 2>/dev/null)" = "$1" ]; then
            sum=$((sum + $(awk '{print $14 + $15}' "$t/stat")))
        fi
    done
    echo "$sum"
}
W0=$(thread_ticks agentd-store); S0=$(thread_ticks agentd-sync)
"$RBIN/examples/bench_status" --socket "$E2E/run/agentd.sock" --clients 64 --per 200
W1=$(thread_ticks agentd-store); S1=$(thread_ticks agentd-sync)
awk -v t="$((W1 - W0))" -v s="$((S1 - S0))" -v hz="$(getconf CLK_TCK)" -v n=$((64 * 200)) \
    'BEGIN {printf "agentd store writer thread: %.1f us CPU per acknowledged message (syncer thread %.1f us)\n", t * 1e6 / hz / n, s * 1e6 / hz / n}'
kill -TERM $APID; wait $APID 2>/dev/null || true
