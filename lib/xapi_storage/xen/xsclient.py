"""A XenStore client that never waits forever and survives a lost connection.

One unix-socket connection to xenstored (real, or the simulated one: the same wire protocol,
`xs_wire.py`), driven by the calling thread: no router thread. Every request has a deadline
(`timeout`, default 10 s). A connection that closes, fails, or does not answer in time is
dropped at once and the call raises `XenStoreLost`; a late reply can never be taken for the
answer to a later request, because the next call opens a new connection.

`reconnect()` opens a new connection and registers again every watch set with `watch()`
(xenstored fires each new watch once at once, so the owner of a token re-reads its nodes).
Watch events are buffered and taken with `events()`; `fileno()` polls readable when some may
be waiting (call `pump()` then). While a call waits for its reply, `idle()` (if set) runs
every `idle_interval` seconds and whenever one of `idle_fds` is readable: the ring server
keeps serving its rings while xenstored is slow. `idle(waited)` returning True abandons the
call (XenStoreLost, connection dropped): a server asked to stop does not wait out a stalled
xenstored.

    xs = XenStore("/var/run/xenstored/socket")
    xs.write("/local/domain/0/x", "1"); xs.read("/local/domain/0/x")   # "1"
    xs.transaction(lambda: (xs.read(p), xs.write(p, "2")))             # redone on EAGAIN
    xs.watch("/local/domain/0/backend/qdisk", "tok"); xs.events()      # [(path, token)]

Errors: `XenStoreError` (an OSError; errno is what xenstored answered, e.g. EACCES, EINVAL)
and its subclass `XenStoreLost` (ECONNRESET, ETIMEDOUT, ENOENT/ECONNREFUSED while
connecting): the connection, not the request, failed.
"""

import errno
import itertools
import logging
import os
import select
import socket
import threading
import time

from . import xs_wire as W

log = logging.getLogger("xapi_storage.xenstore")

DEFAULT_TIMEOUT = 10.0


class XenStoreError(OSError):
    """A XenStore request failed (errno from the XS_ERROR reply)."""


class XenStoreLost(XenStoreError):
    """The connection to xenstored closed, failed, or did not answer in time."""


def _b(v):
    return v if isinstance(v, bytes) else str(v).encode()


