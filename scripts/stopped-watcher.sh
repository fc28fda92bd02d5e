#!/bin/sh
# A SIGSTOPped `agentctl watch` on a task that prints as fast as it can, for
# $SECONDS_STOPPED seconds (default 20): agentd's RSS must stay under 64 MB,
# `agentctl status` must keep answering, and the watcher must get a `lagged` notice
# when it reads again. Prints RSS and status latency once a second.
#
#   scripts/stopped-watcher.sh            # uses target/debug (cargo build first)
#   BIN=target/release scripts/stopped-watcher.sh
set -eu

BIN=${BIN:-target/debug}
SECONDS_STOPPED=${SECONDS_STOPPED:-20}
LIMIT_KB=$((64 * 1024))
dir=$(mktemp -d)
sock="$dir/run/agentd.sock"
agentd_pid=
watch_pid=

cleanup() {
    [ -n "$watch_pid" ] && kill -CONT "$watch_pid" 2>/dev/null && kill "$watch_pid" 2>/dev/null
    if [ -n "$agentd_pid" ]; then
        kill -INT "$agentd_pid" 2>/dev/null || true
        sleep 0.5
        kill -INT "$agentd_pid" 2>/dev/null || true
        wait "$agentd_pid" 2>/dev/null || true
    fi
    rm -rf "$dir"
}
trap cleanup EXIT INT TERM

rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

"$BIN/agentd" --socket "$sock" --state-dir "$dir/state" \
    --agent "$BIN/agent-exec -- sh -c {text}" 2>"$dir/agentd.log" &
agentd_pid=$!
i=0
until "$BIN/agentctl" --socket "$sock" ping >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -lt 100 ] || { echo "agentd did not start"; cat "$dir/agentd.log"; exit 1; }
    sleep 0.1
done

task=$("$BIN/agentctl" --socket "$sock" --json send --session flood 'seq 1 1000000000' |
    sed -n 's/.*"task_id":"\([^"]*\)".*/\1/p' | head -n 1)
"$BIN/agentctl" --socket "$sock" watch "$task" >"$dir/watch.out" 2>"$dir/watch.err" &
watch_pid=$!
i=0
until [ -s "$dir/watch.out" ]; do
    i=$((i + 1)); [ $i -lt 100 ] || { echo "the watch printed nothing"; exit 1; }
    sleep 0.1
done
kill -STOP "$watch_pid"
start_rss=$(rss "$agentd_pid")
echo "agentd RSS at start: $start_rss KiB; watcher $watch_pid stopped"

peak=0
failed=0
s=0
while [ $s -lt "$SECONDS_STOPPED" ]; do
    sleep 1
    s=$((s + 1))
    now=$(rss "$agentd_pid")
    [ "$now" -gt "$peak" ] && peak=$now
    t0=$(date +%s%N)
    if "$BIN/agentctl" --socket "$sock" status >/dev/null 2>&1; then
        ms=$((($(date +%s%N) - t0) / 1000000))
        line=$("$BIN/agentctl" --socket "$sock" --json status "$task" |
            sed -n 's/.*"progress":"\([0-9]*\)".*/\1/p')
        echo "t=${s}s rss=${now}KiB status=${ms}ms task printed ${line:-?} lines"
    else
        echo "t=${s}s rss=${now}KiB status FAILED"
        failed=1
    fi
done

kill -CONT "$watch_pid"
i=0
while kill -0 "$watch_pid" 2>/dev/null; do
    i=$((i + 1)); [ $i -lt 200 ] || break
    sleep 0.1
done
watch_pid=
echo "watcher said: $(cat "$dir/watch.err")"
echo "peak RSS: $peak KiB (start $start_rss KiB, limit $LIMIT_KB KiB)"
[ "$peak" -lt "$LIMIT_KB" ] || { echo "FAIL: agentd grew past 64 MB"; failed=1; }
grep -q "fell behind" "$dir/watch.err" || { echo "FAIL: no lagged notice"; failed=1; }
exit $failed
