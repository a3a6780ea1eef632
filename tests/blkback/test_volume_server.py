"""The per-volume server: qdisk devices plugged as xenopsd plugs them are adopted by
`sm-data/pyblkback-id`, served from state 1, unplugged cleanly or hard, re-adopted by a
restarted server; non-persistent overlays per device; the server ends when idle."""

import os
import select
import signal
import subprocess
import sys
import threading
import time

import pytest

from xapi_storage.blkback.frontend import Frontend
from xapi_storage.blkback.server import XenStore
from xapi_storage.blkback.volume_server import SM_KEY, VolumeServer, call, ctl_path, nbd_path
from xapi_storage.toolstack import xenopsd

from .test_server import wait_for


def result(vid, run_dir):
    return {"implementations": [
        ["XenDisk", {"backend_type": "qdisk", "params": f"pyblkback:{vid}",
                     "extra": {SM_KEY: vid}}],
        ["Nbd", {"uri": f"nbd:unix:{nbd_path(run_dir, vid)}:exportname={vid}"}]]}


class InThread:
    def __init__(self, sim, disk, run_dir, vid="vol1", **kw):
        self.vs = VolumeServer(sim.xen(0), vid, str(disk), run_dir=str(run_dir),
                               domains=["1"], **kw)
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.vs.run()
        except BaseException as e:                        # noqa: BLE001 - checked in close
            self.error = e

    def close(self):
        self.vs.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.vs.close()
        if self.error:
            raise self.error


@pytest.fixture
def rig(simxen_guest, disk, tmp_path):
    sim, g = simxen_guest
    xs = XenStore(sim.xenstore_path(0))
    srv = InThread(sim, disk, tmp_path / "run")
    try:
        yield sim, g, xs, srv, tmp_path / "run"
    finally:
        srv.close()
        xs.close()


def test_adopts_its_qdisk_serves_it_and_a_clean_unplug_ends_it(rig, disk):
    sim, g, xs, srv, run = rig
    other = xenopsd.plug(xs, g, result("someone-else", str(run)))      # not ours
    vbd = xenopsd.plug(xs, g, result("vol1", str(run)))
    fe = Frontend(sim.xen(g), vbd.devid)
    fe.connect()
    fe.write(0, b"q" * 8192)
    assert fe.read(0, 16) == b"q" * 8192
    assert disk.read_bytes()[:8192] == b"q" * 8192
    assert [d.be_path for d in srv.vs.server.devices.values()] == [vbd.be]
    assert xs.read(f"{other.be}/state") == "1"                         # left alone
    keys = {k: xs.read(f"{vbd.be}/{k}") for k in ("hotplug-status", "physical-device-path",
                                                 "params", "qemu-params", "online")}
    assert keys["qemu-params"] == "pyblkback:vol1" and keys["hotplug-status"] == "connected"
    # the clean unplug of xenopsd: online=0 + state 5; the guest closes; we write 6
    t = threading.Thread(target=xenopsd.clean_unplug, args=(xs, vbd))
    t.start()
    wait_for(lambda: xs.read(f"{vbd.be}/state") == "5", what="Closing")
    fe.close()
    t.join(15)
    assert not t.is_alive()
    assert xs.read(vbd.be) is None                                    # xenopsd removed it
    wait_for(lambda: not srv.vs.server.devices, what="the device gone")
    xenopsd.hard_unplug(xs, other)


def test_a_hard_unplug_unmaps_every_grant_at_once(rig):
    sim, g, xs, srv, run = rig
    vbd = xenopsd.plug(xs, g, result("vol1", str(run)))
    fe = Frontend(sim.xen(g), vbd.devid)
    fe.connect()
    fe.write(0, b"h" * 65536)
    assert srv.vs.server.persistent_maps > 0
    for p in (vbd.fe, vbd.fe_ro, vbd.be):                              # the VM is destroyed
        xs.rm(p)
    wait_for(lambda: not srv.vs.server.devices and srv.vs.server.persistent_maps == 0
             and not srv.vs.server.ports, timeout=2, what="every grant unmapped")
    fe.close(timeout=0.1)                                             # every grant revocable
    xenopsd.remove(xs, vbd)


def test_cdrom_and_read_only_modes(rig):
    sim, g, xs, srv, run = rig
    vbd = xenopsd.plug(xs, g, result("vol1", str(run)), readonly=True, device_type="cdrom")
    fe = Frontend(sim.xen(g), vbd.devid)
    fe.connect()
    try:
        assert int(xs.read(f"{vbd.be}/info")) == 0x1 | 0x4            # CDROM | READONLY
        with pytest.raises(Exception):
            fe.write(0, b"w" * 4096)
    finally:
        fe.close()
    xenopsd.hard_unplug(xs, vbd)


