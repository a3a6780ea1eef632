"""A block device: size from BLKGETSIZE64, discard with BLKDISCARD, flush with fsync."""

import errno
import fcntl
import os
import stat
import struct

from . import Storage, StorageError, full_preadv, full_pwritev, open_checked

BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKROGET = 0x125E


class BlockDevice(Storage):
    kind = "block"
    parallel_io = True              # positional I/O: safe from several threads
    can_discard = True

    def __init__(self, path, readonly=False):
        self.path = path
        self.fd = open_checked(path, os.O_RDONLY if readonly else os.O_RDWR, stat.S_ISBLK,
                               "a block device")
        ro = struct.unpack("i", fcntl.ioctl(self.fd, BLKROGET, b"\0" * 4))[0]
        self.readonly = readonly or bool(ro)

    @property
    def pio_fd(self):
        """The fd the server's batched C I/O may use instead of readv/writev: only while
        those are ours (a subclass that overrides them must see every call)."""
        t = type(self)
        if t.readv is BlockDevice.readv and t.writev is BlockDevice.writev:
            return self.fd
        return None

    def size(self):
        n = struct.unpack("Q", fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8))[0]
        return n - n % 512

    def readv(self, offset, iovs, length=None):
        full_preadv(self.fd, iovs, offset, length)

    def writev(self, offset, iovs, length=None):
        if self.readonly:
            raise StorageError(errno.EROFS, "read-only")
        full_pwritev(self.fd, iovs, offset, length)

    def flush(self):
        os.fsync(self.fd)

    def discard(self, offset, length):
        if self.readonly:
            raise StorageError(errno.EROFS, "read-only")
        self._check(offset, length)
        try:
            fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, length))
        except OSError as e:
            raise StorageError(e.errno, f"BLKDISCARD {offset}+{length}: {e.strerror}") from None

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
