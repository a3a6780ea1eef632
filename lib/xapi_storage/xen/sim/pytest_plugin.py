"""pytest fixtures for code that runs on the simulated Xen.

Registered as a pytest plugin (entry point `pytest11: simxen` in setup.cfg): once the
package is installed, every test can ask for these fixtures, nothing to import.

    simxen        a running simulated Xen (xapi_storage.xen.sim.Sim) in a fresh directory
                  under /dev/shm; stopped at the end of the test, and the test fails if
                  anything was left behind
    simxen_guest  (sim, domid): the same with one guest domain "guest1" created
"""

import os
import shutil
import tempfile

import pytest

from . import running


def _base():
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@pytest.fixture
def simxen():
    parent = tempfile.mkdtemp(prefix="simxen-", dir=_base())
    d = os.path.join(parent, "xen")
    try:
        with running(d) as sim:
            yield sim
        assert not os.path.exists(d), f"simxen left {os.listdir(d)} behind in {d}"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def simxen_guest(simxen):
    return simxen, simxen.create_domain("guest1")