def test_nonpersistent_gives_each_guest_its_own_overlay(simxen, disk, tmp_path):
    sim = simxen
    g1, g2 = sim.create_domain("a"), sim.create_domain("b")
    gold = disk.read_bytes()
    xs = XenStore(sim.xenstore_path(0))
    srv = InThread(sim, disk, tmp_path / "run", nonpersistent=True)
    try:
        assert srv.vs.nbd.exports["vol1"].info.readonly        # the gold image, read-only
        v1 = xenopsd.plug(xs, g1, result("vol1", str(tmp_path / "run")))
        v2 = xenopsd.plug(xs, g2, result("vol1", str(tmp_path / "run")))
        f1, f2 = Frontend(sim.xen(g1), v1.devid), Frontend(sim.xen(g2), v2.devid)
        f1.connect()
        f2.connect()
        f1.write(0, b"1" * 4096)
        f2.write(0, b"2" * 4096)
        assert f1.read(0, 8) == b"1" * 4096 and f2.read(0, 8) == b"2" * 4096
        assert disk.read_bytes() == gold
        f1.close(timeout=0.1)
        f2.close(timeout=0.1)
        xenopsd.hard_unplug(xs, v1)
        xenopsd.hard_unplug(xs, v2)
        wait_for(lambda: not srv.vs.server.devices, what="both devices gone")
        v3 = xenopsd.plug(xs, g1, result("vol1", str(tmp_path / "run")))   # boot again
        f3 = Frontend(sim.xen(g1), v3.devid)
        f3.connect()
        assert f3.read(0, 8) == gold[:4096]                             # writes vanished
        f3.close(timeout=0.1)
        xenopsd.hard_unplug(xs, v3)
    finally:
        srv.close()
        xs.close()
    assert disk.read_bytes() == gold


def _spawn(sim, disk, run, domains="1", env=None, args=()):
    p = subprocess.Popen([sys.executable, "-m", "xapi_storage.blkback.volume_server",
                          "--id", "vol1", "--path", str(disk), "--run-dir", str(run),
                          "--xen", f"sim:{sim.dir}", "--domains", domains] + list(args),
                         stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         universal_newlines=True, env=dict(os.environ, **(env or {})))
    wait_for(lambda: os.path.exists(ctl_path(str(run), "vol1")) or p.poll() is not None,
             what="the control socket")
    assert p.poll() is None, p.stderr.read()
    return p


def test_a_restarted_server_readopts_the_connected_device(simxen_guest, disk, tmp_path):
    sim, g = simxen_guest
    run = tmp_path / "run"
    xs = XenStore(sim.xenstore_path(0))
    p = _spawn(sim, disk, run)
    fe = None
    try:
        vbd = xenopsd.plug(xs, g, result("vol1", str(run)))
        fe = Frontend(sim.xen(g), vbd.devid)
        fe.connect()
        fe.write(0, b"a" * 4096)
        p.send_signal(signal.SIGKILL)                    # the server dies under the guest
        p.wait()
        ids = [fe.submit(1, 8 * k, b"b" * 4096) for k in range(1, 9)]   # not answered yet
        fe.push()
        p = _spawn(sim, disk, run)                      # its supervisor starts it again
        done = fe.wait(ids, timeout=10)
        assert all(st == 0 for st, _d in done.values())
        assert fe.read(0, 8) == b"a" * 4096 and fe.read(64, 8) == b"b" * 4096
        assert xs.read(f"{vbd.be}/state") == "4"
        assert call(str(run), "vol1", op="ping")["devices"] == [vbd.be]
        # the last detach: the device goes, the datapath detaches, the server exits
        fe.close(timeout=0.1)
        fe = None
        xenopsd.hard_unplug(xs, vbd)
        assert call(str(run), "vol1", op="detach", domain="1")["ok"]
        assert p.wait(10) == 0
        assert os.listdir(run) == []                    # no socket left
    finally:
        if fe is not None:
            fe.close(timeout=0.1)
        if p.poll() is None:
            p.kill()
            p.wait()
        xs.close()



class Restarts:
    """A volume server in a child process, killed by a fault point and started again, and
    one frontend of the guest's on its device."""

    def __init__(self, sim, g, disk, run):
        self.sim, self.g, self.disk, self.run = sim, g, disk, run
        self.xs = XenStore(sim.xenstore_path(0))
        self.p = self.fe = self.vbd = None

    def start(self, fault=None, args=()):
        self.p = _spawn(self.sim, self.disk, self.run, args=args,
                        env={"XAPI_STORAGE_FAULT": fault} if fault else None)

    def connect(self):
        self.vbd = xenopsd.plug(self.xs, self.g, result("vol1", str(self.run)))
        self.fe = Frontend(self.sim.xen(self.g), self.vbd.devid)
        self.fe.connect()
        return self.fe

    def killed(self):
        assert self.p.wait(10) == -signal.SIGKILL, self.p.stderr.read()

    def finish(self):
        """The guest goes; the last detach ends the server, which leaves nothing behind."""
        self.fe.close(timeout=0.1)
        self.fe = None
        xenopsd.hard_unplug(self.xs, self.vbd)
        assert call(str(self.run), "vol1", op="detach", domain="1")["ok"]
        assert self.p.wait(10) == 0
        assert os.listdir(self.run) == []               # no socket, no journal left
        assert not [n for n in os.listdir(os.path.dirname(str(self.disk)))
                    if n.startswith(".pyblkback-overlay.")]                 # no overlay

    def close(self):
        if self.fe is not None:
            self.fe.close(timeout=0.1)
        if self.p is not None and self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        self.xs.close()


