"""Grant tables of the simulated Xen: real sharing between processes, and the checks."""

import errno
import multiprocessing
import os
import signal
import time

import pytest

from xapi_storage.xen import XenError, open_xen, PAGE_SIZE

ctx = multiprocessing.get_context("fork")


def _child_map_and_write(d, granter, refs, q):
    try:
        xen = open_xen("sim:" + d, domid=0)
        m = xen.grant_mapper()
        mp = m.map(granter, refs, writable=True)
        q.put(bytes(mp.buffer[0:5]) + bytes(mp.buffer[PAGE_SIZE:PAGE_SIZE + 5]))
        mp.buffer[10:15] = b"child"
        mp.buffer[PAGE_SIZE + 10:PAGE_SIZE + 15] = b"CHILD"
        mp.unmap()
        m.close()
        q.put("ok")
    except Exception as e:          # report, never hang the parent
        q.put(repr(e))


def test_pages_are_shared_between_processes(simxen_guest):
    sim, g = simxen_guest
    a = sim.xen(g).grant_allocator()
    ga = a.grant(0, 2)
    assert bytes(ga.buffer) == bytes(2 * PAGE_SIZE)         # zeroed
    ga.buffer[0:5] = b"hello"
    ga.buffer[PAGE_SIZE:PAGE_SIZE + 5] = b"world"
    q = ctx.Queue()
    p = ctx.Process(target=_child_map_and_write, args=(sim.dir, g, ga.refs, q))
    p.start()
    assert q.get(timeout=10) == b"helloworld"
    assert q.get(timeout=10) == "ok"
    p.join(10)
    assert bytes(ga.buffer[10:15]) == b"child"
    assert bytes(ga.buffer[PAGE_SIZE + 10:PAGE_SIZE + 15]) == b"CHILD"
    ga.revoke()
    a.close()


def test_contiguous_multi_ref_map_in_ref_order(simxen_guest):
    sim, g = simxen_guest
    a = sim.xen(g).grant_allocator()
    pages = [a.grant(0, 1) for _ in range(5)]
    for i, ga in enumerate(pages):
        ga.buffer[:] = bytes([i + 1]) * PAGE_SIZE
    m = sim.xen(0).grant_mapper()
    order = [3, 0, 4, 1, 2]
    mp = m.map(g, [pages[i].refs[0] for i in order], writable=True)
    assert len(mp.buffer) == 5 * PAGE_SIZE
    for k, i in enumerate(order):
        assert bytes(mp.buffer[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]) == bytes([i + 1]) * PAGE_SIZE
    mp.buffer[2 * PAGE_SIZE] = 0xEE                      # lands in pages[4]
    assert pages[4].buffer[0] == 0xEE
    # a multi-page grant maps as one run too
    big = a.grant(0, 8)
    big.buffer[-1] = 0x77
    mb = m.map(g, big.refs, writable=False)
    assert mb.buffer[-1] == 0x77 and len(mb.buffer) == 8 * PAGE_SIZE
    mp.unmap()
    mb.unmap()
    for ga in pages + [big]:
        ga.revoke()
    m.close()
    a.close()


def test_readonly_grant_and_readonly_map(simxen_guest):
    sim, g = simxen_guest
    a = sim.xen(g).grant_allocator()
    m = sim.xen(0).grant_mapper()
    ro = a.grant(0, 1, writable=False)
    with pytest.raises(XenError) as e:
        m.map(g, ro.refs, writable=True)
    assert e.value.errno == errno.EPERM and "read-only" in str(e.value)
    mp = m.map(g, ro.refs, writable=False)
    assert mp.buffer.readonly
    with pytest.raises(TypeError):
        mp.buffer[0] = 1
    mp.unmap()
    # a writable grant mapped read-only is read-only too
    rw = a.grant(0, 1)
    mp = m.map(g, rw.refs, writable=False)
    assert mp.buffer.readonly
    mp.unmap()
    ro.revoke()
    rw.revoke()


def test_wrong_domid_bad_refs_and_revoked_refs_are_refused(simxen):
    sim = simxen
    g1 = sim.create_domain("g1")
    g2 = sim.create_domain("g2")
    a = sim.xen(g1).grant_allocator()
    ga = a.grant(g2, 1)                                     # granted to g2, not dom0
    m0 = sim.xen(0).grant_mapper()
    with pytest.raises(XenError) as e:
        m0.map(g1, ga.refs, writable=False)
    assert e.value.errno == errno.EPERM
    mg2 = sim.xen(g2).grant_mapper()
    mg2.map(g1, ga.refs, writable=True).unmap()              # the right domain may
    for bad in ([0], [1], [7], [10 ** 6], [-1], ["x"]):      # reserved, never granted, out of range
        with pytest.raises(XenError):
            m0.map(g1, bad, writable=False)
    with pytest.raises(XenError):
        m0.map(g1, [], writable=False)
    with pytest.raises(XenError) as e:
        m0.map(999, [8], writable=False)                     # no such domain
    assert e.value.errno == errno.ESRCH
    # a failure part-way leaves nothing mapped or locked
    ok = a.grant(0, 1)
    with pytest.raises(XenError):
        m0.map(g1, [ok.refs[0], ga.refs[0]], writable=False)
    ok.revoke()                                              # not busy: revocable
    with pytest.raises(XenError):
        m0.map(g1, ok.refs, writable=False)                  # revoked: refused
    ga.revoke()
    a.close()


