#!/bin/bash
# P6 block I/O: 4 KiB request IOPS through vcore::image (vcore/examples/blkbench.rs,
# N requests in flight, no guest) against `qemu-img bench` with the same
# parameters on the same images, raw and qcow2, read and write.
#
# The access pattern is qemu-img bench's (it has no random mode): start at 0,
# advance by STEP, wrap at the end; STEP = 7919 * 4 KiB scatters the requests
# over the whole image. Images are preallocated (reads hit data, writes
# overwrite); each write run gets a fresh copy. Cache mode writeback, thread
# pool AIO for qemu-img.
#
# Usage: bench/blk.sh [COUNT] [DEPTH]   (defaults 100000 16)
# Env: BENCH_DIR (default target/bench-blk; must not be tmpfs), SIZE (1G), RUNS (3)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
count=${1:-100000}
depth=${2:-16}
size=${SIZE:-1G}
runs=${RUNS:-3}
step=$((7919 * 4096))
dir=${BENCH_DIR:-$here/target/bench-blk}
mkdir -p "$dir"
cargo build -q --release -p vcore --example blkbench
bb=${CARGO_TARGET_DIR:-$here/target}/release/examples/blkbench

secs() { sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p'; }

best() { # best (lowest) time of $runs runs of "$@"
    local b=""
    for _ in $(seq "$runs"); do
        t=$("$@" | secs)
        if [ -z "$b" ] || awk "BEGIN{exit !($t < $b)}"; then b=$t; fi
    done
    echo "$b"
}

qemu-img create -q -f raw -o preallocation=full "$dir/base.raw" "$size"
qemu-img create -q -f qcow2 -o preallocation=full "$dir/base.qcow2" "$size"

printf '%-6s %-5s %12s %12s %7s\n' format op vcore_IOPS qemu_IOPS ratio
for fmt in raw qcow2; do
    for op in read write; do
        img=$dir/base.$fmt
        w=()
        if [ "$op" = write ]; then
            w=(-w)
            cp --sparse=never "$dir/base.$fmt" "$dir/w.$fmt"
            img=$dir/w.$fmt
        fi
        args=(-c "$count" -d "$depth" -f "$fmt" -s 4096 -S "$step" "${w[@]}")
        tv=$(best "$bb" "${args[@]}" "$img")
        tq=$(best qemu-img bench -t writeback -i threads "${args[@]}" "$img")
        awk -v f="$fmt" -v o="$op" -v c="$count" -v a="$tv" -v b="$tq" \
            'BEGIN{printf "%-6s %-5s %12.0f %12.0f %6.2fx\n", f, o, c/a, c/b, b/a}'
        rm -f "$dir/w.$fmt"
    done
done
rm -f "$dir/base.raw" "$dir/base.qcow2"
