#!/bin/bash
# PID 1 of the test bed's dom0 (installed as /usr/local/sbin/testbed-init; kernel init=).
# Brings up just what the tests need, in this order: file systems, modules, udev, the 9p shares,
# the Xen daemons (oxenstored, xen-init-dom0, xenconsoled, the dom0 QEMU for qdisk), then the
# agent that serves the host (dom0-agent.py on the virtio-serial port "testbed.ctl").
# No systemd: it would double the boot time under TCG. Logs go to the console (hvc0 -> Xen
# console -> QEMU serial) and to /var/log/testbed/.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
XB=/usr/lib/xen-4.17/bin

say() { echo "testbed-init: $*"; }
t0=$(cut -d' ' -f1 /proc/uptime 2>/dev/null)

mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /dev/mqueue
mount -t devpts devpts /dev/pts -o gid=5,mode=620,ptmxmode=666
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -o remount,rw /
mkdir -p /run/lock /run/xen /run/xenstored /var/log/xen/console /var/log/testbed /var/lib/xen \
    /var/lib/nfs/rpc_pipefs
ln -sfn /run /var/run 2>/dev/null
hostname dom0
ip link set lo up   # NFS mounts of dom0 by itself go over 127.0.0.1
say "userspace up at $(cut -d' ' -f1 /proc/uptime)s (kernel at ${t0}s)"

# one modprobe for all (each modprobe process costs ~1-2 s under TCG); NFS's modules load in
# the background (bed.nfs_export() waits for them)
modprobe -a -q xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs xen-blkback loop 9p \
    9pnet_virtio virtio_console dm_mod
mount -t xenfs xenfs /proc/xen
( modprobe -a -q sunrpc nfsd nfs nfsv4 dm_snapshot
  mount -t rpc_pipefs rpc_pipefs /var/lib/nfs/rpc_pipefs
  mount -t nfsd nfsd /proc/fs/nfsd
  say "nfs modules loaded at $(cut -d' ' -f1 /proc/uptime)s" ) &

# udev: device nodes for LVM (/dev/mapper, /dev/VG/LV) and names for block/virtio devices.
# Replay only the subsystems we need: a full trigger loads every driver and costs ~40 s in TCG.
/lib/systemd/systemd-udevd --daemon --resolve-names=never >/var/log/testbed/udevd.log 2>&1
udevadm trigger --action=add --subsystem-match=block --subsystem-match=misc \
    --subsystem-match=virtio-ports >/dev/null 2>&1
udevadm settle -t 30
say "udev settled at $(cut -d' ' -f1 /proc/uptime)s"

# 9p shares from the host: the checkout (read-only) and this run's directory (read-write)
mkdir -p /mnt/checkout /mnt/bed
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro checkout /mnt/checkout \
    || say "WARNING: no 9p share 'checkout'"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 bed /mnt/bed \
    || say "WARNING: no 9p share 'bed'"

# Xen daemons, as /etc/init.d/xen would start them
export XENSTORED_ROOTDIR=/var/lib/xenstored
mkdir -p "$XENSTORED_ROOTDIR"
$XB/oxenstored --pid-file /run/xenstored.pid >/var/log/testbed/oxenstored.log 2>&1
for _ in $(seq 100); do [ -S /run/xenstored/socket ] && break; sleep 0.1; done
$XB/xen-init-dom0 >/var/log/testbed/xen-init-dom0.log 2>&1 || say "xen-init-dom0 failed"
$XB/xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console \
    >/var/log/testbed/xenconsoled.log 2>&1
QEMU_XEN=/usr/libexec/xen-qemu-system-i386
[ -x $QEMU_XEN ] || QEMU_XEN=$(command -v qemu-system-i386)
$QEMU_XEN -xen-domid 0 -xen-attach -name dom0 -nographic -M xenpv -daemonize -monitor none \
    -serial none -parallel none -pidfile /run/qemu-dom0.pid >/var/log/testbed/qemu-dom0.log 2>&1 \
    || say "dom0 qemu (qdisk for dom0) failed to start"
say "xen daemons up at $(cut -d' ' -f1 /proc/uptime)s"

# the agent, restarted if it ever dies (the host then sees a new "ready" event)
( while :; do
      python3 /usr/local/lib/testbed/dom0-agent.py >>/var/log/testbed/agent.out 2>&1
      echo "testbed-init: agent exited with $?; restarting" >/dev/console
      sleep 1
  done ) &
say "agent started"

# PID 1 must reap orphans: bash does so while it waits
trap '' TERM INT
while :; do
    sleep 3600 &
    wait $!
done
