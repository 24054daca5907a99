#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ (cargo fuzz, libFuzzer, nightly) for a
# bounded time, one after the other, starting from the committed corpus in
# fuzz/corpus/<target>. Fails if any target crashes, hangs or allocates
# too much; the input that did it is in fuzz/artifacts/<target>/.
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET]    # default 30
#
# Inputs the fuzzer finds go to a scratch directory, not to the committed
# corpus (set FUZZ_CORPUS_OUT=DIR to keep them in DIR/<target>).
# Installs the nightly toolchain and cargo-fuzz if they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET="${1:-30}"

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

cd fuzz
echo "==> cargo +nightly fuzz build"
cargo +nightly fuzz build
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
failed=()
for target in $(cargo +nightly fuzz list); do
    out="${FUZZ_CORPUS_OUT:-$scratch}/$target"
    mkdir -p "$out" "corpus/$target"
    echo "==> fuzz $target for ${SECONDS_PER_TARGET}s"
    # New inputs go to the first directory; the committed corpus is only read.
    # -malloc_limit_mb: one allocation over 64 MiB is a failure.
    if ! cargo +nightly fuzz run "$target" "$out" "corpus/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -malloc_limit_mb=64 \
        -print_final_stats=1 2>"$scratch/$target.log"; then
        tail -n 60 "$scratch/$target.log"
        failed+=("$target")
    else
        grep -E '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::peak_rss_mb)' \
            "$scratch/$target.log" || true
    fi
done
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz targets that failed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "==> every fuzz target ran ${SECONDS_PER_TARGET}s without a failure"
