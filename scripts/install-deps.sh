#!/bin/bash
# Install what building, the test guest and the tests need on Debian 12.
# Idempotent: a second run only checks. Run as root (or with sudo).
set -euo pipefail
pkgs=(linux-source-6.1 busybox-static bc flex bison libelf-dev cpio xz-utils gcc make zlib1g-dev pkg-config
      binutils e2fsprogs util-linux fdisk dosfstools mtools procps iproute2 qemu-system-x86 python3 dnsmasq-base passt nftables tcpdump)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# qemu-img 10 is the oracle of the image tests; bookworm has 7.2, its
# backports have 10. Add backports from the mirror this machine already uses.
qemu_major() { qemu-img --version 2>/dev/null | sed -n 's/^qemu-img version \([0-9]*\).*/\1/p'; }
if [ "$(qemu_major || echo 0)" -lt 10 ] 2>/dev/null || [ -z "$(qemu_major)" ]; then
    uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$uri" ] || uri=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    if [ -n "$uri" ]; then
        echo "Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" > /etc/apt/sources.list.d/vtools-backports.sources
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports qemu-utils >/dev/null
    fi
    echo "install-deps: $(qemu-img --version | head -1)" >&2
fi
command -v cargo >/dev/null || { echo "install-deps: cargo not found; install Rust (rustup) first" >&2; exit 1; }
