#!/bin/bash
# vmrun vs the raw KVM loop (vcore/examples/rawkvm.rs, the physical limit) and
# vs QEMU, side by side in the same run, interleaved round by round.
#   bench/vmrun.sh [--linux] [RUNS] [N]
#     RUNS  runs per command, the median is printed (default 15; QEMU,
#           which takes seconds per run here, gets QRUNS, default 3)
#     N     port writes for P2 (default 20000)
#   --linux also runs P3, the minimal Linux guest to "Run /init" (minutes).
# P1 exec -> tiny guest -> exit, wall time.       goal <= 1.5x raw, <= 0.1x QEMU
# P2 one port-I/O exit: (t(N) - t(0)) / N.        goal <= 1.1x raw
# P3 vmrun start -> "Run /init" in the serial log (--linux).
# P4 VMM RSS minus guest RAM, tiny spinning guest, -m 256m and -m 1G.
#                                                 goal <= 3 MiB
# Builds vmrun and the rawkvm example in release (CARGO_TARGET_DIR honoured).
set -euo pipefail
cd "$(dirname "$0")/.."
LINUX=0
if [ "${1:-}" = --linux ]; then LINUX=1; shift; fi
RUNS=${1:-15}
N=${2:-20000}
QRUNS=${QRUNS:-3}

cargo build -q --release -p vmrun
cargo build -q --release -p vcore --example rawkvm
T=${CARGO_TARGET_DIR:-target}/release
VMRUN=$T/vmrun
RAW=$T/examples/rawkvm
QEMU=$(command -v qemu-system-x86_64 || true)

W=$(mktemp -d /tmp/bench-vmrun.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$W"
}
trap cleanup EXIT
for g in pio spin; do
    as --64 -I guests/tiny -o "$W/$g.o" "guests/tiny/$g.S"
    ld -m elf_x86_64 --no-warn-rwx-segments -T guests/tiny/link.ld -o "$W/$g.elf" "$W/$g.o"
done
QARGS=(-enable-kvm -nodefaults -display none -serial stdio
    -device isa-debug-exit,iobase=0x501,iosize=1 -m 64)

echo "host: $(uname -r), $(nproc) CPUs, kvm_pvm=$([ -d /sys/module/kvm_pvm ] && echo yes || echo no)"
echo "vmrun $($VMRUN --version | head -1); $($QEMU --version 2>/dev/null | head -1)"

