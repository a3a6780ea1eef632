"""Grant tables of the simulated Xen, both sides, done exactly as a guest and Xen do them.

Granter (frontend, `SimGrantAllocator`): owns frames of its memory file and entries of its
grant table (handed out in chunks by the daemon's `reserve`); to grant, it writes the
entry's domid and frame, then its flags. To revoke, it clears the flags - but only while
no one maps the entry.

Mapper (backend, `SimGrantMapper`): does the hypervisor's check itself - entry flags say
permit_access, the domid is the mapper's, not readonly if writing, frame inside memory -
and maps the frames of the granter's memory file MAP_SHARED into one contiguous region.

"Mapped" is an OFD read lock on the entry's 8 bytes of the grant-table file, held from
before the check until unmap (or the mapper's death: the kernel drops the lock). A
revoke takes a write lock on the entry first, so it fails while the entry is mapped, as
Xen's GTF_reading/GTF_writing busy bits make a guest's gnttab_end_foreign_access fail.
"""

import errno
import fcntl
import mmap
import os
import struct
import threading

from .. import (GrantAllocation, GrantAllocator, GrantMapper, GrantMapping, XenError,
                PAGE_SIZE)
from .. import _mem
from . import layout as L
from .control import JsonConn

_FLOCK = struct.Struct("hhqqi4x")            # struct flock on x86_64/aarch64 Linux
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
F_RDLCK, F_WRLCK, F_UNLCK = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK


def _lock(fd, kind, ref, count=1):
    """OFD lock on entries [ref, ref+count); False if someone else holds a conflicting one."""
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, ref * 8, count * 8, 0))
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def _runs(items):
    """[5,6,7,9] -> [(5,3),(9,1)]"""
    out = []
    for x in items:
        if out and out[-1][0] + out[-1][1] == x:
            out[-1][1] += 1
        else:
            out.append([x, 1])
    return out


class _Granter:
    """The files of one granting domain, opened once: memory fd, grant table fd + map."""

    def __init__(self, d, domid):
        self.domid = domid
        try:
            self.gt_fd = L.open_regular(L.gnttab_file(d, domid))
        except FileNotFoundError:
            raise XenError(errno.ESRCH, f"simulated Xen {d}: no domain {domid}") from None
        except OSError as e:
            raise XenError(e.errno, f"simulated Xen {d}: grant table of domain {domid}: {e}") from None
        try:
            self.mem_fd = L.open_regular(L.mem_file(d, domid))
        except OSError:
            os.close(self.gt_fd)
            raise XenError(errno.ESRCH, f"simulated Xen {d}: no memory for domain {domid}") from None
        self.entries = os.fstat(self.gt_fd).st_size // 8
        self.frames = os.fstat(self.mem_fd).st_size // PAGE_SIZE
        self.gt = mmap.mmap(self.gt_fd, self.entries * 8)
        self.locks = {}                      # ref -> how many of our mappings hold it

    def close(self):
        self.gt.close()
        os.close(self.gt_fd)
        os.close(self.mem_fd)


class SimGrantMapping(GrantMapping):
    def __init__(self, mapper, granter, refs, region, key):
        self._mapper, self._granter, self.refs = mapper, granter, refs
        self._region, self._key = region, key
        self.buffer = region.buffer

    def unmap(self):
        if self._region is None:
            return
        m = self._mapper
        with m._mutex:
            region, self._region = self._region, None
            if region is None:
                return
            self.buffer = None
            if region.detach():
                m._keep(self._key, region)
            m._unlock(self._granter, self.refs)
            m._live.discard(self)


