#!/bin/bash
# vimg vs qemu-img, side by side on the same files, in one run.
# Prints each command's median wall time (of RUNS runs) for both tools and
# the ratio vimg/qemu-img (< 1.0 = vimg faster), the same for CPU time, and
# the lowest and highest wall-time ratio of the run pairs.
#
# Usage: bench/vimg.sh [WORKDIR]      (needs ~16 GiB free; RUNS=3 by default)
#        ONLY='convert -O|compare' RUNS=5 bench/vimg.sh   (some rows only)
#        SETTLE=5 ONLY='convert -O' bench/vimg.sh  (converts onto fresh memory)
#        VIMG=/path/to/vimg bench/vimg.sh
# Builds target/release/vimg if VIMG is not set.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
DIR=${1:-/tmp/vimg-bench}
if [ -z "${VIMG:-}" ]; then
    cargo build --release -q -p vimg
    VIMG=$PWD/target/release/vimg
fi
QEMU_IMG=${QEMU_IMG:-qemu-img}
command -v "$QEMU_IMG" >/dev/null || { echo "qemu-img not found" >&2; exit 1; }
mkdir -p "$DIR"
cd "$DIR"
echo "# $($QEMU_IMG --version | head -1); vimg $($VIMG --version | awk '{print $2}'); $(nproc) CPUs; $(date -u +%F)"

# Test data (made once).
if [ ! -f rnd.bin ]; then head -c $((64 << 20)) /dev/urandom > rnd.bin; fi
if [ ! -f src.raw ]; then
    truncate -s 20G src.raw
    for i in $(seq 0 511); do
        dd if=rnd.bin of=src.raw bs=1M count=1 skip=$((i % 64)) seek=$((i * 40)) conv=notrunc status=none
    done
fi
[ -f img.qcow2 ] || "$QEMU_IMG" convert -f raw -O qcow2 src.raw img.qcow2
if [ ! -f full4g.raw ]; then for i in $(seq 1 64); do cat rnd.bin; done > full4g.raw; fi
[ -f full4g.qcow2 ] || "$QEMU_IMG" convert -f raw -O qcow2 full4g.raw full4g.qcow2
if [ ! -f text1g.raw ]; then
    awk 'BEGIN { for (i = 0; i < 21474836; i++) printf "line %08d of some fairly compressible text data\n", i }' |
        head -c $((1 << 30)) > text1g.raw || true
fi

# One timed run of "$@" (after running `pre`), REP back-to-back
# invocations: prints "wall cpu" seconds per invocation.
REP=1 WARM=0
timed() {
    local pre=$1; shift
    eval "$pre"
    local t0 t1
    t0=$(date +%s%N)
    /usr/bin/time -f "%U %S" -o /tmp/vimg-bench-time bash -c \
        'for i in $(seq '"$REP"'); do "$@" >/dev/null 2>&1 || echo "FAILED: $*" >&2; done' _ "$@"
    t1=$(date +%s%N)
    awk -v w="$((t1 - t0))" -v r="$REP" '{printf "%.4f %.4f\n", w / 1e9 / r, ($1 + $2) / r}' /tmp/vimg-bench-time
}

# Median (by wall time) of RUNS runs per tool, the tools alternating run by
# run so that both see the same load. ONLY=REGEX runs just the rows whose
# name matches.
#
# Convert rows (WARM=1) run each tool once unmeasured before each measured
# run: a measured run then follows a run of the same tool, never the other
# tool's. On this kvm_pvm guest the cost of writing a 4 GiB target depends
# on the page cache the previous run freed (pages the kernel just freed are
# reused cheaply; pages it already returned to the hypervisor, through free
# page reporting, fault in again slowly), so following the other tool
# would charge one tool for the other's footprint. SETTLE=N sleeps N
# seconds after the output's removal and `sync` before each measured run:
# freed memory has gone back to the hypervisor, every page is fresh.
row() {
    local name=$1 pre=$2; shift 2
    if [ -n "${ONLY:-}" ] && ! [[ $name =~ $ONLY ]]; then return; fi
    local qs=() vs=() settle=""
    if [ "$WARM" = 1 ] && [ -n "${SETTLE:-}" ]; then settle="; sleep $SETTLE"; fi
    for _ in $(seq "$RUNS"); do
        if [ "$WARM" = 1 ]; then timed "$pre" "$QEMU_IMG" "$@" >/dev/null; fi
        qs+=("$(timed "$pre$settle" "$QEMU_IMG" "$@")")
        if [ "$WARM" = 1 ]; then timed "$pre" "$VIMG" "$@" >/dev/null; fi
        vs+=("$(timed "$pre$settle" "$VIMG" "$@")")
    done
    local mid=$(( (RUNS + 1) / 2 )) q v i spread
    q=$(printf '%s\n' "${qs[@]}" | sort -n | sed -n "${mid}p")
    v=$(printf '%s\n' "${vs[@]}" | sort -n | sed -n "${mid}p")
    # Wall-time ratio of each run pair (same minute): lowest and highest.
    spread=$(for i in "${!qs[@]}"; do
        echo "${vs[$i]%% *} / ${qs[$i]%% *}" | bc -l
    done | sort -n | sed -n '1p;$p' | xargs printf '%.2f ' | sed 's/ $//; s/ /-/')
    set -- $q $v
    printf '%-46s %8.4f %8.4f %6.2f | %7.3f %7.3f %6.2f | %s\n' "$name" "$1" "$3" \
        "$(echo "$3 / $1" | bc -l)" "$2" "$4" "$(echo "($4 + 0.0005) / ($2 + 0.0005)" | bc -l)" "$spread"
}

printf '%-46s %8s %8s %6s | %7s %7s %6s | %s\n' "command (wall s | cpu s | run ratios)" "qemu-img" "vimg" "ratio" "qemu" "vimg" "ratio" "min-max"
REP=20
row "info img.qcow2 (20G, 512M data)" ":" info img.qcow2
row "check img.qcow2" ":" check img.qcow2
row "map --output=json img.qcow2" ":" map --output=json img.qcow2
REP=1 WARM=0
row "create -o preallocation=metadata 200G" "rm -f m200.qcow2" create -q -f qcow2 -o preallocation=metadata m200.qcow2 200G
"$QEMU_IMG" create -q -f qcow2 -o preallocation=metadata m200.qcow2 200G
REP=5
row "check m200.qcow2 (3.2M clusters)" ":" check m200.qcow2
REP=1 WARM=1
row "convert -O raw full4g.qcow2 (4G allocated)" "rm -f out.raw; sync" convert -O raw full4g.qcow2 out.raw
row "convert -O qcow2 full4g.raw" "rm -f out.qcow2; sync" convert -f raw -O qcow2 full4g.raw out.qcow2
row "convert -t none -O raw full4g.qcow2 (O_DIRECT)" "rm -f out.raw; sync" convert -t none -O raw full4g.qcow2 out.raw
row "convert -O raw img.qcow2 (sparse)" "rm -f out.raw; sync" convert -O raw img.qcow2 out.raw
row "convert -c -O qcow2 text1g.raw (zlib)" "rm -f out.qcow2; sync" convert -c -f raw -O qcow2 text1g.raw out.qcow2
row "convert -c zstd text1g.raw" "rm -f out.qcow2; sync" convert -c -f raw -O qcow2 -o compression_type=zstd text1g.raw out.qcow2
WARM=0
row "compare -f raw -F qcow2 src.raw img.qcow2" ":" compare -f raw -F qcow2 src.raw img.qcow2
rm -f out.raw out.qcow2 m200.qcow2
