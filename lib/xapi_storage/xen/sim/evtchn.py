"""Event channels of the simulated Xen, client side.

A handle talks to the broker (DIR/evtchn.sock) to allocate, bind and unbind ports. The
broker gives it an event-counter file (DIR/evtchn/h<H>.pending: one u32 per local port) and
a socket path to bind (DIR/evtchn/h<H>.sock) for wake-ups.

notify(port) does not involve the broker once the peer is known: it increments the peer
port's counter in the peer handle's file, then sends a 4-byte datagram (the peer port, u32
little-endian) to the peer handle's socket; a full socket queue (EAGAIN) is fine, the peer
has wake-ups queued already. pending() first drains its socket, then reports each bound
port whose counter differs from the value it saw last. Only the notifier writes a counter
(the receiver never does), so no notification can be overwritten and lost; any number of
notifications before a drain count once.
"""

import errno
import mmap
import os
import socket

from .. import EventChannels, XenError
from . import layout as L
from .control import JsonConn


class _Peer:
    """Where notifications of one local port go. Each peer gets its own socket, connected
    to the peer handle's: queued wake-ups are charged to the sender's socket buffer, so a
    peer that never reads can only fill its own, never block wake-ups to the others."""

    __slots__ = ("port", "sock", "counters", "msg", "path")

    def __init__(self, port, sock, counters, path):
        self.port, self.sock, self.counters, self.path = port, sock, counters, path
        self.msg = port.to_bytes(4, "little")

    def close(self):
        self.sock.close()


class SimEventChannels(EventChannels):
    def __init__(self, d, domid):
        self.dir, self.domid = d, domid
        self._broker = JsonConn(L.evtchn_sock(d))
        try:
            hello = self._broker.call(op="hello", domid=domid)
            self.handle = hello["handle"]
            self._sock_path = hello["socket"]
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.bind(self._sock_path)
            self._sock.setblocking(False)
            fd = L.open_regular(hello["pending"], L.PENDING_SIZE)
            try:
                self._page = mmap.mmap(fd, L.PENDING_SIZE)
            finally:
                os.close(fd)
            self._counters = memoryview(self._page).cast("I")   # u32, one 4-byte load each
        except BaseException:
            self._broker.close()
            raise
        self._bound = {}                 # local port -> _Peer or None (peer not looked up yet)
        self._seen = [0] * L.MAX_PORTS   # counter value last reported, per local port
        self._pages = {}                 # peer counter file path -> (mmap, u32 view)
        self._closed = False

    # -- broker operations
    def alloc_unbound(self, remote_domid):
        port = self._broker.call(op="alloc_unbound", remote_domid=remote_domid)["port"]
        self._seen[port] = 0             # the broker starts a fresh port's counter at 0
        self._bound[port] = None
        return port

    def bind_interdomain(self, domid, remote_port):
        res = self._broker.call(op="bind_interdomain", remote_domid=domid,
                                remote_port=remote_port)
        port = res["port"]
        self._seen[port] = 0             # (already 1: Xen's spurious event after a bind)
        self._bound[port] = self._peer_from(res)
        return port

    def unbind(self, port):
        if port not in self._bound:
            return
        peer = self._bound.pop(port)
        if peer is not None:
            peer.close()
            self._forget_page(peer.path)
        try:
            self._broker.call(op="unbind", port=port)
        except XenError as e:
            if e.errno != errno.EINVAL:
                raise

    def _forget_page(self, path):
        """Unmap a peer handle's counter file once no bound port notifies through it (each
        mapping holds a descriptor: kept, they would pile up with every reconnect)."""
        if any(p is not None and p.path == path for p in self._bound.values()):
            return
        entry = self._pages.pop(path, None)
        if entry is not None:
            entry[1].release()
            entry[0].close()

    def _peer_from(self, info):
        if info.get("state") != "interdomain":
            return None
        path = info["peer_pending"]
        entry = self._pages.get(path)
        if entry is None:
            try:
                fd = L.open_regular(path, L.PENDING_SIZE)
            except OSError:
                return None            # gone (or not a counter file): nobody to notify
            try:
                mm = mmap.mmap(fd, L.PENDING_SIZE)
            finally:
                os.close(fd)
            entry = self._pages[path] = (mm, memoryview(mm).cast("I"))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect(info["peer_socket"])
        except OSError:
            sock.close()
            return None                # the peer handle is gone
        sock.setblocking(False)
        return _Peer(info["peer_port"], sock, entry[1], path)

    # -- hot path
    def notify(self, port):
        try:
            peer = self._bound[port]
        except KeyError:
            raise XenError(errno.EINVAL, f"notify: port {port} is not bound here") from None
        if peer is None:
            peer = self._bound[port] = self._peer_from(
                self._broker.call(op="peer", port=port))
            if peer is None:
                return               # unbound peer: dropped, as Xen does
        c = peer.counters
        c[peer.port] = (c[peer.port] + 1) & 0xFFFFFFFF
        try:
            peer.sock.send(peer.msg)
        except BlockingIOError:
            pass                     # the peer has wake-ups queued already
        except OSError:              # peer handle gone: look it up again next time
            peer.close()
            self._bound[port] = None
            self._forget_page(peer.path)

    def fileno(self):
        return self._sock.fileno()

    def pending(self):
        sock = self._sock
        try:
            while True:
                sock.recv(64)
        except BlockingIOError:
            pass
        counters, seen = self._counters, self._seen
        out = []
        for p in self._bound:
            v = counters[p]
            if v != seen[p]:
                seen[p] = v
                out.append(p)
        return out

    def close(self):
        if self._closed:
            return
        self._closed = True
        self._broker.close()          # the broker closes our ports and removes our files
        self._sock.close()
        for peer in self._bound.values():
            if peer is not None:
                peer.close()
        self._counters.release()
        self._page.close()
        for mm, view in self._pages.values():
            view.release()
            mm.close()
        try:
            os.unlink(self._sock_path)
        except FileNotFoundError:
            pass
