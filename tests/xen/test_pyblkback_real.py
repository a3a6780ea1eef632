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

from xapi_storage.compat import monotonic_ns

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
        self.stats = "/root/pyb-%d.stats.json" % monotonic_ns()
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

    def stats_when(self, what, pred, timeout=20):
        """The stats once `pred(stats)` holds. The server rewrites its stats file about once
        a second, so a read right after the guest's I/O can miss the last second of it."""
        last = [None]

        def ok():
            last[0] = self.read_stats()
            return last[0] is not None and pred(last[0])
        try:
            _wait("the stats file to show " + what, ok, timeout, self.srv)
        except AssertionError as e:
            raise AssertionError(f"{e}; last stats: {last[0]}") from None
        return last[0]

    def stop(self):
        res = self.srv.stop(timeout=60)
        return res


def _guest_wait_disk(guest, name, timeout=60):
    guest.run("for i in $(seq %d); do [ -b /dev/%s ] && break; sleep 0.2; done; [ -b /dev/%s ]"
              % (timeout * 5, name, name), timeout=timeout + 10, check=True)


def _dmesg_problems(lines):
    """Kernel trouble, or blkfront complaining (about a response, a grant, the state)."""
    lines = [l for l in lines if not re.search(r"blkfront: \w+: (flush diskcache|barrier or "
                                               r"flush):", l)]      # the feature summary
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
        # 128 KiB requests: blkfront sends them as indirect requests (32 segments)
        res = guest.run(FIO_VERIFY.format(d=s.name, size="1M").replace("--bs=4k", "--bs=128k")
                        .replace("--rw=randwrite", "--rw=write"), timeout=300)
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
        # conv=fsync above sent a flush (blkfront uses FLUSH_DISKCACHE when the backend
        # offers feature-flush-cache; its dmesg line says whether it took the offer)
        try:
            stats = s.stats_when("a flush", lambda st: st["requests"]["flush"] > 0)
        except AssertionError as e:
            feat = [l for l in _guest_dmesg(guest).splitlines() if s.name + ": flush" in l
                    or s.name + ": barrier" in l]
            raise AssertionError(f"{e}\nguest's blkfront said: {feat}") from None
        assert stats["state"] == "Connected"
        assert stats["requests"]["write"] > 0 and stats["requests"]["read"] > 0
        assert stats["errors"] == 0
        assert stats["indirect_requests"] > 0 and stats["persistent_negotiated"]
        # single-page requests on persistent grants went through the C batch (_pio, built
        # by pip in dom0) straight into the real grant mappings
        assert stats["c_batched_requests"] > 0, stats
        assert s.srv.poll() is None
    finally:
        res = s.stop()
    _check_clean(s, guest, dmesg_before, res)


def _check_clean(s, guest, dmesg_before, res):
    """After the server stopped: it exited 0 and removed its nodes, every node it wrote is
    gone and nothing else changed, and the guest saw the disk go away with no blkfront error."""
    assert res.rc == 0, res.stderr
    assert "removed %s and %s" % (s.fe, s.be) in res.stderr, res.stderr
    assert s.snapshot() == s.before
    guest.run("for i in $(seq 150); do [ -b /dev/%s ] || break; sleep 0.2; done; "
              "[ ! -b /dev/%s ]" % (s.name, s.name), timeout=60, check=True)
    new = _guest_dmesg(guest).splitlines()[dmesg_before:]
    assert not _dmesg_problems(new), "\n".join(new)


def _stop_and_check_clean(s, guest, dmesg_before):
    res = s.stop()
    _check_clean(s, guest, dmesg_before, res)
    return res


def _md5(bed, path):
    return bed.dom0(["md5sum", path], timeout=60, check=True).stdout.split()[0]


def _put_marker(bed, path, text, sector):
    bed.dom0("printf '%%s\\n' %s | dd of=%s bs=512 seek=%d conv=notrunc 2>/dev/null"
             % (text, path, sector), timeout=30, check=True)


def _guest_read_marker(guest, name, sector):
    return guest.run("dd if=/dev/%s bs=512 skip=%d count=1 2>/dev/null | head -n1"
                     % (name, sector), timeout=60, check=True).stdout.strip()


