"""A full SR: every call that needs space answers SR_BACKEND_FAILURE_44 ("There is
insufficient space"), leaves the directory exactly as it was (no lock, temporary file or record
of a volume that was not made), and once space is freed everything works again.

The SR lives on a real 256 KiB tmpfs mount, filled up by a file next to it."""

import os

import pytest

from xapi_storage.sdk.errors import XenAPIError

from .conftest import DBG, check_accounted, fill, run_child

SR_UUID = "5f0c1d8e-0000-4000-8000-0000000000f1"


@pytest.fixture
def full_dir(tmpfs):
    return tmpfs("size=256k")


def _snapshot_dir(path):
    """Name -> (mode, size, content) of every entry: what a failed call must not change."""
    out = {}
    for n in os.listdir(path):
        st = os.lstat(os.path.join(path, n))
        data = None
        if n.endswith(".json"):
            with open(os.path.join(path, n), "rb") as f:
                data = f.read()
        out[n] = (st.st_mode, st.st_size, data)
    return out


def test_a_full_sr_answers_insufficient_space_and_leaves_nothing(SR, V, full_dir):
    sr_dir = str(full_dir / "sr")
    config = SR.create(dbg=DBG, uuid=SR_UUID, configuration={"path": sr_dir}, name="n",
                       description="")
    sr = SR.attach(dbg=DBG, configuration=config)
    vol = V.create(dbg=DBG, sr=sr, name="a", description="", size=1 << 20, sharable=False)
    key = vol["key"]
    SR.set_name(dbg=DBG, sr=sr, new_name="before")       # sr.meta.lock exists from here on
    filler = str(full_dir / "filler")
    fill(filler)
    before = _snapshot_dir(sr_dir)
    long = "x" * 8192             # a record that needs a new page
    calls = {
        "Volume.create": lambda: V.create(dbg=DBG, sr=sr, name="b", description="",
                                          size=1 << 20, sharable=False),
        "Volume.snapshot": lambda: V.snapshot(dbg=DBG, sr=sr, key=key),
        "Volume.clone": lambda: V.clone(dbg=DBG, sr=sr, key=key),
        "Volume.set": lambda: V.set(dbg=DBG, sr=sr, key=key, k="k", v=long),
        "Volume.set_name": lambda: V.set_name(dbg=DBG, sr=sr, key=key, new_name=long),
        "Volume.set_description": lambda: V.set_description(dbg=DBG, sr=sr, key=key,
                                                            new_description=long),
        "SR.set_name": lambda: SR.set_name(dbg=DBG, sr=sr, new_name=long),
        "SR.set_description": lambda: SR.set_description(dbg=DBG, sr=sr,
                                                         new_description=long),
    }
    for name, call in calls.items():
        with pytest.raises(XenAPIError) as e:
            call()
        assert (e.value.code, e.value.params[0]) == \
            ("SR_BACKEND_FAILURE_44", "There is insufficient space"), name
        assert "No space left on device" in e.value.params[1], name
        assert _snapshot_dir(sr_dir) == before, name
    # SR.create of a second SR in the full filesystem: nothing of it is left
    with pytest.raises(XenAPIError) as e:
        SR.create(dbg=DBG, uuid="5f0c1d8e-0000-4000-8000-0000000000f2",
                  configuration={"path": str(full_dir / "sr2")}, name=long, description=long)
    assert e.value.code == "SR_BACKEND_FAILURE_44"
    assert sorted(os.listdir(full_dir)) == ["filler", "sr"]
    # the same through a process, as the daemon sees it: the error record, exit 1
    p = run_child("Volume", "set_name", sr=sr, key=key, new_name=long)
    assert p.returncode == 1 and '"SR_BACKEND_FAILURE_44"' in p.stdout, p.stdout + p.stderr
    assert _snapshot_dir(sr_dir) == before
    # reads still work on a full SR
    assert V.stat(dbg=DBG, sr=sr, key=key)["name"] == "a"
    assert SR.stat(dbg=DBG, sr=sr)["name"] == "before"
    # space again: the same calls work, and SR.ls accounts for every file
    os.unlink(filler)
    V.set_name(dbg=DBG, sr=sr, key=key, new_name=long)
    V.snapshot(dbg=DBG, sr=sr, key=key)
    V.create(dbg=DBG, sr=sr, name="b", description="", size=1 << 20, sharable=False)
    assert len(check_accounted(SR, sr, sr_dir)) == 3
    assert V.stat(dbg=DBG, sr=sr, key=key)["name"] == long
