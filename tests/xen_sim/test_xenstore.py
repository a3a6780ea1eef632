"""pyxs (and raw wire messages) against the simulated XenStore."""

import errno
import threading

import pytest
from pyxs import Client, PyXSError

from xapi_storage.xen import xs_wire as W


def client(sim, domid=0):
    return Client(unix_socket_path=sim.xenstore_path(domid))


def err(e):
    return e.value.args[0]


def test_read_write_list_mkdir_rm(simxen, raw_xs):
    r = raw_xs(simxen.xenstore_path(0))
    assert r.call(W.WRITE, b"/a/b/c\x00") == (W.WRITE, 7, 0, b"OK\x00")   # empty value
    assert r.call(W.READ, b"/a/b/c\x00") == (W.READ, 7, 0, b"")
    blob = bytes(range(256))                                               # binary, NULs too
    assert r.call(W.WRITE, b"/a/bin\x00" + blob)[3] == b"OK\x00"
    assert r.call(W.READ, b"/a/bin\x00")[3] == blob
    with client(simxen) as c:
        c.write(b"/a/b/c", b"v1")                     # creates missing parents
        assert c.read(b"/a/b/c") == b"v1"
        assert c.read(b"/a/b") == b""
        c.mkdir(b"/a/d")
        c.mkdir(b"/a/d")                              # mkdir of an existing node is fine
        assert c.list(b"/a") == [b"b", b"bin", b"d"]         # sorted, as oxenstored
        assert c.list(b"/a/d") == []
        assert c.exists(b"/a/d") and not c.exists(b"/a/nope")
        with pytest.raises(PyXSError) as e:
            c.read(b"/a/nope")
        assert err(e) == errno.ENOENT
        c.delete(b"/a/b")                             # recursive
        assert c.list(b"/a") == [b"bin", b"d"]
        c.delete(b"/a/b")                             # absent node, parent exists: OK
        with pytest.raises(PyXSError) as e:
            c.delete(b"/x/y/z")                       # parent absent: ENOENT
        assert err(e) == errno.ENOENT
        assert c.get_domain_path(7) == b"/local/domain/7"


def test_guest_domain_nodes_and_relative_paths(simxen_guest):
    sim, g = simxen_guest
    with client(sim) as c:
        assert c.read(f"/local/domain/{g}/name".encode()) == b"guest1"
        assert c.get_perms(f"/local/domain/{g}".encode()) == [b"n0", f"r{g}".encode()]
        assert c.get_perms(f"/local/domain/{g}/device".encode()) == [f"n{g}".encode()]
        assert c.is_domain_introduced(g) and not c.is_domain_introduced(g + 5)
    with client(sim, g) as c:
        assert c.read(b"name") == b"guest1"            # relative to /local/domain/<g>
        assert c.read(b"domid") == str(g).encode()
        c.write(b"data/k", b"v")
        assert c.read(f"/local/domain/{g}/data/k".encode()) == b"v"


