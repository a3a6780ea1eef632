"""Fixtures for the datapath tests: the registered plugins installed under a temporary root,
a file-raw SR on the local disk or on a tmpfs, the daemon emulation over them, and a check
that no loop device of the test outlives it."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from xapi_storage.testing import need_loop_devices as shipped_need_loop_devices
from xapi_storage.toolstack.daemon import Daemon

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
FILE_RAW = "org.xen.xapi.storage.file-raw"


def need_loop_devices():
    """Loop devices need root and the loop driver; say so loudly (and fail in CI)."""
    shipped_need_loop_devices("the blkback datapath tests")


def plugin_env(state_root, **extra):
    env = dict(os.environ)
    env["XAPI_STORAGE_SYSLOG"] = "0"
    env["XAPI_STORAGE_DATAPATH_STATE"] = str(state_root)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def plugin_root(tmp_path_factory):
    """The registered plugins, installed once per session as `xapi-storage install` lays them."""
    root = tmp_path_factory.mktemp("plugins")
    # the observer-mode check with this interpreter: /usr/bin/python3 of a development machine
    # need not have the package (nor be this Python version)
    r = subprocess.run([sys.executable, "-m", "xapi_storage.cli", "install", "--root", str(root),
                        "--observer-python", sys.executable],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return root


def _loops_under(d):
    from xapi_storage.datapath.blkback import _sys
    out = []
    for n in os.listdir("/sys/block"):
        b = _sys(n, "loop", "backing_file") if n.startswith("loop") else None
        if b and b.startswith(d):
            out.append("/dev/" + n)
    return out


@pytest.fixture(params=["disk", "tmpfs"])
def sr_parent(request, tmp_path):
    """A directory on the local disk, or on a tmpfs (/dev/shm: no O_DIRECT)."""
    need_loop_devices()
    if request.param == "disk":
        d = str(tmp_path / "srs")
        os.mkdir(d)
    else:
        d = tempfile.mkdtemp(prefix="dp-sr-", dir="/dev/shm")
    yield d
    leaked = _loops_under(d)
    for dev in leaked:
        subprocess.run(["losetup", "-d", dev], timeout=60)
    if request.param == "tmpfs":
        shutil.rmtree(d, ignore_errors=True)
    assert not leaked, f"loop devices left behind: {leaked}"


class Env:
    """A daemon over the installed plugins, and one attached file-raw SR."""

    def __init__(self, root, sr_parent, state_root, **env):
        self.state_root = state_root
        self.env = plugin_env(state_root, **env)
        self.daemon = Daemon(str(root), timeout=120, env=self.env)
        self.sr_path = os.path.join(sr_parent, "sr")
        cfg = self.daemon.volume(FILE_RAW, "SR.create", {
            "dbg": "t", "uuid": "5f0c1d8e-0000-4000-8000-0000000000aa",
            "configuration": {"path": self.sr_path}, "name": "dp", "description": ""})
        self.sr = self.daemon.volume(FILE_RAW, "SR.attach", {"dbg": "t", "configuration": cfg})

    def create(self, size=4 << 20):
        return self.daemon.volume(FILE_RAW, "Volume.create", {
            "dbg": "t", "sr": self.sr, "name": "v", "description": "", "size": size,
            "sharable": False})

    def state_files(self):
        out = []
        for d, _, files in os.walk(self.state_root):
            out += [os.path.join(d, f) for f in files]
        return out


@pytest.fixture
def dpenv(plugin_root, sr_parent, tmp_path):
    return Env(plugin_root, sr_parent, tmp_path / "dpstate")
