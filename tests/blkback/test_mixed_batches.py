"""A hostile guest mixes good and bad requests in one batch. Against a model of the disk:
every request gets exactly the status an oracle computes from the request alone (OKAY, ERROR
or EOPNOTSUPP), every good read returns the model's bytes, every good write lands, a bad
request moves no byte, and nothing outside the disk is read or written (the file keeps its
size). Direct and indirect requests; an indirect one sometimes repeats the segment list of an
earlier good one at a new sector (the server caches a plan per segment list on persistent
grants: the range must be checked again). Run on all three request paths: the C batch
(single-page requests on persistent grants of a plain raw file), the persistent fast path in
Python, and per-request mapping. A mutation of the C path's range check or of the plan cache's
made this test fail."""

import random

import pytest

from xapi_storage import compat
from xapi_storage.blkback import blkif, serve
from xapi_storage.blkback.blkif import (ABI_X86_64, OP_FLUSH_DISKCACHE, OP_INDIRECT, OP_READ,
                                        OP_WRITE, SEGMENT)

from .test_server import spec

SECTORS = (16 << 20) // 512
PAGE = 4096
NPAGES = 256
OKAY, ERROR, EOPNOTSUPP = 0, -1, -2
BOGUS_REF = 999_999
OP_RESERVED = blkif.OP_RESERVED_1


def _segments(rnd, refs, free_pages, n):
    """n segments on distinct free pages, some of them bad: (segs, used, bad)."""
    segs, used, bad = [], [], False
    for _ in range(n):
        f, last = rnd.choice([(0, 7)] * 6 + [(rnd.randrange(8), 7), (0, rnd.randrange(8))]
                             + [(rnd.randrange(8), rnd.randrange(8))])
        if rnd.random() < 0.03:
            last = rnd.choice([8, 9, 255])
        if f > last or last > 7:
            bad = True
        if rnd.random() < 0.03 or not free_pages:
            ref, page = BOGUS_REF, None
            bad = True
        else:
            i = free_pages.pop()
            ref, page = refs[i], i
        segs.append((ref, f, last))
        used.append((page, f, last))
    return segs, used, bad


def _take(free_pages, wanted):
    """Take the pages `wanted` from the free list if all are free."""
    if any(i is None or i not in free_pages for i in wanted):
        return False
    for i in wanted:
        free_pages.remove(i)
    return True


def _sector(rnd, nsect, bad, busy, edge_p=0.05):
    """A start sector for nsect sectors: mostly inside the disk and clear of the batch's other
    good requests, sometimes past the end or wrapping. Returns (sector, bad)."""
    edge = rnd.random() < edge_p
    for _ in range(50):
        if edge:
            sector = rnd.choice([SECTORS - rnd.randrange(1, 16), 2 ** 64 - rnd.randrange(1, 16),
                                 SECTORS, 2 ** 63])
        else:
            sector = rnd.randrange(SECTORS - max(nsect, 1) + 1)
        out = sector + nsect > SECTORS
        # good requests of one batch never overlap (requests in flight are unordered)
        if out or bad or not any(sector < e and s < sector + nsect for s, e in busy):
            break
    else:
        sector, out = 2 ** 64 - 1, True
    bad = bad or out
    if not bad:
        busy.append((sector, sector + nsect))
    return sector, bad


def _request(rnd, refs, pages, free_pages, busy, reuse):
    """One request, good or bad:
    (entry, expected status, op answered, data op, sector, [(page, first, last)])."""
    kind = rnd.random()
    if kind < 0.05:
        op = rnd.choice([OP_RESERVED, 7, 99, 255])
        return _entry(op, rnd.randrange(SECTORS), [(refs[0], 0, 7)]), EOPNOTSUPP, op, op, 0, []
    if kind < 0.10:
        op = OP_FLUSH_DISKCACHE
        return _entry(op, 0, []), OKAY, op, op, 0, []
    if kind < 0.30:
        return _indirect_request(rnd, refs, pages, free_pages, busy, reuse)
    op = rnd.choice([OP_READ, OP_WRITE])
    nseg = rnd.choice([1, 1, 1, 2, 3, 5, 8, 11] + [0, 12] * (rnd.random() < 0.1))
    segs, used, bad = _segments(rnd, refs, free_pages, min(nseg, 11))
    bad = bad or nseg == 0 or nseg > 11
    nsect = sum(max(0, min(last, 7) - f + 1) for _r, f, last in segs)
    sector, bad = _sector(rnd, nsect, bad, busy)
    entry = _entry(op, sector % 2 ** 64, segs, nseg=nseg)
    return entry, ERROR if bad else OKAY, op, op, sector, used


