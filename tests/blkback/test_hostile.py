"""A hostile frontend: the server answers with errors or closes that one device; it never
crashes, hangs, or does I/O outside the disk."""

import os
import random
import time

import pytest

from xapi_storage import compat
from xapi_storage.blkback import blkif, serve
from xapi_storage.blkback.backends.raw import RawFile
from xapi_storage.blkback.blkif import ABI_X86_64, OP_INDIRECT, OP_READ, OP_WRITE, SEGMENT
from xapi_storage.blkback.server import XenStore

from .test_server import spec, wait_for


class Bounded(RawFile):
    """A real raw file that fails the test if asked for I/O outside the disk."""

    def __init__(self, path):
        super().__init__(path)
        self.calls = 0
        self.violations = []         # the server turns exceptions into error responses

    def _guard(self, offset, iovs):
        n = sum(len(b) for b in iovs)
        if not (0 <= offset and offset + n <= self.size()):
            self.violations.append((offset, n))
            raise AssertionError(f"I/O outside the disk: {offset}+{n}")
        self.calls += 1

    def readv(self, offset, iovs, length=None):
        self._guard(offset, iovs)
        super().readv(offset, iovs, length)

    def writev(self, offset, iovs, length=None):
        self._guard(offset, iovs)
        super().writev(offset, iovs, length)


@pytest.fixture
def served(simxen_guest, disk):
    sim, g = simxen_guest
    store = Bounded(str(disk))
    with serve(spec(sim), g, None, backend=store) as s:
        s.store = store
        s.sim = sim
        yield s
        assert s.alive, "the server thread died"
        assert not store.violations, f"I/O outside the disk: {store.violations}"


GOOD = -1          # placeholder: replaced by a page the frontend really granted


def entry(**kw):
    buf = bytearray(112)
    blkif.pack_request(ABI_X86_64, buf, 0, kw.get("op", OP_READ), kw.get("id", 1),
                       kw.get("sector", 0), kw.get("segs", []))
    if "nseg" in kw:
        buf[1] = kw["nseg"]
    return bytes(buf)


def test_garbage_requests_get_error_responses(served):
    with served.frontend() as fe:
        rnd = random.Random(7)
        before = served.store.calls
        for batch in range(5):
            n = rnd.randrange(1, 32)
            for _ in range(n):
                raw = bytearray(compat.randbytes(rnd, 112))
                raw[0] = rnd.choice([0, 1, 2, 3, 4, 5, 6, 7, 255])
                q = fe.queues[0]
                off = q.ring.slot_offset(q.ring.req_prod_pvt)
                q.ring.buf[off:off + 112] = raw
                q.ring.req_prod_pvt = (q.ring.req_prod_pvt + 1) & 0xFFFFFFFF
            fe.push()
            rsps = fe.raw_responses(n)
            assert len(rsps) == n
            assert all(st in (0, -1, -2) for _id, _op, st in rsps)
        assert served.store.calls == before            # nothing reached the disk
        # and the device still works for honest requests
        fe.write(0, b"ok" * 2048)
        assert fe.read(0, 8) == b"ok" * 2048


