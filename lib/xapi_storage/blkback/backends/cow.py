"""Copy-on-write over a gold image: the image is opened read-only and never written; writes
go to a sparse overlay file. Unlike a private mmap (the seed's approach), written data lives
in the page cache / on disk of the overlay's filesystem, not pinned in our RAM.

Which 4 KiB blocks live in the overlay is a bitmap (1 bit per block: 32 MiB per TiB). A write
that covers a block only partly first copies that block up from the gold image. A discard
punches holes in the overlay and marks the blocks as overlay blocks, so they read as zeros.
Flush is a no-op: the overlay is thrown away by design, so nothing it holds is meant to
survive a host crash.

Two kinds of overlay:

* anonymous (the default): unlinked as soon as it is created (O_TMPFILE), the bitmap in our
  memory; it vanishes when we close it or die;
* named (`overlay_path`, the volume server's): a file that outlives the process, its bitmap
  mapped (MAP_SHARED) from the same file, after the data. A server killed and started again
  takes the device's overlay over with `resume=True`, so the guest keeps every write it was
  answered for: data is written before its bits are set, so a block whose bit is set holds
  the guest's data, and a write cut short was never answered (the restarted server serves
  it again). `close()` leaves a named overlay for a successor; `close_for_good()` (the
  device is gone) deletes it.
"""

import errno
import mmap
import os
import stat
import struct
import tempfile

from . import Storage, StorageError, full_preadv, full_pwritev, open_checked
from .raw import punch_hole

BLOCK = 4096
PAGE = 4096
HEAD = struct.Struct("<8sQ")          # a named overlay's metadata page: magic, gold size
MAGIC = b"PBCOW001"


def carve(iovs, start, length):
    """The byte range [start, start+length) of the concatenation of `iovs`, as slices."""
    out = []
    pos = 0
    end = start + length
    for b in iovs:
        n = len(b)
        if pos + n > start and pos < end:
            a = max(start - pos, 0)
            z = min(end - pos, n)
            out.append(b[a:z])
        pos += n
        if pos >= end:
            break
    return out


