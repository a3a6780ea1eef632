#!/usr/bin/env python3
"""fio in a PV guest of the real-Xen test bed through three block backends of one file.

    flock /work/testbed.lock .venv/bin/python benchmarks/datapath_fio.py [--json]
          [--runtime S] [--size MIB] [--keep-logs]

Boots the test bed once (Xen + Debian dom0 under QEMU, docs/testing.md), puts one file on
tmpfs in dom0 (`/dev/shm`, filled with random bytes) and runs fio in a guest against it
through, one after the other:

    blkback     the Linux kernel's xen-blkback, through our `blkback` datapath (a loop
                device over the file), plugged as xenopsd plugs it
    pyblkback   our ring server, through our `pyblkback` datapath (a qdisk backend whose
                server the plugin spawns), plugged as xenopsd plugs it
    qdisk       QEMU's qdisk backend (qemu-system-xen in dom0), the disk in the guest's
                config (`backendtype=qdisk`): libxl starts the device model, which serves it

The first two serve one guest started without any disk (no device model, so no QEMU qdisk
backend competes for pyblkback's qdisk device); the third a second guest. Workloads, each
`--runtime` seconds after a 2 s ramp, libaio, O_DIRECT, on the whole device:

    read 1 MiB       sequential read, 1 MiB blocks, iodepth 8
    write 1 MiB      sequential write, 1 MiB blocks, iodepth 8
    randread 4 KiB   random read, 4 KiB blocks, iodepth 32

Prints MB/s (10^6 bytes/s) and IOPS per backend and the ratios pyblkback/blkback and
pyblkback/qdisk with their targets (at least 0.8x the kernel's blkback at 1 MiB, 0.5x at
4 KiB, 1.2x QEMU's qdisk on every row). With --json one JSON object per row: {"workload",
"bs", "iodepth", "<backend>_mbps", "<backend>_iops" for each backend, "vs_blkback",
"target_blkback", "met_blkback", "vs_qdisk", "target_qdisk", "met_qdisk", "emulation"}.
The bed runs under QEMU's software emulation (TCG): every backend's figures are a small
fraction of real hardware's, and the ratios are indicative only.

Nothing is left behind: the devices are unplugged and the datapaths detached, the file is
removed and the bed's run directory deleted (kept with its logs, and the path printed, when
the run fails), also when the run is interrupted (Ctrl-C, SIGTERM, SIGHUP). The bed itself
is thrown away with QEMU.

The same file, run by dom0's python with --dom0 '<JSON request>', is the driver in dom0
(the installed plugin executables driven as the toolstack drives them).
"""

import argparse
import json
import os
import shutil
import signal
import sys
import time

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = "/opt/xapi-storage/venv"
PY = VENV + "/bin/python"
SCRIPT = "/mnt/checkout/benchmarks/datapath_fio.py"
ROOT = "/root/bench-root"
FILE = "/dev/shm/xapi-storage-bench.img"
MiB = 1 << 20
BACKENDS = ("blkback", "pyblkback", "qdisk")
# (name, fio --rw, block size, iodepth, target vs blkback)
WORKLOADS = (("read 1 MiB", "read", "1m", 8, 0.8),
             ("write 1 MiB", "write", "1m", 8, 0.8),
             ("randread 4 KiB", "randread", "4k", 32, 0.5))
TARGET_QDISK = 1.2
EMULATION_NOTE = ("The test bed runs under QEMU's software emulation (TCG): the ratios are "
                  "indicative only, not what real hardware gives.")


def fio_command(device, rw, bs, depth, runtime):
    return (f"fio --name=bench --filename=/dev/{device} --rw={rw} --bs={bs} --iodepth={depth} "
            f"--ioengine=libaio --direct=1 --time_based --runtime={runtime} --ramp_time=2 "
            "--output-format=json")


