"""The I/O-free protocol core: layouts, ring arithmetic (against the C macros), parsing of
hostile requests, and the XenBus state table (every state x every event)."""

import struct

import pytest
from hypothesis import given, settings, strategies as st

from xapi_storage.blkback import blkif, ring, xenbus
from xapi_storage.blkback.blkif import ABI_X86_32, ABI_X86_64, BadRequest, Limits

u32 = st.integers(0, 2**32 - 1)


# --- layouts ----------------------------------------------------------------------------------

def test_x86_64_layout_matches_the_c_compiler(cref):
    assert cref.size_of(0) == ABI_X86_64.req.size == 112
    assert cref.size_of(1) == ABI_X86_64.disc.size == 32
    assert cref.size_of(2) == ABI_X86_64.ind.size == 64
    assert cref.size_of(3) == ABI_X86_64.rsp.size == 16
    assert cref.size_of(4) == blkif.SEGMENT.size == 8
    assert [cref.off_req(i) for i in range(6)] == [0, 1, 2, 8, 16, 24]
    assert [cref.off_disc(i) for i in range(6)] == [0, 1, 2, 8, 16, 24]
    assert [cref.off_ind(i) for i in range(7)] == [0, 1, 2, 8, 16, 24, 28]
    assert [cref.off_rsp(i) for i in range(3)] == [0, 8, 10]


@pytest.mark.parametrize("abi,idoff,secoff,segoff", [(ABI_X86_64, 8, 16, 24),
                                                     (ABI_X86_32, 4, 12, 20)])
def test_request_field_offsets(abi, idoff, secoff, segoff):
    buf = bytearray(abi.entry_size)
    blkif.pack_request(abi, buf, 0, blkif.OP_READ, 0x1122334455667788, 0xAABB, [(7, 1, 6)])
    assert struct.unpack_from("<Q", buf, idoff)[0] == 0x1122334455667788
    assert struct.unpack_from("<Q", buf, secoff)[0] == 0xAABB
    assert struct.unpack_from("<IBB", buf, segoff) == (7, 1, 6)


def test_response_padding_is_zero():
    buf = bytearray(b"\xff" * 16)
    ABI_X86_64.rsp.pack_into(buf, 0, 5, 1, -1)
    assert bytes(buf) == struct.pack("<QBxh", 5, 1, -1) + bytes(4)
    buf = bytearray(b"\xff" * 12)
    ABI_X86_32.rsp.pack_into(buf, 0, 5, 1, -2)
    assert bytes(buf) == struct.pack("<QB", 5, 1) + b"\0" + struct.pack("<h", -2)


@given(st.integers(0, 4), st.sampled_from([112, 108]))
def test_ring_size_matches_c(cref, order, entry):
    assert blkif.ring_size(4096 << order, entry) == cref.ring_size(4096 << order, entry)
    assert blkif.ring_size(4096 << order, entry) == 32 << order


def test_protocol_key():
    assert blkif.abi_for_protocol("x86_64-abi") is ABI_X86_64
    assert blkif.abi_for_protocol("arm-abi") is ABI_X86_64
    assert blkif.abi_for_protocol(None) is ABI_X86_32
    with pytest.raises(ValueError, match="unknown protocol"):
        blkif.abi_for_protocol("sparc-abi")


# --- ring arithmetic against the C macros -----------------------------------------------------

def _ring(req_prod, req_event, rsp_prod, rsp_event, order=0):
    buf = bytearray(4096 << order)
    struct.pack_into("<IIII", buf, 0, req_prod, req_event, rsp_prod, rsp_event)
    return buf


@settings(max_examples=500)
@given(u32, st.integers(0, 32), st.integers(0, 32), u32)
def test_unconsumed_and_overflow_match_c(cref, base, ahead, consumed, junk):
    size = 32
    rsp = base
    buf = _ring((rsp + ahead) & ring.M32, 0, rsp, 0)
    r = ring.BackRing(buf, 112)
    r.req_cons = (rsp + consumed) & ring.M32
    for rp in ((rsp + ahead) & ring.M32, junk):
        struct.pack_into("<I", buf, 0, rp)
        assert r.unconsumed() == cref.unconsumed_requests(rp, r.req_cons, r.rsp_prod_pvt, size)
        assert r.prod_overflow(rp) == bool(cref.prod_overflow(rp, r.rsp_prod_pvt, size))
        assert r.cons_overflow() == bool(cref.cons_overflow(r.req_cons, r.rsp_prod_pvt, size))