# One candidate per function; check() runs it once and records its exit
# status or failure for the report.
declare -A TIMES FAIL
expect() { # expect STATUS CMD... : run CMD, fail unless it exits STATUS
    local want=$1 rc=0
    shift
    "$@" >"$W/out" 2>&1 </dev/null || rc=$?
    if [ "$rc" != "$want" ]; then
        echo "exit $rc (expected $want): $(tail -c 300 "$W/out" | tr '\n' ' ')" >&2
        return 1
    fi
}
measure() { # measure FUNC... : RUNS interleaved rounds; TIMES[f] = "us us ..."
    local f s e
    for f in "$@"; do TIMES[$f]=""; done
    for f in "$@"; do # warm-up, and drop what fails
        if ! "$f" 2>"$W/err"; then
            FAIL[$f]=$(cat "$W/err")
            echo "  $f FAILED: ${FAIL[$f]}"
        fi
    done
    for ((r = 0; r < RUNS; r++)); do
        for f in "$@"; do
            [ -n "${FAIL[$f]:-}" ] && continue
            [[ $f == q* ]] && ((r >= QRUNS)) && continue
            s=${EPOCHREALTIME/./}
            "$f" 2>/dev/null || true
            e=${EPOCHREALTIME/./}
            TIMES[$f]+="$((e - s)) "
        done
    done
}
median() { # median FUNC : median of TIMES[f] in microseconds
    tr ' ' '\n' <<<"${TIMES[$1]}" | grep . | sort -n |
        awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
ms() { awk -v a="$1" 'BEGIN {printf "%.2f", a / 1000}'; }

# --- P1 / P2 -----------------------------------------------------------------
v0() { expect 0 "$VMRUN" -m 64 -kernel "$W/pio.elf" -serial none; }
r0() { expect 0 "$RAW" "$W/pio.elf"; }
# The raw loop plus the in-kernel irqchip and PIT vmrun needs for Linux:
# KVM takes milliseconds to create and destroy them.
i0() { expect 0 "$RAW" --irqchip "$W/pio.elf"; }
q0() { expect 1 "$QEMU" "${QARGS[@]}" -kernel "$W/pio.elf"; }
vN() { expect 0 "$VMRUN" -m 64 -kernel "$W/pio.elf" -serial none -append "$N"; }
rN() { expect 0 "$RAW" "$W/pio.elf" "$N"; }
# QEMU boots SeaBIOS first (seconds here, varying): it gets 10*N writes.
qN() { expect 1 "$QEMU" "${QARGS[@]}" -kernel "$W/pio.elf" -append "$((N * 10))"; }
cands=(v0 r0 i0 vN rN)
[ -n "$QEMU" ] && cands+=(q0 qN)
echo
echo "P1/P2: $RUNS interleaved runs each, median wall time; guest guests/tiny/pio.S, N=$N writes to port 0x1234"
measure "${cands[@]}"
for f in "${cands[@]}"; do [ -z "${FAIL[$f]:-}" ] && printf "  %-3s median %9s ms\n" "$f" "$(ms "$(median "$f")")"; done
V0=$(median v0) R0=$(median r0) I0=$(median i0)
echo
printf "P1 exec->exit     vmrun %8s ms   raw %8s ms   x%s (goal <= 1.5)\n" "$(ms "$V0")" "$(ms "$R0")" "$(ratio "$V0" "$R0")"
printf "P1 exec->exit     vmrun %8s ms   raw+irqchip+PIT %8s ms   x%s\n" "$(ms "$V0")" "$(ms "$I0")" "$(ratio "$V0" "$I0")"
if [ -n "$QEMU" ] && [ -z "${FAIL[q0]:-}" ]; then
    Q0=$(median q0)
    printf "P1 exec->exit     vmrun %8s ms  QEMU %8s ms   x%s (goal <= 0.1)\n" "$(ms "$V0")" "$(ms "$Q0")" "$(ratio "$V0" "$Q0")"
else
    echo "P1 QEMU: not measured: ${FAIL[q0]:-qemu-system-x86_64 not installed}"
fi
VX=$(awk -v a="$(median vN)" -v b="$V0" -v n="$N" 'BEGIN {printf "%.3f", (a - b) / n}')
RX=$(awk -v a="$(median rN)" -v b="$R0" -v n="$N" 'BEGIN {printf "%.3f", (a - b) / n}')
printf "P2 per port exit  vmrun %8s us   raw %8s us   x%s (goal <= 1.1)\n" "$VX" "$RX" "$(ratio "$VX" "$RX")"
if [ -n "$QEMU" ] && [ -z "${FAIL[q0]:-}${FAIL[qN]:-}" ]; then
    QX=$(awk -v a="$(median qN)" -v b="$Q0" -v n="$((N * 10))" 'BEGIN {printf "%.3f", (a - b) / n}')
    printf "P2 per port exit  vmrun %8s us  QEMU %8s us   x%s\n" "$VX" "$QX" "$(ratio "$VX" "$QX")"
fi

# --- P4 ------------------------------------------------------------------------
# overhead PID MEM_MIB: Rss of every mapping but the guest RAM (mappings of
# MEM_MIB to MEM_MIB+4 MiB), in KiB, and the guest RAM's Rss.
# Also the anonymous part (heap, stacks; the rest is file pages: the binary
# and its libraries, shared with other processes running them).
overhead() {
    awk -v lo=$(($2 * 1024)) -v hi=$((($2 + 4) * 1024)) '
        /^Size:/ {size = $2; guest = (size >= lo && size <= hi)}
        /^Rss:/  {if (guest) {g += $2; n++} else o += $2}
        /^Anonymous:/ {if (!guest) p += $2}
        END {printf "%d %d %d %d\n", o, g, n, p}' "/proc/$1/smaps"
}
spin_rss() { # spin_rss MEM_MIB CMD... : start CMD, wait for "spinning", measure
    local mem=$1 log="$W/spin.log" pid i
    shift
    rm -f "$log"
    "$@" >"$log" 2>&1 </dev/null &
    pid=$!
    PIDS+=("$pid")
    for ((i = 0; i < 600; i++)); do
        [ "$1" = "$RAW" ] && sleep 0.5 && echo spinning >"$log" # prints nothing
        grep -q spinning "$log" 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    if grep -q spinning "$log" 2>/dev/null; then
        sleep 0.3
        overhead "$pid" "$mem"
    else
        echo "FAILED: $(tail -c 300 "$log" | tr '\n' ' ')"
    fi
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
echo
echo "P4: VMM RSS minus guest RAM while guests/tiny/spin.S runs (/proc/PID/smaps)"
mib() { awk -v k="$1" 'BEGIN {printf "%.2f", k / 1024}'; }
echo "   (MiB of Rss outside guest RAM; in brackets the anonymous part)"
for m in 256 1024; do
    read -r vo vg vn vp < <(spin_rss $m "$VMRUN" -m ${m}M -kernel "$W/spin.elf" -serial stdio)
    read -r ro _ _ rp < <(spin_rss 64 "$RAW" "$W/spin.elf") # raw: always 64 MiB
    line=$(printf "P4 -m %4sM  vmrun %5s (%4s)  raw %5s (%4s)" $m "$(mib "$vo")" "$(mib "$vp")" "$(mib "$ro")" "$(mib "$rp")")
    if [ -n "$QEMU" ]; then
        q=$(spin_rss $m "$QEMU" "${QARGS[@]/#64/$m}" -kernel "$W/spin.elf")
        if [[ $q == FAILED* ]]; then
            line+="  QEMU $q"
        else
            read -r qo _ _ qp <<<"$q"
            line+=$(printf "  QEMU %5s (%4s)  vmrun/QEMU x%s" "$(mib "$qo")" "$(mib "$qp")" "$(ratio "$vo" "$qo")")
        fi
    fi
    echo "$line  goal <= 3 MiB; guest RAM Rss $vg KiB in $vn mapping(s)"
done

# --- P3 ------------------------------------------------------------------------
[ "$LINUX" = 1 ] || exit 0
G=${GUEST_DIR:-build/guest}
[ -f /work/main/build/guest/bzImage ] && [ ! -f "$G/bzImage" ] && G=/work/main/build/guest
[ -f "$G/bzImage" ] || { echo "P3: $G/bzImage missing: run scripts/build-guest.sh"; exit 1; }
INITRD=$G/initramfs.cpio
[ -f "$INITRD" ] || INITRD=$G/initramfs.cpio.gz
to_init() { # to_init CMD... : seconds from start to "Run /init" in the serial log
    local log="$W/linux.log" pid s e i
    rm -f "$log"
    s=${EPOCHREALTIME/./}
    "$@" >"$W/linux.err" 2>&1 </dev/null &
    pid=$!
    PIDS+=("$pid")
    for ((i = 0; i < 12000; i++)); do # 10 minutes
        if grep -q "Run /init" "$log" 2>/dev/null; then
            e=${EPOCHREALTIME/./}
            awk -v t=$((e - s)) 'BEGIN {printf "%.1f s\n", t / 1e6}'
            break
        fi
        # QEMU stays alive, paused, after a KVM internal error.
        if ! kill -0 "$pid" 2>/dev/null || grep -q "internal error" "$W/linux.err"; then
            sleep 0.2
            echo "FAILED after $(awk -v t=$((${EPOCHREALTIME/./} - s)) 'BEGIN {printf "%.1f", t / 1e6}') s:" \
                "$(grep -a -i -A2 "error" "$W/linux.err" | head -3 | tr '\n' ' ' | cut -c1-200)"
            echo "  last serial line: $(tail -n1 "$log" 2>/dev/null | cut -c1-120)"
            break
        fi
        sleep 0.05
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
APPEND="console=ttyS0 panic=-1 reboot=k"
echo
echo "P3: $G/bzImage + $(basename "$INITRD"), -m 256m, 1 vCPU, to 'Run /init' in the serial log"
echo "P3 vmrun: $(to_init "$VMRUN" -m 256m -kernel "$G/bzImage" -initrd "$INITRD" \
    -append "$APPEND" -no-reboot -serial "file:$W/linux.log")"
if [ -n "$QEMU" ]; then
    echo "P3 QEMU:  $(to_init "$QEMU" -enable-kvm -nodefaults -display none -m 256 -kernel "$G/bzImage" \
        -initrd "$INITRD" -append "$APPEND" -no-reboot -serial "file:$W/linux.log")"
fi
