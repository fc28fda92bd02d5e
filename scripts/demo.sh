#!/usr/bin/env bash
# A walk through agentd for a newcomer: builds the binaries, starts agentd with the
# default agent (agent-exec running each message as a shell command), and shows
#   1. a long task running in one chat,
#   2. /status answered at once while it runs,
#   3. a second chat that is not blocked by the first,
#   4. backpressure: a queued message told its position,
#   5. /stop ending the long task (and its processes), the queued work then running,
#   6. steering: a message delivered into a running task instead of queued.
# Everything runs in a temporary directory and is cleaned up on exit (Ctrl-C too).
# BIN=DIR runs the binaries in DIR instead of building them.
set -euo pipefail
cd "$(dirname "$0")/.."

bold() { printf '\n\033[1m%s\033[0m\n' "$*"; }
# A word as it would be typed: as it is when the shell leaves it alone, else in single
# quotes (a ' inside written '\'').
typed() {
    if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}
# Prints a command as it would be typed (so it can be copied), after `$ `.
show() {
    local line='$' word
    for word in "$@"; do line+=" $(typed "$word")"; done
    printf '%s\n' "$line"
}
run() { show "$@"; "$@"; }
ms_now() { date +%s%3N; }

if [[ -n "${BIN:-}" ]]; then
    # BIN=DIR: the binaries in DIR (as the benchmarks take them), no build.
    BIN="$(cd "$BIN" && pwd)"
    bold "Using agentd, agentctl and agent-exec from $BIN"
else
    bold "Building agentd, agentctl and agent-exec (cargo build --release)…"
    cargo build --release --quiet --bin agentd --bin agentctl --bin agent-exec
    BIN="$PWD/target/release"
fi
export PATH="$BIN:$PATH"

WORK="$(mktemp -d -t agentd-demo.XXXXXX)"
chmod 700 "$WORK"
export AGENTD_SOCKET="$WORK/agentd.sock"
AGENTD_PID=""
cleanup() {
    if [[ -n "$AGENTD_PID" ]] && kill -0 "$AGENTD_PID" 2>/dev/null; then
        kill -TERM "$AGENTD_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$AGENTD_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$AGENTD_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
# Ctrl-C (or SIGTERM) ends the demo at once; the EXIT trap then cleans up.
trap 'echo; echo "(interrupted: stopping agentd and removing $WORK)"; exit 130' INT TERM

bold "Starting agentd: 2 agent slots, stop graces of 2 s (log: $WORK/agentd.log)"
# --steer: these commands may read steered messages from their stdin (step 6).
AGENT='agent-exec --steer -- sh -c {text}'
printf '%s &\n' "$(show agentd --max-concurrent 2 --cancel-grace 2s --term-grace 2s --agent "$AGENT" --state-dir "$WORK/state")"
agentd --max-concurrent 2 --cancel-grace 2s --term-grace 2s --agent "$AGENT" --state-dir "$WORK/state" 2>"$WORK/agentd.log" &
AGENTD_PID=$!
for _ in $(seq 1 100); do agentctl ping >/dev/null 2>&1 && break; sleep 0.05; done
run agentctl ping

bold "1. Alice starts a long task (a minute of work, one step per second)"
LONG='for i in $(seq 1 60); do echo "step $i/60"; sleep 1; done'
show agentctl send --session alice "$LONG"
out=$(agentctl send --session alice "$LONG"); echo "$out"
ALICE_TASK=$(echo "$out" | awk '{print $2}')
sleep 2

bold "2. While it runs, /status is answered at once"
t0=$(ms_now); run agentctl status; t1=$(ms_now)
echo "(agentctl status took $((t1 - t0)) ms for the whole process)"
t0=$(ms_now); run agentctl send --session alice /status; t1=$(ms_now)
echo "(the /status chat command took $((t1 - t0)) ms)"

bold "3. Bob, in another chat, is not blocked by Alice's task"
show agentctl send --session bob 'echo "hello from bob"; uname -sr'
out=$(agentctl send --session bob 'echo "hello from bob"; uname -sr'); echo "$out"
BOB_TASK=$(echo "$out" | awk '{print $2}')
for _ in $(seq 1 100); do
    state=$(agentctl --json status "$BOB_TASK" | sed -n 's/.*"state":"\([a-z]*\)".*/\1/p')
    [[ "$state" == succeeded || "$state" == failed ]] && break
    sleep 0.05
done
run agentctl status "$BOB_TASK"

bold "4. Both slots busy: Carol's long task runs, Dave's message is queued with its position"
run agentctl send --session carol 'sleep 45'
run agentctl send --session dave 'echo "dave ran after a slot freed"'
run agentctl tasks

bold "5. Alice says /stop: cooperative cancel (SIGINT to the command), then SIGTERM, then SIGKILL"
t0=$(ms_now); run agentctl send --session alice /stop; t1=$(ms_now)
echo "(answered in $((t1 - t0)) ms; the task's end comes as its finished event)"
for _ in $(seq 1 200); do
    agentctl --json status "$ALICE_TASK" | grep -q '"state":"cancelled"' && break
    sleep 0.05
done
t2=$(ms_now)
# No process is left that carries the task's id (agentd gives every process of a
# task AGENTD_TASK_ID in its environment).
if grep -qsxzF "AGENTD_TASK_ID=$ALICE_TASK" /proc/[0-9]*/environ; then
    echo "(alice's task ended $((t2 - t0)) ms after the /stop, but a process of it is still running!)"
    exit 1
fi
echo "(alice's task ended $((t2 - t0)) ms after the /stop; no process of it is left)"
run agentctl tasks --all

bold "6. Steering: Erin's chat sends messages into the running task instead of queueing them"
run agentctl send --session erin '/queue steer'
show agentctl send --session erin 'echo "waiting for a message"; read -r line; echo "got: $line"'
out=$(agentctl send --session erin 'echo "waiting for a message"; read -r line; echo "got: $line"'); echo "$out"
ERIN_TASK=$(echo "$out" | awk '{print $2}')
for _ in $(seq 1 100); do
    agentctl --json status "$ERIN_TASK" | grep -q '"state":"running"' && break
    sleep 0.05
done
run agentctl send --session erin /status
run agentctl send --session erin 'use Python 3.12'
for _ in $(seq 1 100); do
    agentctl --json status "$ERIN_TASK" | grep -q '"state":"succeeded"' && break
    sleep 0.05
done
run agentctl status "$ERIN_TASK"

bold "Stopping everything that is left"
run agentctl stop --all

bold "Done. agentd's log:"
sed 's/^/  /' "$WORK/agentd.log" | tail -n 12
