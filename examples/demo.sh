#!/usr/bin/env bash
# The main job on a fresh machine: build, start the bundled emulator, provision a demo device
# against it, print the thing name and where the credentials went.
#   bash examples/demo.sh [SERIAL]
set -euo pipefail
cd "$(dirname "$0")/.."
serial=${1:-SN$(date +%s)}
cargo build --release --locked -p fleetprov-emulator --bin fleetprov-emulator --example provision -p fleetprov 2>&1 | tail -n 1
work=$(mktemp -d)
trap 'kill "$emu" 2>/dev/null || true; wait "$emu" 2>/dev/null || true' EXIT
target/release/fleetprov-emulator --data-dir "$work/emulator" --port 0 --key-type ec > "$work/emulator.out" &
emu=$!
for _ in $(seq 1 300); do
    grep -q '^listening on ' "$work/emulator.out" 2>/dev/null && break
    kill -0 "$emu" 2>/dev/null || { echo "the emulator did not start" >&2; exit 1; }
    sleep 0.1
done
port=$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$work/emulator.out")
[ -n "$port" ] || { echo "the emulator did not report its port" >&2; exit 1; }
echo "emulator listening on localhost:$port (data in $work/emulator)"
target/release/examples/provision --endpoint localhost --port "$port" \
    --ca "$work/emulator/ca.pem" --cert "$work/emulator/claim.pem" --key "$work/emulator/claim.key" \
    --template DemoTemplate --param "SerialNumber=$serial" --out "$work/device"
ls -l "$work/device"
