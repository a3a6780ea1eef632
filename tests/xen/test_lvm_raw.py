"""The lvm-raw volume plugin on real lvm2 and device-mapper, in dom0 of the test bed, through
its installed executables exactly as xapi-storage-script calls them.

The checks run in dom0 (tests/xen/dom0_volume_plugins.py, read from the 9p share of the
checkout, with the installed package in dom0's venv); each test here runs one and asserts on
its report. Each check makes its own volume group on loop devices and removes it.
"""

import pytest

pytestmark = pytest.mark.xen

VENV = "/opt/xapi-storage/venv"
SCRIPT = "/mnt/checkout/tests/xen/dom0_volume_plugins.py"


def _run(bed, name, timeout=600):
    rc, out, err = bed.dom0([VENV + "/bin/python", SCRIPT, name], timeout=timeout)
    assert rc == 0 and f"PASS {name}" in out, f"rc {rc}\nstdout:\n{out}\nstderr:\n{err}"
    return out


def test_lvm_raw_lifecycle(bed):
    """create/attach/probe/stat, volumes with data, read-only snapshot, clone, keys that lvm2
    tags could not hold verbatim, resize, metadata back after deactivation, an LV that is not
    ours left alone, in-use refusals, destroy with nothing left (no LV, VG, PV, lock file)."""
    out = _run(bed, "lvm_lifecycle")
    assert "snapshot LV refuses writes" in out


def test_lvm_raw_bad_inputs_leave_nothing(bed):
    out = _run(bed, "lvm_bad_inputs")
    assert "SR.create over ext4" in out


def test_lvm_raw_32_concurrent_creates(bed):
    _run(bed, "lvm_concurrent_creates")


def test_lvm_raw_killed_at_every_fault_point(bed):
    out = _run(bed, "lvm_crash_sweep", timeout=1200)
    assert "killed at copy:started: accounted, retried" in out