@settings(max_examples=500)
@given(u32, st.integers(0, 32), u32)
def test_push_notify_matches_c(cref, old, n, event):
    buf = _ring(old, 0, old, event)
    r = ring.BackRing(buf, 112)
    r.rsp_prod_pvt = (old + n) & ring.M32
    got = r.push_responses_and_check_notify()
    assert got == bool(cref.notify_needed(r.rsp_prod_pvt, old, event))
    assert struct.unpack_from("<I", buf, 8)[0] == r.rsp_prod_pvt


@given(u32, st.integers(33, 2**32 - 1))
def test_attach_refuses_a_producer_too_far_ahead(rsp, ahead):
    buf = _ring((rsp + ahead) & ring.M32, 1, rsp, 1)
    with pytest.raises(ring.RingError, match="frontend error"):
        ring.BackRing(buf, 112)


@settings(max_examples=200, deadline=None)
@given(start=st.integers(2**32 - 100, 2**32 - 1) | st.integers(0, 100),
       script=st.lists(st.tuples(st.sampled_from(["push", "serve", "collect"]),
                                 st.integers(1, 40)), max_size=60),
       order=st.integers(0, 1))
def test_front_and_back_never_lose_a_request_or_a_wakeup(start, script, order):
    """A frontend and a backend share one ring across the 2**32 wrap. Invariants: every
    request is answered exactly once, in slots the backend may use, and whenever the backend
    goes to sleep with work pending the frontend's push says "notify"."""
    buf = bytearray(4096 << order)
    struct.pack_into("<IIII", buf, 0, start, (start + 1) & ring.M32, start, (start + 1) & ring.M32)
    f = ring.FrontRing(buf, 112, init=False)
    b = ring.BackRing(buf, 112)
    sent, answered, asleep = 0, [], False
    next_id = 0
    for action, n in script:
        if action == "push":
            k = min(n, f.free_slots())
            for _ in range(k):
                off = f.slot_offset(f.req_prod_pvt)
                blkif.pack_request(ABI_X86_64, buf, off, 0, next_id, 0, [(1, 0, 7)])
                next_id += 1
                f.req_prod_pvt = (f.req_prod_pvt + 1) & ring.M32
            notify = f.push_requests_and_check_notify()
            if k and asleep:
                assert notify, "backend asleep with work and the frontend was not told to kick"
            if notify:
                asleep = False
            sent += k
        elif action == "serve" and not asleep:
            rp = b.hdr[0]
            assert not b.prod_overflow(rp)
            while b.req_cons != rp and not b.cons_overflow():
                raw = bytes(buf[b.slot_offset(b.req_cons):b.slot_offset(b.req_cons) + 112])
                req = blkif.parse_request(ABI_X86_64, raw, Limits(1 << 20))
                b.req_cons = (b.req_cons + 1) & ring.M32
                ABI_X86_64.rsp.pack_into(buf, b.slot_offset(b.rsp_prod_pvt), req[1], 0, 0)
                b.rsp_prod_pvt = (b.rsp_prod_pvt + 1) & ring.M32
            b.push_responses_and_check_notify()
            if not b.final_check_for_requests():
                asleep = True
        elif action == "collect":
            while f.rsp_cons != f.hdr[2]:
                rid = struct.unpack_from("<Q", buf, f.slot_offset(f.rsp_cons))[0]
                answered.append(rid)
                f.rsp_cons = (f.rsp_cons + 1) & ring.M32
            f.final_check_for_responses()
    # drain: the backend is woken if asleep with work, and finishes
    b_work = b.unconsumed()
    if asleep:
        assert b_work == 0
    assert len(answered) == len(set(answered))
    assert answered == list(range(len(answered)))
    assert len(answered) <= sent


# --- parsing hostile requests -----------------------------------------------------------------

LIM = Limits(sectors=1 << 16, max_indirect=256)


@settings(max_examples=2000)
@given(st.binary(min_size=112, max_size=112), st.sampled_from([ABI_X86_64, ABI_X86_32]),
       st.booleans())
