"""The toolstack part of a plug (`toolstack.plug_vbd`) against the simulated XenStore: two
plugs into one guest at once never share a virtual-device number, and nothing is left behind."""

import threading

from xapi_storage.blkback import toolstack
from xapi_storage.blkback.server import XenStore


def _tree(xs, path):
    out = []

    def walk(p):
        v = xs.read(p)
        if v is None:
            return
        out.append((p, v))
        for c in xs.list(p):
            walk(f"{p}/{c}")
    walk(path)
    return sorted(out)


def _state(xs, g):
    return _tree(xs, f"/local/domain/{g}/device") + _tree(xs, "/local/domain/0/backend")


def test_plug_that_loses_the_race_for_a_number_takes_the_next(simxen_guest, monkeypatch):
    """Another plug takes the number `free_devid` just chose, before our transaction: the
    transaction sees the directory and plug_vbd picks again instead of failing."""
    sim, g = simxen_guest
    xs = XenStore(sim.xenstore_path(0))
    before = _state(xs, g)
    real = toolstack.free_devid
    taken = []

    def racing_free_devid(xs_, guest, *a, **kw):
        devid, name = real(xs_, guest, *a, **kw)
        if not taken:       # the concurrent plug wins this number
            taken.append(toolstack.create_vbd(xs_, guest, devid, "null", dev_name=name))
        return devid, name

    monkeypatch.setattr(toolstack, "free_devid", racing_free_devid)
    try:
        devid, name, fe, be, created = toolstack.plug_vbd(xs, g, "null")
        assert devid == toolstack.xvd_devid(2) and name == "xvdc"
        assert taken[0][0] == f"/local/domain/{g}/device/vbd/{toolstack.xvd_devid(1)}"
        assert xs.read(f"{be}/params") == "null" and xs.read(f"{fe}/backend") == be
        toolstack.remove_vbd(xs, fe, be, created)
        toolstack.remove_vbd(xs, *taken[0])
        assert _state(xs, g) == before
    finally:
        xs.close()


def test_concurrent_plugs_get_distinct_numbers(simxen_guest):
    """Eight plugs at once on eight XenStore connections: eight devices, no number twice,
    each backend directory holding its own params (a transaction that lost is retried)."""
    sim, g = simxen_guest
    n = 8
    conns = [XenStore(sim.xenstore_path(0)) for _ in range(n)]
    before = _state(conns[0], g)
    results = [None] * n
    go = threading.Barrier(n)

    def plug(i):
        go.wait()
        try:
            results[i] = toolstack.plug_vbd(conns[i], g, f"raw:/img{i}")
        except Exception as e:     # noqa: BLE001 - reported by the assertion below
            results[i] = e
    threads = [threading.Thread(target=plug, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert all(isinstance(r, tuple) for r in results), results
        assert len({r[0] for r in results}) == n
        xs = conns[0]
        for i, (devid, name, fe, be, _c) in enumerate(results):
            assert xs.read(f"{be}/params") == f"raw:/img{i}"
            assert xs.read(f"{be}/dev") == name
            assert xs.read(f"{fe}/backend") == be
    finally:
        # the plug that made the parent directories removes them if it goes last (only it
        # knows it made them), so it goes last here
        for r in sorted((r for r in results if isinstance(r, tuple)), key=lambda r: bool(r[4])):
            toolstack.remove_vbd(conns[0], *r[2:])
        after = _state(conns[0], g)
        for c in conns:
            c.close()
    assert after == before