class XenStore:
    """The XenStore operations the project needs, with str paths (see the module doc)."""

    def __init__(self, path, timeout=DEFAULT_TIMEOUT, connect=True):
        self.path = path
        self.timeout = timeout
        self.sock = None
        self.tx_id = 0
        self.generation = 0                 # bumped by every successful (re)connect
        self.idle = None
        self.idle_fds = ()
        self.idle_interval = 0.1
        self.on_drop = None                 # called with the old fd just before it is closed
        self._buf = bytearray()
        self._events = []
        self._watches = {}                  # (path, token) -> None, in registration order
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        if connect:
            self.connect()

    # -- connection ------------------------------------------------------------------------
    @property
    def connected(self):
        return self.sock is not None

    def connect(self):
        """Open the connection (XenStoreLost if xenstored cannot be reached)."""
        with self._lock:
            self._drop()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
            except OSError as e:
                s.close()
                raise XenStoreLost(e.errno or errno.ECONNREFUSED,
                                   f"XenStore at {self.path}: cannot connect: "
                                   f"{e.strerror or e}") from None
            s.setblocking(False)
            self.sock = s
            self.generation += 1

    def reconnect(self):
        """A new connection, with every watch registered again (their events fire)."""
        with self._lock:
            self.connect()
            for path, token in list(self._watches):
                self._call(W.WATCH, _b(path) + b"\0" + _b(token) + b"\0", tx=0)

    def _drop(self):
        s, self.sock = self.sock, None
        self._buf = bytearray()
        self.tx_id = 0
        if s is not None:
            if self.on_drop is not None:
                self.on_drop(s.fileno())
            try:
                s.close()
            except OSError:
                pass

    def _lost(self, code, why):
        self._drop()
        return XenStoreLost(code, f"XenStore at {self.path}: {why}")

    @property
    def pending_events(self):
        """True if watch events are buffered (events() returns them without reading). Check
        it after every call, not only when fileno() polls readable: a call's reply can
        arrive together with events, which the call then takes in."""
        return bool(self._events)

    def fileno(self):
        """The socket's fd (-1 while disconnected); readable when events may be waiting."""
        return self.sock.fileno() if self.sock is not None else -1

    # -- the wire --------------------------------------------------------------------------
    def _take(self):
        """One complete message out of the buffer, or None."""
        b = self._buf
        if len(b) < W.HEADER.size:
            return None
        type_, rid, tx, n = W.HEADER.unpack_from(b)
        if n > W.PAYLOAD_MAX:
            raise self._lost(errno.EPROTO, f"reply of {n} bytes (more than {W.PAYLOAD_MAX})")
        end = W.HEADER.size + n
        if len(b) < end:
            return None
        payload = bytes(b[W.HEADER.size:end])
        del b[:end]
        return type_, rid, tx, payload

    def _recv(self):
        """Read what the socket has (non-blocking). False if nothing was there."""
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            raise self._lost(e.errno or errno.ECONNRESET, f"connection failed: {e}") from None
        if not data:
            raise self._lost(errno.ECONNRESET, "connection closed")
        self._buf += data
        return True

    def _event(self, payload):
        parts = payload.split(b"\0")
        if len(parts) >= 2:
            self._events.append((parts[0].decode(errors="replace"),
                                 parts[1].decode(errors="replace")))

    def _take_events(self):
        """Every complete message in the buffer: watch events to the event list; anything else
        is a reply nobody waits for (dropped)."""
        while True:
            m = self._take()
            if m is None:
                return
            if m[0] == W.WATCH_EVENT:
                self._event(m[3])
            else:
                log.warning("XenStore: dropped a reply to request %d", m[1])

    def pump(self):
        """Take in whatever has arrived (watch events) without blocking."""
        with self._lock:
            if self.sock is None:
                return
            while self._recv():
                pass
            self._take_events()

    def _send(self, data, deadline):
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
                view = view[n:]
                continue
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                raise self._lost(e.errno or errno.EPIPE, f"send failed: {e}") from None
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._lost(errno.ETIMEDOUT, f"no progress sending for {self.timeout} s")
            select.select([], [self.sock], [], min(left, self.idle_interval))

    def _call(self, type_, payload, tx=None):
        """Send one request and wait (at most `timeout`) for its reply's payload."""
        with self._lock:
            if self.sock is None:
                raise XenStoreLost(errno.ENOTCONN, f"XenStore at {self.path}: not connected")
            if len(payload) > W.PAYLOAD_MAX:
                raise XenStoreError(errno.E2BIG, f"XenStore request of {len(payload)} bytes")
            rid = next(self._ids) & 0xFFFFFFFF
            tx = self.tx_id if tx is None else tx
            deadline = time.monotonic() + self.timeout
            self._send(W.pack(type_, rid, tx, payload), deadline)
            next_idle = time.monotonic() + self.idle_interval
            while True:
                m = self._take()
                if m is not None:
                    if m[0] == W.WATCH_EVENT:
                        self._event(m[3])
                        continue
                    if m[1] != rid:
                        log.warning("XenStore: dropped a reply to request %d", m[1])
                        continue
                    # watch events read in the same chunk as this reply: parse them now, or
                    # nothing would show them (the socket has no more to read, so a caller
                    # that polls it and pending_events would wait on them for ever)
                    self._take_events()
                    if m[0] == W.ERROR:
                        name = m[3].rstrip(b"\0").decode(errors="replace")
                        code = getattr(errno, name, errno.EIO)
                        raise XenStoreError(code, f"XenStore {W.NAMES.get(type_, type_)}: "
                                            f"{name} ({os.strerror(code)})")
                    return m[3]
                now = time.monotonic()
                if now >= deadline:
                    raise self._lost(errno.ETIMEDOUT,
                                     f"no reply to {W.NAMES.get(type_, type_)} "
                                     f"within {self.timeout} s")
                wait = min(deadline, next_idle) - now
                fds = [self.sock] + list(self.idle_fds) if self.idle else [self.sock]
                try:
                    ready = select.select(fds, [], [], max(wait, 0))[0]
                except InterruptedError:
                    ready = []
                if self.sock in ready:
                    self._recv()
                if self.idle and (len(ready) > (self.sock in ready)
                                  or time.monotonic() >= next_idle):
                    next_idle = time.monotonic() + self.idle_interval
                    if self.idle(time.monotonic() - (deadline - self.timeout)):
                        raise self._lost(errno.EINTR, "call abandoned (the caller is stopping)")

    # -- operations ------------------------------------------------------------------------
    def read(self, path, default=None):
        """The value, or `default` if the node does not exist (or we may not read it)."""
        try:
            return self._call(W.READ, _b(path) + b"\0").decode(errors="replace")
        except XenStoreLost:
            raise
        except XenStoreError as e:
            if e.errno in (errno.ENOENT, errno.EACCES):
                return default
            raise

    def list(self, path):
        try:
            out = self._call(W.DIRECTORY, _b(path) + b"\0")
        except XenStoreLost:
            raise
        except XenStoreError as e:
            if e.errno in (errno.ENOENT, errno.EACCES):
                return []
            raise
        return [x.decode(errors="replace") for x in out.split(b"\0") if x]

    def write(self, path, value):
        self._call(W.WRITE, _b(path) + b"\0" + _b(value))

    def mkdir(self, path):
        self._call(W.MKDIR, _b(path) + b"\0")

    def rm(self, path):
        """Remove `path` and below; an absent node is fine."""
        try:
            self._call(W.RM, _b(path) + b"\0")
        except XenStoreLost:
            raise
        except XenStoreError as e:
            if e.errno != errno.ENOENT:
                raise

    def get_perms(self, path):
        """The permission list of `path`, e.g. ["n0", "r5"]."""
        out = self._call(W.GET_PERMS, _b(path) + b"\0")
        return [x.decode() for x in out.split(b"\0") if x]

    def set_perms(self, path, perms):
        self._call(W.SET_PERMS, _b(path) + b"\0" + b"".join(_b(p) + b"\0" for p in perms))

    def transaction(self, fn, attempts=50):
        """Run fn() inside a transaction; redo it on EAGAIN. fn's result is returned."""
        with self._lock:
            for _ in range(attempts):
                if self.tx_id:
                    return fn()              # nested: part of the outer transaction
                tx = self._call(W.TRANSACTION_START, b"\0", tx=0)
                self.tx_id = int(tx.rstrip(b"\0"))
                try:
                    result = fn()
                except BaseException:
                    if self.sock is not None and self.tx_id:
                        try:
                            self._call(W.TRANSACTION_END, b"F\0")
                        except XenStoreError:
                            pass
                    self.tx_id = 0
                    raise
                try:
                    self._call(W.TRANSACTION_END, b"T\0")
                    return result
                except XenStoreLost:
                    raise
                except XenStoreError as e:
                    if e.errno != errno.EAGAIN:
                        raise
                finally:
                    self.tx_id = 0
                time.sleep(0.001)
            raise XenStoreError(errno.EAGAIN, "XenStore transaction kept conflicting")

    def watch(self, path, token):
        """Watch `path` (and below) under `token`; kept across reconnect()."""
        with self._lock:
            self._watches[(str(path), str(token))] = None
            self._call(W.WATCH, _b(path) + b"\0" + _b(token) + b"\0", tx=0)

    def unwatch(self, path, token):
        with self._lock:
            self._watches.pop((str(path), str(token)), None)
            if self.sock is None:
                return
            try:
                self._call(W.UNWATCH, _b(path) + b"\0" + _b(token) + b"\0", tx=0)
            except XenStoreLost:
                pass
            except XenStoreError:
                pass                         # not registered (e.g. made before a reconnect)

    def events(self):
        """Watch events that arrived, without blocking: [(path, token), ...]."""
        with self._lock:
            self.pump()
            out, self._events = self._events, []
            return out

    def close(self):
        with self._lock:
            self._drop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
