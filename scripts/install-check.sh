#!/usr/bin/env bash
# Checks that `cargo install --path .` installs exactly agentd, agentctl, agentd-matrix and
# agent-exec (not the test suite's agentd-test-agent), and that the README's usage
# works from the installed binaries alone: agentd finds the default agent
# (agent-exec) beside itself, agentctl finds agentd's default socket; and that the
# man pages `agentctl man DIR` writes render, agentd.1 with every flag of agentd.
#
# It installs a debug build from the workspace's own target dir (`--debug
# --target-dir target`), so after `cargo test` it only links; `cargo install --path .`
# as the README has it builds the same set in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK="$(mktemp -d -t agentd-install.XXXXXX)"
chmod 700 "$WORK"
AGENTD_PID=""
cleanup() {
    if [[ -n "$AGENTD_PID" ]] && kill -0 "$AGENTD_PID" 2>/dev/null; then
        kill -KILL "$AGENTD_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
fail() {
    echo "install-check: $*" >&2
    [[ -f "$WORK/agentd.log" ]] && sed 's/^/  agentd: /' "$WORK/agentd.log" >&2
    exit 1
}

cargo install --quiet --locked --debug --path . --root "$WORK/root" --target-dir target
installed="$(ls "$WORK/root/bin" | sort | tr '\n' ' ')"
[[ "$installed" == "agent-exec agentctl agentd agentd-matrix " ]] ||
    fail "cargo install put [$installed] in bin/, expected [agent-exec agentctl agentd agentd-matrix]"

# A new user's environment: only the installed binaries and the system on PATH, a
# fresh runtime dir (where the default socket lives), config and state homes.
mkdir -m 700 "$WORK/runtime" "$WORK/config" "$WORK/state"
export PATH="$WORK/root/bin:/usr/bin:/bin"
export XDG_RUNTIME_DIR="$WORK/runtime" XDG_CONFIG_HOME="$WORK/config" XDG_STATE_HOME="$WORK/state"
unset AGENTD_CONFIG AGENTD_SOCKET AGENTD_LOG RUST_LOG NOTIFY_SOCKET

# The man pages as the README installs them: agentd.1 (from agentd's own flag
# definitions) renders, and lists every flag `agentd --help` lists.
mkdir -p "$WORK/man/man1"
agentctl man "$WORK/man/man1" || fail "agentctl man DIR failed"
for page in agentctl agentctl-send agentd; do
    [[ -s "$WORK/man/man1/$page.1" ]] || fail "agentctl man DIR wrote no $page.1"
done
render_man() {
    # man-db's `man -l`, else groff; bold and underline overstrikes removed.
    { MANWIDTH=100 man -P cat -l "$1" 2>/dev/null || groff -man -Tutf8 "$1"; } | sed 's/.\x08//g'
}
agentd_page="$(render_man "$WORK/man/man1/agentd.1")" || fail "agentd.1 does not render"
grep -q '^NAME' <<<"$agentd_page" || fail "agentd.1 rendered without a NAME section: $agentd_page"
flags="$(agentd --help | grep -o -- '--[a-z][a-z-]*' | sort -u)"
[[ "$(wc -l <<<"$flags")" -gt 20 ]] || fail "agentd --help lists only: $flags"
for flag in $flags; do
    grep -q -- "$flag" <<<"$agentd_page" || fail "agentd.1 does not list $flag"
done

# The README's usage section, from the installed binaries.
agentd --max-concurrent 1 --agent 'agent-exec -- sh -c {text}' 2>"$WORK/agentd.log" &
AGENTD_PID=$!
for _ in $(seq 1 200); do
    agentctl ping >/dev/null 2>&1 && break
    kill -0 "$AGENTD_PID" 2>/dev/null || fail "agentd exited at start"
    sleep 0.05
done
agentctl ping >/dev/null || fail "agentd does not answer at its default socket"

long="$(agentctl --json send --session alice 'sleep 30')"
task="$(printf '%s' "$long" | sed -n 's/.*"task_id":"\([0-9a-f-]*\)".*/\1/p' | head -n 1)"
[[ -n "$task" ]] || fail "no task id in: $long"
agentctl send --session bob 'echo hello' | grep -q 'queued: position 1' ||
    fail "bob's message was not queued behind alice's"
agentctl status >/dev/null || fail "agentctl status failed"
agentctl send --session alice /status >/dev/null || fail "/status failed"
agentctl stop "${task:0:13}" | grep -q cancelled || fail "agentctl stop did not cancel $task"
for _ in $(seq 1 200); do
    agentctl --json tasks --all | grep -q '"state":"succeeded"' && break
    sleep 0.05
done
agentctl --json tasks --all | grep -q '"state":"succeeded"' ||
    fail "bob's task did not run after the stop"

kill -TERM "$AGENTD_PID"
for _ in $(seq 1 200); do kill -0 "$AGENTD_PID" 2>/dev/null || break; sleep 0.05; done
kill -0 "$AGENTD_PID" 2>/dev/null && fail "agentd did not stop on SIGTERM"
wait "$AGENTD_PID" || fail "agentd exited with an error on SIGTERM"
AGENTD_PID=""
echo "install-check: cargo install gives agent-exec, agentctl, agentd, agentd-matrix; their man pages render (agentd.1 lists all $(wc -l <<<"$flags") flags); the README's usage works from them"
