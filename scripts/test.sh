#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and property tests, the integration
# tests that drive the real binaries, the kill tests (scripts/kill-tests/: process
# guarantees checked from outside, by pid) and a short fuzzing run of each fuzz
# target from its corpus. This is what CI runs.
#
# KT_SKIP=1 skips the kill tests, FUZZ_SECONDS=N sets the fuzzing time per target
# (default 10; 0 skips fuzzing).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo fmt --check"
cargo fmt --all -- --check
(cd fuzz && cargo fmt -- --check)

echo "==> cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The Matrix bridge test runs a real Synapse from this virtualenv (.ci/run installs
# it); without it the test prints a SKIP line, and fails under CI=true.
if [ -z "${AGENTD_SYNAPSE:-}" ] && [ -x .ci/venv-synapse/bin/python ]; then
    export AGENTD_SYNAPSE="$PWD/.ci/venv-synapse"
fi

echo "==> cargo test (unit, property and integration tests)"
cargo test --workspace --all-targets --locked

echo "==> cargo install --path . (the installed set, and the README's usage from it)"
scripts/install-check.sh

if [ "${KT_SKIP:-0}" = 1 ]; then
    echo "==> kill tests: SKIPPED (KT_SKIP=1)"
else
    echo "==> kill tests (scripts/kill-tests/run.sh, against target/debug)"
    cargo build --workspace --bins --locked
    AGENTD_BIN_DIR="$PWD/target/debug" scripts/kill-tests/run.sh
fi

fuzz_seconds=${FUZZ_SECONDS:-10}
if [ "$fuzz_seconds" = 0 ]; then
    echo "==> fuzzing: SKIPPED (FUZZ_SECONDS=0)"
elif ! cargo +nightly --version >/dev/null 2>&1; then
    echo "==> fuzzing: SKIPPED !!! the nightly toolchain is not installed, so the fuzz targets"
    echo "    in fuzz/ did not run (rustup toolchain install nightly; cargo install cargo-fuzz --locked)"
else
    echo "==> fuzzing (scripts/fuzz.sh ${fuzz_seconds}: each target from its corpus)"
    fuzz_work=$(mktemp -d)
    trap 'rm -rf "$fuzz_work"' EXIT
    FUZZ_WORK="$fuzz_work" scripts/fuzz.sh "$fuzz_seconds"
fi
