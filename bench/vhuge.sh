#!/bin/bash
# vhuge vs hugeadm (libhugetlbfs), side by side in the same run.
#   bench/vhuge.sh [RUNS]        (default 200; `set` rounds need root)
# Builds vhuge --release. The `set` rounds raise the 2 MiB pool by 64 pages
# and restore it; they hold /run/lock/vtools-hugepages.lock like the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-200}
cargo build -q --release -p vhuge
V=target/release/vhuge
command -v hugeadm >/dev/null || { echo "hugeadm not installed (apt-get install libhugetlbfs-bin)"; exit 1; }

ms() { # ms CMD... : mean wall time per run in ms over $RUNS runs
    local s e
    s=$(date +%s%N)
    for ((i = 0; i < RUNS; i++)); do "$@" >/dev/null 2>&1 || true; done
    e=$(date +%s%N)
    echo "scale=3; ($e - $s) / $RUNS / 1000000" | bc
}
row() { # row LABEL OURS PEER
    printf "%-34s %9s ms %9s ms   x%s\n" "$1" "$2" "$3" "$(echo "scale=2; $2 / $3" | bc)"
}
printf "%-34s %12s %12s   %s\n" "operation ($RUNS runs)" "vhuge" "hugeadm" "ratio"
row "status vs --pool-list" "$(ms $V status)" "$(ms hugeadm --pool-list)"
row "status --json vs --pool-list" "$(ms $V status --json)" "$(ms hugeadm --pool-list)"
row "plan --mem 4G vs --page-sizes" "$(ms $V plan --mem 4G)" "$(ms hugeadm --page-sizes)"

if [ "$(id -u)" = 0 ]; then
    exec 9>/run/lock/vtools-hugepages.lock
    flock 9
    orig=$(cat /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages)
    trap 'echo "$orig" > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages' EXIT
    up=$((orig + 64))
    setv() { $V set --size 2M "$up" && $V set --size 2M "$orig"; }
    seth() { hugeadm --pool-pages-min "2M:$up" && hugeadm --pool-pages-min "2M:$orig"; }
    RUNS=$((RUNS / 4))
    row "set +64 and back (2 writes)" "$(ms setv)" "$(ms seth)"
    test "$(cat /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages)" = "$orig"
fi
