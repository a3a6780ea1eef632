"""The nfs-raw volume plugin against dom0's own kernel NFS server (an export made with
bed.nfs_export, mounted by dom0 over 127.0.0.1), through the installed executables exactly as
xapi-storage-script calls them. The checks run in dom0 (tests/xen/dom0_volume_plugins.py)."""

import pytest

from .test_lvm_raw import _run

pytestmark = pytest.mark.xen

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


def test_nfs_raw_server_away_20s_under_writes_hard_mount(bed, export):
    out = _run(bed, "nfs_outage_hard_mount", timeout=900)
    assert "writer done" in out
