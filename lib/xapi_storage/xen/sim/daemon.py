"""The simulated Xen's daemon: XenStore sockets, the control socket and the event-channel
broker, in one asyncio loop. `run(dir)` serves until SIGTERM/SIGINT, then removes
everything it created.

A client is never trusted: malformed input gets an error reply or that client is
disconnected; a client that stops reading is disconnected once its output backlog passes
OUT_LIMIT; nothing a client sends can stop the loop.
"""

import asyncio
import errno
import json
import logging
import os
import shutil
import signal
import socket
import sys

from ... import compat
from .. import xs_wire as W
from . import layout as L
from .xenstore import Server, XsError

log = logging.getLogger("simxen")

OUT_LIMIT = 4 << 20          # bytes queued to a client before it is dropped
LINE_MAX = 64 << 10          # longest JSON line accepted


class ClientError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class Domain:
    def __init__(self, domid, name, mem_pages, grant_entries):
        self.domid, self.name = domid, name
        self.mem_pages, self.grant_entries = mem_pages, grant_entries
        self.free_frames = [[0, mem_pages]]                 # extents [start, count]
        self.free_refs = [[L.NR_RESERVED_ENTRIES, grant_entries - L.NR_RESERVED_ENTRIES]]
        self.next_port = 1
        self.ports = {}                                      # port -> Port


def _take(extents, n, contiguous):
    """Take n items from a list of free extents; returns a list of [start, count]."""
    if contiguous:
        for e in extents:
            if e[1] >= n:
                start = e[0]
                e[0] += n
                e[1] -= n
                if not e[1]:
                    extents.remove(e)
                return [[start, n]]
        return None
    if sum(e[1] for e in extents) < n:
        return None
    got = []
    while n:
        e = extents[0]
        k = min(n, e[1])
        got.append([e[0], k])
        e[0] += k
        e[1] -= k
        n -= k
        if not e[1]:
            extents.pop(0)
    return got


def _give(extents, runs):
    for start, count in runs:
        extents.append([start, count])
    extents.sort()
    merged = []
    for s, c in extents:
        if merged and merged[-1][0] + merged[-1][1] == s:
            merged[-1][1] += c
        else:
            merged.append([s, c])
    extents[:] = merged


class Port:
    __slots__ = ("domid", "port", "handle", "state", "remote_domid", "peer")

    def __init__(self, domid, port, handle, remote_domid):
        self.domid, self.port, self.handle = domid, port, handle
        self.state = "unbound"
        self.remote_domid = remote_domid
        self.peer = None                  # Port when state == "interdomain"


class Handle:
    def __init__(self, hid, domid, d):
        self.id, self.domid = hid, domid
        self.sock = L.handle_sock(d, hid)
        self.pending = L.handle_pending(d, hid)
        self.pending_fd = -1
        self.ports = {}


