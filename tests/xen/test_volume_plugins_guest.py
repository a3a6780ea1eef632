"""lvm-raw and nfs-raw volumes used by the PV guest: made through the installed executables,
plugged through the `blkback` datapath exactly as xenopsd plugs them (the toolstack emulation
in dom0, tests/xen/dom0_guest_volumes.py), written by the guest's own ext4 and fio.

  * an lvm-raw volume (thick, then thin): the guest makes ext4 (/usr/sbin/mkfs.ext4 of the
    guest's initramfs), writes files, syncs, unmounts; `fsck.ext4 -fn` is clean; after an
    unplug and a second plug the files read back with the same checksums and fsck is still
    clean; after the unplug and the SR's destruction the host holds no LV, loop device,
    XenStore node, datapath state or plugin process that it did not hold before.
  * an nfs-raw volume under fio verify in the guest while dom0's NFS server is stopped for
    20 s and restarted (hard mount): the guest's I/O waits instead of failing, fio's verify
    is clean, the guest's kernel logged no I/O error.
"""

import json
import time

import pytest

pytestmark = pytest.mark.xen

VENV = "/opt/xapi-storage/venv"
PY = VENV + "/bin/python"
SCRIPT = "/mnt/checkout/tests/xen/dom0_guest_volumes.py"
ROOT = "/root/dp-root"                 # dom0_datapath.ROOT
MIB = 1 << 20
EXPORT = "/srv/nfs/guest"


class Driver:
    def __init__(self, bed, guest):
        self.bed, self.guest = bed, guest

    def call(self, **req):
        req.setdefault("guest", self.guest.domid)
        rc, out, err = self.bed.dom0([PY, SCRIPT, json.dumps(req)], timeout=600)
        assert rc == 0, f"dom0 driver {req['op']} failed (rc {rc}):\n{out}\n{err[-3000:]}"
        return json.loads(out.strip().splitlines()[-1])

    def sh(self, cmd, timeout=180, check=True):
        return self.bed.guest(self.guest.name, cmd, timeout=timeout, check=check)

    def wait_disk(self, name, present=True, timeout=60):
        test = "[ ! -b /dev/%s ]" if present else "[ -b /dev/%s ]"
        self.sh(f"i=0; while {test % name}; do i=$((i+1)); [ $i -gt {timeout * 5} ] && exit 1; "
                "sleep .2; done", timeout=timeout + 30)


@pytest.fixture(scope="module")
def drv(bed, guest):
    # the plugins and datapaths where the toolstack emulation finds them (as in
    # test_datapath_real.py); the observer check with the interpreter that imports the package
    bed.dom0([VENV + "/bin/xapi-storage", "install", "--root", ROOT, "--observer-python", PY],
             timeout=300, check=True)
    return Driver(bed, guest)


def same_host_state(now, before, what):
    for k in ("active_lvs", "loops", "nodes", "states", "procs", "mounts"):
        assert sorted(now[k]) == sorted(before[k]), f"{what}: {k} {now[k]} != {before[k]}"


WRITE = ("set -e; /usr/sbin/mkfs.ext4 -q -F /dev/{d}; mkdir -p /mnt/gv; "
         "mount -t ext4 /dev/{d} /mnt/gv; mkdir /mnt/gv/dir; "
         "for i in 1 2 3 4 5 6 7 8; do "
         "dd if=/dev/urandom of=/mnt/gv/dir/f$i bs=64k count=$((i * 4)) 2>/dev/null; done; "
         "sync; cd /mnt/gv && md5sum dir/* > /tmp/gv.md5; cd /; "
         "umount /mnt/gv; cat /tmp/gv.md5")
FSCK = "/usr/sbin/fsck.ext4 -fn /dev/{d}"
READ = ("set -e; mount -t ext4 -o ro /dev/{d} /mnt/gv; cd /mnt/gv; md5sum -c /tmp/gv.md5; "
        "cd /; umount /mnt/gv")


