"""pytest fixtures for plugin authors, shipped with the package (entry point `pytest11:
xapi_storage` in setup.cfg): once the package is installed, any test can ask for them.

    plugin_root      a fresh directory, the root `xapi-storage install` lays plugins into
    install_plugin   install_plugin("volume", "org.xen.xapi.storage.acme", "acme.plugin")
                     lays that plugin out under plugin_root with the real installer and
                     returns its directory
    file_raw_sr      a file-raw SR in a temporary directory, made through the installed
                     executables (SR.create, SR.attach); an object with .plugin_dir,
                     .configuration, .sr and .call(method, **params); destroyed at the end
    conformance      conformance(plugin_dir, configuration={...}, **options) runs
                     `xapi-storage conformance` in-process and returns its Report;
                     report.assert_ok() fails the test with the report's table
    loop_devices     two fresh 128 MiB loop devices (.devices, and .device: the same
                     comma-separated), for a plugin whose SR.create makes the volume group
    loop_vg          the same with a volume group on them (.vg, tagged "xapi_storage_test"),
                     for a plugin given an existing VG
                     Both remove after the test whatever lvm2 has on the devices (volume
                     groups living only on them, with their LVs; PV labels), then the loop
                     devices and files, also when the test failed; they skip with the reason
                     where loop devices (loop_vg: lvm2, device-mapper) are missing, and fail
                     under CI=true. Other sizes: xapi_storage.scratch.LoopDevices.

The simulated Xen fixtures (simxen, simxen_guest) come from xapi_storage.xen.sim.pytest_plugin.
need_loop_devices() skips a test (fails it under CI=true) where loop devices cannot be used.

A vendor's whole conformance test, with its package installed:

    def test_conformance(install_plugin, conformance, tmp_path):
        d = install_plugin("volume", "org.xen.xapi.storage.acme", "acme.plugin")
        conformance(d, configuration={"path": str(tmp_path / "sr")}).assert_ok()
"""

import os
import uuid

import pytest


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need_loop_devices(what="this test", lvm=False):
    """Skip (loudly, with the reason) when loop devices cannot be used here: they need root
    and the loop driver; with `lvm`, a volume group also needs lvm2 and device-mapper. Under
    CI=true, fail instead: CI must run what it claims to."""
    from .scratch import unavailable
    why = unavailable(lvm=lvm)
    if why:
        if IN_CI:
            pytest.fail(f"{what} cannot run in CI: {why}", pytrace=False)
        pytest.skip(f"{what} cannot run here: {why}")


def rename_storage(suffix=".conformance-hidden"):
    """(hide, restore) for the storage-gone check of a plugin whose SR lives in the directory
    given as device-config `path`: hide renames it away, restore renames it back."""
    def hide(configuration):
        os.rename(configuration["path"], configuration["path"] + suffix)

    def restore(configuration):
        os.rename(configuration["path"] + suffix, configuration["path"])
    return hide, restore


@pytest.fixture
def plugin_root(tmp_path):
    root = tmp_path / "xapi-storage-script"
    root.mkdir()
    return root


@pytest.fixture
def install_plugin(plugin_root):
    from . import installer

    def install(kind, name, module, interpreter=None):
        p = installer.Plugin(kind, name, module)
        p.check()
        python = interpreter or installer.default_interpreter()
        installer.converge(str(plugin_root), p, installer.plan(p, python), python,
                           report=lambda msg: None)
        return str(plugin_root / kind / name)
    return install


class FileRawSR:
    """A file-raw SR made through the executables; `call` runs one as the daemon does and
    returns the Outcome (see xapi_storage.conformance.caller)."""

    def __init__(self, plugin_dir, path):
        from .conformance.caller import Caller
        self.plugin_dir = plugin_dir
        self.caller = Caller(plugin_dir)
        self.configuration = self._ok("SR.create", uuid=str(uuid.uuid4()),
                                      configuration={"path": path}, name="test SR",
                                      description="made by the file_raw_sr fixture")
        self.path = self.configuration["path"]
        self.sr = self._ok("SR.attach", configuration=self.configuration)

    def call(self, method, **params):
        params.setdefault("dbg", "file_raw_sr")
        return self.caller.call(method, params)

    def _ok(self, method, **params):
        out = self.call(method, **params)
        if not out.ok:
            raise AssertionError(out.describe())
        return out.value

    def destroy(self):
        self._ok("SR.detach", sr=self.sr)
        self._ok("SR.destroy", sr=self.sr)


@pytest.fixture
def file_raw_sr(install_plugin, tmp_path):
    d = install_plugin("volume", "org.xen.xapi.storage.file-raw", "xapi_storage.volume.file_raw")
    sr = FileRawSR(d, str(tmp_path / "file-raw-sr"))
    yield sr
    sr.destroy()


@pytest.fixture
def conformance():
    from . import conformance as conf

    def run(plugin_dir, configuration=None, **options):
        return conf.run(plugin_dir, conf.Options(configuration=configuration, **options))
    return run


def _loops(what, vg):
    from .scratch import LoopDevices
    need_loop_devices(f"the {what} fixture", lvm=bool(vg))
    return LoopDevices(2, vg=vg)


@pytest.fixture
def loop_devices():
    with _loops("loop_devices", None) as loops:
        yield loops


@pytest.fixture
def loop_vg():
    with _loops("loop_vg", True) as loops:
        yield loops
