"""NBD over a unix socket, in the ring server's loop: the socket edge of `nbd.py`.

    listener = NbdListener(server, "/run/pyblkback/x.sock")    # owner-only socket (0700)
    listener.add_export("vol", storage, readonly=False)        # the storage a device serves
    ...                                                        # server.step() serves both
    listener.close()                                           # every client dropped

Every socket is non-blocking and in the server's selector: a slow or stuck client never
holds up the rings. Replies wait in the connection's output; a client that stops reading
is not read from either once OUT_MAX bytes wait for it (it cannot make us buffer more).
Storage errors are answered EIO (ENOSPC, EDQUOT: ENOSPC); the storage is the same object
the rings use, so NBD clients and the guest see one owner's data.
"""

import collections
import errno
import logging
import os
import selectors
import socket
import stat

from . import nbd

log = logging.getLogger("xapi_storage.blkback")

OUT_MAX = 64 << 20             # replies waiting for a client before we stop reading it
RECV = 1 << 20
ZERO_CHUNK = 1 << 20


class _Export:
    __slots__ = ("info", "storage")

    def __init__(self, info, storage):
        self.info = info
        self.storage = storage


class NbdListener:
    """A listening unix socket whose clients are served in `server`'s loop."""

    def __init__(self, server, path):
        self.server = server
        self.path = path
        self.exports = {}
        self.clients = set()
        self.sock = listen_unix(path)
        server.sel.register(self.sock, selectors.EVENT_READ, self)
        server.nbd.append(self)

    def add_export(self, name, storage, readonly=None):
        ro = storage.readonly if readonly is None else (readonly or storage.readonly)
        info = nbd.Export(name, storage.size(), readonly=ro, can_trim=storage.can_discard)
        self.exports[name] = _Export(info, storage)
        return info

    def remove_export(self, name):
        self.exports.pop(name, None)
        for c in list(self.clients):
            if c.export is not None and c.export.info.name == name:
                c.close("export removed")

    def lookup(self, name):
        e = self.exports.get(name)
        if e is None:
            return None
        e.info.size = e.storage.size()            # online resize shows at the next open
        return e.info

    def on_event(self, mask):
        while True:
            try:
                c, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("nbd %s: accept: %s", self.path, e)
                return
            self.clients.add(_Client(self, c))

    def close(self):
        for c in list(self.clients):
            c.close("server stopping")
        close_unix(self.server.sel, self.sock, self.path)
        if self in self.server.nbd:
            self.server.nbd.remove(self)


def listen_unix(path, backlog=64):
    """A non-blocking listening unix socket at `path`, owner-only (born 0700 under umask
    077); a stale socket there (nobody accepts on it) is replaced, anything else refused."""
    _remove_stale(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o077)
        try:
            s.bind(path)
        finally:
            os.umask(old)
        s.listen(backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def close_unix(sel, sock, path):
    """Undo listen_unix: out of the selector, closed, its path removed."""
    try:
        sel.unregister(sock)
    except (KeyError, ValueError):
        pass
    sock.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_stale(path):
    """A socket left by a dead server (nobody accepts on it) is removed; anything else at
    `path` is refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise FileExistsError(errno.EADDRINUSE, f"{path} is served by a running process")


class _Client:
    def __init__(self, listener, sock):
        self.listener = listener
        self.sock = sock
        sock.setblocking(False)
        self.export = None
        self.out = collections.deque()           # replies not sent yet
        self.out_off = 0                         # bytes of out[0] already sent
        self.out_len = 0

        def lookup(name):
            return listener.lookup(name)
        lookup.names = lambda: list(listener.exports)
        self.conn = nbd.Connection(lookup)
        self.mask = selectors.EVENT_READ
        listener.server.sel.register(sock, self.mask, self)
        self._send()

    def on_event(self, mask):
        if mask & selectors.EVENT_WRITE:
            self._send()
        if mask & selectors.EVENT_READ and self.sock is not None:
            try:
                data = self.sock.recv(RECV)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            for ev in self.conn.receive(data):
                if isinstance(ev, nbd.Request):
                    self._do(ev)
                elif isinstance(ev, nbd.Opened):
                    self.export = self.listener.exports[ev.export.name]
                elif isinstance(ev, nbd.Closed):
                    if ev.reason:
                        log.warning("nbd %s: client dropped: %s", self.listener.path,
                                    ev.reason)
            self._send()
            if self.sock is not None and self.conn.closed and not self.out:
                self.close()

    def _do(self, r):
        st = self.export.storage
        try:
            if r.type == nbd.CMD_READ:
                buf = bytearray(r.length)
                if r.length:
                    st.readv(r.offset, [memoryview(buf)], r.length)
                self.conn.reply(r.handle, 0, buf)
                return
            if r.type == nbd.CMD_WRITE:
                if r.length:
                    st.writev(r.offset, [memoryview(r.data)], r.length)
            elif r.type == nbd.CMD_WRITE_ZEROES:
                zero = bytes(min(ZERO_CHUNK, r.length))
                off, end = r.offset, r.offset + r.length
                while off < end:
                    n = min(len(zero), end - off)
                    st.writev(off, [memoryview(zero)[:n]], n)
                    off += n
            elif r.type == nbd.CMD_TRIM:
                if r.length:
                    st.discard(r.offset, r.length)
            if r.type == nbd.CMD_FLUSH or r.flags & nbd.CMD_FLAG_FUA:
                st.flush()
            self.conn.reply(r.handle)
        except (OSError, ValueError) as e:
            code = getattr(e, "errno", None)
            err = {errno.ENOSPC: nbd.ENOSPC, errno.EDQUOT: nbd.ENOSPC,
                   errno.EOPNOTSUPP: nbd.ENOTSUP, errno.EROFS: nbd.EPERM,
                   errno.EPERM: nbd.EPERM}.get(code, nbd.EIO)
            log.error("nbd %s: %s at byte %d of %r failed: %s", self.listener.path,
                      nbd.CMD_NAMES.get(r.type, r.type), r.offset, self.export.info.name, e)
            self.conn.reply(r.handle, err)

    def _send(self):
        if self.sock is None:
            return
        out = self.conn.take_output()
        if out:
            self.out.append(out)
            self.out_len += len(out)
        while self.out:
            head = self.out[0]
            try:
                n = self.sock.send(memoryview(head)[self.out_off:])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()
                return
            self.out_off += n
            self.out_len -= n
            if self.out_off == len(head):
                self.out.popleft()
                self.out_off = 0
        want = selectors.EVENT_WRITE if self.out else 0
        if self.out_len < OUT_MAX:
            want |= selectors.EVENT_READ
        if want != self.mask:
            self.mask = want
            self.listener.server.sel.modify(self.sock, want, self)

    def close(self, why=""):
        if self.sock is None:
            return
        try:
            self.listener.server.sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        self.sock = None
        self.listener.clients.discard(self)
