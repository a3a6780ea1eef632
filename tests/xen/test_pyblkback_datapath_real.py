"""The `pyblkback` datapath on real Xen: the installed plugin executables driven in dom0 as the
toolstack drives them (tests/xen/dom0_pyblkback.py), the qdisk nodes written as xenopsd writes
them, the volume's server (spawned by the plugin) serving the PV guest's own xen-blkfront.

The guest "pbb" is started without any disk: libxl then starts no device model for it, so no
QEMU qdisk backend competes for its qdisk devices (on XenServer 8 / XCP-ng 8.3 QEMU's qdisk
backend is compiled out; Debian's is not).
"""

import json
import time

import pytest

pytestmark = pytest.mark.xen

VENV = "/opt/xapi-storage/venv"
PY = VENV + "/bin/python"
SCRIPT = "/mnt/checkout/tests/xen/dom0_pyblkback.py"
ROOT = "/root/dp-root"
MIB = 1 << 20
FIO = ("fio --name=pbb --filename=/dev/{d} --rw=randwrite --bs={bs} --size={size} "
       "--direct=1 --ioengine={engine} --iodepth={depth} --verify=crc32c --verify_fatal=1 "
       "--do_verify=1 --randseed=77 --output-format=terse --terse-version=3")


class Pbb:
    def __init__(self, bed, guest):
        self.bed, self.guest = bed, guest

    def call(self, **req):
        rc, out, err = self.bed.dom0([PY, SCRIPT, json.dumps(req)], timeout=300)
        assert rc == 0, f"dom0 driver {req.get('op')} failed (rc {rc}):\n{out}\n{err[-3000:]}"
        return json.loads(out.strip().splitlines()[-1])

    def volume(self, name, size):
        path = f"/root/{name}.img"
        self.bed.dom0(f"rm -f {path}; truncate -s {size} {path}", check=True)
        return path, "pyblkback://" + path

    def plug(self, uri, **kw):
        r = self.call(op="plug", uri=uri, domain=self.guest.domid, **kw)
        name = r["device"]
        self.sh(f"i=0; while [ ! -b /dev/{name} ]; do i=$((i+1)); [ $i -gt 300 ] && exit 1; "
                "sleep .2; done", timeout=90)
        return r

    def unplug(self, uri, r, **kw):
        self.call(op="unplug", uri=uri, domain=self.guest.domid, vbd=r["vbd"], **kw)
        name = r["device"]
        self.sh(f"i=0; while [ -b /dev/{name} ]; do i=$((i+1)); [ $i -gt 300 ] && exit 1; "
                "sleep .2; done", timeout=90)

    def sh(self, cmd, timeout=120, check=True):
        return self.guest.run(cmd, timeout=timeout, check=check)

    def md5_dom0(self, path, length):
        rc, out, _ = self.bed.dom0(f"head -c {length} {path} | md5sum", timeout=60)
        return out.split()[0]

    def assert_clean(self, uri):
        c = self.call(op="check", uri=uri, guest=self.guest.domid)
        assert c["procs"] == [] and c["states"] == [] and c["sockets"] == [], c
        assert c["overlays"] == [], c
        assert c["nodes"] == [], c


@pytest.fixture(scope="module")
def pbb(bed):
    bed.dom0([VENV + "/bin/xapi-storage", "install", "--root", ROOT, "--observer-python", PY],
             timeout=300, check=True)
    g = bed.start_guest("pbb")
    yield Pbb(bed, g)
    if bed.alive() and "pbb" in bed.guests:
        bed.stop_guest("pbb")


def _fio_ok(res):
    assert res.rc == 0, res.stderr + res.stdout
    assert res.stdout.split(";")[4] == "0", res.stdout             # no error


MKFS, FSCK = "/usr/sbin/mkfs.ext4", "/usr/sbin/fsck.ext4"     # e2fsprogs' (busybox's know no ext4)
FILES = ("a", "b", "fio.dat")