def parse_fio(text, rw):
    """(bytes per second, IOPS) of the one job in fio's JSON output `text`, for the direction
    of `rw` (read/randread: read; write/randwrite: write). fio's warnings may precede the
    JSON. ValueError on anything else, and on a job that reports an error."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError("no JSON object in fio's output: %r" % text[-500:])
    doc = json.loads(text[start:end + 1])
    jobs = doc.get("jobs") or []
    if len(jobs) != 1:
        raise ValueError("expected one fio job, got %d" % len(jobs))
    job = jobs[0]
    if job.get("error"):
        raise ValueError("fio job error %s" % job["error"])
    side = job["write" if "write" in rw else "read"]
    bw, iops = float(side["bw_bytes"]), float(side["iops"])
    if bw <= 0 or iops <= 0:
        raise ValueError("fio moved no data (%s): %r" % (rw, side.get("io_bytes")))
    return bw, iops


def rows(results):
    """The report's rows from results[backend][workload name] = (bytes/s, IOPS)."""
    out = []
    for name, rw, bs, depth, target_kernel in WORKLOADS:
        row = {"workload": name, "bs": bs, "iodepth": depth}
        for b in BACKENDS:
            bw, iops = results[b][name]
            row[b + "_mbps"] = round(bw / 1e6, 1)
            row[b + "_iops"] = round(iops)
        # MB/s and IOPS give the same ratio for one block size; IOPS keep the precision
        mine = results["pyblkback"][name][1]
        for peer, target in (("blkback", target_kernel), ("qdisk", TARGET_QDISK)):
            ratio = mine / results[peer][name][1]
            row["vs_" + peer] = round(ratio, 2)
            row["target_" + peer] = target
            row["met_" + peer] = ratio >= target
        row["emulation"] = "tcg"
        out.append(row)
    return out


def table(report):
    """The human-readable table of `rows(...)`, with the emulation note."""
    head = f"{'workload':15} {'depth':>5}"
    for b in BACKENDS:
        head += f" {b + ' MB/s':>15} {'IOPS':>7}"
    head += f" {'pyb/blkback':>11} {'target':>6} met {'pyb/qdisk':>9} {'target':>6} met"
    lines = [head]
    for r in report:
        line = f"{r['workload']:15} {r['iodepth']:>5}"
        for b in BACKENDS:
            line += f" {r[b + '_mbps']:>15.1f} {r[b + '_iops']:>7}"
        line += (f" {r['vs_blkback']:>10.2f}x {r['target_blkback']:>5.1f}x "
                 f"{'yes' if r['met_blkback'] else 'NO ':3} {r['vs_qdisk']:>8.2f}x "
                 f"{r['target_qdisk']:>5.1f}x {'yes' if r['met_qdisk'] else 'NO'}")
        lines.append(line)
    lines.append(EMULATION_NOTE)
    return "\n".join(lines)


# ---- the driver in dom0 (run by dom0's venv python with --dom0) ---------------------------

def _daemon():
    from xapi_storage.toolstack.daemon import Daemon
    return Daemon(ROOT, timeout=120, env=dict(os.environ, XAPI_STORAGE_SYSLOG="0"))


def _uri(scheme, path):
    return f"{scheme}://{path}"


def dom0_setup(req):
    """The file on tmpfs, filled with random bytes (reads then move real data)."""
    import subprocess
    subprocess.run(["dd", "if=/dev/urandom", f"of={req['path']}", "bs=1M",
                    f"count={req['size_mib']}", "status=none"], check=True)
    return {"size": os.path.getsize(req["path"])}


def dom0_plug(req):
    """attach + activate through the installed executables, then xenopsd's plug."""
    from xapi_storage.toolstack import xenopsd
    uri, dom = _uri(req["scheme"], req["path"]), str(req["domain"])
    d = _daemon()
    r = d.datapath(req["scheme"], "Datapath.attach", {"dbg": "bench", "uri": uri, "domain": dom})
    d.datapath(req["scheme"], "Datapath.activate", {"dbg": "bench", "uri": uri, "domain": dom})
    xs = xenopsd.open_xenstore()
    try:
        vbd = xenopsd.plug(xs, int(dom), r, timeout=60)
    finally:
        xs.close()
    return {"vbd": vbd.to_dict(), "device": vbd.name}


