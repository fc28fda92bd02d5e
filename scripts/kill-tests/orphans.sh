#!/usr/bin/env bash
# KT_ORPHAN_TASKS (default 1000) tasks, each of which exits leaving an orphan
# (`sleep 300 &`: re-parented to agentd, the subreaper). Every task must succeed,
# and afterwards no orphan may still run and agentd may have no zombie child and
# no descendant at all.
source "$(dirname "$0")/lib.sh"
kt_init

N=${KT_ORPHAN_TASKS:-1000}
CONCURRENT=${KT_ORPHAN_CONCURRENT:-4}
P="$KT_TASKDIR/pids"
# The orphan does not hold the command's output pipe (agent-exec would wait for it
# to close before reporting). Each orphan appends "PID STARTTIME" (one short O_APPEND write: lines never mix).
cat >"$KT_TASKDIR/orphan.sh" <<EOF
sleep 300 </dev/null >/dev/null 2>&1 &
read -r stat < /proc/\$!/stat
set -- \${stat##*) }
echo "\$! \${20}" >> $P/orphans
EOF

kt_start_agentd --queue-mode followup --max-concurrent "$CONCURRENT" --max-queued $((N + 10))
t0=$(kt_ms)
# One session per task, so that CONCURRENT of them run at once.
for i in $(seq 1 "$N"); do
    printf '{"id":%d,"cmd":"send","session":"orphan-%d","text":"sh %s/orphan.sh"}\n' "$i" "$i" "$KT_TASKDIR"
done >"$KT_DIR/requests"
# Submitted the way a bridge would: one connection, N request lines, N answers.
kt_need python3
python3 - "$KT_SOCK" "$KT_DIR/requests" "$N" >"$KT_DIR/answers" <<'EOF' || kt_fail "submitting $N tasks failed"
import socket, sys
sock, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_UNIX)
s.settimeout(60)
s.connect(sock)
s.sendall(open(path, "rb").read())
f = s.makefile("rb")
for _ in range(n):
    line = f.readline()
    if not line:
        sys.exit("agentd closed the connection early")
    sys.stdout.buffer.write(line)
EOF
accepted=$(grep -c '"accepted":true' "$KT_DIR/answers")
[ "$accepted" -eq "$N" ] || kt_fail "only $accepted of $N tasks were accepted: $(grep -v '"accepted":true' "$KT_DIR/answers" | head -n 1)"

none_left() { [ "$(kt_ctl --json tasks 2>/dev/null)" = "[]" ]; }
kt_until 150000 none_left || kt_fail "not all $N tasks ended within 150 s ($(kt_ctl --json tasks | grep -o '"task_id"' | wc -l) left)"
took=$(($(kt_ms) - t0))

history=$(kt_ctl --json tasks --all)
succeeded=$(printf '%s' "$history" | grep -o '"state":"succeeded"' | wc -l)
# The history keeps the last 1000 tasks by default.
expect=$((N < 1000 ? N : 1000))
[ "$succeeded" -ge "$expect" ] || kt_fail "only $succeeded of the last $expect tasks succeeded"
orphans=$(wc -l <"$P/orphans")
[ "$orphans" -eq "$N" ] || kt_fail "$orphans of $N tasks recorded their orphan"
cat "$P/orphans" >>"$KT_DIR/recorded"
count=$(kt_survivor_count)
[ "$count" -eq 0 ] || kt_fail "$count of $N orphans still run after their tasks ended: $(kt_survivors | head -n 3 | tr '\n' ';')"
zombies=$(kt_zombie_children | wc -l)
[ "$zombies" -eq 0 ] || kt_fail "agentd has $zombies zombie children: $(kt_zombie_children | head -n 3 | tr '\n' ';')"
left=$(kt_task_procs | wc -l)
[ "$left" -eq 0 ] || kt_fail "agentd still has $left descendants after all tasks ended"
kt_pass "0 orphans and 0 zombies left of $N tasks (all succeeded) in $(kt_secs "$took") s, $(awk -v n="$N" -v ms="$took" 'BEGIN { printf "%.0f", n * 1000 / ms }') tasks/s"
