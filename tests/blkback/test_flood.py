"""A frontend that floods the server with events that find nothing, or with bad requests,
is throttled: its ring is looked at no more than the token rate allows, the server keeps
its core for the others, and the ring is served again once the flood stops."""

import time

from xapi_storage.blkback import blkif, serve
from xapi_storage.blkback.blkif import ABI_X86_64
from xapi_storage.blkback.queue import FLOOD_BURST, FLOOD_RATE

from .test_server import spec

SECONDS = 1.5
MAX_SECONDS = 10.0


def _bound(seconds):
    """Most tokens a flood can spend in `seconds`: the burst, the refill, slack."""
    return FLOOD_BURST + FLOOD_RATE * seconds * 1.2 + 200


def test_spurious_event_flood_is_throttled(simxen_guest, disk):
    sim, _g = simxen_guest
    with serve(spec(sim), "guest1", str(disk)) as s:
        with s.frontend() as fe:
            fe.write(0, b"s" * 4096)
            port = fe.queues[0].port
            sent = 0
            t0 = time.monotonic()
            # at least SECONDS; on a loaded machine the frontend may need longer to spend
            # the burst: go on (at most MAX_SECONDS) until the server has throttled it
            while True:
                for _ in range(100):
                    fe.evtchn.notify(port)       # nothing on the ring
                sent += 100
                spent = time.monotonic() - t0
                if spent >= SECONDS and (spent >= MAX_SECONDS or
                                         (sent % 2000 == 0 and s.stats()["throttled"])):
                    break
            elapsed = time.monotonic() - t0
            st = s.stats()
            assert st["throttled"] > 0
            assert st["spurious_events"] <= _bound(elapsed), (st["spurious_events"], sent)
            time.sleep(0.2)                      # the pause is over: served again
            assert fe.read(0, 8) == b"s" * 4096


def test_bad_request_flood_is_throttled(simxen_guest, disk):
    sim, _g = simxen_guest
    with serve(spec(sim), "guest1", str(disk)) as s:
        with s.frontend() as fe:
            bad = bytearray(112)
            blkif.pack_request(ABI_X86_64, bad, 0, 0x77, 1, 0, [])   # unknown operation
            answered = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < SECONDS:
                for _ in range(16):
                    fe.push_raw(bytes(bad))
                answered += len(fe.raw_responses(16, timeout=5))
            elapsed = time.monotonic() - t0
            st = s.stats()
            assert st["throttled"] > 0
            assert answered <= _bound(elapsed) + 16 * 20, answered
            assert st["requests"]["read"] == 0
            time.sleep(0.2)
            fe.write(0, b"g" * 4096)             # a good request is served again
            assert fe.read(0, 8) == b"g" * 4096


def test_a_busy_honest_frontend_is_never_throttled(simxen_guest, disk):
    sim, _g = simxen_guest
    with serve(spec(sim), "guest1", str(disk)) as s:
        with s.frontend() as fe:
            t0 = time.monotonic()
            while time.monotonic() - t0 < SECONDS:
                fe.write(0, b"h" * 65536)
                fe.read(0, 128)
            assert s.stats()["throttled"] == 0
