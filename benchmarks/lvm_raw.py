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
extent each (inactive, written in one metadata change: see `fill`), then measures,
interleaved round by round (so that load hits every row alike), the median of:

    python3 -c pass        the executables' interpreter doing nothing: the floor
    lvcreate / lvremove    bare lvm2: `lvcreate -Z n -L 4m` and `lvremove -f` of a plain LV
    lvcreate + copy        bare lvm2 and dd of the 4 MiB source: what a thick snapshot does
    Volume.create          the plugin's executables, JSON mode, as the daemon calls them
    Volume.snapshot        (thick: a full copy of a 4 MiB volume)
    Volume.destroy

for each N in --volumes (default 100 and 1000). Target per plugin row: at most
1.2 x its bare peer + the floor. Prints a table; with --json one JSON object per row:
{"call", "volumes", "median_s", "peer", "peer_median_s", "floor_s", "ratio", "target_s",
"met"} (ratio: median over the peer's median).
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
    """Add `count` inactive 1-extent volumes in the plugin's format (its tag and a ready record).

    One metadata change for all of them (vgcfgbackup, the LVs added to the text, vgcfgrestore):
    under TCG each lvcreate costs seconds and more as the metadata grows. What that did not
    make is made with one `lvm` shell process, and what the shell did not either (an lvm2
    built without it), one process per LV."""
    from xapi_storage.volume import lvm, lvm_raw
    from xapi_storage.volume.store import new_uuid
    vols = []
    for i in range(count):
        key = new_uuid()
        rec = {"key": key, "state": "ready", "name": f"fill{start + i}", "description": "",
               "read_write": True, "sharable": False, "keys": {"vdi-type": "user"}}
        vols.append((key, [lvm_raw.VOL_TAG] + lvm.encode_record(rec, 1)))
    try:
        restore_with(vg, vols)
    except Exception as e:      # noqa: BLE001 - whatever it was, the slow way below
        log(f"  vgcfgrestore did not add them ({e}); lvcreate instead")
    have = lv_names(vg)         # once: each lvs is an lvm2 process (about a second under TCG)
    missing = [v for v in vols if v[0] not in have]
    lines = [f"lvcreate -qq -Zn -Wn -an -L 1m -n {key} "
             + " ".join(f"--addtag {t}" for t in tags) + f" {vg}" for key, tags in missing]
    if lines:
        subprocess.run(["lvm"], input="\n".join(lines) + "\nexit\n", stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, universal_newlines=True)
        have = lv_names(vg)
        left = [ln for ln in lines if ln.split(" -n ")[1].split()[0] not in have]
        if left:        # an lvm2 built without its shell: one process per command
            log(f"  lvm shell made {len(lines) - len(left)} of {len(lines)}; the rest one by one")
            for ln in left:
                sh(["lvm"] + ln.split())
    have = lv_names(vg)
    if any(v[0] not in have for v in vols):
        raise RuntimeError("fill: volumes missing after lvcreate")


def lv_names(vg):
    return set(sh(["lvs", "--noheadings", "-o", "lv_name", vg]).stdout.split())


def restore_with(vg, vols):
    """Add LVs of one extent each, on free extents, in ONE metadata change: the VG's metadata
    text (vgcfgbackup) with their sections added, written back by vgcfgrestore (the LVs are
    inactive, which it requires)."""
    import random
    import re
    import string
    fd, path = tempfile.mkstemp(prefix="lvm-bench.", suffix=".vg")
    os.close(fd)
    try:
        sh(["vgcfgbackup", "-q", "-f", path, vg])
        with open(path) as f:
            text = f.read()
        pv_key = {dev: key for key, dev in re.findall(
            r'\n\t\t(pv\d+) \{\n\t\t\tid = "[^"]*"\n\t\t\tdevice = "([^"]*)"', text)}
        free = []           # (pv key, extent) of every free extent
        for ln in sh(["pvs", "--noheadings", "--segments", "--separator", ",", "-o",
                      "pv_name,pvseg_start,pvseg_size,lv_name", "-S", f"vg_name={vg}"]
                     ).stdout.splitlines():
            dev, seg_start, seg_size, lv_name = [x.strip() for x in ln.split(",")]
            if not lv_name:
                free += [(pv_key[dev], e) for e in range(int(seg_start),
                                                          int(seg_start) + int(seg_size))]
        if len(free) < len(vols):
            raise ValueError(f"{len(free)} free extents for {len(vols)} volumes")
        free = free[-len(vols):]        # the highest: out of the measured calls' way
        alnum = string.ascii_letters + string.digits
        now = int(time.time())
        sections = []
        for (key, tags), (pv, extent) in zip(vols, free):
            raw = "".join(random.choice(alnum) for _ in range(32))
            lv_id = "-".join(raw[a:b] for a, b in ((0, 6), (6, 10), (10, 14), (14, 18),
                                                    (18, 22), (22, 26), (26, 32)))
            sections.append(
                f"\t\t{key} {{\n\t\t\tid = \"{lv_id}\"\n"
                f"\t\t\tstatus = [\"READ\", \"WRITE\", \"VISIBLE\"]\n\t\t\tflags = []\n"
                f"\t\t\ttags = [{', '.join(json.dumps(t) for t in tags)}]\n"
                f"\t\t\tcreation_time = {now}\n\t\t\tcreation_host = \"bench\"\n"
                f"\t\t\tsegment_count = 1\n\n\t\t\tsegment1 {{\n"
                f"\t\t\t\tstart_extent = 0\n\t\t\t\textent_count = 1\n\n"
                f"\t\t\t\ttype = \"striped\"\n\t\t\t\tstripe_count = 1\n\n"
                f"\t\t\t\tstripes = [\n\t\t\t\t\t\"{pv}\", {extent}\n\t\t\t\t]\n"
                f"\t\t\t}}\n\t\t}}\n")
        block = "\n".join(sections)
        if "\n\tlogical_volumes {\n" in text:
            text = text.replace("\n\tlogical_volumes {\n", "\n\tlogical_volumes {\n\n"
                                + block + "\n", 1)
        else:       # no LV yet: a section before the VG's closing brace
            head = text.index(f"\n{vg} {{\n")
            close = text.index("\n}\n", head)
            text = (text[:close] + "\n\n\tlogical_volumes {\n\n" + block + "\t}\n"
                    + text[close:])
        with open(path, "w") as f:
            f.write(text)
        sh(["vgcfgrestore", "-q", "-f", path, vg])
    finally:
        os.unlink(path)


def measure(plugin, vg, sr, floor_py, runs):
    rows = {k: [] for k in ("floor", "lvcreate", "lvremove", "lvcreate+copy", "Volume.create",
                            "Volume.snapshot", "Volume.destroy")}
    for i in range(runs):
        rows["floor"].append(timed(floor_py + ["-c", "pass"])[0])
        rows["lvcreate"].append(timed(["lvcreate", "-qq", "-Zn", "-Wn", "-L", "4m", "-n",
                                       "bench-bare", vg])[0])
        t0 = time.monotonic()
        timed(["lvcreate", "-qq", "-Zn", "-Wn", "-L", "4m", "-n", "bench-copy", vg])
        timed(["dd", f"if=/dev/{vg}/bench-bare", f"of=/dev/{vg}/bench-copy", "bs=4M",
               "oflag=direct", "conv=fsync"])
        rows["lvcreate+copy"].append(time.monotonic() - t0)
        rows["lvremove"].append(timed(["lvremove", "-qq", "-f", f"{vg}/bench-bare"])[0])
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
                results.append({"call": call_name, "volumes": n,
                                "median_s": round(med[call_name], 4), "peer": peer,
                                "peer_median_s": round(med[peer], 4),
                                "floor_s": round(med["floor"], 4),
                                "ratio": round(med[call_name] / med[peer], 2),
                                "target_s": round(target, 4),
                                "met": med[call_name] <= target})
                log(f"  {call_name} at {n}: {med[call_name]:.3f} s, {peer} {med[peer]:.3f} s, "
                    f"floor {med['floor']:.3f} s, target {target:.3f} s")
        if args.json:
            for r in results:
                print(json.dumps(r))
        else:
            print(f"{'call':16} {'volumes':>7} {'median s':>9} {'peer':>14} {'peer s':>8} "
                  f"{'floor s':>8} {'ratio':>6} {'target s':>9} met")
            for r in results:
                print(f"{r['call']:16} {r['volumes']:>7} {r['median_s']:>9.3f} "
                      f"{r['peer']:>14} {r['peer_median_s']:>8.3f} {r['floor_s']:>8.3f} "
                      f"{r['ratio']:>6.2f} {r['target_s']:>9.3f} {'yes' if r['met'] else 'NO'}")
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
