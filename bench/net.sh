#!/bin/bash
# virtio-net: frames per second and throughput through the tap backend path.
#
# Part 1, the device path alone (no guest, no KVM): vcore/examples/netbench.rs
# drives vmrun's virtio-net queue handler (vcore::devices::virtio::serve with
# NetHandler) over a driver-side ring in memory and a real tap:
#   tx 64 / tx 1514   a full 256-entry TX ring of Ethernet frames into the tap
#   tso               64 KiB TCP/IPv4 GSO frames passed through (HOST_TSO4)
#   rx 64 / rx 1514   a packet-socket generator floods the tap's host side;
#                     the device fills 256 mergeable 1536-byte RX buffers
#   passt-tx, passt-rx  the same through passt (user mode): UDP to the gateway
#                     counted on the host's loopback; UDP from the host into
#                     passt's forwarded port
# QEMU has no such harness, so part 1 has no QEMU column.
#
# Part 3 (below): the same tiny guest over passt, vmrun and QEMU each with
# -netdev stream to a fresh passt.
#
# Part 2, side by side with QEMU: the same tiny guest (guests/tiny/netbench.S,
# polling, one vCPU, 64 MiB) under vmrun and under qemu-system-x86_64
# -netdev tap,vhost=off (QEMU's userspace virtio-net, like vmrun's) on the
# same persistent tap: TX of 64- and 1514-byte frames with a full ring, and
# RX of 64- and 1514-byte frames from the packet generator. Times are taken
# on the host between the guest's "go" and "done" serial lines. A Linux
# guest cannot be used: on this host QEMU stops Linux with "KVM internal
# error" (nested kvm_pvm), and Linux boots take 80+ s under vmrun.
#
# Everything runs as root in a network namespace of its own (deleted at the
# end), with IPv6 off so the kernel adds no frames of its own.
#
# Usage: bench/net.sh [COUNT] [GCOUNT]  (defaults 500000 frames for part 1,
#        200000 for the guests)
# Env: RUNS (3: best of), QEMU (qemu-system-x86_64), PARTS (123: which parts)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
count=${1:-500000}
gcount=${2:-200000}
runs=${RUNS:-3}
qemu=${QEMU:-qemu-system-x86_64}
if [ "$(id -u)" != 0 ]; then
    echo "bench/net.sh: needs root (taps and network namespaces)" >&2
    exit 1
fi
cd "$here"
cargo build -q --release -p vmrun
cargo build -q --release -p vcore --example netbench
t=${CARGO_TARGET_DIR:-$here/target}
nb=$t/release/examples/netbench
vmrun=$t/release/vmrun
dir=$t/bench-net
mkdir -p "$dir"
as --64 -I guests/tiny -o "$dir/netbench.o" guests/tiny/netbench.S
ld -m elf_x86_64 --no-warn-rwx-segments -T guests/tiny/link.ld \
    -o "$dir/netbench.elf" "$dir/netbench.o"

ns=vtnetbench$$
ip netns add "$ns"
gen=""
cleanup() {
    [ -n "$gen" ] && kill -- "-$gen" 2>/dev/null && wait "$gen" 2>/dev/null
    pkill -f "vtnetbench$$" 2>/dev/null || true
    rm -f "/tmp/vtnetbench$$.sock" "/tmp/vtnetbench$$.passt.log"
    ip netns del "$ns" || true
}
trap cleanup EXIT
inns() { ip netns exec "$ns" "$@"; }
inns sh -c 'echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6;
            echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6'

field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p"; }
# Seconds between the guest's "go" and "done" lines of a VMM's output.
timed() {
    local t0="" l
    { "$@" 2>/dev/null || true; } | while IFS= read -r l; do
        l=${l%$'\r'}
        case $l in
        *go) t0=$EPOCHREALTIME ;;
        done) [ -n "$t0" ] && awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.4f\n", b-a}' ;;
        esac
    done
}
# Interleaved runs (vmrun, QEMU, vmrun, ...) so both see the same host
# load; the lowest time of each. Sets sv and sq.
compare() { # CMDLINE
    local s
    sv=""; sq=""
    for _ in $(seq "$runs"); do
        s=$(timed run_vmrun "$1")
        [ -z "$s" ] && echo "bench/net.sh: vmrun \"$1\" gave no timing" >&2
        if [ -n "$s" ] && { [ -z "$sv" ] || awk "BEGIN{exit !($s < $sv)}"; }; then sv=$s; fi
        [ -z "$qemu" ] && continue
        s=$(timed run_qemu "$1")
        [ -z "$s" ] && echo "bench/net.sh: qemu \"$1\" gave no timing" >&2
        if [ -n "$s" ] && { [ -z "$sq" ] || awk "BEGIN{exit !($s < $sq)}"; }; then sq=$s; fi
    done
}
# A table of tiny-guest rows, vmrun vs QEMU: "t SIZE" transmits, "r SIZE"
# receives what `start_gen SIZE` (defined by each part) sends.
guest_table() {
    local d z cmd
    printf '%-4s %6s %10s %14s %14s %7s\n' dir size frames vmrun_fps qemu_fps ratio
    for m in "$@"; do
        read -r d z <<<"$m"
        if [ "$d" = t ]; then
            cmd="t $z $gcount"
        else
            cmd="r $gcount"
            start_gen "$z"
        fi
        compare "$cmd"
        if [ -n "$gen" ]; then kill -- "-$gen"; wait "$gen" 2>/dev/null || true; gen=""; fi
        awk -v d="$d" -v z="$z" -v n="$gcount" -v a="${sv:-0}" -v b="${sq:-0}" 'BEGIN{
            fv = a > 0 ? n / a : 0; fq = b > 0 ? n / b : 0
            printf "%-4s %6s %10d %14.0f %14.0f %7s\n", (d == "t" ? "tx" : "rx"), z, n, fv, fq,
                (fq > 0 ? sprintf("%.2f", fv / fq) : "-") }'
    done
}
# An interface with a default route: passt copies its addresses from it.
inns ip link set lo up
inns ip link add pb0 type veth peer name pb1
inns ip addr add 10.99.0.2/24 dev pb0
inns ip link set pb0 up
inns ip link set pb1 up
inns ip route add default via 10.99.0.1

