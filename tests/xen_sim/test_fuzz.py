"""Random and hostile input for every socket of the daemon: it must answer or drop that
client, and keep serving everybody else with a consistent store."""

import json
import os
import random
import socket

from pyxs import Client

from xapi_storage.xen import xs_wire as W
from xapi_storage.xen.sim import layout
from conftest import RawXs

PATHS = [b"/", b"/a", b"/a/b", b"/a/b/c", b"a", b"a/b", b"data/x", b"device/vbd/1",
         b"/local/domain/0", b"/local/domain/1/device", b"@introduceDomain", b"/tool",
         b"//", b"/a/", b"", b"/\xff", b"x" * 3100]
PERMS = [b"n0", b"r1", b"b1", b"w7", b"n1", b"x", b"b", b"r99999"]


def random_payload(rng):
    kind = rng.random()
    if kind < 0.2:
        return os.urandom(rng.randrange(0, 64))
    parts = [rng.choice(PATHS)]
    for _ in range(rng.randrange(0, 4)):
        parts.append(rng.choice(PERMS + [b"tok", b"T", b"F", b"0", b"1", os.urandom(3)]))
    payload = b"\0".join(parts)
    if rng.random() < 0.8:
        payload += b"\0"
    return payload


def test_random_xenstore_messages(simxen_guest):
    sim, g = simxen_guest
    rng = random.Random(1234)
    conns = [RawXs(sim.xenstore_path(0)), RawXs(sim.xenstore_path(g))]
    types = list(range(0, 25)) + [99, 2 ** 31]
    for i in range(3000):
        c = rng.choice(conns)
        t = rng.choice(types)
        tx = rng.choice([0, 0, 0, 1, 2, 3, 2 ** 32 - 1])
        if t in (W.INTRODUCE, W.RELEASE) and c is conns[0]:
            continue          # dom0 releasing the guest would only end the guest's socket
        c.send(t, random_payload(rng), req_id=i, tx_id=tx)
        while True:
            m = c.recv()
            assert m is not None, f"daemon dropped a client after message {i} (type {t})"
            if m[0] != W.WATCH_EVENT:
                assert m[1] == i
                assert m[3] != b"EIO\x00", f"internal error on message {i} (type {t})"
                break
    for c in conns:
        c.close()
    with Client(unix_socket_path=sim.xenstore_path(0)) as c:
        assert c.read(b"/local/domain/0/name") == b"Domain-0"
        # the store is still a consistent tree: every listed child can be read
        for top in c.list(b"/"):
            c.read(b"/" + top)


def _json_lines(path, lines):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    f = s.makefile("rwb")
    out = []
    for line in lines:
        f.write(line + b"\n")
        f.flush()
        out.append(f.readline())
    s.close()
    return out


def test_random_control_and_broker_requests(simxen_guest):
    sim, g = simxen_guest
    rng = random.Random(99)
    values = [None, True, -1, 0, 1, g, 4095, 2 ** 40, "x", [], {}, 1.5]
    ops = ["hello", "alloc_unbound", "bind_interdomain", "peer", "unbind", "create_domain",
           "destroy_domain", "reserve", "list_domains", "ping", "nope", 7]
    keys = ["domid", "remote_domid", "remote_port", "port", "name", "frames", "refs", "mem_mb"]
    for path in (layout.control_sock(sim.dir), layout.evtchn_sock(sim.dir)):
        lines = [b'{"op": "hello", "domid": 0}']
        for _ in range(400):
            req = {"op": rng.choice(ops)}
            for k in rng.sample(keys, rng.randrange(0, 4)):
                req[k] = rng.choice(values)
            if req.get("op") == "destroy_domain":
                continue
            lines.append(json.dumps(req).encode() if rng.random() < 0.9 else os.urandom(20).replace(b"\n", b""))
        for reply in _json_lines(path, lines):
            res = json.loads(reply)
            assert isinstance(res["ok"], bool) and (res["ok"] or res["error"])
            assert "internal error" not in res.get("message", ""), res
    assert [d["domid"] for d in sim.domains()][:2] == [0, g]
    with Client(unix_socket_path=sim.xenstore_path(g)) as c:
        assert c.read(b"name") == b"guest1"