def test_readonly_disk_refuses_guest_writes(bed, guest):
    bed.dom0("rm -f /root/pyb-ro.img; truncate -s 16M /root/pyb-ro.img", check=True)
    _put_marker(bed, "/root/pyb-ro.img", "READONLY-GOLD", 2048)
    before = _md5(bed, "/root/pyb-ro.img")
    dmesg_before = len(_guest_dmesg(guest).splitlines())
    s = Served(bed, guest, "/root/pyb-ro.img", "--readonly")
    try:
        assert _read(bed, s.be + "/mode") == "r" and _read(bed, s.be + "/info") == "4"
        _guest_wait_disk(guest, s.name)
        assert guest.run("cat /sys/block/%s/ro" % s.name, check=True).stdout.strip() == "1"
        assert _guest_read_marker(guest, s.name, 2048) == "READONLY-GOLD"
        # the kernel refuses to open a read-only disk for writing
        res = guest.run("echo X | dd of=/dev/%s bs=512 seek=10 conv=fsync" % s.name)
        assert res.rc != 0, res
        # even with the guest's own flag flipped (blockdev --setrw), Linux 6.1's block layer
        # fails an O_DIRECT write to a disk blkfront marked read-only (EPERM) before it
        # reaches the ring; a guest that does send one gets BLKIF_RSP_ERROR (that path is
        # tested against the simulated Xen's hostile frontend, tests/blkback)
        guest.run("blockdev --setrw /dev/%s" % s.name)
        res = guest.run("fio --name=w --filename=/dev/%s --rw=write --bs=4k --size=4k "
                        "--direct=1 --ioengine=psync --thread" % s.name, timeout=120)
        assert res.rc != 0 and "Operation not permitted" in res.stderr + res.stdout, res
        stats = s.stats_when("reads", lambda st: st["requests"]["read"] > 0)
        assert stats["readonly"], stats
        assert stats["requests"]["write"] == 0 and stats["bytes"]["write"] == 0, stats
    finally:
        _stop_and_check_clean(s, guest, dmesg_before)
    assert _md5(bed, "/root/pyb-ro.img") == before


def test_cow_backend_leaves_the_gold_image_unchanged(bed, guest):
    bed.dom0("rm -f /root/gold.img; truncate -s 16M /root/gold.img", check=True)
    _put_marker(bed, "/root/gold.img", "GOLD-IMAGE", 4096)
    before = _md5(bed, "/root/gold.img")
    dmesg_before = len(_guest_dmesg(guest).splitlines())
    s = Served(bed, guest, "/root/gold.img", "--backend", "cow")
    try:
        _guest_wait_disk(guest, s.name)
        assert _guest_read_marker(guest, s.name, 4096) == "GOLD-IMAGE"
        guest.run("echo OVERLAY-DATA | dd of=/dev/%s bs=512 seek=4096 conv=fsync 2>/dev/null"
                  % s.name, check=True)
        guest.run("echo 3 > /proc/sys/vm/drop_caches", check=True)
        assert _guest_read_marker(guest, s.name, 4096) == "OVERLAY-DATA"
        res = guest.run(FIO_VERIFY.format(d=s.name, size="512k"), timeout=300)
        assert res.rc == 0, res.stderr + res.stdout
        stats = s.stats_when("writes", lambda st: st["requests"]["write"] > 0)
        assert stats["storage"] == "cow"
        # nothing reached the gold image while it was served
        assert _md5(bed, "/root/gold.img") == before
    finally:
        _stop_and_check_clean(s, guest, dmesg_before)
    assert _md5(bed, "/root/gold.img") == before


UNPLUG = """
import sys
from xapi_storage.blkback import toolstack
from xapi_storage.blkback.server import XenStore
from xapi_storage.xen.real import xenstore_socket
xs = XenStore(xenstore_socket())
toolstack.unplug(xs, sys.argv[1])
xs.close()
"""


def test_toolstack_unplug_stops_the_server(bed, guest):
    """What `xl block-detach` does: online=0 and state=5 in one transaction."""
    bed.dom0("rm -f /root/pyb-u.img; truncate -s 8M /root/pyb-u.img", check=True)
    dmesg_before = len(_guest_dmesg(guest).splitlines())
    s = Served(bed, guest, "/root/pyb-u.img")
    try:
        _guest_wait_disk(guest, s.name)
        bed.dom0([VENV + "/bin/python", "-c", UNPLUG, s.be], timeout=60, check=True)
        _wait("the server to exit after the unplug", lambda: s.srv.poll() is not None, 60)
    finally:
        res = _stop_and_check_clean(s, guest, dmesg_before)
    assert "Destroyed" in res.stderr


