#!/bin/bash
# Install, build, and boot the embedded default guest: the minimal Linux
# kernel and busybox initramfs built by scripts/build-guest.sh, 2 vCPUs,
# 256 MiB, serial console on this terminal.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build-guest.sh
cargo build --release --workspace --bins
target/release/vmrun --check-host
exec target/release/vmrun -name demo -smp 2 -m 256m \
    -kernel build/guest/bzImage -initrd build/guest/initramfs.cpio \
    -append "console=ttyS0 panic=-1 reboot=k" -nographic -no-reboot