def test_ext4_and_fio_verify_in_the_guest_then_dom0_checks_it_over_nbd(pbb):
    """The guest makes, fills and checks an ext4 file system on its pyblkback disk (fio crc32c
    verify on a file in it); dom0 then plugs the volume as xapi does for a VDI copy, through
    the kernel's NBD client on the attach result's Nbd export: the same files, the same md5s,
    fsck clean, and nothing connected afterwards; after the unplug dom0's file holds it all."""
    path, uri = pbb.volume("pbb-a", "64M")
    r = pbb.plug(uri)
    disk = dict(r["result"]["implementations"])["XenDisk"]
    assert disk["backend_type"] == "qdisk" and disk["params"].count(":") == 1
    name = r["device"]
    assert pbb.sh(f"cat /sys/block/{name}/size").stdout.strip() == str(64 * MIB // 512)
    pbb.sh(f"{MKFS} -q -F /dev/{name} && mkdir -p /mnt/pbb && "
           f"mount -t ext4 /dev/{name} /mnt/pbb && "
           "dd if=/dev/urandom of=/mnt/pbb/a bs=64k count=16 2>/dev/null && "
           "dd if=/dev/urandom of=/mnt/pbb/b bs=4k count=3 2>/dev/null", timeout=300)
    _fio_ok(pbb.sh(FIO.format(d=name, bs="16k", size="4M", engine="libaio", depth=8)
                   .replace(f"/dev/{name}", "/mnt/pbb/fio.dat"), timeout=600))
    sums = pbb.sh("md5sum " + " ".join("/mnt/pbb/" + f for f in FILES) +
                  " && umount /mnt/pbb").stdout.split()
    md5 = dict(zip(FILES, sums[0::2]))
    fsck = pbb.sh(f"{FSCK} -fn /dev/{name}", timeout=300, check=False)
    assert fsck.rc == 0, fsck.stdout + fsck.stderr
    got = pbb.call(op="nbd_check", uri=uri, files=list(FILES))
    assert got["size"] == 64 * MIB, got
    assert got["md5"] == md5, got
    assert got["fsck"]["rc"] == 0, got["fsck"]["out"]
    assert got["disconnect"]["rc"] == 0, got["disconnect"]["out"]
    assert got["left"] == {"connected": [], "size": 0, "clients": []}, got["left"]
    pbb.unplug(uri, r)
    rc, out, err = pbb.bed.dom0(f"{FSCK} -fn {path} >/dev/null && for f in {' '.join(FILES)}; "
                                f"do debugfs -R \"cat /$f\" {path} 2>/dev/null | md5sum; done",
                                timeout=300)
    assert rc == 0, out + err
    assert [ln.split()[0] for ln in out.splitlines()] == [md5[f] for f in FILES]
    pbb.assert_clean(uri)


def test_a_server_killed_under_fio_load_resumes_the_ring(pbb):
    """Three times during one fio run (write, then verify) the server is SIGKILLed, and the
    next Datapath.activate starts it again: the ring goes on where it stopped (a batch the
    dead server had answered but not published is served again: queue.Journal), and fio
    finds every acknowledged write."""
    path, uri = pbb.volume("pbb-b", "64M")
    r = pbb.plug(uri)
    name = r["device"]
    fio = FIO.format(d=name, bs="16k", size="24M", engine="libaio", depth=16)
    pbb.sh(f"rm -f /tmp/fio.rc; ({fio} > /tmp/fio.out 2>&1; echo $? > /tmp/fio.rc) "
           "</dev/null >/dev/null 2>&1 &")
    for _ in range(3):
        time.sleep(3)
        pid = pbb.call(op="kill", uri=uri)["pid"]              # under load, no warning
        pbb.call(op="activate", uri=uri, domain=pbb.guest.domid)    # the next call starts it
        assert pbb.call(op="pid", uri=uri)["pid"] not in (None, pid)
    done = pbb.sh("i=0; while [ ! -f /tmp/fio.rc ]; do i=$((i+1)); [ $i -gt 1200 ] && exit 1; "
                  "sleep .5; done", timeout=700, check=False)
    if done.rc != 0:                     # what the guest's kernel and the servers said
        dmesg = pbb.sh("dmesg | tail -40", check=False).stdout
        _rc, logs, _err = pbb.bed.dom0("tail -n 60 /var/log/xapi-storage/*", timeout=60)
        pytest.fail(f"fio never finished\n--- guest dmesg\n{dmesg}\n--- dom0 logs\n{logs}")
    rc = pbb.sh("cat /tmp/fio.rc").stdout.strip()
    out = pbb.sh("cat /tmp/fio.out").stdout
    # how many kills landed inside a batch (informational: a kill may fall between batches)
    _rc, again, _err = pbb.bed.dom0("cat /var/log/xapi-storage/pyblkback-*.log | "
                                    "grep -c 'of the previous server served again'", timeout=60)
    print(f"kills that left a batch to serve again: {again.strip()}")
    assert rc == "0", out
    assert out.split(";")[4] == "0", out                     # verify clean: nothing lost
    pbb.unplug(uri, r)
    pbb.assert_clean(uri)


def test_a_nonpersistent_disk_leaves_its_gold_image_unchanged(pbb):
    path, uri = pbb.volume("pbb-c", "32M")
    pbb.bed.dom0(f"dd if=/dev/urandom of={path} bs=1M count=32 conv=notrunc 2>/dev/null",
                 check=True)
    before = pbb.md5_dom0(path, 32 * MIB)
    r = pbb.plug(uri, open=True)
    name = r["device"]
    _fio_ok(pbb.sh(FIO.format(d=name, bs="64k", size="8M", engine="psync", depth=1),
                   timeout=600))
    # the server killed and started again: the guest still reads what it wrote (its
    # overlay is taken over with the device), not the gold image
    read8 = (f"echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/{name} bs=1M count=8 "
             "2>/dev/null | md5sum")                # from the disk, not the guest's cache
    wrote = pbb.sh(read8, timeout=300).stdout.split()[0]
    assert wrote != pbb.md5_dom0(path, 8 * MIB)
    pid = pbb.call(op="kill", uri=uri)["pid"]
    pbb.call(op="activate", uri=uri, domain=pbb.guest.domid)
    assert pbb.call(op="pid", uri=uri)["pid"] not in (None, pid)
    again = pbb.sh(read8, timeout=300).stdout.split()[0]
    assert again == wrote
    pbb.unplug(uri, r, close=True)
    assert pbb.md5_dom0(path, 32 * MIB) == before
    r = pbb.plug(uri)                                          # booted again: the gold image
    gsum = pbb.sh(f"dd if=/dev/{r['device']} bs=1M count=32 2>/dev/null | md5sum").stdout
    assert gsum.split()[0] == before
    pbb.unplug(uri, r)
    pbb.assert_clean(uri)


def test_a_hard_unplug_and_the_domain_destroyed_leave_nothing(pbb):
    """Last: the guest is destroyed. Every grant is unmapped when the backend directory
    vanishes, so the domain goes completely (no zombie waiting for dom0's mappings)."""
    path, uri = pbb.volume("pbb-d", "32M")
    r = pbb.plug(uri)
    _fio_ok(pbb.sh(FIO.format(d=r["device"], bs="4k", size="2M", engine="psync", depth=1),
                   timeout=600))
    pbb.call(op="unplug", uri=uri, domain=pbb.guest.domid, vbd=r["vbd"], hard=True)
    pbb.assert_clean(uri)
    domid = pbb.guest.domid
    pbb.bed.stop_guest("pbb")
    deadline = time.monotonic() + 60
    while True:
        rc, out, _ = pbb.bed.dom0("xl list", timeout=60)
        ids = [line.split()[1] for line in out.splitlines()[1:] if len(line.split()) > 1]
        if str(domid) not in ids:
            break
        assert time.monotonic() < deadline, f"domain {domid} lingers:\n{out}"
        time.sleep(1)
