# Shared helpers for the kill tests (sourced, not run).
#
# Each test starts its own agentd (socket and state in its own `mktemp -d`), records
# every process it expects to die by pid *and* start time (field 22 of
# /proc/PID/stat, so a reused pid is never mistaken for a survivor, nor killed by
# the cleanup), and on exit ends by pid everything it started: agentd (SIGTERM, then
# SIGKILL after 15 s), then with SIGKILL its tasks' processes, the recorded processes
# and any process whose command line names the test's task directory. agentd's own
# helpers (its cgroup guardian), there before any task, are not a task's processes.
#
# Binaries: $AGENTD_BIN_DIR (default: target/debug of this checkout).
# KT_KEEP=1 keeps the temp dir (its path is printed) for a post-mortem.
# KT_AGENTD_EXTRA: more agentd arguments (split on spaces), for variants of a test.

set -uo pipefail

KT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
KT_BIN="${AGENTD_BIN_DIR:-$KT_ROOT/target/debug}"
KT_NAME="${KT_NAME:-$(basename "$0" .sh)}"
KT_DIR=""
KT_AGENTD=""
KT_SOCK=""
KT_TASKDIR=""

kt_ms() { date +%s%3N; }
# Milliseconds as seconds with two decimals.
kt_secs() { awk -v ms="$1" 'BEGIN { printf "%.2f", ms / 1000 }'; }

kt_log() { printf '    %s: %s\n' "$KT_NAME" "$*" >&2; }

# The one result line, then exit 0.
kt_pass() {
    printf 'PASS %s: %s\n' "$KT_NAME" "$*"
    exit 0
}

# The one result line (with the end of agentd's log on stderr), then exit 1.
kt_fail() {
    if [ -n "$KT_DIR" ] && [ -s "$KT_DIR/agentd.log" ]; then
        printf '    --- last lines of agentd.log ---\n' >&2
        tail -n 15 "$KT_DIR/agentd.log" | sed 's/^/    /' >&2
    fi
    printf 'FAIL %s: %s\n' "$KT_NAME" "$*"
    exit 1
}

# A prerequisite is missing on this host: one loud line, exit 77 (the runner counts
# it as skipped, never as passed).
kt_skip() {
    printf 'SKIP %s: %s\n' "$KT_NAME" "$*"
    exit 77
}

kt_need() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || kt_skip "needs $tool, which is not installed"
    done
}

# kt_until TIMEOUT_MS CMD…: runs CMD every 50 ms until it succeeds (0) or the
# deadline passes (1).
kt_until() {
    local end=$(($(kt_ms) + $1))
    shift
    while :; do
        "$@" && return 0
        [ "$(kt_ms)" -ge "$end" ] && return 1
        sleep 0.05
    done
}

