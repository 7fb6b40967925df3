#!/usr/bin/env bash
# Cross builds through CMake, for 64-bit ARM (aarch64-linux-gnu) and 32-bit ARMv7 hard-float
# (arm-linux-gnueabihf), each with its toolchain file from examples/cmake and nothing else:
#   - the library built (cargo, debug, --target derived from the toolchain) and installed;
#   - the install checked: libfleetprov.so.N and libfleetprov.a are the target's ELF machine,
#     the .pc file and the CMake package point at them (a program linked through each runs);
#   - the C examples built against the install with find_package(fleetprov) and the same
#     toolchain file, and a few of their ctest cases run under qemu-user against the native
#     emulator on loopback: provisioned (JSON, CBOR, static link), a rejection, a failed run
#     resumed, a run cancelled by SIGTERM then resumed; on aarch64 the installed `fleetprov`
#     command as well (provisioned, a rejection, SIGINT then resumed, rotated).
#
#   bash tests/cross.sh [VENV]      # from anywhere; VENV defaults to <repo>/.venv
#   FLEETPROV_CROSS_TOOLCHAINS="aarch64-linux-gnu" bash tests/cross.sh   # one target only
#
# Needs (Debian) gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf qemu-user and
# `rustup target add aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf` (.ci/run installs
# them); CMake from PyPI in VENV (created if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=${1:-${VENV:-$root/.venv}}
# step(), CMAKE_BUILD_PARALLEL_LEVEL, cmake_from_pypi.
. "$root/tests/lib.sh"
toolchains=${FLEETPROV_CROSS_TOOLCHAINS:-aarch64-linux-gnu arm-linux-gnueabihf}

# The cases run under qemu (examples/c/CMakeLists.txt's names).
tests="header_test_c;provision_ok;provision_cbor;provision_reject;provision_resume"
tests+=";provision_static_ok;provision_flash_cancel"
# The installed fleetprov command too, on one target: provisioned with --json and a second run a
# no-op, a rejection, SIGINT during the flow then a resumed run, a rotation.
cli_tests=";cli_ok;cli_reject;cli_interrupt;cli_rotate"
cli_toolchain=aarch64-linux-gnu

rust_target() {
    case $1 in
        aarch64-linux-gnu) echo aarch64-unknown-linux-gnu ;;
        arm-linux-gnueabihf) echo armv7-unknown-linux-gnueabihf ;;
        *) echo "unknown toolchain $1" >&2; return 1 ;;
    esac
}
elf_machine() {
    case $1 in
        aarch64-linux-gnu) echo AArch64 ;;
        arm-linux-gnueabihf) echo ARM ;;
    esac
}
qemu() {
    case $1 in
        aarch64-linux-gnu) echo qemu-aarch64 ;;
        arm-linux-gnueabihf) echo qemu-arm ;;
    esac
}

missing=()
installed=$(rustup target list --installed 2>/dev/null || true)
for t in $toolchains; do
    command -v "$t-gcc" >/dev/null 2>&1 || missing+=("$t-gcc (Debian: gcc-$t)")
    command -v "$(qemu "$t")" >/dev/null 2>&1 || missing+=("$(qemu "$t") (Debian: qemu-user)")
    grep -qx "$(rust_target "$t")" <<<"$installed" \
        || missing+=("Rust target $(rust_target "$t") (rustup target add $(rust_target "$t"))")
done
for tool in readelf pkg-config python3 cargo; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    printf 'missing: %s\n' "${missing[@]}" >&2
    exit 1
fi

cmake_from_pypi "$venv"

target_dir=${CARGO_TARGET_DIR:-$root/target}
step "fleetprov-emulator (native, cargo, debug)"
cargo build --locked -p fleetprov-emulator --bin fleetprov-emulator
emulator=$target_dir/debug/fleetprov-emulator

work=$(mktemp -d "${TMPDIR:-/tmp}/fleetprov-cross.XXXXXX")
trap 'rm -rf "$work"' EXIT
abi=$(sed -n 's/^#define FLEETPROV_ABI_VERSION \([0-9]*\)$/\1/p' include/fleetprov.h)
timings=()

