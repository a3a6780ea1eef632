"""A call killed at any point leaves nothing that SR.ls or a retry cannot account for.

Each call runs in a child process with XAPI_STORAGE_FAULT=<point>[#n]: the process SIGKILLs
itself the n-th time it reaches that named point (see xapi_storage.volume.store.faultpoint), so
every step boundary of create/snapshot/clone/destroy/revert/set and SR.create/SR.destroy is
hit deterministically; a return code of -9 proves the point was reached. Afterwards SR.ls must
account for every file in the SR (check_accounted), and repeating the call must converge.
A last test kills a busy child at random moments, for whatever the named points miss.
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from xapi_storage.sdk.errors import SR_does_not_exist

from .conftest import DBG, check_accounted, run_child, sr_files

NO_REFLINK = {"XAPI_STORAGE_NO_REFLINK": "1"}    # the copy path has the most steps


def killed_at(point, iface, method, **kwargs):
    env = dict(NO_REFLINK, XAPI_STORAGE_FAULT=point)
    r = run_child(iface, method, env=env, **kwargs)
    assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stdout, r.stderr)


def ok(iface, method, **kwargs):
    r = run_child(iface, method, env=NO_REFLINK, **kwargs)
    assert r.returncode == 0, r.stdout + r.stderr
    import json
    return json.loads(r.stdout)


@pytest.fixture
def source(V, sr, sr_dir):
    """A volume with data in two extents and a hole between them."""
    v = V.create(dbg=DBG, sr=sr, name="src", description="", size=4 << 20, sharable=False)
    with open(os.path.join(sr_dir, v["key"] + ".img"), "r+b") as f:
        f.write(b"a" * 65536)
        f.seek(3 << 20)
        f.write(b"b" * 65536)
    return v


CREATE_POINTS = [("store:tmp-written#1", 0), ("create:pending", 0), ("create:data", 0),
                 ("store:tmp-written#2", 0), ("create:ready", 1)]


@pytest.mark.parametrize("point, survivors", CREATE_POINTS)
def test_create_killed(SR, sr, sr_dir, point, survivors):
    killed_at(point, "Volume", "create", sr=sr, name="n", description="", size=1 << 20,
              sharable=False)
    assert len(check_accounted(SR, sr, sr_dir)) == survivors
    ok("Volume", "create", sr=sr, name="n", description="", size=1 << 20, sharable=False)
    assert len(check_accounted(SR, sr, sr_dir)) == survivors + 1


@pytest.mark.parametrize("kind", ["snapshot", "clone"])
@pytest.mark.parametrize("point, survivors", [
    ("store:tmp-written#1", 0), ("{kind}:pending", 0), ("copy:started", 0),
    ("{kind}:data", 0), ("store:tmp-written#2", 0), ("{kind}:ready", 1)])
def test_copy_killed(SR, V, sr, sr_dir, source, kind, point, survivors):
    killed_at(point.format(kind=kind), "Volume", kind, sr=sr, key=source["key"])
    vols = check_accounted(SR, sr, sr_dir)
    assert len(vols) == 1 + survivors
    new = ok("Volume", kind, sr=sr, key=source["key"])
    vols = check_accounted(SR, sr, sr_dir)
    assert len(vols) == 2 + survivors
    with open(os.path.join(sr_dir, new["key"] + ".img"), "rb") as a, \
            open(os.path.join(sr_dir, source["key"] + ".img"), "rb") as b:
        assert a.read() == b.read()


@pytest.mark.parametrize("point, gone", [("store:tmp-written#1", False), ("destroy:marked", True),
                                         ("remove:data-gone", True),
                                         ("remove:record-gone", True)])
def test_destroy_killed(SR, V, sr, sr_dir, source, point, gone):
    killed_at(point, "Volume", "destroy", sr=sr, key=source["key"])
    vols = check_accounted(SR, sr, sr_dir)
    assert [v["key"] for v in vols] == ([] if gone else [source["key"]])
    assert ok("Volume", "destroy", sr=sr, key=source["key"]) is None
    assert check_accounted(SR, sr, sr_dir) == []


def test_destroy_killed_then_retried_without_ls(SR, V, sr, sr_dir, source):
    """The retry alone (no SR.ls in between) finishes the job."""
    killed_at("remove:data-gone", "Volume", "destroy", sr=sr, key=source["key"])
    assert ok("Volume", "destroy", sr=sr, key=source["key"]) is None
    assert sr_files(sr_dir) == ["sr.json", "sr.lock"]


@pytest.mark.parametrize("point", ["copy:started", "revert:copied"])
def test_revert_killed(SR, V, sr, sr_dir, source, point):
    snap = V.snapshot(dbg=DBG, sr=sr, key=source["key"])
    path = os.path.join(sr_dir, source["key"] + ".img")
    with open(path, "r+b") as f:
        f.write(b"changed")
    killed_at(point, "Volume", "revert", sr=sr, snapshot=snap["key"], key=source["key"])
    check_accounted(SR, sr, sr_dir)
    with open(path, "rb") as f:
        assert f.read(7) == b"changed"          # the old data, whole
    ok("Volume", "revert", sr=sr, snapshot=snap["key"], key=source["key"])
    check_accounted(SR, sr, sr_dir)
    with open(path, "rb") as f:
        assert f.read(7) == b"a" * 7


def test_set_killed(SR, V, sr, sr_dir, source):
    killed_at("store:tmp-written#1", "Volume", "set", sr=sr, key=source["key"], k="a", v="b")
    [v] = check_accounted(SR, sr, sr_dir)
    assert v["keys"] == {}
    ok("Volume", "set", sr=sr, key=source["key"], k="a", v="b")
    [v] = check_accounted(SR, sr, sr_dir)
    assert v["keys"] == {"a": "b"}


@pytest.mark.parametrize("point", ["sr-create:checked", "store:tmp-written#1"])
def test_sr_create_killed(SR, tmp_path, point):
    path = str(tmp_path / "sr")
    args = dict(uuid="u", configuration={"path": path}, name="n", description="")
    killed_at(point, "SR", "create", **args)
    with pytest.raises(SR_does_not_exist):
        SR.attach(dbg=DBG, configuration={"path": path})
    assert ok("SR", "create", **args) == {"path": path, "sr_uuid": "u"}
    sr = SR.attach(dbg=DBG, configuration={"path": path})
    assert check_accounted(SR, sr, path) == []
    assert not [n for n in os.listdir(path) if n.startswith(".tmp.")]


@pytest.mark.parametrize("point", ["store:tmp-written#1", "sr-destroy:marked",
                                   "sr-destroy:volume-gone", "remove:data-gone",
                                   "sr-destroy:locks-gone"])
def test_sr_destroy_killed(SR, V, sr, sr_dir, source, point):
    V.snapshot(dbg=DBG, sr=sr, key=source["key"])
    killed_at(point, "SR", "destroy", sr=sr)
    if point == "store:tmp-written#1":          # not yet marked: still a whole SR
        assert len(check_accounted(SR, sr, sr_dir)) == 2
    else:                                       # marked: only SR.destroy goes on with it
        with pytest.raises(SR_does_not_exist):
            SR.ls(dbg=DBG, sr=sr)
        [r] = SR.probe(dbg=DBG, configuration={"path": sr_dir})
        assert r["complete"] is False and "destroyed" in r["extra_info"]["reason"]
    assert ok("SR", "destroy", sr=sr) is None
    assert os.listdir(sr_dir) == []


# A busy child: creates, snapshots, clones, sets keys, destroys, forever.
BUSY = r"""
import sys
from xapi_storage.volume import file_raw
sr = sys.argv[1]
V = file_raw.Volume()
keys = []
while True:
    v = V.create(dbg="busy", sr=sr, name="b", description="", size=1 << 20, sharable=False)
    with open(v["uri"][0][len("blkback://"):], "r+b") as f:
        f.write(b"x" * 8192)
    s = V.snapshot(dbg="busy", sr=sr, key=v["key"])
    c = V.clone(dbg="busy", sr=sr, key=s["key"])
    V.set(dbg="busy", sr=sr, key=c["key"], k="k", v="v")
    for k in (v["key"], s["key"], c["key"]):
        V.destroy(dbg="busy", sr=sr, key=k)
