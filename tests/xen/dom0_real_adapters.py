"""Runs INSIDE dom0 of the test bed (tests/xen/test_real_adapters.py starts it with the dom0
venv's python): the real-Xen adapters of xapi_storage.xen.real, against the real hypervisor.

Each check is a function; `python dom0_real_adapters.py NAME...` runs those named (all if
none) and prints one line `PASS name` or `FAIL name: why` per check, then exits 1 if any
failed. Grants: dom0 grants pages to itself with gntalloc and maps them with gntdev.
Event channels: a loopback inside dom0 (alloc_unbound for domain 0, bind_interdomain to it).
XenStore: pyxs on the real oxenstored's unix socket.
"""

import errno
import os
import select
import sys
import time
import traceback

from xapi_storage.xen import XenError, open_xen

PAGE = 4096


def _pattern(n, seed):
    return bytes((i * 7 + seed + (i >> 12)) & 0xFF for i in range(n))


def check_identity():
    t0 = time.monotonic()
    xen = open_xen("real")
    print("  open_xen took %.2fs" % (time.monotonic() - t0))
    assert xen.domid == 0, xen.domid
    assert os.path.exists(xen.xenstore_path), xen.xenstore_path
    print("  domid", xen.domid, "xenstore", xen.xenstore_path)


def check_grant_roundtrip_contiguous():
    xen = open_xen("real")
    a, m = xen.grant_allocator(), xen.grant_mapper()
    try:
        ga = a.grant(0, 3, writable=True)
        assert len(ga.refs) == 3 and len(set(ga.refs)) == 3, ga.refs
        assert bytes(ga.buffer) == bytes(3 * PAGE), "gntalloc pages not zeroed"
        data = _pattern(3 * PAGE, 1)
        ga.buffer[:] = data
        # the three refs, in a scrambled order, in ONE contiguous mapping
        order = (ga.refs[2], ga.refs[0], ga.refs[1])
        mp = m.map(0, order, writable=True)
        assert len(mp.buffer) == 3 * PAGE and not mp.buffer.readonly
        want = data[2 * PAGE:] + data[:PAGE] + data[PAGE:2 * PAGE]
        assert bytes(mp.buffer) == want, "mapped pages differ from the granted ones"
        # writes through the mapping land in the granter's pages, and back
        mp.buffer[PAGE:PAGE + 5] = b"HELLO"            # = page 0 of the allocation
        assert bytes(ga.buffer[:5]) == b"HELLO"
        ga.buffer[2 * PAGE + 100:2 * PAGE + 103] = b"abc"  # page 2 = first page of the map
        assert bytes(mp.buffer[100:103]) == b"abc"
        mp.unmap()
        mp.unmap()                                      # idempotent
        # mapping again after unmap works (the reservation was released)
        mp2 = m.map(0, ga.refs[1:2], writable=True)
        assert bytes(mp2.buffer[:16]) == data[PAGE:PAGE + 16]
        mp2.unmap()
        ga.revoke()
        print("  refs", ga.refs)
    finally:
        m.close()
        a.close()


def check_grant_readonly():
    xen = open_xen("real")
    a, m = xen.grant_allocator(), xen.grant_mapper()
    try:
        rw = a.grant(0, 1, writable=True)
        rw.buffer[:4] = b"RWRW"
        # a read-only mapping of a writable grant: the view refuses writes
        ro = m.map(0, rw.refs, writable=False)
        assert ro.buffer.readonly and bytes(ro.buffer[:4]) == b"RWRW"
        try:
            ro.buffer[0] = 1
        except TypeError:
            pass
        else:
            raise AssertionError("wrote through a read-only mapping")
        ro.unmap()
        # a read-only GRANT: Xen refuses a writable map, and allows a read-only one
        rog = a.grant(0, 1, writable=False)
        rog.buffer[:4] = b"RORO"
        try:
            bad = m.map(0, rog.refs, writable=True)
        except XenError as e:
            print("  writable map of a read-only grant refused:", e)
        else:
            bad.unmap()
            raise AssertionError("Xen let us map a read-only grant writable")
        ok = m.map(0, rog.refs, writable=False)
        assert bytes(ok.buffer[:4]) == b"RORO"
        ok.unmap()
        # a ref nobody granted: refused, and nothing stays reserved
        try:
            bad = m.map(0, [rog.refs[0] + 5000], writable=False)
        except XenError as e:
            print("  map of an ungranted ref refused:", e)
        else:
            bad.unmap()
            raise AssertionError("mapped a ref that was never granted")
        rw.revoke()
        rog.revoke()
    finally:
        m.close()
        a.close()