def dom0_unplug(req):
    """xenopsd's clean unplug, then deactivate and detach."""
    from xapi_storage.toolstack import xenopsd
    uri, dom = _uri(req["scheme"], req["path"]), str(req["domain"])
    xs = xenopsd.open_xenstore()
    try:
        xenopsd.clean_unplug(xs, xenopsd.Vbd.from_dict(req["vbd"]), timeout=60)
    finally:
        xs.close()
    d = _daemon()
    d.datapath(req["scheme"], "Datapath.deactivate", {"dbg": "bench", "uri": uri, "domain": dom})
    d.datapath(req["scheme"], "Datapath.detach", {"dbg": "bench", "uri": uri, "domain": dom})
    return {}


def dom0_cleanup(req):
    """Unplug every VBD of the guest that this toolstack plugged (cleanly, else hard),
    deactivate and detach both datapaths, remove the file; then say what is left."""
    from xapi_storage.datapath import pyblkback
    from xapi_storage.datapath.blkback import loops_of
    from xapi_storage.datapath.lifecycle import state_root
    from xapi_storage.toolstack import xenopsd
    errors = []
    dom = req.get("domain")
    if dom is not None:
        xs = xenopsd.open_xenstore()
        try:
            for vbd in xenopsd.find_vbds(xs, int(dom)):
                try:
                    xenopsd.clean_unplug(xs, vbd, timeout=30)
                except xenopsd.DeviceError as e:
                    errors.append(str(e))
                    xenopsd.hard_unplug(xs, vbd)
        finally:
            xs.close()
    d = _daemon()
    for scheme in req["schemes"]:
        for dom_token in ([str(dom)] if dom is not None else []):
            for call in ("Datapath.deactivate", "Datapath.detach"):
                try:
                    d.datapath(scheme, call, {"dbg": "bench", "uri": _uri(scheme, req["path"]),
                                              "domain": dom_token})
                except Exception as e:          # noqa: BLE001 - report it, go on cleaning
                    errors.append(f"{scheme} {call}: {e}")
    loops = loops_of(req["path"]) if os.path.exists(req["path"]) else []
    if os.path.exists(req["path"]):
        os.unlink(req["path"])
    import subprocess
    states = [os.path.join(p, f) for p, _, fs in os.walk(state_root()) for f in fs]
    ps = subprocess.run(["ps", "-eo", "pid,args"], stdout=subprocess.PIPE,
                        universal_newlines=True).stdout
    procs = [ln for ln in ps.splitlines() if "volume_server" in ln]
    run = pyblkback.run_dir()
    socks = os.listdir(run) if os.path.isdir(run) else []
    return {"errors": errors, "loops": loops, "states": states, "procs": procs,
            "sockets": socks, "file": os.path.exists(req["path"])}


def dom0_main(arg):
    req = json.loads(arg)
    ops = {"setup": dom0_setup, "plug": dom0_plug, "unplug": dom0_unplug,
           "cleanup": dom0_cleanup}
    out = ops[req["op"]](req)
    sys.stdout.write(json.dumps(out) + "\n")


# ---- the host side -------------------------------------------------------------------------

def log(msg):
    print("datapath_fio: " + msg, file=sys.stderr, flush=True)


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


