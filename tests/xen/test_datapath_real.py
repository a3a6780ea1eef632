"""The `blkback` datapath on real Xen: a file-raw volume, through the installed plugin
executables and the toolstack emulation running in dom0 (tests/xen/dom0_datapath.py), plugged
into the PV guest exactly as xenopsd plugs it, served by dom0's kernel blkback from a loop
device, and used by the guest's own xen-blkfront.

The guest's initramfs has busybox (no mkfs.ext4, no fsck): the file system is made and checked
in dom0, through dom0 plugs of the same volume (the "u0_" domain token), which is also the
proof that a dom0 plug gives a /dev/ block device with the guest's data.
"""

import json
import time

import pytest

pytestmark = pytest.mark.xen

VENV = "/opt/xapi-storage/venv"
PY = VENV + "/bin/python"
SCRIPT = "/mnt/checkout/tests/xen/dom0_datapath.py"
ROOT = "/root/dp-root"
SR_PATH = "/root/dp-sr"
MIB = 1 << 20
FIO = ("fio --name=dp --filename=/dev/{d} --rw=randwrite --bs=16k --size=2M --direct=1 "
       "--ioengine=psync --verify=crc32c --verify_fatal=1 --randseed=4242 {extra}")


class Dp:
    """The driver in dom0, one JSON request per call."""

    def __init__(self, bed, guest):
        self.bed, self.guest = bed, guest
        self.sr = self.call(op="sr", path=SR_PATH)["sr"]

    def call(self, **req):
        rc, out, err = self.bed.dom0([PY, SCRIPT, json.dumps(req)], timeout=300)
        assert rc == 0, f"dom0 driver {req.get('op')} failed (rc {rc}):\n{out}\n{err[-3000:]}"
        return json.loads(out.strip().splitlines()[-1])

    def create(self, size):
        return self.call(op="create", sr=self.sr, size=size)

    def run(self, operation, key, fault=None, ok=True, **ctx):
        ctx.setdefault("domain", str(self.guest.domid))
        ctx.update(sr=self.sr, key=key)
        r = self.call(op="run", operation=operation, ctx=ctx, fault=fault)
        if ok:
            assert r["error"] is None, f"{operation}: {r['error']}"
        return r

    def check(self, key):
        return self.call(op="check", path=SR_PATH, key=key, guest=self.guest.domid)

    def sh(self, cmd, timeout=120, check=True):
        return self.bed.guest(self.guest.name, cmd, timeout=timeout, check=check)

    def dom0(self, cmd, timeout=120):
        return self.bed.dom0(cmd, timeout=timeout, check=True)


@pytest.fixture(scope="module")
def dp(bed, guest):
    bed.dom0([VENV + "/bin/xapi-storage", "install", "--root", ROOT], timeout=300, check=True)
    bed.dom0(["rm", "-rf", SR_PATH], check=True)
    d = Dp(bed, guest)
    d.baseline = d.call(op="check", path=SR_PATH, key="none", guest=guest.domid)
    return d


def wait_disk(dp, name, timeout=60):
    dp.sh(f"i=0; while [ ! -b /dev/{name} ]; do i=$((i+1)); [ $i -gt {timeout * 5} ] && exit 1; "
          "sleep .2; done", timeout=timeout + 30)


def plugged(dp, size, **ctx):
    """A new volume of `size`, hot-plugged into the guest: (key, ctx, device name)."""
    key = dp.create(size)["key"]
    ctx = dp.run("vbd-plug", key, **ctx)["ctx"]
    wait_disk(dp, ctx["device"])
    return key, ctx, ctx["device"]


def assert_clean(dp, key):
    """No loop device of the volume, no datapath state, no node beyond the bed's own, no plugin
    process."""
    c = dp.check(key)
    assert c["loops"] == [] and c["states"] == [] and c["procs"] == [], c
    assert sorted(c["nodes"]) == sorted(dp.baseline["nodes"]), c


