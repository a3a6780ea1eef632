"""The whole server against the simulated Xen, through the blkfront-like test frontend."""

import os
import shutil
import subprocess
import random
import time

import pytest

from xapi_storage import compat
from xapi_storage.blkback import blkif, serve, toolstack
from xapi_storage.blkback.backends.raw import RawFile
from xapi_storage.blkback.frontend import IOError_
from xapi_storage.blkback.server import XenStore

MiB = 1 << 20


def spec(sim):
    return f"sim:{sim.dir}"


def wait_for(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def random_io(fe, model, rnd, n, queues=1, max_sectors=2048):
    total = len(model) // 512
    for _ in range(n):
        q = rnd.randrange(queues)
        nsect = rnd.randrange(1, max_sectors)
        sector = rnd.randrange(0, total - nsect)
        if rnd.random() < 0.5:
            data = compat.randbytes(rnd, nsect * 512)
            fe.write(sector, data, queue=q)
            model[sector * 512:(sector + nsect) * 512] = data
        else:
            got = fe.read(sector, nsect, queue=q)
            assert got == model[sector * 512:(sector + nsect) * 512], (sector, nsect)


@pytest.mark.parametrize("fe_opts", [
    dict(),                                                     # blkfront defaults
    dict(persistent=False),                                     # map/unmap per request
    dict(max_indirect=0),                                       # no indirect: 44 KiB max
    dict(max_indirect=256, max_ring_page_order=2),              # 1 MiB requests, 4-page ring
    dict(max_queues=4, max_ring_page_order=1),                  # multi-queue
    dict(protocol="x86_32-abi"),                                # 108-byte entries
], ids=["default", "no-persistent", "no-indirect", "indirect256-order2", "mq4", "x86_32"])
def test_random_io_matches_a_model(simxen_guest, disk, fe_opts):
    sim, g = simxen_guest
    model = bytearray(disk.read_bytes())
    rnd = random.Random(repr(fe_opts))
    with serve(spec(sim), "guest1", str(disk)) as s:
        with s.frontend(**fe_opts) as fe:
            assert fe.sectors == len(model) // 512
            nq = len(fe.queues)
            random_io(fe, model, rnd, 40, queues=nq)
            fe.flush()
            st = s.stats()
            assert st["errors"] == 0 and st["unsupported"] == 0
            if fe_opts.get("max_queues"):
                assert nq == 4 and st["queues"] == 4
            if fe_opts.get("max_ring_page_order"):
                assert st["ring_slots"] == 32 << fe_opts["max_ring_page_order"]
            if fe_opts.get("max_indirect", 32):
                assert st["indirect_requests"] > 0
            else:
                assert st["indirect_requests"] == 0
            assert st["persistent_negotiated"] == fe_opts.get("persistent", True)
    assert disk.read_bytes() == model


def test_persistent_grants_are_mapped_once(simxen_guest, disk):
    sim, g = simxen_guest
    with serve(spec(sim), g, str(disk)) as s:
        with s.frontend() as fe:
            fe.write(0, b"a" * 64 * 1024)
            maps = s.stats()["grant_map_calls"]
            for _ in range(20):
                fe.write(0, b"b" * 64 * 1024)
                fe.read(0, 128)
            st = s.stats()
            assert st["persistent_grants"] > 0
            assert st["grant_map_calls"] - maps <= 2      # the pool is reused LIFO


def test_without_persistence_every_grant_is_unmapped_before_the_response(simxen_guest, disk):
    """The frontend revokes each request's grants right after its response and fails
    ("backed has not unmapped grant") if the backend still maps one."""
    sim, g = simxen_guest
    with serve(spec(sim), g, str(disk)) as s:
        with s.frontend(persistent=False) as fe:
            for i in range(10):
                fe.write(i * 256, os.urandom(128 * 1024))
                fe.read(i * 256, 256)
            assert s.stats()["persistent_grants"] == 0


class Recording(RawFile):
    """A real raw file that also records the order of storage calls."""

    def __init__(self, path):
        super().__init__(path)
        self.log = []

    def writev(self, offset, iovs, length=None):
        super().writev(offset, iovs, length)
        self.log.append(("write", offset))

    def flush(self):
        super().flush()
        self.log.append(("flush", None))


def test_flush_ordering(simxen_guest, disk):
    """Writes before a flush complete before it, writes after it start after it, and the
    flush response comes after the fdatasync."""
    sim, g = simxen_guest
    rec = Recording(str(disk))
    with serve(spec(sim), g, None, backend=rec) as s:
        with s.frontend() as fe:
            assert fe.features["feature-flush-cache"] == 1
            a = fe.submit(blkif.OP_WRITE, 0, b"A" * 4096)
            f = fe.submit(blkif.OP_FLUSH_DISKCACHE, 0, b"")
            b = fe.submit(blkif.OP_WRITE, 8, b"B" * 4096)
            fe.push()
            res = fe.wait([a, f, b])
            assert all(st == 0 for st, _ in res.values())
            assert rec.log == [("write", 0), ("flush", None), ("write", 4096)]
            # a barrier with data: flush, write, flush
            rec.log.clear()
            fe.barrier(16, b"C" * 4096)
            assert rec.log == [("flush", None), ("write", 16 * 512), ("flush", None)]
    assert disk.read_bytes()[:4096] == b"A" * 4096


def test_discard_punches_holes(simxen_guest, disk):
    sim, g = simxen_guest
    with serve(spec(sim), g, str(disk)) as s:
        with s.frontend() as fe:
            assert fe.features["feature-discard"] == 1
            blocks = os.stat(disk).st_blocks
            fe.discard(0, fe.sectors)                 # blkfront may discard the whole disk
            assert fe.read(100, 8) == bytes(4096)
            assert os.stat(disk).st_blocks < blocks
            with pytest.raises(IOError_):
                fe.discard(fe.sectors - 8, 16)        # beyond the end: ERROR, nothing done


def test_readonly(simxen_guest, disk):
    sim, g = simxen_guest
    before = disk.read_bytes()
    with serve(spec(sim), g, str(disk), readonly=True) as s:
        with s.frontend() as fe:
            assert fe.readonly
            assert fe.read(0, 8) == before[:4096]
            with pytest.raises(IOError_) as e:
                fe.write(0, b"x" * 4096)
            assert e.value.status == blkif.RSP_ERROR
            with pytest.raises(IOError_):
                fe.discard(0, 8)
            assert fe.features["feature-discard"] == 0
    assert disk.read_bytes() == before


def test_online_resize(simxen_guest, disk):
    sim, g = simxen_guest
    with serve(spec(sim), g, str(disk)) as s:
        with s.frontend() as fe:
            old = fe.sectors
            with pytest.raises(IOError_):
                fe.read(old, 8)
            os.truncate(disk, (16 + 4) * MiB)
            wait_for(lambda: fe.refresh_size() == old + 8192, what="new sectors")
            assert fe.read(old, 8) == bytes(4096)
            fe.write(old + 8, b"z" * 4096)
            assert fe.read(old + 8, 8) == b"z" * 4096


def test_disconnect_and_reconnect(simxen_guest, disk):
    sim, g = simxen_guest
    with serve(spec(sim), g, str(disk)) as s:
        fe = s.frontend()
        fe.write(0, b"1" * 8192)
        fe.close()                       # Closing -> Closed: the backend unmaps, stays online
        xs0 = XenStore(sim.xenstore_path(0))
        be_state = lambda: xs0.read(f"{s.be_path}/state")          # noqa: E731
        assert be_state() == "6"
        assert s.alive
        # the frontend comes back (module reload): Initialising -> the backend re-offers
        xs = XenStore(sim.xenstore_path(g))
        xs.write(f"{s.fe_path}/state", "1")
        xs.close()
        wait_for(lambda: be_state() == "2", what="InitWait again")
        with s.frontend() as fe2:
            assert fe2.read(0, 16) == b"1" * 8192
            fe2.write(16, b"2" * 4096)
        assert s.stats()["requests"]["write"] == 2
        xs0.close()


def test_cow_keeps_the_gold_image(simxen_guest, disk, tmp_path):
    sim, g = simxen_guest
    gold = disk.read_bytes()
    before = sorted(os.listdir(disk.parent))
    with serve(spec(sim), g, str(disk), backend="cow") as s:
        with s.frontend() as fe:
            fe.write(3, b"w" * 8192)
            assert fe.read(3, 16) == b"w" * 8192
            assert fe.read(0, 3) == gold[:1536]
            fe.discard(1024, 64)
            assert fe.read(1024, 64) == bytes(64 * 512)
            fe.flush()
    assert disk.read_bytes() == gold
    assert sorted(os.listdir(disk.parent)) == before


def test_null_backend(simxen_guest):
    sim, g = simxen_guest
    with serve(spec(sim), g, None, backend="null", size=64 * MiB) as s:
        with s.frontend() as fe:
            assert fe.sectors == 64 * MiB // 512
            fe.write(0, b"q" * 4096)
            fe.read(0, 8)
            fe.flush()
            assert s.stats()["requests"]["read"] == 1


def test_toolstack_unplug_removes_everything(simxen_guest, disk):
    sim, g = simxen_guest
    xs = XenStore(sim.xenstore_path(0))
    with serve(spec(sim), g, str(disk)) as s:
        fe = s.frontend()
        fe.write(0, b"x" * 512)
        fe_path, be_path = s.fe_path, s.be_path
        toolstack.unplug(xs, be_path)                 # xl block-detach: online=0, state=5
        wait_for(lambda: xs.read(f"{be_path}/state") == "5", what="backend Closing")
        fe.close()                                    # blkfront >= 5.14 closes at once
        s.thread.join(10)
        assert not s.alive                            # the device is gone, the server done
    assert xs.read(f"{be_path}/state") is None and xs.read(f"{fe_path}/state") is None
    assert xs.read("/local/domain/0/backend/pyvbd") is None     # parents we made: gone too
    xs.close()


def test_raw_mmap_read_mode_with_1mib_requests(simxen_guest, disk):
    sim, g = simxen_guest
    model = bytearray(disk.read_bytes())
    rnd = random.Random(5)
    store = RawFile(str(disk), read_mode="mmap")
    with serve(spec(sim), g, None, backend=store) as s:
        with s.frontend(max_indirect=256) as fe:
            random_io(fe, model, rnd, 30, max_sectors=4096)
            for _ in range(5):                       # the same lists again: cached plans
                assert fe.read(0, 2048) == model[:MiB]
            os.truncate(disk, 20 * MiB)              # grow: the mapping follows
            model += bytes(4 * MiB)
            wait_for(lambda: fe.refresh_size() == 20 * MiB // 512, what="resize")
            assert fe.read(18 * MiB // 512, 2048) == bytes(MiB)
    assert disk.read_bytes() == model


# the dead guest's own XenStore connection (the frontend's) is reset under pyxs's thread
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_guest_destroyed_while_connected(simxen_guest, disk):
    """The guest dies with its rings mapped: the device goes away, the server survives."""
    sim, g = simxen_guest
    xs = XenStore(sim.xenstore_path(0))
    with serve(spec(sim), g, str(disk)) as s:
        fe = s.frontend()
        fe.write(0, b"d" * 4096)
        be_path = s.be_path
        sim.destroy_domain(g)
        s.thread.join(10)
        assert not s.alive and s.error is None
        try:
            fe._free()
        except Exception:                               # noqa: BLE001 - its domain is gone
            pass
    assert xs.read(f"{be_path}/state") is None
    assert xs.list("/local/domain/0/backend/pyvbd") == []
    xs.close()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("losetup"),
                    reason="needs root and losetup")
def test_block_backend_on_a_loop_device(simxen_guest, disk):
    sim, g = simxen_guest
    try:
        dev = subprocess.run(["losetup", "--find", "--show", str(disk)], check=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 universal_newlines=True, timeout=30).stdout.strip()
    except subprocess.CalledProcessError as e:
        pytest.skip(f"no loop device: {e.stderr}")
    try:
        model = bytearray(disk.read_bytes())
        with serve(spec(sim), g, dev, backend="block") as s:
            with s.frontend(max_indirect=256) as fe:
                assert fe.sectors == len(model) // 512
                random_io(fe, model, random.Random(9), 20, max_sectors=2048)
                fe.flush()
                fe.discard(0, 64)
                model[:64 * 512] = bytes(64 * 512)       # loop over a file: punched, zeros
                assert fe.read(0, 64) == bytes(64 * 512)
                assert s.stats()["storage"] == "block"
    finally:
        subprocess.run(["losetup", "-d", dev], check=False, timeout=30)
    assert disk.read_bytes() == model


def test_single_page_requests_batched_in_c(simxen_guest, disk):
    """Single-page requests on persistent grants are done by the C batch (queue._pio_flush):
    random and adjacent ones, reads and writes mixed in one batch, against a model."""
    from xapi_storage.blkback import queue as queue_mod
    if queue_mod._pio_lib is None:
        pytest.skip("the _pio extension is not built")
    sim, g = simxen_guest
    model = bytearray(disk.read_bytes())
    rnd = random.Random(11)
    with serve(spec(sim), g, str(disk)) as s:
        with s.frontend(max_ring_page_order=1) as fe:
            q = s.device.queues[0]
            assert q.pio_fd is not None
            fe.write(0, bytes(64 * 4096))                 # the pool pages become persistent
            model[:64 * 4096] = bytes(64 * 4096)
            for _round in range(40):
                # non-overlapping 8-sector slots; some runs of adjacent ones (merged in C)
                slots = rnd.sample(range(0, len(model) // 4096 - 8), 20)
                slots += [slots[0] + 1, slots[0] + 2] if slots[0] + 2 not in slots else []
                slots = list(dict.fromkeys(slots))
                reqs = []
                for slot in slots:
                    n = rnd.randrange(1, 9)
                    if rnd.random() < 0.5:
                        data = compat.randbytes(rnd, n * 512)
                        rid = fe.submit(blkif.OP_WRITE, slot * 8, data)
                        model[slot * 4096:slot * 4096 + n * 512] = data
                        reqs.append((rid, None, 0, 0))
                    else:
                        rid = fe.submit(blkif.OP_READ, slot * 8, nsectors=n)
                        reqs.append((rid, slot, n, 1))
                # reads see the model as it was before this batch's writes to other slots;
                # the slots do not overlap, so the order inside the batch does not matter
                expect = {rid: bytes(model[sl * 4096:sl * 4096 + n * 512])
                          for rid, sl, n, is_read in reqs if is_read}
                fe.push()
                got = fe.wait([r[0] for r in reqs])
                for rid, (status, data) in got.items():
                    assert status == 0
                    if rid in expect:
                        assert data == expect[rid]
            assert s.stats()["c_batched_requests"] > 500
    assert disk.read_bytes() == model


def test_c_batch_reports_io_errors(simxen_guest, disk):
    from xapi_storage.blkback import queue as queue_mod
    if queue_mod._pio_lib is None:
        pytest.skip("the _pio extension is not built")
    sim, g = simxen_guest
    with serve(spec(sim), g, str(disk)) as s:
        with s.frontend() as fe:
            fe.write(0, bytes(8 * 4096))                  # persistent pages
            end = fe.sectors
            os.truncate(disk, 8 * MiB)                    # shrink under the server
            with pytest.raises(IOError_):                 # past the new end: EIO from C
                fe.read(end - 8, 8)
            assert fe.read(0, 8) == bytes(4096)
            assert s.stats()["errors"] >= 1


@pytest.mark.parametrize("persistent", [False, True], ids=["mapped", "persistent"])
def test_indirect_requests_of_more_than_iov_max_segments(simxen_guest, disk, persistent):
    """The backend may advertise up to 4096 indirect segments; preadv/pwritev take at most
    1024 buffers, so one such request (of scattered pages) must be split, not fail EINVAL."""
    sim, g = simxen_guest
    data = os.urandom(2048 * 4096)
    with serve(spec(sim), g, str(disk), max_indirect=2048) as s:
        with s.frontend(max_indirect=2048, persistent=persistent) as fe:
            assert fe.max_indirect == 2048
            fe.write(8, data)
            assert fe.read(8, 2048 * 8) == data
        assert s.stats()["errors"] == 0
    assert disk.read_bytes()[4096:4096 + len(data)] == data


def test_overlapping_writes_in_one_batch_land_in_ring_order(simxen_guest, disk):
    """Writes to the same sectors in one batch, through every path (the C batch, the
    Python runs, 1 MiB runs in the I/O threads), land in ring order, and a read between
    them sees exactly the writes before it."""
    sim, g = simxen_guest
    p = [bytes([c]) * 4096 for c in b"ABCDEFGH"]
    big = [bytes([c]) * MiB for c in b"XY"]
    with serve(spec(sim), g, str(disk)) as s:
        with s.frontend() as fe:
            fe.write(0, bytes(2 * MiB))                  # pool pages become persistent
            fe.write(0, bytes(8192))
            fe.write(0, bytes(4096))
            ops = [(blkif.OP_WRITE, 0, p[0]),            # C batch
                   (blkif.OP_WRITE, 0, p[1] * 2),        # Python run (2 segments)
                   (blkif.OP_READ, 0, 16),
                   (blkif.OP_WRITE, 0, big[0]),          # 1 MiB: I/O thread
                   (blkif.OP_READ, 0, 8),
                   (blkif.OP_WRITE, 0, p[2]),            # C batch
                   (blkif.OP_WRITE, 0, big[1]),          # I/O thread
                   (blkif.OP_WRITE, 8, p[3]),            # C batch, inside the 1 MiB
                   (blkif.OP_READ, 0, 24)]
            ids = [fe.submit(op, sec, data=arg if op == blkif.OP_WRITE else None,
                             nsectors=arg if op == blkif.OP_READ else 0)
                   for op, sec, arg in ops]
            before = s.stats()["c_batched_requests"]
            fe.push()
            got = fe.wait(ids)
            assert all(st == 0 for st, _d in got.values())
            assert s.stats()["c_batched_requests"] - before >= 3
            assert got[ids[2]][1] == p[1] * 2
            assert got[ids[4]][1] == big[0][:4096]
            assert got[ids[8]][1] == big[1][:4096] + p[3] + big[1][:4096]
    assert disk.read_bytes()[:MiB] == big[1][:4096] + p[3] + big[1][8192:]


def test_readonly_mode_refuses_every_kind_of_write(simxen_guest, disk):
    """BE mode=r over storage that could write (a writable raw file, so the C batch is
    on): plain, multi-segment, single-page (C batch) and indirect writes (also with a
    cached segment list), flush and barrier with data, and discard all get an error, and
    the image is untouched."""
    sim, g = simxen_guest
    before = disk.read_bytes()
    with serve(spec(sim), g, None, backend=RawFile(str(disk)), readonly=True) as s:
        assert s.device.storage.pio_fd is not None and s.device.limits.readonly
        with s.frontend() as fe:
            assert fe.readonly
            assert fe.read(0, 2048) == before[:MiB]       # pages + segment list cached
            assert fe.read(0, 16) == before[:8192]
            assert fe.read(0, 8) == before[:4096]
            attempts = [(blkif.OP_WRITE, 0, b"x" * MiB), (blkif.OP_WRITE, 0, b"x" * MiB),
                        (blkif.OP_WRITE, 0, b"x" * 4096), (blkif.OP_WRITE, 0, b"x" * 8192),
                        (blkif.OP_WRITE_BARRIER, 0, b"x" * 4096),
                        (blkif.OP_FLUSH_DISKCACHE, 0, b"x" * 4096)]
            for op, sector, data in attempts:
                rid = fe.submit(op, sector, data)
                fe.push()
                (st, _d), = fe.wait([rid]).values()
                assert st == blkif.RSP_ERROR, (op, len(data))
            rid = fe.submit(blkif.OP_DISCARD, 0, nsectors=8)
            fe.push()
            (st, _d), = fe.wait([rid]).values()
            assert st in (blkif.RSP_ERROR, blkif.RSP_EOPNOTSUPP)
            assert s.stats()["requests"]["write"] == 0
    assert disk.read_bytes() == before


@pytest.mark.parametrize("op", [blkif.OP_FLUSH_DISKCACHE, blkif.OP_WRITE_BARRIER])
def test_flush_is_answered_only_after_the_storage_flush_returned(simxen_guest, disk, op):
    """While the storage's flush (fdatasync) has not returned, no OKAY for the flush or
    barrier may be on the ring."""
    import threading
    sim, g = simxen_guest

    class SlowFlush(RawFile):
        def __init__(self, path):
            super().__init__(path)
            self.entered = threading.Event()
            self.release = threading.Event()

        def flush(self):
            self.entered.set()
            assert self.release.wait(10)
            super().flush()

    store = SlowFlush(str(disk))
    with serve(spec(sim), g, None, backend=store) as s:
        with s.frontend() as fe:
            fe.submit(blkif.OP_WRITE, 0, b"w" * 4096)
            rid = fe.submit(op, 0, b"")
            fe.push()
            assert store.entered.wait(10)
            time.sleep(0.2)
            ring = fe.queues[0].ring
            answered = [ring.buf[ring.slot_offset(i):ring.slot_offset(i) + 16]
                        for i in range(ring.rsp_cons, ring.hdr[2])]
            assert not any(int.from_bytes(r[:8], "little") == rid for r in answered)
            store.release.set()
            got = fe.wait([rid])
            assert got[rid][0] == 0
