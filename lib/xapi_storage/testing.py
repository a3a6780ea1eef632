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


def need_loop_devices(what="this test"):
    """Skip (loudly, with the reason) when loop devices cannot be used here: they need root
    and the loop driver. Under CI=true, fail instead: CI must run what it claims to."""
    import shutil
    why = None
    if os.geteuid() != 0:
        why = "loop devices need root"
    elif not os.path.exists("/dev/loop-control") or not shutil.which("losetup"):
        why = "no loop driver (/dev/loop-control) or no losetup"
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