class SimGrantMapper(GrantMapper):
    """Maps are checked afresh every time (locks, flags, domid, readonly, frame). What is
    cached is only the mmap of a frame run once nothing in Python can reach it any more:
    the next map of the same frames (after its own checks) reuses it instead of paying
    one mmap per run, which is most of the cost of a map."""

    CACHE_ENTRIES = 1024
    CACHE_BYTES = 64 << 20

    def __init__(self, d, domid):
        self.dir, self.domid = d, domid
        self._granters = {}
        self._dead = []
        self._live = set()
        self._cache = {}            # (granter domid, writable, frames) -> detached Region
        self._cache_bytes = 0
        self._mutex = threading.Lock()   # map/unmap may come from several threads

    def _keep(self, key, region):
        cache = self._cache
        old = cache.pop(key, None)
        if old is not None:
            self._cache_bytes -= old.size
            old.close()
        cache[key] = region
        self._cache_bytes += region.size
        while len(cache) > self.CACHE_ENTRIES or self._cache_bytes > self.CACHE_BYTES:
            r = cache.pop(next(iter(cache)))
            self._cache_bytes -= r.size
            r.close()

    def _granter(self, domid):
        g = self._granters.get(domid)
        if g is None:
            g = self._granters[domid] = _Granter(self.dir, domid)
        return g

    def _unlock(self, g, refs):
        free = []
        locks = g.locks
        for r in refs:
            n = locks[r] - 1
            if n:
                locks[r] = n
            else:
                del locks[r]
                free.append(r)
        for start, count in _runs(sorted(free)):
            _lock(g.gt_fd, F_UNLCK, start, count)

    def map(self, domid, refs, writable):
        with self._mutex:
            return self._map(domid, refs, writable)

    def _map(self, domid, refs, writable):
        refs = tuple(refs)
        n = len(refs)
        if not n:
            raise XenError(errno.EINVAL, "map: no grant references")
        if type(domid) is not int or not 0 <= domid < 0x7FF0:
            raise XenError(errno.EINVAL, f"map: bad domid {domid!r}")
        g = self._granter(domid)
        locks = g.locks
        taken = []
        try:
            frames = []
            unpack = L.GRANT_ENTRY.unpack_from
            need = L.GTF_permit_access
            for ref in refs:
                if type(ref) is not int or not 0 <= ref < g.entries:
                    raise XenError(errno.EINVAL, f"grant ref {ref!r} of domain {domid} "
                                   f"is out of range (0..{g.entries - 1})")
                if ref not in locks:
                    if not _lock(g.gt_fd, F_RDLCK, ref):
                        raise XenError(errno.EBUSY, f"grant ref {ref} of domain {domid} "
                                       "is being revoked")
                    locks[ref] = 0
                locks[ref] += 1
                taken.append(ref)
                flags, gdomid, frame = unpack(g.gt, ref * 8)
                if flags & L.GTF_type_mask != need or gdomid != self.domid:
                    if not os.path.exists(L.gnttab_file(self.dir, domid)):
                        # forget its files (closed at close(): live maps still use them)
                        self._dead.append(self._granters.pop(domid))
                        raise XenError(errno.ESRCH, f"domain {domid} is gone")
                    raise XenError(errno.EPERM, f"grant ref {ref} of domain {domid} is not "
                                   f"granted to domain {self.domid}")
                if writable and flags & L.GTF_readonly:
                    raise XenError(errno.EPERM, f"grant ref {ref} of domain {domid} is "
                                   "read-only; mapping it writable is refused")
                if frame >= g.frames:
                    raise XenError(errno.EFAULT, f"grant ref {ref} of domain {domid} names "
                                   f"frame {frame}, outside its memory")
                frames.append(frame)
            key = (domid, writable, tuple(frames))
            region = self._cache.pop(key, None)
            if region is not None:
                self._cache_bytes -= region.size
                region.attach()
            else:
                runs = [(g.mem_fd, s * PAGE_SIZE, c * PAGE_SIZE) for s, c in _runs(frames)]
                region = _mem.Region(n * PAGE_SIZE, writable, runs)
        except BaseException:
            self._unlock(g, taken)
            raise
        m = SimGrantMapping(self, g, refs, region, key)
        self._live.add(m)
        return m

    def close(self):
        for m in list(self._live):
            m.unmap()
        for r in self._cache.values():
            r.close()
        self._cache = {}
        self._cache_bytes = 0
        for g in list(self._granters.values()) + self._dead:
            g.close()
        self._granters = {}
        self._dead = []


