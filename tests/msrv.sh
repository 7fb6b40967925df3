#!/usr/bin/env bash
# Builds the library (rlib, cdylib and staticlib) with the oldest Rust it supports, the
# `rust-version` of Cargo.toml, so that nothing newer slips in: a std API newer than it is also
# refused by clippy (incompatible_msrv), but a language feature only a build can catch.
#   bash tests/msrv.sh
# Installs that toolchain with rustup (profile minimal) when it is missing. Its own target
# directory (target/msrv), so the ordinary builds are left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
msrv=$(sed -n 's/^rust-version = "\([0-9.]*\)"$/\1/p' Cargo.toml | head -n 1)
[ -n "$msrv" ] || { echo "no rust-version in Cargo.toml" >&2; exit 1; }
if ! rustup run "$msrv" rustc --version >/dev/null 2>&1; then
    rustup toolchain install "$msrv" --profile minimal
fi
rustup run "$msrv" rustc --version
started=$(date +%s)
cargo +"$msrv" build --locked -p fleetprov --lib --target-dir target/msrv
# The smallest build too: host API only (no built-in transport, no CBOR).
cargo +"$msrv" build --locked -p fleetprov --lib --target-dir target/msrv --no-default-features \
    --features wipe-heap
echo "the library builds with Rust $msrv, with its default features and without its optional ones ($(( $(date +%s) - started )) s)"
