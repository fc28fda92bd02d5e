#!/usr/bin/env bash
# Fuzzes agentd's decoders of untrusted input (fuzz/: cargo-fuzz, nightly toolchain)
# for SECONDS per target (default 300), each target starting from its seed corpus
# in fuzz/corpus/<target>/ (read only) plus a work corpus that keeps what earlier
# runs found (fuzz/work/<target>/, not committed; FUZZ_WORK=DIR puts it elsewhere).
#
#   scripts/fuzz.sh [SECONDS] [TARGET…]     targets: control_request agent_frame chat_command
#
# A crash, panic or leak fails the run; libFuzzer saves the input under
# fuzz/artifacts/<target>/ and prints how to replay it
# (`cargo +nightly fuzz run <target> fuzz/artifacts/<target>/crash-…`).
# To add what a long run found to the committed seeds, minimise it first:
#   cd fuzz && cargo +nightly fuzz cmin <target> corpus/<target> work/<target>
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-300}
shift || true
targets=${*:-control_request agent_frame chat_command}
work=${FUZZ_WORK:-$PWD/work}

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz.sh: the nightly toolchain is not installed (rustup toolchain install nightly)" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is not installed (cargo install cargo-fuzz --locked)" >&2
    exit 2
fi

echo "    building the fuzz targets (cargo +nightly fuzz build)"
cargo +nightly fuzz build
for target in $targets; do
    mkdir -p "$work/$target"
    log=$(mktemp)
    echo "    fuzzing $target for ${seconds}s"
    if ! cargo +nightly fuzz run "$target" "$work/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log"
        rm -f "$log"
        echo "FAIL fuzz $target: libFuzzer found a failing input (saved under fuzz/artifacts/$target/)"
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1)
    rm -f "$log"
    echo "PASS fuzz $target: ${runs:-?} inputs in ${seconds}s, $cov, corpus $(ls "$work/$target" | wc -l) + $(ls "corpus/$target" | wc -l) seeds"
done
