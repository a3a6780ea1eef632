"""`xapi-storage new-plugin`: the package it writes installs, its own test runs the conformance
suite and passes; a method whose @base.unimplemented is removed gets its executable, and the
conformance checks that need it start to run."""

import os
import subprocess
import sys

import pytest

from xapi_storage import newplugin
from xapi_storage.sdk import base


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "xapi_storage.cli"] + list(args), cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)


def _env(path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([path] + [p for p in [env.get("PYTHONPATH")] if p])
    env["XAPI_STORAGE_SYSLOG"] = "0"
    return env


@pytest.mark.parametrize("kind,name", [("volume", "acme"), ("datapath", "acme+nbd")])
def test_the_package_it_writes_passes_its_own_test(kind, name, tmp_path):
    out = _cli("new-plugin", kind, name, "--dir", str(tmp_path / "pkg"))
    assert out.returncode == 0, out.stderr
    pkg = tmp_path / "pkg"
    assert (pkg / "setup.cfg").read_text().count(f"xapi_storage.{kind} =") == 1
    # the package's own test, as its README says to run it (the package on the path
    # stands for `pip install -e`; tests/kit/test_newplugin_pip.py does the real install)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                       cwd=str(pkg), env=_env(str(pkg)), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert r.returncode == 0, r.stdout
    assert "passed" in r.stdout


def test_every_method_is_written_out_and_only_query_is_installed(tmp_path, install_plugin):
    files = newplugin.plan("volume", "acme")
    src = files["acme_storage/volume.py"]
    for m in ("def probe(", "def snapshot(", "def list_changed_blocks(", "def compose("):
        assert m in src
    newplugin.write(str(tmp_path / "pkg"), files)
    sys.path.insert(0, str(tmp_path / "pkg"))
    try:
        d = install_plugin("volume", "org.xen.xapi.storage.acme", "acme_storage.volume")
        assert sorted(n for n in os.listdir(d) if not n.startswith(".")) == ["Plugin.Query"]
        from acme_storage import volume
        with pytest.raises(base.Unimplemented, match="Volume.snapshot: not written yet"):
            volume.Volume().snapshot("t", "sr", "k")
    finally:
        sys.path.remove(str(tmp_path / "pkg"))
        for m in [m for m in sys.modules if m.startswith("acme_storage")]:
            del sys.modules[m]


def test_a_method_filled_in_but_still_unimplemented_fails_conformance(tmp_path, install_plugin):
    """Removing the decorator lays the executable out; while its body still raises
    Unimplemented the conformance run says so and fails."""
    pkg = tmp_path / "pkg"
    newplugin.write(str(pkg), newplugin.plan("volume", "acme2"))
    mod = pkg / "acme2_storage" / "volume.py"
    text = mod.read_text(encoding="utf-8")
    head, sep, tail = text.partition("    @base.unimplemented\n    def attach(")
    mod.write_text(head + "    def attach(" + tail, encoding="utf-8")
    env = _env(str(pkg))
    sys.path.insert(0, str(pkg))
    try:
        d = install_plugin("volume", "org.xen.xapi.storage.acme2", "acme2_storage.volume")
    finally:
        sys.path.remove(str(pkg))
        for m in [m for m in sys.modules if m.startswith("acme2_storage")]:
            del sys.modules[m]
    assert os.path.exists(os.path.join(d, "SR.attach"))
    r = subprocess.run([sys.executable, "-m", "xapi_storage.cli", "conformance", str(d),
                        "-c", "path=" + str(tmp_path / "sr")], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith("sr-attach"))
    assert "FAIL" in line and "Unimplemented" in r.stdout


@pytest.mark.parametrize("args,why", [
    (["volume", "Acme.X"], "no SR type"),
    (["datapath", "9nbd"], "no URI scheme"),
    (["volume", "ok", "--package", "class"], "not a Python package name"),
])
def test_bad_names_are_refused_and_leave_nothing(args, why, tmp_path):
    out = _cli("new-plugin", *args, "--dir", str(tmp_path / "pkg"))
    assert out.returncode == 2 and why in out.stderr
    assert os.listdir(str(tmp_path)) == []


def test_an_existing_non_empty_directory_is_left_untouched(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mine").write_text("keep")
    out = _cli("new-plugin", "volume", "acme", "--dir", str(tmp_path / "pkg"))
    assert out.returncode == 2 and "left untouched" in out.stderr
    assert os.listdir(str(tmp_path / "pkg")) == ["mine"]
    assert sorted(os.listdir(str(tmp_path))) == ["pkg"]
