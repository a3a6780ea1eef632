"""Raw mmap for grant mappings: several file ranges into ONE contiguous region, and an
unmap that can never crash the process through a stale view.

Python's mmap module cannot place a mapping at a fixed address, so this goes through libc
with ctypes. A `Region` reserves `size` bytes of address space, maps file ranges into it
with MAP_FIXED, and exposes it as a memoryview (read-only if mapped so). `release()` drops
the file pages at once (the grant is no longer mapped) by putting private anonymous
memory over the region; the address range itself is returned to the system only when
the last Python view of it is gone, so a view used after release() reads zeros instead of
crashing the process.
"""

import ctypes
import ctypes.util
import mmap as _mmap
import os
import sys
import weakref

from ..compat import readonly_view

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_mmap_fn = _libc.mmap
_mmap_fn.restype = ctypes.c_void_p
_mmap_fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                     ctypes.c_int, ctypes.c_long)
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)

PROT_NONE = 0
PROT_READ = _mmap.PROT_READ
PROT_WRITE = _mmap.PROT_WRITE
MAP_SHARED = _mmap.MAP_SHARED
MAP_PRIVATE = _mmap.MAP_PRIVATE
MAP_ANONYMOUS = _mmap.MAP_ANONYMOUS
MAP_FIXED = 0x10
MAP_NORESERVE = 0x4000
MAP_FAILED = ctypes.c_void_p(-1).value


def _check(addr, what):
    if addr is None or addr == MAP_FAILED:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return addr


def mmap_raw(addr, size, prot, flags, fd=-1, offset=0):
    return _check(_mmap_fn(addr, size, prot, flags, fd, offset), "mmap")


def _finalize(addr, size):
    _munmap(addr, size)


class Region:
    """`size` bytes of address space built from file ranges; see the module docstring."""

    __slots__ = ("addr", "size", "writable", "buffer", "_arr", "_fin", "__weakref__")

    def __init__(self, size, writable, runs=None, fd=-1):
        """runs: [(fd, file_offset, length), ...] laid out back to back from offset 0."""
        self.size, self.writable = size, writable
        prot = PROT_READ | (PROT_WRITE if writable else 0)
        if runs and len(runs) == 1:
            rfd, off, length = runs[0]
            self.addr = mmap_raw(None, size, prot, MAP_SHARED, rfd, off)
        else:
            self.addr = mmap_raw(None, size, PROT_NONE,
                                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)
            try:
                pos = 0
                for rfd, off, length in runs or ():
                    mmap_raw(self.addr + pos, length, prot, MAP_SHARED | MAP_FIXED, rfd, off)
                    pos += length
            except OSError:
                _munmap(self.addr, size)
                raise
        arr = (ctypes.c_char * size).from_address(self.addr)
        self._fin = weakref.finalize(arr, _finalize, self.addr, size)
        self._arr = arr
        self.buffer = None
        self.attach()

    def attach(self):
        """Make `buffer` a fresh view of the (still mapped) region."""
        mv = memoryview(self._arr).cast("B")
        self.buffer = mv if self.writable else readonly_view(mv)

    def detach(self):
        """Give up `buffer`. True if no view of the region is left anywhere: the region may
        then be attached again or closed. False if someone still holds a view: the file
        pages are dropped at once (the views read zeros from now on) and the address range
        is freed when the last view goes."""
        try:
            self.buffer.release()
            exported = False
        except BufferError:
            exported = True
        self.buffer = None
        # no view left <=> only self._arr and getrefcount's argument refer to the array
        if not exported and sys.getrefcount(self._arr) == 2:
            return True
        mmap_raw(self.addr, self.size, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE)
        self._arr = None
        return False

    def close(self):
        """Unmap a detached region that has no views left."""
        if self._arr is not None:
            self._arr = None
            self._fin.detach()
            _munmap(self.addr, self.size)

    def release(self):
        """Drop the file pages now (detach, then close if nothing holds a view)."""
        if self._arr is None:
            return
        if self.detach():
            self.close()
