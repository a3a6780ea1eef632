"""xapi_storage.compat: on every interpreter, the name the package uses is the standard call
where the Python has it, and the fallback (what Python 3.6 gets) behaves the same - so the
fallback is tested on the new Pythons too, not only where it is used."""

import asyncio
import errno
import os
import random
import select
import sys
import time

import pytest

from xapi_storage import compat


def test_new_pythons_keep_the_standard_calls():
    """No wrapper where the standard call exists (no slower path)."""
    pairs = [(os, "preadv", compat.preadv), (os, "pwritev", compat.pwritev),
             (os, "eventfd", compat.eventfd), (os, "eventfd_read", compat.eventfd_read),
             (os, "eventfd_write", compat.eventfd_write),
             (os, "copy_file_range", compat.copy_file_range),
             (time, "monotonic_ns", compat.monotonic_ns)]
    for mod, name, ours in pairs:
        if hasattr(mod, name):
            assert ours is getattr(mod, name), name
        else:
            assert ours.__name__.startswith(("_libc_", "_fallback_")), name
    if sys.version_info >= (3, 10):
        assert (compat.EFD_CLOEXEC, compat.EFD_NONBLOCK) == (os.EFD_CLOEXEC, os.EFD_NONBLOCK)
    assert compat.EFD_CLOEXEC == os.O_CLOEXEC and compat.EFD_NONBLOCK == os.O_NONBLOCK


@pytest.mark.parametrize("which", ["used", "fallback"])
def test_preadv_pwritev(tmp_path, which):
    preadv, pwritev = ((compat.preadv, compat.pwritev) if which == "used"
                       else (compat._libc_preadv, compat._libc_pwritev))
    fd = os.open(str(tmp_path / "f"), os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(fd, b"." * 64, 0)
        # bytes (read-only), bytearray and a memoryview slice, at an offset
        assert pwritev(fd, [b"abc", bytearray(b"de"), memoryview(b"xfghx")[1:4]], 10) == 8
        assert os.pread(fd, 64, 0) == b"." * 10 + b"abcdefgh" + b"." * 46
        bufs = [bytearray(3), memoryview(bytearray(5))]
        assert preadv(fd, bufs, 10) == 8
        assert bytes(bufs[0]) + bytes(bufs[1]) == b"abcdefgh"
        tail = [bytearray(16)]
        assert preadv(fd, tail, 60) == 4                  # short at end of file
        assert bytes(tail[0][:4]) == b"...."
        with pytest.raises(OSError) as e:                 # the errno reaches the caller
            preadv(-1, [bytearray(1)], 0)
        assert e.value.errno == errno.EBADF
        with pytest.raises(BufferError):                  # never into immutable memory
            preadv(fd, [b"read-only"], 0)
        with pytest.raises(BufferError):
            preadv(fd, [memoryview(bytearray(4)).toreadonly()
                        if hasattr(memoryview, "toreadonly") else b"ro"], 0)
    finally:
        os.close(fd)


@pytest.mark.parametrize("which", ["used", "fallback"])
def test_eventfd(which):
    ev = ((compat.eventfd, compat.eventfd_read, compat.eventfd_write) if which == "used" else
          (compat._libc_eventfd, compat._libc_eventfd_read, compat._libc_eventfd_write))
    make, read, write = ev
    fd = make(0, compat.EFD_NONBLOCK | compat.EFD_CLOEXEC)
    try:
        assert not os.get_inheritable(fd)
        with pytest.raises(BlockingIOError):
            read(fd)
        assert select.select([fd], [], [], 0)[0] == []
        write(fd, 1)
        write(fd, 41)
        assert select.select([fd], [], [], 0)[0] == [fd]
        assert read(fd) == 42                               # the counter, then reset
        with pytest.raises(BlockingIOError):
            read(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("which", ["used", "fallback"])
def test_copy_file_range(tmp_path, which):
    cfr = compat.copy_file_range if which == "used" else compat._libc_copy_file_range
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    with open(src, "wb") as f:
        f.write(bytes(range(256)) * 16)
    a = os.open(src, os.O_RDONLY)
    b = os.open(dst, os.O_RDWR | os.O_CREAT)
    try:
        try:
            n = cfr(a, b, 1000, 100, 50)
        except OSError as e:                      # some filesystems cannot: datacopy falls back
            assert e.errno in (errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP)
            pytest.skip(f"copy_file_range not supported here: {e}")
        assert n == 1000
        assert os.pread(b, 1000, 50) == (bytes(range(256)) * 16)[100:1100]
        assert os.lseek(a, 0, os.SEEK_CUR) == 0                   # offsets given: fds not moved
        with pytest.raises(OSError) as e:
            cfr(-1, b, 10, 0, 0)
        assert e.value.errno == errno.EBADF
    finally:
        os.close(a)
        os.close(b)


def test_monotonic_ns():
    a = compat._fallback_monotonic_ns()
    b = compat.monotonic_ns()
    assert isinstance(a, int) and isinstance(b, int)
    assert abs(b - a) < 10**9
    assert compat._fallback_monotonic_ns() >= a


@pytest.mark.parametrize("which", ["used", "fallback"])
def test_randbytes_are_the_seeded_ones(which):
    f = compat.randbytes if which == "used" else compat._fallback_randbytes
    out = f(random.Random(7), 33)
    assert isinstance(out, bytes) and len(out) == 33
    assert out == f(random.Random(7), 33) != f(random.Random(8), 33)
    assert f(random.Random(7), 0) == b""
    if hasattr(random.Random, "randbytes"):          # the same bytes as the standard call
        assert out == random.Random(7).randbytes(33)


@pytest.mark.parametrize("which", ["used", "fallback"])
def test_readonly_view(which):
    f = compat.readonly_view if which == "used" else compat._fallback_readonly_view
    buf = bytearray(b"0123456789")
    mv = memoryview(buf)
    ro = f(mv)
    assert ro.readonly and not mv.readonly
    with pytest.raises(TypeError):
        ro[0] = 1
    with pytest.raises(TypeError):
        ro[2:4][0] = 1                                  # slices stay read-only
    buf[0:1] = b"X"
    assert bytes(ro[:2]) == b"X1"                       # the same memory, not a copy
    ro.release()
    mv.release()


@pytest.mark.parametrize("which", ["used", "fallback"])
def test_asyncio_run(which):
    run = compat.asyncio_run if which == "used" else compat._fallback_asyncio_run
    seen = []

    async def forever():
        try:
            await asyncio.sleep(3600)
        finally:
            seen.append("cancelled")

    async def main():
        loop = compat.get_running_loop()
        loop.create_task(forever())
        await asyncio.sleep(0)
        return loop

    loop = run(main())
    assert seen == ["cancelled"]              # tasks left behind are cancelled, not leaked
    assert loop.is_closed()


@pytest.mark.parametrize("which", ["used", "fallback"])
def test_entry_points(which):
    if which == "fallback":
        try:
            import importlib_metadata  # noqa: F401
        except ImportError:
            pytest.skip("the importlib_metadata backport (the 3.6/3.7 path) is not installed "
                        "on this Python; it is on 3.6")
        eps = compat._fallback_entry_points("console_scripts")
    else:
        eps = compat.entry_points("console_scripts")
    assert "xapi-storage" in {ep.name for ep in eps}
