#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz: libFuzzer + AddressSanitizer/LeakSanitizer, nightly Rust)
# of the reply decoders, the resume journal's parser and the host-transport C API.
#   bash tests/fuzz-targets/run.sh [SECONDS_PER_TARGET]     (default 20)
# Installs cargo-fuzz and the nightly toolchain if missing, builds the targets, runs each for
# that long from the committed seeds (seeds/<target>, copied: what a run adds stays out of
# git), and prints per target the executions, executions per second, coverage and corpus size.
# Fails when a target finds a crash, a panic, a leak or a hang; the input that did it is kept
# in tests/fuzz-targets/artifacts/<target>/. FUZZ_TARGETS="host journal" runs only those.
set -euo pipefail
seconds=${1:-20}
case $seconds in '' | *[!0-9]*)
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
    ;;
esac
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
targets=${FUZZ_TARGETS:-decoders journal host}

if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/fleetprov-fuzz.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

start=$SECONDS
cargo +nightly fuzz build --fuzz-dir tests/fuzz-targets
echo "built in $((SECONDS - start)) s"

failed=()
summary=()
for t in $targets; do
    mkdir -p "$tmp/$t"
    cp "$here/seeds/$t/"* "$tmp/$t/"
    log="$tmp/$t.log"
    echo "fuzzing $t for $seconds s"
    rc=0
    # -rss_limit_mb: a fixed memory bound per process; -timeout: one input running 10 s is a hang.
    cargo +nightly fuzz run --fuzz-dir tests/fuzz-targets "$t" "$tmp/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
        >"$log" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 | sed 's/cov: \([0-9]*\) ft: \([0-9]*\)/\1\/\2/')
    files=$(find "$tmp/$t" -type f | wc -l)
    bytes=$(find "$tmp/$t" -type f -printf '%s\n' | awk '{ n += $1 } END { printf "%.0f", n / 1024 }')
    line=$(printf '%-9s %12s execs %8s execs/s   cov/ft %-13s corpus %5s inputs (%s KiB)' \
        "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "$files" "$bytes")
    summary+=("$line")
    if [ "$rc" -ne 0 ]; then
        failed+=("$t")
        echo "$t FAILED (exit $rc):" >&2
        grep -E -A12 'panicked at|ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer)' "$log" | head -40 >&2 || tail -40 "$log" >&2
        grep -E 'Test unit written to|artifact_prefix' "$log" >&2 || true
    fi
done

echo
echo "fuzzing summary ($seconds s per target):"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "crash found in: ${failed[*]} (inputs in tests/fuzz-targets/artifacts/)" >&2
    exit 1
fi
echo "no crash"
