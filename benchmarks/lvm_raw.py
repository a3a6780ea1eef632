#!/usr/bin/env python3
"""What an lvm-raw call costs over the bare lvm2 command it runs, and whether that stays flat
as the SR fills (issue 9, item 5). Needs root, lvm2 and device-mapper: run it in a dom0, or in
the test bed's dom0 from this machine:

    flock /work/testbed.lock .venv/bin/xapi-storage testbed run --timeout 3600 -- \\
        /opt/xapi-storage/venv/bin/python /mnt/checkout/benchmarks/lvm_raw.py \\
        --progress /mnt/bed/lvm-bench.log

(--progress: dom0's /mnt/bed is the run directory printed on the host, build/testbed-runs/...,
so `tail -f` there shows each round while it runs; the table comes at the end.)

It makes a VG on two sparse loop devices, an lvm-raw SR on it through the installed
executables (lvm2's default 4 MiB extents), fills the SR with N plugin-format volumes of one
extent each (inactive, made by one `lvm` process: see `fill`), then measures,
interleaved round by round (so that load hits every row alike), the median of:

    python3 -c pass        the executables' interpreter doing nothing: the floor
    Plugin.Query           the plugin's executable doing no storage work (its interpreter,
                           the SDK and plugin imported, the request read and answered): the
                           part of every call that is Python, not lvm2
    lvcreate / lvremove    bare lvm2, as the plugin asks it: `lvcreate -Z n -W n -a n -k y
                           -L 4m` (inactive, activation-skip: lvm-raw leaves activation to
                           the datapath) and `lvremove -f --config "devices {
                           issue_discards = 1 }"` of that inactive LV (the plugin discards
                           what it frees: docs/lvm-raw.md "Data left on freed extents")
    lvcreate + copy        bare lvm2 and dd of the 4 MiB source (already active): `lvcreate
                           -Z n -L 4m` (active) and dd, the least a thick snapshot does
    Volume.create          the plugin's executables, JSON mode, as the daemon calls them
    Volume.snapshot        (thick: a full copy of a 4 MiB volume)
    Volume.destroy

for each N in --volumes (default 100 and 1000). Target per plugin row: at most
1.2 x its bare peer + the floor ("met"). Shown beside it, not instead: the same with the
executable's own floor, Plugin.Query, in place of the bare interpreter ("met_exe"): whether
the plugin's lvm2 work stays within 1.2 x the bare command's once the fixed cost of a Python
executable is set aside. Prints a table; with --json one JSON object per row: {"call",
"volumes", "median_s", "peer", "peer_median_s", "floor_s", "ratio", "target_s", "met",
"exe_floor_s", "target_exe_s", "met_exe"} (ratio: median over the peer's median).
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

MiB = 1 << 20
PLUGIN_DIR = "volume/org.xen.xapi.storage.lvm-raw"


PROGRESS = []           # --progress: a file that gets every progress line too


def log(msg):
    print(msg, file=sys.stderr, flush=True)
    for path in PROGRESS:
        with open(path, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")


def sh(argv, **kw):
    return subprocess.run(argv, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, **kw)


def timed(argv, stdin=None):
    t0 = time.monotonic()
    r = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{argv}: exit {r.returncode}: {r.stderr}{r.stdout}")
    return dt, r.stdout


def call(plugin, method, **args):
    args.setdefault("dbg", "bench")
    dt, out = timed([os.path.join(plugin, method), "--json"], json.dumps(args))
    return dt, json.loads(out)


def fill(vg, count, start):
    """Add `count` inactive 1-extent volumes in the plugin's format (its tag and a ready
    record), made by lvm2 itself in ONE `lvm` process: under TCG a process costs a second or
    more to start. Each `lvcreate` still rewrites the whole VG's metadata, so the fill grows
    with the square of the count: 100 volumes took 57 s, 100 to 1,000 22 minutes (dom0 under
    TCG, 2026-12-01).

    First lvm2's shell (`lvm` reading commands from stdin, when lvm2 is built with readline);
    what that did not make, a script (`lvm <file>`, a file starting `#!`, lines of at most
    255 characters: so an lvcreate with our tag, then one lvchange per record tag); what
    neither made is an error (one process per volume would take too long to be worth a run).
    """
    from xapi_storage.volume import lvm, lvm_raw
    from xapi_storage.volume.store import new_uuid
    vols = []
    for i in range(count):
        key = new_uuid()
        rec = {"key": key, "state": "ready", "name": f"fill{start + i}", "description": "",
               "read_write": True, "sharable": False, "keys": {}}
        vols.append((key, lvm.encode_record(rec, 1)))

    def create(key):
        return (f"lvcreate -qq -Zn -Wn -an -ky -L 1m -n {key} --addtag {lvm_raw.VOL_TAG} "
                f"{vg}")
    shell = [create(k) + "".join(f" --addtag {t}" for t in tags) for k, tags in vols]
    subprocess.run(["lvm"], input="\n".join(shell) + "\nexit\n", stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, universal_newlines=True)
    have = lv_names(vg)         # once: each lvs is an lvm2 process
    missing = [v for v in vols if v[0] not in have]
    log(f"  lvm shell (stdin) made {count - len(missing)} of {count}")
    if missing:
        lines = ["#!lvm"]
        for key, tags in missing:
            lines.append(create(key))
            lines += [f"lvchange -qq --addtag {t} {vg}/{key}" for t in tags]
        fd, path = tempfile.mkstemp(prefix="lvm-bench.", suffix=".lvm")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        try:
            subprocess.run(["lvm", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            os.unlink(path)
        have = lv_names(vg)
        left = [v for v in missing if v[0] not in have]
        log(f"  lvm script made {len(missing) - len(left)} of {len(missing)}")
        if left:
            raise RuntimeError(f"fill: lvm2 made {count - len(left)} of {count} volumes")


def lv_names(vg):
    return set(sh(["lvs", "--noheadings", "-o", "lv_name", vg]).stdout.split())


def measure(plugin, vg, sr, floor_py, runs):
    rows = {k: [] for k in ("floor", "Plugin.Query", "lvcreate", "lvremove", "lvcreate+copy",
                            "Volume.create", "Volume.snapshot", "Volume.destroy")}
    for i in range(runs):
        rows["floor"].append(timed(floor_py + ["-c", "pass"])[0])
        rows["Plugin.Query"].append(call(plugin, "Plugin.Query")[0])
        rows["lvcreate"].append(timed(["lvcreate", "-qq", "-Zn", "-Wn", "-an", "-ky", "-L",
                                       "4m", "-n", "bench-bare", vg])[0])
        timed(["lvchange", "-qq", "-ay", "-K", f"{vg}/bench-bare"])     # the copy's source
        t0 = time.monotonic()
        timed(["lvcreate", "-qq", "-Zn", "-Wn", "-L", "4m", "-n", "bench-copy", vg])
        timed(["dd", f"if=/dev/{vg}/bench-bare", f"of=/dev/{vg}/bench-copy", "bs=4M",
               "oflag=direct", "conv=fsync"])
        rows["lvcreate+copy"].append(time.monotonic() - t0)
        timed(["lvchange", "-qq", "-an", f"{vg}/bench-bare"])    # as the plugin's volumes are
        rows["lvremove"].append(timed(["lvremove", "-qq", "-f", "--config",
                                       "devices { issue_discards = 1 }", f"{vg}/bench-bare"])[0])
        timed(["lvremove", "-qq", "-f", f"{vg}/bench-copy"])
        dt, v = call(plugin, "Volume.create", sr=sr, name="b", description="", size=4 * MiB,
                     sharable=False)
        rows["Volume.create"].append(dt)
        dt, s = call(plugin, "Volume.snapshot", sr=sr, key=v["key"])
        rows["Volume.snapshot"].append(dt)
        rows["Volume.destroy"].append(call(plugin, "Volume.destroy", sr=sr, key=s["key"])[0])
        call(plugin, "Volume.destroy", sr=sr, key=v["key"])
        log(f"  round {i + 1}/{runs}: " + ", ".join(f"{k} {t[-1]:.2f}" for k, t in rows.items()))
    return {k: statistics.median(v) for k, v in rows.items()}


PEERS = {"Volume.create": "lvcreate", "Volume.snapshot": "lvcreate+copy",
         "Volume.destroy": "lvremove"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7, help="rounds per SR size (default 7)")
    ap.add_argument("--volumes", default="100,1000",
                    help="comma-separated SR sizes to measure at (default 100,1000)")
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument("--progress", metavar="FILE",
                    help="also append progress lines to FILE (in the test bed: /mnt/bed/..., "
                         "which is the run directory on the host, readable while it runs)")
    args = ap.parse_args()
    if args.progress:
        PROGRESS.append(args.progress)
    sizes = sorted(int(x) for x in args.volumes.split(","))
    tmp = tempfile.mkdtemp(prefix="lvm-bench.")
    loops, sr, plugin = [], None, None
    try:
        exe = shutil.which("xapi-storage", path=os.path.dirname(sys.executable))
        # observer mode checked with this interpreter: dom0's /usr/bin/python3 may lack the package
        sh([exe, "install", "--root", tmp + "/root", "--observer-python", sys.executable])
        plugin = os.path.join(tmp, "root", PLUGIN_DIR)
        with open(os.path.join(plugin, "Volume.stat")) as f:
            floor_py = f.readline()[2:].split()
        need = (sizes[-1] + 64) * 4 * MiB + 512 * MiB      # a fill volume: one 4 MiB extent
        for i in range(2):
            img = f"{tmp}/pv{i}.img"
            with open(img, "wb") as f:
                f.truncate(need // 2 + 64 * MiB)
            loops.append(sh(["losetup", "-f", "--show", img]).stdout.strip())
        uuid = "be4c0000-1111-4222-8333-444444444444"
        _, cfg = call(plugin, "SR.create", uuid=uuid, configuration={"device": ",".join(loops)},
                      name="bench", description="")
        _, sr = call(plugin, "SR.attach", configuration=cfg)
        results, have = [], 0
        for n in sizes:
            log(f"filling the SR to {n} volumes")
            t0 = time.monotonic()
            fill(sr, n - have, have)
            log(f"  filled in {time.monotonic() - t0:.0f} s")
            have = n
            log(f"measuring at {n} volumes ({args.runs} rounds)")
            med = measure(plugin, sr, sr, floor_py, args.runs)
            for call_name, peer in PEERS.items():
                target = 1.2 * med[peer] + med["floor"]
                target_exe = 1.2 * med[peer] + med["Plugin.Query"]
                results.append({"call": call_name, "volumes": n,
                                "median_s": round(med[call_name], 4), "peer": peer,
                                "peer_median_s": round(med[peer], 4),
                                "floor_s": round(med["floor"], 4),
                                "ratio": round(med[call_name] / med[peer], 2),
                                "target_s": round(target, 4),
                                "met": med[call_name] <= target,
                                "exe_floor_s": round(med["Plugin.Query"], 4),
                                "target_exe_s": round(target_exe, 4),
                                "met_exe": med[call_name] <= target_exe})
                log(f"  {call_name} at {n}: {med[call_name]:.3f} s, {peer} {med[peer]:.3f} s, "
                    f"floor {med['floor']:.3f} s, target {target:.3f} s")
        if args.json:
            for r in results:
                print(json.dumps(r))
        else:
            print(f"{'call':16} {'volumes':>7} {'median s':>9} {'peer':>14} {'peer s':>8} "
                  f"{'floor s':>8} {'ratio':>6} {'target s':>9} met  {'exe floor':>9} "
                  f"{'target':>7} met_exe")
            for r in results:
                print(f"{r['call']:16} {r['volumes']:>7} {r['median_s']:>9.3f} "
                      f"{r['peer']:>14} {r['peer_median_s']:>8.3f} {r['floor_s']:>8.3f} "
                      f"{r['ratio']:>6.2f} {r['target_s']:>9.3f} {'yes' if r['met'] else 'NO ':3}"
                      f"  {r['exe_floor_s']:>9.3f} {r['target_exe_s']:>7.3f} "
                      f"{'yes' if r['met_exe'] else 'NO'}")
    finally:
        if sr:
            subprocess.run(["vgremove", "-qq", "-ff", "-y", sr], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        for dev in loops:
            subprocess.run(["pvremove", "-qq", "-ff", "-y", dev], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            subprocess.run(["losetup", "-d", dev])
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
