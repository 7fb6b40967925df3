#!/usr/bin/env bash
# Prints, per target, what the library costs firmware: the stripped release shared library, the
# C example `provision` linked statically (with --gc-sections, as fleetprov::fleetprov_static
# links it), and where the bytes of the shared library go, per crate.
#   bash tests/footprint.sh [TARGET...]
# TARGET is a Rust target triple; default: the host, then aarch64-unknown-linux-gnu and
# armv7-unknown-linux-gnueabihf when their Debian cross compilers (gcc-aarch64-linux-gnu,
# gcc-arm-linux-gnueabihf) and rustup targets are installed. Release builds (opt-level z, LTO):
# several minutes per target from cold. FLEETPROV_FEATURES="a,b" builds with
# --no-default-features --features a,b instead of the default features.
set -euo pipefail
cd "$(dirname "$0")/.."
host=$(rustc -vV | sed -n 's/^host: //p')
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=("$host")
    installed=$(rustup target list --installed 2>/dev/null || true)
    for t in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
        if grep -qx "$t" <<<"$installed"; then
            targets+=("$t")
        else
            echo "skipped $t: rustup target add $t" >&2
        fi
    done
fi
features=()
if [ -n "${FLEETPROV_FEATURES+x}" ]; then
    features=(--no-default-features --features "$FLEETPROV_FEATURES")
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
target_limit=1500000

# The GNU triple of a Rust target's Debian cross compiler (empty for the host).
gnu_prefix() {
    case "$1" in
        "$host") echo "" ;;
        aarch64-unknown-linux-gnu) echo "aarch64-linux-gnu-" ;;
        armv7-unknown-linux-gnueabihf) echo "arm-linux-gnueabihf-" ;;
        *) echo "no cross compiler known for $1" >&2; return 1 ;;
    esac
}

# Bytes per crate in a shared library with symbols: each defined symbol's size, attributed to
# the first path segment of its demangled name (ring's C and assembly: ring_core_*; what has no
# Rust path: "other"). With LTO, code inlined into another crate's function counts there.
per_crate() {
    local nm=$1 lib=$2
    "$nm" -S --size-sort -C --defined-only "$lib" | python3 -c '
import collections, re, sys
sizes = collections.Counter()
for line in sys.stdin:
    parts = line.split(None, 3)
    if len(parts) < 4:
        continue
    size, name = int(parts[1], 16), parts[3].strip()
    name = re.sub(r"^(<|&|dyn |impl )+", "", name)
    m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)::", name)
    if m:
        crate = m.group(1)
    elif name.startswith("fleetprov_"):
        crate = "fleetprov (C API)"
    elif re.match(r"(ring_core_|GFp_|aes_|gcm_|sha\d|ecp_|bn_|chacha|x25519|p256|p384|LIMBS|fiat_)", name):
        crate = "ring (C, assembly)"
    else:
        crate = "other"
    sizes[crate] += size
total = sum(sizes.values()) or 1
for crate, size in sizes.most_common(20):
    print(f"{size:10d}  {size * 100 / total:5.1f}%  {crate}")
'
}

for target in "${targets[@]}"; do
    prefix=$(gnu_prefix "$target")
    echo "== $target${features:+ (features: ${FLEETPROV_FEATURES:-none})}"
    args=(build --release --locked -p fleetprov --lib "${features[@]}")
    out=target/release
    if [ "$target" != "$host" ]; then
        command -v "${prefix}gcc" >/dev/null || { echo "skipped: no ${prefix}gcc" >&2; continue; }
        triple=${target//-/_}
        upper=$(tr '[:lower:]' '[:upper:]' <<<"$triple")
        export "CC_$triple=${prefix}gcc" "AR_$triple=${prefix}ar" \
            "CARGO_TARGET_${upper}_LINKER=${prefix}gcc"
        args+=(--target "$target")
        out=target/$target/release
    fi
    cargo "${args[@]}" >/dev/null 2>&1 || cargo "${args[@]}"
    lib=$out/libfleetprov.so
    "${prefix}strip" -o "$work/stripped" "$lib"
    size=$(stat -c %s "$work/stripped")
    printf 'stripped shared library: %d bytes (%.2f MB)\n' "$size" "$(awk "BEGIN{print $size/1000000}")"
    if [ "$size" -le "$target_limit" ]; then
        echo "  1.5 MB goal: met"
    else
        printf '  1.5 MB goal: missed by %d bytes (%.0f%%)\n' "$((size - target_limit))" \
            "$(awk "BEGIN{print ($size-$target_limit)*100/$target_limit}")"
    fi
    # A program with the library inside, as fleetprov::fleetprov_static links it.
    "${prefix}gcc" -std=c11 -O2 -D_POSIX_C_SOURCE=200809L -Iinclude examples/c/provision.c \
        examples/c/common.c "$out/libfleetprov.a" -lpthread -ldl -lm -Wl,--gc-sections \
        -o "$work/provision"
    "${prefix}strip" "$work/provision"
    printf 'provision example, static, stripped (--gc-sections): %d bytes\n' \
        "$(stat -c %s "$work/provision")"
    echo "where the shared library's bytes go (symbol sizes by crate, top 20):"
    per_crate "${prefix}nm" "$lib"
done
