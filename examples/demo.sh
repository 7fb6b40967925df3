#!/usr/bin/env bash
# The main job on a fresh machine: build the library with CMake (which drives cargo), install it
# to build/prefix, build the C example `provision` against that installed package
# (find_package(fleetprov)), start the bundled emulator, provision a demo device, and print the
# thing name and the credentials it stored. Everything secret it makes (the emulator's CA and
# claim keys, the device key) lives in one temporary directory, removed when the script ends,
# also on failure or Ctrl-C. The first run builds the library and the emulator: about 5 minutes
# on 2 cores; later runs take seconds.
#   bash examples/demo.sh [SERIAL]
# CMake comes from PyPI into .venv (created if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
serial=${1:-SN$(date +%s)}
venv=$root/.venv
if [ ! -x "$venv/bin/cmake" ]; then
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'cmake>=3.20,<5'
fi
cmake=$venv/bin/cmake
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}

echo "== building the library (cmake -> cargo, release; the first time about 3 minutes)"
"$cmake" -S . -B build/lib -DCMAKE_BUILD_TYPE=Release >/dev/null
"$cmake" --build build/lib
echo "== installing it to build/prefix (include/, lib/, lib/cmake/fleetprov, lib/pkgconfig)"
"$cmake" --install build/lib --prefix build/prefix >/dev/null
echo "== building the C example against the installed package"
"$cmake" -S examples/c -B build/examples -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$root/build/prefix" >/dev/null
"$cmake" --build build/examples --target provision
echo "== building the emulator (the first time about 2 minutes)"
cargo build --release --locked -p fleetprov-emulator --bin fleetprov-emulator

work=$(mktemp -d)
emu=
cleanup() {
    if [ -n "$emu" ]; then kill "$emu" 2>/dev/null || true; wait "$emu" 2>/dev/null || true; fi
    # Keys first, then the rest.
    find "$work" -type f \( -name '*.key' -o -name 'journal.json' \) -delete 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
target/release/fleetprov-emulator --data-dir "$work/emulator" --port 0 --key-type ec > "$work/emulator.out" &
emu=$!
for _ in $(seq 1 300); do
    grep -q '^listening on ' "$work/emulator.out" 2>/dev/null && break
    kill -0 "$emu" 2>/dev/null || { echo "the emulator did not start" >&2; exit 1; }
    sleep 0.1
done
port=$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$work/emulator.out")
[ -n "$port" ] || { echo "the emulator did not report its port" >&2; exit 1; }
echo "== emulator listening on localhost:$port (data in $work/emulator)"
build/examples/provision --endpoint localhost --port "$port" \
    --ca "$work/emulator/ca.pem" --cert "$work/emulator/claim.pem" --key "$work/emulator/claim.key" \
    --template DemoTemplate --param "SerialNumber=$serial" --out "$work/device"
ls -l "$work/device"
echo "== device.json:"
cat "$work/device/device.json"
echo "== done; $work (the emulator's keys and the device's) is removed now"
