#!/usr/bin/env python3
"""Throughput of the blkback ring server on the simulated Xen.

    python benchmarks/ring.py [--seconds S] [--json] [--quick]

A simulated Xen runs in /dev/shm. For each row, the server runs as its own process
(`xapi-storage blkback connect guest --xen sim:DIR ...`, exactly the command a person uses),
and a blkfront-like frontend in this process keeps the ring full. The ring is used as two
halves: the frontend writes a prepared image of one half's requests in one copy, publishes
them with one push, and, while the server answers that half, sleeps on its event channel
until the other half is answered (rsp_event set to its last response), checks those
responses (id, op, status) against the expected image with one comparison and refills it.
So the frontend costs little per request and the figures are the server's.

Rows: the null backend (no I/O: the protocol alone) and the raw backend (a file on tmpfs,
preadv/pwritev straight into the granted pages) with 4 KiB requests (one segment, scattered
offsets, so no two requests of a batch are adjacent and nothing is merged) and 1 MiB requests
(256 indirect segments), persistent grants on. `raw-mmap` is the raw backend with the opt-in
`--raw-read mmap` (reads of 64 KiB and more copied from a mapping of the file). The memcpy column is the bandwidth of one
core copying 64 MiB buffers, measured in the same run: the physical limit for 1 MiB reads.
"""

import argparse
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from xapi_storage.blkback import blkif
from xapi_storage.compat import monotonic_ns, preadv
from xapi_storage.blkback.blkif import OP_READ, OP_WRITE, SEGMENT
from xapi_storage.blkback.frontend import Frontend
from xapi_storage.blkback.ring import M32
from xapi_storage.blkback.server import XenStore
from xapi_storage.xen.sim import running

KiB = 1024
MiB = 1024 * KiB


def memcpy_mb_per_s(seconds=0.5, size=64 * MiB):
    src = bytearray(os.urandom(1 * MiB)) * (size // MiB)
    dst = bytearray(size)
    s, d = memoryview(src), memoryview(dst)
    d[:] = s
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        d[:] = s
        best = max(best, size / (time.perf_counter() - t))
    return best / 1e6


class Server:
    """`xapi-storage blkback connect` in its own process."""

    def __init__(self, simdir, guest, backend, path, size, io_threads):
        read_mode = "preadv"
        if backend == "raw-mmap":
            backend, read_mode = "raw", "mmap"
        exe = shutil.which("xapi-storage") or os.path.join(os.path.dirname(sys.executable),
                                                            "xapi-storage")
        cmd = [exe, "blkback", "connect", str(guest), "--xen", f"sim:{simdir}",
               "--backend", backend, "--quiet", "--io-threads", str(io_threads),
               "--raw-read", read_mode]
        cmd += ["--path", path] if path else ["--size", str(size)]
        prof = os.environ.get("RING_BENCH_PROFILE")      # a directory: cProfile the server
        if prof:
            out = os.path.join(prof, f"server-{backend}-{monotonic_ns()}.prof")
            cmd = [sys.executable, "-m", "cProfile", "-o", out, "-m", "xapi_storage.cli"] + cmd[1:]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, universal_newlines=True)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _out, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _out, err = self.proc.communicate()
        if self.proc.returncode != 0:
            raise RuntimeError(f"server failed ({self.proc.returncode}): {err}")


