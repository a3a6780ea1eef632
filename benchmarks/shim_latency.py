#!/usr/bin/env python3
"""How long one plugin call costs through the installed executables (issue 2, item 8).

Every call xapi-storage-script makes is a new process, and Volume.stat runs before every
datapath operation, so the start-up of an executable is the price of everything. This measures,
in one run and interleaved (so that machine load hits all rows alike):

    python3 -c pass     the interpreter of the executables' shebang doing nothing, with its
                        full start-up (site-packages scan): the floor of a plain executable
    python3 -I -S -c pass   the same interpreter isolated and without `site`: the floor of the
                        executables as the installer lays them out (`#!python -IS`)
    Plugin.Query        file-raw's Plugin.Query executable, JSON mode, as the daemon calls it
    Volume.stat         file-raw's Volume.stat on a volume of the big SR
    Volume.stat + <scheme> Plugin.Query
                        for each datapath plugin installed (registered) with the package: the
                        daemon's two processes per datapath call, the second one's start-up
                        and imports measured with its Plugin.Query (its Datapath.activate
                        needs a guest; what activate itself does comes on top)
    SR.ls <N>           file-raw's SR.ls on an SR of N volumes (default 10,000)

Targets: Plugin.Query and Volume.stat at most 1.5x `python3 -I -S -c pass`; a Volume.stat +
datapath pair at most 3x it; SR.ls 10000 under 1 s. Prints a table; with --json one JSON object
per row: {"call", "median_s", "ratio", "ratio_plain", "runs", "target", "met"} (ratio: to
`python3 -I -S -c pass`; ratio_plain: to `python3 -c pass`). Runs on Python 3.6 and later.

    python benchmarks/shim_latency.py [--runs 30] [--ls-runs 5] [--volumes 10000] [--json]

It installs the plugins into a temporary root with `xapi-storage install --root` and builds the
SR there with the plugin's own code (the SR is built once per run; 10,000 creates take a while).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PLUGIN_DIR = "volume/org.xen.xapi.storage.file-raw"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def install(root):
    exe = shutil.which("xapi-storage", path=os.path.dirname(sys.executable))
    argv = [exe] if exe else [sys.executable, "-m", "xapi_storage.cli"]
    subprocess.run(argv + ["install", "--root", root, "--observer-python", sys.executable],
                   check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return os.path.join(root, PLUGIN_DIR)


def datapath_plugins(root):
    """The datapath plugin directories the installer laid (each has a Plugin.Query)."""
    d = os.path.join(root, "datapath")
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    return [(n, os.path.join(d, n)) for n in names
            if os.path.exists(os.path.join(d, n, "Plugin.Query"))]


def shebang_python(path):
    """The shebang's interpreter, without its flags."""
    with open(path) as f:
        line = f.readline()
    interp = line[2:].strip().split()
    return interp[:1] if line.startswith("#!") and interp else [sys.executable]


def build_sr(path, volumes):
    from xapi_storage.volume import file_raw
    SR, V = file_raw.SR(), file_raw.Volume()
    config = SR.create(dbg="bench", uuid="bench", configuration={"path": path}, name="bench",
                       description="")
    sr = SR.attach(dbg="bench", configuration=config)
    t0, key = time.monotonic(), None
    for i in range(volumes):
        v = V.create(dbg="bench", sr=sr, name=f"vol{i}", description="", size=1 << 30,
                     sharable=False)
        V.set(dbg="bench", sr=sr, key=v["key"], k="vdi-type", v="user")
        key = key or v["key"]
        if i and i % 2000 == 0:
            log(f"  {i} volumes ({time.monotonic() - t0:.0f} s)")
    return sr, key


def timed(argv, stdin=None):
    t = time.perf_counter()
    r = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return dt, r.stdout


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=30, help="runs of each small call (default 30)")
    p.add_argument("--ls-runs", type=int, default=5, help="runs of SR.ls (default 5)")
    p.add_argument("--volumes", type=int, default=10000, help="volumes in the SR (10000)")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    args = p.parse_args(argv)

    work = tempfile.mkdtemp(prefix="shim-latency-")
    try:
        root = os.path.join(work, "root")
        plugin = install(root)
        python = shebang_python(os.path.join(plugin, "Plugin.Query"))
        log(f"building an SR of {args.volumes} volumes in {work} ...")
        sr, key = build_sr(os.path.join(work, "sr"), args.volumes)
        rows = {
            "python3 -c pass": (python + ["-c", "pass"], None),
            "python3 -I -S -c pass": (python + ["-I", "-S", "-c", "pass"], None),
            "Plugin.Query": ([os.path.join(plugin, "Plugin.Query"), "--json"],
                             json.dumps({"dbg": "bench"})),
            "Volume.stat": ([os.path.join(plugin, "Volume.stat"), "--json"],
                            json.dumps({"dbg": "bench", "sr": sr, "key": key})),
        }
        pairs = {}
        for scheme, d in datapath_plugins(root):
            pairs[f"Volume.stat + {scheme} Plugin.Query"] = (
                [os.path.join(d, "Plugin.Query"), "--json"], json.dumps({"dbg": "bench"}))
        times = {name: [] for name in list(rows) + list(pairs)}
        for name, (cmd, stdin) in list(rows.items()) + list(pairs.items()):   # warm the caches
            timed(cmd, stdin)
        for _ in range(args.runs):                       # interleaved
            for name, (cmd, stdin) in rows.items():
                times[name].append(timed(cmd, stdin)[0])
            for name, (cmd, stdin) in pairs.items():     # the daemon's pair, one after the other
                cmd0, stdin0 = rows["Volume.stat"]
                times[name].append(timed(cmd0, stdin0)[0] + timed(cmd, stdin)[0])
        ls_name = f"SR.ls {args.volumes}"
        ls_cmd = [os.path.join(plugin, "SR.ls"), "--json"]
        ls_in = json.dumps({"dbg": "bench", "sr": sr})
        _, out = timed(ls_cmd, ls_in)
        if len(json.loads(out)) != args.volumes:
            raise SystemExit("SR.ls did not list every volume")
        times[ls_name] = [timed(ls_cmd, ls_in)[0] for _ in range(args.ls_runs)]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    plain = statistics.median(times["python3 -c pass"])
    floor = statistics.median(times["python3 -I -S -c pass"])
    result = []
    for name, ts in times.items():
        med = statistics.median(ts)
        if name in ("Plugin.Query", "Volume.stat"):
            target, met = "<= 1.5x -I -S floor", med <= 1.5 * floor
        elif name.startswith("Volume.stat + "):
            target, met = "<= 3x -I -S floor", med <= 3 * floor
        elif name == ls_name:
            target, met = "< 1 s", med < 1.0
        else:
            target, met = "", None
        result.append({"call": name, "median_s": round(med, 6), "ratio": round(med / floor, 3),
                       "ratio_plain": round(med / plain, 3), "runs": len(ts), "target": target,
                       "met": met})
    if args.json:
        for row in result:
            print(json.dumps(row))
    else:
        print(f"python {sys.version.split()[0]} ({python[0]})")
        print(f"{'call':<36} {'median':>10} {'x -IS':>6} {'x pass':>7} {'runs':>5}  target")
        for r in result:
            mark = {True: "met", False: "MISSED", None: ""}[r["met"]]
            print(f"{r['call']:<36} {r['median_s'] * 1000:>8.1f}ms {r['ratio']:>6.2f} "
                  f"{r['ratio_plain']:>7.2f} {r['runs']:>5}  {r['target']} {mark}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