class Daemon:
    def __init__(self, d):
        self.dir = os.path.abspath(d)
        self.xs = Server(on_introduce=self._xs_listen, on_release=self._xs_unlisten)
        self.domains = {}
        self.handles = {}
        self.next_handle = 1
        self.next_domid = 1
        self.xs_servers = {}             # domid -> asyncio server
        self.xs_transports = {}          # Connection -> transport
        self.json_transports = set()
        self.wake = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.wake.setblocking(False)
        self.created_dir = False
        self.stopping = None

    # ------------------------------------------------------------ domains
    def _new_domain(self, domid, name, mem_mb, grant_entries):
        if not isinstance(mem_mb, int) or not 1 <= mem_mb <= 1 << 20:
            raise ClientError("EINVAL", f"mem_mb must be an integer in 1..{1 << 20}")
        if not isinstance(grant_entries, int) or not 64 <= grant_entries <= 1 << 20:
            raise ClientError("EINVAL", "grant_entries must be an integer in 64..1048576")
        dom = Domain(domid, name, mem_mb * 256, grant_entries)
        for path, size in ((L.mem_file(self.dir, domid), dom.mem_pages * L.PAGE),
                           (L.gnttab_file(self.dir, domid), grant_entries * 8)):
            _unlink(path)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        self.domains[domid] = dom
        return dom

    def create_domain(self, name, mem_mb=L.DEFAULT_MEM_MB, grant_entries=L.DEFAULT_GRANT_ENTRIES):
        if not isinstance(name, str) or not name or len(name) > 64 or not all(
                c.isalnum() or c in "-_." for c in name):
            raise ClientError("EINVAL", "name must be 1-64 characters of [A-Za-z0-9._-]")
        if any(d.name == name for d in self.domains.values()):
            raise ClientError("EEXIST", f"a domain named {name!r} exists")
        domid = self.next_domid
        while domid in self.domains:
            domid += 1
        if domid >= 0x7FF0:
            raise ClientError("ENOSPC", "no free domain id")
        self.next_domid = domid + 1
        self._new_domain(domid, name, mem_mb, grant_entries)
        # XenStore nodes as libxl writes them (libxl__domain_make): the domain's home is
        # owned by dom0 and readable by the domain; the writable subtrees are the domain's.
        x, home = self.xs, f"/local/domain/{domid}"
        x.op("mkdir", home)
        x.op("set_perms", home, [(0, 0), (1, domid)])
        for sub in ("device", "data", "drivers", "feature", "attr", "error", "memory"):
            x.op("mkdir", f"{home}/{sub}")
            x.op("set_perms", f"{home}/{sub}", [(0, domid)])
        x.op("mkdir", f"{home}/control")
        x.op("set_perms", f"{home}/control", [(0, 0), (1, domid)])
        x.op("write", f"{home}/name", name.encode())
        x.op("write", f"{home}/domid", str(domid).encode())
        x.op("write", f"{home}/memory/target", str(mem_mb * 1024).encode())
        x.introduce(domid)
        return domid

    def destroy_domain(self, domid):
        if domid not in self.domains or domid == 0:
            raise ClientError("ENOENT", f"no domain {domid}")
        if domid in self.xs.introduced:
            self.xs.release(domid)
        self.xs.op("rm", f"/local/domain/{domid}")
        for h in [h for h in self.handles.values() if h.domid == domid]:
            self._close_handle(h)
        dom = self.domains.pop(domid)
        for p in list(dom.ports.values()):
            self._close_port(p)
        # end every grant of the dead domain: mappers holding the (unlinked) grant table
        # open must not map from it any more, as Xen refuses grants of a dead domain
        try:
            fd = L.open_regular(L.gnttab_file(self.dir, domid))
            try:
                os.pwrite(fd, bytes(dom.grant_entries * 8), 0)
            finally:
                os.close(fd)
        except OSError:
            pass
        for path in (L.mem_file(self.dir, domid), L.gnttab_file(self.dir, domid)):
            _unlink(path)

    # ------------------------------------------------------------ xenstore sockets
    def _xs_listen(self, domid):
        if domid not in self.domains:
            raise XsError("ENOENT")
        path = L.xenstore_sock(self.dir, domid)
        _unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
        loop = asyncio.get_event_loop()
        srv = loop.create_task(loop.create_unix_server(
            lambda: XsProtocol(self, domid), sock=sock))
        self.xs_servers[domid] = (srv, sock, path)

    def _xs_unlisten(self, domid):
        srv, sock, path = self.xs_servers.pop(domid, (None, None, None))
        if srv is not None:
            if srv.done() and not srv.cancelled():
                srv.result().close()
            else:
                srv.cancel()
            sock.close()
            _unlink(path)
        for conn, tr in list(self.xs_transports.items()):
            if conn.domid == domid:
                tr.abort()

    # ------------------------------------------------------------ event channels
    def _wake(self, handle, port):
        """Count one event on `port` of `handle` and wake it up."""
        try:
            old = int.from_bytes(os.pread(handle.pending_fd, 4, 4 * port), "little")
            os.pwrite(handle.pending_fd, ((old + 1) & 0xFFFFFFFF).to_bytes(4, "little"), 4 * port)
            self.wake.sendto(port.to_bytes(4, "little"), handle.sock)
        except OSError:
            pass

    def _alloc_port(self, dom, handle, remote_domid):
        for _ in range(L.MAX_PORTS):
            p = dom.next_port
            dom.next_port = p + 1 if p + 1 < L.MAX_PORTS else 1
            if p not in dom.ports:
                os.pwrite(handle.pending_fd, bytes(4), 4 * p)     # a fresh port: counter 0
                port = Port(dom.domid, p, handle, remote_domid)
                dom.ports[p] = port
                handle.ports[p] = port
                return port
        raise ClientError("ENOSPC", f"domain {dom.domid} has no free event-channel port")

    def _close_port(self, port):
        dom = self.domains.get(port.domid)
        if dom is not None:
            dom.ports.pop(port.port, None)
        if port.handle is not None:
            port.handle.ports.pop(port.port, None)
        peer = port.peer
        if peer is not None:
            # as in Xen: the other end of a closed interdomain channel becomes unbound
            peer.peer = None
            peer.state = "unbound"
            peer.remote_domid = port.domid
        port.peer = None
        port.state = "closed"

    def _close_handle(self, h):
        for p in list(h.ports.values()):
            self._close_port(p)
        self.handles.pop(h.id, None)
        if h.pending_fd >= 0:
            os.close(h.pending_fd)
            h.pending_fd = -1
        _unlink(h.sock)
        _unlink(h.pending)

    def _peer_info(self, port):
        p = port.peer
        if port.state != "interdomain" or p is None or p.handle is None:
            return {"state": port.state, "port": port.port}
        return {"state": "interdomain", "port": port.port, "peer_domid": p.domid,
                "peer_port": p.port, "peer_socket": p.handle.sock,
                "peer_pending": p.handle.pending}

    # ------------------------------------------------------------ JSON requests
    def control(self, client, req):
        op = req.get("op")
        if op == "create_domain":
            domid = self.create_domain(req.get("name"), req.get("mem_mb", L.DEFAULT_MEM_MB),
                                       req.get("grant_entries", L.DEFAULT_GRANT_ENTRIES))
            return {"domid": domid}
        if op == "destroy_domain":
            self.destroy_domain(_int(req, "domid"))
            return {}
        if op == "list_domains":
            return {"domains": [{"domid": d.domid, "name": d.name, "mem_pages": d.mem_pages,
                                 "grant_entries": d.grant_entries,
                                 "introduced": d.domid == 0 or d.domid in self.xs.introduced}
                                for d in sorted(self.domains.values(), key=lambda d: d.domid)]}
        if op == "reserve":
            dom = self._domain(_int(req, "domid"))
            frames, refs = _int(req, "frames"), _int(req, "refs")
            if not (0 <= frames <= dom.mem_pages and 0 <= refs <= dom.grant_entries):
                raise ClientError("EINVAL", "frames/refs out of range")
            fr = _take(dom.free_frames, frames, True) if frames else []
            if fr is None:
                raise ClientError("ENOMEM", f"domain {dom.domid}: no {frames} contiguous free frames")
            rr = _take(dom.free_refs, refs, False) if refs else []
            if rr is None:
                _give(dom.free_frames, fr)
                raise ClientError("ENOSPC", f"domain {dom.domid}: grant table full")
            client.reserved.append((dom.domid, fr, rr))
            return {"frames": fr, "refs": rr}
        if op == "ping":
            return {"pid": os.getpid()}
        raise ClientError("EINVAL", f"unknown control op {op!r}")

    def evtchn(self, client, req):
        op = req.get("op")
        if op == "hello":
            if client.handle is not None:
                raise ClientError("EINVAL", "hello sent twice")
            domid = _int(req, "domid")
            self._domain(domid)
            h = Handle(self.next_handle, domid, self.dir)
            self.next_handle += 1
            _unlink(h.pending)
            fd = os.open(h.pending, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, L.PENDING_SIZE)
            h.pending_fd = fd
            self.handles[h.id] = h
            client.handle = h
            return {"handle": h.id, "socket": h.sock, "pending": h.pending}
        h = client.handle
        if h is None:
            raise ClientError("EINVAL", "send hello first")
        dom = self._domain(h.domid)
        if op == "alloc_unbound":
            remote = _int(req, "remote_domid")
            self._domain(remote)
            return {"port": self._alloc_port(dom, h, remote).port}
        if op == "bind_interdomain":
            rdom = self._domain(_int(req, "remote_domid"))
            rport = rdom.ports.get(_int(req, "remote_port"))
            if rport is None:
                raise ClientError("EINVAL", "remote port does not exist")
            if rport.state != "unbound" or rport.remote_domid != h.domid:
                raise ClientError("EINVAL", f"remote port {rport.port} of domain {rdom.domid} "
                                  f"is not an unbound port for domain {h.domid}")
            local = self._alloc_port(dom, h, rdom.domid)
            local.state = rport.state = "interdomain"
            local.peer, rport.peer = rport, local
            # as Xen does: the freshly bound local port starts out pending
            self._wake(h, local.port)
            return dict(self._peer_info(local), port=local.port)
        if op == "peer":
            port = h.ports.get(_int(req, "port"))
            if port is None:
                raise ClientError("EINVAL", "port not bound by this handle")
            return self._peer_info(port)
        if op == "unbind":
            port = h.ports.get(_int(req, "port"))
            if port is None:
                raise ClientError("EINVAL", "port not bound by this handle")
            self._close_port(port)
            return {}
        raise ClientError("EINVAL", f"unknown event-channel op {op!r}")

    def _domain(self, domid):
        dom = self.domains.get(domid)
        if dom is None:
            raise ClientError("ENOENT", f"no domain {domid}")
        return dom

    def client_gone(self, client):
        if client.handle is not None:
            self._close_handle(client.handle)
            client.handle = None
        for domid, fr, rr in client.reserved:
            dom = self.domains.get(domid)
            if dom is None:
                continue
            # the dead client's grants end with it
            try:
                fd = L.open_regular(L.gnttab_file(self.dir, domid))
            except OSError:
                fd = None
            if fd is not None:
                try:
                    for start, count in rr:
                        os.pwrite(fd, bytes(8 * count), 8 * start)
                finally:
                    os.close(fd)
            _give(dom.free_frames, fr)
            _give(dom.free_refs, rr)
        client.reserved = []

    # ------------------------------------------------------------ lifecycle
    async def serve(self):
        d = self.dir
        longest = L.handle_sock(d, 9999999)
        if len(os.fsencode(longest)) > 107:
            raise SystemExit(f"simxen: {d} is too long a path: unix socket paths such as "
                             f"{longest} must stay under 108 bytes; use a shorter DIR")
        if not os.path.isdir(d):
            os.makedirs(d)
            self.created_dir = True
        if os.path.exists(L.pid_file(d)):
            pid = int(open(L.pid_file(d)).read().strip() or 0)
            if pid and L.pid_alive(pid):
                raise SystemExit(f"simxen: {d} is already served by pid {pid}")
        for sub in L.SUBDIRS:
            p = os.path.join(d, sub)
            shutil.rmtree(p, ignore_errors=True)
            os.makedirs(p)
        for path in (L.control_sock(d), L.evtchn_sock(d)):
            _unlink(path)
        self._new_domain(0, "Domain-0", L.DEFAULT_MEM_MB, L.DEFAULT_GRANT_ENTRIES)
        loop = compat.get_running_loop()
        self.stopping = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: self.stopping.done() or self.stopping.set_result(None))
        servers = [
            await loop.create_unix_server(lambda: JsonProtocol(self, self.control), L.control_sock(d)),
            await loop.create_unix_server(lambda: JsonProtocol(self, self.evtchn), L.evtchn_sock(d)),
            await loop.create_unix_server(lambda: XsProtocol(self, 0), L.xenstore_sock(d, 0)),
        ]
        for p in (L.control_sock(d), L.evtchn_sock(d), L.xenstore_sock(d, 0)):
            os.chmod(p, 0o600)
        tmp = L.pid_file(d) + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.rename(tmp, L.pid_file(d))
        print(f"simxen: ready in {d} (pid {os.getpid()})", flush=True)
        try:
            await self.stopping
        finally:
            for s in servers:
                s.close()
            for domid in list(self.xs_servers):
                self._xs_unlisten(domid)
            for tr in list(self.xs_transports.values()) + list(self.json_transports):
                tr.abort()
            await asyncio.sleep(0)
            self.wake.close()
            self.cleanup()

    def cleanup(self):
        d = self.dir
        for sub in L.SUBDIRS:
            shutil.rmtree(os.path.join(d, sub), ignore_errors=True)
        for p in (L.control_sock(d), L.evtchn_sock(d), L.pid_file(d)):
            _unlink(p)
        if self.created_dir:
            try:
                os.rmdir(d)
            except OSError:
                pass