def test_a_file_system_made_in_dom0_is_used_by_the_guest_and_checked_again(dp):
    vol = dp.create(64 * MIB)
    key = vol["key"]
    # dom0 plug, as xapi does for VDI.copy: a /dev/ block device, no XenStore
    r = dp.run("dom0-plug", key, dp="vbd/0/xvda")["ctx"]
    assert r["domain"] == "u0_vbd_0_xvda" and r["device"].startswith("/dev/loop")
    dp.dom0(["mkfs.ext4", "-q", "-F", r["device"]])
    dp.run("dom0-unplug", key, dp="vbd/0/xvda")
    assert_clean(dp, key)
    # the guest: right size, mount, write, unmount
    ctx = dp.run("vbd-plug", key)["ctx"]
    name = ctx["device"]
    wait_disk(dp, name)
    assert dp.sh(f"cat /sys/block/{name}/size").stdout.strip() == str(64 * MIB // 512)
    out = dp.sh(f"mkdir -p /mnt/dp && mount -t ext4 /dev/{name} /mnt/dp && "
                "dd if=/dev/urandom of=/mnt/dp/data bs=64k count=32 2>/dev/null && "
                "md5sum /mnt/dp/data && umount /mnt/dp").stdout
    guest_md5 = out.split()[0]
    dp.run("vbd-unplug", key, vbd=ctx["vbd"])
    dp.sh(f"i=0; while [ -b /dev/{name} ]; do i=$((i+1)); [ $i -gt 150 ] && exit 1; sleep .2; done")
    assert_clean(dp, key)
    # dom0 plug again: fsck clean, and the guest's file is there
    r = dp.run("dom0-plug", key, dp="vbd/0/xvdb")["ctx"]
    dp.dom0(["fsck.ext4", "-n", "-f", r["device"]])
    rc, out, err = dp.bed.dom0(f"debugfs -R 'cat /data' {r['device']} 2>/dev/null | md5sum",
                               timeout=120)
    assert out.split()[0] == guest_md5
    dp.run("dom0-unplug", key, dp="vbd/0/xvdb")
    assert_clean(dp, key)


def test_fio_verify_survives_vm_shutdown_and_start(dp):
    vol = dp.create(16 * MIB)
    key = vol["key"]
    ctx = dp.run("vm-start", key)["ctx"]
    name = ctx["device"]
    wait_disk(dp, name)
    dp.sh(FIO.format(d=name, extra="--do_verify=0"), timeout=300)
    # VM shutdown: hard unplug, deactivate, deactivate + detach, epoch_end
    dp.run("vm-shutdown", key, vbd=ctx["vbd"])
    assert_clean(dp, key)
    ctx = dp.run("vm-start", key)["ctx"]
    name = ctx["device"]
    wait_disk(dp, name)
    dp.sh(FIO.format(d=name, extra="--verify_only"), timeout=300)
    dp.run("vm-shutdown", key, vbd=ctx["vbd"])
    assert_clean(dp, key)


def test_a_read_only_plug_refuses_writes_in_the_guest(dp):
    key, ctx, name = plugged(dp, 8 * MIB, readonly=True)
    assert dp.sh(f"cat /sys/block/{name}/ro").stdout.strip() == "1"
    r = dp.sh(f"dd if=/dev/zero of=/dev/{name} bs=4k count=1 oflag=direct", check=False)
    assert r.rc != 0, r
    dp.sh(f"dd if=/dev/{name} of=/dev/null bs=4k count=16")          # reads work
    dp.run("vbd-unplug", key, vbd=ctx["vbd"])
    assert_clean(dp, key)


def test_the_guest_sees_a_volume_grown_while_attached(dp):
    key, ctx, name = plugged(dp, 8 * MIB)
    dp.call(op="resize", sr=dp.sr, key=key, size=24 * MIB)
    want = str(24 * MIB // 512)
    dp.sh(f"i=0; until [ \"$(cat /sys/block/{name}/size)\" = {want} ]; do i=$((i+1)); "
          "[ $i -gt 150 ] && cat /sys/block/{name}/size && exit 1; sleep .2; done".replace(
              "{name}", name), timeout=60)
    dp.sh(f"dd if=/dev/zero of=/dev/{name} bs=1M seek=20 count=2 oflag=direct")  # the new part
    dp.run("vbd-unplug", key, vbd=ctx["vbd"])
    assert_clean(dp, key)


@pytest.mark.parametrize("point", ["datapath:setup:done", "datapath:backend:intent",
                                   "datapath:teardown:intent"])
def test_a_plugin_killed_during_attach_or_detach_is_completed_or_cleaned(dp, point):
    vol = dp.create(4 * MIB)
    key = vol["key"]
    killed = False
    r = dp.run("vbd-plug", key, fault=point, ok=False)
    if r["error"] is not None:
        assert r["error"]["params"][1:3] == ["signalled", "SIGKILL"], r
        killed = True
        r = dp.run("vbd-plug", key)                                  # the toolstack's retry
    ctx = r["ctx"]
    wait_disk(dp, ctx["device"])
    r = dp.run("vbd-unplug", key, vbd=ctx["vbd"], fault=point, ok=False)
    if r["error"] is not None:
        assert r["error"]["params"][1:3] == ["signalled", "SIGKILL"], r
        killed = True
        dp.run("vbd-unplug", key, vbd=ctx["vbd"])
    assert killed, point
    assert_clean(dp, key)


def test_operator_attach_and_detach_commands(dp):
    """`xapi-storage attach URI --vm NAME` prints the guest's device, which the guest uses;
    `xapi-storage detach` unplugs it cleanly (the guest lets go) and releases the loop device."""
    vol = dp.create(8 * MIB)
    key, uri = vol["key"], vol["uri"][0]
    xs = VENV + "/bin/xapi-storage"
    rc, out, err = dp.bed.dom0([xs, "attach", uri, "--vm", dp.guest.name, "--root", ROOT],
                               timeout=180)
    assert rc == 0, err
    name = out.strip()
    wait_disk(dp, name)
    assert dp.sh(f"cat /sys/block/{name}/size").stdout.strip() == str(8 * MIB // 512)
    dp.sh(f"dd if=/dev/urandom of=/dev/{name} bs=4k count=8 oflag=direct")
    rc, out, err = dp.bed.dom0([xs, "detach", uri, "--vm", dp.guest.name, "--root", ROOT],
                               timeout=180)
    assert rc == 0, err
    dp.sh(f"i=0; while [ -b /dev/{name} ]; do i=$((i+1)); [ $i -gt 150 ] && exit 1; sleep .2; done")
    assert_clean(dp, key)