"""


def test_killed_at_random_moments(SR, sr, sr_dir):
    rng = random.Random(1234)
    for _ in range(12):
        child = subprocess.Popen([sys.executable, "-c", BUSY, sr],
                                 env=dict(os.environ, **NO_REFLINK))
        time.sleep(0.15 + rng.random() * 0.4)
        child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
        vols = check_accounted(SR, sr, sr_dir)
        assert len(vols) <= 3
        for v in vols:                          # and the retry of a destroy converges
            ok("Volume", "destroy", sr=sr, key=v["key"])
        assert check_accounted(SR, sr, sr_dir) == []


def test_sr_set_name_killed(SR, sr, sr_dir):
    killed_at("store:tmp-written#1", "SR", "set_name", sr=sr, new_name="new")
    assert [n for n in os.listdir(sr_dir) if n.startswith(".tmp.sr.meta.")]
    assert SR.stat(dbg=DBG, sr=sr)["name"] == "test SR"
    check_accounted(SR, sr, sr_dir)             # SR.ls removed the stale temporary file
    ok("SR", "set_name", sr=sr, new_name="new")
    assert SR.stat(dbg=DBG, sr=sr)["name"] == "new"


def test_ls_leaves_calls_in_progress_alone(SR, sr, sr_dir):
    """A record in state creating whose lock is held is a call still running: SR.ls neither
    lists nor removes it; once the lock is free it is a leftover, and SR.ls removes it."""
    from xapi_storage.volume.store import Store, new_uuid
    key = new_uuid()
    with Store(sr_dir) as store:
        lock = store.lock(key + ".lock")
        store.write(key + ".json", {"key": key, "state": "creating", "name": "", "keys": {},
                                    "description": "", "read_write": True,
                                    "sharable": False}, owner=key, exclusive=True)
        with open(os.path.join(sr_dir, key + ".img"), "wb"):
            pass
        assert SR.ls(dbg=DBG, sr=sr) == []
        assert sorted(n for n in os.listdir(sr_dir) if n.startswith(key)) == [
            key + ".img", key + ".json", key + ".lock"]
        lock.release()
    assert check_accounted(SR, sr, sr_dir) == []
