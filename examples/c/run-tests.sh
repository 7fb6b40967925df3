#!/usr/bin/env bash
# The C side of fleetprov, end to end: builds the library through CMake (Debug), installs it to a
# temporary prefix, builds the C examples against that prefix with find_package(fleetprov) and
# runs their ctest suite against fleetprov-emulator three times: plain, with ASan+UBSan (and
# LeakSanitizer), and under valgrind memcheck. Also checks the pkg-config file.
#
# The crash tests (provision_crash_*: the example SIGKILLed at each step, then run again) run in
# full in the plain and ASan+UBSan passes (about 0.5 s each; the library itself is not
# instrumented, so ASan costs them little). Under valgrind each costs two valgrind runs (about
# 8-16 s), so that pass keeps only the kill points whose second run resumes a journal
# (certificate_created: resumed at RegisterThing; verifying: resumed at the verification).
# Likewise provision_mosquitto keeps its ok, cbor and fault cases there, and provision_pkcs11
# (SoftHSM2, which valgrind finds clean) its json and resume cases (CMakeLists.txt).
#
#   bash examples/c/run-tests.sh [VENV]      # from anywhere; VENV defaults to <repo>/.venv
#
# FLEETPROV_RELEASE_VALGRIND=1 adds a fourth pass: the release library (cargo --release, LTO:
# slow from cold) with RelWithDebInfo examples under valgrind.
#
# CMake comes from PyPI (`pip install cmake` into VENV, created if missing). Debian packages it
# needs besides Rust and Python 3 (with venv): gcc g++ make libssl-dev libmosquitto-dev
# libp11-kit-dev valgrind pkg-config openssl (install: apt-get install -y gcc g++ make libssl-dev
# libmosquitto-dev libp11-kit-dev valgrind pkg-config openssl), and softhsm2 for the PKCS#11
# example's tests (provision_pkcs11_*: skipped without it).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
venv=${1:-${VENV:-$root/.venv}}
# step(), CMAKE_BUILD_PARALLEL_LEVEL, cmake_from_pypi.
. "$root/tests/lib.sh"
jobs=$CMAKE_BUILD_PARALLEL_LEVEL