def wait_devid(xs, guest, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = xs.list(f"/local/domain/{guest}/device/vbd")
        if ids:
            return int(ids[0])
        time.sleep(0.01)
    raise RuntimeError("the server did not plug a device in time")


def run_row(sim, guest, backend, path, size, op, request_bytes, order, seconds, io_threads):
    xs = XenStore(sim.xenstore_path(guest))
    srv = Server(sim.dir, guest, backend, path, size, io_threads)
    try:
        devid = wait_devid(xs, guest)
        fe = Frontend(sim.xen(guest), devid, max_ring_page_order=order, max_indirect=256,
                      max_queues=1)
        fe.connect()
        try:
            return _bench(fe, op, request_bytes, seconds)
        finally:
            fe.close()
    finally:
        xs.close()
        srv.stop()


def _bench(fe, op, request_bytes, seconds):
    q = fe.queues[0]
    ring = q.ring
    esz = fe.abi.entry_size
    abi = fe.abi
    pages_per_req = request_bytes // 4096
    nslots = ring.size
    if request_bytes >= MiB:
        nslots = min(nslots, 32)
    total_sectors = fe.sectors
    step = request_bytes // 512
    # scattered offsets: slot i uses block perm[i] with a stride so that no two are adjacent
    positions = [(i * 2 * step) % (total_sectors - step) for i in range(nslots)]
    image = bytearray(nslots * esz)
    expect = bytearray(nslots * esz)
    keep = []
    for i in range(nslots):
        pages = fe.pool.get(pages_per_req)
        keep.append(pages)
        segs = [(r, 0, 7) for r, _p in pages]
        if len(segs) <= blkif.MAX_SEGMENTS_PER_REQUEST:
            blkif.pack_request(abi, image, i * esz, op, i, positions[i], segs)
        else:
            ind = fe.pool.get((len(segs) + 511) // 512)
            keep.append(ind)
            flat = b"".join(SEGMENT.pack(*s) for s in segs)
            for k, (_r, page) in enumerate(ind):
                chunk = flat[k * 4096:(k + 1) * 4096]
                page[:len(chunk)] = chunk
            blkif.pack_indirect(abi, image, i * esz, op, i, positions[i], len(segs),
                                [r for r, _p in ind])
        expect[i * esz:(i + 1) * esz] = image[i * esz:(i + 1) * esz]
        abi.rsp.pack_into(expect, i * esz, i, op, 0)
    image = bytes(image)
    expect = bytes(expect)
    hdr = ring.hdr
    buf = ring.buf
    evfd = fe.evtchn.fileno()
    # Double buffering: the ring is two halves; while the server answers one, we check and
    # refill the other. rsp_event points at the end of the oldest half in flight.
    half = nslots // 2
    hbytes = half * esz
    assert ring.size % nslots == 0 and ring.req_prod_pvt % nslots == 0 and half >= 1

    def publish(k):
        base = 64 + (ring.req_prod_pvt & ring.mask) * esz
        buf[base:base + hbytes] = image[k * hbytes:(k + 1) * hbytes]
        ring.req_prod_pvt = (ring.req_prod_pvt + half) & M32
        if ring.push_requests_and_check_notify():
            fe.evtchn.notify(q.port)

    def collect(k):
        target = (ring.rsp_cons + half) & M32
        hdr[3] = target                       # rsp_event: wake me when this half is done
        while (hdr[2] - ring.rsp_cons) & M32 < half:
            select.select([evfd], [], [], 1.0)
            fe.evtchn.pending()
        base = 64 + (ring.rsp_cons & ring.mask) * esz
        if buf[base:base + hbytes] != expect[k * hbytes:(k + 1) * hbytes]:
            raise RuntimeError("wrong responses")
        ring.rsp_cons = target

    publish(0)
    publish(1)
    done = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    warm = 4                                  # halves not timed: the backend maps the pool
    k = 0
    while True:
        collect(k)
        publish(k)
        k ^= 1
        if warm:
            warm -= 1
            t0 = time.perf_counter()
            end = t0 + seconds
            continue
        done += half
        if time.perf_counter() >= end:
            break
    collect(k)
    collect(k ^ 1)
    dt = time.perf_counter() - t0
    for pages in keep:
        fe.pool.put(pages)
    return done / dt, done * request_bytes / dt / 1e6, nslots


def preadv_mb_per_s(path, seconds=0.5, nbuf=32):
    """One thread preadv()ing 1 MiB chunks of the image, 4 KiB pieces at a time, into 32
    different 1 MiB buffers (the working set the server has with 32 requests in flight):
    what the kernel alone gives the raw backend on this machine."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = memoryview(bytearray(nbuf * MiB))
        iovs = [[buf[b * MiB + k * 4096:b * MiB + (k + 1) * 4096] for k in range(256)]
                for b in range(nbuf)]
        size = os.fstat(fd).st_size
        best = 0.0
        end = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < end:
            t = time.perf_counter()
            for b in range(nbuf):
                preadv(fd, iovs[b], (i * 2 * MiB) % (size - MiB))
                i += 1
            best = max(best, nbuf * MiB / (time.perf_counter() - t))
        return best / 1e6
    finally:
        os.close(fd)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per row (default 3)")
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument("--quick", action="store_true", help="0.5 s per row, one repeat")
    ap.add_argument("--repeat", type=int, default=3,
                    help="run every row this many times, interleaved; report the best")
    ap.add_argument("--only", metavar="BACKEND[:OP[:BYTES]]",
                    help="run only the matching rows, e.g. raw:read:1048576")
    ap.add_argument("--no-c-batch", action="store_true",
                    help="run the servers with PYBLKBACK_NO_C_BATCH=1 (no _pio C batch)")
    ap.add_argument("--io-threads", type=int, default=2,
                    help="the server's --io-threads (default 2)")
    args = ap.parse_args(argv)
    if args.no_c_batch:
        os.environ["PYBLKBACK_NO_C_BATCH"] = "1"             # inherited by the servers
    seconds = 0.5 if args.quick else args.seconds
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    parent = tempfile.mkdtemp(prefix="ringbench-", dir=base)
    rows = []
    try:
        img = os.path.join(parent, "disk.img")
        with open(img, "wb") as f:
            for _ in range(256):
                f.write(os.urandom(MiB))
        with running(os.path.join(parent, "xen")) as sim:
            guest = sim.create_domain("bench")
            load = os.getloadavg()[0]
            plan = [("null", None, 256 * MiB, OP_READ, 4 * KiB, 0),     # blkfront default ring
                    ("null", None, 256 * MiB, OP_READ, 4 * KiB, 4),
                    ("null", None, 256 * MiB, OP_READ, MiB, 0),
                    ("raw", img, None, OP_READ, 4 * KiB, 4),
                    ("raw", img, None, OP_READ, MiB, 0),
                    ("raw-mmap", img, None, OP_READ, MiB, 0),
                    ("raw", img, None, OP_WRITE, 4 * KiB, 4),
                    ("raw", img, None, OP_WRITE, MiB, 0)]
            if args.only:
                want = args.only.split(":")
                plan = [p for p in plan if [p[0], "read" if p[3] == OP_READ else "write",
                                            str(p[4])][:len(want)] == want]
            best = {}
            memcpy = preadv = 0.0
            for _ in range(1 if args.quick else args.repeat):
                memcpy = max(memcpy, memcpy_mb_per_s())
                preadv = max(preadv, preadv_mb_per_s(img))
                for i, (backend, path, size, op, rb, order) in enumerate(plan):
                    r = run_row(sim, guest, backend, path, size, op, rb, order, seconds,
                                args.io_threads)
                    if i not in best or r[0] > best[i][0]:
                        best[i] = r
            for i, (backend, path, size, op, rb, order) in enumerate(plan):
                rps, mbps, slots = best[i]
                row = {"backend": backend, "op": "read" if op == OP_READ else "write",
                       "request_bytes": rb, "requests_per_s": round(rps),
                       "mb_per_s": round(mbps, 1), "memcpy_mb_per_s": round(memcpy, 1),
                       "preadv_mb_per_s": round(preadv, 1), "ring_slots_used": slots,
                       "io_threads": args.io_threads, "loadavg_1m": round(load, 2),
                       "cpus": os.cpu_count()}
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    if not args.json:
        r0 = rows[0]
        print(f"simulated Xen, {r0['cpus']} CPUs, load average {r0['loadavg_1m']} before the "
              f"run; best of {1 if args.quick else args.repeat}; memcpy "
              f"{r0['memcpy_mb_per_s']:.0f} MB/s (one core); preadv from the image "
              f"{r0['preadv_mb_per_s']:.0f} MB/s (one thread); server io-threads "
              f"{r0['io_threads']}")
        print(f"{'backend':8} {'op':6} {'request':>8} {'in flight':>9} {'requests/s':>11} "
              f"{'MB/s':>9} {'% memcpy':>8}")
        for r in rows:
            size = f"{r['request_bytes'] // KiB} KiB" if r["request_bytes"] < MiB else \
                f"{r['request_bytes'] // MiB} MiB"
            pct = ("  no copy" if r["backend"] == "null" else
                   f"{100 * r['mb_per_s'] / r['memcpy_mb_per_s']:>7.1f}%")
            print(f"{r['backend']:8} {r['op']:6} {size:>8} {r['ring_slots_used']:>9} "
                  f"{r['requests_per_s']:>11,} {r['mb_per_s']:>9.1f} {pct:>8}")
        print("null moves no data (MB/s = bytes requested); 4 KiB rows at scattered offsets; "
              "in flight = ring slots used (two halves)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
