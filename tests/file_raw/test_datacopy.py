"""Snapshot/clone data copies: reflink where the filesystem can, else a sparse copy.

The machine's /tmp is ext4 (no FICLONE), so the copy path runs there for real. The reflink path
runs on a small XFS (reflink=1) filesystem made on a loop device when mkfs.xfs is installed and
we are root (scripts/setup.sh does not install it; the tests skip otherwise and say so).
"""

import fcntl
import json
import os
import shutil
import subprocess

import pytest

from xapi_storage.volume import datacopy, file_raw

from .conftest import DBG


def can_reflink(directory):
    a, b = os.path.join(directory, ".probe-a"), os.path.join(directory, ".probe-b")
    fa = os.open(a, os.O_RDWR | os.O_CREAT, 0o600)
    fb = os.open(b, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fa, b"x" * 4096)
        fcntl.ioctl(fb, datacopy.FICLONE, fa)
        return True
    except OSError:
        return False
    finally:
        os.close(fa)
        os.close(fb)
        os.unlink(a)
        os.unlink(b)


def sparse_file(path, size, extents):
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in extents:
            f.seek(off)
            f.write(data)


def extents(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(datacopy.data_extents(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def copy(src, dst):
    s = os.open(src, os.O_RDONLY)
    d = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        return datacopy.clone_or_copy(s, d)
    finally:
        os.close(s)
        os.close(d)


@pytest.fixture(scope="module")
def xfs_dir(tmp_path_factory):
    if os.geteuid() != 0 or not shutil.which("mkfs.xfs"):
        pytest.skip("reflink path not tested: needs root and mkfs.xfs (apt-get install xfsprogs)")
    base = tmp_path_factory.mktemp("xfs")
    image, mnt = base / "fs.img", base / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(320 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    r = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True)
    if r.returncode:
        pytest.skip(f"reflink path not tested: cannot loop-mount XFS: {r.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_data_extents_skip_holes(tmp_path):
    p = str(tmp_path / "f")
    sparse_file(p, 10 << 20, [(1 << 20, b"a" * 4096), (8 << 20, b"b" * 8192)])
    assert extents(p) == [(1 << 20, 4096), (8 << 20, 8192)]
    sparse_file(p, 1 << 20, [])
    assert extents(p) == []


def test_copy_is_sparse_and_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("XAPI_STORAGE_NO_REFLINK", "1")
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    sparse_file(src, 10 << 30, [(0, b"head"), (5 << 30, os.urandom(1 << 20)),
                                ((10 << 30) - 4096, b"tail")])
    assert copy(src, dst) == "copy"
    assert os.stat(dst).st_size == 10 << 30
    assert extents(dst) == extents(src)
    assert os.stat(dst).st_blocks * 512 < 4 << 20
    with open(src, "rb") as a, open(dst, "rb") as b:
        for off in (0, 5 << 30, (10 << 30) - 4096, 7 << 30):
            a.seek(off)
            b.seek(off)
            assert a.read(1 << 20) == b.read(1 << 20)


def test_copy_empty_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XAPI_STORAGE_NO_REFLINK", "1")
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    sparse_file(src, 0, [])
    assert copy(src, dst) == "copy"
    assert os.stat(dst).st_size == 0


def test_method_on_this_machines_tmp(tmp_path):
    """Whatever /tmp is, clone_or_copy uses a reflink exactly when the filesystem has them."""
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    sparse_file(src, 1 << 20, [(4096, b"x" * 4096)])
    expected = "reflink" if can_reflink(str(tmp_path)) else "copy"
    assert copy(src, dst) == expected
    with open(src, "rb") as a, open(dst, "rb") as b:
        assert a.read() == b.read()


def test_reflink_on_xfs(xfs_dir):
    src, dst = os.path.join(xfs_dir, "src"), os.path.join(xfs_dir, "dst")
    sparse_file(src, 64 << 20, [(1 << 20, b"r" * 65536)])
    assert copy(src, dst) == "reflink"
    with open(dst, "r+b") as f:                 # copy-on-write: the source does not change
        f.seek(1 << 20)
        f.write(b"w")
    with open(src, "rb") as f:
        f.seek(1 << 20)
        assert f.read(1) == b"r"
    for p in (src, dst):
        os.unlink(p)


@pytest.mark.parametrize("no_reflink, method", [("", "reflink"), ("1", "copy")])
def test_plugin_snapshot_on_xfs(xfs_dir, monkeypatch, no_reflink, method):
    monkeypatch.setenv("XAPI_STORAGE_NO_REFLINK", no_reflink)
    SR, V = file_raw.SR(), file_raw.Volume()
    path = os.path.join(xfs_dir, f"sr{no_reflink}")
    config = SR.create(dbg=DBG, uuid="u", configuration={"path": path}, name="", description="")
    sr = SR.attach(dbg=DBG, configuration=config)
    v = V.create(dbg=DBG, sr=sr, name="n", description="", size=16 << 20, sharable=False)
    with open(os.path.join(path, v["key"] + ".img"), "r+b") as f:
        f.write(b"data")
    for op in (V.snapshot, V.clone):
        new = op(dbg=DBG, sr=sr, key=v["key"])
        with open(os.path.join(path, new["key"] + ".json")) as f:
            assert json.load(f)["copied_by"] == method
        with open(os.path.join(path, new["key"] + ".img"), "rb") as f:
            assert f.read(4) == b"data"
    SR.destroy(dbg=DBG, sr=sr)


def test_copy_without_copy_file_range(tmp_path, monkeypatch):
    """Kernels or filesystem pairs without copy_file_range: the read/write fallback."""
    import errno

    def unsupported(*args):
        raise OSError(errno.ENOSYS, "copy_file_range unsupported")
    monkeypatch.setattr(datacopy, "copy_file_range", unsupported)
    monkeypatch.setenv("XAPI_STORAGE_NO_REFLINK", "1")
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    sparse_file(src, 8 << 20, [(4096, os.urandom(3 << 20)), (7 << 20, b"end")])
    assert copy(src, dst) == "copy"
    assert extents(dst) == extents(src)
    with open(src, "rb") as a, open(dst, "rb") as b:
        assert a.read() == b.read()


def test_copy_when_copy_file_range_wrongly_says_end_of_file(tmp_path, monkeypatch):
    """Some kernel/filesystem pairs answer copy_file_range with 0 (end of file) although the
    source has data there (e.g. FUSE, or the 5.3-5.18 cross-filesystem fallback on special
    files). Trusting that 0 silently truncates the copy: a snapshot missing data. The copy
    checks with a read before it believes the source ended."""
    monkeypatch.setattr(datacopy, "copy_file_range", lambda *args: 0)
    monkeypatch.setenv("XAPI_STORAGE_NO_REFLINK", "1")
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    sparse_file(src, 8 << 20, [(4096, os.urandom(3 << 20)), (7 << 20, b"end")])
    assert copy(src, dst) == "copy"
    with open(src, "rb") as a, open(dst, "rb") as b:
        assert a.read() == b.read()