# "PID STARTTIME" of a live process (fails if it is gone).
kt_ident() {
    local stat="" rest
    # `read`, not a subprocess: the storm test records hundreds of pids at a time.
    read -r stat 2>/dev/null <"/proc/$1/stat" || [ -n "$stat" ] || return 1
    rest=${stat##*) }
    # shellcheck disable=SC2086
    set -- $1 $rest
    # $1 pid, $2 state, … starttime is field 22 of the whole line, so $21 here.
    printf '%s %s\n' "$1" "${21}"
}

# True if the process named by "PID STARTTIME" still runs (a zombie does not).
kt_ident_alive() {
    local stat="" rest
    read -r stat 2>/dev/null <"/proc/$1/stat" || [ -n "$stat" ] || return 1
    rest=${stat##*) }
    # shellcheck disable=SC2086
    set -- $1 $2 $rest
    [ "${22}" = "$2" ] || return 1
    case "$3" in Z | X | x) return 1 ;; esac
    return 0
}

# Appends the identities of the given pids (those still alive) to the record.
kt_record() {
    local pid
    for pid in "$@"; do
        kt_ident "$pid" 2>/dev/null || true
    done >>"$KT_DIR/recorded"
    sort -u -o "$KT_DIR/recorded" "$KT_DIR/recorded"
}

# Prints the recorded processes that still run, as "PID STARTTIME COMMAND".
kt_survivors() {
    local pid start
    [ -s "$KT_DIR/recorded" ] || return 0
    while read -r pid start; do
        if kt_ident_alive "$pid" "$start"; then
            printf '%s %s %s\n' "$pid" "$start" "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-80)"
        fi
    done <"$KT_DIR/recorded"
}

kt_survivor_count() { kt_survivors | wc -l | tr -d ' '; }
kt_no_survivors() { [ "$(kt_survivor_count)" -eq 0 ]; }
kt_recorded_count() { [ -s "$KT_DIR/recorded" ] && wc -l <"$KT_DIR/recorded" | tr -d ' ' || echo 0; }

# Every descendant of PID (by parent links, from one `ps` snapshot).
kt_descendants() {
    ps -e -o pid= -o ppid= | awk -v root="$1" '
        { parent[$1] = $2 }
        END {
            want[root] = 1
            do {
                grew = 0
                for (p in parent) if (!(p in want) && (parent[p] in want)) { want[p] = 1; grew = 1 }
            } while (grew)
            for (p in want) if (p != root) print p
        }'
}

# Live processes whose command line names this test's task directory (scripts and
# files the tasks run live there; agentd's own command line does not name it).
kt_marked() {
    [ -n "$KT_TASKDIR" ] || return 0
    # The pattern comes from a file so that grep's own command line does not match.
    printf '%s/\n' "$KT_TASKDIR" >"$KT_DIR/marker"
    grep -lasFf "$KT_DIR/marker" /proc/[0-9]*/cmdline 2>/dev/null | sed 's|^/proc/||; s|/cmdline$||' | grep -vx "$$"
}

# Zombies among agentd's children, as "PID COMMAND".
kt_zombie_children() {
    [ -n "$KT_AGENTD" ] || return 0
    ps -o pid=,stat=,comm= --ppid "$KT_AGENTD" 2>/dev/null | awk '$2 ~ /^Z/ { print $1, $3 }'
}

kt_cleanup() {
    local rc=$? round pid start
    trap - EXIT
    if [ -n "$KT_AGENTD" ]; then
        # Remember the tasks' processes by identity before they lose agentd as their
        # parent; then end agentd and give its helpers (the cgroup guardian, which
        # kills and removes the task cgroups) a moment to finish on their own.
        kt_record $(kt_task_procs)
        # A clean shutdown first (it stops the tasks and removes agentd's cgroups),
        # SIGKILL if that takes more than 15 s.
        kill -TERM "$KT_AGENTD" 2>/dev/null
        kt_until 15000 kt_gone "$KT_AGENTD"
        kill -KILL "$KT_AGENTD" 2>/dev/null
        wait "$KT_AGENTD" 2>/dev/null
        while read -r pid; do
            [ -n "$pid" ] && kt_until 5000 kt_gone "$pid"
        done <"$KT_DIR/baseline"
        KT_AGENTD=""
    fi
    for round in 1 2 3; do
        if [ -n "$KT_DIR" ] && [ -s "$KT_DIR/recorded" ]; then
            while read -r pid start; do
                kt_ident_alive "$pid" "$start" && kill -KILL "$pid" 2>/dev/null
            done <"$KT_DIR/recorded"
        fi
        for pid in $(kt_marked); do kill -KILL "$pid" 2>/dev/null; done
        [ "$round" = 1 ] || sleep 0.1
    done
    if [ -n "$KT_DIR" ]; then
        if [ "${KT_KEEP:-0}" = 1 ]; then
            echo "    $KT_NAME: kept $KT_DIR" >&2
        else
            rm -rf "$KT_DIR"
        fi
    fi
    exit "$rc"
}

kt_baseline_gone() {
    local pid
    while read -r pid; do
        [ -z "$pid" ] || kt_gone "$pid" || return 1
    done <"$KT_DIR/baseline"
}

kt_gone() { ! kill -0 "$1" 2>/dev/null || [ "$(kt_state "$1")" = Z ]; }
kt_state() {
    local stat=""
    read -r stat 2>/dev/null <"/proc/$1/stat" || [ -n "$stat" ] || return 1
    stat=${stat##*) }
    printf '%s\n' "${stat%% *}"
}

# Creates the temp dir and installs the cleanup. Call first.
kt_init() {
    local bin
    for bin in agentd agentctl agent-exec; do
        [ -x "$KT_BIN/$bin" ] || {
            printf 'FAIL %s: %s/%s is missing (build first: cargo build --bins)\n' "$KT_NAME" "$KT_BIN" "$bin"
            exit 1
        }
    done
    KT_DIR="$(mktemp -d -t "agentd-kt-$KT_NAME.XXXXXX")"
    chmod 700 "$KT_DIR"
    KT_TASKDIR="$KT_DIR/task"
    mkdir -p "$KT_TASKDIR/pids"
    : >"$KT_DIR/recorded"
    : >"$KT_DIR/baseline"
    trap kt_cleanup EXIT
    trap 'exit 130' INT TERM
}

kt_ctl() { "$KT_BIN/agentctl" --socket "$KT_SOCK" "$@"; }

# kt_start_agentd ARGS…: agentd on this test's socket and state dir; waits until it
# answers a ping (20 s).
kt_start_agentd() {
    KT_SOCK="$KT_DIR/run/agentd.sock"
    env -u AGENTD_SOCKET AGENTD_LOG="${AGENTD_LOG:-info}" "$KT_BIN/agentd" \
        --socket "$KT_SOCK" --state-dir "$KT_DIR/state" "$@" ${KT_AGENTD_EXTRA:-} \
        </dev/null >/dev/null 2>>"$KT_DIR/agentd.log" &
    KT_AGENTD=$!
    kt_until 20000 kt_agentd_answers || kt_fail "agentd did not answer a ping within 20 s"
    # agentd's own helpers (the cgroup guardian), there before any task: not part of
    # any task's tree.
    kt_descendants "$KT_AGENTD" >"$KT_DIR/baseline"
}

# agentd's descendants that are not its own helpers: the processes of its tasks.
kt_task_procs() {
    [ -n "$KT_AGENTD" ] || return 0
    kt_descendants "$KT_AGENTD" | grep -vxFf "$KT_DIR/baseline"
}

kt_agentd_answers() {
    kill -0 "$KT_AGENTD" 2>/dev/null || kt_fail "agentd exited at start"
    kt_ctl ping >/dev/null 2>&1
}

# The value of the first "KEY": in a JSON text on stdin (strings unquoted).
kt_json() { grep -o "\"$1\":\(\"[^\"]*\"\|[^,}]*\)" | head -n 1 | sed 's/^[^:]*://; s/^"//; s/"$//'; }

# kt_submit SESSION TEXT: sends work; prints its task id.
kt_submit() {
    local out
    out=$(kt_ctl --json send --session "$1" "$2") || kt_fail "send failed: $out"
    printf '%s\n' "$out" | kt_json task_id
}

kt_task_field() { kt_ctl --json status "$1" 2>/dev/null | kt_json "$2"; }

kt_task_running() { [ "$(kt_task_field "$1" state)" = running ] && [ -n "$(kt_task_field "$1" pid | grep -v null)" ]; }

kt_task_ended() {
    case "$(kt_task_field "$1" state)" in
        succeeded | failed | cancelled | interrupted | expired | dropped | merged) return 0 ;;
    esac
    return 1
}

# kt_wait_pidfiles TIMEOUT_MS NAME…: waits until $KT_TASKDIR/pids/NAME exists and is
# non-empty for every NAME, then records those pids.
kt_wait_pidfiles() {
    local timeout=$1 name
    shift
    kt_until "$timeout" kt_pidfiles_present "$@" ||
        kt_fail "the task did not start its processes within $((timeout / 1000)) s (missing: $(kt_missing_pidfiles "$@"))"
    for name in "$@"; do kt_record "$(cat "$KT_TASKDIR/pids/$name")"; done
}
kt_pidfiles_present() {
    local name
    for name in "$@"; do [ -s "$KT_TASKDIR/pids/$name" ] || return 1; done
}
kt_missing_pidfiles() {
    local name
    for name in "$@"; do [ -s "$KT_TASKDIR/pids/$name" ] || printf '%s ' "$name"; done
}

# The pid in $KT_TASKDIR/pids/NAME.
kt_pid() { cat "$KT_TASKDIR/pids/$1"; }

# Whether this host lets a root agentd (or one with a delegated cgroup) create task
# cgroups: a cgroup v2 hierarchy in which our own cgroup is writable, on a kernel
# with cgroup.kill (5.14+). KT_CONTAINMENT=cgroup|tree overrides the detection.
kt_host_has_cgroups() {
    case "${KT_CONTAINMENT:-auto}" in
        cgroup) return 0 ;;
        tree) return 1 ;;
    esac
    local own mnt dir major minor
    own=$(sed -n 's/^0:://p' /proc/self/cgroup)
    [ -n "$own" ] || return 1
    IFS=. read -r major minor _ <<<"$(uname -r)"
    [ "$major" -gt 5 ] || { [ "$major" -eq 5 ] && [ "${minor%%[!0-9]*}" -ge 14 ]; } || return 1
    for mnt in $(awk '{ for (i = 7; i <= NF; i++) if ($i == "-") { if ($(i + 1) == "cgroup2") print $5; break } }' /proc/self/mountinfo); do
        dir="$mnt${own%/}"
        [ -d "$dir" ] && [ -w "$dir/cgroup.procs" ] && [ -w "$dir" ] && return 0
    done
    return 1
}

# What agentd says about containment in `status` (`cgroup`, `process-tree`, or
# empty for an agentd that does not say).
kt_containment_kind() { kt_ctl --json status 2>/dev/null | grep -o '"containment":{[^}]*}' | kt_json kind; }

# Sets KT_EXPECT to the containment the test holds agentd to: `cgroup` where this
# host offers a writable cgroup v2 subtree, else `process-tree`; fails if agentd's
# own claim in `status` (when it makes one) disagrees.
kt_check_containment() {
    local said
    KT_EXPECT=process-tree
    kt_host_has_cgroups && KT_EXPECT=cgroup
    said=$(kt_containment_kind)
    if [ -n "$said" ] && [ "$said" != "$KT_EXPECT" ]; then
        kt_fail "agentctl status says containment is '$said', but this host calls for '$KT_EXPECT' ($(kt_ctl status | grep -i containment))"
    fi
}
