"""The `pyblkback` datapath: a volume served by our own ring server, one process per volume.

URI: `pyblkback:///<percent-encoded absolute path>` (a regular file, or a block device).

* The first attach of a domain spawns the volume's server
  (`python -m xapi_storage.blkback.volume_server`, see docs/blkback.md) fully detached from
  the plugin: under systemd as a transient unit `pyblkback-<id>` where systemd is PID 1,
  otherwise in its own session with its standard input from /dev/null, its output to its log
  and no other descriptor of ours, by a double fork (it is nobody's zombie). The toolstack's
  daemon finishes a call only when the plugin's stdout and stderr are closed: a server
  holding them would hang every call. Every later call finds the server again by its control
  socket (`<run dir>/<id>.ctl`, in a 0700 directory); a server found dead is started again
  and re-adopts its devices.
* attach returns `XenDisk{backend_type: "qdisk", params: "pyblkback:<id>",
  extra: {"pyblkback-id": <id>}}` and `Nbd{uri: "nbd:unix:<run dir>/<id>.nbd:exportname=<id>"}`,
  never `File` (dom0 then goes through NBD). xenopsd writes `extra` as
  `sm-data/pyblkback-id` in the qdisk backend directory; that key is how the server knows its
  devices. `params` has exactly one ':' and is never `vdi:<uuid>` (XCP-ng's optional
  qemuback splits qdisk params on ':' and takes `vdi:` values for its own).
* NONPERSISTENT: after `Datapath.open(persistent=false)` the server gives each device its
  own copy-on-write overlay over the volume (the file is only ever opened read-only): a
  guest's writes vanish with its device (and survive a restart of the server), and two
  guests have two overlays. Its NBD export is
  then the volume itself, read-only.
* The last detach stops the server (it exits once no device is left) and waits for it, a
  bounded time, then removes whatever a killed server left (its sockets and its rings'
  journals in the run directory, its non-persistent devices' overlays next to the volume).

Lifecycle, state and crash safety: `xapi_storage.datapath.lifecycle`.
"""

import os
import stat
import sys
import time

from ..sdk import log
from .blkback import path_of as _path_of, stat_volume
from .lifecycle import Lifecycle, datapath_error, plugin_class, volume_id

SCHEME = "pyblkback"
RUN_ENV = "XAPI_STORAGE_PYBLKBACK_RUN"
LOG_ENV = "XAPI_STORAGE_PYBLKBACK_LOG"
SYSTEMD_ENV = "XAPI_STORAGE_PYBLKBACK_SYSTEMD"     # "0": never use systemd-run; "1": always
DEFAULT_LOG_DIR = "/var/log/xapi-storage"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0


def _vsrv():
    """The server's module, imported when a call needs it (it imports far more than a
    datapath call that finds everything in place does: start-up time)."""
    from ..blkback import volume_server
    return volume_server


def run_dir():
    return os.environ.get(RUN_ENV) or _vsrv().RUN_DIR


def log_dir():
    return os.environ.get(LOG_ENV) or DEFAULT_LOG_DIR


def path_of(uri):
    """The absolute path a pyblkback URI names (percent-decoded)."""
    return _path_of(uri, SCHEME)


def server_id(uri):
    """The volume's id: hex, the same for every call on this URI."""
    return volume_id(uri)[:32]


def ping(vid):
    """The server's answer to ping, or None if no server answers."""
    try:
        r = _vsrv().call(run_dir(), vid, timeout=5.0, op="ping")
    except (OSError, ValueError):
        return None
    return r if r.get("ok") else None


def _systemd():
    """systemd-run's path where servers go under systemd: where systemd is PID 1 (or
    XAPI_STORAGE_PYBLKBACK_SYSTEMD=1 says so); never with XAPI_STORAGE_PYBLKBACK_SYSTEMD=0."""
    import shutil
    want = os.environ.get(SYSTEMD_ENV)
    if want == "0":
        return None
    if want == "1":
        return shutil.which("systemd-run")
    try:
        with open("/proc/1/comm") as f:
            if f.read().strip() != "systemd":
                return None
    except OSError:
        return None
    return shutil.which("systemd-run")


