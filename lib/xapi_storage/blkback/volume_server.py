"""One ring server per volume, for the `pyblkback` datapath: qdisk adoption, NBD, control.

    python -m xapi_storage.blkback.volume_server --id ID --path FILE [--backend raw|block]
        [--nonpersistent] [--readonly] [--domains D1,D2] [--run-dir /run/pyblkback]
        [--xen real|sim:DIR]

The datapath plugin spawns this at the first attach of a volume and finds it again through
its control socket `<run-dir>/<ID>.ctl` (the run directory is 0700: root only). It:

* watches `/local/domain/<us>/backend/qdisk` and adopts exactly the devices whose
  `sm-data/pyblkback-id` is ID (xenopsd writes the attach result's `XenDisk.extra` there, in
  the transaction that makes the backend directory). It serves blkif from state 1, honours
  `mode` and `device-type`, and writes only `state` and the keys a backend publishes: never
  xenopsd's nodes, `hotplug-status` or `physical-device*`. A clean unplug (online=0, state 5)
  ends with state 6; a backend directory that vanishes (hard unplug) unmaps every grant at
  once. Started again, it re-adopts the devices it finds connected (Server.add_device adopt)
  and serves again the requests its dead self had taken but not answered: each ring keeps
  the batch it is answering in `<run-dir>/<ID>.ring-<domid>-<devid>-<queue>` (queue.Journal);
* exports the volume over NBD on `<run-dir>/<ID>.nbd`, export name ID (read-only with
  --nonpersistent: the volume itself, as no guest's writes reach it);
* with --nonpersistent serves each device from its own copy-on-write overlay over FILE
  (opened read-only, never written), `.pyblkback-overlay.<ID>.<domid>-<devid>` next to FILE:
  a guest's writes vanish when its device goes, and survive a restart of the server (the
  overlay is taken over with the device);
* answers on the control socket, one JSON object per line: {"op": "ping"} ->
  {"ok": true, "pid", "id", "devices", "domains"}; {"op": "attach", "domain": D} and
  {"op": "detach", "domain": D} keep the set of domains the datapath has attached;
  {"op": "stop"}: exit once no device is left;
* exits when it has no device and no attached domain left, when Xen is gone, or on
  SIGTERM/SIGINT (devices are let go without a word to XenStore: a restarted server adopts
  them again). It removes its sockets on the way out; a SIGKILLed server's sockets are
  removed by the next one (they are stale: nobody accepts on them).
"""

import argparse
import errno
import json
import logging
import os
import re
import selectors
import signal
import socket
import sys
import time

log = logging.getLogger("xapi_storage.blkback")

KIND = "qdisk"
SM_KEY = "pyblkback-id"
RUN_DIR = "/run/pyblkback"
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CTL_LINE_MAX = 4096


def ctl_path(run_dir, vid):
    return os.path.join(run_dir, f"{vid}.ctl")


def nbd_path(run_dir, vid):
    return os.path.join(run_dir, f"{vid}.nbd")


def journal_prefix(run_dir, vid):
    """Each ring's journal is `<run-dir>/<ID>.ring-<domid>-<devid>-<queue>` (queue.Journal)."""
    return os.path.join(run_dir, f"{vid}.ring-")


_JOURNAL_RE = re.compile(r"^\d+-\d+-\d+$")


def overlay_path(path, vid, be):
    """A non-persistent device's overlay: next to the volume (the SR's storage, not dom0's
    small disk), `.pyblkback-overlay.<ID>.<domid>-<devid>`."""
    domid, devid = be.rstrip("/").split("/")[-2:]
    return os.path.join(os.path.dirname(os.path.abspath(path)),
                        f".pyblkback-overlay.{vid}.{domid}-{devid}")


_DEV_RE = re.compile(r"^\d+-\d+$")


def own_files(run_dir, vid, path=None):
    """What the server of `vid` leaves when it is killed, by name: its sockets and ring
    journals in `run_dir`, and (given the volume's `path`) its devices' overlays."""
    out = []
    ring = f"{vid}.ring-"
    over = f".pyblkback-overlay.{vid}."
    dirs = [(run_dir, lambda n: n in (f"{vid}.ctl", f"{vid}.nbd") or
             (n.startswith(ring) and _JOURNAL_RE.match(n[len(ring):])))]
    if path is not None:
        dirs.append((os.path.dirname(os.path.abspath(path)),
                     lambda n: n.startswith(over) and _DEV_RE.match(n[len(over):])))
    for d, ours in dirs:
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            continue
        out += [os.path.join(d, n) for n in names if ours(n)]
    return out


