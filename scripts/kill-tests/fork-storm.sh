#!/usr/bin/env bash
# A bounded fork storm inside one task: KT_STORM_WORKERS (default 200) shell loops
# that each fork a new `sleep` every 0.5 s and ignore SIGINT, a few hundred processes
# at any moment with constant churn. While it runs, `agentctl status` keeps
# answering (each within 2 s, generous for debug builds on a loaded host); the stop
# then leaves nothing behind.
source "$(dirname "$0")/lib.sh"
kt_init

WORKERS=${KT_STORM_WORKERS:-200}
P="$KT_TASKDIR/pids"
cat >"$KT_TASKDIR/worker.sh" <<'EOF'
trap '' INT
while :; do sleep 0.5; done
EOF
cat >"$KT_TASKDIR/storm.sh" <<EOF
echo \$\$ > $P/storm
i=0
while [ \$i -lt $WORKERS ]; do
    sh $KT_TASKDIR/worker.sh &
    i=\$((i + 1))
done
echo \$i > $P/started
wait
EOF

kt_start_agentd --queue-mode followup --cancel-grace 1s --term-grace 1s
task=$(kt_submit storm "sh $KT_TASKDIR/storm.sh")
kt_until 20000 kt_task_running "$task" || kt_fail "task $task did not start"
kt_record "$(kt_task_field "$task" pid)"
kt_wait_pidfiles 60000 storm started

# While the storm runs: status answers, and we record what we see of the storm.
max_ms=0
peak=0
for _ in $(seq 1 15); do
    t=$(kt_ms)
    timeout 10 "$KT_BIN/agentctl" --socket "$KT_SOCK" status >/dev/null || kt_fail "agentctl status failed during the fork storm"
    ms=$(($(kt_ms) - t))
    [ "$ms" -gt "$max_ms" ] && max_ms=$ms
    desc=$(kt_task_procs)
    n=$(echo "$desc" | wc -l)
    [ "$n" -gt "$peak" ] && peak=$n
    # shellcheck disable=SC2086
    kt_record $desc
done
[ "$max_ms" -le 2000 ] || kt_fail "agentctl status took up to $(kt_secs "$max_ms") s during the fork storm ($peak processes)"
[ "$peak" -ge "$WORKERS" ] || kt_fail "the storm never reached $WORKERS processes (peak $peak): the test is broken"

t0=$(kt_ms)
out=$(timeout 60 "$KT_BIN/agentctl" --socket "$KT_SOCK" --json stop "$task") || kt_fail "stop failed: $out"
took=$(($(kt_ms) - t0))
state=$(printf '%s' "$out" | kt_json state)
[ "$state" = cancelled ] || kt_fail "the stopped storm ended $state, not cancelled: $out"
count=$(kt_survivor_count)
seen=$(kt_recorded_count)
[ "$count" -eq 0 ] || kt_fail "$count survivors of $seen storm processes seen: $(kt_survivors | head -n 5 | tr '\n' ';')"
left=$(kt_task_procs | wc -l)
[ "$left" -eq 0 ] || kt_fail "agentd still has $left descendants after the stop"
marked=$(kt_marked | wc -l)
[ "$marked" -eq 0 ] || kt_fail "$marked storm processes still run after the stop (found by their command line)"
kt_pass "0 survivors of $seen processes seen (peak $peak at once); status answered in at most $(kt_secs "$max_ms") s during the storm; stop took $(kt_secs "$took") s"
