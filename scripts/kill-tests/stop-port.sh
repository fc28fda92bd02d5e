#!/usr/bin/env bash
# A detached grandchild (setsid, double fork) holds a listening loopback TCP port,
# as a dev server started by an agent would. After the stop the process is gone and
# the port is free: it can be bound again and nothing accepts on it.
source "$(dirname "$0")/lib.sh"
kt_need python3
kt_init

P="$KT_TASKDIR/pids"
cat >"$KT_TASKDIR/listener.py" <<EOF
import os, socket, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(16)
with open("$P/port.tmp", "w") as f:
    f.write(str(s.getsockname()[1]))
os.rename("$P/port.tmp", "$P/port")
with open("$P/listener", "w") as f:
    f.write(str(os.getpid()))
while True:
    time.sleep(60)
EOF
# Is PORT free: bindable (no listener holds it) and refusing connections?
cat >"$KT_DIR/port-free.py" <<'EOF'
import socket, sys
port = int(sys.argv[1])
c = socket.socket()
c.settimeout(2)
try:
    c.connect(("127.0.0.1", port))
    sys.exit(1)  # something still accepts on it
except ConnectionRefusedError:
    pass
b = socket.socket()
try:
    b.bind(("127.0.0.1", port))
except OSError:
    sys.exit(1)
EOF
port_free() { python3 "$KT_DIR/port-free.py" "$1"; }

kt_start_agentd --queue-mode followup --cancel-grace 1s --term-grace 1s
task=$(kt_submit server "(setsid python3 $KT_TASKDIR/listener.py &); echo \$\$ > $P/shell; exec sleep 300")
kt_until 20000 kt_task_running "$task" || kt_fail "task $task did not start"
kt_record "$(kt_task_field "$task" pid)"
kt_wait_pidfiles 20000 shell listener port
port=$(cat "$P/port")
kt_record $(kt_task_procs)
total=$(kt_recorded_count)
port_free "$port" && kt_fail "the listener's port $port looks free while it runs: the check is broken"

out=$(timeout 60 "$KT_BIN/agentctl" --socket "$KT_SOCK" --json stop "$task") || kt_fail "stop failed: $out"
t0=$(kt_ms)
state=$(printf '%s' "$out" | kt_json state)
[ "$state" = cancelled ] || kt_fail "the stopped task ended $state, not cancelled: $out"
count=$(kt_survivor_count)
[ "$count" -eq 0 ] || kt_fail "$count survivors of $total processes after the stop: $(kt_survivors | tr '\n' ';')"
# The listener is dead; its socket closes as it dies, so the port is free at once
# (a short deadline only covers the kernel tearing down the socket).
kt_until 2000 port_free "$port" || kt_fail "port $port is still taken 2 s after the stop answered"
kt_pass "0 survivors of $total processes; port $port free $(kt_secs $(($(kt_ms) - t0))) s after the stop answered"
