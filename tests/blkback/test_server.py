"""The whole server against the simulated Xen, through the blkfront-like test frontend."""

import random

import pytest

from xapi_storage.blkback import serve


def spec(sim):
    return f"sim:{sim.dir}"


def test_connect_read_write(simxen_guest, disk):
    sim, g = simxen_guest
    with serve(spec(sim), "guest1", str(disk)) as s:
        with s.frontend() as fe:
            assert fe.sectors == (16 << 20) // 512
            data = bytes(random.Random(1).randbytes(3 * 4096))
            fe.write(8, data)
            assert fe.read(8, len(data) // 512) == data
            fe.flush()
    assert disk.read_bytes()[8 * 512:8 * 512 + len(data)] == data
