#!/usr/bin/env bash
# Store benchmark (crates/store/examples/bench-store.rs). Prints rates as ratios
# against a baseline measured in the same run on the same disk:
#   baseline: one fsync'd commit per message (plain SQLite, WAL + synchronous=FULL);
#   then:     the store with 1 client and with 64 concurrent clients (group commit;
#             64 threads, and 64 clients on one thread answered by callback as agentd's
#             loop is, each with the writer's and the process's CPU per message),
#             and a fresh process reopening 100,000 queued tasks over 10,000 sessions;
#   end to end, a real agentd that acknowledges each `send` only after its commit
#   and sync, against its own baseline measured on the same disk right before each
#   phase (one fsync'd commit per message, as above), each phase on a fresh agentd
#   with an empty store, the same 12,800 messages (64 clients x 200, a message id
#   each, 10 sessions per client), nothing ever started (the tasks wait behind a
#   gate), so it measures accept + durable commit + answer:
#     rate phase:   64 connections driven from one client thread waiting in epoll,
#                   one `send` outstanding per connection (the next only after its
#                   acknowledgement), no probe: agentd's rate as a ratio to the
#                   baseline (issue 7's 10x), the client's CPU per message and
#                   agentd's (all threads, the loop, the connections' thread,
#                   the store writer, its syncer);
#     probe phase:  64 client threads blocked in `recv`, the same one-at-a-time
#                   sends, while one more connection spins on `status`: its
#                   latency p50/p90/p99 with the writer busy as ratios to idle,
#                   beside the same clients against a bare echo server (the
#                   machine's and the benchmark's own share of the tail), the
#                   rate (lower: 64 threads and the probe share the 2 cores with
#                   agentd) and agentd's CPU per message (the loop's includes the
#                   probe's `status`es). The harsher case: the probe keeps a core
#                   busy between itself and agentd's fast lane, and with the 64
#                   client threads oversubscribes the 2 cores;
#     paced phase:  the writer kept busy by the rate phase's load (64 connections on
#                   one epoll client thread, one send outstanding each, 64 x 1,000
#                   sends: the rate phase's 12,800 five times over, so that the probe
#                   has enough samples for a p99), while a separate connection sends
#                   one `status` every 1 ms, open loop (each at its scheduled time
#                   whether or not the last was answered, its latency from its actual
#                   write to its answer: a stall counts once for every request it
#                   delays), as a user's sporadic `/status`. The idle reference is the
#                   same paced probe with no load; the baseline the same paced probe
#                   against the bare echo server, idle and under the same load paced
#                   to agentd's rate. Printed like the probe phase (p50/p90/p99,
#                   requests, busy/idle, agentd's own share over the echo's), with
#                   how late the probe's writes were against their schedule. The
#                   echo server is the probe phase's (a thread per connection).
#   Both latency phases also print, idle and busy, per request, what agentd's thread
#   that answers `status` (agentd-fast) spent: CPU, time waiting in a run queue for
#   a CPU, runs and sleeps (its schedstat and voluntary context switches).
# The store goes under $BENCH_DIR (default: a new dir in /var/tmp, which is on disk
# rather than tmpfs on most systems; fsync on tmpfs would measure nothing).
# Not a test: it asserts nothing, it reports.
# BIN=DIR runs the end-to-end part with DIR's agentd and agent-exec instead of this
# tree's (to compare two builds one after the other; the clients are this tree's
# examples/bench_status either way); E2E_ONLY=1 runs only that part.
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

# End to end (see the header).
cargo build --release --quiet --example bench_status
CLIENT="$PWD/target/release/examples/bench_status"
if [ -n "${BIN:-}" ]; then
    RBIN="$BIN"
else
    cargo build --release --quiet --bin agentd --bin agent-exec
    RBIN="$PWD/target/release"
