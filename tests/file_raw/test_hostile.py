"""file-raw in a hostile or unlucky world: full filesystems (no block, no inode), records it
does not understand, entries planted under its names, a lost lock file, a read-only mount,
hard links, and lock holders that never let go. Everything on real files; the full and
read-only filesystems are small real tmpfs mounts."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from xapi_storage.sdk.errors import SR_does_not_exist, XenAPIError

from .conftest import DBG, check_accounted, fill, run_child, sr_files

SR_UUID = "5f0c1d8e-0000-4000-8000-0000000000b1"
OTHER = "5f0c1d8e-0000-4000-8000-0000000000c1"


def make(V, sr):
    return V.create(dbg=DBG, sr=sr, name="v", description="d", size=1 << 20, sharable=False)


def new_sr(SR, path):
    config = SR.create(dbg=DBG, uuid=SR_UUID, configuration={"path": str(path)}, name="n",
                       description="")
    return SR.attach(dbg=DBG, configuration=config)


def write_data(sr_dir, key, size):
    with open(os.path.join(sr_dir, key + ".img"), "r+b") as f:
        f.write(b"v" * size)


def fill_inodes(mnt):
    """Make empty files in `mnt` until the filesystem has no free inode."""
    d = os.path.join(str(mnt), "inodes")
    os.mkdir(d)
    i = 0
    try:
        while True:
            os.close(os.open(os.path.join(d, str(i)), os.O_CREAT | os.O_WRONLY, 0o600))
            i += 1
    except OSError as e:
        assert e.errno == 28, e
    return i


# --- 1. a full SR can always be freed -------------------------------------------------------------

@pytest.mark.parametrize("full", ["blocks", "inodes"])
def test_a_full_sr_can_be_freed(SR, V, tmpfs, full):
    """No free block (tmpfs, XFS and NFS keep no root reserve) or no free inode: destroy must
    not first need a new file for its `destroying` record. Volume.destroy and SR.destroy
    succeed and leave nothing of what they removed."""
    mnt = tmpfs("size=512k,nr_inodes=64")
    sr_dir = str(mnt / "sr")
    sr = new_sr(SR, sr_dir)
    a, b, c = make(V, sr), make(V, sr), make(V, sr)
    for v in a, b, c:
        write_data(sr_dir, v["key"], 64 << 10)
    if full == "blocks":
        fill(str(mnt / "filler"))
    else:
        fill_inodes(mnt)
    with pytest.raises(XenAPIError) as e:       # it is full indeed
        V.set_name(dbg=DBG, sr=sr, key=a["key"], new_name="x" * 8192)
    assert e.value.code == "SR_BACKEND_FAILURE_44"
    V.destroy(dbg=DBG, sr=sr, key=a["key"])
    assert sorted(v["key"] for v in SR.ls(dbg=DBG, sr=sr)) == sorted([b["key"], c["key"]])
    assert not [n for n in sr_files(sr_dir) if n.startswith(a["key"])]
    # SR.destroy of a full SR (fill again what the destroy freed)
    if full == "blocks":
        fill(str(mnt / "filler2"))
    else:
        fill_inodes(mnt / "inodes")
    SR.destroy(dbg=DBG, sr=sr)
    assert sr_files(sr_dir) == []
    with pytest.raises(SR_does_not_exist):
        SR.attach(dbg=DBG, configuration={"path": sr_dir})


def test_a_full_sr_destroy_killed_midway_converges(SR, V, tmpfs):
    """On a full SR the data goes before the record: a destroy killed between the two leaves
    the volume listed (sizes 0, no URI: nothing hidden), and the retry finishes it."""
    mnt = tmpfs("size=512k")
    sr_dir = str(mnt / "sr")
    sr = new_sr(SR, sr_dir)
    v, keep = make(V, sr), make(V, sr)
    write_data(sr_dir, v["key"], 64 << 10)
    fill(str(mnt / "filler"))
    r = run_child("Volume", "destroy", env={"XAPI_STORAGE_FAULT": "remove:data-gone"}, sr=sr,
                  key=v["key"])
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    listed = {x["key"]: x for x in SR.ls(dbg=DBG, sr=sr)}
    assert sorted(listed) == sorted([v["key"], keep["key"]])
    assert (listed[v["key"]]["virtual_size"], listed[v["key"]]["uri"]) == (0, [])
    V.destroy(dbg=DBG, sr=sr, key=v["key"])
    assert [x["key"] for x in check_accounted(SR, sr, sr_dir)] == [keep["key"]]
    # SR.destroy of the full SR killed after its first volume: still a usable SR, the
    # retry finishes
    fill(str(mnt / "filler2"))
    r = run_child("SR", "destroy", env={"XAPI_STORAGE_FAULT": "sr-destroy:volume-gone"}, sr=sr)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert check_accounted(SR, sr, sr_dir) == []
    SR.destroy(dbg=DBG, sr=sr)
    assert sr_files(sr_dir) == []


# --- 2-4. records the plugin does not understand are listed, never removed behind its back --------

def _record(sr_dir, key):
    return os.path.join(sr_dir, key + ".json")


def _rewrite(sr_dir, key, change):
    with open(_record(sr_dir, key)) as f:
        rec = json.load(f)
    rec = change(rec)
    with open(_record(sr_dir, key), "w") as f:
        f.write(rec if isinstance(rec, str) else json.dumps(rec))


BAD_RECORDS = {
    "newer state": lambda r: dict(r, state="migrating"),
    "no state": lambda r: {k: v for k, v in r.items() if k != "state"},
    "name not a string": lambda r: dict(r, name=5),
    "no keys": lambda r: {k: v for k, v in r.items() if k != "keys"},
    "a list": lambda r: [r],
    "another volume's": lambda r: dict(r, key=OTHER),
    "truncated": lambda r: json.dumps(r)[:20],
    "garbage": lambda r: "\x00\xff garbage",
}


@pytest.mark.parametrize("bad", sorted(BAD_RECORDS))
def test_a_record_not_understood_is_listed_kept_and_destroyable(SR, V, sr, sr_dir, bad):
    """SR.ls (xapi's SR.scan) lists every other volume, lists this one read-only without URI
    (description says why) instead of hiding it, and never deletes its data: it may be a
    newer plugin's record on a shared SR. Only Volume.destroy, asked for by name, removes
    it; other calls on it answer a structured error."""
    good, odd = make(V, sr), make(V, sr)
    write_data(sr_dir, odd["key"], 4096)
    _rewrite(sr_dir, odd["key"], BAD_RECORDS[bad])
    before = sr_files(sr_dir)
    for _ in range(2):
        listed = {v["key"]: v for v in SR.ls(dbg=DBG, sr=sr)}
        assert sorted(listed) == sorted([good["key"], odd["key"]])
        got = listed[odd["key"]]
        assert (got["uri"], got["read_write"], got["virtual_size"]) == ([], False, 1 << 20)
        assert got["description"].startswith("file-raw cannot use this volume")
        assert listed[good["key"]]["uri"]
        assert sr_files(sr_dir) == before
    assert V.stat(dbg=DBG, sr=sr, key=odd["key"])["uri"] == []
    with pytest.raises(XenAPIError) as e:
        V.resize(dbg=DBG, sr=sr, key=odd["key"], new_size=2 << 20)
    assert e.value.params[:2] == ["Volume record not understood", odd["key"]]
    with pytest.raises(XenAPIError):
        V.snapshot(dbg=DBG, sr=sr, key=odd["key"])
    assert sr_files(sr_dir) == before
    V.destroy(dbg=DBG, sr=sr, key=odd["key"])
    assert [v["key"] for v in check_accounted(SR, sr, sr_dir)] == [good["key"]]


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_record_replaced_by_a_symlink_or_fifo_is_destroyable(SR, V, sr, sr_dir, tmp_path,
                                                              kind):
    v = make(V, sr)
    outside = tmp_path / "outside"
    outside.write_text("theirs")
    os.unlink(_record(sr_dir, v["key"]))
    if kind == "symlink":
        os.symlink(str(outside), _record(sr_dir, v["key"]))
    else:
        os.mkfifo(_record(sr_dir, v["key"]))
    assert [x["uri"] for x in SR.ls(dbg=DBG, sr=sr)] == [[]]
    V.destroy(dbg=DBG, sr=sr, key=v["key"])
    assert check_accounted(SR, sr, sr_dir) == []
    assert outside.read_text() == "theirs"


def test_a_killed_calls_records_are_still_cleaned(SR, V, sr, sr_dir):
    """The other side of the rule: what the plugin can prove is its own unfinished work (its
    record in state creating or destroying, lock free) is removed by SR.ls."""
    v = make(V, sr)
    _rewrite(sr_dir, v["key"], lambda r: dict(r, state="creating"))
    assert check_accounted(SR, sr, sr_dir) == []


# --- 5. planted directories and symlinks never wedge a volume or the SR ---------------------------

@pytest.mark.parametrize("kind", ["symlink", "directory", "fifo"])
def test_a_planted_lock_entry_does_not_wedge_the_volume(SR, V, sr, sr_dir, tmp_path, kind):
    v = make(V, sr)
    lock = os.path.join(sr_dir, v["key"] + ".lock")
    os.unlink(lock)
    if kind == "symlink":
        os.symlink(str(tmp_path / "target"), lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        os.mkdir(lock)
        with open(os.path.join(lock, "theirs"), "w") as f:
            f.write("theirs")
    V.set_name(dbg=DBG, sr=sr, key=v["key"], new_name="renamed")
    V.resize(dbg=DBG, sr=sr, key=v["key"], new_size=2 << 20)
    assert V.stat(dbg=DBG, sr=sr, key=v["key"])["name"] == "renamed"
    V.destroy(dbg=DBG, sr=sr, key=v["key"])
    assert SR.ls(dbg=DBG, sr=sr) == []
    assert not (tmp_path / "target").exists()
    left = set(sr_files(sr_dir)) - {"sr.json", "sr.lock", "sr.meta.lock"}
    if kind == "directory":     # someone's directory: never removed
        assert left == {v["key"] + ".lock"}
        with open(os.path.join(lock, "theirs")) as f:
            assert f.read() == "theirs"
    else:
        assert left == set()


def test_planted_directories_do_not_wedge_sr_destroy(SR, V, sr, sr_dir):
    """Directories named <key>.json and <key>.lock: SR.destroy killed after marking the SR
    and removing data, then retried, finishes; the directories (someone else's) stay."""
    a, b = make(V, sr), make(V, sr)
    os.unlink(os.path.join(sr_dir, a["key"] + ".lock"))
    os.mkdir(os.path.join(sr_dir, a["key"] + ".lock"))
    os.mkdir(os.path.join(sr_dir, OTHER + ".json"))
    r = run_child("SR", "destroy", env={"XAPI_STORAGE_FAULT": "sr-destroy:volume-gone"}, sr=sr)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    SR.destroy(dbg=DBG, sr=sr)
    assert sr_files(sr_dir) == sorted([a["key"] + ".lock", OTHER + ".json"])
    with pytest.raises(SR_does_not_exist):
        SR.destroy(dbg=DBG, sr=sr)


def test_sr_create_on_a_full_filesystem_leaves_an_existing_directory_empty(SR, tmpfs):
    mnt = tmpfs("size=256k")
    os.mkdir(str(mnt / "sr"))
    fill(str(mnt / "filler"))
    with pytest.raises(XenAPIError) as e:
        SR.create(dbg=DBG, uuid=SR_UUID, configuration={"path": str(mnt / "sr")},
                  name="x" * 8192, description="")
    assert e.value.code == "SR_BACKEND_FAILURE_44"
    assert os.listdir(str(mnt / "sr")) == []


def test_probe_looks_at_every_subdirectory(SR, tmp_path):
    """A directory that is no SR: every sub-directory that holds an SR is found, however
    many there are (an SR left out of the probe would be invisible to the operator)."""
    for i in range(1100):
        os.mkdir(str(tmp_path / f"d{i:04d}"))
    SR.create(dbg=DBG, uuid=SR_UUID, configuration={"path": str(tmp_path / "d1099")},
              name="n", description="")
    found = [r for r in SR.probe(dbg=DBG, configuration={"path": str(tmp_path)})
             if r["complete"]]
    assert [r["configuration"]["path"] for r in found] == [str(tmp_path / "d1099")]


# --- 6. a lost sr.lock ----------------------------------------------------------------------------

def test_a_lost_sr_lock_is_made_again(SR, V, sr, sr_dir):
    os.unlink(os.path.join(sr_dir, "sr.lock"))
    config = {"path": sr_dir}
    assert SR.attach(dbg=DBG, configuration=config) == sr
    assert os.path.isfile(os.path.join(sr_dir, "sr.lock"))
    make(V, sr)
    os.unlink(os.path.join(sr_dir, "sr.lock"))
    # the SR.create retry (same uuid) repairs it too
    SR.create(dbg=DBG, uuid="5f0c1d8e-0000-4000-8000-000000000001", configuration=config,
              name="test SR", description="")
    assert os.path.isfile(os.path.join(sr_dir, "sr.lock"))
    assert len(SR.ls(dbg=DBG, sr=sr)) == 1


# --- 7. a read-only mount -------------------------------------------------------------------------

def test_a_read_only_sr_attaches_lists_and_refuses_writes(SR, V, tmpfs):
    mnt = tmpfs("size=512k")
    sr_dir = str(mnt / "sr")
    sr = new_sr(SR, sr_dir)
    v = make(V, sr)
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    assert SR.attach(dbg=DBG, configuration={"path": sr_dir}) == sr
    assert [x["key"] for x in SR.ls(dbg=DBG, sr=sr)] == [v["key"]]
    assert V.stat(dbg=DBG, sr=sr, key=v["key"])["name"] == "v"
    assert SR.stat(dbg=DBG, sr=sr)["health"][0] == "Unreachable"
    for call in (lambda: V.create(dbg=DBG, sr=sr, name="n", description="", size=512,
                                  sharable=False),
                 lambda: V.set_name(dbg=DBG, sr=sr, key=v["key"], new_name="x"),
                 lambda: V.destroy(dbg=DBG, sr=sr, key=v["key"]),
                 lambda: SR.set_name(dbg=DBG, sr=sr, new_name="x")):
        with pytest.raises(XenAPIError) as e:
            call()
        assert e.value.params[0] == "The SR is read-only", e.value.params
    r = run_child("Volume", "set_name", sr=sr, key=v["key"], new_name="x")
    assert r.returncode == 1 and "The SR is read-only" in r.stdout, r.stdout + r.stderr


# --- 8. hard links and world-writable directories -------------------------------------------------

def test_a_hard_linked_data_file_is_not_served(SR, V, sr, sr_dir, tmp_path):
    """A second name for the data file (maybe outside the SR, so someone else's file): the
    volume gets no URI, and calls that open its data refuse it."""
    v = make(V, sr)
    outside = os.path.join(sr_dir, "..", "outside.img")
    os.link(os.path.join(sr_dir, v["key"] + ".img"), outside)
    assert V.stat(dbg=DBG, sr=sr, key=v["key"])["uri"] == []
    assert SR.ls(dbg=DBG, sr=sr)[0]["uri"] == []
    with pytest.raises(XenAPIError) as e:
        V.resize(dbg=DBG, sr=sr, key=v["key"], new_size=4 << 20)
    assert e.value.params[0] == "Volume data is not a regular file"
    assert "hard-linked" in e.value.params[2]
    assert os.stat(outside).st_size == 1 << 20
    os.unlink(outside)
    assert V.stat(dbg=DBG, sr=sr, key=v["key"])["uri"]


def test_create_refuses_a_world_writable_directory(SR, tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(str(d), 0o1777)
    with pytest.raises(XenAPIError) as e:
        SR.create(dbg=DBG, uuid=SR_UUID, configuration={"path": str(d)}, name="n",
                  description="")
    assert e.value.params[:2] == ["Invalid device-config", "path"]
    assert "writable by every user" in e.value.params[2]
    assert os.listdir(str(d)) == []


# --- 15. no lock wait without end -----------------------------------------------------------------

HOLDER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold(path, seconds):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, path, str(seconds)],
                         stdout=subprocess.PIPE, universal_newlines=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_lock_held_by_a_stopped_process_fails_after_a_bound(V, sr, sr_dir):
    """A SIGSTOPped holder may never run again: the waiter answers an error naming it after
    store.STOPPED_WAIT seconds, not after the long bound meant for running holders."""
    from xapi_storage.volume import store
    v = make(V, sr)
    holder = _hold(os.path.join(sr_dir, v["key"] + ".lock"), 600)
    try:
        os.kill(holder.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        r = run_child("Volume", "set_name", sr=sr, key=v["key"], new_name="x")
        took = time.monotonic() - t0
        assert r.returncode == 1, r.stdout + r.stderr
        code, params = json.loads(r.stdout)["error"]
        assert params[0] == "Timed out waiting for a lock", params
        assert f"stopped process(es) {holder.pid}" in params[1]
        assert store.STOPPED_WAIT <= took < store.STOPPED_WAIT + 10
    finally:
        holder.kill()
        holder.wait()
    assert V.stat(dbg=DBG, sr=sr, key=v["key"])["name"] == "v"


def test_a_lock_held_by_a_running_process_is_waited_for_up_to_the_bound(V, sr, sr_dir):
    """A running holder (a long copy) is waited for: a holder that lets go within the bound
    lets the call succeed; one that does not gives an error at the bound
    ($XAPI_STORAGE_LOCK_WAIT)."""
    v = make(V, sr)
    lock = os.path.join(sr_dir, v["key"] + ".lock")
    holder = _hold(lock, 3)
    try:
        r = run_child("Volume", "set_name", env={"XAPI_STORAGE_LOCK_WAIT": "30"}, sr=sr,
                      key=v["key"], new_name="after")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        holder.kill()
        holder.wait()
    assert V.stat(dbg=DBG, sr=sr, key=v["key"])["name"] == "after"
    holder = _hold(lock, 600)
    try:
        t0 = time.monotonic()
        r = run_child("Volume", "set_name", env={"XAPI_STORAGE_LOCK_WAIT": "1.5"}, sr=sr,
                      key=v["key"], new_name="x")
        took = time.monotonic() - t0
        assert r.returncode == 1, r.stdout + r.stderr
        params = json.loads(r.stdout)["error"][1]
        assert params[0] == "Timed out waiting for a lock"
        assert f"{holder.pid} (state S)" in params[1], params
        assert 1.5 <= took < 10
    finally:
        holder.kill()
        holder.wait()


def test_proc_locks_parsing():
    from xapi_storage.volume.store import parse_proc_locks
    dev = os.makedev(0x08, 0x01)
    text = ("1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF\n"
            "1: -> FLOCK  ADVISORY  WRITE 99 08:01:5678 0 EOF\n"
            "2: FLOCK  ADVISORY  READ 42 08:01:5679 0 EOF\n"
            "3: POSIX  ADVISORY  READ 7 08:01:5678 0 EOF\n")
    assert parse_proc_locks(text, dev, 5678) == {1234, 7}
    assert parse_proc_locks(text, dev, 1) == set()
