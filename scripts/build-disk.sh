#!/bin/bash
# Build a bootable Linux disk image from the minimal test guest (build/guest,
# made by scripts/build-guest.sh): an ext4 root with busybox, /init and the
# kernel under /boot, a partition table and a boot loader configuration that
# `vmrun disk.qcow2` follows (see docs/boot.md). No root, loop devices or
# mounts needed.
#
# usage: scripts/build-disk.sh [-t gpt|mbr] [-c extlinux|grub|bls|vmlinuz]
#                              [-f qcow2|raw] [-i] [-a ARGS] [-o OUT]
#   -t  partition table (default gpt)
#   -c  boot configuration (default extlinux):
#         extlinux  /boot/extlinux/extlinux.conf
#         grub      /boot/grub/grub.cfg with three entries, a submenu and
#                   set default=1, finding its root by filesystem UUID
#         bls       an EFI system partition (FAT) with loader/loader.conf and
#                   two loader/entries/*.conf, kernels on the ESP; root is
#                   partition 2
#         vmlinuz   no configuration: /boot/vmlinuz-<version> only
#   -f  image format (default qcow2)
#   -i  also install the initramfs as /boot/initrd.img-<version> and name it
#       in the entry (the kernel then runs the initramfs, not the disk's /init)
#   -a  extra kernel parameters for the entry (default: panic=-1 reboot=k)
#   -o  output file (default build/disk.qcow2 or build/disk.img)
#
# Needs: e2fsprogs, fdisk (sfdisk), dosfstools and mtools (for -c bls),
# qemu-img or vimg (for qcow2), cpio.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
guest=${GUEST:-$here/build/guest}
table=gpt conf=extlinux fmt=qcow2 initrd=0 extra="panic=-1 reboot=k" out=
while getopts "t:c:f:ia:o:h" o; do
    case $o in
        t) table=$OPTARG ;;
        c) conf=$OPTARG ;;
        f) fmt=$OPTARG ;;
        i) initrd=1 ;;
        a) extra=$OPTARG ;;
        o) out=$OPTARG ;;
        h) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "usage: $0 [-t gpt|mbr] [-c extlinux|grub|bls|vmlinuz] [-f qcow2|raw] [-i] [-a ARGS] [-o OUT]" >&2; exit 2 ;;
    esac
done
case $table in gpt|mbr) ;; *) echo "build-disk: -t $table: expected gpt or mbr" >&2; exit 2 ;; esac
case $conf in extlinux|grub|bls|vmlinuz) ;; *) echo "build-disk: -c $conf: expected extlinux, grub, bls or vmlinuz" >&2; exit 2 ;; esac
case $fmt in qcow2|raw) ;; *) echo "build-disk: -f $fmt: expected qcow2 or raw" >&2; exit 2 ;; esac
[ -n "$out" ] || { mkdir -p "$here/build"; out=$here/build/disk.$([ "$fmt" = raw ] && echo img || echo qcow2); }
kernel=$guest/bzImage
[ -f "$kernel" ] || { echo "build-disk: $kernel not found; run scripts/build-guest.sh first" >&2; exit 1; }
for t in mkfs.ext4 sfdisk cpio; do
    command -v $t >/dev/null || { echo "build-disk: $t not found; run scripts/install-deps.sh" >&2; exit 1; }
done

# Kernel release from the bzImage header (kernel_version field at 0x20e).
off=$(od -An -tu2 -j $((0x20e)) -N2 "$kernel" | tr -d ' ')
ver=$(dd if="$kernel" bs=1 skip=$((off + 0x200)) count=64 status=none | tr '\0' ' ' | cut -d' ' -f1)
[ -n "$ver" ] || ver=6.1

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,tmp,etc,boot}
if [ -f "$guest/initramfs.cpio" ]; then
    (cd "$root" && cpio -id --quiet < "$guest/initramfs.cpio")
elif [ -f "$guest/initramfs.cpio.gz" ]; then
    (cd "$root" && gzip -dc "$guest/initramfs.cpio.gz" | cpio -id --quiet)
fi
echo "/dev/root / ext4 defaults 0 1" > "$root/etc/fstab"
cp "$kernel" "$root/boot/vmlinuz-$ver"
irdline= irdfile=
if [ "$initrd" = 1 ]; then
    irdfile=$guest/initramfs.cpio
    [ -f "$irdfile" ] || irdfile=$guest/initramfs.cpio.gz
    [ -f "$irdfile" ] || { echo "build-disk: -i: no initramfs.cpio in $guest" >&2; exit 1; }
    cp "$irdfile" "$root/boot/initrd.img-$ver"
fi

# Layout: 1 MiB gap, [ESP 32 MiB], root 64 MiB, 1 MiB for the backup GPT.
root_mib=64 esp_mib=0
[ "$conf" = bls ] && esp_mib=32
root_part=1
[ "$conf" = bls ] && root_part=2
rootdev=/dev/vda$root_part
fsuuid=5a0c7e11-d15c-4b00-8000-00000000b007
cmd="root=$rootdev rw init=/init $extra"

case $conf in
extlinux)
    mkdir -p "$root/boot/extlinux"
    [ "$initrd" = 1 ] && irdline="  INITRD ../initrd.img-$ver"
    cat > "$root/boot/extlinux/extlinux.conf" <<EOF
