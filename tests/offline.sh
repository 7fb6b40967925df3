#!/usr/bin/env bash
# Offline build, as Yocto and Buildroot do it: the crates fetched first (`cargo vendor`), then
# the library built through CMake with no network and an empty CARGO_HOME (no registry cache):
#   cmake -DFLEETPROV_CARGO_OFFLINE=ON -DFLEETPROV_CARGO_VENDOR_DIR=<vendor>
#         -DFLEETPROV_CARGO_HOME=<empty dir>
# The build runs in a network namespace of its own (unshare -n: not even a loopback) when this
# machine allows one, else with CARGO_NET_OFFLINE=true and proxies that lead nowhere.
#
#   bash tests/offline.sh [VENV]      # from anywhere; VENV defaults to <repo>/.venv
#
# The vendoring needs the registry (or cargo's cache of it in ~/.cargo). The build has a cargo
# target directory of its own, <target>/offline (<target>: CARGO_TARGET_DIR, else <repo>/target),
# with the vendored crates in <target>/offline/vendor: crates built from another source path
# count as changed, so sharing <target> would make the next ordinary build compile them all
# again. From cold it compiles the library and its dependencies (about 2 minutes on 2 cores);
# again, only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=${1:-${VENV:-$root/.venv}}
# step(), CMAKE_BUILD_PARALLEL_LEVEL, cmake_from_pypi.
. "$root/tests/lib.sh"

cmake_from_pypi "$venv"

work=$(mktemp -d "${TMPDIR:-/tmp}/fleetprov-offline.XXXXXX")
trap 'rm -rf "$work"' EXIT
target_dir=${CARGO_TARGET_DIR:-$root/target}/offline
vendor=$target_dir/vendor

step "fetch: cargo vendor --locked (the one step that may use the network)"
t0=$(date +%s)
mkdir -p "$target_dir"
cargo vendor --locked --quiet "$vendor" >/dev/null
echo "$(find "$vendor" -mindepth 1 -maxdepth 1 -type d | wc -l) crates in $vendor ($(( $(date +%s) - t0 )) s)"

# From here on: no network, and a CARGO_HOME with nothing in it.
cargo_home=$work/cargo-home
mkdir "$cargo_home"
offline=(env CARGO_NET_OFFLINE=true http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9
         HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 CARGO_HTTP_PROXY=http://127.0.0.1:9)
if unshare -n true 2>/dev/null; then
    offline=(unshare -n "${offline[@]}")
    echo "no network: unshare -n (a network namespace without interfaces)"
else
    echo "no network: CARGO_NET_OFFLINE=true and proxies to 127.0.0.1:9 (unshare -n not allowed here)"
fi

step "configure: FLEETPROV_CARGO_OFFLINE, FLEETPROV_CARGO_VENDOR_DIR, an empty FLEETPROV_CARGO_HOME"
"${offline[@]}" "$cmake" -S "$root" -B "$work/lib" -DCMAKE_BUILD_TYPE=Debug \
    -DFLEETPROV_CARGO_OFFLINE=ON -DFLEETPROV_CARGO_VENDOR_DIR="$vendor" \
    -DFLEETPROV_CARGO_HOME="$cargo_home" -DFLEETPROV_CARGO_TARGET_DIR="$target_dir" >/dev/null

step "build (cargo, debug) and install, offline"
t0=$(date +%s)
"${offline[@]}" "$cmake" --build "$work/lib" 2>&1 | tee "$work/build.log"
build_s=$(( $(date +%s) - t0 ))
"$cmake" --install "$work/lib" --prefix "$work/prefix" >/dev/null
abi=$(sed -n 's/^#define FLEETPROV_ABI_VERSION \([0-9]*\)$/\1/p' include/fleetprov.h)
[ -f "$work/prefix/lib/libfleetprov.so.$abi" ] && [ -f "$work/prefix/lib/libfleetprov.a" ] \
    || { echo "nothing installed" >&2; exit 1; }
# The crates came from the vendor directory, and nothing was put into the empty CARGO_HOME's
# registry (cargo may write its own small files there, never a downloaded crate).
if [ -e "$cargo_home/registry" ]; then
    echo "cargo used a registry in CARGO_HOME:" >&2
    find "$cargo_home" -maxdepth 3 >&2
    exit 1
fi
echo "compiled: $(grep -c '^ *Compiling ' "$work/build.log" || true) crates in $build_s s;" \
     "CARGO_HOME after the build: $(find "$cargo_home" -mindepth 1 | wc -l) entries"

step "offline build: passed"