class XsProtocol(asyncio.Protocol):
    """A XenStore client connection, acting as domain `domid`."""

    def __init__(self, daemon, domid):
        self.daemon, self.domid = daemon, domid
        self.buf = bytearray()
        self.transport = None
        self.conn = None

    def connection_made(self, transport):
        self.transport = transport
        self.conn = self.daemon.xs.connect(self.domid, self.send)
        self.daemon.xs_transports[self.conn] = transport

    def send(self, data):
        tr = self.transport
        if tr is None or tr.is_closing():
            return
        tr.write(data)
        if tr.get_write_buffer_size() > OUT_LIMIT:
            log.warning("xenstore d%d: client does not read its replies; dropped", self.domid)
            tr.abort()

    def data_received(self, data):
        self.buf += data
        buf = self.buf
        while len(buf) >= W.HEADER.size:
            type_, req_id, tx_id, n = W.HEADER.unpack_from(buf)
            if n > W.PAYLOAD_MAX:
                log.warning("xenstore d%d: message of %d bytes (> %d); client dropped",
                            self.domid, n, W.PAYLOAD_MAX)
                self.transport.abort()
                buf.clear()
                return
            if len(buf) < W.HEADER.size + n:
                break
            payload = bytes(buf[W.HEADER.size:W.HEADER.size + n])
            del buf[:W.HEADER.size + n]
            if self.conn.closed or self.transport.is_closing():
                return
            try:
                self.conn.handle(type_, req_id, tx_id, payload)
            except Exception:                       # a bug of ours: say so, keep serving
                log.exception("xenstore d%d: internal error on %s", self.domid,
                              W.NAMES.get(type_, type_))
                self.conn.error(req_id, tx_id, "EIO")

    def connection_lost(self, exc):
        self.daemon.xs_transports.pop(self.conn, None)
        self.conn.close()
        self.transport = None


