#!/bin/sh
# Cairn OS init (PID 1 of the read-only root): network up, then the agent under a
# supervisor loop. No login, no shell on the console, no SSH: the box is managed
# through its hub only.
export PATH=/bin:/usr/bin
export TSS2_LOG=all+NONE NO_COLOR=1
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
echo "cairn: Cairn OS @VERSION@ (slot ${CAIRN_SLOT:-?})"

id=$(cut -c1-8 /sys/class/dmi/id/product_uuid 2>/dev/null)
hostname "cairn-${id:-box}"
ip link set lo up
for n in /sys/class/net/*; do
	i=${n##*/}
	[ "$i" = lo ] && continue
	ip link set "$i" up
	udhcpc -b -S -i "$i" -s /usr/share/udhcpc/default.script >/dev/null 2>&1
done

# The image's configuration, then the first-boot one (hub, join token) that
# `cairn-hub image configure` put on the ESP.
set -- --config /etc/cairn/agent.toml
[ -f /boot/efi/cairn/agent.toml ] && set -- "$@" --config /boot/efi/cairn/agent.toml
starts=0
while :; do
	starts=$((starts + 1))
	cairn-agent run "$@" @AGENT_ARGS@
	rc=$?
	case $rc in
	10 | 11)
		echo "cairn: rebooting into the new release"
		sync
		umount /boot/efi /var/lib/cairn 2>/dev/null
		# 11: a Pi trial, whose reboot must carry the tryboot flag to the firmware.
		[ $rc = 11 ] && cairn-agent reboot "0 tryboot"
		reboot -f
		;;
	2 | 3)
		echo "cairn: the agent cannot enroll (exit $rc): configure the image with 'cairn-hub image configure' or give it a new join token"
		sleep 30
		;;
	*)
		echo "cairn: the agent stopped (exit $rc, start $starts); starting it again"
		sleep 1
		;;
	esac
done