class VolumeServer:
    """The server of one volume (see the module docstring); `step()` until `done`."""

    def __init__(self, xen, vid, path, backend="raw", nonpersistent=False, readonly=False,
                 domains=(), run_dir=RUN_DIR, xs_timeout=None, nbd=True):
        from .backends import Borrowed, open_storage
        from .server import Server
        if not ID_RE.match(vid):
            raise ValueError(f"bad volume id {vid!r}")
        self.vid = vid
        self.path = path
        self.backend = backend
        self.nonpersistent = nonpersistent
        self.readonly = readonly
        self.domains = set(d for d in domains if d != "")
        self.run_dir = run_dir
        self.stopping = False
        self.stop_when_idle = False
        self._Borrowed = Borrowed
        self._open_storage = open_storage
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        # the one open storage of the volume (devices borrow it; with nonpersistent only
        # the NBD export uses it, read-only: each device has its own overlay)
        self.storage = open_storage(backend, path, readonly=readonly or nonpersistent)
        self.server = Server(xen, xs_timeout=xs_timeout,
                             journal_prefix=journal_prefix(run_dir, vid))
        self.ctl = None
        self.nbd = None
        try:
            self.base = f"/local/domain/{xen.domid}/backend/{KIND}"
            self.token = f"adopt:{vid}"
            self.server.xs.watch(self.base, self.token)
            self.server.extra_watch[self.token] = self._on_event
            if nbd:
                self.nbd = self.server.listen_nbd(nbd_path(run_dir, vid))
                self.nbd.add_export(vid, self.storage, readonly=readonly or nonpersistent)
            self.ctl = _Control(self, ctl_path(run_dir, vid))
            self.scan()
        except BaseException:
            self.close()
            raise

    # -- adoption ---------------------------------------------------------------------------
    def _on_event(self, paths):
        seen = set()
        for p in paths:
            rest = p[len(self.base) + 1:].split("/") if p.startswith(self.base + "/") else []
            if len(rest) >= 2 and rest[0].isdigit() and rest[1].isdigit():
                seen.add(f"{self.base}/{rest[0]}/{rest[1]}")
            elif p == self.base or len(rest) == 1:
                self.scan()
                return
        for be in seen:
            self._consider(be)

    def scan(self):
        xs = self.server.xs
        for g in xs.list(self.base):
            if g.isdigit():
                for d in xs.list(f"{self.base}/{g}"):
                    if d.isdigit():
                        self._consider(f"{self.base}/{g}/{d}")

    def _serving(self, be):
        return any(dev.be_path == be for dev in self.server.devices.values())

    def _consider(self, be):
        xs = self.server.xs
        if self._serving(be) or self.stopping:
            return
        if xs.read(f"{be}/sm-data/{SM_KEY}") != self.vid:
            return
        state = xs.read(f"{be}/state")
        if state is None or xs.read(f"{be}/frontend") is None:
            return
        ro = self.readonly or "w" not in xs.read(f"{be}/mode", "w")
        if self.nonpersistent:
            # a device taken over connected keeps the overlay its guest has been writing to
            storage = self._open_storage("cow", self.path, readonly=ro,
                                         overlay_path=overlay_path(self.path, self.vid, be),
                                         resume=state == "4")
        else:
            storage = self._Borrowed(self.storage, readonly=ro)
        try:
            self.server.add_device(be, storage, adopt=True, owns_nodes=False)
        except (OSError, ValueError) as e:
            storage.close()
            log.error("%s: cannot serve %s: %s", self.vid, be, e)
            return
        log.info("%s: serving %s", self.vid, be)

    # -- the loop ---------------------------------------------------------------------------
    @property
    def done(self):
        if self.stopping:
            return True
        if self.server.devices:
            return False
        return self.stop_when_idle or not self.domains or self.server.xen_gone

    def step(self, timeout=None):
        if timeout is None:
            self.server.step()
        else:
            self.server.step(timeout)

    def run(self):
        while not self.done:
            self.step()

    def stop(self):
        """Let every device go now (signal safe: the loop does it)."""
        self.stopping = True
        self.server.stop_soon()

    def close(self):
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None
        if self.nbd is not None:
            self.nbd.close()
            self.nbd = None
        try:
            self.server.let_go_all()
            self.server.close()
        finally:
            if self.storage is not None:
                self.storage.close()
                self.storage = None