class JsonClient:
    def __init__(self):
        self.handle = None
        self.reserved = []


class JsonProtocol(asyncio.Protocol):
    """One JSON object per line in each direction; a reply for every request, in order."""

    def __init__(self, daemon, dispatch):
        self.daemon, self.dispatch = daemon, dispatch
        self.buf = bytearray()
        self.client = JsonClient()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.daemon.json_transports.add(transport)

    def data_received(self, data):
        self.buf += data
        while True:
            i = self.buf.find(b"\n")
            if i < 0:
                if len(self.buf) > LINE_MAX:
                    log.warning("control: line longer than %d bytes; client dropped", LINE_MAX)
                    self.transport.abort()
                    self.buf.clear()
                return
            line = bytes(self.buf[:i])
            del self.buf[:i + 1]
            if self.transport.is_closing():
                return
            self.transport.write(json.dumps(self._one(line)).encode() + b"\n")
            if self.transport.get_write_buffer_size() > OUT_LIMIT:
                self.transport.abort()
                return

    def _one(self, line):
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except ValueError as e:
            return {"ok": False, "error": "EINVAL", "message": f"bad JSON request: {e}"}
        try:
            res = self.dispatch(self.client, req)
            return dict(res, ok=True)
        except ClientError as e:
            return {"ok": False, "error": e.code, "message": str(e)}
        except XsError as e:
            return {"ok": False, "error": e.name, "message": f"xenstore: {e.name}"}
        except OSError as e:
            return {"ok": False, "error": errno.errorcode.get(e.errno, "EIO"), "message": str(e)}
        except Exception as e:                       # a bug of ours
            log.exception("control: internal error")
            return {"ok": False, "error": "EIO", "message": f"internal error: {e!r}"}

    def connection_lost(self, exc):
        self.daemon.json_transports.discard(self.transport)
        try:
            self.daemon.client_gone(self.client)
        except Exception:
            log.exception("control: cleanup after client failed")


def _int(req, key):
    v = req.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > 0xFFFFFFFF:
        raise ClientError("EINVAL", f"{key!r} must be a non-negative integer")
    return v


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def run(d):
    logging.basicConfig(level=logging.INFO, format="simxen: %(message)s")
    # the tree is walked recursively: a path may be ~1500 components deep
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))
    daemon = Daemon(d)
    try:
        compat.asyncio_run(daemon.serve())
    finally:
        daemon.cleanup()
    return 0
