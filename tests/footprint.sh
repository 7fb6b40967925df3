#!/usr/bin/env bash
# Prints the size of the stripped release cdylib (and staticlib), the footprint firmware pays, and
# of the C example `provision` linked statically, with and without --gc-sections.
#   bash tests/footprint.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p fleetprov --lib >/dev/null
lib=target/release/libfleetprov.so
work=$(mktemp -d)
stripped=$work/stripped
trap 'rm -rf "$work"' EXIT
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

# A program with the library inside: what `fleetprov::fleetprov_static` (which adds
# --gc-sections) links.
for gc in "" "-Wl,--gc-sections"; do
    cc -std=c11 -O2 -D_POSIX_C_SOURCE=200809L -Iinclude examples/c/provision.c examples/c/common.c \
        target/release/libfleetprov.a -lpthread -ldl -lm $gc -o "$work/provision"
    strip "$work/provision"
    printf 'provision example, static, stripped%s: %d bytes\n' "${gc:+ (with $gc)}" \
        "$(stat -c %s "$work/provision")"
done
