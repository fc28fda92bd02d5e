#!/usr/bin/env bash
# An agent is frozen with SIGSTOP (it can read no cancel and act on no SIGTERM
# until continued), then the task is stopped. The stop must end the task and its
# tree anyway, within the graces (1 s + 1 s here) plus slack: SIGTERM is followed by
# SIGCONT, and SIGKILL ends even a stopped process.
source "$(dirname "$0")/lib.sh"
kt_init

P="$KT_TASKDIR/pids"
cat >"$KT_TASKDIR/tree.sh" <<EOF
echo \$\$ > $P/shell
sh -c 'echo \$\$ > $P/child; exec sleep 300' &
wait
EOF

kt_start_agentd --queue-mode followup --cancel-grace 1s --term-grace 1s
task=$(kt_submit frozen "sh $KT_TASKDIR/tree.sh")
kt_until 20000 kt_task_running "$task" || kt_fail "task $task did not start"
agent=$(kt_task_field "$task" pid)
kt_record "$agent"
kt_wait_pidfiles 20000 shell child
kt_record $(kt_task_procs)
total=$(kt_recorded_count)

kill -STOP "$agent"
kt_until 10000 sh -c "grep -q '^State:.*T' /proc/$agent/status" || kt_fail "agent $agent did not stop on SIGSTOP"

t0=$(kt_ms)
out=$(timeout 60 "$KT_BIN/agentctl" --socket "$KT_SOCK" --json stop "$task") || kt_fail "stop of a SIGSTOPped agent failed or hung: $out"
took=$(($(kt_ms) - t0))
state=$(printf '%s' "$out" | kt_json state)
by=$(printf '%s' "$out" | kt_json ended_by)
[ "$state" = cancelled ] || kt_fail "the stopped task ended $state, not cancelled: $out"
case "$by" in
    sigterm | sigkill) ;;
    *) kt_fail "a SIGSTOPped agent cannot act on a cooperative cancel, yet ended_by is '$by': $out" ;;
esac
count=$(kt_survivor_count)
[ "$count" -eq 0 ] || kt_fail "$count survivors of $total processes after the stop: $(kt_survivors | tr '\n' ';')"
[ "$took" -le 7000 ] || kt_fail "the stop took $(kt_secs "$took") s, more than the graces (2 s) plus 5 s of slack"
kt_pass "0 survivors of $total processes; SIGSTOPped agent ended by $by $(kt_secs "$took") s after the stop"
