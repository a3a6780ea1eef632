#!/bin/sh
# /init of the test bed's PV guest initramfs (busybox, fio, mkfs.ext4/fsck.ext4, xen-blkfront).
# After a minimal boot it serves dom0's agent on the PV console hvc0 (framing in dom0-agent.py):
#   in:  TBCMD <id> <timeout> <base64 script>
#   out: @@TB OUT <id> / base64 / @@TB ERR <id> / base64 / @@TB END <id> <rc>
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /tmp /mnt /run
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
# kernel messages stay in dmesg, off the console the agent speaks on
echo 1 > /proc/sys/kernel/printk
while read -r mod; do
    insmod "$mod" 2>/dev/null
done < /etc/modules.order
hostname guest
exec </dev/hvc0 >/dev/hvc0 2>&1
stty raw -echo
echo "@@TB READY"
while read -r tag id tmo b64; do
    [ "$tag" = TBCMD ] || continue
    echo "$b64" | base64 -d > /tmp/.tbcmd
    timeout "$tmo" sh /tmp/.tbcmd </dev/null >/tmp/.tbout 2>/tmp/.tberr
    rc=$?
    echo "@@TB OUT $id"
    base64 /tmp/.tbout
    echo "@@TB ERR $id"
    base64 /tmp/.tberr
    echo "@@TB END $id $rc"
done
echo "guest-init: console closed"
poweroff -f