def _argv(vid, path, backend, nonpersistent, domains):
    argv = [sys.executable, "-m", "xapi_storage.blkback.volume_server", "--id", vid,
            "--path", path, "--backend", backend, "--run-dir", run_dir()]
    if nonpersistent:
        argv.append("--nonpersistent")
    if domains:
        argv += ["--domains", ",".join(sorted(domains))]
    return argv


def _spawn_detached(argv, logfile):
    """Start argv in its own session, stdin /dev/null, stdout/stderr to `logfile`, no other
    descriptor, by a double fork: the server is not our child (never our zombie) and
    shares nothing with us. Returns once the intermediate child has exited."""
    pid = os.fork()
    if pid == 0:                                      # the intermediate child
        try:
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            null = os.open("/dev/null", os.O_RDONLY)
            out = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(null, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.closerange(3, 65536)
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    os.waitpid(pid, 0)


def spawn(uri, vid, path, backend, nonpersistent, domains):
    """Start the volume's server and wait (bounded) until its control socket answers."""
    argv = _argv(vid, path, backend, nonpersistent, domains)
    os.makedirs(run_dir(), mode=0o700, exist_ok=True)
    unit = None
    run = _systemd()
    logfile = None
    if run:
        import subprocess   # only here: a call that finds its server running needs none
        unit = f"pyblkback-{vid}"
        env = [f"--setenv={k}={v}" for k, v in os.environ.items()
               if k in ("XAPI_STORAGE_XEN", "PYTHONPATH")]
        # only what systemd 219 (XenServer 8 / XCP-ng 8.3 dom0) knows: no --collect (the
        # reset-failed below does its work), no TimeoutStopSec property ("Unknown assignment")
        cmd = [run, f"--unit={unit}", f"--description=pyblkback server of {vid}",
               "--property=KillMode=mixed"] + env + argv
        # a unit of that name left failed by a SIGKILLed server is reset first
        subprocess.run(["systemctl", "reset-failed", unit + ".service"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30)
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        if p.returncode != 0:
            raise datapath_error("Datapath_server_failed", uri,
                                 f"systemd-run: exit {p.returncode}: {p.stderr.strip()}")
    else:
        os.makedirs(log_dir(), mode=0o700, exist_ok=True)
        logfile = os.path.join(log_dir(), f"pyblkback-{vid}.log")
    start = _log_size(logfile)
    if logfile:
        _spawn_detached(argv, logfile)
    end = time.monotonic() + START_TIMEOUT
    while time.monotonic() < end:
        r = ping(vid)
        if r is not None:
            log.info("%s: server %d started for %s%s", vid, r["pid"], path,
                     f" (unit {unit})" if unit else "")
            return {"pid": r["pid"], "unit": unit}
        said = _log_since(logfile, start)
        if "error:" in said:                   # it refused to start: say why, at once
            raise datapath_error("Datapath_server_failed", uri, said.strip()[-2000:])
        time.sleep(0.05)
    said = _log_since(logfile, start).strip()[-2000:]
    raise datapath_error("Datapath_server_failed", uri,
                         f"the volume's server did not start in {START_TIMEOUT:g} s"
                         + (f": {said}" if said else f" (see {logfile or 'its unit'})"))


def _log_size(logfile):
    try:
        return os.path.getsize(logfile) if logfile else 0
    except OSError:
        return 0


def _log_since(logfile, offset):
    """What the server wrote to its log since `offset` ("" without a log file)."""
    if not logfile:
        return ""
    try:
        with open(logfile, "rb") as f:
            f.seek(offset)
            return f.read(65536).decode(errors="replace")
    except OSError:
        return ""


def stop(vid, pid=None, timeout=STOP_TIMEOUT):
    """Ask the volume's server to exit once no device is left, and wait for it (bounded).
    True if it is gone."""
    try:
        r = _vsrv().call(run_dir(), vid, timeout=5.0, op="stop")
        pid = r.get("pid", pid)
    except (OSError, ValueError):
        pass
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ping(vid) is None and (pid is None or not _alive(pid)):
            return True
        time.sleep(0.05)
    return False


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:                                  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Datapath(Lifecycle):
    SCHEME = SCHEME

    def validate(self, uri):
        path_of(uri)

    def _volume(self, uri):
        path = path_of(uri)
        st = stat_volume(uri, path)
        if stat.S_ISBLK(st.st_mode):
            return path, "block"
        if stat.S_ISREG(st.st_mode):
            return path, "raw"
        raise datapath_error("Datapath_invalid_uri", uri,
                             f"{path} is neither a regular file nor a block device")

    def setup(self, uri, readonly=False):
        path, backend = self._volume(uri)
        opened = (self.state or {}).get("opened") or {}
        return {"id": server_id(uri), "path": path, "backend": backend,
                "nonpersistent": opened.get("persistent", True) is False}

    def _ensure(self, uri, res, domain=None):
        """The server, running: found by its control socket, else started (with the
        domains attached so far, and `domain`)."""
        vid = res["id"]
        domains = set((self.state or {}).get("domains", {}))
        if domain is not None:
            domains.add(domain)
        domains.discard("")
        if ping(vid) is not None:
            if domain is not None:
                _vsrv().call(run_dir(), vid, op="attach", domain=domain)
            return
        if not os.path.exists(res["path"]):
            raise datapath_error("Datapath_volume_missing", uri, f"{res['path']}: gone")
        spawn(uri, vid, res["path"], res["backend"], res["nonpersistent"], domains)

    def backend(self, uri, domain, resources):
        self._ensure(uri, resources, domain)
        vid = resources["id"]
        sock = _vsrv().nbd_path(run_dir(), vid)
        return {"implementations": [
            ["XenDisk", {"backend_type": "qdisk", "params": f"{SCHEME}:{vid}",
                         "extra": {_vsrv().SM_KEY: vid}}],
            ["Nbd", {"uri": f"nbd:unix:{sock}:exportname={vid}"}]]}

    def activate_hook(self, uri, domain, resources, readonly):
        self._ensure(uri, resources)

    def deactivate_hook(self, uri, domain, resources):
        pass                   # the server flushes what each device asks; nothing to do here

    def teardown(self, uri, resources):
        vid = resources["id"] if resources else server_id(uri)
        if not stop(vid):
            raise datapath_error("Datapath_server_busy", uri,
                                 f"the server of {vid} still serves a device after "
                                 f"{STOP_TIMEOUT:g} s (unplug it first)")
        # a server that was killed (and not needed again) left its sockets and ring
        # journals behind: nobody will read them now
        for f in _vsrv().own_files(run_dir(), vid, (resources or {}).get("path")):
            try:
                os.unlink(f)
            except FileNotFoundError:
                pass

    # A repeated attach or activate changes no state, so no hook runs: check the server
    # then too (a server found dead is started again and re-adopts its devices).
    def attach(self, dbg, uri, domain):
        result = super().attach(dbg, uri, domain)
        self._revive(uri)
        return result

    def activate(self, dbg, uri, domain):
        super().activate(dbg, uri, domain)
        self._revive(uri)

    def activate_readonly(self, dbg, uri, domain):
        super().activate_readonly(dbg, uri, domain)
        self._revive(uri)

    def _revive(self, uri):
        state = self.load_state(uri)
        if state["resources"] and state["domains"]:
            self.state = state
            self._ensure(uri, state["resources"])

    def close_hook(self, uri, persistent):
        # a non-persistent volume's overlays went with their devices; nothing is left
        pass


Plugin = plugin_class(SCHEME, "pyblkback: our userspace Xen block backend, one server "
                      "process per volume (qdisk backends, NBD for dom0)",
                      features=["NONPERSISTENT"])

IMPLEMENTATIONS = {"Plugin": Plugin, "Datapath": Datapath}
