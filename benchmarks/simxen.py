#!/usr/bin/env python3
"""Hot-path costs of the simulated Xen: grant map+unmap and event-channel notify.

    python benchmarks/simxen.py [--json] [--seconds S]

Prints one row per operation (with --json: one JSON object per row, keys `op`, `refs`,
`per_s`, `us_per_op`). Runs its own daemon in a temporary directory under /dev/shm.
"""

import argparse
import json
import os
import select
import tempfile
import time

from xapi_storage.xen.sim import running


def rate(fn, seconds):
    n, t0 = 0, time.perf_counter()
    end = t0 + seconds
    while True:
        for _ in range(50):
            fn()
        n += 50
        t = time.perf_counter()
        if t >= end:
            return n / (t - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    rows = []
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=base) as tmp, running(os.path.join(tmp, "x")) as sim:
        g = sim.create_domain("bench")
        a = sim.xen(g).grant_allocator()
        m = sim.xen(0).grant_mapper()
        single = [a.grant(0, 1) for _ in range(64)]
        scattered = [ga.refs[0] for ga in single[::2]]            # frames not adjacent
        run = a.grant(0, 32)
        for label, refs in (("map+unmap 1 ref", scattered[:1]),
                            ("map+unmap 11 scattered refs", scattered[:11]),
                            ("map+unmap 11 contiguous refs", run.refs[:11]),
                            ("map+unmap 32 scattered refs", scattered[:32]),
                            ("map+unmap 32 contiguous refs", run.refs)):
            def op(refs=refs):
                m.map(g, refs, True).unmap()
            rows.append({"op": label, "refs": len(refs), "per_s": rate(op, args.seconds)})

        fe, be = sim.xen(g).event_channels(), sim.xen(0).event_channels()
        fp = fe.alloc_unbound(0)
        be.bind_interdomain(g, fp)
        be.pending()
        rows.append({"op": "notify (no receiver draining)", "refs": 0,
                     "per_s": rate(lambda: fe.notify(fp), args.seconds)})
        be.pending()

        def roundtrip():
            fe.notify(fp)
            select.select([be], [], [], 1)
            be.pending()
        rows.append({"op": "notify+poll+pending, one process", "refs": 0,
                     "per_s": rate(roundtrip, args.seconds)})
        rows.append({"op": "pending() with nothing pending", "refs": 0,
                     "per_s": rate(be.pending, args.seconds)})
        fe.close(); be.close(); m.close(); a.close()
    for r in rows:
        r["us_per_op"] = 1e6 / r["per_s"]
        if args.json:
            print(json.dumps(r))
    if not args.json:
        print(f"{'operation':40} {'per s':>12} {'us/op':>8}")
        for r in rows:
            print(f"{r['op']:40} {r['per_s']:12.0f} {r['us_per_op']:8.1f}")


if __name__ == "__main__":
    main()
