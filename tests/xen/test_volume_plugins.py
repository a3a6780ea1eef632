"""The lvm-raw and nfs-raw volume plugins in dom0 of the test bed, through their installed
executables exactly as xapi-storage-script calls them: lvm-raw on real lvm2 and device-mapper
(each check makes its own volume group on loop devices and removes it), nfs-raw against dom0's
own kernel NFS server (an export made with bed.nfs_export, mounted over 127.0.0.1).

The checks run in dom0 (tests/xen/dom0_volume_plugins.py, read from the 9p share of the
checkout, with the installed package in dom0's venv); each test here runs one and asserts on
its report.
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


def test_lvm_raw_thin_pool(bed):
    """provisioning=thin: honest usage, shared-block snapshots and clones, the
    over-provisioning limit, killed thin clones."""
    out = _run(bed, "lvm_thin")
    assert "over-provisioned" in out


EXPORT = "/srv/nfs/xs"          # dom0_volume_plugins.NFS_EXPORT


@pytest.fixture(scope="module")
def export(bed):
    bed.nfs_export(EXPORT)
    return EXPORT


def test_nfs_raw_lifecycle(bed, export):
    """probe (exports, then SRs), create leaves no mount, attach mounts hard at
    /run/sr-mount/<uuid> (idempotent), volumes with data, busy detach names the holder,
    an unmounted SR is an error and Unreachable (never empty), re-attach, destroy leaves
    neither mount nor directory."""
    out = _run(bed, "nfs_lifecycle")
    assert "busy detach" in out


def test_nfs_raw_bad_inputs_leave_no_mount(bed, export):
    _run(bed, "nfs_bad_inputs")


def test_nfs_raw_killed_at_every_fault_point(bed, export):
    out = _run(bed, "nfs_crash_sweep", timeout=1200)
    assert "killed at copy:started: accounted, retried" in out