# extlinux.conf written by scripts/build-disk.sh
UI menu.c32
TIMEOUT 30
DEFAULT vtools

LABEL rescue
  MENU LABEL rescue shell
  LINUX /boot/vmlinuz-$ver
  APPEND root=$rootdev single vtools.entry=rescue

LABEL vtools
  MENU LABEL vtools test guest
  LINUX ../vmlinuz-$ver
$irdline
  APPEND $cmd vtools.entry=extlinux
EOF
    ;;
grub)
    mkdir -p "$root/boot/grub"
    cp "$kernel" "$root/boot/vmlinuz-$ver-old"
    [ "$initrd" = 1 ] && irdline="	initrd	/boot/initrd.img-$ver"
    cat > "$root/boot/grub/grub.cfg" <<EOF
# grub.cfg written by scripts/build-disk.sh (GRUB 2 syntax, like update-grub)
if [ -s \$prefix/grubenv ]; then
  load_env
fi
if [ "\${next_entry}" ] ; then
   set default="\${next_entry}"
   set next_entry=
else
   set default="1"
fi
set timeout=5
function load_video {
  insmod all_video
}
insmod part_$( [ "$table" = gpt ] && echo gpt || echo msdos)
insmod ext2
search --no-floppy --fs-uuid --set=root $fsuuid
menuentry 'vtools old kernel' --class gnu-linux \$menuentry_id_option 'vtools-old' {
	load_video
	linux	/boot/vmlinuz-$ver-old root=$rootdev ro vtools.entry=grub-old
}
menuentry 'vtools test guest' --class gnu-linux \$menuentry_id_option 'vtools-default' {
	load_video
	insmod gzio
	search --no-floppy --fs-uuid --set=root $fsuuid
	echo	'Loading Linux $ver ...'
	linux	/boot/vmlinuz-$ver $cmd vtools.entry=grub-default
$irdline
}
submenu 'Advanced options' \$menuentry_id_option 'vtools-advanced' {
	menuentry 'vtools recovery' {
		linux	/boot/vmlinuz-$ver root=$rootdev single vtools.entry=grub-recovery
	}
}
EOF
    ;;
bls)
    esp=$work/esp
    mkdir -p "$esp/loader/entries" "$esp/EFI/BOOT"
    cp "$kernel" "$esp/vmlinuz-$ver"
    cp "$kernel" "$esp/vmlinuz-$ver-old"
    [ "$initrd" = 1 ] && { cp "$irdfile" "$esp/initrd.img-$ver"; irdline="initrd /initrd.img-$ver"; }
    printf 'timeout 3\ndefault vtools-%s.conf\n' "$ver" > "$esp/loader/loader.conf"
    cat > "$esp/loader/entries/vtools-$ver.conf" <<EOF
title   vtools test guest
version $ver
linux   /vmlinuz-$ver
$irdline
options $cmd
options vtools.entry=bls
EOF
    cat > "$esp/loader/entries/vtools-$ver-old.conf" <<EOF
title   vtools old kernel
version $ver-old
linux   /vmlinuz-$ver-old
options root=$rootdev ro vtools.entry=bls-old
EOF
    command -v mkfs.vfat >/dev/null && command -v mcopy >/dev/null ||
        { echo "build-disk: mkfs.vfat and mcopy needed for -c bls; install dosfstools and mtools" >&2; exit 1; }
    truncate -s ${esp_mib}M "$work/esp.img"
    mkfs.vfat -n ESP -i 1234abcd "$work/esp.img" >/dev/null
    mcopy -s -i "$work/esp.img" "$esp"/* ::/
    ;;
vmlinuz) ;;
esac

mkfs.ext4 -q -F -L vtools-root -U $fsuuid -d "$root" "$work/root.img" ${root_mib}M >/dev/null
disk=$work/disk.img
truncate -s $((1 + esp_mib + root_mib + 1))M "$disk"
{
    if [ "$table" = gpt ]; then
        echo "label: gpt"
        echo "label-id: 0B007AB1-E000-4000-8000-000000000001"
    else
        echo "label: dos"
        echo "label-id: 0x0b007ab1"
    fi
    if [ "$conf" = bls ]; then
        [ "$table" = gpt ] && echo "start=2048, size=$((esp_mib * 2048)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=ESP" \
                           || echo "start=2048, size=$((esp_mib * 2048)), type=ef"
    fi
    [ "$table" = gpt ] && echo "size=$((root_mib * 2048)), type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root" \
                       || echo "size=$((root_mib * 2048)), type=83, bootable"
} | sfdisk -q "$disk" >/dev/null
if [ "$conf" = bls ]; then
    dd if="$work/esp.img" of="$disk" bs=1M seek=1 conv=notrunc status=none
fi
dd if="$work/root.img" of="$disk" bs=1M seek=$((1 + esp_mib)) conv=notrunc status=none

rm -f "$out"
if [ "$fmt" = qcow2 ]; then
    if command -v qemu-img >/dev/null; then
        qemu-img convert -O qcow2 "$disk" "$out"
    else
        "$here/target/debug/vimg" convert -O qcow2 "$disk" "$out"
    fi
else
    mv "$disk" "$out"
fi
echo "build-disk: $out ($fmt, $table, $conf, kernel $ver)" >&2