def test_permissions_between_guest_and_dom0(simxen_guest):
    sim, g = simxen_guest
    G = str(g).encode()
    with client(sim) as d0, client(sim, g) as gu:
        d0.write(b"/secret/key", b"s")                # dom0-owned, default none
        for op in (lambda: gu.read(b"/secret/key"), lambda: gu.list(b"/secret"),
                   lambda: gu.get_perms(b"/secret"), lambda: gu.write(b"/secret/key", b"x"),
                   lambda: gu.delete(b"/secret/key"), lambda: gu.write(b"/secret/new", b"x"),
                   lambda: gu.mkdir(b"/secret/new"), lambda: gu.set_perms(b"/secret", [b"b" + G])):
            with pytest.raises(PyXSError) as e:
                op()
            assert err(e) == errno.EACCES
        # a missing node under an unreadable parent is EACCES too (nothing leaks)
        with pytest.raises(PyXSError) as e:
            gu.read(b"/secret/missing")
        assert err(e) == errno.EACCES
        # under a readable parent it is ENOENT
        with pytest.raises(PyXSError) as e:
            gu.read(b"missing")
        assert err(e) == errno.ENOENT
        # the guest's home is readable but not writable by it
        with pytest.raises(PyXSError) as e:
            gu.write(b"name", b"evil")
        assert err(e) == errno.EACCES
        # read access granted by ACL, then write
        d0.set_perms(b"/secret/key", [b"n0", b"r" + G])
        assert gu.read(b"/secret/key") == b"s"
        with pytest.raises(PyXSError):
            gu.write(b"/secret/key", b"x")
        d0.set_perms(b"/secret/key", [b"n0", b"b" + G])
        gu.write(b"/secret/key", b"x")
        assert d0.read(b"/secret/key") == b"x"
        # what the guest creates it owns; the parent's ACL is inherited
        d0.mkdir(b"/shared")
        d0.set_perms(b"/shared", [b"n0", b"b" + G, b"r5"])
        gu.write(b"/shared/mine/deep", b"1")
        assert d0.get_perms(b"/shared/mine") == [b"n" + G, b"b" + G, b"r5"]
        assert d0.get_perms(b"/shared/mine/deep") == [b"n" + G, b"b" + G, b"r5"]
        # the owner may change perms but not give the node away
        gu.set_perms(b"/shared/mine", [b"n" + G, b"r0"])
        with pytest.raises(PyXSError) as e:
            gu.set_perms(b"/shared/mine", [b"n0"])
        assert err(e) == errno.EPERM
        # dom0 creating below a guest-owned node keeps dom0's ownership rules (inherit)
        d0.write(f"/local/domain/{g}/device/vbd/51712/state".encode(), b"1")
        assert d0.get_perms(f"/local/domain/{g}/device/vbd/51712".encode())[0] == b"n" + G


def test_perms_in_transaction_like_libxl(simxen_guest):
    sim, g = simxen_guest
    fe = f"/local/domain/{g}/device/vbd/51712".encode()
    be = f"/local/domain/0/backend/pyvbd/{g}/51712".encode()
    with client(sim) as d0:
        d0.transaction()
        d0.mkdir(fe)
        d0.set_perms(fe, [f"n{g}".encode(), b"r0"])
        d0.write(fe + b"/state", b"1")
        d0.mkdir(be)
        d0.set_perms(be, [b"n0", f"r{g}".encode()])
        d0.write(be + b"/state", b"1")
        assert d0.commit()
    with client(sim, g) as gu:
        assert gu.read(be + b"/state") == b"1"
        gu.write(fe + b"/state", b"3")
        with pytest.raises(PyXSError):
            gu.write(be + b"/state", b"4")


def test_set_perms_validation(simxen):
    with client(simxen) as c:
        c.mkdir(b"/p")
        for bad in ([b"x0"], [b"n"], [b"n99999"]):
            with pytest.raises((PyXSError, ValueError)):
                c.set_perms(b"/p", bad)
        with pytest.raises(PyXSError) as e:
            c.set_perms(b"/nope", [b"n0"])
        assert err(e) == errno.ENOENT


def test_watches(simxen_guest):
    sim, g = simxen_guest
    with client(sim) as c, client(sim) as w:
        m = w.monitor()
        m.watch(b"/w", b"tok")
        ev = m.wait()
        assert next(ev) == (b"/w", b"tok")            # fires once when set
        c.write(b"/w/a", b"1")
        assert next(ev) == (b"/w/a", b"tok")
        c.write(b"/wx", b"1")                         # not below /w: no event
        c.write(b"/w", b"2")
        assert next(ev) == (b"/w", b"tok")
        m.watch(b"/w/a/b", b"deep")
        assert next(ev) == (b"/w/a/b", b"deep")
        c.delete(b"/w")                               # rm fires watches above and below
        got = {next(ev), next(ev)}
        assert got == {(b"/w", b"tok"), (b"/w/a/b", b"deep")}
        m.unwatch(b"/w/a/b", b"deep")
        with pytest.raises(PyXSError) as e:
            m.unwatch(b"/w/a/b", b"deep")
        assert err(e) == errno.ENOENT
        m.close()