def test_any_bytes_parse_or_fail_cleanly(raw, abi, readonly):
    lim = Limits(sectors=1 << 16, max_indirect=256, readonly=readonly)
    try:
        req = blkif.parse_request(abi, raw, lim)
    except BadRequest as e:
        assert e.status in (blkif.RSP_ERROR, blkif.RSP_EOPNOTSUPP)
        assert 0 <= e.op <= 255
        return
    kind, rid, op, sector, nsect, segs, extra = req
    if kind in (blkif.K_READ, blkif.K_WRITE, blkif.K_BARRIER, blkif.K_FLUSH):
        assert len(segs) <= 11 and (kind > 1 or len(segs) >= 1)
        assert all(f <= l <= 7 for _g, f, l in segs)
        if segs:
            assert sector + nsect <= lim.sectors
        if readonly:
            assert kind == blkif.K_READ
    elif kind == blkif.K_DISCARD:
        assert sector + nsect <= lim.sectors and not readonly
    else:
        assert kind == blkif.K_INDIRECT and op in (0, 1) and 1 <= nsect <= 256
        assert len(extra) == (nsect + 511) // 512


def _req(op, nseg, sector, segs, abi=ABI_X86_64):
    buf = bytearray(abi.entry_size)
    blkif.pack_request(abi, buf, 0, op, 99, sector, segs)
    if nseg != len(segs):
        buf[1] = nseg
    return bytes(buf)


@pytest.mark.parametrize("raw,status,why", [
    (_req(0, 0, 0, []), -1, "0 segments"),
    (_req(0, 12, 0, [(1, 0, 7)]), -1, "12 segments"),
    (_req(0, 1, 0, [(1, 3, 2)]), -1, "outside a 4 KiB page"),
    (_req(0, 1, 0, [(1, 0, 8)]), -1, "outside a 4 KiB page"),
    (_req(1, 1, (1 << 16) - 7, [(1, 0, 7)]), -1, "beyond the disk end"),
    (_req(0, 1, 2**64 - 1, [(1, 0, 7)]), -1, "beyond the disk end"),
    (_req(4, 1, 0, [(1, 0, 7)]), -2, "unknown operation 4"),
    (_req(200, 1, 0, [(1, 0, 7)]), -2, "unknown operation 200"),
])
def test_bad_requests_are_answered_not_raised(raw, status, why):
    with pytest.raises(BadRequest, match=why) as e:
        blkif.parse_request(ABI_X86_64, raw, LIM)
    assert e.value.status == status and e.value.id == 99


def test_discard_range_overflow():
    buf = bytearray(112)
    blkif.pack_discard(ABI_X86_64, buf, 0, 5, 2**64 - 8, 16)
    with pytest.raises(BadRequest, match="beyond"):
        blkif.parse_request(ABI_X86_64, bytes(buf), LIM)


def test_indirect_header_and_segments():
    buf = bytearray(112)
    blkif.pack_indirect(ABI_X86_64, buf, 0, blkif.OP_WRITE, 7, 8, 600, [11, 12])
    hdr = blkif.parse_request(ABI_X86_64, bytes(buf), Limits(1 << 20, max_indirect=1024))
    assert hdr[0] == blkif.K_INDIRECT and hdr[2] == blkif.OP_WRITE and hdr[6] == (11, 12)
    segs = b"".join(blkif.SEGMENT.pack(100 + i, 0, 7) for i in range(600))
    req = blkif.parse_indirect_segments(hdr, segs, Limits(1 << 20, max_indirect=1024))
    assert req[0] == blkif.K_WRITE and req[4] == 600 * 8 and req[5][599] == (699, 0, 7)
    bad = segs[:8 * 599] + blkif.SEGMENT.pack(1, 5, 4)
    with pytest.raises(BadRequest, match="outside a 4 KiB page"):
        blkif.parse_indirect_segments(hdr, bad, Limits(1 << 20, max_indirect=1024))


@pytest.mark.parametrize("iop,nseg,why", [(2, 1, "not read or write"), (0, 0, "0 indirect"),
                                          (0, 257, "257 indirect")])
