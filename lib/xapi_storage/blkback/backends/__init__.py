"""Storage backends: where the server's reads and writes go.

The server talks to a backend through `Storage` only:

    size()                      device size in bytes (re-read for online resize)
    readv(offset, iovs, length) fill the buffers (memoryviews, e.g. mapped guest pages) from
                                `offset`; all bytes or OSError. `length` is their total size
                                (the server knows it; None: the backend sums it)
    writev(offset, iovs, length) write the buffers at `offset`; all bytes or OSError
    flush()                     make every completed write durable (fdatasync/fsync)
    discard(offset, length)     drop the range (punch hole / BLKDISCARD)
    close()
    close_for_good()            close when the device is gone for good (not handed to a
                                successor): what only it had (a cow's named overlay) goes too

`offset`/`length` are bytes, multiples of 512, already checked against size() by the server;
backends check again (a request outside the disk is a bug, never I/O). Kinds: raw, block,
null, cow - see `open_storage`.
"""

import errno
import os

from ...compat import preadv, pwritev

SECTOR = 512


class StorageError(OSError):
    """The storage failed an operation (answered to the guest as BLKIF_RSP_ERROR)."""


class Storage:
    """Base class; see the module docstring for the contract."""

    kind = "?"
    readonly = False
    #: discard does something useful (advertise feature-discard)
    can_discard = False
    #: writes are volatile until flush() (advertise feature-flush-cache)
    write_cache = True
    #: the bytes a discarded range reads back as are zero (informational)
    discard_zeroes = False
    #: readv/writev may run concurrently from several threads
    parallel_io = False
    #: an fd whose plain pread/pwrite at the same offsets IS readv/writev (raw, block), for
    #: the server's batched I/O in C; None: always call readv/writev
    pio_fd = None

    def size(self):
        raise NotImplementedError

    def readv(self, offset, iovs, length=None):
        raise NotImplementedError

    def writev(self, offset, iovs, length=None):
        raise NotImplementedError

    def flush(self):
        pass

    def close_for_good(self):
        self.close()

    def discard(self, offset, length):
        raise StorageError(errno.EOPNOTSUPP, f"{self.kind} storage cannot discard")

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check(self, offset, length):
        if offset < 0 or length < 0 or offset + length > self.size():
            raise StorageError(errno.EINVAL, f"bug: I/O at {offset}+{length} outside the "
                               f"{self.size()}-byte {self.kind} storage")


def _advance(iovs, n, offset, want):
    """After a short preadv/pwritev that moved `n` bytes: the buffers, offset and byte count
    still to do."""
    while n and len(iovs[0]) <= n:
        k = len(iovs[0])
        n -= k
        want -= k
        offset += k
        iovs = iovs[1:]
    if n:
        # a view, never a slice: slicing a bytearray copies, and the rest of a read would
        # land in the copy
        iovs = [memoryview(iovs[0])[n:]] + list(iovs[1:])
        want -= n
        offset += n
    return iovs, offset, want


def full_preadv(fd, iovs, offset, want=None):
    """preadv (compat: os.preadv where the Python has it) until every buffer is full; a short
    read at end of file is an error."""
    n = preadv(fd, iovs, offset)
    if want is None:
        want = sum(map(len, iovs))
    if n == want:
        return
    while n < want:
        if n == 0:
            raise StorageError(errno.EIO, f"unexpected end of file at {offset}")
        iovs, offset, want = _advance(iovs, n, offset, want)
        if not iovs:
            return
        n = preadv(fd, iovs, offset)
        if n == want:
            return


def full_pwritev(fd, iovs, offset, want=None):
    n = pwritev(fd, iovs, offset)
    if want is None:
        want = sum(map(len, iovs))
    while n < want:
        if n == 0:
            raise StorageError(errno.EIO, f"write made no progress at {offset}")
        iovs, offset, want = _advance(iovs, n, offset, want)
        if not iovs:
            return
        n = pwritev(fd, iovs, offset)


class Borrowed(Storage):
    """Another owner's open storage, used by one device: every call goes to it, close()
    does not close it (the volume server shares one storage between its devices and its NBD
    export). `readonly=True` makes this user read-only whatever the storage is."""

    def __init__(self, storage, readonly=False):
        self.inner = storage
        self.kind = storage.kind
        self.readonly = storage.readonly or readonly
        self.can_discard = storage.can_discard
        self.write_cache = storage.write_cache
        self.discard_zeroes = storage.discard_zeroes
        self.parallel_io = storage.parallel_io
        self.pio_fd = storage.pio_fd
        self.size = storage.size
        self.readv = storage.readv
        self.writev = storage.writev
        self.flush = storage.flush
        self.discard = storage.discard

    def close(self):
        pass

    def close_for_good(self):
        pass


def open_checked(path, flags, is_kind, hint):
    """Open `path` for a backend and check its type with `is_kind` (stat.S_ISREG, ...).

    The open itself never waits: O_NONBLOCK makes a FIFO (or a device whose open blocks)
    return at once, so a wrong --path cannot hang `blkback connect` in open() where no signal
    can end it; the type is then checked on the descriptor (no race with a rename) and
    O_NONBLOCK dropped again. StorageError(EINVAL) naming `hint` for a wrong type."""
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not is_kind(mode):
            raise StorageError(errno.EINVAL, f"{path} is not {hint}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


KINDS = ("raw", "cow", "null", "block")


def open_storage(kind, path=None, readonly=False, size=None, overlay_dir=None,
                 read_mode="preadv", overlay_path=None, resume=False):
    """Open a storage backend.

    raw    a regular file (preadv/pwritev straight into the guest's pages; read_mode="mmap"
           copies large reads from a mapping of the file instead, see raw.py)
    block  a block device (BLKGETSIZE64, BLKDISCARD, fsync)
    null   no I/O at all: reads leave the guest's buffers as they are, writes are dropped
           (xen-disk's "discard" backend: measures the protocol alone); `size` bytes, or the
           size of `path` if given
    cow    copy-on-write over the gold image `path`, which is only ever opened read-only;
           writes go to a sparse overlay file (in `overlay_dir`, default next to the image)
           that is unlinked at once and so vanishes on close, even on a crash; or, with
           `overlay_path`, a named one that outlives the process and that `resume` takes
           over (the volume server's, see cow.py)
    """
    if kind == "raw":
        from .raw import RawFile
        return RawFile(path, readonly=readonly, read_mode=read_mode)
    if kind == "block":
        from .block import BlockDevice
        return BlockDevice(path, readonly=readonly)
    if kind == "null":
        from .null import Null
        if size is None:
            if path is None:
                raise ValueError("the null backend needs a size or a path to take it from")
            size = os.stat(path).st_size
        return Null(size, readonly=readonly)
    if kind == "cow":
        from .cow import CopyOnWrite
        return CopyOnWrite(path, readonly=readonly, overlay_dir=overlay_dir,
                           overlay_path=overlay_path, resume=resume)
    raise ValueError(f"unknown backend {kind!r}: expected one of {', '.join(KINDS)}")
