"""`xapi-storage demo` (the README's main job) runs the file-raw plugin end to end."""

import os
import shutil
import subprocess
import sys


def xapi_storage():
    return shutil.which("xapi-storage", path=os.path.dirname(sys.executable))


def test_demo(tmp_path):
    r = subprocess.run([xapi_storage(), "demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the clone reads: b'hello from the demo\\n'" in r.stdout
    assert "snapshot  False" in r.stdout and "SR destroyed" in r.stdout
    # the ring part: the simulated guest read the demo's bytes through pyblkback, and its own
    # write reached the volume and the clone taken after it
    assert "guest reads sector 0: b'hello from the demo\\n'" in r.stdout
    assert "the guest's 64 KiB: identical" in r.stdout
    leftovers = [n for n in os.listdir("/dev/shm") if n.startswith("xapi-storage-demo-xen-")]
    assert leftovers == []


def test_demo_without_ring():
    r = subprocess.run([xapi_storage(), "demo", "--no-ring"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pyblkback" not in r.stdout and "SR destroyed" in r.stdout


def test_demo_keep(tmp_path):
    r = subprocess.run([xapi_storage(), "demo", "--dir", str(tmp_path), "--keep"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    files = os.listdir(tmp_path / "sr")
    assert len([f for f in files if f.endswith(".img")]) == 3
    assert os.path.isfile(tmp_path / "root/volume/org.xen.xapi.storage.file-raw/Plugin.Query")
