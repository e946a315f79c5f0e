#!/bin/busybox sh
# Cairn OS initramfs: load the drivers, mount this slot's read-only root, the data
# partition and the ESP, and hand over to the root's init. Nothing here is
# interactive: on any failure it says why on the console and the kernel panics
# (`panic=N` on the command line reboots the box, and the boot loader falls back).
/bin/busybox --install -s /bin
export PATH=/bin

fail() {
	echo "cairn-initramfs: $*" >/dev/console
	exit 1
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
dmesg -n 1
echo "cairn-initramfs: @VERSION@ ($(uname -r))" >/dev/console
@FAULT@
while read -r m; do
	insmod "/lib/modules/$m" 2>/dev/null
done </lib/modules/load.list

if [ -e /dev/tpmrm0 ]; then
	echo "cairn-initramfs: TPM found" >/dev/console
else
	echo "cairn-initramfs: no TPM: the agent will enroll without hardware attestation" >/dev/console
fi

# The slot, by the same rule as the agent's: on a Raspberry Pi the partition the
# firmware booted, which it reports in the device tree (4 bytes, big-endian), named
# cairn-boot-a or cairn-boot-b in the GPT; elsewhere cairn.slot=a|b from the boot
# loader's entry (UEFI).
slot=
bootpart=
if [ -e /proc/device-tree/chosen/bootloader/partition ]; then
	set -- $(od -An -tu1 /proc/device-tree/chosen/bootloader/partition)
	bootpart=$4
else
	slot=$(sed -n 's/.*cairn\.slot=\([ab]\).*/\1/p' /proc/cmdline)
fi
[ -n "$slot" ] || [ -n "$bootpart" ] ||
	fail "no cairn.slot=a|b on the kernel command line and no boot partition in the device tree"

# No udev: name the partitions ourselves, by GPT partition name.
mkdir -p /dev/disk/by-partlabel
tries=0
while :; do
	for u in /sys/class/block/*/uevent; do
		name=$(sed -n 's/^PARTNAME=//p' "$u")
		dev=$(sed -n 's/^DEVNAME=//p' "$u")
		[ -n "$name" ] && [ -n "$dev" ] && ln -sf "/dev/$dev" "/dev/disk/by-partlabel/$name"
		if [ -z "$slot" ] && [ "$(sed -n 's/^PARTN=//p' "$u")" = "$bootpart" ]; then
			case $name in
			cairn-boot-a) slot=a ;;
			cairn-boot-b) slot=b ;;
			esac
		fi
	done
	[ -n "$slot" ] && [ -e "/dev/disk/by-partlabel/cairn-$slot" ] && [ -e /dev/disk/by-partlabel/cairn-data ] && break
	tries=$((tries + 1))
	[ $tries -lt 100 ] || fail "no partitions named cairn-${slot:-boot-a|b at partition $bootpart} and cairn-data after 10 s: is this a Cairn disk?"
	sleep 0.1
done

mkdir -p /root
mount -t squashfs -o ro "/dev/disk/by-partlabel/cairn-$slot" /root ||
	fail "slot $slot holds no root file system"
mount -t ext4 -o noatime,errors=remount-ro /dev/disk/by-partlabel/cairn-data /root/var/lib/cairn ||
	fail "the data partition does not mount"
for esp in esp boot; do
	if [ -e "/dev/disk/by-partlabel/$esp" ]; then
		# dirsync: a rename writes the new entry (with its start cluster) before the
		# old one goes, so a power cut leaves one of the two (see rename_durable).
		mount -t vfat -o noatime,umask=0077,flush,dirsync "/dev/disk/by-partlabel/$esp" /root/boot/efi ||
			fail "the boot partition does not mount"
		break
	fi
done
if [ -d /sys/firmware/efi ]; then
	mount -t efivarfs efivarfs /sys/firmware/efi/efivars || echo "cairn-initramfs: no efivarfs" >/dev/console
fi
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
for d in dev proc sys; do
	mount --move "/$d" "/root/$d"
done
echo "cairn-initramfs: slot $slot" >/dev/console
export CAIRN_SLOT=$slot
exec switch_root /root /sbin/init
