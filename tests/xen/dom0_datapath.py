"""Runs INSIDE dom0 of the test bed (tests/xen/test_datapath_real.py starts it with the dom0
venv's python): the toolstack emulation (xapi_storage.toolstack) driving the installed plugin
executables against the real oxenstored, kernel blkback and loop devices.

    python dom0_datapath.py '<one JSON request>'   ->   one JSON object on stdout

Requests ({"op": ..., ...}):
    sr        {path}                      create and attach a file-raw SR -> {"sr"}
    create    {sr, size}                  Volume.create -> the volume
    resize    {sr, key, size}             Volume.resize
    run       {operation, ctx, [fault],   Toolstack.run(operation, ctx) -> {"ctx"} or {"error"}
               [plugin]}                  (fault: XAPI_STORAGE_FAULT for the plugin processes;
                                          plugin: the volume plugin, default file-raw)
    check     {sr, key}                   what is left: loop devices of the volume, state files,
                                          backend/frontend nodes, plugin processes
"""

import json
import os
import subprocess
import sys

from xapi_storage.datapath.blkback import loops_of
from xapi_storage.datapath.lifecycle import state_root
from xapi_storage.toolstack import xenopsd
from xapi_storage.toolstack.daemon import Daemon, ScriptError
from xapi_storage.toolstack.sequences import Toolstack

ROOT = "/root/dp-root"
FILE_RAW = "org.xen.xapi.storage.file-raw"


def daemon(fault=None):
    env = dict(os.environ)
    env["XAPI_STORAGE_SYSLOG"] = "0"
    if fault:
        env["XAPI_STORAGE_FAULT"] = fault
    return Daemon(ROOT, timeout=120, env=env)


def op_sr(req):
    d = daemon()
    cfg = d.volume(FILE_RAW, "SR.create", {"dbg": "bed", "uuid": "5f0c1d8e-0000-4000-8000-0000000000b1",
                                           "configuration": {"path": req["path"]}, "name": "bed",
                                           "description": ""})
    return {"sr": d.volume(FILE_RAW, "SR.attach", {"dbg": "bed", "configuration": cfg})}


def op_create(req):
    return daemon().volume(FILE_RAW, "Volume.create", {
        "dbg": "bed", "sr": req["sr"], "name": "bed", "description": "", "size": req["size"],
        "sharable": False})


def op_resize(req):
    daemon().volume(FILE_RAW, "Volume.resize", {"dbg": "bed", "sr": req["sr"], "key": req["key"],
                                                "new_size": req["size"]})
    return {}


def op_run(req):
    ctx = dict(req["ctx"], plugin=req.get("plugin", FILE_RAW))
    if ctx.get("vbd"):
        ctx["vbd"] = xenopsd.Vbd.from_dict(ctx["vbd"])
    xs = xenopsd.open_xenstore()
    try:
        Toolstack(daemon(req.get("fault")), xs, hotplug_timeout=60, unplug_timeout=30).run(
            req["operation"], ctx)
        err = None
    except ScriptError as e:
        err = {"code": e.code, "params": e.params}
    except xenopsd.DeviceError as e:
        err = {"code": "DeviceError", "params": [str(e)]}
    finally:
        xs.close()
    if isinstance(ctx.get("vbd"), xenopsd.Vbd):
        ctx["vbd"] = ctx["vbd"].to_dict()
    return {"ctx": ctx, "error": err}


def leftovers(guest=None):
    """Datapath state files, backend/frontend nodes (those of `guest`'s frontends too) and
    plugin processes: what a clean unplug leaves none of beyond the bed's own."""
    states = []
    for d, _, files in os.walk(state_root()):
        states += [os.path.join(d, f) for f in files]
    xs = xenopsd.open_xenstore()
    try:
        nodes = []
        for p in ("/local/domain/0/backend/vbd", "/xenops", "/xapi"):
            for c in xs.list(p):
                nodes.append(f"{p}/{c}")
        if guest is not None:
            nodes += [f"fe:{v.devid}" for v in xenopsd.find_vbds(xs, guest)]
    finally:
        xs.close()
    ps = subprocess.run(["ps", "-eo", "pid,args"], stdout=subprocess.PIPE,
                        universal_newlines=True).stdout
    procs = [line for line in ps.splitlines() if ROOT in line]
    return {"states": states, "nodes": nodes, "procs": procs}


def op_check(req):
    path = os.path.join(req["path"], req["key"] + ".img")
    return dict(leftovers(req.get("guest")), loops=loops_of(path))


def main():
    req = json.loads(sys.argv[1])
    out = globals()["op_" + req["op"]](req)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
