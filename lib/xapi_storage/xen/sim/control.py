"""A blocking client for the daemon's JSON-lines sockets (control.sock, evtchn.sock)."""

import errno
import json
import socket
import threading

from .. import XenError


class JsonConn:
    def __init__(self, path, timeout=10.0):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise XenError(e.errno, f"simulated Xen not reachable at {path}: {e.strerror} "
                           "(is `xapi-storage simxen run DIR` running?)") from None
        self.rfile = self.sock.makefile("rb")
        self._lock = threading.Lock()

    def call(self, **req):
        try:
            with self._lock:                 # one request/reply at a time per connection
                self.sock.sendall(json.dumps(req).encode() + b"\n")
                line = self.rfile.readline()
        except OSError as e:
            raise XenError(e.errno or errno.EIO, f"simulated Xen at {self.path}: {e}") from None
        if not line:
            raise XenError(errno.ECONNRESET, f"simulated Xen at {self.path} closed the connection")
        res = json.loads(line)
        if not res.get("ok"):
            code = res.get("error", "EIO")
            raise XenError(getattr(errno, code, errno.EIO),
                           f"simulated Xen refused {req.get('op')}: {res.get('message', code)}")
        return res

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        try:
            self.rfile.close()
        finally:
            self.sock.close()
