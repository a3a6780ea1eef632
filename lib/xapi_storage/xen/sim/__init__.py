"""A simulated Xen for development and tests on any Linux machine (docs/simxen.md).

    with running("/dev/shm/xen1") as sim:          # starts `xapi-storage simxen run DIR`
        guest = sim.create_domain("guest1")        # -> domid
        back = sim.xen(0)                          # SimXen: the interface of xapi_storage.xen
        front = sim.xen(guest)
        ...
    # on exit: the daemon is stopped and nothing is left in DIR

or from another process: `open_xen("sim:/dev/shm/xen1", domid=N)`.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time

from .. import Xen, XenError
from . import layout
from .control import JsonConn


class SimXen(Xen):
    """The simulated Xen as seen from domain `domid`."""

    def __init__(self, d, domid=0):
        self.dir = os.path.abspath(d)
        self.domid = int(domid)
        self.xenstore_path = layout.xenstore_sock(self.dir, self.domid)
        if not os.path.exists(layout.pid_file(self.dir)):
            raise XenError(2, f"no simulated Xen running in {self.dir} "
                           "(start one with `xapi-storage simxen run DIR`)")

    def grant_mapper(self):
        from .grants import SimGrantMapper
        return SimGrantMapper(self.dir, self.domid)

    def grant_allocator(self):
        from .grants import SimGrantAllocator
        return SimGrantAllocator(self.dir, self.domid)

    def event_channels(self):
        from .evtchn import SimEventChannels
        return SimEventChannels(self.dir, self.domid)

    def gone(self):
        """The daemon has exited (its pid file is gone, or names a dead process)."""
        pid = _pid(self.dir)
        return pid is None or not layout.pid_alive(pid)

    def __repr__(self):
        return f"SimXen({self.dir!r}, domid={self.domid})"


class Sim:
    """A running simulated Xen (the daemon), as `running()` yields it."""

    def __init__(self, d, proc=None):
        self.dir = os.path.abspath(d)
        self.proc = proc

    def _call(self, **req):
        c = JsonConn(layout.control_sock(self.dir))
        try:
            return c.call(**req)
        finally:
            c.close()

    def create_domain(self, name, mem_mb=layout.DEFAULT_MEM_MB):
        """Make a guest domain (like `xl create` without a kernel); return its domid."""
        return self._call(op="create_domain", name=name, mem_mb=mem_mb)["domid"]

    def destroy_domain(self, domid):
        self._call(op="destroy_domain", domid=domid)

    def domains(self):
        return self._call(op="list_domains")["domains"]

    def xen(self, domid=0):
        return SimXen(self.dir, domid)

    def xenstore_path(self, domid=0):
        return layout.xenstore_sock(self.dir, domid)

    def stop(self, timeout=10):
        """Stop the daemon (if we started it) and wait for it to clean up."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise XenError(62, f"simxen daemon in {self.dir} did not stop within {timeout}s")


def start(d, timeout=20, log=None):
    """Start a daemon on directory `d` and wait until it is ready; return a Sim."""
    d = os.path.abspath(d)
    pid = _pid(d)
    if pid is not None and layout.pid_alive(pid):
        raise XenError(17, f"{d} is already served by a simulated Xen (pid {pid})")
    if pid is not None:
        os.unlink(layout.pid_file(d))          # stale: its daemon died without cleaning up
    proc = subprocess.Popen([sys.executable, "-m", "xapi_storage.xen.sim.daemon_main", d],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=log if log is not None else None)
    deadline = time.monotonic() + timeout
    while _pid(d) != proc.pid:
        if proc.poll() is not None:
            raise XenError(5, f"simxen daemon for {d} exited with status {proc.returncode} "
                           "before it was ready")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise XenError(62, f"simxen daemon for {d} not ready after {timeout}s")
        time.sleep(0.01)
    return Sim(d, proc)


def _pid(d):
    try:
        with open(layout.pid_file(d)) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def leftovers(d):
    """What of the daemon's is still in `d` (empty once it has stopped cleanly)."""
    names = [os.path.basename(layout.pid_file(d)), os.path.basename(layout.control_sock(d)),
             os.path.basename(layout.evtchn_sock(d))] + list(layout.SUBDIRS)
    return [n for n in names if os.path.lexists(os.path.join(d, n))]


@contextlib.contextmanager
def running(d, timeout=20, log=None):
    """Run a simulated Xen in `d` for the duration of the block (see module docstring).
    On exit the daemon is stopped, and XenError is raised if it left anything behind."""
    sim = start(d, timeout, log)
    try:
        yield sim
    finally:
        sim.stop()
    left = leftovers(sim.dir) if os.path.isdir(sim.dir) else []
    if left:
        raise XenError(17, f"simxen daemon left {left} behind in {sim.dir}")
