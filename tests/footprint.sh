#!/usr/bin/env bash
# Prints the size of the stripped release cdylib (and staticlib), the footprint firmware pays.
#   bash tests/footprint.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p fleetprov --lib >/dev/null
lib=target/release/libfleetprov.so
stripped=$(mktemp)
trap 'rm -f "$stripped"' EXIT
strip -o "$stripped" "$lib"
size=$(stat -c %s "$stripped")
printf 'stripped cdylib: %d bytes (%.2f MB)   [%s, opt-level=%s, panic=unwind]\n' \
    "$size" "$(awk "BEGIN{print $size/1000000}")" "$lib" \
    "$(sed -n '/^\[profile.release\]/,/^\[/s/^opt-level = //p' Cargo.toml | tr -d '"')"
printf 'staticlib (unstripped archive): %d bytes\n' "$(stat -c %s target/release/libfleetprov.a)"
target=1500000
if [ "$size" -le "$target" ]; then
    echo "target 1.5 MB: met"
else
    printf 'target 1.5 MB: missed by %d bytes (%.0f%%)\n' "$((size - target))" "$(awk "BEGIN{print ($size-$target)*100/$target}")"
fi
