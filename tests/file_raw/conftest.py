"""Fixtures for the file-raw plugin tests: a fresh SR in a temporary directory, the plugin's
classes (instantiated as the SDK does), and a way to run one call in a child process."""

import json
import os
import subprocess
import sys

import pytest

from xapi_storage.volume import file_raw

DBG = "test"


@pytest.fixture
def plugin():
    return file_raw.Plugin()


@pytest.fixture
def SR():
    return file_raw.SR()


@pytest.fixture
def V():
    return file_raw.Volume()


@pytest.fixture
def sr_dir(tmp_path):
    return str(tmp_path / "sr")


@pytest.fixture
def sr(SR, sr_dir):
    """The key of a fresh, attached SR."""
    config = SR.create(dbg=DBG, uuid="5f0c1d8e-0000-4000-8000-000000000001",
                       configuration={"path": sr_dir}, name="test SR", description="")
    return SR.attach(dbg=DBG, configuration=config)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> the path of a fresh small tmpfs (a real filesystem that can be made
    full or read-only), unmounted at teardown. Needs root: skips otherwise, fails with CI."""
    mounted = []

    def mount(options="size=256k"):
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options},mode=0700", "tmpfs",
                            str(mnt)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True)
        if r.returncode != 0:
            msg = f"cannot mount a small tmpfs (needs root): {r.stderr.strip()}"
            if os.environ.get("CI"):
                pytest.fail(msg)
            pytest.skip(msg)
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in reversed(mounted):
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path):
    """Fill the filesystem of `path` (a new file) until it has no free block."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError as e:
        assert e.errno == 28, e
    finally:
        os.close(fd)


def sr_files(path):
    return sorted(os.listdir(path))


def volume_files(keys):
    return sorted(f"{k}.{ext}" for k in keys for ext in ("img", "json", "lock"))


# A child process that makes one call on the plugin classes in-process and prints the JSON
# result (or {"error": [code, params]}). Used for fault injection and concurrency tests, which
# need processes that can be killed; the tests through the installed executables live in
# test_executables.py.
CHILD = r"""
import json, sys
from xapi_storage.volume import file_raw
from xapi_storage.sdk.errors import StorageError
iface, method, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
try:
    print(json.dumps(getattr(file_raw.IMPLEMENTATIONS[iface](), method)(**kwargs)))
except StorageError as e:
    print(json.dumps({"error": [e.code, e.params]}))
    sys.exit(1)
"""


def child_argv(iface, method, **kwargs):
    kwargs.setdefault("dbg", DBG)
    return [sys.executable, "-c", CHILD, iface, method, json.dumps(kwargs)]


def run_child(iface, method, env=None, **kwargs):
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(child_argv(iface, method, **kwargs), env=full_env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=120)


def check_accounted(SR, sr, path):
    """The invariant after any crash: SR.ls accounts for every file in the SR directory.

    After SR.ls has run (it finishes the removal of whatever killed calls left behind when no
    call holds their lock), the directory holds exactly the SR's own files and three files
    (data, record, lock) per listed volume: nothing leaked, nothing hidden.
    """
    vols = SR.ls(dbg=DBG, sr=sr)
    keys = [v["key"] for v in vols]
    assert len(set(keys)) == len(keys)
    own = {"sr.json", "sr.lock", "sr.meta.lock"}
    files = [f for f in sr_files(path) if f not in own]
    assert files == volume_files(keys), "files not accounted for by SR.ls"
    for v in vols:
        st = os.stat(os.path.join(path, v["key"] + ".img"))
        assert st.st_size == v["virtual_size"]
    return vols