fi
APID=
trap 'if [ -n "$APID" ]; then kill -KILL $APID 2>/dev/null || true; fi; rm -rf "$WORK"' EXIT
# Starts a fresh agentd with an empty store under $WORK/$1; sets E2E and APID.
start_agentd() {
    E2E="$WORK/$1"; mkdir -p "$E2E/run"; chmod 700 "$E2E" "$E2E/run"
    "$RBIN/agentd" --socket "$E2E/run/agentd.sock" --state-dir "$E2E/state" \
        --max-concurrent 1 --max-queued 1000000 --cap 1000000 --queue-mode followup \
        --agent "$RBIN/agent-exec -- sh -c {text}" 2>"$E2E/agentd.log" &
    APID=$!
    for _ in $(seq 1 200); do [ -S "$E2E/run/agentd.sock" ] && break; sleep 0.05; done
}
stop_agentd() {
    kill -TERM $APID; wait $APID 2>/dev/null || true; APID=
}
# CPU time in ns (schedstat) of agentd's threads: all, the loop (the main thread),
# the store writer, its syncer and the connections' thread (agentd-conn, or the fast
# lane agentd-fast that answers read-only connections; 0 for a
# build whose connections share the loop's thread).
cpu_ns() {
    for t in /proc/$APID/task/*; do
        awk -v comm="$(cat "$t/comm" 2>/dev/null)" -v main="$([ "${t##*/}" = "$APID" ] && echo 1)" \
            '{print $1, (main == "1" ? $1 : 0), (comm == "agentd-store" ? $1 : 0), (comm == "agentd-sync" ? $1 : 0), (comm == "agentd-conn" || comm == "agentd-fast" ? $1 : 0)}' "$t/schedstat"
    done | awk '{a += $1; l += $2; w += $3; s += $4; c += $5} END {print a, l, w, s, c}'
}
# Prints agentd's CPU per message between two cpu_ns readings ($3: what the loop's
# includes; $4: how many messages, 64 x 200 if not given).
cpu_line() {
    echo "$1 $2" | awk -v n="${4:-$((64 * 200))}" -v note="$3" '{printf "  agentd CPU per acknowledged message: %.1f us (loop thread %.1f, connections thread %.1f, store writer %.1f, syncer %.1f%s)\n", ($6 - $1) / n / 1e3, ($7 - $2) / n / 1e3, ($10 - $5) / n / 1e3, ($8 - $3) / n / 1e3, ($9 - $4) / n / 1e3, note}'
}
# The fsync'd-commit baseline on the same disk, now; prints it and sets BASE.
baseline() {
    local out
    out=$("$CLIENT" --fsync-baseline "$WORK/$1")
    echo "$out"
    BASE=$(echo "$out" | awk '{print $(NF - 1)}')
}

echo "end to end, rate phase (64 connections on one client thread in epoll, no probe):"
baseline base-rate
start_agentd e2e-rate
C0=$(cpu_ns)
"$CLIENT" --socket "$E2E/run/agentd.sock" --clients 64 --per 200 --rate-only --baseline "$BASE"
C1=$(cpu_ns)
cpu_line "$C0" "$C1" ""
stop_agentd

echo "end to end, probe phase (64 client threads blocked in recv, a status probe spinning):"
baseline base-probe
start_agentd e2e-probe
C0=$(cpu_ns)
"$CLIENT" --socket "$E2E/run/agentd.sock" --clients 64 --per 200 --baseline "$BASE"
C1=$(cpu_ns)
cpu_line "$C0" "$C1" "; the loop's and the total include the status probes and the idle phase"
stop_agentd

echo "end to end, paced phase (64 connections on one client thread in epoll, a status every 1 ms):"
baseline base-paced
start_agentd e2e-paced
C0=$(cpu_ns)
"$CLIENT" --socket "$E2E/run/agentd.sock" --clients 64 --per 1000 --paced 1000 --idle 2000 --baseline "$BASE"
C1=$(cpu_ns)
cpu_line "$C0" "$C1" "; the total includes the paced status probes and the idle phase" $((64 * 1000))
stop_agentd