def _indirect_request(rnd, refs, pages, free_pages, busy, reuse):
    """An indirect request: its segment list on a granted page. Sometimes the very segment
    list of an earlier good one (the server caches a plan per segment list, on persistent
    grants) at a new sector, which must be range-checked again."""
    iop = rnd.choice([OP_READ, OP_WRITE] * 10 + [OP_FLUSH_DISKCACHE])
    old = rnd.choice(reuse) if reuse and rnd.random() < 0.4 else None
    edge_p = 0.05
    if old is not None and _take(free_pages, [old[0]] + [u[0] for u in old[2]]):
        seg_page, segs, used = old
        nseg, bad = len(segs), False
        edge_p = 0.3
    else:
        if not free_pages:
            return _entry(OP_FLUSH_DISKCACHE, 0, []), OKAY, OP_FLUSH_DISKCACHE, None, 0, []
        seg_page = free_pages.pop()
        nseg = rnd.choice([1, 2, 8, 11, 12, 17, 32, 40] + [0, 257] * (rnd.random() < 0.1))
        segs, used, bad = _segments(rnd, refs, free_pages, min(nseg, 40))
        bad = bad or nseg == 0 or nseg > 256
        if not bad:
            reuse.append((seg_page, segs, used))
    pages[seg_page][:] = bytes(PAGE)
    for k, sg in enumerate(segs):
        SEGMENT.pack_into(pages[seg_page], k * SEGMENT.size, *sg)
    seg_ref = refs[seg_page]
    if rnd.random() < 0.03:
        seg_ref, bad = BOGUS_REF, True
    nsect = sum(max(0, min(last, 7) - f + 1) for _r, f, last in segs)
    sector, bad = _sector(rnd, nsect, bad or iop not in (OP_READ, OP_WRITE), busy, edge_p)
    buf = bytearray(112)
    blkif.pack_indirect(ABI_X86_64, buf, 0, iop, 0, sector % 2 ** 64, nseg, [seg_ref])
    answered = iop if iop in (OP_READ, OP_WRITE) else OP_INDIRECT
    return buf, ERROR if bad else OKAY, answered, iop, sector, used


def _entry(op, sector, segs, nseg=None):
    buf = bytearray(112)
    blkif.pack_request(ABI_X86_64, buf, 0, op, 0, sector, segs[:11])
    if nseg is not None:
        buf[1] = nseg
    return buf


def _run(fe, pages, refs, model, rnd, batches):
    q = fe.queues[0]
    rid = 1000
    reuse = []                     # segment lists of good indirect requests
    for _ in range(batches):
        free_pages = list(range(NPAGES))
        rnd.shuffle(free_pages)
        busy = []
        reqs = {}
        for _ in range(rnd.randrange(1, 24)):
            entry, status, op, dop, sector, used = _request(rnd, refs, pages, free_pages,
                                                            busy, reuse)
            rid += 1
            entry[8:16] = rid.to_bytes(8, "little")           # id (x86_64 layout)
            if dop == OP_WRITE:
                for page, _f, _l in used:
                    if page is not None:
                        pages[page][:] = compat.randbytes(rnd, PAGE)
            reqs[rid] = (status, op, dop, sector, used, bytes(entry))
            off = q.ring.slot_offset(q.ring.req_prod_pvt)
            q.ring.buf[off:off + 112] = entry
            q.ring.req_prod_pvt = (q.ring.req_prod_pvt + 1) & 0xFFFFFFFF
        fe.push()
        got = {r: (op, st) for r, op, st in fe.raw_responses(len(reqs))}
        assert sorted(got) == sorted(reqs), "one response per request, by id"
        for r, (status, op, dop, sector, used, entry) in reqs.items():
            assert got[r] == (op, status), (f"request {entry.hex()}: answered {got[r]}, "
                                            f"expected {(op, status)}")
            if status != OKAY or dop not in (OP_READ, OP_WRITE):
                continue
            off = sector * 512
            for page, f, last in used:
                n = (last - f + 1) * 512
                if dop == OP_READ:
                    assert bytes(pages[page][f * 512:f * 512 + n]) == model[off:off + n]
                else:
                    model[off:off + n] = pages[page][f * 512:f * 512 + n]
                off += n


@pytest.mark.parametrize("path", ["c-batch", "persistent", "mapped"])
@pytest.mark.parametrize("seed", range(3))
def test_mixed_good_and_bad_requests_in_one_batch(simxen_guest, disk, path, seed):
    sim, g = simxen_guest
    model = bytearray(disk.read_bytes())
    rnd = random.Random(f"{path}-{seed}")
    backend = "raw"
    if path == "persistent":
        from xapi_storage.blkback.backends.raw import RawFile

        class NoC(RawFile):          # its own readv/writev: the C batch is not used
            def readv(self, offset, iovs, length=None):
                return super().readv(offset, iovs, length)
        backend = NoC(str(disk))
    with serve(spec(sim), g, None if path == "persistent" else str(disk),
               backend=backend) as s:
        fe = s.frontend(persistent=path != "mapped")
        try:
            if fe.pool is not None:
                got = fe.pool.get(NPAGES)  # granted once; fe.close() revokes them
                refs, pages = [r for r, _p in got], [p for _r, p in got]
                _run(fe, pages, refs, model, rnd, batches=12)
                fe.pool.put(got)
            else:                          # the backend maps and unmaps per request
                ga = fe.alloc.grant(fe.be_domid, NPAGES, writable=True)
                pages = [ga.buffer[i * PAGE:(i + 1) * PAGE] for i in range(NPAGES)]
                _run(fe, pages, list(ga.refs), model, rnd, batches=12)
                for p in pages:
                    p.release()
                ga.revoke()                # fails if the backend still maps a page
            stats = s.stats()
            assert stats["errors"] > 0 and stats["unsupported"] > 0
            assert stats["indirect_requests"] > 0, stats
            if path == "c-batch":
                assert stats["c_batched_requests"] > 0, stats
            else:
                assert stats["c_batched_requests"] == 0, stats
            assert stats["persistent_negotiated"] == (path != "mapped")
        finally:
            fe.close()
        assert s.alive
    data = disk.read_bytes()
    assert len(data) == len(model), "the file changed size: I/O outside the disk"
    assert data == bytes(model)
