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
    nbd_md5   {uri, offset, length}       md5 of that range read over the volume's NBD export
    check     {uri, guest}                what is left: server, sockets, state, nodes
"""

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys

from xapi_storage.blkback import nbd
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


def _recv(s, n):
    b = b""
    while len(b) < n:
        x = s.recv(n - len(b))
        if not x:
            raise EOFError("NBD server closed the connection")
        b += x
    return b


def op_nbd_md5(req):
    """A minimal NBD client (fixed newstyle, EXPORT_NAME, READ): the guest's data as dom0
    sees it over the volume's export."""
    vid = pbb.server_id(req["uri"])
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(os.path.join(pbb.run_dir(), vid + ".nbd"))
    _recv(s, 18)
    name = vid.encode()
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME,
                                                  len(name)) + name)
    size, _flags = struct.unpack(">QH", _recv(s, 10))
    h = hashlib.md5()
    off, end = req["offset"], req["offset"] + req["length"]
    while off < end:
        n = min(1 << 20, end - off)
        s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, off, off, n))
        magic, err, handle = struct.unpack(">IIQ", _recv(s, 16))
        if err:
            raise OSError(err, "NBD read error")
        h.update(_recv(s, n))
        off += n
    s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, 0, 0, 0))
    s.close()
    return {"md5": h.hexdigest(), "size": size}


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
    return {"procs": procs, "states": states, "nodes": nodes, "sockets": socks}


def main():
    req = json.loads(sys.argv[1])
    out = globals()["op_" + req["op"]](req)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
