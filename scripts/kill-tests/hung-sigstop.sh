#!/usr/bin/env bash
# An agent is frozen with SIGSTOP and nobody stops it: it sends no more heartbeats,
# so agentd must find it hung (--hung-after 1s) and stop it through the stop
# sequence on its own. The task fails with the reason `hung` within the limit plus
# the graces (1 s + 1 s) plus slack, and its tree is gone.
source "$(dirname "$0")/lib.sh"
kt_init

P="$KT_TASKDIR/pids"
cat >"$KT_TASKDIR/tree.sh" <<EOF2
echo \$\$ > $P/shell
sh -c 'echo \$\$ > $P/child; exec sleep 300' &
wait
EOF2

kt_start_agentd --queue-mode followup --heartbeat 200ms --hung-after 1s --cancel-grace 1s --term-grace 1s
task=$(kt_submit frozen "sh $KT_TASKDIR/tree.sh")
kt_until 20000 kt_task_running "$task" || kt_fail "task $task did not start"
agent=$(kt_task_field "$task" pid)
kt_record "$agent"
kt_wait_pidfiles 20000 shell child
kt_record $(kt_task_procs)
total=$(kt_recorded_count)

t0=$(kt_ms)
kill -STOP "$agent"
# Limit 1 s + graces 2 s; 10 s more before calling it a failure.
kt_until 13000 kt_task_ended "$task" ||
    kt_fail "a SIGSTOPped agent was not found hung: still $(kt_task_field "$task" state) 13 s later"
took=$(($(kt_ms) - t0))
view=$(kt_ctl --json status "$task")
state=$(printf '%s' "$view" | kt_json state)
reason=$(printf '%s' "$view" | kt_json error)
[ "$state" = failed ] && [ "$reason" = hung ] || kt_fail "the frozen task ended $state (error: ${reason:-none}), not failed as hung: $view"
count=$(kt_survivor_count)
[ "$count" -eq 0 ] || kt_fail "$count survivors of $total processes after the hung agent was stopped: $(kt_survivors | tr '\n' ';')"
[ "$took" -le 8000 ] || kt_fail "the hung agent ended $(kt_secs "$took") s after SIGSTOP, more than the limit and graces (3 s) plus 5 s"
kt_pass "0 survivors of $total processes; SIGSTOPped agent failed as hung $(kt_secs "$took") s after SIGSTOP (limit 1 s + graces 2 s)"
