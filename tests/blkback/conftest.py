import os

import pytest

from xapi_storage.xen.sim.pytest_plugin import simxen, simxen_guest  # noqa: F401


@pytest.fixture(scope="session")
def cref(tmp_path_factory):
    """The C reference of ring.h and blkif.h (x86_64 layout), compiled once per session."""
    from .cref import build
    return build(tmp_path_factory.mktemp("cref"))


@pytest.fixture
def disk(tmp_path):
    """A 16 MiB raw image with random contents (on tmpfs when possible)."""
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.write(os.urandom(16 << 20))
    return p
