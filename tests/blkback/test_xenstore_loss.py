"""The server without XenStore: the rings keep being served, calls time out, the server
reconnects and re-reads its devices, a stop still ends it, a Xen gone for good ends it.

The XenStore is the simulated one; between it and the server sits a proxy (xsproxy.py) that
can close every connection and refuse new ones (xenstored restarted), or forward nothing
(xenstored hung)."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from xapi_storage.blkback import toolstack
from xapi_storage.blkback.backends import open_storage
from xapi_storage.blkback.frontend import Frontend
from xapi_storage.blkback.server import Server, XenStore
from xapi_storage.xen.sim import leftovers

from .test_server import wait_for
from .xsproxy import XsProxy


class Rig:
    """A server on the proxied XenStore serving one raw device, in a thread."""

    def __init__(self, sim, guest, disk, sockpath, xs_timeout=0.5):
        self.sim = sim
        self.guest = guest
        self.proxy = XsProxy(sim.xenstore_path(0), sockpath)
        xen = sim.xen(0)
        xen.xenstore_path = self.proxy.path
        self.server = Server(xen, xs_timeout=xs_timeout)
        self.xs = XenStore(sim.xenstore_path(0))          # the toolstack's, direct
        self.devid, _name, self.fe_path, self.be_path, self.created = toolstack.plug_vbd(
            self.xs, guest, f"raw:{disk}")
        self.dev = self.server.add_device(self.be_path, open_storage("raw", str(disk)))
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.server.run()
        except BaseException as e:                        # noqa: BLE001 - checked by close
            self.error = e

    def frontend(self):
        fe = Frontend(self.sim.xen(self.guest), self.devid)
        fe.connect()
        return fe

    def close(self):
        self.proxy.up()
        self.proxy.resume()
        if self.thread.is_alive():
            toolstack.unplug(self.xs, self.be_path)
            self.thread.join(10)
        if self.thread.is_alive():
            self.server.stop(force=True)
            self.thread.join(10)
        assert not self.thread.is_alive()
        self.server.close()
        toolstack.remove_vbd(self.xs, self.fe_path, self.be_path, self.created)
        self.xs.close()
        self.proxy.close()
        if self.error is not None:
            raise self.error


@pytest.fixture
def rig(simxen_guest, disk, tmp_path):
    sim, g = simxen_guest
    r = Rig(sim, g, disk, tmp_path / "xs.sock")
    try:
        yield r
    finally:
        r.close()


def _io_for(fe, seconds, start=0):
    """Write then read back distinct blocks for `seconds`; returns how many round trips."""
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        data = bytes([n % 251 + 1]) * 4096
        fe.write(start + (n % 64) * 8, data)
        assert fe.read(start + (n % 64) * 8, 8) == data
        n += 1
    return n


def test_rings_served_while_xenstore_is_gone_then_reconnected(rig):
    fe = rig.frontend()
    try:
        fe.write(0, b"before" * 512)
        rig.proxy.down()                                  # xenstored gone
        wait_for(lambda: rig.server.xs_lost_since is not None, what="the loss noticed")
        assert _io_for(fe, 1.0, start=1024) > 50          # the ring did not notice
        assert rig.dev.machine.state == 4 and rig.dev.queues
        rig.proxy.up()                                    # xenstored back
        wait_for(lambda: rig.server.xs_reconnects == 1, what="the reconnect")
        assert rig.server.xs_lost_since is None
        assert fe.read(0, 6) == b"before" * 512
        # the watches are registered again: a toolstack unplug is seen and done
        toolstack.unplug(rig.xs, rig.be_path)
        wait_for(lambda: rig.xs.read(f"{rig.be_path}/state") == "5", what="Closing")
    finally:
        fe.close()
    rig.thread.join(10)
    assert not rig.thread.is_alive()
    assert rig.xs.read(f"{rig.be_path}/state") == "6"
    assert rig.server.persistent_maps == 0 and not rig.server.ports


def test_a_state_change_missed_while_gone_is_acted_on_after(rig):
    fe = rig.frontend()
    rig.proxy.down()
    wait_for(lambda: rig.server.xs_lost_since is not None, what="the loss noticed")
    # the frontend closes and the toolstack unplugs: the server sees none of it
    rig.xs.write(f"{rig.fe_path}/state", "6")
    rig.xs.write(f"{rig.be_path}/online", "0")
    rig.proxy.up()
    rig.thread.join(10)             # reconnect, re-read: frontend Closed + offline: destroyed
    assert not rig.thread.is_alive()
    assert rig.xs.read(f"{rig.be_path}/state") == "6"
    assert rig.server.persistent_maps == 0 and not rig.server.ports
    fe.close()                      # every grant is unmapped: they can all be revoked


def test_a_hung_xenstore_times_out_and_the_ring_is_served_meanwhile(rig, disk):
    fe = rig.frontend()
    try:
        rig.proxy.stall()                                 # xenstored hung
        with open(disk, "r+b") as f:                      # a resize: the server writes
            f.truncate(32 << 20)                          # `sectors` and state=4 again
        t0 = time.monotonic()
        # while its XenStore call waits (up to xs_timeout), the ring is served
        assert _io_for(fe, 1.5, start=2048) > 50
        wait_for(lambda: rig.server.xs_lost_since is not None or rig.server.xs_reconnects,
                 what="the call timed out")
        assert time.monotonic() - t0 < 5
        rig.proxy.resume()
        wait_for(lambda: rig.server.xs_reconnects >= 1, what="the reconnect")
        # the resize lost with the connection was announced after it
        wait_for(lambda: rig.xs.read(f"{rig.be_path}/sectors") == str(32 << 20 >> 9),
                 what="the new size announced")
    finally:
        fe.close()


@pytest.mark.parametrize("how", ["gone", "hung"])
def test_stop_with_xenstore_unreachable_still_ends_everything(rig, how):
    fe = rig.frontend()
    if how == "gone":
        rig.proxy.down()
        wait_for(lambda: rig.server.xs_lost_since is not None, what="the loss noticed")
    else:
        rig.proxy.stall()
        rig.xs.write(f"{rig.be_path}/online", "0")        # the server's reply will hang
        time.sleep(0.1)
    t0 = time.monotonic()
    rig.server.stop()                                     # SIGTERM's handler does this
    rig.thread.join(10)
    assert not rig.thread.is_alive()
    assert time.monotonic() - t0 < 3
    assert rig.dev.machine.state == -1                    # destroyed
    assert rig.server.persistent_maps == 0 and not rig.server.ports
    fe.close(timeout=0.1)   # nobody answers its handshake; every grant can be revoked


def test_connect_exits_when_the_simulated_xen_is_gone(simxen, disk):
    sim = simxen
    g = sim.create_domain("guest1")
    proc = subprocess.Popen([sys.executable, "-m", "xapi_storage.cli", "blkback", "connect",
                             str(g), "--path", str(disk), "--xen", f"sim:{sim.dir}",
                             "--quiet"], stderr=subprocess.PIPE, universal_newlines=True)
    try:
        xs = XenStore(sim.xenstore_path(0))
        wait_for(lambda: xs.list(f"/local/domain/{g}/device/vbd"), what="the vbd")
        devid = int(xs.list(f"/local/domain/{g}/device/vbd")[0])
        xs.close()
        fe = Frontend(sim.xen(g), devid)
        fe.connect()
        fe.write(0, b"z" * 4096)
        sim.stop()                                        # Xen goes away for good
        rc = proc.wait(15)
        err = proc.stderr.read()
        assert "Xen is gone" in err or "XenStore" in err, err
        assert rc in (0, 1)
        assert not leftovers(sim.dir)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def test_a_state_write_lost_with_the_connection_is_written_after_it(rig, monkeypatch):
    """The connection breaks just as the server announces Connected: the machine is
    Connected, the node still says InitWait. After the reconnect the server writes it."""
    from xapi_storage.blkback.server import Device
    real = Device._announce
    broken = []

    def announce(dev):
        if not broken:
            broken.append(1)
            dev.server.xs.close()             # xenstored drops us at this very moment
        real(dev)
    monkeypatch.setattr(Device, "_announce", announce)
    fe = rig.frontend()                       # waits for state 4: only resync writes it
    try:
        assert broken and rig.server.xs_reconnects == 1
        fe.write(0, b"q" * 4096)
        assert fe.read(0, 8) == b"q" * 4096
    finally:
        fe.close()
