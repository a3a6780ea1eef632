"""Ctrl-C / SIGTERM of `blkback connect` unplugs as a toolstack does: online=0 with state=5,
written in one transaction (the Windows PV drivers eject the disk only on that pair)."""

import signal
import subprocess
import sys
import time

import pytest

from xapi_storage.blkback.frontend import Frontend
from xapi_storage.blkback.server import XenStore

from .test_server import wait_for


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_writes_online_0_with_state_5(simxen_guest, disk, sig):
    sim, g = simxen_guest
    p = subprocess.Popen([sys.executable, "-m", "xapi_storage.cli", "blkback", "connect",
                          str(g), "--path", str(disk), "--xen", f"sim:{sim.dir}", "--quiet"],
                         stderr=subprocess.PIPE, universal_newlines=True)
    xs = XenStore(sim.xenstore_path(0))
    try:
        wait_for(lambda: xs.list(f"/local/domain/{g}/device/vbd"), what="the vbd")
        devid = int(xs.list(f"/local/domain/{g}/device/vbd")[0])
        be = xs.read(f"/local/domain/{g}/device/vbd/{devid}/backend")
        fe = Frontend(sim.xen(g), devid)
        fe.connect()
        xs.watch(f"{be}/state", "s")
        xs.events()
        p.send_signal(sig)
        # at every change of state, read both nodes in one snapshot: state=5 never comes
        # with online=1
        snap = None
        deadline = time.monotonic() + 10
        while snap is None or snap[0] != "5":
            assert time.monotonic() < deadline, f"no state 5 (last seen {snap})"
            if xs.events():
                snap = xs.transaction(lambda: (xs.read(f"{be}/state"),
                                               xs.read(f"{be}/online")))
            time.sleep(0.001)
        assert snap == ("5", "0")
        fe.close()
        _, err = p.communicate(timeout=15)
        assert p.returncode == 0, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        xs.close()
