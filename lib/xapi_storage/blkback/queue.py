"""One ring of one device: consume requests, move data, respond. The hot loop.

Per wake-up (`service`): read req_prod once, copy every published entry out of the shared
ring in one slice (XSA-155: nothing is read from shared memory twice), parse and validate
from that copy, run adjacent reads/writes as one preadv/pwritev straight into the guest's
mapped pages, write all responses, push them with one barrier pair and at most one notify,
then the final check. Everything is answered synchronously, so req_cons == rsp_prod_pvt
between batches and a slot never owes a response when we read it.

Grants: with persistent grants negotiated, each gref is mapped once (RW, as blkif.h says) and
kept, up to `max_persistent` per ring (1056 by default, as Linux blkback). A grant that does
not fit is mapped for its request only, and after the turn the least recently used mappings
are unmapped to make room (`_evict`), as Linux blkback purges its LRU persistent grants.
Use is tracked by the 100 ms generation: a set of grefs used now and one of the generation
before; a mapping is evicted whole (its grefs came in one request), the least recently used
first, then the oldest. Without, the grefs
of a request are mapped in one call (read-only for writes to disk) and unmapped before its
response is pushed (blkfront checks that). Indirect segment lists are copied out of their
pages once; validated lists of persistent grants are cached by content (a frontend with a
persistent pool sends the same lists again and again), which skips re-validating and
re-slicing 256 segments per 1 MiB request.
"""

import errno
import logging
import mmap
import os
import struct
import time
from functools import partial

from ..compat import monotonic_ns
from . import blkif, fence
from .backends import StorageError
from .blkif import (BadRequest, K_BARRIER, K_DISCARD, K_INDIRECT, K_READ, K_WRITE,
                    RSP_ERROR, RSP_OKAY, SEGMENT)
from .ring import M32, BackRing
from ..volume.store import faultpoint

try:                                     # batched positional I/O in C (see _pio_build.py)
    from ._pio import ffi as _pio_ffi, lib as _pio_lib
except ImportError:                      # pragma: no cover - depends on the install
    _pio_ffi = _pio_lib = None
if os.environ.get("PYBLKBACK_NO_C_BATCH"):  # for comparisons (benchmarks/ring.py --no-c-batch)
    _pio_ffi = _pio_lib = None

PIO_JOB = struct.Struct("<QIIqq")        # addr, len, op, offset, result
# header + first segment only: op, nseg, handle, id, sector, gref, first, last
REQ1 = {112: struct.Struct("<BBH4xQQIBB"), 108: struct.Struct("<BBHQQIBB")}

log = logging.getLogger("xapi_storage.blkback")

IOV_MAX = 1024
DISCARD_CHUNK = 1 << 30
MAX_BATCHES = 16                  # per service() call, then let other rings run
TURN_SECTORS = (64 << 20) // 512  # and at most ~64 MiB read/written per call
PLAN_CACHE_MAX = 512              # cached indirect plans per ring (bounded memory)
PLAN_CACHE_IOVS = 32768           # and buffer views in them (~200 B each: ~6.5 MB)
PARALLEL_MIN = 256 * 1024        # runs of >= 256 KiB may go to the I/O threads
# Persistent mappings kept (each is one map call = one VMA of the process, which has
# ~65530): per ring, and the server's total is Server.max_persistent_maps. Past either,
# grants are mapped per request.
MAX_PMAPS = 1024
MAX_PERSISTENT = 1056            # default per ring: Linux blkback's xen_blkif_max_pgrants
EVICT_EXTRA = 20                 # evict 1/20 (5%) of the bound more than needed, as Linux
# Floods: a bad request or an event that finds nothing costs one token, a good request gives
# one back; tokens come back at FLOOD_RATE per second up to FLOOD_BURST. A ring out of tokens
# is not looked at for THROTTLE_PAUSE (events from it are consumed and ignored meanwhile).
FLOOD_RATE = 1000
FLOOD_BURST = 2000
THROTTLE_PAUSE = 0.1


def _chunked(fn, start, iovs, length):
    """fn(offset, iovs, length) at most IOV_MAX buffers at a time: preadv/pwritev refuse
    more (EINVAL), and one indirect request may carry up to 4096 segments."""
    for i in range(0, len(iovs), IOV_MAX):
        part = iovs[i:i + IOV_MAX]
        n = sum(map(len, part))
        fn(start, part, n)
        start += n


