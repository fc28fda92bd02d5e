#!/usr/bin/env bash
# Restart benchmark (issue 7: "restart with 100,000 queued over 10,000 sessions:
# ready to answer in under 2 s; RSS under 100 MB"). Runs examples/bench_restart.rs
# against release builds: an agentd whose two agent slots hold tasks that never end
# gets MESSAGES messages over SESSIONS sessions (with message ids), is killed with
# SIGKILL and started again on the same state dir. Printed for each restart: the
# time from exec to the first answered `status`, VmHWM and VmRSS once it answers,
# and the recovery line of `status`, beside a baseline measured in the same run
# (the same restart with an empty store) and the raw size of the queued data; and
# the memory at MESSAGES queued before the kill.
# Not a test: it asserts nothing, it reports. Override with MESSAGES, SESSIONS,
# CLIENTS, TEXT, BENCH_DIR (where the state dirs go; default /tmp). Takes about 15 s.
set -euo pipefail
cd "$(dirname "$0")/.."
MESSAGES=${MESSAGES:-100000}
SESSIONS=${SESSIONS:-10000}
CLIENTS=${CLIENTS:-8}
TEXT=${TEXT:-sleep 600}

cargo build --release --quiet --bin agentd --bin agentctl --bin agent-exec --example bench_restart
BIN="$PWD/target/release"
WORK="$(mktemp -d "${BENCH_DIR:-/tmp}/agentd-bench-restart.XXXXXX")"; chmod 700 "$WORK"
trap 'rm -rf "$WORK"' EXIT
"$BIN/examples/bench_restart" --bin "$BIN" --work "$WORK" --messages "$MESSAGES" \
    --sessions "$SESSIONS" --clients "$CLIENTS" --text "$TEXT"