@pytest.mark.parametrize("raw,status", [
    (entry(op=4, segs=[(1, 0, 7)]), -2),                  # reserved op
    (entry(op=99, segs=[(1, 0, 7)]), -2),                 # unknown op
    (entry(nseg=0), -1),                                  # read without segments
    (entry(nseg=12, segs=[(1, 0, 7)] * 11), -1),          # too many segments
    (entry(segs=[(1, 7, 0)]), -1),                        # first > last
    (entry(segs=[(1, 0, 9)]), -1),                        # last beyond the page
    (dict(sector=2**64 - 1, segs=[(GOOD, 0, 7)]), -1),    # sector range wraps
    (dict(sector=(16 << 20) // 512 - 4, segs=[(GOOD, 0, 7)]), -1),  # past the end
    (dict(op=OP_WRITE, sector=(16 << 20) // 512 - 1, segs=[(GOOD, 0, 1)]), -1),
    (dict(op=OP_WRITE, sector=(16 << 20) // 512 - 2, segs=[(GOOD, 0, 0)] * 3), -1),
    (entry(segs=[(999999, 0, 7)]), -1),                   # a grant ref not granted
    (entry(segs=[(2**32 - 1, 0, 7)]), -1),                # a grant ref out of the table
])
def test_bad_requests(served, raw, status):
    with served.frontend(persistent=False) as fe:
        ga = fe.alloc.grant(fe.be_domid, 1)
        if isinstance(raw, dict):                          # needs a real grant: only the
            raw = entry(**dict(raw, segs=[(ga.refs[0] if g == GOOD else g, f, l)
                                          for g, f, l in raw["segs"]]))  # range is wrong
        fe.push_raw(raw)
        (rid, op, st), = fe.raw_responses(1)
        assert (rid, st) == (1, status) and op == raw[0]
        ga.revoke()
        fe.write(8, b"y" * 4096)                           # still fine
    assert served.store.calls == 1


def _indirect(fe, iop, nseg, segs_bytes=None, grefs=None):
    """An indirect request whose segment page holds `segs_bytes`."""
    ga = fe.alloc.grant(fe.be_domid, 1)
    if segs_bytes is not None:
        ga.buffer[:len(segs_bytes)] = segs_bytes
    buf = bytearray(112)
    blkif.pack_indirect(ABI_X86_64, buf, 0, iop, 5, 0, nseg, grefs or list(ga.refs))
    return bytes(buf), ga


@pytest.mark.parametrize("persistent", [False, True], ids=["mapped", "persistent"])
@pytest.mark.parametrize("case", ["bad-iop", "zero-segs", "too-many", "bad-page-gref",
                                  "bad-segment", "bad-data-gref"])
def test_bad_indirect_requests(served, case, persistent):
    fe = served.frontend(persistent=persistent)
    try:
        good = fe.alloc.grant(fe.be_domid, 1)
        seg_ok = SEGMENT.pack(good.refs[0], 0, 7)
        raw, ga = {
            "bad-iop": lambda: _indirect(fe, 3, 1, seg_ok),
            "zero-segs": lambda: _indirect(fe, OP_READ, 0, seg_ok),
            "too-many": lambda: _indirect(fe, OP_READ, 257, seg_ok * 257),
            "bad-page-gref": lambda: _indirect(fe, OP_READ, 1, None, grefs=[888888]),
            "bad-segment": lambda: _indirect(fe, OP_WRITE, 2, seg_ok + SEGMENT.pack(1, 6, 2)),
            "bad-data-gref": lambda: _indirect(fe, OP_WRITE, 1, SEGMENT.pack(777777, 0, 7)),
        }[case]()
        fe.push_raw(raw)
        (rid, op, st), = fe.raw_responses(1)
        assert rid == 5 and st == -1
        assert op == (OP_INDIRECT if case == "bad-iop" else raw[1])
        if not persistent:
            ga.revoke()                                   # the backend let go of the page
            good.revoke()
        assert fe.read(0, 8)                              # still serving
    finally:
        fe.close()            # with persistence the backend keeps the pages until here
    assert served.store.calls == 1


def test_producer_far_ahead_closes_only_that_device(served):
    sim = served.sim
    xs = XenStore(sim.xenstore_path(0))
    try:
        fe = served.frontend()
        fe.write(0, b"a" * 4096)
        q = fe.queues[0]
        fe.set_req_prod(q.ring.req_prod_pvt + 100000)
        wait_for(lambda: xs.read(f"{served.be_path}/state") == "5", what="backend Closing")
        assert "bogus ring requests" in xs.read(
            f"/local/domain/0/error{served.be_path}/error", "")
        fe.close()
        # the backend answers the frontend's close on its next turn: wait for it (a loaded
        # machine or an older Python can be slower than one read right after the close)
        wait_for(lambda: xs.read(f"{served.be_path}/state") == "6", what="backend Closed")
        # a well-behaved frontend may come back and is served again
        xsg = XenStore(sim.xenstore_path(served.guest))
        xsg.write(f"{served.fe_path}/state", "1")
        xsg.close()
        wait_for(lambda: xs.read(f"{served.be_path}/state") == "2", what="InitWait")
        with served.frontend() as fe2:
            assert fe2.read(0, 8) == b"a" * 4096
    finally:
        xs.close()


def test_ring_indices_across_the_u32_wrap(served):
    with served.frontend(ring_start=2**32 - 20) as fe:
        rnd = random.Random(3)
        for i in range(30):
            data = compat.randbytes(rnd, 4096 * rnd.randrange(1, 12))
            fe.write(i * 96, data)
            assert fe.read(i * 96, len(data) // 512) == data
        assert fe.queues[0].ring.req_prod_pvt < 1000          # it did wrap


def test_unknown_protocol_fails_the_connect(served):
    sim = served.sim
    fe = served.frontend(connect=False, protocol="sparc-abi")
    with pytest.raises(Exception):
        fe.connect()
    xs = XenStore(sim.xenstore_path(0))
    wait_for(lambda: xs.read(f"{served.be_path}/state") == "5", what="Closing")
    assert "unknown protocol" in xs.read(f"/local/domain/0/error{served.be_path}/error", "")
    xs.close()
    fe.close()


class Failing(RawFile):
    """A real raw file whose reads past 1 MiB fail (EIO) and whose flush fails."""

    def readv(self, offset, iovs, length=None):
        if offset >= 1 << 20:
            raise OSError(5, "injected EIO")
        super().readv(offset, iovs, length)

    def flush(self):
        raise RuntimeError("injected flush failure")


def test_storage_errors_are_answered_and_a_failed_flush_closes_the_device(simxen_guest, disk):
    sim, g = simxen_guest
    with serve(spec(sim), g, None, backend=Failing(str(disk))) as s:
        fe = s.frontend()
        with pytest.raises(Exception, match="status -1"):
            fe.read(4096, 8)
        assert fe.read(0, 8)                                # the device still works
        with pytest.raises(Exception, match="status -1"):
            fe.flush()                                      # never a silent success
        xs = XenStore(sim.xenstore_path(0))
        wait_for(lambda: xs.read(f"{s.be_path}/state") == "5", what="backend Closing")
        assert "flush failed" in xs.read(f"/local/domain/0/error{s.be_path}/error", "")
        xs.close()
        fe.close()
        assert s.alive


def test_one_hostile_device_does_not_disturb_another(simxen_guest, disk, tmp_path):
    """Two devices on one server: the one whose frontend breaks the ring is closed, the
    other keeps serving."""
    import threading
    from xapi_storage.blkback import toolstack
    from xapi_storage.blkback.backends import open_storage
    from xapi_storage.blkback.frontend import Frontend
    from xapi_storage.blkback.server import Server
    sim, g = simxen_guest
    other = tmp_path / "b.img"
    other.write_bytes(bytes(1 << 20))
    xs = XenStore(sim.xenstore_path(0))
    server = Server(sim.xen(0))
    paths = []
    for i, img in enumerate((disk, other)):
        devid = toolstack.xvd_devid(1 + i)
        paths.append(toolstack.create_vbd(xs, g, devid, str(img)))
        server.add_device(paths[-1][1], open_storage("raw", str(img)))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        bad = Frontend(sim.xen(g), toolstack.xvd_devid(1)).connect()
        good = Frontend(sim.xen(g), toolstack.xvd_devid(2)).connect()
        bad.set_req_prod(bad.queues[0].ring.req_prod_pvt + 50)
        wait_for(lambda: xs.read(f"{paths[0][1]}/state") == "5", what="bad device Closing")
        good.write(0, b"g" * 65536)
        assert good.read(0, 128) == b"g" * 65536
        assert xs.read(f"{paths[1][1]}/state") == "4"
        bad.close()
        good.close()
        for fe, be, _c in paths:
            toolstack.unplug(xs, be)
        t.join(10)
        assert not t.is_alive()
    finally:
        server.stop(force=True)
        t.join(10)
        server.close()
        for fe, be, created in paths:
            toolstack.remove_vbd(xs, fe, be, created)
        xs.close()
    assert other.read_bytes()[:65536] == b"g" * 65536


def test_response_padding_is_zeroed_in_the_ring(served):
    """XSA-216: the padding of a response never carries old bytes."""
    with served.frontend() as fe:
        raw = bytearray(b"\xff" * 112)
        raw[0] = 4                                        # reserved op: EOPNOTSUPP
        raw[8:16] = (77).to_bytes(8, "little")
        fe.push_raw(bytes(raw))
        q = fe.queues[0]
        off = q.ring.slot_offset(q.ring.rsp_cons)
        (rid, op, st), = fe.raw_responses(1)
        slot = bytes(q.ring.buf[off:off + 16])
        assert (rid, op, st) == (77, 4, -2)
        assert slot[9] == 0 and slot[12:16] == bytes(4)


def test_bad_ranges_on_the_persistent_fast_path(served):
    """Requests whose pages are already persistent take the fast path: it must refuse
    the same things as the general parser."""
    _attack_fast_path(served)
    assert served.store.calls == 1


def test_bad_ranges_on_the_c_batch_path(simxen_guest, disk):
    """The same with a plain raw file, whose single-page requests go to the C batch: a
    write past the end would grow the file, a read would fail with EIO: neither may happen."""
    sim, g = simxen_guest
    before = disk.read_bytes()
    with serve(spec(sim), g, str(disk)) as s:
        assert s.device.storage.pio_fd is not None
        _attack_fast_path(s)
        assert s.stats()["c_batched_requests"] == 0          # none of them reached C
    assert disk.stat().st_size == len(before)


def _attack_fast_path(served):
    end = (16 << 20) // 512
    with served.frontend() as fe:
        assert fe.persistent
        (ref, _page), = fe.pool.get(1)
        fe.push_raw(entry(op=OP_WRITE, sector=0, segs=[(ref, 0, 7)]))   # now persistent
        assert fe.raw_responses(1)[0][2] == 0
        bad = [entry(op=OP_WRITE, sector=end - 1, segs=[(ref, 0, 1)]),
               entry(op=OP_READ, sector=2**64 - 4, segs=[(ref, 0, 7)]),
               entry(op=OP_WRITE, sector=end - 2, segs=[(ref, 0, 0)] * 3),
               entry(op=OP_READ, sector=0, segs=[(ref, 3, 2)]),
               entry(op=OP_READ, sector=0, segs=[(ref, 0, 8)]),
               entry(op=OP_READ, sector=0, nseg=12, segs=[(ref, 0, 7)] * 11)]
        q = fe.queues[0]
        for raw in bad:                                   # all in one batch
            off = q.ring.slot_offset(q.ring.req_prod_pvt)
            q.ring.buf[off:off + 112] = raw
            q.ring.req_prod_pvt = (q.ring.req_prod_pvt + 1) & 0xFFFFFFFF
        fe.push()
        assert [st for _i, _o, st in fe.raw_responses(len(bad))] == [-1] * len(bad)
        fe.pool.put([(ref, _page)])


def test_error_nodes_go_with_the_device(simxen_guest, disk):
    sim, g = simxen_guest
    xs = XenStore(sim.xenstore_path(0))
    with serve(spec(sim), g, str(disk)) as s:
        fe = s.frontend()
        fe.set_req_prod(fe.queues[0].ring.req_prod_pvt + 1000)
        wait_for(lambda: xs.read(f"/local/domain/0/error{s.be_path}/error") is not None,
                 what="the error node")
        fe.close()
    assert xs.read("/local/domain/0/error") is None
    xs.close()


def test_indirect_plan_cache_memory_is_bounded(served):
    """Each distinct indirect segment list on persistent grants is cached with one buffer
    view per segment: a guest sending many distinct lists of scattered one-sector segments
    must not make the server hold an unbounded number of views (~200 bytes each)."""
    with served.frontend() as fe:
        assert fe.persistent
        data = fe.pool.get(256)
        (iref, ipage), = fe.pool.get(1)
        for k in range(160):
            # 256 one-sector segments, each on its own page: nothing merges
            order = data[k // 8:] + data[:k // 8]
            segs = b"".join(SEGMENT.pack(r, k % 8, k % 8) for r, _p in order)
            ipage[:len(segs)] = segs
            buf = bytearray(112)
            blkif.pack_indirect(ABI_X86_64, buf, 0, OP_READ, k, 8 * k, 256, [iref])
            fe.push_raw(bytes(buf))
            (rid, _op, st), = fe.raw_responses(1)
            assert (rid, st) == (k, 0)
        plans = served.device.queues[0].plans
        cached = sum(len(iovs) for _n, iovs, _g in plans.values())
        assert cached <= 32768, f"{cached} buffer views cached for {len(plans)} lists"
        fe.pool.put(data + [(iref, ipage)])


def test_persistent_mappings_are_bounded(served):
    """Each new persistent gref in its own request is one more mapping (one VMA; the
    kernel allows a process ~65530): a guest must not be able to make one ring hold
    thousands of them, or a 4-queue device exhausts the address-space map of the
    server that also serves other guests. Past the cap, grants are mapped per request."""
    with served.frontend() as fe:
        assert fe.persistent
        pages = fe.pool.get(3000)
        q = fe.queues[0]
        for start in range(0, len(pages), 30):
            chunk = pages[start:start + 30]
            for k, (ref, _p) in enumerate(chunk):
                off = q.ring.slot_offset(q.ring.req_prod_pvt)
                q.ring.buf[off:off + 112] = entry(id=start + k, sector=start + k,
                                                  segs=[(ref, 0, 0)])
                q.ring.req_prod_pvt = (q.ring.req_prod_pvt + 1) & 0xFFFFFFFF
            fe.push()
            assert [st for _i, _o, st in fe.raw_responses(len(chunk))] == [0] * len(chunk)
        bq = served.device.queues[0]
        assert len(bq.pmaps) <= 1024
        assert served.server.persistent_maps == len(bq.pmaps)
        # still served, and the persistent pages it kept still work
        assert fe.read(0, 8)
        fe.pool.put(pages)
    assert served.server.persistent_maps == 0          # all given back at disconnect


def test_reconnect_churn_leaks_no_descriptors(served):
    """A guest that closes and reconnects again and again (each time with a new event
    channel handle, as a reloaded driver does) must not make the server keep a file
    descriptor or a mapping per round: it would run out of descriptors for every guest."""
    def server_fds():
        n = 0
        for f in os.listdir("/proc/self/fd"):
            try:
                t = os.readlink(f"/proc/self/fd/{f}")
            except OSError:
                continue
            if t.startswith(served.sim.dir):
                n += 1
        return n

    xs = XenStore(served.sim.xenstore_path(served.guest))
    xs0 = XenStore(served.sim.xenstore_path(0))
    try:
        counts = []
        for i in range(25):
            fe = served.frontend()
            fe.write(0, b"c" * 4096)
            fe.close()
            xs.write(f"{served.fe_path}/state", "1")
            wait_for(lambda: xs0.read(f"{served.be_path}/state") == "2", what="InitWait")
            if i in (4, 24):
                counts.append(server_fds())
        assert counts[1] <= counts[0], f"descriptors grew from {counts[0]} to {counts[1]}"
    finally:
        xs.close()
        xs0.close()


def test_a_busy_ring_yields_after_a_bounded_amount_of_io(simxen_guest, disk):
    """One service turn of a ring must not run for as long as its frontend keeps it
    full: other rings (other guests on the same server) wait meanwhile. A frontend that
    refills half the ring with 1 MiB reads while the other half is being answered keeps
    the server in one ring; a turn stops after a bounded number of bytes."""
    from xapi_storage.blkback.ring import M32
    sim, g = simxen_guest

    class Refiller(RawFile):
        hook = None

        def readv(self, offset, iovs, length=None):
            super().readv(offset, iovs, length)
            if self.hook is not None:
                self.hook()

    store = Refiller(str(disk))
    with serve(spec(sim), g, None, backend=store, io_threads=0) as s:
        with s.frontend(max_indirect=256) as fe:
            data = fe.pool.get(256)
            (iref, ipage), = fe.pool.get(1)
            segs = b"".join(SEGMENT.pack(r, 0, 7) for r, _p in data)
            ipage[:len(segs)] = segs
            ring = fe.queues[0].ring
            half = ring.size // 2
            state = {"left": 24, "id": 0}

            def publish():
                for _ in range(half):
                    off = ring.slot_offset(ring.req_prod_pvt)
                    blkif.pack_indirect(ABI_X86_64, ring.buf, off, OP_READ, state["id"], 0,
                                        256, [iref])
                    state["id"] += 1
                    ring.req_prod_pvt = (ring.req_prod_pvt + 1) & M32
                return ring.push_requests_and_check_notify()

            def hook():                   # in the server, while it answers a batch
                ring.rsp_cons = ring.hdr[2]
                if state["left"] and ring.free_slots() >= half:
                    state["left"] -= 1
                    publish()

            q = s.device.queues[0]
            orig = q.service
            calls = []

            def counting(*args):
                b0 = s.device.stats.batches
                r = orig(*args)
                calls.append(s.device.stats.batches - b0)
                return r
            q.service = counting
            store.hook = hook
            publish()
            fe.evtchn.notify(fe.queues[0].port)
            wait_for(lambda: state["left"] == 0 and ring.hdr[2] == ring.req_prod_pvt,
                     what="all batches answered")
            store.hook = None
            ring.rsp_cons = ring.hdr[2]
            assert sum(calls) == 25
            assert max(calls) * half <= 64, f"{max(calls)} batches of {half} MiB in one turn"
            fe.pool.put(data + [(iref, ipage)])


@pytest.mark.parametrize("op", [blkif.OP_FLUSH_DISKCACHE, blkif.OP_WRITE_BARRIER])
def test_flush_with_data_on_an_ungranted_page_is_the_frontends_error(served, op):
    """A flush or barrier carrying a segment whose gref was never granted is answered
    with an error; it is not a storage flush failure (which closes the device and names
    the storage in the error node)."""
    with served.frontend(persistent=False) as fe:
        fe.write(0, b"k" * 4096)
        fe.push_raw(entry(op=op, id=9, sector=0, segs=[(999999, 0, 7)]))
        (rid, rop, st), = fe.raw_responses(1)
        assert (rid, rop, st) == (9, op, -1)
        time.sleep(0.3)                                   # a deferred close would show now
        assert fe.read(0, 8) == b"k" * 4096
        xs = XenStore(served.sim.xenstore_path(0))
        try:
            assert xs.read(f"{served.be_path}/state") == "4"
            assert xs.read(f"/local/domain/0/error{served.be_path}/error") is None
        finally:
            xs.close()
