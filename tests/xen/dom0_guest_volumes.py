"""Runs INSIDE dom0 of the test bed (tests/xen/test_volume_plugins_guest.py starts it with the
dom0 venv's python): lvm-raw and nfs-raw volumes made through their installed executables,
plugged into a PV guest through the `blkback` datapath by the toolstack emulation
(dom0_datapath.op_run: the daemon's calls, xenopsd's nodes), and what the host holds before
and after: active LVs, loop devices, datapath state files, backend/frontend nodes, plugin
processes, NFS mounts.

    python dom0_guest_volumes.py '<one JSON request>'   ->   one JSON object on stdout

Every request is one Python start in dom0 (15-20 s under TCG), so each does several steps:
    lvm-up   {uuid, provisioning, size, guest}   two sparse files on loop devices, an lvm-raw SR
                                                 on them (SR.create, SR.attach), one volume,
                                                 hot-plugged into the guest -> {sr, dir, devs,
                                                 key, world0 (before), world (after the create),
                                                 ctx (the plug's) or error}
    nfs-up   {uuid, export, size, guest}         the same with an nfs-raw SR on 127.0.0.1:export
    steps    {plugin, items: [{operation, ctx}], guest}
                                                 Toolstack operations in order, stopping at the
                                                 first error -> {results: [{ctx, error, world}]}
    down     {plugin, sr, keys, [unplug], [dir, devs], guest}
                                                 best effort, whatever failed before: unplug each
                                                 ctx in `unplug` (vm-shutdown: the hard way),
                                                 Volume.destroy, SR.destroy (SR.detach if that
                                                 failed), then the loop devices and their files
                                                 -> {errors, world}
"""

import json
import os
import subprocess
import sys
import tempfile

import dom0_datapath as dp       # the same directory (sys.path[0])

LVM = "org.xen.xapi.storage.lvm-raw"
NFS = "org.xen.xapi.storage.nfs-raw"
MiB = 1 << 20


def sh(argv):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"{argv}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def world(guest=None):
    """What the host holds now: active LVs (vg/lv), bound loop devices (dev=backing file), NFS
    mounts, and dom0_datapath.leftovers (state files, nodes, plugin processes)."""
    out = sh(["lvs", "--noheadings", "--separator", "/", "-o", "vg_name,lv_name,lv_attr"])
    active = sorted(ln.strip().rsplit("/", 1)[0] for ln in out.splitlines()
                    if ln.strip() and ln.strip().rsplit("/", 1)[1][4:5] == "a")
    loops = []
    for n in sorted(os.listdir("/sys/block")):
        try:
            with open(f"/sys/block/{n}/loop/backing_file") as f:
                loops.append(f"/dev/{n}={f.read().strip()}")
        except OSError:
            pass
    with open("/proc/self/mounts") as f:
        mounts = sorted(ln.split()[1] for ln in f if ln.split()[2].startswith("nfs"))
    return dict(dp.leftovers(guest), active_lvs=active, loops=loops, mounts=mounts)


def volume(plugin, method, **args):
    args.setdefault("dbg", "bed-guest")
    return dp.daemon().volume(plugin, method, args)


def _up(req, plugin, configuration, out):
    """SR.create + SR.attach + Volume.create + the guest's hot-plug; fills `out` as it goes, so
    that a failure still reports what to clean."""
    cfg = volume(plugin, "SR.create", uuid=req["uuid"], configuration=configuration,
                 name="guest", description="")
    out["sr"] = volume(plugin, "SR.attach", configuration=cfg)
    vol = volume(plugin, "Volume.create", sr=out["sr"], name="guest", description="",
                 size=req["size"], sharable=False)
    out.update(key=vol["key"], uri=vol["uri"], world=world(req["guest"]))
    r = dp.op_run({"plugin": plugin, "operation": "vbd-plug",
                   "ctx": {"sr": out["sr"], "key": vol["key"], "domain": str(req["guest"])}})
    out.update(r)
    return out


def op_lvm_up(req):
    out = {"world0": world(req["guest"]), "devs": []}
    out["dir"] = tempfile.mkdtemp(prefix="gv.", dir="/root")
    try:
        for i in range(2):
            img = f"{out['dir']}/pv{i}.img"
            with open(img, "wb") as f:
                f.truncate(256 * MiB)
            out["devs"].append(sh(["losetup", "-f", "--show", img]).strip())
        config = {"device": ",".join(out["devs"])}
        if req.get("provisioning"):
            config["provisioning"] = req["provisioning"]
        return _up(req, LVM, config, out)
    except Exception as e:      # noqa: BLE001 - reported, the test cleans with `down`
        out["error"] = {"code": type(e).__name__, "params": [str(e)]}
        return out


def op_nfs_up(req):
    out = {"world0": world(req["guest"])}
    config = {"server": "127.0.0.1", "serverpath": req["export"], "nfsversion": "4.2"}
    try:
        return _up(req, NFS, config, out)
    except Exception as e:      # noqa: BLE001 - reported, the test cleans with `down`
        out["error"] = {"code": type(e).__name__, "params": [str(e)]}
        return out


def op_steps(req):
    results = []
    for item in req["items"]:
        r = dp.op_run({"plugin": req["plugin"], "operation": item["operation"],
                       "ctx": item["ctx"]})
        r["world"] = world(req.get("guest"))
        results.append(r)
        if r["error"] is not None:
            break
    return {"results": results}


def op_down(req):
    errors = []

    def attempt(what, fn, *args, **kw):
        try:
            fn(*args, **kw)
        except Exception as e:      # noqa: BLE001 - every step is tried, each error reported
            errors.append(f"{what}: {e}")

    def unplug(ctx):
        r = dp.op_run({"plugin": req["plugin"], "operation": "vm-shutdown", "ctx": ctx})
        if r["error"] is not None:
            raise RuntimeError(r["error"])

    for ctx in req.get("unplug") or []:
        attempt("unplug", unplug, ctx)
    sr = req.get("sr")
    if sr:
        for key in req.get("keys") or []:
            attempt("Volume.destroy", volume, req["plugin"], "Volume.destroy", sr=sr, key=key)
        n = len(errors)
        attempt("SR.destroy", volume, req["plugin"], "SR.destroy", sr=sr)
        if len(errors) > n:         # at least let go of the storage (unmount, deactivate)
            attempt("SR.detach", volume, req["plugin"], "SR.detach", sr=sr)
    for dev in req.get("devs") or []:
        # what a failed SR.destroy left on our own loop devices (the VG of the test's uuid)
        vg = subprocess.run(["pvs", "--noheadings", "-o", "vg_name", dev], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, universal_newlines=True).stdout.strip()
        if vg:
            errors.append(f"VG {vg} left on {dev}")
            subprocess.run(["vgchange", "-an", vg], stderr=subprocess.DEVNULL)
            subprocess.run(["vgremove", "-ff", "-y", vg], stderr=subprocess.DEVNULL)
        subprocess.run(["pvremove", "-ff", "-y", dev], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        attempt("losetup -d", sh, ["losetup", "-d", dev])
    if req.get("dir"):
        attempt("rm", sh, ["rm", "-rf", req["dir"]])
    return {"errors": errors, "world": world(req.get("guest"))}


def main():
    req = json.loads(sys.argv[1])
    out = globals()["op_" + req["op"].replace("-", "_")](req)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
