"""The one place for calls that newer Pythons have and Python 3.6 lacks.

The toolstack's daemon runs our plugins on the host's own python3: 3.6 on XenServer 8 and
XCP-ng 8.3, 3.11 on Debian, 3.12 on the next XCP-ng. Code elsewhere in the package uses the
names below instead of the newer standard ones; on a Python that has the standard call, the
name IS that call (no wrapper, no slower path), and only an older Python gets the fallback.

    preadv(fd, buffers, offset) / pwritev(fd, buffers, offset)
                        os.preadv/os.pwritev (3.7); else preadv64(2)/pwritev64(2) from libc
                        through cffi's ABI mode (cffi is a dependency anyway; the call
                        releases the GIL like os.preadv does)
    eventfd(initval, flags), eventfd_read(fd), eventfd_write(fd, value),
    EFD_CLOEXEC, EFD_NONBLOCK, EFD_SEMAPHORE
                        os.eventfd* (3.10); else eventfd(2) from libc and 8-byte read/write,
                        which is exactly what os.eventfd_read/write do
    copy_file_range(src, dst, count, offset_src, offset_dst)
                        os.copy_file_range (3.8); else copy_file_range(2) from libc (glibc
                        2.27); OSError(ENOSYS) where libc lacks it
    monotonic_ns()      time.monotonic_ns (3.7); else int(time.monotonic() * 1e9)
    entry_points(group) the entry points of one group: importlib.metadata (3.8; `select` from
                        3.10, a dict before), else the importlib_metadata backport
    asyncio_run(coro), get_running_loop()
                        asyncio.run / asyncio.get_running_loop (3.7), looked up on call (asyncio
                        is imported only by what uses it); else a fresh loop run to completion,
                        and get_event_loop (which, inside a coroutine, is the running loop)
    randbytes(rng, n)   rng.randbytes(n) (3.9); else rng.getrandbits(8 * n) as bytes, which
                        is what randbytes does (the same bytes for the same seed)
    readonly_view(mv)   mv.toreadonly() (3.8): a read-only view of the writable memoryview mv,
                        sharing its buffer; else the same done by hand: a new view of mv's
                        buffer with its `readonly` flag set (CPython's memoryobject.h layout,
                        checked against the view before the one write)

`vermin -t=3.6-` (a checker of the minimum Python version) passes the package: the newer names
here carry `# novermin`, as they are only reached on a Python that has them.

The fallbacks are also importable as `_libc_preadv`, `_libc_eventfd`, ... so the tests run
them on every interpreter, not only on the one that needs them.
"""

import errno
import os
import struct
import sys
import time

# --- libc through cffi's ABI mode (loaded on first use, never on a Python that has it all) ----

_LIBC_CDEF = """
    struct iovec { void *iov_base; size_t iov_len; };
    ssize_t preadv64(int fd, const struct iovec *iov, int iovcnt, int64_t offset);
    ssize_t pwritev64(int fd, const struct iovec *iov, int iovcnt, int64_t offset);
    int eventfd(unsigned int initval, int flags);
    ssize_t copy_file_range(int fd_in, int64_t *off_in, int fd_out, int64_t *off_out,
                            size_t len, unsigned int flags);
"""
_libc = None


def _lib():
    global _libc
    if _libc is None:
        import cffi
        ffi = cffi.FFI()
        ffi.cdef(_LIBC_CDEF)
        _libc = (ffi, ffi.dlopen(None))
    return _libc


def _raise_errno(ffi):
    e = ffi.errno
    raise OSError(e, os.strerror(e))


def _libc_vectored(name, fd, buffers, offset, writable):
    ffi, lib = _lib()
    buffers = list(buffers)
    iov = ffi.new("struct iovec[]", len(buffers))
    keep = []
    for i, b in enumerate(buffers):
        # a read into bytes or a read-only view: BufferError, as os.preadv says
        cd = ffi.from_buffer(b, require_writable=writable)
        keep.append(cd)
        iov[i].iov_base = cd
        iov[i].iov_len = len(cd)
    fn = getattr(lib, name)
    while True:
        n = fn(fd, iov, len(buffers), offset)
        if n >= 0:
            return n
        if ffi.errno != errno.EINTR:      # retried like the os module does (PEP 475)
            _raise_errno(ffi)


def _libc_preadv(fd, buffers, offset):
    """os.preadv without the `flags` argument: fill `buffers` (writable) from `offset`."""
    return _libc_vectored("preadv64", fd, buffers, offset, True)


def _libc_pwritev(fd, buffers, offset):
    """os.pwritev without the `flags` argument: write `buffers` at `offset`."""
    return _libc_vectored("pwritev64", fd, buffers, offset, False)


def _libc_eventfd(initval, flags=0):
    ffi, lib = _lib()
    fd = lib.eventfd(initval, flags)
    if fd < 0:
        _raise_errno(ffi)
    return fd


def _libc_eventfd_read(fd):
    return struct.unpack("=Q", os.read(fd, 8))[0]


def _libc_eventfd_write(fd, value):
    os.write(fd, struct.pack("=Q", value))


