#!/usr/bin/env python3
"""What the SDK costs per plugin call: a lean plugin's executables, laid out by the real
installer in a temporary root, against `python -c pass` (same interpreter, same run,
interleaved), plus the in-process cost of validating and encoding a large result.

    python benchmarks/sdk_startup.py [--rounds N] [--json]

Prints a table; with --json, one JSON object per row with the keys `call` and `median_s`
(and `ratio` to `python -c pass` where it applies). Not a test: numbers depend on the machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

LEAN_PLUGIN = '''
from xapi_storage.sdk import base


class Plugin(base.Plugin):
    def query(self, dbg):
        return {"plugin": "bench", "name": "bench", "description": "", "vendor": "", "copyright": "",
                "version": "1", "required_api_version": "5.0", "features": [], "configuration": {},
                "required_cluster_stack": []}


class Datapath(base.Datapath):
    def attach(self, dbg, uri, domain):
        path = uri.split("://", 1)[-1]
        return {"implementations": [["XenDisk", {"backend_type": "vbd", "params": path, "extra": {}}],
                                    ["BlockDevice", {"path": path}]]}


IMPLEMENTATIONS = {"Plugin": Plugin, "Datapath": Datapath}
'''


def volumes(n):
    return [{"key": f"k{i}", "uuid": f"u{i}", "name": "disk", "description": "", "read_write": True,
             "sharable": False, "virtual_size": 10737418240, "physical_utilisation": 4096,
             "uri": [f"blkback:///srv/sr/k{i}", f"pyblkback:///srv/sr/k{i}"],
             "keys": {"vdi-type": "user", "content_id": "abc"}} for i in range(n)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    args = ap.parse_args(argv)
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        mods = os.path.join(tmp, "mods")
        os.mkdir(mods)
        with open(os.path.join(mods, "bench_lean.py"), "w") as f:
            f.write(LEAN_PLUGIN)
        env = dict(os.environ, XAPI_STORAGE_SYSLOG="0")
        env["PYTHONPATH"] = os.pathsep.join([mods] + [p for p in [env.get("PYTHONPATH")] if p])
        root = os.path.join(tmp, "root")
        subprocess.run([py, "-m", "xapi_storage.cli", "install", "--root", root,
                        "--plugin", "datapath:bench=bench_lean", "--observer-python", "none"], check=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        d = os.path.join(root, "datapath", "bench")
        cases = {
            "python -c pass": ([py, "-c", "pass"], b""),
            "Plugin.Query": ([os.path.join(d, "Plugin.Query"), "--json"], b'{"dbg":"bench"}'),
            "Datapath.attach": ([os.path.join(d, "Datapath.attach"), "--json"],
                                b'{"dbg":"bench","uri":"bench:///dev/loop3","domain":"7"}'),
            "Datapath.attach (bad request)": ([os.path.join(d, "Datapath.attach"), "--json"],
                                              b'{"dbg":"bench","uri":7,"domain":"7"}'),
        }
        times = {k: [] for k in cases}
        for _ in range(args.rounds):
            for k, (cmd, stdin) in cases.items():
                t = time.perf_counter()
                subprocess.run(cmd, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
                times[k].append(time.perf_counter() - t)
    base = statistics.median(times["python -c pass"])
    rows = [{"call": k, "median_s": round(statistics.median(v), 6),
             "ratio": round(statistics.median(v) / base, 3)} for k, v in times.items()]

    from xapi_storage.sdk import jsonio, schema
    m = schema.lookup("SR.ls")
    vols = volumes(10000)
    m.check_result(vols[:1])
    vt, et = [], []
    for _ in range(5):
        t = time.perf_counter()
        m.check_result(vols)
        t2 = time.perf_counter()
        jsonio.dumps(vols)
        et.append(time.perf_counter() - t2)
        vt.append(t2 - t)
    rows.append({"call": "validate SR.ls result, 10000 volumes (in-process)", "median_s": round(statistics.median(vt), 6)})
    rows.append({"call": "encode SR.ls result, 10000 volumes (in-process)", "median_s": round(statistics.median(et), 6)})

    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(f"{'call':52s} {'median':>10s} {'ratio':>6s}")
        for r in rows:
            ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
            print(f"{r['call']:52s} {r['median_s'] * 1000:8.1f}ms {ratio:>6s}")
        print(f"({args.rounds} interleaved rounds; interpreter {py})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