def test_guest_watch_relative_and_permission_filtered(simxen_guest):
    sim, g = simxen_guest
    with client(sim) as d0, client(sim, g) as gu:
        m = gu.monitor()
        m.watch(b"device", b"t")
        ev = m.wait()
        assert next(ev) == (b"device", b"t")
        d0.write(f"/local/domain/{g}/device/x".encode(), b"1")
        assert next(ev) == (b"device/x", b"t")          # relative, as it was set
        m.watch(b"/hidden", b"h")
        assert next(ev) == (b"/hidden", b"h")
        d0.write(b"/hidden/y", b"1")                     # guest may not read: no event
        d0.write(f"/local/domain/{g}/device/z".encode(), b"2")
        assert next(ev) == (b"device/z", b"t")
        m.close()


def test_transactions(simxen):
    with client(simxen) as a, client(simxen) as b:
        a.write(b"/t/x", b"0")
        a.transaction()
        assert a.read(b"/t/x") == b"0"
        a.write(b"/t/x", b"1")
        a.write(b"/t/new", b"n")
        assert b.read(b"/t/x") == b"0"                # invisible before commit
        assert not b.exists(b"/t/new")
        assert a.commit()
        assert b.read(b"/t/x") == b"1" and b.read(b"/t/new") == b"n"
        # conflict: someone else changes a node the transaction read
        a.transaction()
        a.read(b"/t/x")
        b.write(b"/t/x", b"2")
        a.write(b"/t/y", b"3")
        assert a.commit() is False                    # EAGAIN
        assert not b.exists(b"/t/y")
        # conflict on creation: both create the same node
        a.transaction()
        assert not a.exists(b"/t/z")
        b.write(b"/t/z", b"b")
        a.write(b"/t/z", b"a")
        assert a.commit() is False
        assert b.read(b"/t/z") == b"b"
        # no conflict when others touch unrelated nodes
        a.transaction()
        a.write(b"/t/q", b"a")
        b.write(b"/other", b"b")
        assert a.commit()
        # rollback
        a.transaction()
        a.write(b"/t/gone", b"1")
        a.rollback()
        assert not b.exists(b"/t/gone")


def test_transaction_watch_fires_at_commit(simxen):
    with client(simxen) as a, client(simxen) as w:
        m = w.monitor()
        m.watch(b"/tw", b"t")
        ev = m.wait()
        assert next(ev) == (b"/tw", b"t")
        a.transaction()
        a.write(b"/tw/1", b"x")
        got = []
        th = threading.Thread(target=lambda: got.append(next(ev)), daemon=True)
        th.start()
        th.join(0.3)
        assert not got                                # nothing before commit
        assert a.commit()
        th.join(5)
        assert got == [(b"/tw/1", b"t")]
        m.close()


def test_special_watches_introduce_release(simxen):
    with client(simxen) as w:
        m = w.monitor()
        m.watch(b"@introduceDomain", b"i")
        m.watch(b"@releaseDomain", b"r")
        ev = m.wait()
        assert {next(ev), next(ev)} == {(b"@introduceDomain", b"i"), (b"@releaseDomain", b"r")}
        g = simxen.create_domain("vm")
        assert next(ev) == (b"@introduceDomain", b"i")
        with client(simxen) as c:
            assert c.read(f"/local/domain/{g}/name".encode()) == b"vm"
        simxen.destroy_domain(g)
        assert next(ev) == (b"@releaseDomain", b"r")
        with client(simxen) as c:
            assert not c.exists(f"/local/domain/{g}".encode())
            assert not c.is_domain_introduced(g)
        m.close()


