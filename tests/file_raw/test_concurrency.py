"""Calls on one SR run in parallel processes (the daemon has no lock): nothing is lost."""

import json
import subprocess

from .conftest import DBG, check_accounted, child_argv


def run_all(argvs):
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
             for a in argvs]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append((p.returncode, stdout, stderr))
    return out


def test_32_concurrent_creates(SR, sr, sr_dir):
    results = run_all([child_argv("Volume", "create", sr=sr, name=f"v{i}", description="",
                                  size=1 << 20, sharable=False) for i in range(32)])
    assert all(rc == 0 for rc, _, _ in results), results
    keys = {json.loads(out)["key"] for _, out, _ in results}
    assert len(keys) == 32
    vols = check_accounted(SR, sr, sr_dir)
    assert {v["key"] for v in vols} == keys
    assert sorted(v["name"] for v in vols) == sorted(f"v{i}" for i in range(32))


def test_concurrent_sets_lose_no_update(V, sr):
    key = V.create(dbg=DBG, sr=sr, name="n", description="", size=0, sharable=False)["key"]
    results = run_all([child_argv("Volume", "set", sr=sr, key=key, k=f"k{i}", v=str(i))
                       for i in range(16)])
    assert all(rc == 0 for rc, _, _ in results), results
    assert V.stat(dbg=DBG, sr=sr, key=key)["keys"] == {f"k{i}": str(i) for i in range(16)}


def test_creates_while_listing(SR, sr, sr_dir):
    """SR.ls cleans up after killed calls; it must never touch a call still in progress."""
    argvs = []
    for i in range(12):
        argvs.append(child_argv("Volume", "create", sr=sr, name=f"v{i}", description="",
                                size=1 << 20, sharable=False))
        if i % 2:
            argvs.append(child_argv("SR", "ls", sr=sr))
    results = run_all(argvs)
    assert all(rc == 0 for rc, _, _ in results), results
    assert len(check_accounted(SR, sr, sr_dir)) == 12


def test_snapshots_racing_destroy(SR, V, sr, sr_dir):
    """Snapshots and a destroy of the same volume: each snapshot either happened before the
    destroy (a whole copy) or failed cleanly with Volume_does_not_exist."""
    src = V.create(dbg=DBG, sr=sr, name="n", description="", size=1 << 20, sharable=False)
    argvs = [child_argv("Volume", "snapshot", sr=sr, key=src["key"]) for _ in range(6)]
    argvs.insert(3, child_argv("Volume", "destroy", sr=sr, key=src["key"]))
    results = run_all(argvs)
    made = []
    for rc, out, err in results:
        if rc == 0:
            if json.loads(out) is not None:
                made.append(json.loads(out)["key"])
        else:
            assert json.loads(out)["error"][1][0] == "Volume_does_not_exist", err
    vols = check_accounted(SR, sr, sr_dir)
    assert sorted(v["key"] for v in vols) == sorted(made)


def test_concurrent_sr_destroy_and_creates(SR, sr, sr_dir):
    """Creates racing SR.destroy: afterwards the directory is empty (a create either finished
    before the destroy, which removed it, or found no SR)."""
    import os
    argvs = [child_argv("Volume", "create", sr=sr, name="n", description="", size=0,
                        sharable=False) for _ in range(8)]
    argvs.insert(4, child_argv("SR", "destroy", sr=sr))
    results = run_all(argvs)
    for rc, out, err in results:
        if rc:
            assert json.loads(out)["error"][1][0] == "SR_does_not_exist", err
    assert os.listdir(sr_dir) == []


def test_concurrent_sr_destroys(SR, V, sr, sr_dir):
    import os
    for _ in range(3):
        V.create(dbg=DBG, sr=sr, name="n", description="", size=0, sharable=False)
    results = run_all([child_argv("SR", "destroy", sr=sr) for _ in range(6)])
    assert sum(rc == 0 for rc, _, _ in results) >= 1
    for rc, out, err in results:
        if rc:
            assert json.loads(out)["error"][1][0] == "SR_does_not_exist", err
    assert os.listdir(sr_dir) == []
