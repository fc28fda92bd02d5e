#!/usr/bin/env bash
# agentd-proc's own CPU per trivial task: spawn, track, reap and "tree is empty",
# for the old path (kill_all after every exit: a scan of the machine's /proc) and
# the Killer with and without a task cgroup, printed as ratios against plain
# std::process::Command spawns of /bin/true measured in the same run.
# Not a test: it asserts nothing, it reports. The cgroup row needs root and a
# writable cgroup v2 hierarchy.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-300}
cargo build --release --quiet -p agentd-proc --example task_cost
exec target/release/examples/task_cost "$N"