def test_release_disconnects_guest_and_guest_cannot_introduce(simxen, raw_xs):
    g = simxen.create_domain("vm")
    r = raw_xs(simxen.xenstore_path(g))
    assert r.call(W.INTRODUCE, b"5\x00123\x001\x00")[3] == b"EACCES\x00"
    assert r.call(W.RELEASE, b"0\x00")[3] == b"EACCES\x00"
    # (pyxs refuses release_domain/resume client-side off a real dom0: raw messages here)
    d0 = raw_xs(simxen.xenstore_path(0))
    assert d0.call(W.RELEASE, b"%d\x00" % g)[3] == b"OK\x00"
    assert r.recv() is None                            # the guest's connection is closed
    assert d0.call(W.IS_DOMAIN_INTRODUCED, b"%d\x00" % g)[3] == b"F\x00"
    assert d0.call(W.INTRODUCE, b"%d\x001\x001\x00" % g)[3] == b"OK\x00"   # socket is back
    with client(simxen, g) as gu:
        assert gu.read(b"name") == b"vm"


def test_malformed_messages(simxen, raw_xs):
    r = raw_xs(simxen.xenstore_path(0))
    assert r.call(99, b"x\x00") == (W.ERROR, 7, 0, b"ENOSYS\x00")           # unknown type
    assert r.call(W.READ, b"/local")[3] == b"EINVAL\x00"                    # no NUL
    assert r.call(W.READ, b"/a\x00b\x00")[3] == b"EINVAL\x00"               # two args
    assert r.call(W.READ, b"\x00")[3] == b"EINVAL\x00"                      # empty path
    assert r.call(W.READ, b"/a//b\x00")[3] == b"EINVAL\x00"
    assert r.call(W.READ, b"/a/\x00")[3] == b"EINVAL\x00"
    assert r.call(W.READ, b"/a b\x00")[3] == b"EINVAL\x00"
    assert r.call(W.READ, b"/\xff\x00")[3] == b"EINVAL\x00"
    assert r.call(W.READ, b"/" + b"a" * 3100 + b"\x00")[3] == b"EINVAL\x00"  # too long
    assert r.call(W.WRITE, b"/nonul")[3] == b"EINVAL\x00"
    assert r.call(W.WATCH, b"/a\x00")[3] == b"EINVAL\x00"                   # no token
    assert r.call(W.WATCH, b"@other\x00t\x00")[3] == b"EINVAL\x00"
    assert r.call(W.SET_PERMS, b"/\x00q7\x00")[3] == b"EINVAL\x00"
    assert r.call(W.TRANSACTION_END, b"T\x00", tx_id=12345)[3] == b"ENOENT\x00"
    assert r.call(W.READ, b"/\x00", tx_id=999)[3] == b"ENOENT\x00"          # unknown tx
    assert r.call(W.TRANSACTION_END, b"X\x00")[3] == b"EINVAL\x00"
    assert r.call(W.GET_DOMAIN_PATH, b"abc\x00")[3] == b"EINVAL\x00"
    t, rid, _, p = r.call(W.TRANSACTION_START, b"\x00", req_id=42)
    assert t == W.TRANSACTION_START and rid == 42
    txid = int(p[:-1])
    assert r.call(W.TRANSACTION_START, b"\x00", tx_id=txid)[3] == b"EBUSY\x00"
    # still fine after all that
    assert r.call(W.READ, b"/local/domain/0/name\x00") == (W.READ, 7, 0, b"Domain-0")


def test_oversized_message_disconnects_only_that_client(simxen, raw_xs):
    bad = raw_xs(simxen.xenstore_path(0))
    good = raw_xs(simxen.xenstore_path(0))
    bad.sock.sendall(W.HEADER.pack(W.WRITE, 1, 0, 4097))
    assert bad.recv() is None
    assert good.call(W.READ, b"/local/domain/0/domid\x00")[3] == b"0"


