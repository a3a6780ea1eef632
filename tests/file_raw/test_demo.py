"""`xapi-storage demo` (the README's main job) runs the file-raw plugin end to end."""

import os
import shutil
import subprocess
import sys


def xapi_storage():
    return shutil.which("xapi-storage", path=os.path.dirname(sys.executable))


def test_demo(tmp_path):
    r = subprocess.run([xapi_storage(), "demo"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the clone reads: b'hello from the demo\\n'" in r.stdout
    assert "snapshot  False" in r.stdout and "SR destroyed" in r.stdout


def test_demo_keep(tmp_path):
    r = subprocess.run([xapi_storage(), "demo", "--dir", str(tmp_path), "--keep"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    files = os.listdir(tmp_path / "sr")
    assert len([f for f in files if f.endswith(".img")]) == 3
    assert os.path.isfile(tmp_path / "root/volume/org.xen.xapi.storage.file-raw/Plugin.Query")
