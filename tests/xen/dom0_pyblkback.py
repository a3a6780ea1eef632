"""Runs INSIDE dom0 of the test bed (tests/xen/test_pyblkback_datapath_real.py starts it with
the dom0 venv's python): the installed `pyblkback` datapath plugin driven as the toolstack
drives it (the daemon's way of running executables, xenopsd's nodes), against the real
oxenstored, grant tables and event channels.

    python dom0_pyblkback.py '<one JSON request>'   ->   one JSON object on stdout

Requests ({"op": ..., ...}):
    plug      {uri, domain, [open]}       [open(persistent=false)], attach, activate, xenopsd
                                          plug -> {"vbd", "device", "result"}
    unplug    {uri, domain, vbd, hard, [close]}   clean or hard unplug, deactivate, detach,
                                          [close]
    activate  {uri, domain}               Datapath.activate again (starts a dead server)
    pid       {uri}                       the volume's server pid (null: none answers)
    kill      {uri}                       SIGKILL the volume's server
    nbd_check {uri, files}                a dom0 plug through the kernel's nbd-client: the
                                          md5 of each ext4 file (debugfs), fsck.ext4 -fn,
                                          what is left after the disconnect
    check     {uri, guest}                what is left: server, sockets, state, nodes,
                                          overlays next to the volume
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

from xapi_storage.datapath import pyblkback as pbb
from xapi_storage.datapath.lifecycle import state_root
from xapi_storage.toolstack import xenopsd
from xapi_storage.toolstack.daemon import Daemon

ROOT = "/root/dp-root"


def dp(method, **params):
    env = dict(os.environ, XAPI_STORAGE_SYSLOG="0")
    return Daemon(ROOT, timeout=120, env=env).datapath(
        "pyblkback", "Datapath." + method, dict(dbg="bed", **params))


def op_plug(req):
    uri, dom = req["uri"], str(req["domain"])
    if req.get("open"):
        dp("open", uri=uri, persistent=False)
    r = dp("attach", uri=uri, domain=dom)
    dp("activate", uri=uri, domain=dom)
    xs = xenopsd.open_xenstore()
    try:
        vbd = xenopsd.plug(xs, int(dom), r, timeout=60)
    finally:
        xs.close()
    return {"vbd": vbd.to_dict(), "device": vbd.name, "result": r}


def op_unplug(req):
    uri, dom = req["uri"], str(req["domain"])
    vbd = xenopsd.Vbd.from_dict(req["vbd"])
    xs = xenopsd.open_xenstore()
    try:
        (xenopsd.hard_unplug if req.get("hard") else xenopsd.clean_unplug)(xs, vbd)
    finally:
        xs.close()
    dp("deactivate", uri=uri, domain=dom)
    dp("detach", uri=uri, domain=dom)
    if req.get("close"):
        dp("close", uri=uri)
    return {}


def op_activate(req):
    dp("activate", uri=req["uri"], domain=str(req["domain"]))
    return {}


def op_pid(req):
    r = pbb.ping(pbb.server_id(req["uri"]))
    return {"pid": r and r["pid"]}


def op_kill(req):
    pid = op_pid(req)["pid"]
    os.kill(pid, signal.SIGKILL)
    return {"pid": pid}


def _nbd_device():
    """A /dev/nbdN with no connection (the nbd module loaded)."""
    subprocess.run(["modprobe", "nbd"], check=True, timeout=60)
    for n in range(16):
        if not os.path.exists(f"/sys/block/nbd{n}/pid") and _nbd_size(n) == 0:
            return n
    raise RuntimeError("no free /dev/nbdN")


def _nbd_size(n):
    with open(f"/sys/block/nbd{n}/size") as f:
        return int(f.read())


def _sh(argv, timeout=120):
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def op_nbd_check(req):
    """A dom0 plug as xapi makes one (VDI copy, export, static-vdis) of a datapath whose
    result has no File/BlockDevice: Datapath.attach + activate for dom0, the kernel's NBD
    client (`nbd-client -unix SOCK /dev/nbdN -N EXPORT`) on the result's Nbd URI, then, through
    /dev/nbdN: the md5 of each of `files` in the ext4 file system (debugfs) and
    `fsck.ext4 -fn`; then `nbd-client -d`, deactivate, detach. -> {"md5", "fsck", "left"}"""
    uri, dom = req["uri"], "0"
    r = dp("attach", uri=uri, domain=dom)
    dp("activate", uri=uri, domain=dom)
    nbd_uri = xenopsd.implementations(r)["Nbd"]["uri"]          # nbd:unix:<sock>:exportname=<n>
    _, _, rest = nbd_uri.partition("nbd:unix:")
    sock, _, export = rest.rpartition(":exportname=")
    n = _nbd_device()
    dev = f"/dev/nbd{n}"
    out = {"device": dev}
    try:
        rc, o, e = _sh(["nbd-client", "-unix", sock, dev, "-N", export, "-timeout", "60"])
        assert rc == 0, f"nbd-client: rc {rc}: {o}{e}"
        out["size"] = _nbd_size(n) * 512
        out["md5"] = {}
        for name in req["files"]:
            p = subprocess.run(["debugfs", "-R", f"cat /{name}", dev], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, timeout=120)
            out["md5"][name] = hashlib.md5(p.stdout).hexdigest()
        rc, o, e = _sh(["fsck.ext4", "-fn", dev], timeout=300)
        out["fsck"] = {"rc": rc, "out": o + e}
    finally:
        rc, o, e = _sh(["nbd-client", "-d", dev])
        out["disconnect"] = {"rc": rc, "out": o + e}
        dp("deactivate", uri=uri, domain=dom)
        dp("detach", uri=uri, domain=dom)
    end = time.monotonic() + 15          # the kernel lets go of the socket asynchronously
    while True:
        ps = _sh(["ps", "-eo", "pid,args"])[1]
        out["left"] = {"connected": [f"nbd{i}" for i in range(16)
                                     if os.path.exists(f"/sys/block/nbd{i}/pid")],
                       "size": _nbd_size(n),
                       "clients": [ln for ln in ps.splitlines() if "nbd-client" in ln]}
        if not any(out["left"].values()) or time.monotonic() > end:
            return out
        time.sleep(0.2)


def op_check(req):
    vid = pbb.server_id(req["uri"])
    states = []
    for d, _, files in os.walk(os.path.join(state_root(), pbb.SCHEME)):
        states += [os.path.join(d, f) for f in files]
    xs = xenopsd.open_xenstore()
    try:
        # this guest's qdisk backends only: another guest of the bed (the shared `smoke` one
        # has a qdisk disk of QEMU's in its config) is not ours to count
        qdisk = "/local/domain/0/backend/qdisk"
        guest = str(req["guest"])
        nodes = ([qdisk + "/" + guest + "/" + c for c in xs.list(qdisk + "/" + guest)]
                 if guest in xs.list(qdisk) else [])
        nodes += ["fe:%s" % v.devid for v in xenopsd.find_vbds(xs, req["guest"])]
    finally:
        xs.close()
    ps = subprocess.run(["ps", "-eo", "pid,args"], stdout=subprocess.PIPE,
                        universal_newlines=True).stdout
    procs = [line for line in ps.splitlines() if "volume_server" in line and vid in line]
    run = pbb.run_dir()
    socks = [n for n in os.listdir(run)] if os.path.isdir(run) else []
    path = pbb.path_of(req["uri"])
    overlays = [n for n in os.listdir(os.path.dirname(path))
                if n.startswith(".pyblkback-overlay.")]
    return {"procs": procs, "states": states, "nodes": nodes, "sockets": socks,
            "overlays": overlays}


def main():
    req = json.loads(sys.argv[1])
    out = globals()["op_" + req["op"]](req)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