def test_garbage_and_half_messages_do_not_hurt_the_daemon(simxen, raw_xs):
    import os
    for n in range(20):
        r = raw_xs(simxen.xenstore_path(0))
        r.sock.sendall(os.urandom(8 + n))                  # half a header, then gone
        r.close()
    r = raw_xs(simxen.xenstore_path(0))
    r.sock.sendall(W.HEADER.pack(W.WRITE, 1, 0, 100) + b"/x\x00")   # half a payload
    r.close()
    with client(simxen) as c:
        assert c.read(b"/local/domain/0/name") == b"Domain-0"
        assert not c.exists(b"/x")


def test_client_that_never_reads_is_dropped(simxen, raw_xs):
    hog = raw_xs(simxen.xenstore_path(0))
    with client(simxen) as c:
        c.write(b"/big", b"x" * 4000)
    hog.sock.setblocking(False)
    msg = W.pack(W.READ, 1, 0, b"/big\x00")
    sent = 0
    try:
        for _ in range(20000):                         # ~80 MB of replies asked for
            hog.sock.send(msg)
            sent += 1
    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
        pass
    with client(simxen) as c:                          # the daemon still serves others
        assert c.read(b"/local/domain/0/name") == b"Domain-0"


def test_guest_quotas(simxen_guest, raw_xs):
    sim, g = simxen_guest
    r = raw_xs(sim.xenstore_path(g))
    assert r.call(W.WRITE, b"data/v\x00" + b"x" * 2049)[3] == b"ENOSPC\x00"
    for i in range(10):
        assert r.call(W.TRANSACTION_START, b"\x00")[0] == W.TRANSACTION_START
    assert r.call(W.TRANSACTION_START, b"\x00")[3] == b"ENOSPC\x00"


def test_directory_part(simxen, raw_xs):
    with client(simxen) as c:
        for i in range(600):
            c.mkdir(b"/many/child-%04d" % i)
    r = raw_xs(simxen.xenstore_path(0))
    names, off = [], 0
    while True:
        t, _, _, p = r.call(W.DIRECTORY_PART, b"/many\x00%d\x00" % off)
        assert t == W.DIRECTORY_PART
        gen, rest = p.split(b"\x00", 1)
        if rest == b"\x00" or rest == b"":
            break
        done = rest.endswith(b"\x00\x00")
        chunk = rest[:-1] if done else rest
        names += chunk[:-1].split(b"\x00")
        off += len(chunk)
        if done:
            break
    assert names == [b"child-%04d" % i for i in range(600)]
    assert r.call(W.DIRECTORY, b"/many\x00")[3] == b"E2BIG\x00"


def test_deep_paths_and_node_quota(simxen_guest, raw_xs):
    sim, g = simxen_guest
    r = raw_xs(sim.xenstore_path(g))
    deep = b"data/" + b"/".join([b"a"] * 900)                 # ~1.8 KiB, 900 levels
    assert r.call(W.WRITE, deep + b"\x00v")[3] == b"OK\x00"
    assert r.call(W.READ, deep + b"\x00")[3] == b"v"
    t = r.call(W.TRANSACTION_START, b"\x00")[3]              # snapshot of a deep tree
    assert r.call(W.TRANSACTION_END, b"T\x00", tx_id=int(t[:-1]))[3] == b"OK\x00"
    assert r.call(W.RM, b"data/a\x00")[3] == b"OK\x00"
    n, res = 0, b"OK\x00"
    while res == b"OK\x00" and n < 1100:
        res = r.call(W.WRITE, b"data/n%d\x00x" % n)[3]
        n += 1
    assert res == b"ENOSPC\x00" and 990 < n < 1000           # quota 1000 (a few owned already)
    assert r.call(W.RM, b"data/n1\x00")[3] == b"OK\x00"
    assert r.call(W.WRITE, b"data/again\x00x")[3] == b"OK\x00"   # freed by rm
