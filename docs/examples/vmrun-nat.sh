#!/bin/bash
# vmrun-nat.sh: a NAT network for vmrun guests, the shape of libvirt's
# "default" network: a bridge with a private subnet, dnsmasq handing out
# addresses (DHCP) and answering DNS, and an nftables masquerade rule so the
# guests reach the outside through the host's address. Guests on the bridge
# reach each other (also where br_netfilter passes bridged frames through
# nftables); connections from outside into the subnet are dropped.
#
# Usage (as root):
#   vmrun-nat.sh up   [-b BRIDGE] [-a ADDR/PREFIX] [-r FIRST,LAST] [-H MAC,IP]... [-o OUTIF]
#   vmrun-nat.sh down [-b BRIDGE]
#   vmrun-nat.sh status [-b BRIDGE]
#
#   -b BRIDGE     bridge name (default vmrun0)
#   -a ADDR/LEN   the host's address on the bridge = the guests' gateway
#                 (default 192.168.150.1/24)
#   -r FIRST,LAST DHCP range (default .100 to .199 of the subnet)
#   -H MAC,IP     a fixed address for a guest (repeatable)
#   -o OUTIF      masquerade only what leaves through OUTIF (default: any
#                 interface but the bridge)
#
# Then:
#   vmrun -m 512m -kernel bzImage -append 'console=ttyS0 ip=dhcp' \
#         -netdev bridge,id=n0,br=vmrun0 -device virtio-net-pci,netdev=n0
#
# State lives in /run/vmrun-nat/BRIDGE.*: dnsmasq's pid, leases and log.
# `down` removes the bridge, the nftables table and dnsmasq, and puts
# net.ipv4.ip_forward back to what it was before `up`.
# Needs: iproute2, nftables, dnsmasq (Debian: dnsmasq-base).
set -euo pipefail

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in -h | --help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
br=vmrun0
addr=192.168.150.1/24
range=
hosts=()
outif=
while getopts "b:a:r:H:o:h" o; do
    case $o in
        b) br=$OPTARG ;;
        a) addr=$OPTARG ;;
        r) range=$OPTARG ;;
        H) hosts+=("$OPTARG") ;;
        o) outif=$OPTARG ;;
        h) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "vmrun-nat.sh: see -h" >&2; exit 2 ;;
    esac
done

die() { echo "vmrun-nat.sh: $*" >&2; exit 1; }
state=/run/vmrun-nat
table="vmrun_nat_${br//[^A-Za-z0-9_]/_}"

ip4() { # a.b.c.d -> integer
    local IFS=.
    read -r a b c d <<<"$1"
    echo $(((a << 24) | (b << 16) | (c << 8) | d))
}
dotted() { echo "$((($1 >> 24) & 255)).$((($1 >> 16) & 255)).$((($1 >> 8) & 255)).$(($1 & 255))"; }

case $cmd in
up)
    [ "$(id -u)" = 0 ] || die "must run as root (creates a bridge and nftables rules)"
    for t in ip nft dnsmasq; do
        command -v $t >/dev/null || [ -x /usr/sbin/$t ] || die "$t is not installed"
    done
    [ -e /sys/class/net/$br ] && die "interface $br already exists (run: $0 down -b $br)"
    host=${addr%/*}
    len=${addr#*/}
    [ "$len" != "$addr" ] && [ "$len" -ge 8 ] && [ "$len" -le 30 ] || die "-a $addr: expected ADDR/PREFIX with a prefix of 8..30"
    h=$(ip4 "$host")
    mask=$(((0xffffffff << (32 - len)) & 0xffffffff))
    net=$((h & mask))
    subnet="$(dotted $net)/$len"
    if [ -z "$range" ]; then
        size=$((1 << (32 - len)))
        if [ $size -ge 256 ]; then
            range="$(dotted $((net + 100))),$(dotted $((net + 199)))"
        else
            range="$(dotted $((net + size / 2))),$(dotted $((net + size - 2)))"
        fi
    fi
    mkdir -p $state
    ip link add "$br" type bridge
    trap 'ip link del "$br" 2>/dev/null; nft delete table ip '"$table"' 2>/dev/null' ERR
    ip addr add "$addr" dev "$br"
    ip link set "$br" up
    sysctl -n net.ipv4.ip_forward >"$state/$br.ip_forward"
    sysctl -qw net.ipv4.ip_forward=1
    out_match="oifname != \"$br\""
    [ -n "$outif" ] && out_match="oifname \"$outif\""
    nft -f - <<EOF
table ip $table {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr $subnet ip daddr != $subnet $out_match masquerade
    }
    chain forward {
        type filter hook forward priority filter; policy accept;
        iifname "$br" oifname "$br" accept
        iifname "$br" ip saddr $subnet accept
        oifname "$br" ip daddr $subnet ct state established,related accept
        oifname "$br" drop
    }
}
EOF
    dargs=(--conf-file=/dev/null --strict-order --bind-interfaces --interface="$br"
        --except-interface=lo --listen-address="$host"
        --dhcp-range="$range,1h" --dhcp-no-override --dhcp-authoritative
        --dhcp-leasefile="$state/$br.leases" --pid-file="$state/$br.pid"
        --log-facility="$state/$br.log" --log-dhcp)
    for x in "${hosts[@]}"; do dargs+=(--dhcp-host="$x"); done
    dnsmasq "${dargs[@]}" || die "dnsmasq did not start (see $state/$br.log)"
    trap - ERR
    echo "$br: $addr, DHCP $range, NAT for $subnet (nftables table ip $table)"
    ;;
down)
    [ "$(id -u)" = 0 ] || die "must run as root"
    if [ -f "$state/$br.pid" ]; then
        kill "$(cat "$state/$br.pid")" 2>/dev/null || true
        rm -f "$state/$br.pid"
    fi
    nft delete table ip "$table" 2>/dev/null || true
    ip link del "$br" 2>/dev/null || true
    if [ -f "$state/$br.ip_forward" ]; then
        sysctl -qw net.ipv4.ip_forward="$(cat "$state/$br.ip_forward")"
        rm -f "$state/$br.ip_forward"
    fi
    rm -f "$state/$br.leases"
    echo "$br: removed"
    ;;
status)
    [ -e /sys/class/net/$br ] || { echo "$br: down"; exit 3; }
    ip -br addr show dev "$br"
    nft list table ip "$table" 2>/dev/null | grep -E "masquerade" || echo "no NAT rule"
    [ -f "$state/$br.leases" ] && cat "$state/$br.leases"
    ;;
*)
    echo "usage: vmrun-nat.sh up|down|status [-b BRIDGE] [-a ADDR/PREFIX] [-r FIRST,LAST] [-H MAC,IP] [-o OUTIF]" >&2
    exit 2
    ;;
esac
