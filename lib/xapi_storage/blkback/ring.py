"""Shared-ring index arithmetic (Xen io/ring.h) over a memoryview. No I/O, no Xen.

The ring is `buf`: the 64-byte `sring` header (req_prod, req_event, rsp_prod, rsp_event as
little-endian u32) followed by RING_SIZE entries. All indices are free-running u32 counters;
every difference below is taken modulo 2**32, exactly as the C macros do with unsigned ints.

`BackRing` is the backend's view (consume requests, produce responses), `FrontRing` the
frontend's (produce requests, consume responses). Both take the full barrier from `fence`,
a real `__atomic_thread_fence(__ATOMIC_SEQ_CST)`, at the two points the protocol needs it.
"""

import sys

from . import fence
from .blkif import ring_size

M32 = 0xFFFFFFFF

if sys.byteorder != "little":          # the ring is little-endian; we read it natively
    raise ImportError("pyblkback needs a little-endian host")


class RingError(Exception):
    """The frontend broke the ring protocol (e.g. producer index too far ahead)."""


class _Ring:
    def __init__(self, buf, entry_size):
        if not isinstance(buf, memoryview):
            buf = memoryview(buf)
        self.buf = buf
        self.entry_size = entry_size
        self.size = ring_size(len(buf), entry_size)
        self.mask = self.size - 1
        # hdr[0] req_prod, hdr[1] req_event, hdr[2] rsp_prod, hdr[3] rsp_event:
        # each index is one aligned 4-byte load or store into the shared page.
        self.hdr = buf[:16].cast("I")

    def slot_offset(self, idx):
        """Byte offset in `buf` of the entry for index `idx`."""
        return 64 + (idx & self.mask) * self.entry_size

    def release(self):
        """Drop our views into the shared memory (so the mapping can be unmapped)."""
        self.hdr.release()
        self.buf = None


class BackRing(_Ring):
    """The backend end: BACK_RING_ATTACH, final check, push responses + check notify."""

    def __init__(self, buf, entry_size):
        super().__init__(buf, entry_size)
        hdr = self.hdr
        rsp_prod = hdr[2]
        req_prod = hdr[0]
        self.req_cons = rsp_prod
        self.rsp_prod_pvt = rsp_prod
        if (req_prod - rsp_prod) & M32 > self.size:
            self.release()
            raise RingError(f"frontend error: ring attach with req_prod {req_prod} more than "
                            f"{self.size} ahead of rsp_prod {rsp_prod}")

    def unconsumed(self, req_prod=None):
        """RING_HAS_UNCONSUMED_REQUESTS."""
        if req_prod is None:
            req_prod = self.hdr[0]
        a = (req_prod - self.req_cons) & M32
        b = self.size - ((self.req_cons - self.rsp_prod_pvt) & M32)
        return a if a < b else b

    def prod_overflow(self, req_prod):
        """RING_REQUEST_PROD_OVERFLOW: the frontend published more than a ring's worth."""
        return (req_prod - self.rsp_prod_pvt) & M32 > self.size

    def cons_overflow(self, req_cons=None):
        """RING_REQUEST_CONS_OVERFLOW: the next slot still owes a response."""
        if req_cons is None:
            req_cons = self.req_cons
        return (req_cons - self.rsp_prod_pvt) & M32 >= self.size

    def final_check_for_requests(self):
        """RING_FINAL_CHECK_FOR_REQUESTS: True if there is work (go round again); else the
        frontend has been asked to notify us on its next request, and we may sleep."""
        if self.unconsumed():
            return True
        self.hdr[1] = (self.req_cons + 1) & M32
        fence.mb()                  # req_event store before the req_prod re-read
        return self.unconsumed() != 0

    def push_responses_and_check_notify(self):
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish rsp_prod_pvt; True if the frontend
        wants an event."""
        hdr = self.hdr
        old = hdr[2]
        new = self.rsp_prod_pvt
        # write barrier: x86 is TSO and each store below is a separate C call, so the
        # response bodies written earlier are visible first; fence.wmb() is a compiler
        # barrier here and a real one on weakly ordered hosts.
        fence.wmb()
        hdr[2] = new
        fence.mb()                  # rsp_prod store before the rsp_event load
        return ((new - hdr[3]) & M32) < ((new - old) & M32)


class FrontRing(_Ring):
    """The frontend end: SHARED_RING_INIT + FRONT_RING_INIT, push requests, final check."""

    def __init__(self, buf, entry_size, init=True):
        super().__init__(buf, entry_size)
        if init:
            buf[:64] = bytes(64)
            self.hdr[1] = 1         # req_event
            self.hdr[3] = 1         # rsp_event
        self.req_prod_pvt = self.hdr[0]
        self.rsp_cons = self.hdr[2]

    def free_slots(self):
        """RING_FREE_REQUESTS."""
        return self.size - ((self.req_prod_pvt - self.rsp_cons) & M32)

    def unconsumed_responses(self):
        return (self.hdr[2] - self.rsp_cons) & M32

    def push_requests_and_check_notify(self):
        hdr = self.hdr
        old = hdr[0]
        new = self.req_prod_pvt
        fence.wmb()
        hdr[0] = new
        fence.mb()
        return ((new - hdr[1]) & M32) < ((new - old) & M32)

    def final_check_for_responses(self):
        if self.unconsumed_responses():
            return True
        self.hdr[3] = (self.rsp_cons + 1) & M32
        fence.mb()
        return self.unconsumed_responses() != 0
