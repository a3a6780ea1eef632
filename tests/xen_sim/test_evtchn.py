"""Event channels of the simulated Xen between processes."""

import errno
import multiprocessing
import os
import select
import signal

import pytest

from xapi_storage.xen import XenError, open_xen

ctx = multiprocessing.get_context("fork")


def wait(e, timeout=5.0):
    """Poll until pending() gives something. A wake-up may find nothing pending (its
    event was consumed by the previous pending()), as the interface allows."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        r, _, _ = select.select([e], [], [], max(0.0, deadline - time.monotonic()))
        got = e.pending() if r else []
        if got or time.monotonic() >= deadline:
            return got


def _frontend(d, domid, q, cmds):
    """A guest process: alloc an unbound port, then ping-pong `n` times."""
    try:
        e = open_xen("sim:" + d, domid=domid).event_channels()
        port = e.alloc_unbound(0)
        q.put(port)
        while True:
            cmd = cmds.get(timeout=10)
            if cmd == "notify":
                e.notify(port)
            elif cmd == "notify3":
                for _ in range(3):
                    e.notify(port)
                q.put("sent")
            elif cmd == "wait":
                q.put(wait(e) == [port])
            elif cmd == "pingpong":
                for _ in range(200):
                    assert wait(e) == [port]
                    e.notify(port)
                q.put("done")
            elif cmd == "unbind":
                e.unbind(port)
                q.put("unbound")
            elif cmd == "exit":
                e.close()
                return
    except Exception as ex:
        q.put(repr(ex))


@pytest.fixture
def frontend(simxen_guest):
    sim, g = simxen_guest
    q, cmds = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_frontend, args=(sim.dir, g, q, cmds))
    p.start()
    port = q.get(timeout=10)
    yield sim, g, port, q, cmds, p
    if p.is_alive():
        cmds.put("exit")
        p.join(5)
        if p.is_alive():
            p.kill()


def test_bind_notify_both_ways_and_coalesce(frontend):
    sim, g, fport, q, cmds, p = frontend
    be = sim.xen(0).event_channels()
    lport = be.bind_interdomain(g, fport)
    assert wait(be) == [lport]                    # the spurious event Xen gives a fresh bind
    assert be.pending() == []
    cmds.put("notify3")                           # three notifications, one event
    assert q.get(timeout=10) == "sent"
    assert wait(be) == [lport]
    assert be.pending() == []
    r, _, _ = select.select([be], [], [], 0)
    assert not r                                  # not readable once drained
    cmds.put("wait")
    be.notify(lport)
    assert q.get(timeout=10) is True
    cmds.put("pingpong")
    for _ in range(200):
        be.notify(lport)
        assert wait(be) == [lport]
    assert q.get(timeout=10) == "done"
    be.close()


def test_bind_checks(simxen):
    sim = simxen
    g1, g2 = sim.create_domain("a"), sim.create_domain("b")
    f = sim.xen(g1).event_channels()
    port = f.alloc_unbound(g2)                    # offered to g2, not dom0
    be = sim.xen(0).event_channels()
    for domid, rport in ((g1, port), (g1, 4000), (g1, 0), (77, port)):
        with pytest.raises(XenError):
            be.bind_interdomain(domid, rport)
    other = sim.xen(g2).event_channels()
    lp = other.bind_interdomain(g1, port)
    with pytest.raises(XenError):                 # already bound
        be.bind_interdomain(g1, port)
    with pytest.raises(XenError) as e:
        be.notify(12345)
    assert e.value.errno == errno.EINVAL
    other.unbind(lp)
    other.unbind(lp)                              # idempotent
    for h in (f, be, other):
        h.close()


def test_unbind_and_death_make_notify_a_no_op(frontend):
    sim, g, fport, q, cmds, p = frontend
    be = sim.xen(0).event_channels()
    lport = be.bind_interdomain(g, fport)
    wait(be)
    cmds.put("unbind")
    assert q.get(timeout=10) == "unbound"
    be.notify(lport)                              # peer closed: dropped, no error
    # the guest's port is gone; ours went back to unbound
    assert be._broker.call(op="peer", port=lport)["state"] == "unbound"
    be.close()


def test_peer_process_death(frontend):
    sim, g, fport, q, cmds, p = frontend
    be = sim.xen(0).event_channels()
    lport = be.bind_interdomain(g, fport)
    wait(be)
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    import time
    deadline = time.monotonic() + 5
    while be._broker.call(op="peer", port=lport)["state"] != "unbound":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    be.notify(lport)                              # no error, nowhere to go
    # a new frontend can offer a port again and we bind it
    f2 = sim.xen(g).event_channels()
    p2 = f2.alloc_unbound(0)
    l2 = be.bind_interdomain(g, p2)
    wait(be)
    f2.notify(p2)
    assert wait(be) == [l2]
    f2.close()
    be.close()


def test_many_ports_on_one_handle(simxen_guest):
    sim, g = simxen_guest
    f = sim.xen(g).event_channels()
    b = sim.xen(0).event_channels()
    pairs = []
    for _ in range(8):
        fp = f.alloc_unbound(0)
        pairs.append((fp, b.bind_interdomain(g, fp)))
    wait(b)
    assert b.pending() == []
    for fp, _ in pairs[::2]:
        f.notify(fp)
    got = wait(b)
    assert sorted(got) == sorted(bp for _, bp in pairs[::2])
    f.close()
    b.close()


def test_peers_that_never_drain_cannot_starve_the_others(simxen_guest):
    sim, g = simxen_guest
    back = sim.xen(0).event_channels()
    stuck = []
    for _ in range(40):                          # 40 guest handles that never read
        h = sim.xen(g).event_channels()
        p = h.alloc_unbound(0)
        stuck.append((h, back.bind_interdomain(g, p)))
    honest = sim.xen(g).event_channels()
    hp = honest.alloc_unbound(0)
    lp = back.bind_interdomain(g, hp)
    for _ in range(50):
        for _, port in stuck:
            back.notify(port)
    back.notify(lp)
    assert wait(honest) == [hp]
    for h, _ in stuck:
        h.close()
    honest.close()
    back.close()
