"""A unix-socket proxy in front of the simulated XenStore that a test can break.

    with XsProxy(sim.xenstore_path(0), tmp_path / "xs.sock") as proxy:
        xen = sim.xen(0); xen.xenstore_path = proxy.path     # the server talks through it
        proxy.down()      # every connection closed, new ones refused (xenstored gone)
        proxy.up()        # accepting again (xenstored restarted)
        proxy.stall()     # connections stay open, nothing is forwarded (xenstored hung)
        proxy.resume()

The XenStore behind it is the real simulated one: only the connection is faulty.
"""

import os
import selectors
import socket
import threading
import time


class XsProxy:
    def __init__(self, target, path):
        self.target = str(target)
        self.path = str(path)
        self.sel = selectors.DefaultSelector()
        self.pairs = {}                      # socket -> its peer
        self.listener = None
        self.stalled = False
        self.accepted = 0
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe()
        self.sel.register(self._stop_r, selectors.EVENT_READ, "stop")
        self.up()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def up(self):
        with self._lock:
            if self.listener is None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind(self.path)
                s.listen(16)
                s.setblocking(False)
                self.listener = s
                self.sel.register(s, selectors.EVENT_READ, "listen")
        self._poke()

    def down(self):
        with self._lock:
            if self.listener is not None:
                self.sel.unregister(self.listener)
                self.listener.close()
                self.listener = None
                os.unlink(self.path)
            self._close_all()
        self._poke()

    def stall(self):
        self.stalled = True

    def resume(self):
        self.stalled = False
        self._poke()

    def _poke(self):
        os.write(self._stop_w, b"p")

    def _close_all(self):
        for s in list(self.pairs):
            try:
                self.sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()
        self.pairs.clear()

    def _run(self):
        while True:
            for key, _ in self.sel.select(0.05):
                with self._lock:
                    if key.data == "stop":
                        os.read(self._stop_r, 64)
                        continue
                    if key.data == "listen":
                        if self.listener is None:
                            continue
                        try:
                            c, _ = self.listener.accept()
                        except BlockingIOError:
                            continue
                        u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        u.connect(self.target)
                        self.pairs[c] = u
                        self.pairs[u] = c
                        self.sel.register(c, selectors.EVENT_READ, "data")
                        self.sel.register(u, selectors.EVENT_READ, "data")
                        self.accepted += 1
                        continue
                    s = key.fileobj
                    if s not in self.pairs:
                        continue
                    if self.stalled:
                        time.sleep(0.01)         # leave it unread, without spinning
                        continue
                    try:
                        data = s.recv(65536)
                    except OSError:
                        data = b""
                    peer = self.pairs[s]
                    if data:
                        try:
                            peer.sendall(data)
                            continue
                        except OSError:
                            pass
                    for x in (s, peer):          # one side closed: close both
                        self.sel.unregister(x)
                        x.close()
                        self.pairs.pop(x, None)
            if self._closing:
                return

    _closing = False

    def close(self):
        self._closing = True
        self.down()
        self.thread.join(5)
        os.close(self._stop_r)
        os.close(self._stop_w)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
