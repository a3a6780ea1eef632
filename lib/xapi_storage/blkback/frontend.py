"""A test frontend that behaves like Linux xen-blkfront (spec §6), through the Xen interface.

    fe = Frontend(guest_xen, devid)          # guest_xen: a Xen acting as the guest domain
    fe.connect()                             # waits for backend InitWait, publishes rings,
                                             # waits for Connected, reads the disk properties
    fe.write(sector, data); fe.read(sector, nsectors) -> bytes
    fe.flush(); fe.discard(sector, nsectors); fe.barrier(sector, data)
    fe.close()                               # Closing -> Closed, like a driver unbind

What it does as blkfront does: it does nothing until the backend is in InitWait; it takes
min(own, backend) ring pages and queues; writes every ring key in one transaction, then
state 3; on Connected reads sectors/info/sector-size/features, sets up indirect (up to
`max_indirect` segments, 32 like blkfront's default) and a persistent grant pool (LIFO) when
both sides offer it; writes state 4. Every response is checked as modern blkfront checks it:
the id must be one we have pending, the operation must be the request's (the inner op for
indirect), the ring may not hold more responses than slots. Without persistent grants each
request's pages are granted for it and revoked after its response; a grant the backend still
maps at that point is an error ("backed has not unmapped grant").

A violation raises FrontendError, and the frontend is then disabled, as blkfront disables the
disk. Lower-level methods (`submit`, `reap`, `push_raw`, `set_req_prod`) exist for the
benchmark and for the hostile-frontend tests.
"""

import errno
import select
import struct
import time

from . import blkif
from .blkif import (ABI_X86_32, ABI_X86_64, OP_DISCARD, OP_FLUSH_DISKCACHE,
                    OP_READ, OP_WRITE, OP_WRITE_BARRIER, SEGMENT)
from .ring import M32, FrontRing
from .server import XenStore

PAGE = 4096


class FrontendError(Exception):
    """The backend broke the protocol (or timed out); the disk is disabled."""


class IOError_(Exception):
    """A request was answered with an error status."""

    def __init__(self, op, status, rid):
        super().__init__(f"backend answered {blkif.OP_NAMES.get(op, op)} request {rid} "
                         f"with status {status}")
        self.op, self.status, self.id = op, status, rid


class _Pool:
    """Persistent grants: pages granted once, reused LIFO."""

    def __init__(self, alloc, be_domid):
        self.alloc = alloc
        self.be_domid = be_domid
        self.free = []                  # (ref, memoryview page)
        self.allocations = []

    def get(self, n):
        while len(self.free) < n:
            ga = self.alloc.grant(self.be_domid, 64, writable=True)
            self.allocations.append(ga)
            for i, r in enumerate(ga.refs):
                self.free.append((r, ga.buffer[i * PAGE:(i + 1) * PAGE]))
        out = self.free[-n:]
        del self.free[-n:]
        return out

    def put(self, pages):
        self.free.extend(reversed(pages))

    def close(self):
        for p in self.free:
            p[1].release()
        self.free = []
        errs = []
        for ga in self.allocations:
            try:
                ga.revoke()
            except OSError as e:
                errs.append(e)
        self.allocations = []
        if errs:
            raise FrontendError(f"backend still maps persistent grants at close: {errs[0]}")


class _Queue:
    def __init__(self, index, ring_alloc, ring, port):
        self.index = index
        self.ring_alloc = ring_alloc
        self.ring = ring
        self.port = port
        self.pending = {}               # id -> (op, pages, temp grants, indirect pages, done)
        self.next_id = 0


