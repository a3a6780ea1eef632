"""Copy-on-write over a gold image: the image is opened read-only and never written; writes
go to a sparse overlay file that is unlinked as soon as it is created (O_TMPFILE), so it
vanishes when we close it or die. Unlike a private mmap (the seed's approach), written data
lives in the page cache / on disk of the overlay's filesystem, not pinned in our RAM.

Which 4 KiB blocks live in the overlay is a bitmap (1 bit per block: 32 MiB per TiB). A write
that covers a block only partly first copies that block up from the gold image. A discard
punches holes in the overlay and marks the blocks as overlay blocks, so they read as zeros.
Flush is a no-op: the overlay is thrown away on close by design, so nothing it holds is
meant to survive a crash.
"""

import errno
import os
import stat
import tempfile

from . import Storage, StorageError, full_preadv, full_pwritev, open_checked
from .raw import punch_hole

BLOCK = 4096


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

    def __init__(self, gold, readonly=False, overlay_dir=None):
        self.path = gold
        self.readonly = readonly
        self.gold = open_checked(gold, os.O_RDONLY, stat.S_ISREG, "a regular file (the gold "
                                 "image of --backend cow)")
        n = os.fstat(self.gold).st_size
        self._size = n - n % 512
        self.overlay = -1
        d = overlay_dir or os.path.dirname(os.path.abspath(gold))
        if not readonly:
            try:
                self.overlay = os.open(d, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            except OSError:
                fd, name = tempfile.mkstemp(prefix=".cow-overlay-", dir=d)
                os.unlink(name)
                self.overlay = fd
            os.ftruncate(self.overlay, self._size)
        self.nblocks = (self._size + BLOCK - 1) // BLOCK
        self.bitmap = bytearray((self.nblocks + 7) // 8)

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
        for fd in (self.gold, self.overlay):
            if fd >= 0:
                os.close(fd)
        self.gold = self.overlay = -1
