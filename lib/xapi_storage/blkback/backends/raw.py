"""A raw image in a regular file: preadv/pwritev straight between the file and the mapped
guest pages (no bounce buffer); flush = fdatasync; discard = punch a hole."""

import ctypes
import ctypes.util
import errno
import os

from . import Storage, StorageError, full_preadv, full_pwritev

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

    def __init__(self, path, readonly=False):
        self.path = path
        self.readonly = readonly
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        self.fd = os.open(path, flags)
        st = os.fstat(self.fd)
        import stat
        if not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            raise StorageError(errno.EINVAL, f"{path} is not a regular file "
                               "(use --backend block for a block device)")

    def size(self):
        n = os.fstat(self.fd).st_size
        return n - n % 512

    def readv(self, offset, iovs, length=None):
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
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