def test_no_persistent_grants_deep_queue_discard_and_online_resize(bed, guest):
    """Grants mapped and unmapped per request (blkfront checks each is unmapped before the
    response), 16 requests in flight, discard punching holes in dom0's file, and a file
    grown in dom0 announced to the connected guest."""
    bed.dom0("rm -f /root/pyb-np.img; truncate -s 16M /root/pyb-np.img", check=True)
    dmesg_before = len(_guest_dmesg(guest).splitlines())
    s = Served(bed, guest, "/root/pyb-np.img", "--no-persistent")
    try:
        _guest_wait_disk(guest, s.name)
        res = guest.run("fio --name=v --filename=/dev/%s --rw=randwrite --bs=4k --size=1M "
                        "--direct=1 --ioengine=libaio --iodepth=16 --verify=crc32c "
                        "--verify_fatal=1 --do_verify=1 --thread --output-format=terse "
                        "--terse-version=3" % s.name, timeout=300)
        assert res.rc == 0 and res.stdout.split(";")[4] == "0", res.stderr + res.stdout
        # discard: data written from dom0, trimmed by the guest, is a hole in the file
        bed.dom0("dd if=/dev/urandom of=/root/pyb-np.img bs=1M count=4 seek=8 "
                 "conv=notrunc,fsync 2>/dev/null", check=True)
        res = guest.run("fio --name=t --filename=/dev/%s --rw=trim --bs=1M --offset=8M "
                        "--size=4M --thread" % s.name, timeout=120)
        assert res.rc == 0, res
        assert bed.dom0("cmp -n 4194304 -i 8388608 /root/pyb-np.img /dev/zero",
                        timeout=30).rc == 0
        # online resize: grow the file; the guest's disk grows while connected
        bed.dom0("truncate -s 24M /root/pyb-np.img", check=True)
        guest.run("for i in $(seq 100); do [ $(cat /sys/block/%s/size) = %d ] && break; "
                  "sleep 0.2; done; [ $(cat /sys/block/%s/size) = %d ]"
                  % (s.name, 24 << 11, s.name, 24 << 11), timeout=60, check=True)
        assert _read(bed, s.be + "/sectors") == str(24 << 11)
        stats = s.stats_when("a discard", lambda st: st["requests"]["discard"] > 0)
        assert not stats["persistent_negotiated"] and stats["persistent_grants"] == 0
        assert stats["ring_occupancy"]["max"] > 1 and stats["errors"] == 0, stats
        assert stats["grant_map_calls"] >= stats["requests"]["write"] > 0, stats
    finally:
        _stop_and_check_clean(s, guest, dmesg_before)


def test_multi_queue_multi_page_guest_destroyed_while_connected(bed):
    """A 2-vCPU guest whose blkfront asks for 4-page rings: 2 rings (queue-0, queue-1) of 4
    pages each, both served. Then the guest
    is destroyed while connected: the server sees the frontend vanish, unmaps its grants
    (else the domain would linger as a zombie), removes its nodes and exits 0."""
    bed.dom0("rm -f /root/pyb-mq.img; truncate -s 16M /root/pyb-mq.img", check=True)
    g = bed.start_guest("pybmq", vcpus=2)
    destroyed = False
    try:
        # stock blkfront uses one ring page; reload it asking for 4-page rings
        ko = g.run("grep xen-blkfront /etc/modules.order", check=True).stdout.strip()
        g.run("rmmod xen_blkfront && insmod %s max_ring_page_order=2" % ko, timeout=60,
              check=True)
        s = Served(bed, g, "/root/pyb-mq.img")
        try:
            assert _read(bed, s.fe + "/multi-queue-num-queues") == "2"
            assert _read(bed, s.fe + "/ring-page-order") == "2"
            assert _read(bed, s.fe + "/queue-1/ring-ref3") is not None
            assert _read(bed, s.fe + "/queue-1/event-channel") is not None
            _guest_wait_disk(g, s.name)
            res = g.run("fio --name=v --filename=/dev/%s --rw=randwrite --bs=4k --size=512k "
                        "--offset_increment=512k --numjobs=2 --direct=1 --ioengine=libaio "
                        "--iodepth=8 --verify=crc32c --verify_fatal=1 --do_verify=1 --thread "
                        "--group_reporting --output-format=terse --terse-version=3" % s.name,
                        timeout=300)
            assert res.rc == 0, res.stderr + res.stdout
            stats = s.stats_when("the verify reads", lambda st: st["requests"]["read"] >= 256)
            assert stats["queues"] == 2 and stats["errors"] == 0, stats
            assert stats["ring_slots"] == 128, stats                 # 4 pages of 32
            assert _read(bed, s.be + "/state") == "4"
            bed.stop_guest(g.name)                        # xl destroy, while connected
            destroyed = True
            _wait("the server to exit after the guest died", lambda: s.srv.poll() is not None,
                  60)
        finally:
            res = s.stop()
        assert res.rc == 0, res.stderr
        assert "removed %s and %s" % (s.fe, s.be) in res.stderr, res.stderr
        assert _xs_tree(bed, "/local/domain/0/backend/pyvbd", "/local/domain/0/error") == []
        # no zombie: the domain is gone from Xen, not left dying with mapped pages
        _wait("the domain to be gone", lambda: str(g.domid) not in [
            l.split()[1] for l in bed.dom0("xl list", timeout=30).stdout.splitlines()[1:]], 30)
    finally:
        if not destroyed:
            bed.stop_guest(g.name)