for t in $toolchains; do
    toolchain=$root/examples/cmake/$t.cmake
    rt=$(rust_target "$t")
    machine=$(elf_machine "$t")
    prefix=$work/prefix-$t

    step "$t: library (cargo --target $rt, debug): configure, build, install to $prefix"
    t0=$(date +%s)
    "$cmake" -S "$root" -B "$work/lib-$t" -DCMAKE_TOOLCHAIN_FILE="$toolchain" \
        -DCMAKE_BUILD_TYPE=Debug -DFLEETPROV_CARGO_TARGET_DIR="$target_dir" >"$work/lib-$t.log"
    grep -F "Rust target $rt" "$work/lib-$t.log" \
        || { cat "$work/lib-$t.log"; echo "$t: Rust target $rt not derived" >&2; exit 1; }
    "$cmake" --build "$work/lib-$t"
    "$cmake" --install "$work/lib-$t" --prefix "$prefix" >/dev/null
    timings+=("$t library (configure, cargo build, install): $(( $(date +%s) - t0 )) s")

    step "$t: the installed library is $machine's"
    lib=$prefix/lib
    # cargo's output and the SONAME link next to it in the target's own directory.
    [ -f "$target_dir/$rt/debug/libfleetprov.so" ] && [ -L "$target_dir/$rt/debug/libfleetprov.so.$abi" ] \
        || { echo "no $target_dir/$rt/debug/libfleetprov.so(.$abi)" >&2; exit 1; }
    [ "$(readlink "$lib/libfleetprov.so")" = "libfleetprov.so.$abi" ] \
        || { echo "$lib/libfleetprov.so is not a link to libfleetprov.so.$abi" >&2; exit 1; }
    for f in "$lib/libfleetprov.so.$abi" "$lib/libfleetprov.a"; do
        m=$(readelf -h "$f" | sed -n 's/^ *Machine: *//p' | sort -u)
        echo "$(basename "$f"): $m"
        [ "$m" = "$machine" ] || { echo "$f: machine '$m', expected $machine" >&2; exit 1; }
    done
    readelf -d "$lib/libfleetprov.so.$abi" | grep -F "Library soname: [libfleetprov.so.$abi]"
    m=$(readelf -h "$prefix/bin/fleetprov" | sed -n 's/^ *Machine: *//p')
    echo "bin/fleetprov: $m"
    [ "$m" = "$machine" ] || { echo "bin/fleetprov: machine '$m', expected $machine" >&2; exit 1; }

    step "$t: pkg-config and the CMake package point at $lib"
    pc_libdir=$(PKG_CONFIG_LIBDIR=$lib/pkgconfig pkg-config --variable=libdir fleetprov)
    [ "$(realpath "$pc_libdir")" = "$(realpath "$lib")" ] \
        || { echo "fleetprov.pc: libdir $pc_libdir, expected $lib" >&2; exit 1; }
    # shellcheck disable=SC2046
    "$t-gcc" -std=c11 -Wall -Wextra -Werror -pedantic examples/c/header_test.c -o "$work/pc-$t" \
        $(PKG_CONFIG_LIBDIR=$lib/pkgconfig pkg-config --cflags --libs fleetprov)
    readelf -d "$work/pc-$t" | grep -F "Shared library: [libfleetprov.so.$abi]"
    "$(qemu "$t")" -L "/usr/$t" "$work/pc-$t"
    grep -E 'IMPORTED_LOCATION' "$lib/cmake/fleetprov/fleetprovConfig.cmake"

    step "$t: examples (find_package(fleetprov) from $prefix): configure and build"
    want=$tests
    if [ "$t" = "$cli_toolchain" ]; then
        want+=$cli_tests
    fi
    t0=$(date +%s)
    "$cmake" -S examples/c -B "$work/examples-$t" -DCMAKE_TOOLCHAIN_FILE="$toolchain" \
        -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Debug -DFLEETPROV_EMULATOR="$emulator" \
        -DFLEETPROV_EXAMPLE_TESTS="$want" >"$work/examples-$t.log" 2>&1 \
        || { cat "$work/examples-$t.log"; exit 1; }
    grep -E 'not built|no C\+\+' "$work/examples-$t.log" | sed 's/^/  /' || true
    "$cmake" --build "$work/examples-$t"
    # find_package resolved to this prefix, and the programs are the target's.
    grep -F "fleetprov_DIR:PATH=$lib/cmake/fleetprov" "$work/examples-$t/CMakeCache.txt"
    m=$(readelf -h "$work/examples-$t/provision" | sed -n 's/^ *Machine: *//p')
    [ "$m" = "$machine" ] || { echo "provision: machine '$m', expected $machine" >&2; exit 1; }
    timings+=("$t examples (configure, build): $(( $(date +%s) - t0 )) s")

    step "$t: ctest under $(qemu "$t") against the native emulator"
    # The programs run through the toolchain's CMAKE_CROSSCOMPILING_EMULATOR.
    "$ctest" --test-dir "$work/examples-$t" -N -V -R '^provision_ok$' \
        | grep -E -- "/$(qemu "$t")\" \"-L\" \"/usr/$t\" " \
        || { echo "provision_ok does not run under $(qemu "$t") -L /usr/$t" >&2; exit 1; }
    t0=$(date +%s)
    "$ctest" --test-dir "$work/examples-$t" -j "$CMAKE_BUILD_PARALLEL_LEVEL" --output-on-failure
    timings+=("$t ctest: $(( $(date +%s) - t0 )) s")
done

echo "wall time per part:"
printf '    %s\n' "${timings[@]}"
step "cross builds: all passed"
