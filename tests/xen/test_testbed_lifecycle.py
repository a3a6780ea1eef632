"""No QEMU outlives its TestBed: not when the owning process is SIGKILLed, not past its lifetime."""

import os
import subprocess
import sys
import time

import pytest

from xapi_storage import testbed

pytestmark = pytest.mark.xen


def _qemus_with(marker):
    """PIDs of processes whose command line mentions `marker` (a unique run directory)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if marker.encode() in cmd and b"qemu-system" in cmd:
            pids.append(int(pid))
    return pids


def _wait(cond, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return False


CHILD = """
import sys
from xapi_storage import testbed
bed = testbed.TestBed(testbed.Images(sys.argv[1]), run_dir=sys.argv[2], boot_timeout=600)
bed.boot()            # killed with SIGKILL while booting: no finally, no atexit runs
"""


def test_qemu_dies_with_a_killed_owner(images, tmp_path):
    run_dir = str(tmp_path / "run-killed-owner")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(images.dir), run_dir])
    try:
        assert _wait(lambda: _qemus_with(run_dir), 30), "QEMU never started"
        pids = _qemus_with(run_dir)
    finally:
        child.kill()
        child.wait()
    assert _wait(lambda: not _qemus_with(run_dir), 15), "QEMU %s outlived its owner" % pids


def test_lifetime_limit_kills_qemu_and_boot_says_so(images, tmp_path):
    run_dir = tmp_path / "run-lifetime"
    bed = testbed.TestBed(images, run_dir=run_dir, lifetime=3, boot_timeout=120)
    t0 = time.monotonic()
    with pytest.raises(testbed.BootError, match="QEMU exited"):
        bed.boot()
    assert time.monotonic() - t0 < 60
    assert not _qemus_with(str(run_dir))
    assert "lifetime of 3s reached" in (run_dir / "commands.log").read_text()
    bed.shutdown()  # idempotent after a failed boot