def test_guest_unbinds_blkfront_then_frontend_returns_to_initialising(bed, guest):
    """Guest-initiated close (spec §3.5 B): the guest unbinds blkfront from the device, the
    frontend goes Closed, the server answers Closed and stays (online=1). When the frontend
    comes back to Initialising (written here from dom0: Linux 6.1's blkfront does not do it by
    itself on a re-bind), the server offers the device again (InitWait)."""
    bed.dom0("rm -f /root/pyb-c.img; truncate -s 8M /root/pyb-c.img", check=True)
    dmesg_before = len(_guest_dmesg(guest).splitlines())
    s = Served(bed, guest, "/root/pyb-c.img")
    try:
        _guest_wait_disk(guest, s.name)
        guest.run("echo vbd-%s > /sys/bus/xen/drivers/vbd/unbind" % s.devid, timeout=60,
                  check=True)
        _wait("frontend and backend Closed", lambda: _read(bed, s.fe + "/state") == "6" and
              _read(bed, s.be + "/state") == "6", 60, s.srv)
        assert guest.run("[ -b /dev/%s ]" % s.name).rc != 0
        time.sleep(1)
        assert s.srv.poll() is None, "the server left although the toolstack did not unplug"
        bed.dom0(["xenstore-write", s.fe + "/state", "1"], timeout=30, check=True)
        _wait("backend InitWait again", lambda: _read(bed, s.be + "/state") == "2", 60, s.srv)
    finally:
        _stop_and_check_clean(s, guest, dmesg_before)


def test_two_servers_two_disks_in_one_guest(bed, guest):
    """A second `connect` to the same guest picks the next free device (xvdc) while the
    first is connected; each disk's data lands in its own file."""
    bed.dom0("rm -f /root/pyb-a.img /root/pyb-b.img; truncate -s 8M /root/pyb-a.img; "
             "truncate -s 12M /root/pyb-b.img", check=True)
    dmesg_before = len(_guest_dmesg(guest).splitlines())
    a = Served(bed, guest, "/root/pyb-a.img")
    try:
        before_b = _xs_tree(bed, "/local/domain/0/backend/pyvbd/%d/%s" % (guest.domid,
                                                                         a.devid))
        b = Served.__new__(Served)
        b.bed, b.guest = bed, guest
        b.stats = "/root/pyb-b.stats.json"
        b.before = a.before
        b.srv = bed.spawn([XAPI_STORAGE, "blkback", "connect", str(guest.domid), "--path",
                           "/root/pyb-b.img", "--stats", b.stats], name="pyblkback-b")
        try:
            b.be = "/local/domain/0/backend/pyvbd/%d/51744" % guest.domid
            b.fe = "/local/domain/%d/device/vbd/51744" % guest.domid
            b.devid, b.name = "51744", "xvdc"
            _wait("the second disk Connected", lambda: _read(bed, b.be + "/state") == "4" and
                  _read(bed, b.fe + "/state") == "4", 90, b.srv)
            assert _read(bed, b.be + "/dev") == "xvdc"
            _guest_wait_disk(guest, a.name)
            _guest_wait_disk(guest, "xvdc")
            assert guest.run("cat /sys/block/xvdc/size", check=True).stdout.strip() == \
                str(12 << 11)
            for d in (a.name, "xvdc"):
                guest.run("echo DISK-%s | dd of=/dev/%s bs=512 seek=7 conv=fsync 2>/dev/null"
                          % (d, d), check=True)
            for f, d in (("/root/pyb-a.img", a.name), ("/root/pyb-b.img", "xvdc")):
                out = bed.dom0("dd if=%s bs=512 skip=7 count=1 2>/dev/null | head -n1" % f,
                               timeout=30).stdout
                assert out.strip() == "DISK-" + d
        finally:
            res = b.srv.stop(timeout=60)
        assert res.rc == 0, res.stderr
        # the first device is untouched by the second's teardown
        assert _xs_tree(bed, "/local/domain/0/backend/pyvbd/%d/%s" % (guest.domid, a.devid)) \
            == before_b
        assert _read(bed, a.be + "/state") == "4" and a.srv.poll() is None
    finally:
        _stop_and_check_clean(a, guest, dmesg_before)
