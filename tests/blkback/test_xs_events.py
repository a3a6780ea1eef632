"""Watch events that reach the XenStore client in the same read as a reply.

xenstored sends a watch event whenever the watched node changes, so it can follow the reply
to one of our requests closely enough that one recv() takes both. The call returns the reply;
the event must then be visible (`pending_events`), because the socket has nothing left to read
and the ring server's loop only looks at events when the socket polls readable or
`pending_events` says so. Before this was fixed, such an event sat unparsed in the client's
buffer until some later call: a server that had written Closing (5) never saw the guest's
frontend answer Closed (6) and waited for ever (tests/xen/test_pyblkback_real.py
test_two_servers_two_disks_in_one_guest failed that way once in a whole run)."""

import socket
import struct
import threading

import pytest

from xapi_storage.xen import xs_wire as W
from xapi_storage.xen.xsclient import XenStore


class OneShotXenstored:
    """The far end of a socketpair: answers each request, and after the reply of the
    request whose path is `burst_on`, a watch event, in the same send."""

    def __init__(self, sock, burst_on, event_path, token):
        self.sock, self.burst_on = sock, burst_on
        self.event = (event_path + "\0" + token + "\0").encode()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _recv(self, n):
        b = b""
        while len(b) < n:
            x = self.sock.recv(n - len(b))
            if not x:
                raise EOFError
            b += x
        return b

    def _run(self):
        try:
            while True:
                type_, rid, tx, n = W.HEADER.unpack(self._recv(W.HEADER.size))
                payload = self._recv(n)
                path = payload.split(b"\0")[0].decode()
                reply = {W.READ: b"4", W.TRANSACTION_START: b"7\0"}.get(type_, b"OK\0")
                out = W.pack(type_, rid, tx, reply)
                if path == self.burst_on:
                    out += W.pack(W.WATCH_EVENT, 0, 0, self.event)
                self.sock.sendall(out)
        except (EOFError, OSError, struct.error):
            pass


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    xs = XenStore("/nonexistent", timeout=5, connect=False)
    a.setblocking(False)
    xs.sock = a
    yield xs, b
    xs.close()
    b.close()


def test_an_event_read_with_a_reply_is_pending_after_the_call(pair):
    xs, far = pair
    OneShotXenstored(far, "/fe/state", "/fe/state", "tok")
    assert xs.read("/be/state") == "4"
    assert not xs.pending_events
    assert xs.read("/fe/state") == "4"                 # the event came with this reply
    assert xs.pending_events                           # so the server's loop looks at it
    assert xs.events() == [("/fe/state", "tok")]
    assert not xs.pending_events and xs.events() == []


def test_an_event_read_with_a_transaction_reply_is_pending(pair):
    xs, far = pair
    # the commit's reply (TRANSACTION_END's payload is "T") brings the event: xenstored fires
    # the watches of a transaction's writes when it commits
    OneShotXenstored(far, "T", "/be/state", "be")

    def tx():
        xs.write("/be/online", "0")
        xs.write("/be/state", "5")
    xs.transaction(tx)
    assert xs.pending_events
    assert xs.events() == [("/be/state", "be")]
