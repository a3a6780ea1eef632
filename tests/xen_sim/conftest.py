"""Fixtures for the simulated-Xen tests: the ones every user of the sim gets (the plugin),
plus raw wire helpers."""

import socket

import pytest

from xapi_storage.xen.sim.pytest_plugin import simxen, simxen_guest  # noqa: F401 (fixtures)
from xapi_storage.xen import xs_wire as W


class RawXs:
    """A bare XenStore wire client for malformed-input tests."""

    def __init__(self, path, timeout=5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def send(self, type_, payload, req_id=7, tx_id=0):
        self.sock.sendall(W.pack(type_, req_id, tx_id, payload))

    def recv(self):
        while len(self.buf) < 16:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        t, r, x, n = W.HEADER.unpack_from(self.buf)
        while len(self.buf) < 16 + n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        payload = self.buf[16:16 + n]
        self.buf = self.buf[16 + n:]
        return t, r, x, payload

    def call(self, type_, payload, **kw):
        self.send(type_, payload, **kw)
        return self.recv()

    def close(self):
        self.sock.close()


@pytest.fixture
def raw_xs():
    made = []

    def connect(path):
        c = RawXs(path)
        made.append(c)
        return c
    yield connect
    for c in made:
        c.close()
