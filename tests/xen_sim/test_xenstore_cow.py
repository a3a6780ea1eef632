"""The XenStore's copy-on-write snapshots (transactions) against plain deep copies: the
same random conversation must get the same replies and watch events from both."""

import copy
import random

from xapi_storage.xen import xs_wire as W
from xapi_storage.xen.sim import xenstore as X


class DeepCopyTree(X.Tree):
    def snapshot(self):
        root = copy.deepcopy(self.root)
        t = DeepCopyTree(root)

        def stamp(n):
            n.ver = t.ver
            for c in n.children.values():
                stamp(c)
        stamp(root)
        return t


def run(server, seed):
    rng = random.Random(seed)
    out = []
    conns = []
    for domid in (0, 0, 1):
        sink = []
        conns.append((server.connect(domid, sink.append), sink))
    paths = [b"/a", b"/a/b", b"/a/b/c", b"/a/d", b"/e", b"/local/domain/1/data/x",
             b"/local/domain/1/data", b"data/y"]
    txs = {0: [], 1: [], 2: []}
    for i in range(1500):
        k = rng.randrange(3)
        conn, sink = conns[k]
        op = rng.choice(["write", "read", "rm", "mkdir", "dir", "perms", "setperms",
                         "start", "commit", "abort", "watch"])
        tx = rng.choice(txs[k]) if txs[k] and rng.random() < 0.7 else 0
        p = rng.choice(paths)
        if op == "write":
            conn.handle(W.WRITE, i, tx, p + b"\0" + str(rng.randrange(9)).encode())
        elif op == "read":
            conn.handle(W.READ, i, tx, p + b"\0")
        elif op == "rm":
            conn.handle(W.RM, i, tx, p + b"\0")
        elif op == "mkdir":
            conn.handle(W.MKDIR, i, tx, p + b"\0")
        elif op == "dir":
            conn.handle(W.DIRECTORY, i, tx, p + b"\0")
        elif op == "perms":
            conn.handle(W.GET_PERMS, i, tx, p + b"\0")
        elif op == "setperms":
            conn.handle(W.SET_PERMS, i, tx, p + b"\0" + rng.choice([b"n0\0r1\0", b"b1\0", b"n1\0"]))
        elif op == "start":
            conn.handle(W.TRANSACTION_START, i, 0, b"\0")
            reply = sink[-1]
            if W.HEADER.unpack_from(reply)[0] == W.TRANSACTION_START:
                txs[k].append(int(reply[16:-1]))
        elif op in ("commit", "abort") and tx:
            conn.handle(W.TRANSACTION_END, i, tx, b"T\0" if op == "commit" else b"F\0")
            txs[k].remove(tx)
        elif op == "watch":
            conn.handle(W.WATCH, i, 0, p + b"\0" + b"t%d\0" % i)
    for conn, sink in conns:
        out.append(list(sink))
    return out


def test_cow_snapshots_behave_like_deep_copies():
    for seed in range(5):
        a = X.Server()
        b = X.Server()
        b.store.tree = DeepCopyTree(b.store.tree.root)
        ra, rb = run(a, seed), run(b, seed)
        assert ra == rb, f"seed {seed}"
        assert sum(len(x) for x in ra) > 1500
