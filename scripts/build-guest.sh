#!/bin/bash
# Build the minimal Linux test guest: a kernel from Debian's linux-source-6.1
# with guests/linux/minimal.config, and a busybox-static initramfs.
#
# Output (in OUT, default build/guest): bzImage, vmlinux, initramfs.cpio.
# The kernel is cached in CACHE (default /var/cache/vtools/guest/<hash>) by the
# hash of the config fragment, so a second run takes seconds.
#
# Needs: linux-source-6.1 busybox-static bc flex bison libelf-dev cpio xz-utils
# (scripts/install-deps.sh installs them).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$here/build/guest}
frag=$here/guests/linux/minimal.config
src_tar=/usr/src/linux-source-6.1.tar.xz
hash=$( (cat "$frag"; ls "$src_tar" 2>/dev/null; stat -c %s "$src_tar" 2>/dev/null) | sha256sum | cut -c1-16)
cache=${CACHE:-/var/cache/vtools/guest}/$hash
mkdir -p "$out"

if [ ! -f "$cache/bzImage" ] || [ ! -f "$cache/vmlinux" ]; then
    [ -f "$src_tar" ] || { echo "build-guest: $src_tar not found; install linux-source-6.1" >&2; exit 1; }
    work=$(mktemp -d /var/tmp/vtools-kernel.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    echo "build-guest: building the test kernel in $work (about 3 minutes on 2 cores)" >&2
    tar -C "$work" -xf "$src_tar"
    ksrc=$(echo "$work"/linux-source-6.1)
    make -C "$ksrc" -s tinyconfig
    "$ksrc/scripts/kconfig/merge_config.sh" -m -O "$ksrc" "$ksrc/.config" "$frag" >/dev/null
    make -C "$ksrc" -s olddefconfig
    # Every =y line of the fragment must have survived olddefconfig.
    missing=0
    while read -r line; do
        case "$line" in CONFIG_*=y) grep -qx "$line" "$ksrc/.config" || { echo "build-guest: $line did not take" >&2; missing=1; } ;; esac
    done < "$frag"
    [ "$missing" = 0 ] || exit 1
    make -C "$ksrc" -s -j"$(nproc)" bzImage
    mkdir -p "$cache"
    cp "$ksrc/arch/x86/boot/bzImage" "$ksrc/vmlinux" "$ksrc/.config" "$cache/"
fi
cp "$cache/bzImage" "$cache/vmlinux" "$out/"
cp "$cache/.config" "$out/kernel.config"

# initramfs: busybox-static and the init script.
bb=/bin/busybox
[ -x "$bb" ] || { echo "build-guest: busybox not found; install busybox-static" >&2; exit 1; }
root=$(mktemp -d)
mkdir -p "$root"/{bin,dev,proc,sys,tmp}
cp "$bb" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
cp "$here/guests/linux/init" "$root/init"
# Uncompressed: the guest kernel unpacks it without inflating (inflate in an
# emulated guest kernel costs minutes on nested PVM hosts).
(cd "$root" && find . | cpio -o -H newc --quiet) > "$out/initramfs.cpio"
rm -rf "$root"
echo "build-guest: $out/bzImage $out/vmlinux $out/initramfs.cpio" >&2