@pytest.mark.parametrize("provisioning", ["thick", "thin"])
def test_lvm_raw_volume_ext4_in_the_guest_survives_replug(drv, provisioning):
    uuid = {"thick": "9e570000-1111-4222-8333-00000000000a",
            "thin": "9e570000-1111-4222-8333-00000000000b"}[provisioning]
    up = drv.call(op="lvm-up", uuid=uuid, provisioning=provisioning, size=64 * MIB)
    plugged = [up["ctx"]] if up.get("ctx", {}).get("vbd") else []
    down = None
    try:
        assert up.get("error") is None, up
        assert up["uri"] == [f"blkback:///dev/{up['sr']}/{up['key']}"], up["uri"]
        name = up["ctx"]["device"]
        drv.wait_disk(name)
        assert drv.sh(f"cat /sys/block/{name}/size").stdout.strip() == str(64 * MIB // 512)
        sums = drv.sh(WRITE.format(d=name), timeout=300).stdout
        assert sums.count("dir/f") == 8, sums
        drv.sh(FSCK.format(d=name), timeout=180)
        # unplug: the guest lets go; the LV is not a loop device (no loop made for it)
        r = drv.call(op="steps", plugin="org.xen.xapi.storage.lvm-raw",
                     items=[{"operation": "vbd-unplug", "ctx": up["ctx"]}])["results"]
        assert r[-1]["error"] is None, r[-1]
        plugged = []
        drv.wait_disk(name, present=False)
        same_host_state(r[-1]["world"], up["world"], "after the first unplug")
        # plug again: the same files, fsck still clean
        r = drv.call(op="steps", plugin="org.xen.xapi.storage.lvm-raw",
                     items=[{"operation": "vbd-plug",
                             "ctx": {"sr": up["sr"], "key": up["key"],
                                     "domain": str(drv.guest.domid)}}])["results"]
        assert r[-1]["error"] is None, r[-1]
        ctx = r[-1]["ctx"]
        plugged = [ctx]
        name = ctx["device"]
        drv.wait_disk(name)
        out = drv.sh(READ.format(d=name), timeout=180).stdout
        assert out.count(": OK") == 8, out
        drv.sh(FSCK.format(d=name), timeout=180)
        r = drv.call(op="steps", plugin="org.xen.xapi.storage.lvm-raw",
                     items=[{"operation": "vbd-unplug", "ctx": ctx}])["results"]
        assert r[-1]["error"] is None, r[-1]
        plugged = []
        drv.wait_disk(name, present=False)
        same_host_state(r[-1]["world"], up["world"], "after the second unplug")
    finally:
        down = drv.call(op="down", plugin="org.xen.xapi.storage.lvm-raw", sr=up.get("sr"),
                        keys=[up["key"]] if up.get("key") else [], unplug=plugged,
                        dir=up.get("dir"), devs=up.get("devs"))
    assert down["errors"] == [], down
    # nothing the scenario made is left: not the VG's LVs, not the PVs' loop devices
    same_host_state(down["world"], up["world0"], "after SR.destroy")


@pytest.fixture(scope="module")
def export(bed):
    bed.nfs_export(EXPORT)
    return EXPORT


# 8 MiB of random 16 KiB writes at 160 KiB/s (reads not capped): about 50 s of writing, so
# that the 20 s outage falls in the middle; then fio reads every block back, checks its crc32c
FIO = ("fio --name=nfs --filename={f} --rw=randwrite --bs=16k --size=8M --direct=1 "
       "--ioengine=psync --verify=crc32c --verify_fatal=1 --randseed=4711 {extra}")


def test_nfs_raw_server_away_20s_under_guest_fio_hard_mount(drv, export):
    nfs = "org.xen.xapi.storage.nfs-raw"
    uuid = "9e570000-1111-4222-8333-00000000000c"
    up = drv.call(op="nfs-up", uuid=uuid, export=export, size=32 * MIB)
    plugged = [up["ctx"]] if up.get("ctx", {}).get("vbd") else []
    down = None
    try:
        assert up.get("error") is None, up
        name = up["ctx"]["device"]
        drv.wait_disk(name)
        drv.sh("rm -f /tmp/fio.rc /tmp/fio.log; dmesg -c >/dev/null; "
               f"({FIO.format(f='/dev/' + name, extra='--rate=,160k')} >/tmp/fio.log 2>&1; "
               "echo $? >/tmp/fio.rc) </dev/null >/dev/null 2>&1 &")
        time.sleep(8)
        assert drv.sh("cat /tmp/fio.rc 2>/dev/null; true").stdout == "", "fio ended early"
        drv.bed.dom0("rpc.nfsd 0", timeout=60, check=True)        # the server stops serving
        t0 = time.monotonic()
        try:
            time.sleep(20)
            # fio has not ended, and its write is waiting in the guest's disk (the loop
            # device's direct I/O on the hard mount holds it), not failed
            during = drv.sh(f"cat /tmp/fio.rc 2>/dev/null; cat /sys/block/{name}/inflight"
                            ).stdout.split()
        finally:
            drv.bed.dom0("rpc.nfsd 4", timeout=60, check=True)    # and comes back
        away = time.monotonic() - t0
        assert len(during) == 2, f"fio ended while the server was away: rc {during[0]}"
        assert int(during[1]) >= 1, f"no write in flight in the guest during the outage: {during}"
        drv.sh("i=0; while [ ! -e /tmp/fio.rc ]; do i=$((i+1)); [ $i -gt 400 ] && exit 1; "
               "sleep 1; done", timeout=460)
        out = drv.sh("cat /tmp/fio.log; echo fio-rc=$(cat /tmp/fio.rc)").stdout
        print(f"server away {away:.0f} s; fio:\n{out[-1500:]}")
        assert "fio-rc=0" in out and "err= 0" in out, out
        dmesg = drv.sh("dmesg").stdout
        assert "I/O error" not in dmesg and "blk_update_request" not in dmesg, dmesg[-3000:]
        r = drv.call(op="steps", plugin=nfs,
                     items=[{"operation": "vbd-unplug", "ctx": up["ctx"]}])["results"]
        assert r[-1]["error"] is None, r[-1]
        plugged = []
        drv.wait_disk(name, present=False)
        same_host_state(r[-1]["world"], up["world"], "after the unplug")
        # every block the guest wrote is in the file on the server's own disk
        drv.bed.dom0(FIO.format(f=f"{export}/{uuid}/{up['key']}.img", extra="--verify_only"),
                     timeout=300, check=True)
    finally:
        down = drv.call(op="down", plugin=nfs, sr=up.get("sr"),
                        keys=[up["key"]] if up.get("key") else [], unplug=plugged)
    assert down["errors"] == [], down
    same_host_state(down["world"], up["world0"], "after SR.destroy")
