"""pyblkback on real Xen: `xapi-storage blkback connect` in dom0 of the test bed serves a file
to the PV guest's own xen-blkfront (Linux 6.1), which sees a disk, writes and reads it.

Every scenario: start the server (bed.spawn), wait for backend and frontend Connected,
use the disk from the guest, check dom0's file, stop the server, check that every XenStore
node it wrote is gone and that the guest saw the disk go away.
"""

import json
import re
import time

import pytest

pytestmark = pytest.mark.xen

VENV = "/opt/xapi-storage/venv"
XAPI_STORAGE = VENV + "/bin/xapi-storage"
FIO_VERIFY = ("fio --name=verify --filename=/dev/{d} --rw=randwrite --bs=4k --size={size} "
              "--direct=1 --ioengine=psync --verify=crc32c --verify_fatal=1 --do_verify=1 "
              "--thread --output-format=terse --terse-version=3")


def _xs_tree(bed, *paths):
    """`xenstore-ls -f` of each path (an absent path gives nothing)."""
    out = []
    for p in paths:
        rc, o, _ = bed.dom0(["xenstore-ls", "-f", p], timeout=30)
        if rc == 0:
            out += o.splitlines()
    return sorted(out)


def _read(bed, path):
    rc, out, _ = bed.dom0(["xenstore-read", path], timeout=30)
    return out.strip() if rc == 0 else None


def _wait(what, fn, timeout, srv=None, interval=0.5):
    end = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if srv is not None and srv.poll() is not None:
            res = srv.stop()
            raise AssertionError(f"server exited (rc {res.rc}) while waiting for {what}:\n"
                                 f"{res.stderr[-3000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Served:
    """One `xapi-storage blkback connect` run in dom0, with its XenStore paths."""

    def __init__(self, bed, guest, path, *args):
        self.bed, self.guest = bed, guest
        self.stats = "/root/pyb-%d.stats.json" % time.monotonic_ns()
        self.before = self.snapshot()
        self.srv = bed.spawn([XAPI_STORAGE, "blkback", "connect", guest.name, "--path", path,
                              "--stats", self.stats, "-v"] + list(args), name="pyblkback")
        base = "/local/domain/0/backend/pyvbd/%d" % guest.domid

        def found():
            rc, out, _ = bed.dom0(["xenstore-list", base], timeout=30)
            return out.split() if rc == 0 and out.split() else None
        devids = _wait("the backend directory", found, 60, self.srv)
        assert len(devids) == 1, devids
        self.devid = devids[0]
        self.be = "%s/%s" % (base, self.devid)
        self.fe = "/local/domain/%d/device/vbd/%s" % (guest.domid, self.devid)
        assert _read(bed, self.be + "/frontend") == self.fe
        self.name = _read(bed, self.be + "/dev")
        _wait("backend and frontend Connected",
              lambda: _read(bed, self.be + "/state") == "4" and _read(bed, self.fe + "/state")
              == "4", 90, self.srv)

    def snapshot(self):
        return _xs_tree(self.bed, "/local/domain/0/backend", "/local/domain/0/error",
                        "/local/domain/%d/device" % self.guest.domid,
                        "/local/domain/%d/error" % self.guest.domid)

    def read_stats(self):
        rc, out, _ = self.bed.dom0(["cat", self.stats], timeout=30)
        return json.loads(out) if rc == 0 and out.strip() else None

    def stop(self):
        res = self.srv.stop(timeout=60)
        return res


def _guest_wait_disk(guest, name, timeout=60):
    guest.run("for i in $(seq %d); do [ -b /dev/%s ] && break; sleep 0.2; done; [ -b /dev/%s ]"
              % (timeout * 5, name, name), timeout=timeout + 10, check=True)


def _dmesg_problems(lines):
    """Kernel trouble, or blkfront complaining (about a response, a grant, the state)."""
    return [l for l in lines if re.search(r"BUG|WARNING|Oops|Call Trace", l) or
            (re.search(r"blkfront|blkif|vbd|xvd", l) and
             re.search(r"error|fail|disabled|refus|not unmapped|bad|invalid", l, re.I))]


def _guest_dmesg(guest):
    return guest.run("dmesg", timeout=30).stdout


def test_guest_writes_and_reads_a_file_served_by_pyblkback(bed, guest):
    bed.dom0("rm -f /root/pyb.img; truncate -s 32M /root/pyb.img", check=True)
    dmesg_before = len(_guest_dmesg(guest).splitlines())
    s = Served(bed, guest, "/root/pyb.img")
    try:
        _guest_wait_disk(guest, s.name)
        assert guest.run("cat /sys/block/%s/size" % s.name, check=True).stdout.strip() == \
            str(32 << 11)
        # fio: random 4 KiB writes, each read back and checked (crc32c), O_DIRECT
        res = guest.run(FIO_VERIFY.format(d=s.name, size="1M"), timeout=300)
        assert res.rc == 0, res.stderr + res.stdout
        assert res.stdout.split(";")[4] == "0", res.stdout
        # a marker at a known place, flushed, then read back through the page cache's back
        guest.run("echo PYBLKBACK-MARK-%s | dd of=/dev/%s bs=512 seek=50000 conv=fsync "
                  "2>/dev/null" % (s.name, s.name), check=True)
        guest.run("echo 3 > /proc/sys/vm/drop_caches", check=True)
        out = guest.run("dd if=/dev/%s bs=512 skip=50000 count=1 2>/dev/null | head -n1"
                        % s.name, check=True).stdout
        assert out.strip() == "PYBLKBACK-MARK-" + s.name
        # dom0's file holds what the guest wrote
        rc, out, _ = bed.dom0("dd if=/root/pyb.img bs=512 skip=50000 count=1 2>/dev/null | "
                              "head -n1", timeout=30)
        assert out.strip() == "PYBLKBACK-MARK-" + s.name
        gsum = guest.run("dd if=/dev/%s bs=4k count=512 2>/dev/null | md5sum" % s.name,
                         timeout=120, check=True).stdout.split()[0]
        rc, out, _ = bed.dom0("dd if=/root/pyb.img bs=4k count=512 2>/dev/null | md5sum",
                              timeout=60)
        assert out.split()[0] == gsum
        stats = s.read_stats()
        assert stats["state"] == "Connected"
        assert stats["requests"]["write"] > 0 and stats["requests"]["read"] > 0
        assert stats["requests"]["flush"] > 0 and stats["errors"] == 0
        assert s.srv.poll() is None
    finally:
        res = s.stop()
    assert res.rc == 0, res.stderr
    assert "removed %s and %s" % (s.fe, s.be) in res.stderr, res.stderr
    # every node it wrote is gone, nothing else changed
    assert s.snapshot() == s.before
    # the guest saw the disk go away cleanly: no device, no error from blkfront
    guest.run("for i in $(seq 50); do [ -b /dev/%s ] || break; sleep 0.2; done; "
              "[ ! -b /dev/%s ]" % (s.name, s.name), timeout=30, check=True)
    new = _guest_dmesg(guest).splitlines()[dmesg_before:]
    assert not _dmesg_problems(new), "\n".join(new)
