"""A raw image in a regular file: preadv/pwritev straight between the file and the mapped
guest pages (no bounce buffer); flush = fdatasync; discard = punch a hole.

read_mode="mmap" (opt-in) serves reads of 64 KiB and more by copying from a shared read-only
mapping of the file instead (one memcpy per contiguous piece; the kernel's preadv copies page
by page and is about half as fast on page-cache-resident data). The risk: if someone else
truncates the file below what we mapped, a read of the lost part raises SIGBUS and kills the
process. Use it only for images nobody but us resizes. Writes always use pwritev.
"""

import ctypes
import ctypes.util
import errno
import mmap
import os

from . import Storage, StorageError, full_preadv, full_pwritev, open_checked

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def punch_hole(fd, offset, length):
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise StorageError(e, f"punching a hole at {offset}+{length}: {os.strerror(e)}")


class RawFile(Storage):
    kind = "raw"
    parallel_io = True              # positional I/O: safe from several threads
    can_discard = True
    discard_zeroes = True

    MMAP_MIN = 64 * 1024

    def __init__(self, path, readonly=False, read_mode="preadv"):
        if read_mode not in ("preadv", "mmap"):
            raise ValueError(f"unknown read mode {read_mode!r}: expected preadv or mmap")
        self.path = path
        self.readonly = readonly
        self.read_mode = read_mode
        # copies from the mapping hold the GIL, so I/O threads only help preadv
        self.parallel_io = read_mode == "preadv"
        self._map = None
        self._mv = None
        self._mapped = 0
        import stat
        self.fd = open_checked(path, os.O_RDONLY if readonly else os.O_RDWR, stat.S_ISREG,
                               "a regular file (use --backend block for a block device)")

    @property
    def pio_fd(self):
        """The fd the server's batched C I/O may use instead of readv/writev: only while
        those are ours (a subclass that overrides them must see every call)."""
        t = type(self)
        if t.readv is RawFile.readv and t.writev is RawFile.writev:
            return self.fd
        return None

    def size(self):
        n = os.fstat(self.fd).st_size
        return n - n % 512

    def _remap(self):
        # The old mapping is not closed here: an I/O thread may still copy from it; it goes
        # when the last reference does.
        size = self.size()
        if size:
            m = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            self._map, self._mv, self._mapped = m, memoryview(m), size

    def readv(self, offset, iovs, length=None):
        if self.read_mode == "mmap" and length is not None and length >= self.MMAP_MIN:
            if offset + length > self._mapped:
                self._remap()
            if offset + length <= self._mapped:
                src = self._mv
                pos = offset
                for b in iovs:
                    n = len(b)
                    b[:] = src[pos:pos + n]
                    pos += n
                return
        full_preadv(self.fd, iovs, offset, length)

    def writev(self, offset, iovs, length=None):
        if self.readonly:
            raise StorageError(errno.EROFS, "read-only")
        full_pwritev(self.fd, iovs, offset, length)

    def flush(self):
        os.fdatasync(self.fd)

    def discard(self, offset, length):
        if self.readonly:
            raise StorageError(errno.EROFS, "read-only")
        self._check(offset, length)
        punch_hole(self.fd, offset, length)

    def close(self):
        if self._mv is not None:
            self._mv.release()
            self._map.close()
            self._map = self._mv = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
