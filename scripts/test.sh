#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and property tests, and the
# integration tests that drive the real binaries. This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> cargo test (unit, property and integration tests)"
cargo test --workspace --all-targets --locked

echo "==> cargo install --path . (the installed set, and the README's usage from it)"
scripts/install-check.sh