class FatalRingError(Exception):
    """The frontend broke the ring protocol; the device must be closed."""


U32 = struct.Struct("<I")


class Journal:
    """The batch of requests being answered, kept in a small file (on /run's tmpfs) that
    outlives the process, so that a server started again after a crash can serve it again.

    Responses go into the ring slots their requests came from (blkif's slots are a union of
    the two), and they are published (rsp_prod) only once the whole batch is answered. A
    server killed in between leaves slots that hold responses the frontend has not seen,
    where the new server, which starts consuming at rsp_prod, would read requests: garbage
    requests, and answers with ids the frontend never sent (Linux's blkfront then stops
    the disk for good). So before it answers a batch the server writes the batch's request
    bytes here, then its length, then its first index; a new server finding that first
    index equal to rsp_prod puts those requests back into their slots before it starts
    (`restore`). Any other value means the batch was published (or never begun), and the
    slots are the frontend's own. Writing the index last means a half-written record never
    matches. The file holds one ring's worth of entries after a 32-byte header (magic, length,
    first index, and the ring's identity: its first grant reference and the frontend's event
    channel port, so that a record of another ring, even on the same device, never matches).
    Its blocks are allocated when it is made: a full /run fails here, never as a SIGBUS on a
    store into the mapping later."""

    MAGIC = b"PBJ1"

    HEAD = 32
    IDENT = struct.Struct("<II")

    def __init__(self, path, slots, entry_size, ident):
        self.path = path
        self.ident = self.IDENT.pack(*(i & M32 for i in ident))   # (first gref, port)
        self.entry_size = entry_size
        self.slots = slots
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            size = self.HEAD + slots * entry_size
            st = os.fstat(fd)
            if st.st_size != size:
                os.ftruncate(fd, 0)             # not ours, or another ring's: start afresh
                os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.prior = bytes(self.map[:self.HEAD])   # what the last server left: restore()
        self.map[:4] = self.MAGIC
        self.map[12:20] = self.ident

    def restore(self, ring):
        """Put back the requests of a batch the previous server took but did not publish.
        Returns how many; 0 if there is none."""
        head = self.prior
        self.prior = None
        if head is None or head[:4] != self.MAGIC or head[12:20] != self.ident:
            return 0                            # none, or another ring's (new ring pages)
        n, cons = U32.unpack_from(head, 4)[0], U32.unpack_from(head, 8)[0]
        rsp_prod, req_prod = ring.hdr[2], ring.hdr[0]
        if cons != rsp_prod or not 0 < n <= min(self.slots, ring.size) or \
                n > (req_prod - rsp_prod) & M32:
            return 0
        esz = self.entry_size
        for i in range(n):
            off = ring.slot_offset((cons + i) & M32)
            at = self.HEAD + i * esz
            ring.buf[off:off + esz] = self.map[at:at + esz]
        return n

    def record(self, cons, raw, n):
        m = self.map
        m[self.HEAD:self.HEAD + len(raw)] = raw
        U32.pack_into(m, 4, n)
        U32.pack_into(m, 8, cons)               # last: only now does the record match

    def close(self):
        if self.map is not None:
            self.map.close()
            self.map = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class Queue:
    """A connected ring: its mapping, event channel port, persistent grants, stats."""

    def __init__(self, index, dev, mapping, abi, port, journal=None, ident=(0, 0)):
        self.index = index
        self.dev = dev
        self.mapping = mapping
        self.abi = abi
        self.port = port
        self.ring = BackRing(mapping.buffer, abi.entry_size)
        self.journal = None
        self.restored = 0
        if journal is not None:
            try:
                self.journal = Journal(journal, self.ring.size, abi.entry_size, ident)
            except OSError as e:    # /run full, say: serve on, without restart safety
                log.warning("%s: queue %d: no journal (%s): a restart of this server under "
                            "load may break this ring", dev.name, index, e)
            else:
                self.restored = self.journal.restore(self.ring)
        self.persistent = {}            # gref -> memoryview of its page
        self.pmaps = {}                 # mapping id -> GrantMapping backing self.persistent
        self.pgroups = {}               # mapping id -> the grefs it maps
        self.next_pmap = 0
        self.used = set()               # grefs used in this 100 ms generation
        self.used_prev = set()          # ... and in the one before
        self.evict_wanted = 0           # grants that did not fit since the last eviction
        self.tokens = float(FLOOD_BURST)
        self.tokens_t = time.monotonic()
        self.throttled_until = 0.0
        self.where = {}                 # gref -> (index in pmaps, byte offset in it)
        self.plans = {}                 # indirect segment bytes -> (nsect, iovs)
        self.plan_iovs = 0              # len(iovs) summed over self.plans
        self.dead = False
        self.inflight = []              # runs in the I/O threads: (future, op, start, end, ids)
        # single-page requests on persistent grants go to C in one call per batch
        self.pio_fd = getattr(dev.storage, "pio_fd", None) if _pio_lib is not None else None
        if self.pio_fd is not None:
            self.jobs = bytearray(PIO_JOB.size * self.ring.size)
            self.jobs_c = _pio_ffi.from_buffer(self.jobs)
        self.paddr = {}                 # gref -> address of its persistent page (for C)
        self.pbases = {}                # mapping id -> cdata keeping those addresses valid

    # -- grants -----------------------------------------------------------------------------
    def _pages(self, segs, writable, temps):
        """Memoryviews of the pages of `segs`, in order. Maps what is missing; mappings that
        must go before the response are appended to `temps`."""
        dev = self.dev
        if dev.use_persistent:
            pc = self.persistent
            missing = [g for g, _f, _l in segs if g not in pc]
            self.used.update([g for g, _f, _l in segs])
            if missing:
                missing = list(dict.fromkeys(missing))
                server = dev.server
                if (len(pc) + len(missing) <= dev.max_persistent
                        and len(self.pmaps) < MAX_PMAPS
                        and server.persistent_maps < server.max_persistent_maps):
                    m = dev.mapper.map(dev.fe_domid, missing, writable=True)
                    dev.stats.grant_maps += 1
                    server.persistent_maps += 1
                    k = self.next_pmap
                    self.next_pmap += 1
                    self.pmaps[k] = m
                    self.pgroups[k] = missing
                    buf = m.buffer
                    where = self.where
                    for i, g in enumerate(missing):
                        pc[g] = buf[i * 4096:(i + 1) * 4096]
                        where[g] = (k, i * 4096)
                    if self.pio_fd is not None and not buf.readonly:
                        cd = _pio_ffi.from_buffer(buf, require_writable=True)
                        self.pbases[k] = cd
                        base = int(_pio_ffi.cast("uintptr_t", cd))
                        paddr = self.paddr
                        for i, g in enumerate(missing):
                            paddr[g] = base + i * 4096
                    dev.stats.persistent_grants = len(pc)
                else:
                    self.evict_wanted += len(missing)
                    return self._map_temp(segs, True, temps)
            return [pc[g] for g, _f, _l in segs]
        return self._map_temp(segs, writable, temps)

    def _map_temp(self, segs, writable, temps):
        dev = self.dev
        refs = [g for g, _f, _l in segs]
        m = dev.mapper.map(dev.fe_domid, refs, writable=writable)
        dev.stats.grant_maps += 1
        temps.append(m)
        buf = m.buffer
        return [buf[i * 4096:(i + 1) * 4096] for i in range(len(refs))]

    def _indirect(self, hdr):
        """Copy the segment list of an indirect request out of its pages, once."""
        dev = self.dev
        grefs = hdr[6]
        nbytes = hdr[4] * SEGMENT.size
        pc = self.persistent
        if dev.use_persistent:
            # blkfront takes indirect pages from its persistent pool too
            if all(g in pc for g in grefs):
                self.used.update(grefs)
                return b"".join([pc[g] for g in grefs])[:nbytes]      # the one copy
            tmp = []
            try:
                pages = self._pages([(g, 0, 7) for g in grefs], True, tmp)
                return b"".join(pages)[:nbytes]                       # the one copy
            except OSError as e:
                raise BadRequest(hdr[1], hdr[2], RSP_ERROR,
                                 f"indirect pages {list(grefs)} not mapped: {e}") from None
            finally:
                self._unmap(tmp)
        try:
            m = dev.mapper.map(dev.fe_domid, list(grefs), writable=False)
        except OSError as e:
            raise BadRequest(hdr[1], hdr[2], RSP_ERROR,
                             f"indirect pages {list(grefs)} not mapped: {e}") from None
        dev.stats.grant_maps += 1
        try:
            return bytes(m.buffer[:nbytes])                               # the one copy
        finally:
            m.unmap()

    # -- the hot loop -----------------------------------------------------------------------
    def service(self, event=False):
        """Answer what is on the ring. Returns False when it is empty and the frontend has
        been asked to notify us; True after MAX_BATCHES batches or TURN_SECTORS moved with
        more still there (so a busy ring cannot starve the others: the server comes back
        to it). Raises
        FatalRingError if the frontend broke the protocol."""
        ring = self.ring
        hdr = ring.hdr
        size = ring.size
        mask = ring.mask
        esz = self.abi.entry_size
        dev = self.dev
        evtchn = dev.server.evtchn
        stats = dev.stats
        sects = stats.sectors
        moved0 = sects[0] + sects[1]
        batches = 0
        journal = self.journal
        while True:
            rp = hdr[0]
            fence.rmb()
            cons = ring.req_cons
            n = (rp - cons) & M32
            if n == 0:
                if event and not batches:
                    event = False
                    stats.spurious_events += 1
                    if self._charge(1):
                        return False
                if not ring.final_check_for_requests():
                    if self.evict_wanted:
                        self._evict()
                    return False
                continue
            if batches >= MAX_BATCHES or sects[0] + sects[1] - moved0 >= TURN_SECTORS:
                if self.evict_wanted:
                    self._evict()
                return True
            batches += 1
            if n > size - ((cons - ring.rsp_prod_pvt) & M32):
                self.dead = True
                raise FatalRingError(f"frontend error: bogus ring requests: req_prod {rp} is "
                                     f"{n} ahead of req_cons {cons} (ring size {size})")
            t0 = monotonic_ns()
            first = cons & mask
            buf = ring.buf
            start = 64 + first * esz
            if first + n <= size:
                raw = bytes(buf[start:start + n * esz])
            else:
                k = size - first
                raw = bytes(buf[start:start + k * esz]) + bytes(buf[64:64 + (n - k) * esz])
            ring.req_cons = rp
            if journal is not None:
                journal.record(cons, raw, n)
            bad0 = dev.bad_logged
            self._batch(raw, n)
            bad = dev.bad_logged - bad0
            faultpoint("blkback:respond")             # answered, not yet published
            if ring.push_responses_and_check_notify():
                faultpoint("blkback:notify")          # published, the event not yet sent
                evtchn.notify(self.port)
                stats.notifies += 1
            stats.batch(n, monotonic_ns() - t0)
            if bad and self._charge(2 * bad - n):
                return True                   # throttled: the server comes back later
            if not bad and self.tokens < FLOOD_BURST:
                self.tokens = min(FLOOD_BURST, self.tokens + n)

    def _batch(self, raw, n):
        """Parse and execute `n` requests copied in `raw`, writing responses."""
        dev = self.dev
        abi = self.abi
        esz = abi.entry_size
        limits = dev.limits
        parse = blkif.parse_request
        stats = dev.stats
        reqs = stats.requests
        sects = stats.sectors
        ring = self.ring
        buf = ring.buf
        mask = ring.mask
        rsp_pack = abi.rsp.pack_into
        plans = self.plans
        persistent = dev.use_persistent

        run_op = -1                    # pending run of adjacent reads or writes
        run_start = run_end = 0
        run_iovs = []
        run_reqs = []                  # (id, op) answered when the run completes
        temps = []                     # non-persistent mappings to unmap before responding
        rsp = ring.rsp_prod_pvt
        errors = 0

        pc = self.persistent if persistent else None
        req_unpack = abi.req.unpack_from
        pio = self.pio_fd is not None and persistent
        paddr = self.paddr
        req1 = REQ1[esz].unpack_from
        job_pack = PIO_JOB.pack_into
        jobs = self.jobs if pio else None
        nj = 0                         # jobs queued for C
        pio_ids = []
        pio_ops = []
        used_add = self.used.add
        ro = limits.readonly
        nsectors = limits.sectors
        amask = limits.logical_sectors - 1
        for i in range(n):
            # Fast path: a direct read/write whose pages are all persistent grants we hold.
            # It checks exactly what parse_request checks; anything else (or any doubt)
            # falls through to the general path below, which gives the error answers.
            o = i * esz
            op = raw[o]
            if pio and op <= 1 and raw[o + 1] == 1 and (op == 0 or not ro):
                f = req1(raw, o)
                addr = paddr.get(f[5])
                fs = f[6]
                ls = f[7]
                if addr is not None and fs <= ls <= 7:
                    nsect = ls - fs + 1
                    sector = f[4]
                    if sector + nsect <= nsectors and not (amask and (sector | nsect) & amask):
                        if run_op >= 0:
                            rsp = self._run(run_op, run_start, run_end, run_iovs, run_reqs,
                                            rsp, temps)
                            run_op = -1
                        job_pack(jobs, nj * 32, addr + fs * 512, nsect * 512, op, sector * 512,
                                 0)
                        used_add(f[5])
                        nj += 1
                        pio_ids.append(f[3])
                        pio_ops.append(op)
                        reqs[op] += 1
                        sects[op] += nsect
                        continue
            if pc is not None and op <= 1 and (op == 0 or not ro):
                f = req_unpack(raw, o)
                nseg = f[1]
                if nseg == 1:
                    page = pc.get(f[5])
                    fs = f[6]
                    ls = f[7]
                    ok = page is not None and fs <= ls <= 7
                    if ok:
                        used_add(f[5])
                        nsect = ls - fs + 1
                        fast = [page if nsect == 8 else page[fs * 512:(ls + 1) * 512]]
                elif 1 < nseg <= 11:
                    fast = []
                    nsect = 0
                    ok = True
                    for k in range(5, 5 + 3 * nseg, 3):
                        page = pc.get(f[k])
                        fs = f[k + 1]
                        ls = f[k + 2]
                        if page is None or fs > ls or ls > 7:
                            ok = False
                            break
                        used_add(f[k])
                        nsect += ls - fs + 1
                        fast.append(page if fs == 0 and ls == 7
                                    else page[fs * 512:(ls + 1) * 512])
                else:
                    ok = False
                if ok:
                    sector = f[4]
                    if sector + nsect <= nsectors and not (amask and (sector | nsect) & amask):
                        off = sector * 512
                        if op == run_op and off == run_end and len(run_iovs) < IOV_MAX - 11:
                            run_iovs += fast
                        else:
                            if nj:
                                rsp = self._pio_flush(nj, pio_ids, pio_ops, rsp)
                                nj = 0
                                pio_ids = []
                                pio_ops = []
                            if run_op >= 0:
                                rsp = self._run(run_op, run_start, run_end, run_iovs, run_reqs,
                                                rsp, temps)
                            run_op = op
                            run_start = off
                            run_iovs = fast
                            run_reqs = []
                        run_end = off + nsect * 512
                        run_reqs.append(f[3])
                        reqs[op] += 1
                        sects[op] += nsect
                        continue
            try:
                req = parse(abi, raw, limits, i * esz)
                kind = req[0]
                rid = req[1]
                iovs = None
                if kind == K_INDIRECT:
                    stats.indirect += 1
                    segbytes = self._indirect(req)
                    plan = plans.get(segbytes) if persistent else None
                    if plan is None:
                        full = blkif.parse_indirect_segments(req, segbytes, limits)
                        kind = full[0]
                        nsect = full[4]
                        segs = full[5]
                    else:
                        nsect, iovs, grefs = plan
                        self.used.update(grefs)
                        kind = req[2]
                        blkif.check_range(limits, req[3], nsect, rid, kind)
                elif kind <= K_WRITE:
                    segs = req[5]
                    nsect = req[4]
                else:
                    # flush, barrier, discard: everything before them completes first
                    if nj:
                        rsp = self._pio_flush(nj, pio_ids, pio_ops, rsp)
                        nj = 0
                        pio_ids = []
                        pio_ops = []
                    if run_op >= 0:
                        rsp = self._run(run_op, run_start, run_end, run_iovs, run_reqs, rsp, temps)
                        run_op = -1
                    if self.inflight:
                        rsp = self._drain(rsp)
                    status = self._special(req, temps)
                    rsp_pack(buf, 64 + (rsp & mask) * esz, rid, req[2], status)
                    rsp = (rsp + 1) & M32
                    reqs[kind] += 1
                    if status:
                        errors += 1
                    continue
                # a read or a write: extend the pending run or start a new one
                off = req[3] * 512
                nseg = len(iovs) if iovs is not None else len(segs)
                if kind != run_op or off != run_end or len(run_iovs) + nseg > IOV_MAX:
                    if nj:
                        rsp = self._pio_flush(nj, pio_ids, pio_ops, rsp)
                        nj = 0
                        pio_ids = []
                        pio_ops = []
                    if run_op >= 0:
                        rsp = self._run(run_op, run_start, run_end, run_iovs, run_reqs, rsp, temps)
                    run_op = -1
                    run_iovs = []
                    run_reqs = []
                    run_start = run_end = off
                if iovs is None:
                    ntemps = len(temps)
                    iovs = self._iovs(segs, kind == K_READ, temps)
                    if req[0] == K_INDIRECT and persistent and len(temps) == ntemps:
                        iovs = self._merge(segs, iovs)
                        if (len(plans) >= PLAN_CACHE_MAX
                                or self.plan_iovs + len(iovs) > PLAN_CACHE_IOVS):
                            plans.clear()
                            self.plan_iovs = 0
                        plans[segbytes] = (nsect, iovs, [g for g, _f, _l in segs])
                        self.plan_iovs += len(iovs)
                run_op = kind
                run_iovs += iovs
                run_end = off + nsect * 512
                run_reqs.append(rid)
                reqs[kind] += 1
                sects[kind] += nsect
            except BadRequest as e:
                if run_op >= 0:
                    rsp = self._run(run_op, run_start, run_end, run_iovs, run_reqs, rsp, temps)
                    run_op = -1
                self._unmap(temps)
                rsp_pack(buf, 64 + (rsp & mask) * esz, e.id, e.op, e.status)
                rsp = (rsp + 1) & M32
                if e.status == blkif.RSP_EOPNOTSUPP:
                    stats.unsupported += 1
                else:
                    errors += 1
                dev.log_bad(e)
            except OSError as e:          # a grant we could not map
                if run_op >= 0:
                    rsp = self._run(run_op, run_start, run_end, run_iovs, run_reqs, rsp, temps)
                    run_op = -1
                self._unmap(temps)
                rid = abi.disc.unpack_from(raw, i * esz)[3]
                op = raw[i * esz]
                if op == blkif.OP_INDIRECT:
                    op = raw[i * esz + 1]
                rsp_pack(buf, 64 + (rsp & mask) * esz, rid, op, RSP_ERROR)
                rsp = (rsp + 1) & M32
                errors += 1
                dev.log_bad(BadRequest(rid, op, RSP_ERROR, f"grant mapping failed: {e}"))
        if run_op >= 0:
            rsp = self._run(run_op, run_start, run_end, run_iovs, run_reqs, rsp, temps)
        if nj:
            rsp = self._pio_flush(nj, pio_ids, pio_ops, rsp)
        if self.inflight:
            rsp = self._drain(rsp)
        self._unmap(temps)
        ring.rsp_prod_pvt = rsp
        if errors:
            stats.errors += errors

    def _merge(self, segs, iovs):
        """Join segments that are adjacent in one persistent mapping into one buffer (the
        pages of a request mapped together are contiguous): fewer, larger copies."""
        where = self.where
        pmaps = self.pmaps
        out = []
        cur = None                      # [mapping index, start byte, end byte]
        for g, f, l in segs:
            w = where.get(g)
            if w is None:
                return iovs
            a = w[1] + f * 512
            if cur is not None and cur[0] == w[0] and cur[2] == a:
                cur[2] = w[1] + (l + 1) * 512
                continue
            if cur is not None:
                out.append(pmaps[cur[0]].buffer[cur[1]:cur[2]])
            cur = [w[0], a, w[1] + (l + 1) * 512]
        if cur is not None:
            out.append(pmaps[cur[0]].buffer[cur[1]:cur[2]])
        return out

    def _iovs(self, segs, writable, temps):
        pages = self._pages(segs, writable, temps)
        return [p[f * 512:(l + 1) * 512] for p, (_g, f, l) in zip(pages, segs)]

    def _run(self, op, start, end, iovs, ids, rsp, temps):
        """Do one merged read or write and answer every request in it; returns the new rsp.

        A large run (>= PARALLEL_MIN bytes) on persistent grants goes to the server's
        I/O threads instead (preadv/pwritev release the GIL) and is answered by _drain();
        a run that overlaps one still in flight, where either writes, waits for it first."""
        storage = self.dev.storage
        inflight = self.inflight
        if inflight:
            for _f, op2, s2, e2, _i in inflight:
                if (op != K_READ or op2 != K_READ) and start < e2 and s2 < end:
                    rsp = self._drain(rsp)
                    break
        pool = self.dev.io_pool
        fn = None
        if len(iovs) > IOV_MAX:                # one indirect request of > IOV_MAX segments
            fn = partial(_chunked, storage.readv if op == K_READ else storage.writev)
        if pool is not None and not temps and end - start >= PARALLEL_MIN:
            if fn is None:
                fn = storage.readv if op == K_READ else storage.writev
            inflight.append((pool.submit(fn, start, iovs, end - start), op, start, end, ids))
            return rsp
        status = RSP_OKAY
        try:
            if fn is not None:
                fn(start, iovs, end - start)
            elif op == K_READ:
                storage.readv(start, iovs, end - start)
            else:
                storage.writev(start, iovs, end - start)
        except Exception as e:                 # noqa: BLE001 - answered as an I/O error
            status = RSP_ERROR
            self.dev.stats.errors += len(ids)
            self.dev.log_io_error(op, start, e)
        # grants must be unmapped before the response is visible
        if temps:
            self._unmap(temps)
        buf = self.ring.buf
        mask = self.ring.mask
        esz = self.abi.entry_size
        pack = self.abi.rsp.pack_into
        if len(ids) == 1:
            pack(buf, 64 + (rsp & mask) * esz, ids[0], op, status)
            return (rsp + 1) & M32
        for rid in ids:
            pack(buf, 64 + (rsp & mask) * esz, rid, op, status)
            rsp = (rsp + 1) & M32
        return rsp

    def _pio_flush(self, nj, ids, ops, rsp):
        """Run the queued single-page jobs in C (one call, GIL released, adjacent ones merged
        into one preadv/pwritev) and answer them. Returns the new rsp."""
        if self.inflight:
            rsp = self._drain(rsp)             # never overtake a large run in flight
        failed = _pio_lib.pio_run(self.pio_fd, self.jobs_c, nj)
        self.dev.stats.c_batched += nj
        buf = self.ring.buf
        mask = self.ring.mask
        esz = self.abi.entry_size
        pack = self.abi.rsp.pack_into
        if not failed:
            for k in range(nj):
                pack(buf, 64 + (rsp & mask) * esz, ids[k], ops[k], RSP_OKAY)
                rsp = (rsp + 1) & M32
            return rsp
        for k in range(nj):
            _a, _n, op, off, res = PIO_JOB.unpack_from(self.jobs, k * 32)
            status = RSP_OKAY
            if res:
                status = RSP_ERROR
                self.dev.stats.errors += 1
                self.dev.log_io_error(op, off, OSError(-res, os.strerror(-res)))
            pack(buf, 64 + (rsp & mask) * esz, ids[k], ops[k], status)
            rsp = (rsp + 1) & M32
        return rsp

    def _drain(self, rsp):
        """Wait for the runs in the I/O threads; answer their requests. Returns the new rsp."""
        ring = self.ring
        buf = ring.buf
        mask = ring.mask
        esz = self.abi.entry_size
        pack = self.abi.rsp.pack_into
        for fut, op, start, _end, ids in self.inflight:
            status = RSP_OKAY
            try:
                fut.result()
            except Exception as e:             # noqa: BLE001 - answered as an I/O error
                status = RSP_ERROR
                self.dev.stats.errors += len(ids)
                self.dev.log_io_error(op, start, e)
            for rid in ids:
                pack(buf, 64 + (rsp & mask) * esz, rid, op, status)
                rsp = (rsp + 1) & M32
        self.inflight.clear()
        return rsp

    def _special(self, req, temps):
        """Flush, barrier, discard. Returns the status."""
        kind, rid, op, sector, nsect, segs, extra = req
        storage = self.dev.storage
        if segs:
            # the frontend's grants first: one it did not grant is its fault (an error
            # answer), not a failed flush of the storage (which closes the device)
            try:
                iovs = self._iovs(segs, False, temps)
            except OSError as e:
                self.dev.log_bad(BadRequest(rid, op, RSP_ERROR, f"grant mapping failed: {e}"))
                return RSP_ERROR
        try:
            if kind == K_DISCARD:
                off = sector * 512
                end = off + nsect * 512
                while off < end:
                    n = min(DISCARD_CHUNK, end - off)
                    storage.discard(off, n)
                    off += n
                self.dev.stats.sectors[5] += nsect
                return RSP_OKAY
            # FLUSH_DISKCACHE: flush what has completed, then the optional write.
            # WRITE_BARRIER: everything before has completed (we are synchronous):
            # flush, then the optional write, then flush again (FUA semantics).
            storage.flush()
            if segs:
                storage.writev(sector * 512, iovs)
                self._unmap(temps)
                self.dev.stats.sectors[kind] += nsect
                if kind == K_BARRIER:
                    storage.flush()
            return RSP_OKAY
        except StorageError as e:
            if e.errno == errno.EOPNOTSUPP and kind == K_DISCARD:
                self.dev.stats.unsupported += 1
                return blkif.RSP_EOPNOTSUPP
            self._unmap(temps)
            self.dev.log_io_error(kind, sector * 512, e)
            if kind != K_DISCARD:
                self.dev.flush_failed(e)
            return RSP_ERROR
        except Exception as e:                 # noqa: BLE001 - answered as an I/O error
            self._unmap(temps)
            self.dev.log_io_error(kind, sector * 512, e)
            if kind != K_DISCARD:
                self.dev.flush_failed(e)
            return RSP_ERROR

    def _charge(self, cost):
        """Take `cost` tokens (see FLOOD_RATE); True if the ring is now throttled."""
        now = time.monotonic()
        t = min(FLOOD_BURST, self.tokens + (now - self.tokens_t) * FLOOD_RATE) - cost
        self.tokens = min(FLOOD_BURST, t)
        self.tokens_t = now
        if self.tokens >= 0:
            return False
        self.throttled_until = now + THROTTLE_PAUSE
        self.tokens = 0.0
        stats = self.dev.stats
        if stats.throttled % 100 == 0:
            log.warning("%s: queue %d: a flood of bad requests or spurious events "
                        "(%d bad, %d spurious so far): served at most every %d ms",
                        self.dev.name, self.index, self.dev.bad_logged,
                        stats.spurious_events, THROTTLE_PAUSE * 1000)
        stats.throttled += 1
        return True

    def age(self):
        """A new 100 ms generation of use (the server's tick)."""
        self.used_prev = self.used
        self.used = set()

    def _evict(self):
        """Unmap whole persistent mappings, least recently used first, to make room for the
        grants that did not fit (plus 5% of the bound). Only between batches: nothing of
        this ring's is in flight or referenced then."""
        dev = self.dev
        pc = self.persistent
        bound = dev.max_persistent
        need = len(pc) + self.evict_wanted + bound // EVICT_EXTRA - bound
        need = max(need, len(self.pmaps) + 1 - MAX_PMAPS)
        self.evict_wanted = 0
        if need <= 0 or not self.pmaps:
            return
        used, prev = self.used, self.used_prev

        def recency(k):
            grefs = self.pgroups[k]
            if not used.isdisjoint(grefs):
                return 2, k
            return (1 if not prev.isdisjoint(grefs) else 0), k
        self.plans.clear()                       # their buffers may point into a victim
        self.plan_iovs = 0
        freed = 0
        server = dev.server
        for k in sorted(self.pmaps, key=recency):
            if freed >= need:
                break
            grefs = self.pgroups.pop(k)
            for g in grefs:
                pc.pop(g).release()
                self.where.pop(g, None)
                self.paddr.pop(g, None)
            self.pbases.pop(k, None)
            self.pmaps.pop(k).unmap()
            server.persistent_maps -= 1
            freed += len(grefs)
        dev.stats.persistent_evicted += freed
        dev.stats.persistent_grants = len(pc)

    @staticmethod
    def _unmap(temps):
        while temps:
            temps.pop().unmap()

    # -- teardown ---------------------------------------------------------------------------
    def close(self):
        """Unmap persistent grants and the ring; unbind the port. Idempotent."""
        self.dead = True
        self.plans.clear()
        self.plan_iovs = 0
        for v in self.persistent.values():
            v.release()
        self.persistent.clear()
        self.where.clear()
        self.paddr.clear()
        self.pbases = {}
        self.pgroups = {}
        self.dev.server.persistent_maps -= len(self.pmaps)
        for m in self.pmaps.values():
            m.unmap()
        self.pmaps = {}
        if self.ring is not None and self.ring.buf is not None:
            self.ring.release()
        if self.mapping is not None:
            self.mapping.unmap()
            self.mapping = None
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        if self.port is not None:
            try:
                self.dev.server.evtchn.unbind(self.port)
            finally:
                self.dev.server.ports.pop(self.port, None)
                self.port = None
