#!/bin/bash
# P6 block I/O: 4 KiB request IOPS through vcore::image (vcore/examples/blkbench.rs,
# N requests in flight, no guest) against `qemu-img bench` with the same
# parameters on the same images, raw and qcow2, read and write.
#
# The access pattern is qemu-img bench's (it has no random mode): start at 0,
# advance by STEP, wrap at the end; STEP = 7919 * 4 KiB scatters the requests
# over the whole image. Images are preallocated (reads hit data, writes
# overwrite); each write run gets a fresh, synced copy. Cache modes writeback
# and none (O_DIRECT: blkbench -n, qemu-img bench -t none); thread-pool AIO
# for qemu-img (-i threads).
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

prep() { # a fresh, synced copy for write runs (no dirty pages from the copy)
    if [ "$op" = write ]; then
        cp --sparse=never "$dir/base.$fmt" "$dir/w.$fmt"
        sync "$dir/w.$fmt"
    fi
}

# Interleaved runs (vcore, qemu-img, vcore, ...) so both see the same host
# load; the best (lowest) time of each. Sets tv and tq.
compare() {
    tv=""; tq=""
    local t
    for _ in $(seq "$runs"); do
        prep
        t=$("$bb" "${nflag[@]}" "${args[@]}" "$img" | secs)
        if [ -z "$tv" ] || awk "BEGIN{exit !($t < $tv)}"; then tv=$t; fi
        prep
        t=$(qemu-img bench -t "$cache" -i threads "${args[@]}" "$img" | secs)
        if [ -z "$tq" ] || awk "BEGIN{exit !($t < $tq)}"; then tq=$t; fi
    done
}

qemu-img create -q -f raw -o preallocation=full "$dir/base.raw" "$size"
qemu-img create -q -f qcow2 -o preallocation=full "$dir/base.qcow2" "$size"

printf '%-10s %-6s %-5s %12s %12s %7s\n' cache format op vcore_IOPS qemu_IOPS ratio
for cache in writeback none; do
  nflag=(); [ "$cache" = none ] && nflag=(-n)
  for fmt in raw qcow2; do
    for op in read write; do
        img=$dir/base.$fmt
        w=()
        if [ "$op" = write ]; then
            w=(-w)
            img=$dir/w.$fmt
        fi
        args=(-c "$count" -d "$depth" -f "$fmt" -s 4096 -S "$step" "${w[@]}")
        compare
        awk -v m="$cache" -v f="$fmt" -v o="$op" -v c="$count" -v a="$tv" -v b="$tq" \
            'BEGIN{printf "%-10s %-6s %-5s %12.0f %12.0f %6.2fx\n", m, f, o, c/a, c/b, b/a}'
        rm -f "$dir/w.$fmt"
    done
  done
done
rm -f "$dir/base.raw" "$dir/base.qcow2"
