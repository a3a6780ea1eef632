"""A guest written from docs/simxen.md alone (raw sockets, mmap, fcntl; none of our client
code) talking to a backend that uses the library: checks that the documented protocol is
the implemented one."""

import fcntl
import json
import mmap
import os
import select
import socket
import struct

from xapi_storage.xen import xs_wire as W


class Lines:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.f = self.s.makefile("rwb")

    def call(self, **req):
        self.f.write(json.dumps(req).encode() + b"\n")
        self.f.flush()
        res = json.loads(self.f.readline())
        assert res["ok"], res
        return res


def xs_call(sock, type_, payload, tx=0):
    sock.sendall(struct.pack("<IIII", type_, 1, tx, len(payload)) + payload)
    while True:
        hdr = sock.recv(16, socket.MSG_WAITALL)
        t, r, x, n = struct.unpack("<IIII", hdr)
        body = sock.recv(n, socket.MSG_WAITALL) if n else b""
        if t != 15:
            return t, body


def test_guest_from_the_docs(simxen_guest):
    sim, g = simxen_guest
    d = sim.dir
    # §4/§5.2: reserve, then grant two pages to dom0 (domid+frame, then flags)
    ctl = Lines(os.path.join(d, "control.sock"))
    res = ctl.call(op="reserve", domid=g, frames=2, refs=2)
    frame0 = res["frames"][0][0]
    refs = [r for s, c in res["refs"] for r in range(s, s + c)][:2]
    memfd = os.open(os.path.join(d, "mem", f"d{g}"), os.O_RDWR)
    mem = mmap.mmap(memfd, 2 * 4096, offset=frame0 * 4096)
    mem[0:6] = b"page-0"
    mem[4096:4102] = b"page-1"
    gtfd = os.open(os.path.join(d, "gnttab", f"d{g}"), os.O_RDWR)
    gt = mmap.mmap(gtfd, os.fstat(gtfd).st_size)
    for i, r in enumerate(refs):
        struct.pack_into("<HI", gt, r * 8 + 2, 0, frame0 + i)
        struct.pack_into("<H", gt, r * 8, 1)                       # GTF_permit_access
    # §6.1: an event-channel handle
    ev = Lines(os.path.join(d, "evtchn.sock"))
    hello = ev.call(op="hello", domid=g)
    wake = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    wake.bind(hello["socket"])
    wake.setblocking(False)
    pfd = os.open(hello["pending"], os.O_RDWR)
    mycounters = mmap.mmap(pfd, 4 * 4096)
    port = ev.call(op="alloc_unbound", remote_domid=0)["port"]
    # §3: publish through XenStore, as the guest
    xs = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    xs.connect(os.path.join(d, "xenstore", f"d{g}"))
    assert xs_call(xs, W.WRITE, b"data/ring-ref\0%d" % refs[0]) == (W.WRITE, b"OK\0")
    assert xs_call(xs, W.READ, b"data/ring-ref\0") == (W.READ, b"%d" % refs[0])

    # the backend, with the library
    back = sim.xen(0)
    m = back.grant_mapper().map(g, refs, writable=True)
    assert bytes(m.buffer[0:6]) == b"page-0" and bytes(m.buffer[4096:4102]) == b"page-1"
    be = back.event_channels()
    lport = be.bind_interdomain(g, port)
    be.pending()

    # §6.2: notify the backend without the broker
    peer = ev.call(op="peer", port=port)
    assert peer["state"] == "interdomain" and peer["peer_port"] == lport
    ppfd = os.open(peer["peer_pending"], os.O_RDWR)
    ppage = mmap.mmap(ppfd, 4 * 4096)
    view = memoryview(ppage).cast("I")
    view[peer["peer_port"]] += 1                               # one 32-bit store
    view.release()
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(
        struct.pack("<I", peer["peer_port"]), peer["peer_socket"])
    select.select([be], [], [], 5)
    assert be.pending() == [lport]
    m.buffer[100:104] = b"resp"
    be.notify(lport)
    # §6.3: drain, then scan
    select.select([wake], [], [], 5)
    while True:
        try:
            wake.recv(64)
        except BlockingIOError:
            break
    assert struct.unpack_from("<I", mycounters, 4 * port)[0] == 1   # 0 when allocated
    assert mem[100:104] == b"resp"

    # §5.2 revoke: the write lock is refused while the backend maps the page
    def lock(kind, r):
        try:
            fcntl.fcntl(gtfd, 37, struct.pack("hhqqi4x", kind, 0, r * 8, 8, 0))
            return True
        except OSError:
            return False
    assert not lock(fcntl.F_WRLCK, refs[0])
    m.unmap()
    assert lock(fcntl.F_WRLCK, refs[0])
    struct.pack_into("<HHI", gt, refs[0] * 8, 0, 0, 0)
    lock(fcntl.F_UNLCK, refs[0])
    be.close()
    for f in (mem, gt, mycounters, ppage):
        f.close()
    for fd in (memfd, gtfd, pfd, ppfd):
        os.close(fd)
    wake.close()
    xs.close()