@pytest.fixture
def restarts(simxen_guest, disk, tmp_path):
    sim, g = simxen_guest
    r = Restarts(sim, g, disk, tmp_path / "run")
    try:
        yield r
    finally:
        r.close()


def test_a_server_killed_between_answering_and_publishing_serves_the_batch_again(restarts):
    """The server dies (SIGKILL) after writing a batch's responses into the ring's slots (where
    the requests were) but before publishing them. The next server must serve the batch again
    from its journal, not read the responses left in the slots as requests: every write
    answered once, OK, and on the disk."""
    restarts.start("blkback:respond#2")      # batch 1: the first write; it dies in batch 2
    fe = restarts.connect()
    fe.write(0, b"a" * 4096)
    blocks = {8 * k: bytes([k]) * 4096 for k in range(1, 9)}
    ids = [fe.submit(1, s, d) for s, d in blocks.items()]
    rsp_prod = fe.queues[0].ring.hdr[2]
    fe.push()
    restarts.killed()
    assert fe.queues[0].ring.hdr[2] == rsp_prod           # nothing published
    assert any(n.startswith("vol1.ring-") for n in os.listdir(restarts.run))
    restarts.start()
    done = fe.wait(ids, timeout=10)
    assert {st for st, _d in done.values()} == {0}
    for s, d in blocks.items():
        assert fe.read(s, 8) == d
    assert fe.read(0, 8) == b"a" * 4096
    restarts.finish()


def test_a_server_killed_before_its_event_sends_it_when_started_again(restarts):
    """Killed after publishing responses but before the event that tells the frontend: Linux's
    blkfront does not poll, it would wait for ever. The next server sends an event when it
    takes the ring over."""
    restarts.start("blkback:notify")
    fe = restarts.connect()
    rid = fe.submit(1, 0, b"c" * 4096)
    fe.push()
    restarts.killed()
    fe.evtchn.pending()                                 # nothing is owed to us from before
    restarts.start()
    r, _w, _x = select.select([fe.evtchn.fileno()], [], [], 5)
    assert r, "the restarted server sent no event"
    assert fe.reap()[rid][0] == 0
    restarts.finish()


def test_a_nonpersistent_disk_keeps_its_guests_writes_across_a_server_restart(restarts):
    """The overlay of a non-persistent device outlives a killed server: the next one takes it
    over with the device, and the guest still reads what it wrote (not the gold image, which
    would corrupt its file system under it). It goes with the device; the gold is untouched."""
    gold = restarts.disk.read_bytes()
    restarts.start(args=["--nonpersistent"])
    fe = restarts.connect()
    fe.write(0, b"w" * 4096)
    fe.write(100, b"v" * 512)                          # a part of a block: copied up first
    restarts.p.kill()
    restarts.killed()
    assert [n for n in os.listdir(os.path.dirname(str(restarts.disk)))
            if n.startswith(".pyblkback-overlay.vol1.")]
    restarts.start(args=["--nonpersistent"])
    assert fe.read(0, 8) == b"w" * 4096
    assert fe.read(96, 8) == gold[96 * 512:100 * 512] + b"v" * 512 + gold[101 * 512:104 * 512]
    fe.write(8, b"x" * 4096)
    assert fe.read(8, 8) == b"x" * 4096
    restarts.finish()
    assert restarts.disk.read_bytes() == gold


def test_a_ring_whose_journal_cannot_be_made_is_served_without_one(rig):
    """/run full or its file in the way: the disk still connects and serves (with a warning),
    it only loses the restart safety."""
    sim, g, xs, srv, run = rig
    vbd = xenopsd.plug(xs, g, result("vol1", str(run)))
    os.mkdir(os.path.join(str(run), f"vol1.ring-{g}-{vbd.devid}-0"))   # in the journal's way
    fe = Frontend(sim.xen(g), vbd.devid)
    fe.connect()
    try:
        fe.write(0, b"j" * 4096)
        assert fe.read(0, 8) == b"j" * 4096
        (dev,) = srv.vs.server.devices.values()
        assert dev.queues[0].journal is None
    finally:
        fe.close(timeout=0.1)
    xenopsd.hard_unplug(xs, vbd)
