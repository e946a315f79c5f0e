#!/bin/sh
# udhcpc hook: apply the lease.
case "$1" in
deconfig)
	ip addr flush dev "$interface"
	;;
bound | renew)
	ip addr flush dev "$interface"
	ip addr add "$ip/${mask:-24}" dev "$interface"
	for r in $router; do
		ip route replace default via "$r" dev "$interface"
		break
	done
	: >/run/resolv.conf
	for d in $dns; do
		echo "nameserver $d" >>/run/resolv.conf
	done
	;;
esac
exit 0
