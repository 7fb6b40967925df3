#!/usr/bin/env bash
# Load benchmark of the emulator (see benches/load.rs): builds in release mode, runs the
# emulator binary as its own process on loopback and prints connections held, provisionings/s,
# latencies and the emulator's CPU time and memory. Exits non-zero only if something is broken.
#
# Usage: tests/emulator/bench.sh            (defaults: 1000 connections, 32 clients, 10 s phases)
#   FLEETPROV_BENCH_CONNECTIONS=N FLEETPROV_BENCH_CLIENTS=C FLEETPROV_BENCH_SECONDS=S \
#   FLEETPROV_BENCH_OPEN_CONCURRENCY=K FLEETPROV_BENCH_MAX_SECONDS=T tests/emulator/bench.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
# Client and emulator each hold one descriptor per connection.
want=$(( ${FLEETPROV_BENCH_CONNECTIONS:-1000} + 256 ))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$want" ]; then
    ulimit -n "$want" 2>/dev/null || echo "bench.sh: cannot raise the open file limit to $want" >&2
fi
exec cargo bench -p fleetprov-emulator --bench load "$@"
