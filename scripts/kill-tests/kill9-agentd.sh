#!/usr/bin/env bash
# agentd is killed with SIGKILL while a task tree runs: the agent, its command, a
# plain child, a setsid'd grandchild and a double-forked, environment-scrubbed one.
# The whole tree must be gone within 5 s (with task cgroups: agentd's guardian kills
# them; without: only the agent's own process group is reachable, through the
# channel's EOF and the parent-death signal, and the detached ones are the
# documented limit of the fallback).
source "$(dirname "$0")/lib.sh"
kt_init

P="$KT_TASKDIR/pids"
cat >"$KT_TASKDIR/tree.sh" <<EOF
echo \$\$ > $P/shell
sh -c 'echo \$\$ > $P/child; exec sleep 300' &
setsid sh -c 'echo \$\$ > $P/setsid; exec sleep 300' &
(setsid env -i sh -c 'echo \$\$ > $P/scrubbed; exec sleep 300' &)
wait
EOF

kt_start_agentd --queue-mode followup
kt_check_containment
cgroup=$(kt_ctl --json status | grep -o '"containment":{[^}]*}' | kt_json cgroup)
task=$(kt_submit tree "sh $KT_TASKDIR/tree.sh")
kt_until 20000 kt_task_running "$task" || kt_fail "task $task did not start"
agent=$(kt_task_field "$task" pid)
kt_record "$agent"
kt_wait_pidfiles 20000 shell child setsid scrubbed
kt_record $(kt_task_procs)
total=$(kt_recorded_count)

t0=$(kt_ms)
kill -KILL "$KT_AGENTD"
wait "$KT_AGENTD" 2>/dev/null
KT_AGENTD=""

# With cgroups everything must go; with the fallback, the agent's own group.
group_gone() {
    ! kt_survivors | awk -v a="$agent" -v s="$(kt_pid shell)" -v c="$(kt_pid child)" '$1 == a || $1 == s || $1 == c' | grep -q .
}
if [ "$KT_EXPECT" = cgroup ]; then kt_until 5000 kt_no_survivors; else kt_until 5000 group_gone; fi
took=$(($(kt_ms) - t0))
count=$(kt_survivor_count)
survivors=$(kt_survivors | tr '\n' ';')
figure="$count survivors of $total processes $(kt_secs "$took") s after SIGKILL to agentd"
if [ "$count" -eq 0 ]; then
    note=""
    if [ -n "$cgroup" ]; then
        # The guardian kills and removes the task cgroups and agentd's instance
        # directory, then exits.
        kt_until 10000 kt_baseline_gone || kt_fail "tree empty, but agentd's guardian still runs 10 s after agentd died"
        [ ! -d "$cgroup" ] || kt_fail "tree empty, but agentd's cgroup $cgroup is still there after its guardian exited"
        if [ -d "$cgroup.guardian" ] && rmdir "$cgroup.guardian" 2>/dev/null; then
            note="; the guardian's own empty cgroup was left behind (removed by the test)"
        fi
    fi
    kt_pass "0 survivors of $total processes, tree empty $(kt_secs "$took") s after SIGKILL to agentd$note"
fi
if [ "$KT_EXPECT" = cgroup ]; then
    kt_fail "$figure (task cgroups expected on this host): $survivors"
fi
# Fallback: the agent and its process group must be gone; detached ones may not be.
group_gone || kt_fail "$figure (process-tree fallback; the agent's own group survived): $survivors"
kt_pass "$count survivors of $total processes: the agent's group gone $(kt_secs "$took") s after SIGKILL to agentd (process-tree fallback: the detached ones are its documented limit)"