class Run:
    def __init__(self, bed, args):
        self.bed, self.args = bed, args
        self.guest = None            # the guest that datapaths are plugged into (cleanup)

    def driver(self, **req):
        rc, out, err = self.bed.dom0([PY, SCRIPT, "--dom0", json.dumps(req)], timeout=300)
        if rc != 0:
            raise RuntimeError(f"dom0 driver {req['op']} failed (rc {rc}):\n{out}\n{err[-3000:]}")
        return json.loads(out.strip().splitlines()[-1])

    def wait_device(self, guest, name, present=True):
        test = "[ ! -b /dev/{n} ]" if present else "[ -b /dev/{n} ]"
        self.bed.guest(guest, ("i=0; while " + test + "; do i=$((i+1)); [ $i -gt 300 ] && "
                               "exit 1; sleep .2; done").format(n=name), timeout=90, check=True)

    def fio(self, guest, device):
        out = {}
        for name, rw, bs, depth, _ in WORKLOADS:
            cmd = fio_command(device, rw, bs, depth, self.args.runtime)
            res = self.bed.guest(guest, cmd, timeout=self.args.runtime + 180, check=True)
            out[name] = parse_fio(res.stdout, rw)
            log(f"  {name}: {out[name][0] / 1e6:.1f} MB/s, {out[name][1]:.0f} IOPS")
        return out

    def measure(self):
        bed, results = self.bed, {}
        bed.dom0([VENV + "/bin/xapi-storage", "install", "--root", ROOT, "--observer-python",
                  PY], timeout=300, check=True)
        log(f"filling {FILE} ({self.args.size} MiB of random bytes) in dom0")
        self.driver(op="setup", path=FILE, size_mib=self.args.size)
        g = bed.start_guest("bench-dp")
        self.guest = g
        for scheme in ("blkback", "pyblkback"):
            log(f"{scheme}: plugging {FILE} into guest {g.name} (domid {g.domid})")
            p = self.driver(op="plug", scheme=scheme, path=FILE, domain=g.domid)
            self.wait_device(g.name, p["device"])
            results[scheme] = self.fio(g.name, p["device"])
            self.driver(op="unplug", scheme=scheme, path=FILE, domain=g.domid, vbd=p["vbd"])
            self.wait_device(g.name, p["device"], present=False)
        self.guest = None
        bed.stop_guest(g.name)
        log("qdisk: a guest with the file as its QEMU qdisk disk")
        g = bed.start_guest("bench-qdisk", disks=[
            f"format=raw,vdev=xvdb,access=rw,backendtype=qdisk,target={FILE}"])
        self.wait_device(g.name, "xvdb")
        results["qdisk"] = self.fio(g.name, "xvdb")
        bed.stop_guest(g.name)
        return results

    def cleanup(self):
        """Whatever is still plugged, attached or on tmpfs in dom0 goes; False if anything
        stays."""
        dom = self.guest.domid if self.guest is not None else None
        left = self.driver(op="cleanup", schemes=["blkback", "pyblkback"], path=FILE,
                           domain=dom)
        for name in list(self.bed.guests):
            self.bed.stop_guest(name)
        stays = {k: v for k, v in left.items() if v and k != "errors"}
        if stays:
            log(f"left behind in dom0: {stays}")
        return not stays


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--dom0":
        return dom0_main(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--runtime", type=int, default=20,
                    help="seconds of each fio run, after a 2 s ramp (at least 1, default 20)")
    ap.add_argument("--size", type=int, default=256,
                    help="MiB of the file on dom0's tmpfs (at least 1, default 256)")
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument("--keep-logs", action="store_true",
                    help="keep the bed's run directory with dom0's logs even on success")
    args = ap.parse_args()
    if args.runtime < 1 or args.size < 1:   # fio's --runtime=0 is "no limit"; dd of 0 MiB
        ap.error("--runtime and --size: at least 1")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    from xapi_storage import testbed
    reason = testbed.unavailable_reason(
        images_cached=testbed.check_cached(testbed.cache_root() / testbed.image_key()) is None)
    if reason:
        log("the real-Xen test bed cannot run here: " + reason)
        return 1
    images = testbed.ensure_images()
    bed = testbed.TestBed(images, checkout=CHECKOUT)
    ok, run = False, None
    try:
        bed.boot()
        log(f"bed up in {bed.timings['boot']} s; installing the checkout in dom0")
        bed.install_checkout()
        run = Run(bed, args)
        results = run.measure()
        ok = True
    finally:
        try:
            if run is not None and bed.alive():
                ok = run.cleanup() and ok
        finally:
            keep = args.keep_logs or not ok
            if keep and bed.alive():
                bed.collect_logs()
            bed.shutdown()
            if keep:
                try:
                    os.unlink(bed.run_dir / "scratch.img")
                except OSError:
                    pass
                log(f"logs of the test bed: {bed.run_dir}")
            else:
                shutil.rmtree(bed.run_dir, ignore_errors=True)
    if not ok:
        return 1
    report = rows(results)
    if args.json:
        for r in report:
            print(json.dumps(r))
    else:
        print(table(report))
    log("timings (s): %s" % bed.timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
