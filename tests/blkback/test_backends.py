"""Storage backends against a model (bytearray), each on real files (and a loop device)."""

import hashlib
import os
import shutil
import subprocess

import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from xapi_storage import compat
from xapi_storage.blkback.backends import StorageError, open_storage

SIZE = 1 << 20
ops = st.lists(st.tuples(st.sampled_from(["read", "write", "discard", "flush"]),
                         st.integers(0, SIZE // 512 - 1), st.integers(1, 64)), max_size=30)


def _iovs(data, pieces):
    """Split `data` into memoryviews like guest segments would be."""
    mv = memoryview(data)
    out, pos = [], 0
    for p in pieces:
        out.append(mv[pos:pos + p])
        pos += p
    out.append(mv[pos:])
    return [b for b in out if len(b)]


def _run(store, model, script, seed):
    import random
    rnd = random.Random(seed)
    for op, sec, n in script:
        n = min(n, SIZE // 512 - sec)
        off, length = sec * 512, n * 512
        cut = sorted(rnd.randrange(0, length + 1, 512) for _ in range(3))
        pieces = [b - a for a, b in zip([0] + cut, cut)]
        if op == "write":
            data = bytearray(compat.randbytes(rnd, length))
            store.writev(off, _iovs(data, pieces))
            model[off:off + length] = data
        elif op == "read":
            buf = bytearray(length)
            store.readv(off, _iovs(buf, pieces), length)
            assert buf == model[off:off + length], f"read {off}+{length}"
        elif op == "discard":
            store.discard(off, length)
            model[off:off + length] = bytes(length)
        else:
            store.flush()
    buf = bytearray(SIZE)
    store.readv(0, [memoryview(buf)])
    assert buf == model


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.write(os.urandom(SIZE))
    return p


NOFIX = [HealthCheck.function_scoped_fixture]


@settings(max_examples=40, deadline=None, suppress_health_check=NOFIX)
@given(script=ops, seed=st.integers())
def test_raw_matches_model(image, script, seed):
    model = bytearray(image.read_bytes())
    with open_storage("raw", str(image)) as s:
        assert s.size() == SIZE
        _run(s, model, script, seed)
    assert image.read_bytes() == model


@settings(max_examples=40, deadline=None, suppress_health_check=NOFIX)
@given(script=ops, seed=st.integers())
def test_raw_mmap_reads_match_model(image, script, seed):
    model = bytearray(image.read_bytes())
    with open_storage("raw", str(image), read_mode="mmap") as s:
        s.MMAP_MIN = 512                       # every read through the mapping
        _run(s, model, script, seed)
    assert image.read_bytes() == model


@settings(max_examples=40, deadline=None, suppress_health_check=NOFIX)
@given(script=ops, seed=st.integers())
def test_cow_matches_model_and_never_touches_the_gold_image(image, tmp_path, script, seed):
    gold = hashlib.sha256(image.read_bytes()).hexdigest()
    model = bytearray(image.read_bytes())
    before = sorted(os.listdir(tmp_path))
    s = open_storage("cow", str(image), overlay_dir=str(tmp_path))
    _run(s, model, script, seed)
    overlay = s.overlay
    s.close()
    assert hashlib.sha256(image.read_bytes()).hexdigest() == gold
    assert sorted(os.listdir(tmp_path)) == before          # the overlay never had a name
    with pytest.raises(OSError):
        os.fstat(overlay)                                   # and it is closed: gone


@settings(max_examples=25, deadline=None, suppress_health_check=NOFIX)
@given(script=ops, more=ops, seed=st.integers())
def test_a_named_cow_overlay_taken_over_goes_on_where_it_stopped(image, tmp_path, script, more,
                                                                 seed):
    """The volume server's overlay: closed (or its process killed) and opened again with
    resume, it reads as before and goes on; close_for_good() removes it; the gold is never
    written."""
    gold = image.read_bytes()
    model = bytearray(gold)
    path = str(tmp_path / ".overlay")
    s = open_storage("cow", str(image), overlay_path=path)
    _run(s, model, script, seed)
    s.close()
    s = open_storage("cow", str(image), overlay_path=path, resume=True)
    assert s.resumed
    buf = bytearray(SIZE)
    s.readv(0, [memoryview(buf)])
    assert buf == model
    _run(s, model, more, seed + 1)
    s.close_for_good()
    assert not os.path.exists(path)
    assert image.read_bytes() == gold


def test_a_named_cow_overlay_not_taken_over_starts_empty(image, tmp_path):
    path = str(tmp_path / ".overlay")
    s = open_storage("cow", str(image), overlay_path=path)
    s.writev(0, [b"x" * 4096])
    s.close()
    for resume in (False, True):
        if resume:                                   # not this image's: another size
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) + 4096)
        s = open_storage("cow", str(image), overlay_path=path, resume=resume)
        assert not s.resumed and s.overlay_blocks() == 0
        buf = bytearray(4096)
        s.readv(0, [memoryview(buf)])
        assert bytes(buf) == image.read_bytes()[:4096]
        s.writev(0, [b"x" * 4096])
        s.close()


def test_cow_overlay_is_sparse_not_ram(image, tmp_path):
    s = open_storage("cow", str(image), overlay_dir=str(tmp_path))
    s.writev(4096 * 10 + 512, [memoryview(b"x" * 512)])
    assert s.overlay_blocks() == 1
    st_ = os.fstat(s.overlay)
    assert st_.st_size == SIZE and st_.st_blocks * 512 <= 64 * 1024
    s.close()


def test_readonly_raw_refuses_writes(image):
    with open_storage("raw", str(image), readonly=True) as s:
        with pytest.raises(StorageError):
            s.writev(0, [memoryview(b"x" * 512)])
        with pytest.raises(StorageError):
            s.discard(0, 512)


def test_raw_discard_punches_a_hole(image):
    with open_storage("raw", str(image)) as s:
        blocks = os.stat(image).st_blocks
        s.discard(0, SIZE // 2)
        assert os.stat(image).st_blocks < blocks
        buf = bytearray(512)
        s.readv(4096, [memoryview(buf)])
        assert buf == bytes(512)


def test_io_outside_the_disk_is_refused(image):
    with open_storage("raw", str(image)) as s:
        with pytest.raises(StorageError, match="outside"):
            s.discard(SIZE - 512, 1024)
    with open_storage("cow", str(image)) as s:
        with pytest.raises(StorageError, match="outside"):
            s.writev(SIZE, [memoryview(b"x" * 512)])


def test_null_does_nothing():
    s = open_storage("null", size=SIZE)
    buf = bytearray(b"q" * 512)
    s.readv(0, [memoryview(buf)])
    assert buf == b"q" * 512 and s.size() == SIZE
    s.writev(0, [memoryview(buf)])
    s.flush()
    s.discard(0, 512)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'qcow'"):
        open_storage("qcow", "x")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("losetup"), reason="needs root + losetup")
def test_block_device_on_a_loop_device(image):
    try:
        dev = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 universal_newlines=True).stdout.strip()
    except subprocess.CalledProcessError as e:
        pytest.skip(f"no loop device: {e.stderr}")
    try:
        model = bytearray(image.read_bytes())
        with open_storage("block", dev) as s:
            assert s.size() == SIZE
            _run(s, model, [("write", 3, 9), ("read", 0, 64), ("flush", 0, 1),
                            ("discard", 8, 8), ("read", 0, 64)], 1)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def _short(real, limit):
    """preadv/pwritev that move at most `limit` bytes per call, as the kernel may."""
    def call(fd, iovs, offset):
        out, left = [], limit
        for b in iovs:
            if left <= 0:
                break
            b = memoryview(b)[:left]
            out.append(b)
            left -= len(b)
        return real(fd, out, offset)
    return call


@pytest.mark.parametrize("limit", [1, 511, 4096, 5000])
def test_short_transfers_are_completed(tmp_path, monkeypatch, limit):
    from xapi_storage.blkback import backends
    from xapi_storage.blkback.backends import StorageError, full_preadv, full_pwritev
    path = tmp_path / "f"
    data = bytes(range(256)) * 48                       # 12 KiB
    path.write_bytes(bytes(len(data) + 4096))
    fd = os.open(path, os.O_RDWR)
    try:
        monkeypatch.setattr(backends, "pwritev", _short(compat.pwritev, limit))
        monkeypatch.setattr(backends, "preadv", _short(compat.preadv, limit))
        full_pwritev(fd, [data[:1000], data[1000:9000], data[9000:]], 512)
        bufs = [bytearray(3000), bytearray(7000), bytearray(len(data) - 10000)]
        full_preadv(fd, bufs, 512)
        assert b"".join(bufs) == data
        with pytest.raises(StorageError, match="end of file"):   # reading past the end
            full_preadv(fd, [bytearray(8192)], len(data))
    finally:
        os.close(fd)
    assert path.read_bytes()[512:512 + len(data)] == data
