"""The conformance suite against file-raw and against throw-away plugins with one planted
defect each (toyplugins/conformance_defects.py): file-raw passes every check, and each defect
makes exactly its own check fail, so no check is one that cannot fail."""

import os
import sys

import pytest

from xapi_storage.conformance import CHECKS
from xapi_storage.testing import need_loop_devices, rename_storage

TOYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toyplugins")
NAME = "org.xen.xapi.storage.file-raw"
DEFECTS = [c.name for c in CHECKS]


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([TOYS] + [p for p in [env.get("PYTHONPATH")] if p])
    env["XAPI_STORAGE_SYSLOG"] = "0"
    env.update(extra)
    return env


@pytest.fixture
def defects_dir(install_plugin):
    sys.path.insert(0, TOYS)        # the installer imports the module to plan its executables
    try:
        yield install_plugin("volume", NAME, "conformance_defects")
    finally:
        sys.path.remove(TOYS)


def _install_datapath(install_plugin, module="xapi_storage.datapath.blkback"):
    need_loop_devices("the conformance datapath check")
    sys.path.insert(0, TOYS)
    try:
        install_plugin("datapath", "blkback", module)
    finally:
        sys.path.remove(TOYS)


def _run(conformance, plugin_dir, tmp_path, defect="", **options):
    state = tmp_path / "state"
    state.mkdir()
    hide, restore = rename_storage()
    options.setdefault("repeat", 2)
    options.setdefault("parallel", 3)
    return conformance(plugin_dir, configuration={"path": str(tmp_path / "sr")},
                       hide_storage=hide, restore_storage=restore,
                       env=_env(CONFORMANCE_DEFECT=defect, CONFORMANCE_STATE=str(state),
                                XAPI_STORAGE_DATAPATH_STATE=str(tmp_path / "dpstate")),
                       **options)


def _no_loop_device_left(tmp_path):
    from xapi_storage.datapath.blkback import _sys
    left = []
    for n in os.listdir("/sys/block"):
        b = _sys(n, "loop", "backing_file") if n.startswith("loop") else None
        if b and b.startswith(str(tmp_path)):
            left.append(n)
    return left


def test_file_raw_passes_every_check(install_plugin, conformance, tmp_path):
    d = install_plugin("volume", NAME, "xapi_storage.volume.file_raw")
    _install_datapath(install_plugin)
    report = _run(conformance, d, tmp_path, repeat=10, parallel=8)
    report.assert_ok()
    assert [r.status for r in report.results] == ["PASS"] * len(CHECKS), report.table()
    # everything the run made is gone: file-raw leaves only the SR's (empty) directory
    assert os.listdir(tmp_path / "sr") == []
    assert _no_loop_device_left(tmp_path) == []
    assert not any(files for _, _, files in os.walk(str(tmp_path / "dpstate")))


def test_the_toy_without_a_defect_passes(defects_dir, conformance, tmp_path):
    report = _run(conformance, defects_dir, tmp_path)
    assert not report.failed, report.table()


@pytest.mark.parametrize("defect", DEFECTS)
def test_a_planted_defect_fails_exactly_its_check(defect, defects_dir, conformance, tmp_path,
                                                  install_plugin):
    if defect == "datapath":
        _install_datapath(install_plugin, "conformance_defects_dp")
    report = _run(conformance, defects_dir, tmp_path, defect=defect)
    assert [r.name for r in report.failed] == [defect], report.table()
    assert report.teardown == [], report.table()
    if defect != "cleanup":         # that defect's SR.destroy removes nothing, on purpose
        assert os.listdir(tmp_path / "sr") == [], report.table()
    assert _no_loop_device_left(tmp_path) == []
