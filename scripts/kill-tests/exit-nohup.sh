#!/usr/bin/env bash
# The agent's command succeeds and exits, leaving `nohup` children behind (one plain,
# one that also left the session). A task is finished only when its tree is empty:
# when the task is reported finished, none of them may still run.
source "$(dirname "$0")/lib.sh"
kt_need nohup
kt_init

P="$KT_TASKDIR/pids"
cat >"$KT_TASKDIR/leave.sh" <<EOF
nohup sh -c 'echo \$\$ > $P/nohup; exec sleep 300' >/dev/null 2>&1 &
nohup setsid sh -c 'echo \$\$ > $P/nohup-setsid; exec sleep 300' >/dev/null 2>&1 &
# Exit only once both are running, so the test knows their pids.
while [ ! -s $P/nohup ] || [ ! -s $P/nohup-setsid ]; do sleep 0.02; done
echo left two nohup children
EOF

kt_start_agentd --queue-mode followup --cancel-grace 1s --term-grace 1s
t0=$(kt_ms)
out=$(timeout 60 "$KT_BIN/agentctl" --socket "$KT_SOCK" --json send --wait --session nohup "sh $KT_TASKDIR/leave.sh") ||
    kt_fail "the task did not succeed: $out"
took=$(($(kt_ms) - t0))
state=$(printf '%s' "$out" | kt_json state)
[ "$state" = succeeded ] || kt_fail "the task ended $state, not succeeded: $out"
kt_pidfiles_present nohup nohup-setsid || kt_fail "the task did not leave its nohup children"
# Record what is alive of them now, right after the task was reported finished
# (kt_record skips a pid that is already gone).
kt_record "$(kt_pid nohup)" "$(kt_pid nohup-setsid)"
count=$(kt_survivor_count)
[ "$count" -eq 0 ] || kt_fail "$count of 2 nohup children still run after the task finished: $(kt_survivors | tr '\n' ';')"
left=$(kt_task_procs | wc -l)
[ "$left" -eq 0 ] || kt_fail "agentd still has $left descendants after the task finished"
kt_pass "0 of 2 nohup children left when the task finished ($(kt_secs "$took") s after the send)"