def _wait_pending(ev, want, timeout=5.0):
    """Poll `ev` until `want` is among its pending ports; return every port seen."""
    seen = []
    end = time.monotonic() + timeout
    while want not in seen:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"port {want} never fired (saw {seen})")
        r, _, _ = select.select([ev.fileno()], [], [], left)
        if r:
            seen += ev.pending()
    return seen


def _quiet(ev, wait=0.3):
    r, _, _ = select.select([ev.fileno()], [], [], wait)
    return [] if not r else ev.pending()


def check_evtchn_loopback():
    xen = open_xen("real")
    fe, be = xen.event_channels(), xen.event_channels()
    try:
        p = fe.alloc_unbound(0)
        lp = be.bind_interdomain(0, p)
        assert lp != p, (lp, p)
        # Xen marks a freshly bound interdomain port pending: one spurious event
        spurious = _quiet(be) + _quiet(fe)
        print("  unbound", p, "bound", lp, "events right after bind:", spurious)
        assert set(spurious) <= {p, lp}, spurious
        assert _quiet(be) == [] and _quiet(fe) == [], "events keep coming with no notify"
        for _ in range(3):                      # delivery is unmasked again after pending()
            be.notify(lp)
            assert _wait_pending(fe, p) == [p]
            fe.notify(p)
            assert _wait_pending(be, lp) == [lp]
        # notifications before pending() coalesce into one event
        for _ in range(5):
            fe.notify(p)
        time.sleep(0.2)
        got = _wait_pending(be, lp)
        assert got == [lp], got
        # Linux latches an event that arrives while the port is queued to us (masked) and
        # delivers it once more when pending() unmasks the port: at most one extra event,
        # and then silence
        extra = _quiet(be)
        assert extra in ([], [lp]), extra
        assert _quiet(be) == [], "notifications delivered more than twice"
        print("  5 notifies before pending() gave %d event(s)" % (1 + len(extra)))
        be.unbind(lp)
        be.unbind(lp)                           # idempotent
        fe.unbind(p)
        try:
            fe.notify(p)
        except XenError as e:
            print("  notify of an unbound port refused:", e)
        else:
            raise AssertionError("notify of an unbound port succeeded")
        try:
            be.bind_interdomain(0, 1 << 20)
        except XenError as e:
            print("  bind to a bogus port refused:", e)
        else:
            raise AssertionError("bound a bogus port")
    finally:
        fe.close()
        be.close()


def check_xenstore():
    from pyxs import Client
    from pyxs.exceptions import PyXSError
    xen = open_xen("real")
    base = b"/local/domain/0/data/realxen-test"
    with Client(unix_socket_path=xen.xenstore_path) as c, \
            Client(unix_socket_path=xen.xenstore_path) as w:
        try:
            c.delete(base)
        except PyXSError as e:             # oxenstored: RM of an absent node is ENOENT
            assert e.args[0] == errno.ENOENT, e
        # a whole directory with its permissions, in ONE transaction (as libxl writes vbds)
        c.transaction()
        c.mkdir(base + b"/dir")
        c.set_perms(base + b"/dir", [b"n0", b"r1"])
        c.write(base + b"/dir/key", b"value")
        assert c.commit()
        assert c.read(base + b"/dir/key") == b"value"
        perms = c.get_perms(base + b"/dir")
        assert perms == [b"n0", b"r1"], perms
        # watches over the unix socket: fire once at registration, then on change / removal
        m = w.monitor()
        m.watch(base + b"/dir", b"tok")

        def event():
            return tuple(m.events.get(timeout=5))     # queue.Empty if nothing comes
        assert event() == (base + b"/dir", b"tok")
        c.write(base + b"/dir/key", b"changed")
        ev = event()
        assert ev == (base + b"/dir/key", b"tok"), ev
        c.delete(base)
        ev = event()
        assert ev[1] == b"tok" and ev[0] in (base, base + b"/dir", base + b"/dir/key"), ev
        m.unwatch(base + b"/dir", b"tok")
        # a transaction that conflicts is told so (EAGAIN -> commit() is False)
        c.write(base + b"/x", b"0")
        c.transaction()
        c.read(base + b"/x")
        w.write(base + b"/x", b"1")
        c.write(base + b"/x", b"2")
        assert c.commit() is False, "conflicting transaction committed"
        assert c.read(base + b"/x") == b"1"
        c.delete(base)


CHECKS = {n[len("check_"):]: f for n, f in globals().items() if n.startswith("check_")}


def main(names):
    failed = 0
    for name in names or CHECKS:
        t0 = time.monotonic()
        try:
            CHECKS[name]()
        except Exception as e:                   # noqa: BLE001 - report every check
            failed += 1
            traceback.print_exc()
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
        else:
            print(f"PASS {name} ({time.monotonic() - t0:.2f}s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