def test_revoke_refused_while_mapped(simxen_guest):
    sim, g = simxen_guest
    a = sim.xen(g).grant_allocator()
    m = sim.xen(0).grant_mapper()
    ga = a.grant(0, 2)
    mp1 = m.map(g, ga.refs, writable=True)
    mp2 = m.map(g, ga.refs[:1], writable=False)              # the same ref twice
    assert ga.busy() == list(ga.refs)
    with pytest.raises(XenError) as e:
        ga.revoke()
    assert e.value.errno == errno.EBUSY
    mp1.unmap()
    assert ga.busy() == [ga.refs[0]]
    mp2.unmap()
    assert ga.busy() == []
    ga.revoke()
    ga.revoke()                                              # idempotent
    a.close()


def _child_map_then_wait(d, granter, refs, q):
    m = open_xen("sim:" + d, domid=0).grant_mapper()
    m.map(granter, refs, writable=True)
    q.put("mapped")
    time.sleep(60)


def test_mapper_death_releases_its_mappings(simxen_guest):
    sim, g = simxen_guest
    a = sim.xen(g).grant_allocator()
    ga = a.grant(0, 1)
    q = ctx.Queue()
    p = ctx.Process(target=_child_map_then_wait, args=(sim.dir, g, ga.refs, q))
    p.start()
    assert q.get(timeout=10) == "mapped"
    assert ga.busy() == list(ga.refs)
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    assert ga.busy() == []
    ga.revoke()
    a.close()


def test_unmapped_buffer_cannot_reach_guest_memory(simxen_guest):
    sim, g = simxen_guest
    a = sim.xen(g).grant_allocator()
    ga = a.grant(0, 1)
    m = sim.xen(0).grant_mapper()
    mp = m.map(g, ga.refs, writable=True)
    stale = mp.buffer[0:16]                                  # a view kept past unmap
    mp.unmap()
    mp.unmap()                                               # idempotent
    assert mp.buffer is None
    ga.buffer[0:4] = b"new!"
    assert bytes(stale[0:4]) == bytes(4)                     # reads zeros, no crash
    stale[0:4] = b"evil"                                     # writes go nowhere
    assert bytes(ga.buffer[0:4]) == b"new!"
    ga.revoke()


def test_allocator_death_ends_its_grants(simxen_guest):
    sim, g = simxen_guest
    a = sim.xen(g).grant_allocator()
    ga = a.grant(0, 1)
    ref = ga.refs[0]
    m = sim.xen(0).grant_mapper()
    m.map(g, [ref], writable=False).unmap()
    a.close()                                                # process gone, in effect
    deadline = time.monotonic() + 5
    while True:
        try:
            m.map(g, [ref], writable=False).unmap()
        except XenError:
            break
        assert time.monotonic() < deadline, "grant survived its allocator"
        time.sleep(0.01)


def test_two_allocators_of_one_domain_do_not_collide(simxen_guest):
    sim, g = simxen_guest
    a1 = sim.xen(g).grant_allocator()
    a2 = sim.xen(g).grant_allocator()
    x = [a1.grant(0, 3) for _ in range(100)]
    y = [a2.grant(0, 3) for _ in range(100)]
    refs = [r for ga in x + y for r in ga.refs]
    frames = [ga.frame + i for ga in x + y for i in range(3)]
    assert len(set(refs)) == len(refs) and len(set(frames)) == len(frames)
    a1.close()
    a2.close()


def test_one_mapper_shared_by_threads(simxen_guest):
    import threading
    sim, g = simxen_guest
    a = sim.xen(g).grant_allocator()
    pages = [a.grant(0, 1) for _ in range(8)]
    m = sim.xen(0).grant_mapper()
    errors = []

    def work(k):
        try:
            for i in range(200):
                refs = [pages[(k + i + j) % 8].refs[0] for j in range(3)]
                mp = m.map(g, refs, writable=True)
                mp.buffer[0] = k
                mp.unmap()
        except Exception as e:          # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for ga in pages:
        assert ga.busy() == []
        ga.revoke()
    m.close()
    a.close()


def test_revoke_with_views_still_held(simxen_guest):
    sim, g = simxen_guest
    a = sim.xen(g).grant_allocator()
    ga = a.grant(0, 2)
    view = ga.buffer[4096:4100]                         # a slice kept past revoke()
    view[:] = b"old!"
    ga.revoke()                                         # no BufferError
    again = a.grant(0, 2)                               # very likely the same frames
    again.buffer[4096:4100] = b"new!"
    assert bytes(view) == bytes(4)                      # the stale view sees zeros
    view[:] = b"evil"                                   # and writes nowhere
    assert bytes(again.buffer[4096:4100]) == b"new!"
    again.revoke()
    a.close()


def test_grants_of_a_destroyed_domain_end(simxen):
    sim = simxen
    g = sim.create_domain("doomed")
    a = sim.xen(g).grant_allocator()
    ga = a.grant(0, 2)
    m = sim.xen(0).grant_mapper()
    live = m.map(g, ga.refs[:1], writable=True)          # mapped across the destruction
    m.map(g, ga.refs[1:], writable=True).unmap()         # the mapper now has its files open
    sim.destroy_domain(g)
    with pytest.raises(XenError) as e:
        m.map(g, ga.refs[1:], writable=True)
    assert e.value.errno == errno.ESRCH
    with pytest.raises(XenError) as e:
        m.map(g, ga.refs[1:], writable=True)             # and stays so
    assert e.value.errno == errno.ESRCH
    live.buffer[0] = 1                                   # an existing mapping stays usable
    live.unmap()
    m.close()
    a.close()
