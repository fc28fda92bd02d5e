#!/usr/bin/env bash
# Store benchmark (crates/store/examples/bench-store.rs). Prints rates as ratios
# against a baseline measured in the same run on the same disk:
#   baseline: one fsync'd commit per message (plain SQLite, WAL + synchronous=FULL);
#   then:     the store with 1 client and with 64 concurrent clients (group commit),
#             and a fresh process reopening 100,000 queued tasks over 10,000 sessions.
# The store goes under $BENCH_DIR (default: a new dir in /var/tmp, which is on disk
# rather than tmpfs on most systems; fsync on tmpfs would measure nothing).
# Not a test: it asserts nothing, it reports.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p agentd-store --example bench-store
BIN="$PWD/target/release/examples/bench-store"
WORK="$(mktemp -d "${BENCH_DIR:-/var/tmp}/agentd-bench-store.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
echo "disk: $(df -P "$WORK" | awk 'NR==2 {print $1 " (" $6 ")"}'), $(nproc) cores"
mkdir -p "$WORK/enqueue" "$WORK/reopen"
"$BIN" enqueue "$WORK/enqueue"
"$BIN" reopen "$WORK/reopen"
