"""Persistent grants are bounded per ring (Linux blkback's 1056 by default): past the bound,
grants are mapped per request and the least recently used mappings are unmapped."""

import random

import pytest

from xapi_storage.blkback import serve
from xapi_storage.blkback.queue import MAX_PERSISTENT

from .test_server import random_io, spec, wait_for


def test_default_bound_is_linux_blkbacks(simxen_guest, disk):
    sim, _g = simxen_guest
    assert MAX_PERSISTENT == 1056
    with serve(spec(sim), "guest1", str(disk)) as s:
        assert s.device.max_persistent == 1056


@pytest.mark.parametrize("fe_opts", [
    dict(max_indirect=32),                                  # the test frontend's default
    dict(max_indirect=256, max_ring_page_order=1),          # 1 MiB requests
], ids=["indirect32", "indirect256"])
def test_a_bound_smaller_than_the_frontends_pool(simxen_guest, disk, fe_opts):
    sim, _g = simxen_guest
    model = bytearray(disk.read_bytes())
    rnd = random.Random(7)
    bound = 96
    with serve(spec(sim), "guest1", str(disk), max_persistent=bound) as s:
        with s.frontend(**fe_opts) as fe:
            highest = 0
            for _ in range(12):
                random_io(fe, model, rnd, 10)
                st = s.stats()
                highest = max(highest, st["persistent_grants"])
                q = s.device.queues[0]

                def consistent():
                    # read from this thread while the server's may still be finishing its
                    # turn (an eviction runs after the responses are pushed): once idle,
                    # these hold
                    return (len(q.persistent) == len(q.where) <= bound
                            and sum(map(len, q.pgroups.values())) == len(q.persistent)
                            and s.server.persistent_maps == len(q.pmaps))
                wait_for(consistent, timeout=5, what="the bound and the books agreeing")
            fe.flush()
            st = s.stats()
            assert st["errors"] == 0
            assert st["persistent_evicted"] > 0              # it did churn
            assert 0 < highest <= bound
    assert disk.read_bytes() == model
    assert s.server.persistent_maps == 0
