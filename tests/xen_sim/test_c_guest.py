"""A guest written in C from docs/simxen.md (tests/xen_sim/c/guest.c) against a backend
that uses the Python library: the documented formats are the implemented ones."""

import os
import shutil
import subprocess

import pytest

from xapi_storage.xen import XenError

HERE = os.path.dirname(__file__)


@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc")
def test_c_guest(simxen_guest, tmp_path):
    sim, g = simxen_guest
    exe = str(tmp_path / "guest")
    subprocess.run(["gcc", "-O", "-Wall", "-Werror", "-o", exe, os.path.join(HERE, "c", "guest.c")],
                   check=True)
    p = subprocess.Popen([exe, sim.dir, str(g)], stdout=subprocess.PIPE, universal_newlines=True)
    try:
        ref, port = map(int, p.stdout.readline().split())
        back = sim.xen(0)
        m = back.grant_mapper().map(g, [ref], writable=True)
        assert bytes(m.buffer[0:12]) == b"hello from C"
        m.buffer[100:116] = b"hello from dom0\0"
        e = back.event_channels()
        lport = e.bind_interdomain(g, port)
        e.notify(lport)
        assert p.stdout.readline() == "event ok\n"
        m.unmap()                       # the guest is waiting for this to revoke
        assert p.stdout.readline() == "revoked\n"
        assert p.wait(10) == 0
        with pytest.raises(XenError):
            back.grant_mapper().map(g, [ref], writable=False)       # revoked
        e.close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
