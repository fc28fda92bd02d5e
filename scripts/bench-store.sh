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
# Not a test: it asserts nothing, it reports.
# BIN=DIR runs the end-to-end part with DIR's agentd, agent-exec and
# examples/bench_status instead of building this tree's (to compare two builds one
# after the other); E2E_ONLY=1 runs only that part.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="$(mktemp -d "${BENCH_DIR:-/var/tmp}/agentd-bench-store.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
echo "disk: $(df -P "$WORK" | awk 'NR==2 {print $1 " (" $6 ")"}'), $(nproc) cores"
if [ -z "${E2E_ONLY:-}" ]; then
    cargo build --release --quiet -p agentd-store --example bench-store
    STORE_BIN="$PWD/target/release/examples/bench-store"
    mkdir -p "$WORK/enqueue" "$WORK/reopen"
    "$STORE_BIN" enqueue "$WORK/enqueue"
    "$STORE_BIN" reopen "$WORK/reopen"
fi

# End to end: 64 clients send work to a real agentd over its socket, each waiting for
# its acknowledgement (which comes only after the commit). Nothing runs: the tasks
# wait behind a gate, so this measures accept + durable commit + answer, and
# `status` latency meanwhile (examples/bench_status.rs: p50/p90/p99 with the writer
# busy as ratios to idle, beside a bare echo server loaded by the same clients at the
# same rate, which is the machine's and the benchmark's own share of the tail).
if [ -n "${BIN:-}" ]; then
    RBIN="$BIN"
else
    cargo build --release --quiet --bin agentd --bin agent-exec --example bench_status
    RBIN="$PWD/target/release"
fi
E2E="$WORK/e2e"; mkdir -p "$E2E/run"; chmod 700 "$E2E" "$E2E/run"
"$RBIN/agentd" --socket "$E2E/run/agentd.sock" --state-dir "$E2E/state" \
    --max-concurrent 1 --max-queued 1000000 --cap 1000000 --queue-mode followup \
    --agent "$RBIN/agent-exec -- sh -c {text}" 2>"$E2E/agentd.log" &
APID=$!
trap 'kill -KILL $APID 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 200); do [ -S "$E2E/run/agentd.sock" ] && break; sleep 0.05; done
# CPU time in ns (schedstat) of agentd's threads: all, the loop (the main thread),
# the store writer and its syncer, which answers (only the sends write; the others
# also answer the probes' status).
cpu_ns() {
    for t in /proc/$APID/task/*; do
        awk -v comm="$(cat "$t/comm" 2>/dev/null)" -v main="$([ "${t##*/}" = "$APID" ] && echo 1)" \
            '{print $1, (main == "1" ? $1 : 0), (comm == "agentd-store" ? $1 : 0), (comm == "agentd-sync" ? $1 : 0)}' "$t/schedstat"
    done | awk '{a += $1; l += $2; w += $3; s += $4} END {print a, l, w, s}'
}
C0=$(cpu_ns)
"$RBIN/examples/bench_status" --socket "$E2E/run/agentd.sock" --clients 64 --per 200
C1=$(cpu_ns)
echo "$C0 $C1" | awk -v n=$((64 * 200)) '{printf "agentd CPU per acknowledged message: %.1f us (loop thread %.1f, store writer %.1f, syncer %.1f; the loop'"'"'s and the total include the status probes)\n", ($5 - $1) / n / 1e3, ($6 - $2) / n / 1e3, ($7 - $3) / n / 1e3, ($8 - $4) / n / 1e3}'
kill -TERM $APID; wait $APID 2>/dev/null || true
