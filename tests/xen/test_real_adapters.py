"""The real-Xen adapters (xapi_storage.xen.real) against the real hypervisor, in dom0 of the
test bed: gntalloc + gntdev, /dev/xen/evtchn, pyxs on oxenstored's socket.

The checks themselves run in dom0 (tests/xen/dom0_real_adapters.py, read from the 9p share
of the checkout, with the installed package in dom0's venv); each test here runs one of them
and asserts on its report.
"""

import pytest

pytestmark = pytest.mark.xen

VENV = "/opt/xapi-storage/venv"
SCRIPT = "/mnt/checkout/tests/xen/dom0_real_adapters.py"


def _run(bed, name):
    rc, out, err = bed.dom0([VENV + "/bin/python", SCRIPT, name], timeout=120)
    assert rc == 0 and f"PASS {name}" in out, f"rc {rc}\nstdout:\n{out}\nstderr:\n{err}"
    return out


def test_real_xen_is_dom0(bed):
    out = _run(bed, "identity")
    assert "domid 0" in out


def test_gntalloc_to_gntdev_roundtrip_in_one_contiguous_mapping(bed):
    _run(bed, "grant_roundtrip_contiguous")


def test_grant_readonly_is_enforced_by_xen(bed):
    out = _run(bed, "grant_readonly")
    assert "writable map of a read-only grant refused" in out
    assert "map of an ungranted ref refused" in out


def test_evtchn_loopback_notify_pending_unmask(bed):
    out = _run(bed, "evtchn_loopback")
    assert "notify of an unbound port refused" in out


def test_xenstore_through_pyxs_on_oxenstored(bed):
    _run(bed, "xenstore")