missing=()
for tool in cc c++ make valgrind pkg-config python3 cargo openssl; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ -e /usr/include/openssl/evp.h ] || missing+=("openssl headers (libssl-dev)")
[ -e /usr/include/mosquitto.h ] || missing+=("libmosquitto headers (libmosquitto-dev)")
[ -e /usr/include/p11-kit-1/p11-kit/pkcs11.h ] || missing+=("p11-kit's pkcs11.h (libp11-kit-dev)")
if [ ${#missing[@]} -gt 0 ]; then
    echo "missing: ${missing[*]} (Debian: apt-get install -y gcc g++ make libssl-dev libmosquitto-dev libp11-kit-dev valgrind pkg-config openssl)" >&2
    exit 1
fi
command -v softhsm2-util >/dev/null 2>&1 ||
    echo "note: softhsm2 is not installed: the provision_pkcs11 tests are skipped" >&2

cmake_from_pypi "$venv"

target_dir=${CARGO_TARGET_DIR:-$root/target}
step "fleetprov-emulator (cargo, debug)"
cargo build --locked -p fleetprov-emulator --bin fleetprov-emulator
emulator=$target_dir/debug/fleetprov-emulator

work=$(mktemp -d "${TMPDIR:-/tmp}/fleetprov-c.XXXXXX")
trap 'rm -rf "$work"' EXIT
prefix=$work/prefix
# The library's SONAME is libfleetprov.so.<ABI>.
abi=$(sed -n 's/^#define FLEETPROV_ABI_VERSION \([0-9]*\)$/\1/p' include/fleetprov.h)

step "library: configure, build (cargo, debug) and install to $prefix"
"$cmake" -S "$root" -B "$work/lib" -DCMAKE_BUILD_TYPE=Debug \
    -DFLEETPROV_CARGO_TARGET_DIR="$target_dir" >/dev/null
"$cmake" --build "$work/lib"
"$cmake" --install "$work/lib" --prefix "$prefix"

step "pkg-config: fleetprov.pc, shared and static"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
pkg-config --exists --print-errors 'fleetprov >= 0.3'
echo "pkg-config fleetprov: $(pkg-config --modversion fleetprov): $(pkg-config --cflags --libs fleetprov)"
# shellcheck disable=SC2046
# No rpath of our own: the .pc file's Libs carries it, so the program runs without
# LD_LIBRARY_PATH.
cc -std=c11 -Wall -Wextra -Werror -pedantic examples/c/header_test.c -o "$work/pc_shared" \
    $(pkg-config --cflags --libs fleetprov)
# shellcheck disable=SC2046
cc -std=c11 -Wall -Wextra -Werror -pedantic examples/c/header_test.c -o "$work/pc_static" \
    $(pkg-config --cflags fleetprov) "$prefix/lib/libfleetprov.a" \
    $(pkg-config --libs-only-other --libs-only-l --static fleetprov | sed 's/-lfleetprov//')
"$work/pc_shared"
"$work/pc_static"

step "host-API-only library (FLEETPROV_TRANSPORT, FLEETPROV_CBOR, FLEETPROV_SYSTEM_ROOTS OFF)"
# Installed to a prefix of its own; no MQTT or TLS client inside, no fleetprov command; the
# libmosquitto example (the firmware's own MQTT stack) provisions with it.
"$cmake" -S "$root" -B "$work/lib-hostonly" -DCMAKE_BUILD_TYPE=Debug \
    -DFLEETPROV_CARGO_TARGET_DIR="$target_dir" -DFLEETPROV_TRANSPORT=OFF -DFLEETPROV_CBOR=OFF \
    -DFLEETPROV_SYSTEM_ROOTS=OFF >/dev/null
"$cmake" --build "$work/lib-hostonly"
"$cmake" --install "$work/lib-hostonly" --prefix "$work/prefix-hostonly" >/dev/null
for crate in rumqttc tokio ciborium rustls_native_certs; do
    if nm -C "$work/prefix-hostonly/lib/libfleetprov.so.$abi" | grep -q " $crate::"; then
        echo "the host-API-only library contains $crate" >&2
        exit 1
    fi
done
[ ! -e "$work/prefix-hostonly/bin/fleetprov" ] || { echo "fleetprov command installed" >&2; exit 1; }
"$cmake" -S examples/c -B "$work/hostonly" -DCMAKE_PREFIX_PATH="$work/prefix-hostonly" \
    -DCMAKE_BUILD_TYPE=Debug -DFLEETPROV_EMULATOR="$emulator" -DFLEETPROV_REQUIRE_MOSQUITTO=ON \
    "-DFLEETPROV_EXAMPLE_TESTS=header_test_c;provision_mosquitto_ok;provision_mosquitto_reject" \
    >/dev/null
"$cmake" --build "$work/hostonly"
"$ctest" --test-dir "$work/hostonly" -j "$jobs" --output-on-failure

step "library with injectable panics (cargo feature test-panics) for the contract tests"
cargo build --locked -p fleetprov --lib --features test-panics
mkdir -p "$work/test-panics"
cp "$target_dir/debug/libfleetprov.so" "$work/test-panics/"
# Programs linked with it record its SONAME (libfleetprov.so.<ABI>) and look for that name.
ln -sf libfleetprov.so "$work/test-panics/libfleetprov.so.$abi"
# Put the ordinary build back in place for whoever uses target/debug next.
cargo build --locked -p fleetprov --lib

# The C API's contracts (tests/c): plain, ASan+UBSan, valgrind and ThreadSanitizer.
contracts() {
    local name=$1
    shift
    step "contracts ($name): configure, build and ctest"
    "$cmake" -S tests/c -B "$work/contracts-$name" -DCMAKE_PREFIX_PATH="$prefix" \
        -DFLEETPROV_TEST_PANICS_LIBRARY="$work/test-panics/libfleetprov.so" "$@" >/dev/null
    "$cmake" --build "$work/contracts-$name"
    timed_ctest "contracts-$name" --output-on-failure
}

# configure+build+test one flavour of the examples: NAME [cmake options...]
examples() {
    local name=$1
    shift
    step "examples ($name): configure and build"
    "$cmake" -S examples/c -B "$work/$name" -DCMAKE_PREFIX_PATH="$prefix" \
        -DCMAKE_BUILD_TYPE=Debug -DFLEETPROV_EMULATOR="$emulator" -DFLEETPROV_REQUIRE_OPENSSL=ON \
        -DFLEETPROV_REQUIRE_MOSQUITTO=ON -DFLEETPROV_REQUIRE_PKCS11=ON "$@" >/dev/null
    "$cmake" --build "$work/$name"
    step "examples ($name): ctest"
}

# Wall time of each ctest pass, printed at the end.
timings=()
timed_ctest() {
    local name=$1 t0 rc=0
    shift
    t0=$(date +%s)
    "$ctest" --test-dir "$work/$name" -j "$jobs" "$@" || rc=$?
    timings+=("$name: $(( $(date +%s) - t0 )) s")
    return "$rc"
}

contracts plain
contracts sanitize -DFLEETPROV_SANITIZE=address
contracts tsan -DFLEETPROV_SANITIZE=thread
contracts valgrind -DFLEETPROV_VALGRIND=ON

examples plain
timed_ctest plain --output-on-failure

examples sanitize -DFLEETPROV_SANITIZE=ON
timed_ctest sanitize --output-on-failure

examples valgrind -DFLEETPROV_VALGRIND=ON '-DFLEETPROV_CRASH_STEPS=certificate_created;verifying'
status=0
timed_ctest valgrind --output-on-failure -V > "$work/valgrind.log" 2>&1 || status=$?
grep -E '^[0-9]+/[0-9]+ Test|tests passed|FAILED' "$work/valgrind.log" || true
echo "valgrind runs: $(grep -c 'ERROR SUMMARY' "$work/valgrind.log")"
echo "  error summaries:"
grep -o 'ERROR SUMMARY: .*' "$work/valgrind.log" | sort | uniq -c | sed 's/^/    /'
echo "  leak summaries (per run):"
grep -oE '(definitely|indirectly|possibly) lost: .*|still reachable: .*' "$work/valgrind.log" \
    | sort | uniq -c | sed 's/^/    /'
if [ "$status" -ne 0 ]; then
    echo "valgrind run failed; its log:" >&2
    cat "$work/valgrind.log" >&2
    exit "$status"
fi

if [ "${FLEETPROV_RELEASE_VALGRIND:-0}" = 1 ]; then
    step "release library: build and install to $work/prefix-release"
    "$cmake" -S "$root" -B "$work/lib-release" -DCMAKE_BUILD_TYPE=Release \
        -DFLEETPROV_CARGO_TARGET_DIR="$target_dir" >/dev/null
    "$cmake" --build "$work/lib-release"
    "$cmake" --install "$work/lib-release" --prefix "$work/prefix-release" >/dev/null
    step "examples (release, valgrind): configure, build and ctest"
    "$cmake" -S examples/c -B "$work/release-valgrind" -DCMAKE_PREFIX_PATH="$work/prefix-release" \
        -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFLEETPROV_EMULATOR="$emulator" \
        -DFLEETPROV_VALGRIND=ON -DFLEETPROV_REQUIRE_OPENSSL=ON -DFLEETPROV_REQUIRE_MOSQUITTO=ON \
        -DFLEETPROV_REQUIRE_PKCS11=ON '-DFLEETPROV_CRASH_STEPS=certificate_created;verifying' \
        >/dev/null
    "$cmake" --build "$work/release-valgrind"
    timed_ctest release-valgrind --output-on-failure
fi

echo "ctest wall time per pass:"
printf '    %s\n' "${timings[@]}"
step "C side: all passed"
