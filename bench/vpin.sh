#!/bin/bash
# vpin against the seed's manual session on a paused QEMU guest (-smp 2):
#   list: `ps -Tp PID -o tid,comm,psr` + `taskset -pc TID` per thread
#         vs `vpin list PID`
#   pin:  `taskset -pc CPU TID` per vCPU thread (TIDs from ps/grep)
#         vs `vpin pin PID vcpu0=.. vcpu1=..`
# Prints the mean wall time of N runs of each and the ratio.
# Usage: bench/vpin.sh [N]   (VPIN=path/to/vpin; default target/release/vpin,
# else target/debug/vpin)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
n=${1:-50}
vpin=${VPIN:-$here/target/release/vpin}
[ -x "$vpin" ] || vpin=$here/target/debug/vpin
[ -x "$vpin" ] || { echo "bench/vpin.sh: build vpin first (cargo build --release -p vpin)" >&2; exit 1; }
command -v qemu-system-x86_64 >/dev/null || { echo "bench/vpin.sh: needs qemu-system-x86_64" >&2; exit 1; }

dir=$(mktemp -d)
qemu-system-x86_64 -enable-kvm -smp 2 -S -m 64 -display none -name "vpinbench,debug-threads=on" \
    -qmp "unix:$dir/qmp.sock,server,nowait" -pidfile "$dir/pid" -daemonize 2>/dev/null
pid=$(cat "$dir/pid")
trap 'kill "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 50); do grep -q "CPU 1/KVM" /proc/"$pid"/task/*/comm 2>/dev/null && break; sleep 0.1; done
last=$(( $(nproc) - 1 ))

seed_list() {
    ps -Tp "$pid" -o tid=,comm=,psr= >/dev/null
    for t in $(ps -Tp "$pid" -o tid=); do taskset -pc "$t" >/dev/null; done
}
seed_pin() {
    for i in 0 1; do
        t=$(ps -Tp "$pid" -o tid=,comm= | awk -v c="CPU $i/KVM" '$0 ~ c {print $1}')
        taskset -pc "$((i % (last + 1)))" "$t" >/dev/null
    done
}
vpin_list() { "$vpin" list "$pid" >/dev/null; }
vpin_pin() { "$vpin" pin "$pid" vcpu0=0 "vcpu1=$((1 % (last + 1)))" >/dev/null; }

mean_ms() { # command
    local s e
    s=$(date +%s%N)
    for _ in $(seq "$n"); do "$@"; done
    e=$(date +%s%N)
    echo "scale=2; ($e - $s) / $n / 1000000" | bc
}

printf '%-6s %12s %12s %8s\n' task "seed ms" "vpin ms" "ratio"
for task in list pin; do
    a=$(mean_ms "seed_$task")
    b=$(mean_ms "vpin_$task")
    printf '%-6s %12s %12s %8s\n' "$task" "$a" "$b" "$(echo "scale=2; $a / $b" | bc)"
done
echo "($n runs each; vpin = $vpin; ratio > 1 means vpin is faster)"
