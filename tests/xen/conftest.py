"""Fixtures for the real-Xen test bed: one booted bed (and one guest) shared by the session.

Skips only where QEMU cannot run at all (not installed; not root and no cached images), and
never in CI (CI=true): there a missing prerequisite fails the tests loudly.
On any failure of a `xen` test the logs of the bed (serial, Xen console, dom0 dmesg and logs,
guest consoles, every command run) stay in the run directory printed at the end of the session.
"""

import os
import shutil
from pathlib import Path

import pytest

from xapi_storage import testbed

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
KEEP = os.environ.get("XAPI_STORAGE_TESTBED_KEEP", "") not in ("", "0")
_failed = []
_run_dirs = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and item.get_closest_marker("xen"):
        _failed.append(item.nodeid)


def pytest_terminal_summary(terminalreporter):
    for run_dir, kept, timings in _run_dirs:
        terminalreporter.write_line("testbed: timings (s): %s" % timings)
        if kept:
            terminalreporter.write_line("testbed: logs of the test bed (CI artefact): %s" % run_dir)


def _prerequisites():
    cached = testbed.check_cached(testbed.cache_root() / testbed.image_key()) is None
    reason = testbed.unavailable_reason(images_cached=cached)
    if reason:
        if IN_CI:
            pytest.fail("the real-Xen test bed cannot run in CI: %s" % reason, pytrace=False)
        pytest.skip("the real-Xen test bed cannot run here: %s" % reason)


@pytest.fixture(scope="session")
def images(request):
    _prerequisites()
    # a cold build takes minutes: let its progress lines through pytest's capture
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        return testbed.ensure_images()


@pytest.fixture(scope="session")
def bed(images):
    b = testbed.TestBed(images, checkout=ROOT)
    ok = False
    try:
        b.boot()
        b.install_checkout()
        ok = True
        yield b
    finally:
        failed = bool(_failed) or not ok
        if failed or KEEP:
            b.collect_logs()
        b.shutdown()
        _run_dirs.append((b.run_dir, failed or KEEP, b.timings))
        if not (failed or KEEP):
            shutil.rmtree(b.run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def guest(bed):
    """PV guest "smoke", created with a qdisk disk (xvdd) so that libxl starts its device model."""
    bed.dom0("truncate -s 64M /root/qdisk.img", check=True)
    g = bed.start_guest("smoke", disks=[
        "format=raw,vdev=xvdd,access=rw,backendtype=qdisk,target=/root/qdisk.img"])
    yield g
    if bed.alive():
        bed.stop_guest("smoke")
