"""`xapi-storage conformance` against our lvm-raw and nfs-raw volume plugins in dom0 of the
test bed, each with our blkback datapath beside it (real lvm2 and device-mapper on loop
devices; dom0's own kernel NFS server): every check that applies passes and the run leaves
nothing behind. The run itself is tests/xen/dom0_conformance.py, started in dom0."""

import glob
import re
import subprocess
import sys
from pathlib import Path

import pytest

from xapi_storage.conformance import CHECKS

pytestmark = pytest.mark.xen

VENV = "/opt/xapi-storage/venv"
SCRIPT = "/mnt/checkout/tests/xen/dom0_conformance.py"
EXPORT = "/srv/nfs/conformance"        # dom0_conformance.EXPORT
ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / "build" / "dom0-wheels"   # dom0_conformance.WHEELS, through the 9p share


def _run(bed, which):
    rc, out, err = bed.dom0([VENV + "/bin/python", SCRIPT, which], timeout=1800)
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^([a-z0-9-]+)\s+(PASS|FAIL|SKIP)\s+\d+\s", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rc, out + err, rows


def _expect(rows, out, skipped=()):
    want = {c.name: ("SKIP" if c.name in skipped else "PASS") for c in CHECKS}
    assert rows == want, out
    assert "LEFT nothing" in out, out


def test_lvm_raw_thick_with_blkback(bed):
    rc, out, rows = _run(bed, "lvm-thick")
    # a volume group cannot be hidden and given back without a device-mapper layer of the
    # test's own: storage-gone runs against nfs-raw (and lvm-raw's Unreachable health is
    # covered by tests/xen/test_volume_plugins.py)
    _expect(rows, out, skipped=("storage-gone",))
    assert rc == 0, out


@pytest.mark.bedsweep      # ~6.5 min under TCG: opt in (-m bedsweep), CI's budget is 60 min
def test_lvm_raw_thin_with_blkback(bed):
    rc, out, rows = _run(bed, "lvm-thin")
    _expect(rows, out, skipped=("storage-gone",))
    assert rc == 0, out


# ~4 min under TCG: opt in (-m bedsweep) since lvm-raw's activation work made CI's bed time
# grow; nfs-raw stays proven in CI by tests/xen/test_volume_plugins.py (lifecycle with an
# unmounted SR, bad inputs, a kill at every fault point) and test_volume_plugins_guest.py
# (its volumes in the guest through blkback, the server stopped under guest I/O)
@pytest.mark.bedsweep
def test_nfs_raw_with_blkback(bed):
    bed.nfs_export(EXPORT)
    rc, out, rows = _run(bed, "nfs")
    _expect(rows, out)
    assert rc == 0, out


def _pytest_wheels(bed):
    """pytest's wheels for dom0's Python, in the checkout's build/ (dom0 reads it over 9p):
    dom0 has no PyPI, this machine has (or has them in pip's cache already)."""
    rc, ver, err = bed.dom0([VENV + "/bin/python", "-c",
                             "import sys; print('%d.%d' % sys.version_info[:2])"])
    assert rc == 0, err
    if not glob.glob(str(WHEELS / "pytest-*.whl")):
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            "--only-binary=:all:", "--implementation", "py", "--python-version",
                            ver.strip(), "-d", str(WHEELS), "pytest", "pluggy", "iniconfig",
                            "packaging", "pygments"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True, timeout=300)
        assert r.returncode == 0, f"pip download of pytest for dom0 failed:\n{r.stdout}"


def test_loop_vg_fixture_in_a_vendor_test_run_by_pytest_in_dom0(bed):
    """tests/kit/vendor_loop_fixtures.py run by pytest in dom0, with CI=true (a missing lvm2
    or device-mapper would fail it): loop_vg makes a tagged VG on two loop devices, both
    fixtures remove everything, also what the tests made and also after they failed."""
    _pytest_wheels(bed)
    rc, out, rows = _run(bed, "vendor-pytest")
    assert "2 passed" in out and "2 failed" in out and "records: 4" in out, out
    assert "LEFT nothing" in out and rc == 0, out