def test_bad_indirect(iop, nseg, why):
    buf = bytearray(112)
    blkif.pack_indirect(ABI_X86_64, buf, 0, iop, 7, 0, nseg, [1])
    with pytest.raises(BadRequest, match=why):
        blkif.parse_request(ABI_X86_64, bytes(buf), LIM)


def test_readonly_refuses_writes_and_discards():
    ro = Limits(1 << 16, readonly=True)
    with pytest.raises(BadRequest, match="read-only"):
        blkif.parse_request(ABI_X86_64, _req(1, 1, 0, [(1, 0, 7)]), ro)
    buf = bytearray(112)
    blkif.pack_discard(ABI_X86_64, buf, 0, 5, 0, 8)
    with pytest.raises(BadRequest, match="read-only"):
        blkif.parse_request(ABI_X86_64, bytes(buf), ro)
    assert blkif.parse_request(ABI_X86_64, _req(0, 1, 0, [(1, 0, 7)]), ro)[0] == 0


# --- the XenBus state table ------------------------------------------------------------------

def test_table_is_total():
    for s in xenbus.STATES:
        for e in xenbus.EVENTS:
            new, actions = xenbus.TABLE[(s, e)]
            assert new in xenbus.STATES
            assert set(actions) <= set(xenbus.ACTIONS)
            assert (xenbus.DESTROY in actions) == (new == xenbus.DESTROYED and s != new)


@settings(max_examples=300)
@given(st.lists(st.sampled_from(xenbus.EVENTS) | st.sampled_from(
    [("fe", v) for v in (None, b"", b"x", b"0", b"1", b"3", b"4", b"5", b"6", b"7", b"99")] +
    [("be", v) for v in (None, b"5", b"4", b"junk")]), max_size=40))
def test_every_sequence_of_inputs_keeps_a_valid_state(inputs):
    m = xenbus.Machine()
    connected_rings = False
    for i in inputs:
        if isinstance(i, tuple):
            old, new, actions = (m.on_frontend_state(i[1]) if i[0] == "fe"
                                 else m.on_backend_state(i[1]))
        else:
            old, new, actions = m.feed(i)
        assert new in xenbus.STATES
        if old == xenbus.DESTROYED:
            assert new == xenbus.DESTROYED and actions == ()
        if xenbus.CONNECT in actions:
            connected_rings = True
        if xenbus.DISCONNECT in actions:
            connected_rings = False
        if new == xenbus.CONNECTED:
            assert old in (xenbus.CONNECTED, xenbus.INITWAIT)
        if new == xenbus.DESTROYED:
            assert not connected_rings


def test_the_normal_lifecycle():
    m = xenbus.Machine()
    assert m.feed(xenbus.START)[1:] == (xenbus.INITWAIT, (xenbus.PUBLISH,))
    assert m.on_frontend_state(b"3")[1:] == (xenbus.INITWAIT, (xenbus.CONNECT,))
    assert m.feed(xenbus.CONNECTED_OK)[1:] == (xenbus.CONNECTED, (xenbus.ANNOUNCE,))
    assert m.on_frontend_state(b"4")[1:] == (xenbus.CONNECTED, ())
    # toolstack unplug: online=0 then BE state=5
    m.feed(xenbus.OFFLINE)
    assert m.on_backend_state(b"5")[1:] == (xenbus.CLOSING, ())
    assert m.on_frontend_state(b"6")[1:] == (xenbus.DESTROYED,
                                             (xenbus.DISCONNECT, xenbus.DESTROY))


def test_reconnect_after_frontend_close():
    m = xenbus.Machine()
    m.feed(xenbus.START)
    m.on_frontend_state(b"3")
    m.feed(xenbus.CONNECTED_OK)
    assert m.on_frontend_state(b"5")[1] == xenbus.CLOSING
    assert m.on_frontend_state(b"6")[1:] == (xenbus.CLOSED, (xenbus.DISCONNECT,))
    assert m.on_frontend_state(b"1")[1:] == (xenbus.INITWAIT, (xenbus.PUBLISH,))


def test_the_real_barrier_is_built():
    """CI must run with the compiled cffi fence, not the fallback."""
    from xapi_storage.blkback import fence
    assert fence.KIND.startswith("cffi"), fence.KIND
    fence.mb()
    fence.wmb()
    fence.rmb()
