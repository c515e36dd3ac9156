#!/bin/bash
# P7: -mem-prealloc of guest RAM, time from exec to a running guest, vmrun
# against QEMU in the same run (interleaved, medians):
#   vmrun: tiny guest that exits at once (its exit comes after every page
#          was touched, so the time is prealloc + VM setup + teardown);
#   QEMU:  qemu-system-x86_64 -enable-kvm -m SIZE -mem-prealloc -S, quit
#          through its monitor as soon as it prompts.
# Anonymous memory, then 2 MiB hugetlbfs (-mem-path; root, pool raised for
# the run and restored after).
#   bench/prealloc.sh [SIZE] [RUNS]      defaults: 4G 5
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-4G}
RUNS=${2:-5}
cargo build -q --release -p vmrun
VMRUN=${CARGO_TARGET_DIR:-target}/release/vmrun
QEMU=$(command -v qemu-system-x86_64 || true)
W=$(mktemp -d /tmp/bench-prealloc.XXXXXX)
NR=/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
OLD_NR=$(cat "$NR" 2>/dev/null || echo 0)
cleanup() {
    umount "$W/huge" 2>/dev/null || true
    [ -w "$NR" ] && echo "$OLD_NR" > "$NR"
    rm -rf "$W"
}
trap cleanup EXIT
as --64 -I guests/tiny -o "$W/hello.o" guests/tiny/hello.S
ld -m elf_x86_64 --no-warn-rwx-segments -T guests/tiny/link.ld -o "$W/hello.elf" "$W/hello.o"

now() { echo "$EPOCHREALTIME"; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

run_vmrun() { # extra args...
    local t0 t1
    t0=$(now)
    "$VMRUN" -m "$SIZE" -mem-prealloc -kernel "$W/hello.elf" -serial null "$@" 2>/dev/null || [ $? = 42 ]
    t1=$(now)
    echo "$t1 - $t0" | bc -l
}
run_qemu() { # extra args...
    local t0 t1
    t0=$(now)
    echo quit | "$QEMU" -enable-kvm -m "$SIZE" -mem-prealloc -S -display none -nodefaults \
        -monitor stdio "$@" >/dev/null 2>&1 || true
    t1=$(now)
    echo "$t1 - $t0" | bc -l
}

bench() { # label, vmrun args, qemu args
    local label=$1 vargs=$2 qargs=$3 v=() q=()
    for _ in $(seq "$RUNS"); do
        # shellcheck disable=SC2086
        v+=("$(run_vmrun $vargs)")
        if [ -n "$QEMU" ]; then
            # shellcheck disable=SC2086
            q+=("$(run_qemu $qargs)")
        fi
    done
    local vm qm
    vm=$(printf '%s\n' "${v[@]}" | median)
    if [ -n "$QEMU" ]; then
        qm=$(printf '%s\n' "${q[@]}" | median)
        printf '%-28s vmrun %8.3f s   qemu %8.3f s   ratio %.2fx\n' "$label" "$vm" "$qm" "$(echo "$vm / $qm" | bc -l)"
    else
        printf '%-28s vmrun %8.3f s   (qemu-system-x86_64 not installed)\n' "$label" "$vm"
    fi
}

echo "P7 -mem-prealloc $SIZE, median of $RUNS, $(nproc) CPUs, load $(cut -d' ' -f1 /proc/loadavg)"
bench "anonymous" "" ""
if [ "$(id -u)" = 0 ] && [ -w "$NR" ]; then
    pages=$(( $(numfmt --from=iec "$SIZE") / 2097152 ))
    echo $((OLD_NR + pages + 8)) > "$NR"
    if [ "$(cat /sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages)" -ge "$pages" ]; then
        mkdir -p "$W/huge"
        mount -t hugetlbfs -o pagesize=2M none "$W/huge"
        bench "hugetlbfs 2M (-mem-path)" "-mem-path $W/huge" "-mem-path $W/huge"
    else
        echo "hugetlbfs: could not get $pages free 2 MiB pages; skipped"
    fi
else
    echo "hugetlbfs: needs root; skipped"
fi
