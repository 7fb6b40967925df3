#!/usr/bin/env bash
# The benchmark command (issue 7): fleetprov next to the official AWS IoT Device SDK for Python
# v2, against one fleetprov-emulator, in one run. Not part of the test command.
#   bash tests/bench/run.sh [--runs N] [--rtt-runs N] [--rtt-ms MS] [--storm-devices N]
#                           [--slow-runs N] [--sweep-runs N] [--phases LIST] (see bench.py --help)
# Builds what it needs in release mode (the library, the emulator, the storm and codec benches,
# the C example against the CMake-installed library, shared and static), creates .venv (pytest,
# awsiotsdk, cryptography, cmake, matplotlib from PyPI) if needed, then runs tests/bench/bench.py.
# The figures go to stdout; JSON and a Markdown table to build/bench/results.{json,md}; the
# slow-link phase's plot of provisioning time against RTT to BENCHMARKS-rtt.png.
# Cargo builds into $CARGO_TARGET_DIR when it is set (else target/), CMake's cargo too.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
out=$root/build/bench
target=${CARGO_TARGET_DIR:-$root/target}
mkdir -p "$out"
step() { printf '\n==> %s\n' "$*" >&2; }
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}
started=$(date +%s)

step "Python venv (.venv: the official SDK, cryptography, cmake, matplotlib)"
venv=$root/.venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r tests/interop/requirements.txt 'cmake>=3.20,<5' 'matplotlib>=3.8,<4'

step "release builds: library, emulator, storm and codec benches"
cargo build --release --locked -p fleetprov --lib -p fleetprov-emulator --bin fleetprov-emulator >&2
benches=$(cargo bench --locked -p fleetprov --bench storm --bench codec --no-run \
    --message-format=json-render-diagnostics | "$venv/bin/python" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("storm", "codec"):
        print(m["target"]["name"], m["executable"])
')
storm=$(awk '$1 == "storm" {print $2}' <<<"$benches")
codec=$(awk '$1 == "codec" {print $2}' <<<"$benches")
[ -x "$storm" ] && [ -x "$codec" ] || { echo "bench binaries not found: $benches" >&2; exit 1; }

step "C example against the CMake-installed library (shared and static)"
cmake=$venv/bin/cmake
"$cmake" -S . -B "$out/lib" -DCMAKE_BUILD_TYPE=Release -DFLEETPROV_CARGO_TARGET_DIR="$target" >/dev/null
"$cmake" --build "$out/lib" >&2
"$cmake" --install "$out/lib" --prefix "$out/prefix" >/dev/null
"$cmake" -S tests/bench/c -B "$out/c" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$out/prefix" >/dev/null
"$cmake" --build "$out/c" >&2

# The storm holds a socket per device on each side: raise the soft open-file limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

step "measuring (emulator, proxy and clients on loopback)"
rm -rf "$out/work"
"$venv/bin/python" tests/bench/bench.py \
    --emulator "$target/release/fleetprov-emulator" \
    --library "$out/prefix/lib/libfleetprov.so" \
    --c-shared "$out/c/provision_shared" --c-static "$out/c/provision_static" \
    --storm "$storm" --codec "$codec" --measure "$out/c/measure" \
    --work "$out/work" --json "$out/results.json" --markdown "$out/results.md" \
    --plot "$root/BENCHMARKS-rtt.png" "$@"
rm -rf "$out/work"
echo "total, builds included: $(( $(date +%s) - started )) s; results in $out/results.{json,md}"
