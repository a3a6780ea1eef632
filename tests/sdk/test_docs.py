"""Docs that must stay true: the generated interface pages, and docs/sdk.md's example plugin."""

import os
import re
import subprocess
import sys

from xapi_storage.sdk import docgen, wire

from .helpers import REPO, plugin_env, run_exe


def test_generated_interface_pages_are_up_to_date():
    outdir = os.path.join(REPO, "docs", "interface")
    for name, text in docgen.pages().items():
        with open(os.path.join(outdir, name), encoding="utf-8") as f:
            assert f.read() == text, f"docs/interface/{name} is stale: run python -m xapi_storage.sdk.docgen docs/interface"
    r = subprocess.run([sys.executable, "-m", "xapi_storage.sdk.docgen", "--check", outdir],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True)
    assert r.returncode == 0, r.stderr


def test_docgen_check_notices_a_stale_page(tmp_path):
    r = subprocess.run([sys.executable, "-m", "xapi_storage.sdk.docgen", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True)
    assert r.returncode == 0
    (tmp_path / "Volume.md").write_text("hand edited\n")
    r = subprocess.run([sys.executable, "-m", "xapi_storage.sdk.docgen", "--check", str(tmp_path)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True)
    assert r.returncode == 1 and "Volume.md" in r.stderr


def test_every_method_is_documented():
    pages = docgen.pages()
    from xapi_storage.sdk import schema
    for i in schema.INTERFACES:
        for m in schema.interface(i).methods.values():
            assert f"### {m.wire_name}\n" in pages[f"{i}.md"]


def example_source():
    with open(os.path.join(REPO, "docs", "sdk.md"), encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"<!-- example: vendor_dirvol.py -->\n```python\n(.*?)```", text, re.S)
    assert m, "the example is missing from docs/sdk.md"
    return m.group(1)


def test_sdk_md_example_plugin_works(tmp_path):
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / "vendor_dirvol.py").write_text(example_source())
    root, sr = tmp_path / "root", tmp_path / "sr"
    sr.mkdir()
    env = plugin_env()
    env["PYTHONPATH"] = f"{mod_dir}{os.pathsep}{env['PYTHONPATH']}"
    cmd = [sys.executable, "-m", "xapi_storage.cli", "install", "--root", str(root),
           "--plugin", "volume:org.xen.xapi.storage.dirvol=vendor_dirvol", "--observer-python", "none"]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, env=env)
    assert r.returncode == 0, r.stderr
    d = root / "volume" / "org.xen.xapi.storage.dirvol"
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == [
        "Plugin.Query", "SR.attach", "SR.ls", "SR.stat", "Volume.create", "Volume.stat"]
    assert run_exe(d / "Plugin.Query", {"dbg": "t"}, env=env).value["plugin"] == "dirvol"
    r = run_exe(d / "SR.attach", {"dbg": "t", "configuration": {"path": str(sr)}}, env=env)
    assert (r.rc, r.value) == (0, str(sr))
    assert run_exe(d / "SR.stat", {"dbg": "t", "sr": str(sr)}, env=env).value["health"] == ["Healthy", ""]
    r = run_exe(d / "Volume.create", {"dbg": "t", "sr": str(sr), "name": "a", "description": "",
                                      "size": "1048576", "sharable": False}, env=env)
    assert r.rc == 0, r
    assert r.value["virtual_size"] == 1048576 and r.value["name"] == "a"
    assert [v["key"] for v in run_exe(d / "SR.ls", {"dbg": "t", "sr": str(sr)}, env=env).value] == [r.value["key"]]
    r = run_exe(d / "Volume.stat", {"dbg": "t", "sr": str(sr), "key": "nope"}, env=env)
    assert r.rc == 1 and r.value["params"] == ["Volume_does_not_exist", "nope"]
    r = run_exe(d / "SR.attach", {"dbg": "t", "configuration": {}}, env=env)
    assert r.rc == 1 and r.value["params"][0] == "SR_does_not_exist"


def test_sdk_md_in_process_snippet(tmp_path):
    sys.path.insert(0, str(tmp_path))
    try:
        (tmp_path / "vendor_dirvol2.py").write_text(example_source())
        vol = wire.call("vendor_dirvol2", "Volume.create",
                        {"dbg": "t", "sr": str(tmp_path), "name": "a", "description": "", "size": 1024,
                         "sharable": False})
        assert vol["virtual_size"] == 1024
    finally:
        sys.path.remove(str(tmp_path))


def test_sdk_md_lists_every_sdk_error_kind():
    from xapi_storage.sdk import errors
    with open(os.path.join(REPO, "docs", "sdk.md"), encoding="utf-8") as f:
        text = f.read()
    for cls in (errors.InvalidRequest, errors.InvalidResult, errors.UnknownMethod, errors.PluginLoadError):
        assert f'["{cls.NAME}"' in text
    for var in ("XAPI_STORAGE_LOG_STDERR", "XAPI_STORAGE_LOG_LEVEL", "XAPI_STORAGE_SYSLOG"):
        assert var in text