class _Control:
    """The control socket: JSON lines, served in the server's selector."""

    def __init__(self, vs, path):
        from .nbdsock import listen_unix
        self.vs = vs
        self.path = path
        self.sock = listen_unix(path, 16)
        vs.server.sel.register(self.sock, selectors.EVENT_READ, self)

    def on_event(self, mask):
        try:
            c, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        c.settimeout(2.0)           # a client is the plugin: one request, one reply
        try:
            line = b""
            while not line.endswith(b"\n") and len(line) < CTL_LINE_MAX:
                chunk = c.recv(CTL_LINE_MAX)
                if not chunk:
                    break
                line += chunk
            reply = self.handle(line)
            c.sendall(json.dumps(reply).encode() + b"\n")
        except (OSError, ValueError) as e:
            log.warning("%s: control request failed: %s", self.vs.vid, e)
        finally:
            c.close()

    def handle(self, line):
        vs = self.vs
        try:
            req = json.loads(line.decode())
            op = req["op"]
        except (ValueError, KeyError, TypeError, AttributeError):
            return {"ok": False, "error": "bad request: one JSON object with an op per line"}
        if op == "attach":
            vs.domains.add(str(req.get("domain")))
        elif op == "detach":
            vs.domains.discard(str(req.get("domain")))
        elif op == "stop":
            vs.stop_when_idle = True
        elif op != "ping":
            return {"ok": False, "error": f"unknown op {op!r}"}
        return {"ok": True, "pid": os.getpid(), "id": vs.vid,
                "devices": sorted(d.be_path for d in vs.server.devices.values()),
                "domains": sorted(vs.domains)}

    def close(self):
        from .nbdsock import close_unix
        close_unix(self.vs.server.sel, self.sock, self.path)


def call(run_dir, vid, timeout=5.0, **req):
    """Send one control request to the volume's server; its reply (a dict). OSError if no
    server answers (ENOENT: no socket; ECONNREFUSED: a stale one)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(ctl_path(run_dir, vid))
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except socket.timeout:
        raise OSError(errno.ETIMEDOUT, f"the server of {vid} did not answer in {timeout} s")
    finally:
        s.close()
    if not buf:
        raise OSError(errno.ECONNRESET, f"the server of {vid} closed the connection")
    return json.loads(buf.decode())


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m xapi_storage.blkback.volume_server",
        description="Serve one volume to every guest that the toolstack plugs it into "
        "(qdisk backends whose sm-data/pyblkback-id is --id), and over NBD. Spawned by "
        "the pyblkback datapath plugin; exits when no device and no attachment is left.")
    ap.add_argument("--id", required=True, help="the volume's id (sm-data/pyblkback-id)")
    ap.add_argument("--path", required=True, help="the volume's file or block device")
    ap.add_argument("--backend", choices=("raw", "block"), default="raw",
                    help="raw: a regular file; block: a block device (default raw)")
    ap.add_argument("--nonpersistent", action="store_true",
                    help="each device gets its own copy-on-write overlay over --path, dropped "
                    "with the device (the file is never written); the NBD export is read-only")
    ap.add_argument("--readonly", action="store_true", help="serve read-only")
    ap.add_argument("--domains", default="",
                    help="comma-separated domains attached already (a respawn)")
    ap.add_argument("--run-dir", default=RUN_DIR,
                    help=f"where the control and NBD sockets go (default {RUN_DIR})")
    ap.add_argument("--xen", default=None, help='"real" or "sim:DIR" (default: '
                    "$XAPI_STORAGE_XEN or real)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"%(asctime)s pyblkback[{args.id}] %(levelname)s %(message)s")
    vs_box = []

    def on_signal(signum, frame):
        if vs_box:
            vs_box[0].stop()
        else:
            raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    from ..xen import open_xen
    try:
        xen = open_xen(args.xen)
        vs = VolumeServer(xen, args.id, args.path, backend=args.backend,
                          nonpersistent=args.nonpersistent, readonly=args.readonly,
                          domains=[d for d in args.domains.split(",") if d],
                          run_dir=args.run_dir)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    vs_box.append(vs)
    print(f"serving volume {args.id} ({args.path}); control {ctl_path(args.run_dir, args.id)}",
          file=sys.stderr, flush=True)
    t0 = time.monotonic()
    try:
        vs.run()
    finally:
        vs.close()
    print(f"volume {args.id}: stopped after {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