class SimGrantAllocation(GrantAllocation):
    def __init__(self, allocator, domid, frame, refs, region, writable):
        self._a, self.domid, self.frame = allocator, domid, frame
        self.refs, self._region, self.writable = refs, region, writable
        self.buffer = region.buffer

    def busy(self):
        """The refs some mapper still maps (simulation only: real gntalloc cannot tell)."""
        fd = self._a._gt_fd
        out = []
        for r in self.refs:
            if _lock(fd, F_WRLCK, r):
                _lock(fd, F_UNLCK, r)
            else:
                out.append(r)
        return out

    def revoke(self):
        """End access. Raises XenError(EBUSY) naming the refs a peer still maps; those
        stay granted (call again after the peer unmapped), the others are revoked."""
        if self._region is None:
            return
        a = self._a
        busy = []
        for r in self.refs:
            if r in a._granted:
                if _lock(a._gt_fd, F_WRLCK, r):
                    L.GRANT_ENTRY.pack_into(a._gt, r * 8, 0, 0, 0)
                    _lock(a._gt_fd, F_UNLCK, r)
                    a._granted.discard(r)
                else:
                    busy.append(r)
        if busy:
            raise XenError(errno.EBUSY, f"grant refs {busy} of domain {a.domid} are still "
                           f"mapped by domain {self.domid}")
        # views kept past revoke() read zeros from now on: the frames go back to the pool
        self._region.release()
        self._region = None
        self.buffer = None
        a._free(self.frame, len(self.refs), self.refs)


class SimGrantAllocator(GrantAllocator):
    CHUNK = 256           # frames and refs reserved from the daemon at a time

    def __init__(self, d, domid):
        self.dir, self.domid = d, domid
        self._ctl = JsonConn(L.control_sock(d))
        try:
            self._gt_fd = L.open_regular(L.gnttab_file(d, domid))
            self._mem_fd = L.open_regular(L.mem_file(d, domid))
        except FileNotFoundError:
            self._ctl.close()
            raise XenError(errno.ESRCH, f"simulated Xen {d}: no domain {domid}") from None
        self._gt = mmap.mmap(self._gt_fd, os.fstat(self._gt_fd).st_size)
        self._frames = []           # free extents [start, count]
        self._refs = []             # free refs
        self._granted = set()

    def _reserve(self, frames, refs):
        res = self._ctl.call(op="reserve", domid=self.domid, frames=frames, refs=refs)
        for s, c in res["frames"]:
            self._frames.append([s, c])
        for s, c in res["refs"]:
            self._refs.extend(range(s, s + c))

    def _take_frames(self, n):
        for e in self._frames:
            if e[1] >= n:
                s = e[0]
                e[0] += n
                e[1] -= n
                if not e[1]:
                    self._frames.remove(e)
                return s
        return None

    def _free(self, frame, n, refs):
        self._frames.append([frame, n])
        self._refs.extend(refs)

    def grant(self, domid, npages, writable=True):
        if type(npages) is not int or npages < 1:
            raise XenError(errno.EINVAL, f"grant: bad page count {npages!r}")
        if type(domid) is not int or not 0 <= domid < 0x7FF0:
            raise XenError(errno.EINVAL, f"grant: bad domid {domid!r}")
        frame = self._take_frames(npages)
        if frame is None:
            self._reserve(max(npages, self.CHUNK), 0)
            frame = self._take_frames(npages)
        if len(self._refs) < npages:
            self._reserve(0, max(npages, self.CHUNK))
        refs = tuple(self._refs[:npages])
        del self._refs[:npages]
        size = npages * PAGE_SIZE
        region = _mem.Region(size, True, [(self._mem_fd, frame * PAGE_SIZE, size)])
        region.buffer[:] = bytes(size)             # pages come zeroed, as from gntalloc
        flags = L.GTF_permit_access | (0 if writable else L.GTF_readonly)
        gt = self._gt
        for i, r in enumerate(refs):
            # domid and frame first, the flags last (Xen reads flags to decide)
            struct.pack_into("<HI", gt, r * 8 + 2, domid, frame + i)
            struct.pack_into("<H", gt, r * 8, flags)
            self._granted.add(r)
        return SimGrantAllocation(self, domid, frame, refs, region, writable)

    def close(self):
        self._gt.close()
        os.close(self._gt_fd)
        os.close(self._mem_fd)
        self._ctl.close()          # the daemon clears our remaining grants and frees them