class Frontend:
    def __init__(self, xen, devid, *, max_queues=4, max_ring_page_order=0, persistent=True,
                 max_indirect=32, protocol=blkif.PROTO_X86_64, timeout=10.0, ring_start=0):
        self.xen = xen
        self.devid = devid
        self.own_max_queues = max_queues
        self.own_max_order = max_ring_page_order
        self.want_persistent = persistent
        self.own_max_indirect = max_indirect
        self.protocol = protocol
        self.abi = ABI_X86_32 if protocol == blkif.PROTO_X86_32 else ABI_X86_64
        self.timeout = timeout
        self.ring_start = ring_start & M32      # first ring index (to test the u32 wrap)
        self.fe_path = f"/local/domain/{xen.domid}/device/vbd/{devid}"
        self.xs = XenStore(xen.xenstore_path)
        self.be_path = self.xs.read(f"{self.fe_path}/backend")
        be_id = self.xs.read(f"{self.fe_path}/backend-id")
        if self.be_path is None or be_id is None:
            raise FrontendError(f"no vbd {devid} in {self.fe_path}")
        self.be_domid = int(be_id)
        self.evtchn = xen.event_channels()
        self.alloc = xen.grant_allocator()
        self.queues = []
        self.pool = None
        self.disabled = None
        self.sectors = 0
        self.info = 0
        self.sector_size = 512
        self.features = {}
        self.persistent = False
        self.max_indirect = 0
        self.flush_op = None

    # -- handshake --------------------------------------------------------------------------
    def _wait_be_state(self, states, timeout=None):
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            s = self.xs.read(f"{self.be_path}/state")
            if s is not None and s.isdigit() and int(s) in states:
                return int(s)
            if s is None:                     # the backend directory is gone
                if 6 in states:
                    return 6
                raise FrontendError(f"backend {self.be_path} vanished")
            if s in ("5", "6") and not {5, 6} & set(states):
                raise FrontendError(f"backend went to state {s} at {self.be_path}")
            if time.monotonic() > deadline:
                raise FrontendError(f"timed out waiting for backend state in {states} "
                                    f"(it is {s}) at {self.be_path}")
            time.sleep(0.005)

    def connect(self):
        xs = self.xs
        self._wait_be_state((2,))                      # blkfront waits for InitWait
        be = self.be_path
        be_order = int(xs.read(f"{be}/max-ring-page-order", "0"))
        be_queues = int(xs.read(f"{be}/multi-queue-max-queues", "1"))
        order = min(self.own_max_order, be_order)
        nq = max(1, min(self.own_max_queues, be_queues))
        for i in range(nq):
            ga = self.alloc.grant(self.be_domid, 1 << order, writable=True)
            ring = FrontRing(ga.buffer, self.abi.entry_size, init=True)
            if self.ring_start:
                st = self.ring_start
                struct.pack_into("<IIII", ring.buf, 0, st, (st + 1) & M32, st, (st + 1) & M32)
                ring.req_prod_pvt = ring.rsp_cons = st
            port = self.evtchn.alloc_unbound(self.be_domid)
            self.queues.append(_Queue(i, ga, ring, port))
        fe = self.fe_path

        def tx():
            for q in self.queues:
                d = fe if nq == 1 else f"{fe}/queue-{q.index}"
                if order == 0:
                    xs.write(f"{d}/ring-ref", q.ring_alloc.refs[0])
                else:
                    for k, r in enumerate(q.ring_alloc.refs):
                        xs.write(f"{d}/ring-ref{k}", r)
                xs.write(f"{d}/event-channel", q.port)
            if order:
                xs.write(f"{fe}/ring-page-order", order)
            if nq > 1:
                xs.write(f"{fe}/multi-queue-num-queues", nq)
            xs.write(f"{fe}/protocol", self.protocol)
            xs.write(f"{fe}/feature-persistent", int(self.want_persistent))
            xs.write(f"{fe}/state", 3)
        xs.transaction(tx)
        self._wait_be_state((4,))
        self._read_properties()
        xs.write(f"{fe}/state", 4)
        return self

    def _read_properties(self):
        xs = self.xs
        be = self.be_path
        vals = [xs.read(f"{be}/{k}") for k in ("sectors", "info", "sector-size")]
        if None in vals:
            raise FrontendError("reading backend fields at " + be)
        self.sectors, self.info, self.sector_size = (int(v) for v in vals)
        for k in ("feature-flush-cache", "feature-barrier", "feature-discard",
                  "feature-persistent", "feature-max-indirect-segments",
                  "discard-granularity", "discard-alignment"):
            v = xs.read(f"{be}/{k}")
            self.features[k] = int(v) if v is not None and v.isdigit() else 0
        self.persistent = self.want_persistent and self.features["feature-persistent"] == 1
        mi = min(self.features["feature-max-indirect-segments"], self.own_max_indirect)
        self.max_indirect = mi if mi > blkif.MAX_SEGMENTS_PER_REQUEST else 0
        if self.features["feature-flush-cache"]:
            self.flush_op = OP_FLUSH_DISKCACHE
        elif self.features["feature-barrier"]:
            self.flush_op = OP_WRITE_BARRIER
        if self.persistent and self.pool is None:
            self.pool = _Pool(self.alloc, self.be_domid)

    def refresh_size(self):
        """Re-read `sectors` (blkfront does on a backend state watch while connected)."""
        self.sectors = int(self.xs.read(f"{self.be_path}/sectors"))
        return self.sectors

    @property
    def readonly(self):
        return bool(self.info & blkif.VDISK_READONLY)

    @property
    def max_segments(self):
        return self.max_indirect or blkif.MAX_SEGMENTS_PER_REQUEST

    # -- requests ---------------------------------------------------------------------------
    def _check(self):
        if self.disabled:
            raise FrontendError(f"disk disabled: {self.disabled}")

    def _disable(self, why):
        self.disabled = why
        raise FrontendError(why)

    def _pages(self, q, n, writable):
        """n data pages for a request: from the persistent pool, or granted for it."""
        if self.persistent:
            return self.pool.get(n), None
        ga = self.alloc.grant(self.be_domid, n, writable=writable)
        return [(r, ga.buffer[i * PAGE:(i + 1) * PAGE]) for i, r in enumerate(ga.refs)], ga

    def submit(self, op, sector, data=None, nsectors=0, queue=0, flag=0):
        """Put one request on ring `queue` (not yet pushed). Returns its id.

        op READ: nsectors to read. WRITE / BARRIER / FLUSH: `data` (bytes, may be empty for
        a flush or barrier). DISCARD: nsectors. Data is split into 4 KiB segments; more than
        11 go indirect."""
        self._check()
        q = self.queues[queue]
        ring = q.ring
        if ring.free_slots() == 0:
            raise FrontendError("ring full")
        rid = q.next_id
        q.next_id = (q.next_id + 1) & 0xFFFFFFFFFFFFFFFF
        off = ring.slot_offset(ring.req_prod_pvt)
        buf = ring.buf
        abi = self.abi
        if op == OP_DISCARD:
            blkif.pack_discard(abi, buf, off, rid, sector, nsectors, flag)
            q.pending[rid] = (op, [], None, None, nsectors)
        else:
            if op == OP_READ:
                nbytes = nsectors * 512
            else:
                nbytes = len(data) if data else 0
            npages = (nbytes + PAGE - 1) // PAGE
            pages, ga = self._pages(q, npages, writable=True) if npages else ([], None)
            segs = []
            left = nbytes
            for i, (ref, page) in enumerate(pages):
                n = min(PAGE, left)
                if op != OP_READ:
                    page[:n] = data[i * PAGE:i * PAGE + n]
                segs.append((ref, 0, (n + 511) // 512 - 1))
                left -= n
            ind = None
            if len(segs) > blkif.MAX_SEGMENTS_PER_REQUEST:
                if op not in (OP_READ, OP_WRITE) or not self.max_indirect:
                    raise ValueError("request too large for a direct request")
                nind = (len(segs) + 511) // 512
                ind, ind_ga = self._pages(q, nind, writable=True)
                flat = b"".join(SEGMENT.pack(*s) for s in segs)
                for k, (_r, page) in enumerate(ind):
                    chunk = flat[k * PAGE:(k + 1) * PAGE]
                    page[:len(chunk)] = chunk
                blkif.pack_indirect(abi, buf, off, op, rid, sector, len(segs),
                                    [r for r, _p in ind])
                ind = (ind, ind_ga)
            else:
                blkif.pack_request(abi, buf, off, op, rid, sector, segs)
            q.pending[rid] = (op, pages, ga, ind, nbytes)
        ring.req_prod_pvt = (ring.req_prod_pvt + 1) & M32
        return rid

    def push(self, queue=0):
        q = self.queues[queue]
        if q.ring.push_requests_and_check_notify():
            self.evtchn.notify(q.port)

    def reap(self, queue=0):
        """Take every response off ring `queue`: {id: (status, data or None)}."""
        q = self.queues[queue]
        ring = q.ring
        abi = self.abi
        out = {}
        while True:
            rp = ring.hdr[2]
            if (rp - ring.rsp_cons) & M32 > ring.size:
                self._disable(f"illegal number of responses {(rp - ring.rsp_cons) & M32}")
            while ring.rsp_cons != rp:
                rid, op, status = abi.rsp.unpack_from(ring.buf, ring.slot_offset(ring.rsp_cons))
                ring.rsp_cons = (ring.rsp_cons + 1) & M32
                p = q.pending.pop(rid, None)
                if p is None:
                    self._disable(f"response to unknown request id {rid}")
                rop, pages, ga, ind, nbytes = p
                if op != rop:
                    self._disable(f"response has wrong operation ({op} instead of {rop})")
                data = None
                if rop == OP_READ and status == 0:
                    data = b"".join(bytes(pg) for _r, pg in pages)[:nbytes]
                self._release(pages, ga)
                if ind is not None:
                    self._release(*ind)
                out[rid] = (status, data)
            if not ring.final_check_for_responses():
                return out

    def _release(self, pages, ga):
        if ga is None:
            if pages and self.pool is not None:
                self.pool.put(pages)
            return
        for _r, p in pages:
            p.release()
        try:
            ga.revoke()
        except OSError as e:
            if e.errno == errno.EBUSY:
                self._disable(f"backed has not unmapped grant: {e}")
            raise

    def wait(self, ids, queue=0, timeout=None):
        """Wait (with a timeout) for the responses to `ids`: {id: (status, data)}."""
        want = set(ids)
        got = {}
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            got.update(self.reap(queue))
            if want <= got.keys():
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                self._disable(f"timed out waiting for {len(want - got.keys())} responses")
            select.select([self.evtchn.fileno()], [], [], min(left, 0.1))
            self.evtchn.pending()

    # -- the block-device view ---------------------------------------------------------------
    def _do(self, items, queue=0):
        """items: [(op, sector, data, nsectors)], run with as many in flight as the ring
        allows. Returns [(status, data)] in the order of `items`."""
        q = self.queues[queue]
        order = []
        results = {}
        i = 0
        while i < len(items) or len(results) < len(order):
            while i < len(items) and q.ring.free_slots():
                op, sector, data, nsect = items[i]
                order.append(self.submit(op, sector, data, nsect, queue))
                i += 1
            self.push(queue)
            results.update(self._wait_some(queue))
        return [results[r] for r in order]

    def _wait_some(self, queue, timeout=None):
        """Wait (with a timeout) until at least one response arrives; return them."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            got = self.reap(queue)
            if got:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                self._disable(f"timed out waiting for {len(self.queues[queue].pending)} "
                              "responses")
            select.select([self.evtchn.fileno()], [], [], min(left, 0.1))
            self.evtchn.pending()

    def _split(self, sector, nsect):
        step = self.max_segments * (PAGE // 512)
        while nsect > 0:
            n = min(step, nsect)
            yield sector, n
            sector += n
            nsect -= n

    def read(self, sector, nsectors, queue=0):
        items = [(OP_READ, s, None, n) for s, n in self._split(sector, nsectors)]
        res = self._do(items, queue)
        for (op, s, _d, n), (status, _data) in zip(items, res):
            if status:
                raise IOError_(op, status, s)
        return b"".join(d for _s, d in res)

    def write(self, sector, data, queue=0):
        if len(data) % 512:
            raise ValueError("data must be whole sectors")
        items = [(OP_WRITE, s, data[(s - sector) * 512:(s - sector + n) * 512], 0)
                 for s, n in self._split(sector, len(data) // 512)]
        for (op, s, _d, _n), (status, _x) in zip(items, self._do(items, queue)):
            if status:
                raise IOError_(op, status, s)

    def _one(self, op, sector, data=None, nsect=0, queue=0):
        status, _ = self._do([(op, sector, data, nsect)], queue)[0]
        if status:
            raise IOError_(op, status, sector)

    def flush(self, queue=0):
        if self.flush_op is None:
            return
        self._one(self.flush_op, 0, b"", 0, queue)

    def barrier(self, sector, data=b"", queue=0):
        self._one(OP_WRITE_BARRIER, sector, data, 0, queue)

    def discard(self, sector, nsectors, queue=0):
        self._one(OP_DISCARD, sector, None, nsectors, queue)

    # -- hostile helpers ---------------------------------------------------------------------
    def push_raw(self, entry, queue=0):
        """Put raw bytes in the next slot and publish it (for hostile tests)."""
        q = self.queues[queue]
        ring = q.ring
        off = ring.slot_offset(ring.req_prod_pvt)
        ring.buf[off:off + len(entry)] = entry
        ring.req_prod_pvt = (ring.req_prod_pvt + 1) & M32
        self.push(queue)

    def set_req_prod(self, value, queue=0):
        q = self.queues[queue]
        q.ring.hdr[0] = value & M32
        self.evtchn.notify(q.port)

    def raw_responses(self, n, queue=0, timeout=None):
        """Wait for n responses and return them raw: [(id, op, status)] (no id checks)."""
        q = self.queues[queue]
        ring = q.ring
        out = []
        deadline = time.monotonic() + (timeout or self.timeout)
        while len(out) < n:
            while ring.rsp_cons != ring.hdr[2] and len(out) < n:
                out.append(self.abi.rsp.unpack_from(ring.buf, ring.slot_offset(ring.rsp_cons)))
                ring.rsp_cons = (ring.rsp_cons + 1) & M32
            if len(out) >= n:
                break
            ring.final_check_for_responses()
            left = deadline - time.monotonic()
            if left <= 0:
                raise FrontendError(f"timed out: {len(out)} of {n} raw responses")
            select.select([self.evtchn.fileno()], [], [], min(left, 0.1))
            self.evtchn.pending()
        return out

    # -- teardown ----------------------------------------------------------------------------
    def close(self, timeout=None):
        """Closing (5), wait for the backend to close, then Closed (6); free everything."""
        xs = self.xs
        try:
            if xs.read(f"{self.fe_path}/state") is not None:
                xs.write(f"{self.fe_path}/state", 5)
                try:
                    self._wait_be_state((5, 6), timeout)
                except FrontendError:
                    pass
                xs.write(f"{self.fe_path}/state", 6)
                try:
                    self._wait_be_state((6,), timeout)
                except FrontendError:
                    pass
        finally:
            self._free()

    def _free(self):
        errs = []
        for q in self.queues:
            for rid, (op, pages, ga, ind, _n) in list(q.pending.items()):
                for pg_list, g in ((pages, ga),) + ((ind,) if ind else ()):
                    if g is not None:
                        try:
                            g.revoke()
                        except OSError as e:
                            errs.append(e)
            q.pending.clear()
            try:
                self.evtchn.unbind(q.port)
            except OSError:
                pass
            q.ring.release()
            try:
                q.ring_alloc.revoke()
            except OSError as e:
                errs.append(e)
        self.queues = []
        if self.pool is not None:
            try:
                self.pool.close()
            except FrontendError as e:
                errs.append(e)
            self.pool = None
        self.evtchn.close()
        self.alloc.close()
        self.xs.close()
        if errs:
            raise FrontendError(f"backend still maps our grants after close: {errs[0]}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