parts=${PARTS:-123}
if [[ $parts == *1* ]]; then
echo "== part 1: vmrun's virtio-net device path over a tap (no guest), best of $runs"
printf '%-8s %6s %10s %12s %9s  %s\n' mode size frames frames/s Gbit/s notes
modes=("tx 64" "tx 1514" "tso 0" "rx 64" "rx 1514")
command -v passt >/dev/null && modes+=("passt-tx 64" "passt-tx 1514" "passt-rx 64" "passt-rx 1400")
for m in "${modes[@]}"; do
    set -- $m
    best=""; line=""
    for _ in $(seq "$runs"); do
        c=$count; [ "$1" = tso ] && c=$((count / 10))
        l=$(inns "$nb" "$1" -i nbt0 -c "$c" -s "${2/#0/64}")
        f=$(echo "$l" | field fps)
        if [ -z "$best" ] || [ "$f" -gt "$best" ]; then best=$f; line=$l; fi
    done
    notes=$(echo "$line" | sed 's/.* gbit=[^ ]* *//')
    printf '%-8s %6s %10s %12s %9s  %s\n' "$1" "$(echo "$line" | field size)" \
        "$(echo "$line" | field frames)" "$best" "$(echo "$line" | field gbit)" "$notes"
done

fi

if [[ $parts == *2* ]]; then
echo
if command -v "$qemu" >/dev/null; then
    echo "== part 2: tiny guest, vmrun vs QEMU $($qemu --version | head -1 | awk '{print $4}') (-netdev tap,vhost=off), best of $runs"
else
    echo "== part 2: tiny guest, vmrun only: $qemu is not installed (no QEMU column), best of $runs"
    qemu=""
fi
inns ip tuntap add dev gbt0 mode tap vnet_hdr
inns ip link set gbt0 up

run_vmrun() {
    inns timeout 300 "$vmrun" -m 64 -kernel "$dir/netbench.elf" -append "$1" \
        -netdev tap,id=n0,ifname=gbt0,script=no,downscript=no -device virtio-net-pci,netdev=n0
}
run_qemu() {
    inns timeout 300 "$qemu" -accel kvm -m 64 -kernel "$dir/netbench.elf" -append "$1" \
        -nographic -no-reboot -device isa-debug-exit,iobase=0x501,iosize=1 \
        -netdev tap,id=n0,ifname=gbt0,script=no,downscript=no,vhost=off \
        -device virtio-net-pci,netdev=n0,disable-legacy=on,romfile=
}
# Receive rows take their frames from a generator on the host.
start_gen() { # SIZE; its own process group: `ip netns exec` forks, so kill the group.
    setsid ip netns exec "$ns" "$nb" gen -i gbt0 -s "$1" -c 0 2>/dev/null &
    gen=$!
}
guest_table "t 64" "t 1514" "r 64" "r 1514"
fi

[[ $parts == *3* ]] || exit 0
echo
# Part 3: the passt backend (user mode), the same tiny guest under vmrun
# (-netdev stream: vmrun's -netdev user backend without starting passt itself)
# and QEMU (-netdev stream), each connected to a fresh passt listening on a
# unix socket. TX: the guest's frames into passt (passt drops the non-IP
# ones after reading them); RX: a UDP sender on the host floods passt's
# forwarded port 5555 and passt turns each datagram into a frame.
if ! command -v passt >/dev/null; then
    echo "== part 3: skipped, passt is not installed"
    exit 0
fi
echo "== part 3: tiny guest over passt, vmrun vs QEMU (-netdev stream), best of $runs"
# passt drops to nobody: its socket and log go where nobody may write.
sock=/tmp/vtnetbench$$.sock
plog=/tmp/vtnetbench$$.passt.log
passt_up() {
    rm -f "$sock"
    inns passt --foreground --one-off --quiet --socket "$sock" --udp-ports 5555 \
        --log-file "$plog" >/dev/null 2>&1 &
    for _ in $(seq 50); do [ -S "$sock" ] && return; sleep 0.1; done
    echo "bench/net.sh: passt did not start (see $plog)" >&2
}
run_vmrun() {
    passt_up
    inns timeout 300 "$vmrun" -m 64 -kernel "$dir/netbench.elf" -append "$1" \
        -netdev "stream,id=n0,addr.type=unix,addr.path=$sock" -device virtio-net-pci,netdev=n0
}
run_qemu() {
    passt_up
    inns timeout 300 "$qemu" -accel kvm -m 64 -kernel "$dir/netbench.elf" -append "$1" \
        -nographic -no-reboot -device isa-debug-exit,iobase=0x501,iosize=1 \
        -netdev "stream,id=n0,server=off,addr.type=unix,addr.path=$sock" \
        -device virtio-net-pci,netdev=n0,disable-legacy=on,romfile=
}
start_gen() { # SIZE: UDP datagrams into passt's forwarded port, as fast as it goes
    setsid ip netns exec "$ns" python3 -c '
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
p = b"x" * (int(sys.argv[1]) - 42)
while True:
    try: s.sendto(p, ("127.0.0.1", 5555))
    except OSError: pass
' "$1" 2>/dev/null &
    gen=$!
}
guest_table "t 64" "t 1514" "r 64" "r 1400"