class CopyOnWrite(Storage):
    kind = "cow"
    can_discard = True
    write_cache = False
    discard_zeroes = True

    def __init__(self, gold, readonly=False, overlay_dir=None, overlay_path=None,
                 resume=False):
        self.path = gold
        self.readonly = readonly
        self.bitmap = None
        self.overlay = -1
        self._meta = None
        self.gold = open_checked(gold, os.O_RDONLY, stat.S_ISREG, "a regular file (the gold "
                                 "image of --backend cow)")
        n = os.fstat(self.gold).st_size
        self._size = n - n % 512
        self.overlay_path = None
        self.resumed = False
        self.nblocks = (self._size + BLOCK - 1) // BLOCK
        nbytes = (self.nblocks + 7) // 8
        try:
            if readonly:
                self.bitmap = bytearray(nbytes)
            elif overlay_path is None:
                self._anonymous(overlay_dir or os.path.dirname(os.path.abspath(gold)))
                self.bitmap = bytearray(nbytes)
            else:
                self._named(overlay_path, nbytes, resume)
        except BaseException:
            self.close()
            raise

    def _anonymous(self, d):
        try:
            self.overlay = os.open(d, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError:
            fd, name = tempfile.mkstemp(prefix=".cow-overlay-", dir=d)
            os.unlink(name)
            self.overlay = fd
        os.ftruncate(self.overlay, self._size)

    def _named(self, path, nbytes, resume):
        """The data in [0, size), then one page of header, then the bitmap."""
        self.overlay = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                               0o600)
        self.overlay_path = path
        meta_at = -(-self._size // PAGE) * PAGE
        meta_len = PAGE + -(-nbytes // PAGE) * PAGE
        st = os.fstat(self.overlay)
        if not stat.S_ISREG(st.st_mode):
            raise StorageError(errno.EINVAL, f"{path} is not a regular file")
        if resume and st.st_size == meta_at + meta_len:
            self._meta = mmap.mmap(self.overlay, meta_len, offset=meta_at)
            magic, size = HEAD.unpack_from(self._meta, 0)
            self.resumed = magic == MAGIC and size == self._size
        if not self.resumed:                  # a fresh overlay: nothing of an older one
            if self._meta is not None:
                self._meta.close()
            os.ftruncate(self.overlay, 0)
            os.ftruncate(self.overlay, meta_at + meta_len)
            # allocated now: a full filesystem fails the open, never a store into the map
            # (SIGBUS) later
            os.posix_fallocate(self.overlay, meta_at, meta_len)
            self._meta = mmap.mmap(self.overlay, meta_len, offset=meta_at)
            HEAD.pack_into(self._meta, 0, MAGIC, self._size)
        self.bitmap = memoryview(self._meta)[PAGE:PAGE + nbytes]

    def size(self):
        return self._size

    # -- the bitmap ------------------------------------------------------------------------
    def _has(self, blk):
        return self.bitmap[blk >> 3] >> (blk & 7) & 1

    def _mark(self, first, end):
        """Mark blocks [first, end) as living in the overlay."""
        bm = self.bitmap
        while first < end and first & 7:
            bm[first >> 3] |= 1 << (first & 7)
            first += 1
        while end > first and end & 7:
            end -= 1
            bm[end >> 3] |= 1 << (end & 7)
        if end > first:
            bm[first >> 3:end >> 3] = b"\xff" * ((end - first) >> 3)

    def overlay_blocks(self):
        """How many blocks live in the overlay (for tests and stats)."""
        return sum(bin(b).count("1") for b in self.bitmap)

    # -- I/O -------------------------------------------------------------------------------
    def readv(self, offset, iovs, length=None):
        length = sum(map(len, iovs))
        self._check(offset, length)
        end = offset + length
        pos = offset
        while pos < end:
            blk = pos // BLOCK
            src = self._has(blk)
            nxt = (blk + 1) * BLOCK
            while nxt < end and self._has(nxt // BLOCK) == src:
                nxt += BLOCK
            nxt = min(nxt, end)
            full_preadv(self.overlay if src else self.gold,
                        carve(iovs, pos - offset, nxt - pos), pos)
            pos = nxt

    def _copy_up(self, blk):
        if self._has(blk):
            return
        start = blk * BLOCK
        data = os.pread(self.gold, min(BLOCK, self._size - start), start)
        os.pwrite(self.overlay, data, start)
        self._mark(blk, blk + 1)

    def writev(self, offset, iovs, length=None):
        if self.readonly:
            raise StorageError(errno.EROFS, "read-only")
        length = sum(map(len, iovs))
        self._check(offset, length)
        if not length:
            return
        end = offset + length
        first, last = offset // BLOCK, (end - 1) // BLOCK
        if offset % BLOCK:
            self._copy_up(first)
        if end % BLOCK and end != self._size:
            self._copy_up(last)
        full_pwritev(self.overlay, iovs, offset)
        self._mark(first, last + 1)

    def discard(self, offset, length):
        if self.readonly:
            raise StorageError(errno.EROFS, "read-only")
        self._check(offset, length)
        end = offset + length
        a = -(-offset // BLOCK) * BLOCK            # first whole block
        z = end // BLOCK * BLOCK                   # end of the last whole block
        if z <= a:                                 # within one block: write zeros
            self.writev(offset, [bytes(length)])
            return
        if offset < a:
            self.writev(offset, [bytes(a - offset)])
        if z < end:
            self.writev(z, [bytes(end - z)])
        punch_hole(self.overlay, a, z - a)
        self._mark(a // BLOCK, z // BLOCK)

    def close(self):
        """Close; a named overlay stays, for a server that takes the device over."""
        if isinstance(self.bitmap, memoryview):
            self.bitmap.release()
        self.bitmap = None
        if self._meta is not None:
            self._meta.close()
            self._meta = None
        for fd in (self.gold, self.overlay):
            if fd >= 0:
                os.close(fd)
        self.gold = self.overlay = -1

    def close_for_good(self):
        """Close and delete a named overlay: the device is gone, and its writes with it."""
        self.close()
        if self.overlay_path is not None:
            try:
                os.unlink(self.overlay_path)
            except FileNotFoundError:
                pass