def _libc_copy_file_range(src, dst, count, offset_src=None, offset_dst=None):
    ffi, lib = _lib()
    try:
        fn = lib.copy_file_range
    except AttributeError:                  # glibc before 2.27
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    offs = [ffi.NULL if o is None else ffi.new("int64_t *", o) for o in (offset_src, offset_dst)]
    while True:
        n = fn(src, offs[0], dst, offs[1], count, 0)
        if n >= 0:
            return n
        if ffi.errno != errno.EINTR:
            _raise_errno(ffi)


def _fallback_monotonic_ns():
    return int(time.monotonic() * 1e9)


def _fallback_entry_points(group):
    import importlib_metadata
    return list(importlib_metadata.entry_points().select(group=group))


def _stdlib_entry_points(group):
    import importlib.metadata as md  # novermin
    eps = md.entry_points()
    return list(eps.select(group=group) if hasattr(eps, "select") else eps.get(group, []))


def _fallback_asyncio_run(coro):
    import asyncio
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        try:
            all_tasks = getattr(asyncio, "all_tasks", None) or asyncio.Task.all_tasks
            pending = [t for t in all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


_memoryview_struct = None


def _memoryview_layout():
    """ctypes mirrors of CPython's PyMemoryViewObject and Py_buffer, up to the fields we touch
    (Include/memoryobject.h and Include/pybuffer.h, cpython/ from 3.11: the same since 3.3).
    Built on first use: ctypes costs every plugin call time to import."""
    global _memoryview_struct
    if _memoryview_struct is None:
        import ctypes

        class PyBuffer(ctypes.Structure):
            _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p),
                        ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                        ("readonly", ctypes.c_int)]

        class PyMemoryView(ctypes.Structure):
            _fields_ = [("ob_refcnt", ctypes.c_ssize_t), ("ob_type", ctypes.c_void_p),
                        ("ob_size", ctypes.c_ssize_t), ("mbuf", ctypes.c_void_p),
                        ("hash", ctypes.c_ssize_t), ("flags", ctypes.c_int),
                        ("exports", ctypes.c_ssize_t), ("view", PyBuffer)]
        _memoryview_struct = (ctypes, PyMemoryView)
    return _memoryview_struct


def _fallback_readonly_view(mv):
    ctypes, PyMemoryView = _memoryview_layout()
    if mv.readonly:
        return memoryview(mv)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mv)) if mv.nbytes else None
    ro = memoryview(mv)         # a new view registered with the same managed buffer
    s = PyMemoryView.from_address(id(ro))
    if s.view.buf != addr or s.view.len != ro.nbytes or s.view.readonly != 0:
        raise RuntimeError("this Python's memoryview layout is not CPython's: cannot make a "
                           "read-only view")
    s.view.readonly = 1
    if not ro.readonly:
        raise RuntimeError("could not make a read-only view")
    return ro


def _fallback_randbytes(rng, n):
    return rng.getrandbits(8 * n).to_bytes(n, "little") if n else b""


# --- the names the package uses ----------------------------------------------------------------

preadv = getattr(os, "preadv", _libc_preadv)
pwritev = getattr(os, "pwritev", _libc_pwritev)

if hasattr(os, "eventfd"):
    eventfd, eventfd_read, eventfd_write = os.eventfd, os.eventfd_read, os.eventfd_write  # novermin
    EFD_CLOEXEC, EFD_NONBLOCK, EFD_SEMAPHORE = os.EFD_CLOEXEC, os.EFD_NONBLOCK, os.EFD_SEMAPHORE  # novermin
else:
    eventfd, eventfd_read, eventfd_write = _libc_eventfd, _libc_eventfd_read, _libc_eventfd_write
    # linux/eventfd.h: the same values as O_CLOEXEC and O_NONBLOCK
    EFD_CLOEXEC, EFD_NONBLOCK, EFD_SEMAPHORE = os.O_CLOEXEC, os.O_NONBLOCK, 1

copy_file_range = getattr(os, "copy_file_range", _libc_copy_file_range)
monotonic_ns = getattr(time, "monotonic_ns", _fallback_monotonic_ns)
entry_points = _stdlib_entry_points if sys.version_info >= (3, 8) else _fallback_entry_points


# asyncio costs a plugin call ~10 ms to import: only the simulated Xen needs it, so look late
def asyncio_run(coro):
    import asyncio
    return getattr(asyncio, "run", _fallback_asyncio_run)(coro)


def get_running_loop():
    import asyncio
    return getattr(asyncio, "get_running_loop", asyncio.get_event_loop)()


def readonly_view(mv):
    """A read-only memoryview of the same memory as the memoryview `mv`."""
    if hasattr(mv, "toreadonly"):
        return mv.toreadonly()
    return _fallback_readonly_view(mv)


def randbytes(rng, n):
    """n random bytes from the random.Random `rng` (reproducible for a seeded one)."""
    if hasattr(rng, "randbytes"):
        return rng.randbytes(n)
    return _fallback_randbytes(rng, n)
