#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and property tests, and the
# integration tests that drive the real binaries. This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The Matrix bridge test runs a real Synapse from this virtualenv (.ci/run installs
# it); without it the test prints a SKIP line, and fails under CI=true.
if [ -z "${AGENTD_SYNAPSE:-}" ] && [ -x .ci/venv-synapse/bin/python ]; then
    export AGENTD_SYNAPSE="$PWD/.ci/venv-synapse"
fi

echo "==> cargo test (unit, property and integration tests)"
cargo test --workspace --all-targets --locked
