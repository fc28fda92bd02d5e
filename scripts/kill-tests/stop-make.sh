#!/usr/bin/env bash
# A `make -j2` build is stopped while its compilers run. One recipe runs a real
# compiler (gcc, with its cc1, reading a source that never ends), the other a shell
# loop standing in for a long compile that ignores SIGINT and SIGTERM. make, its recipe shells, the compiler driver
# and cc1 must all be gone after the stop.
source "$(dirname "$0")/lib.sh"
kt_need make
kt_init

P="$KT_TASKDIR/pids"
CC_BIN=$(command -v cc || command -v gcc || true)
{
    echo "all: compile loop"
    echo "compile:"
    if [ -n "$CC_BIN" ]; then
        # The source is a pipe that stays open: the compiler runs until killed.
        printf '\t@echo $$$$ > %s/compile; (echo "int x;"; exec sleep 300) | %s -x c -c - -o %s/out.o\n' "$P" "$CC_BIN" "$KT_TASKDIR"
    else
        printf '\t@echo $$$$ > %s/compile; while :; do sleep 1; done\n' "$P"
    fi
    echo "loop:"
    # A recipe that ignores SIGINT and SIGTERM, as a stuck tool might: only the
    # forced steps of the stop end it.
    printf '\t@echo $$$$ > %s/loop; trap "" INT TERM; while :; do sleep 1; done\n' "$P"
} >"$KT_TASKDIR/Makefile"

kt_start_agentd --queue-mode followup --cancel-grace 1s --term-grace 1s
task=$(kt_submit build "make -j2 -C $KT_TASKDIR")
kt_until 20000 kt_task_running "$task" || kt_fail "task $task did not start"
kt_record "$(kt_task_field "$task" pid)"
kt_wait_pidfiles 20000 compile loop

compiler_running() {
    local pid
    for pid in $(kt_descendants "$KT_AGENTD"); do
        case "$(cat "/proc/$pid/comm" 2>/dev/null)" in cc1 | cc1plus) return 0 ;; esac
    done
    return 1
}
what="make, 2 recipe shells"
if [ -n "$CC_BIN" ]; then
    kt_until 20000 compiler_running || kt_fail "the compiler (cc1) did not start within 20 s"
    what="make, 2 recipe shells, $(basename "$CC_BIN") and cc1"
fi
kt_record $(kt_task_procs)
total=$(kt_recorded_count)

t0=$(kt_ms)
out=$(timeout 60 "$KT_BIN/agentctl" --socket "$KT_SOCK" --json stop "$task") || kt_fail "stop failed: $out"
took=$(($(kt_ms) - t0))
state=$(printf '%s' "$out" | kt_json state)
[ "$state" = cancelled ] || kt_fail "the stopped build ended $state, not cancelled: $out"
count=$(kt_survivor_count)
[ "$count" -eq 0 ] || kt_fail "$count survivors of $total processes ($what) after the stop: $(kt_survivors | tr '\n' ';')"
left=$(kt_task_procs | wc -l)
[ "$left" -eq 0 ] || kt_fail "agentd still has $left descendants after the stop"
kt_pass "0 survivors of $total processes ($what), stop took $(kt_secs "$took") s"
