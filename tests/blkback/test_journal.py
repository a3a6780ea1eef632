"""queue.Journal: the batch a ring's server is answering, kept in a file that outlives the
server. A new server restores it into the ring only when it is that ring's batch and it was
not published; anything else (published, half-written, another ring's) restores nothing."""

import os

from xapi_storage.blkback.queue import Journal, U32
from xapi_storage.blkback.ring import BackRing

ESZ = 112
SLOTS = 32


def ring_with(req_prod, rsp_prod, fill=b"R"):
    buf = bytearray(64 + SLOTS * ESZ)
    U32.pack_into(buf, 0, req_prod)
    U32.pack_into(buf, 8, rsp_prod)
    for i in range(SLOTS):
        buf[64 + i * ESZ:64 + (i + 1) * ESZ] = fill * ESZ
    return buf, BackRing(memoryview(buf), ESZ)


def batch(cons, n):
    return b"".join(bytes([(cons + i) & 0xFF]) * ESZ for i in range(n))


def test_an_unpublished_batch_goes_back_into_its_slots_even_across_the_ring_end(tmp_path):
    path = str(tmp_path / "j")
    j = Journal(path, SLOTS, ESZ, ident=(77, 9))
    cons = 0xFFFFFFFE                       # 30 slots from the end of the indices, 2 from the
    j.record(cons, batch(cons, 4), 4)       # end of the ring: wraps both
    j.map.close()
    buf, ring = ring_with((cons + 6) & 0xFFFFFFFF, cons)
    k = Journal(path, SLOTS, ESZ, ident=(77, 9))
    assert k.restore(ring) == 4
    for i in range(4):
        off = ring.slot_offset((cons + i) & 0xFFFFFFFF)
        assert bytes(buf[off:off + ESZ]) == bytes([(cons + i) & 0xFF]) * ESZ
    off = ring.slot_offset((cons + 4) & 0xFFFFFFFF)
    assert bytes(buf[off:off + ESZ]) == b"R" * ESZ        # the frontend's own: untouched
    k.close()
    assert not os.path.exists(path)


def test_nothing_is_restored_unless_it_is_this_rings_unpublished_batch(tmp_path):
    path = str(tmp_path / "j")
    cases = {
        "published": dict(ident=(77, 9), rsp=14),                 # rsp_prod moved past it
        "another ring": dict(ident=(78, 9), rsp=10),
        "another port": dict(ident=(77, 10), rsp=10),
        "more than was requested": dict(ident=(77, 9), rsp=10, req=12),
    }
    for why, c in cases.items():
        j = Journal(path, SLOTS, ESZ, ident=(77, 9))
        j.record(10, batch(10, 4), 4)
        j.map.close()
        buf, ring = ring_with(c.get("req", 20), c["rsp"])
        before = bytes(buf)
        k = Journal(path, SLOTS, ESZ, ident=c["ident"])
        assert k.restore(ring) == 0, why
        assert bytes(buf) == before, why
        k.close()


def test_a_record_killed_half_written_never_matches(tmp_path):
    """The length is written before the first index: a record cut between the two still
    carries the previous batch's index, which no longer equals rsp_prod."""
    path = str(tmp_path / "j")
    j = Journal(path, SLOTS, ESZ, ident=(5, 9))
    j.record(10, batch(10, 8), 8)          # published later: rsp_prod = 18
    m = j.map
    m[Journal.HEAD:Journal.HEAD + 2 * ESZ] = batch(18, 2)      # the next record, killed after its length
    U32.pack_into(m, 4, 2)
    m.close()
    buf, ring = ring_with(20, 18)
    before = bytes(buf)
    k = Journal(path, SLOTS, ESZ, ident=(5, 9))
    assert k.restore(ring) == 0
    assert bytes(buf) == before
    k.close()


def test_a_file_of_another_size_starts_afresh(tmp_path):
    path = tmp_path / "j"
    path.write_bytes(b"x" * 100)
    j = Journal(str(path), SLOTS, ESZ, ident=(1, 9))
    buf, ring = ring_with(0, 0)
    assert j.restore(ring) == 0
    assert os.path.getsize(str(path)) == Journal.HEAD + SLOTS * ESZ
    j.close()
