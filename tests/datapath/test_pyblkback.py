"""The `pyblkback` datapath through its installed executables, run exactly as the daemon runs
them (a call ends only at EOF of stdout and stderr), on the simulated Xen, with the devices
plugged by the toolstack emulation as xenopsd plugs them."""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from xapi_storage.blkback.frontend import Frontend
from xapi_storage.blkback.server import XenStore
from xapi_storage.datapath import pyblkback as pbb
from xapi_storage.toolstack import xenopsd
from xapi_storage.toolstack.daemon import Daemon

from .conftest import plugin_env

D = "t"


class Rig:
    def __init__(self, root, sim, tmp_path):
        # short: a unix socket path has at most 107 bytes
        self.run = tempfile.mkdtemp(prefix="pbb-", dir="/tmp")
        self.env = plugin_env(tmp_path / "dpstate", XAPI_STORAGE_XEN=f"sim:{sim.dir}",
                              XAPI_STORAGE_PYBLKBACK_RUN=self.run,
                              XAPI_STORAGE_PYBLKBACK_LOG=str(tmp_path / "log"),
                              XAPI_STORAGE_PYBLKBACK_SYSTEMD="0")
        self.daemon = Daemon(str(root), timeout=60, env=self.env)
        self.sim = sim
        self.xs = XenStore(sim.xenstore_path(0))
        self.state_root = tmp_path / "dpstate"

    def call(self, method, **params):
        return self.daemon.datapath("pyblkback", f"Datapath.{method}", dict(dbg=D, **params))

    def pid(self, uri):
        os.environ[pbb.RUN_ENV] = self.run
        try:
            r = pbb.ping(pbb.server_id(uri))
        finally:
            del os.environ[pbb.RUN_ENV]
        return r and r["pid"]

    def close(self):
        self.xs.close()
        left = os.listdir(self.run)
        shutil.rmtree(self.run, ignore_errors=True)
        assert not left, f"left in the run directory: {left}"


@pytest.fixture
def rig(plugin_root, simxen, tmp_path):
    r = Rig(plugin_root, simxen, tmp_path)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def volume(tmp_path):
    p = tmp_path / "vol.img"
    with open(p, "wb") as f:
        f.write(os.urandom(8 << 20))
    return p


def impls(result):
    return {k: v for k, v in result["implementations"]}


def _gone(pid, timeout=10):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not pbb._alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_registers_with_nonpersistent(rig):
    assert rig.daemon.datapaths["pyblkback"] == ["NONPERSISTENT"]


def test_attach_plug_serve_and_the_last_detach(rig, volume):
    sim = rig.sim
    g = sim.create_domain("g1")
    uri = f"pyblkback://{volume}"
    r = rig.call("attach", uri=uri, domain=str(g))      # run_json: would time out if the
    i = impls(r)                                        # server kept the plugin's pipes
    assert set(i) == {"XenDisk", "Nbd"}                 # never File
    vid = pbb.server_id(uri)
    assert i["XenDisk"] == {"backend_type": "qdisk", "params": f"pyblkback:{vid}",
                            "extra": {"pyblkback-id": vid}}
    assert i["XenDisk"]["params"].count(":") == 1
    assert i["Nbd"]["uri"] == f"nbd:unix:{rig.run}/{vid}.nbd:exportname={vid}"
    pid = rig.pid(uri)
    assert pid and os.getsid(pid) != os.getsid(0)       # not our session
    std = [os.readlink(f"/proc/{pid}/fd/{n}") for n in (0, 1, 2)]
    assert std[0] == "/dev/null" and std[1] == std[2] and std[1].endswith(f"{vid}.log"), std
    pipes = [os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")]
    pipes = [f for f in pipes if f.startswith("pipe:")]
    assert all(pipes.count(f) == 2 for f in pipes), pipes   # only its own wake-up pipe
    assert rig.call("attach", uri=uri, domain=str(g)) == r       # idempotent: same server
    assert rig.pid(uri) == pid
    rig.call("activate", uri=uri, domain=str(g))
    vbd = xenopsd.plug(rig.xs, g, r)                    # xenopsd writes the qdisk nodes
    fe = Frontend(sim.xen(g), vbd.devid)
    fe.connect()
    fe.write(0, b"p" * 8192)
    assert fe.read(0, 16) == b"p" * 8192
    if shutil.which("qemu-io"):                         # dom0's view over the Nbd
        out = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x70 0 8k",
                              f"nbd+unix:///{vid}?socket={rig.run}/{vid}.nbd"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             universal_newlines=True, timeout=60).stdout
        assert "read 8192/8192" in out and "failed" not in out, out
    fe.close()
    xenopsd.hard_unplug(rig.xs, vbd)
    rig.call("deactivate", uri=uri, domain=str(g))
    rig.call("detach", uri=uri, domain=str(g))
    assert _gone(pid)
    assert volume.read_bytes()[:8192] == b"p" * 8192
    assert not [f for _d, _s, fs in os.walk(rig.state_root) for f in fs]


def test_a_dead_server_is_started_again_by_the_next_call(rig, volume):
    sim = rig.sim
    g = sim.create_domain("g1")
    uri = f"pyblkback://{volume}"
    r = rig.call("attach", uri=uri, domain=str(g))
    rig.call("activate", uri=uri, domain=str(g))
    vbd = xenopsd.plug(rig.xs, g, r)
    fe = Frontend(sim.xen(g), vbd.devid)
    fe.connect()
    try:
        fe.write(0, b"1" * 4096)
        pid = rig.pid(uri)
        os.kill(pid, signal.SIGKILL)
        assert _gone(pid)
        ids = [fe.submit(1, 8, b"2" * 4096)]
        fe.push()
        rig.call("activate", uri=uri, domain=str(g))    # any call: found dead, started again
        assert rig.pid(uri) not in (None, pid)
        assert all(st == 0 for st, _d in fe.wait(ids, timeout=10).values())
        assert fe.read(0, 16) == b"1" * 4096 + b"2" * 4096
    finally:
        fe.close(timeout=1)
    xenopsd.hard_unplug(rig.xs, vbd)
    pid = rig.pid(uri)
    rig.call("detach", uri=uri, domain=str(g))
    assert _gone(pid)


def test_nonpersistent_two_guests_two_overlays_gold_untouched(rig, volume):
    sim = rig.sim
    gold = volume.read_bytes()
    g1, g2 = sim.create_domain("a"), sim.create_domain("b")
    uri = f"pyblkback://{volume}"
    rig.call("open", uri=uri, persistent=False)
    vbds, fes = [], []
    for g, byte in ((g1, b"A"), (g2, b"B")):
        r = rig.call("attach", uri=uri, domain=str(g))
        rig.call("activate", uri=uri, domain=str(g))
        vbd = xenopsd.plug(rig.xs, g, r)
        fe = Frontend(sim.xen(g), vbd.devid)
        fe.connect()
        fe.write(0, byte * 4096)
        vbds.append(vbd)
        fes.append(fe)
    assert fes[0].read(0, 8) == b"A" * 4096 and fes[1].read(0, 8) == b"B" * 4096
    pid = rig.pid(uri)
    for g, vbd, fe in zip((g1, g2), vbds, fes):
        fe.close()
        xenopsd.hard_unplug(rig.xs, vbd)
        rig.call("deactivate", uri=uri, domain=str(g))
        rig.call("detach", uri=uri, domain=str(g))
    rig.call("close", uri=uri)
    assert _gone(pid)
    assert volume.read_bytes() == gold


def test_bad_uri_and_missing_volume_are_clean_errors(rig, tmp_path):
    from xapi_storage.toolstack.daemon import ScriptError
    for uri, name in (("pyblkback://host/x", "Datapath_invalid_uri"),
                      (f"pyblkback://{tmp_path}/nope.img", "Datapath_volume_missing")):
        with pytest.raises(ScriptError) as e:
            rig.call("attach", uri=uri, domain="3")
        assert e.value.params[0] == name, e.value.params
    assert os.listdir(rig.run) == []


def test_a_server_that_cannot_start_fails_the_attach_at_once(rig, volume, tmp_path):
    from xapi_storage.toolstack.daemon import ScriptError
    rig.daemon.env = dict(rig.env, XAPI_STORAGE_XEN=f"sim:{tmp_path}/no-xen")
    t0 = time.monotonic()
    with pytest.raises(ScriptError) as e:
        rig.call("attach", uri=f"pyblkback://{volume}", domain="3")
    assert time.monotonic() - t0 < pbb.START_TIMEOUT
    assert e.value.params[0] == "Datapath_server_failed" and "no simulated Xen" in \
        e.value.params[2], e.value.params
    assert os.listdir(rig.run) == []
    assert not [f for _d, _s, fs in os.walk(rig.state_root) for f in fs]


FAKE_SYSTEMD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_systemd")


def test_under_systemd_the_server_is_a_transient_unit_of_systemd_219s_options(rig, volume,
                                                                              tmp_path):
    """Where systemd is PID 1 the server is started by systemd-run as unit pyblkback-<id>.
    No systemd here: tests/datapath/fake_systemd stands in, and refuses every option and
    property that the systemd-run of XenServer 8 / XCP-ng 8.3 (systemd 219) would refuse. The
    server must run from what the unit gives it: the --setenv variables, PATH, nothing else
    of the plugin's environment."""
    d = tmp_path / "systemd"
    d.mkdir()
    rig.daemon.env = dict(rig.env, XAPI_STORAGE_PYBLKBACK_SYSTEMD="1", FAKE_SYSTEMD_DIR=str(d),
                          PATH=FAKE_SYSTEMD + os.pathsep + rig.env.get("PATH", ""))
    sim = rig.sim
    g = sim.create_domain("g1")
    uri = f"pyblkback://{volume}"
    vid = pbb.server_id(uri)
    r = rig.call("attach", uri=uri, domain=str(g))
    rig.call("activate", uri=uri, domain=str(g))
    pid = rig.pid(uri)
    with open(f"/proc/{pid}/environ", "rb") as f:
        names = {e.split(b"=", 1)[0].decode() for e in f.read().split(b"\0") if e}
    assert names <= {"PATH", "XAPI_STORAGE_XEN", "PYTHONPATH"}, names
    vbd = xenopsd.plug(rig.xs, g, r)
    fe = Frontend(sim.xen(g), vbd.devid)
    fe.connect()
    try:
        fe.write(0, b"s" * 4096)
        os.kill(pid, signal.SIGKILL)                     # the unit fails; the next call
        assert _gone(pid)                                # resets it and starts it again
        rig.call("activate", uri=uri, domain=str(g))
        assert rig.pid(uri) not in (None, pid)
        assert fe.read(0, 8) == b"s" * 4096
    finally:
        fe.close(timeout=1)
    xenopsd.hard_unplug(rig.xs, vbd)
    pid = rig.pid(uri)
    rig.call("deactivate", uri=uri, domain=str(g))
    rig.call("detach", uri=uri, domain=str(g))
    assert _gone(pid)
    runs = [json.loads(x) for x in (d / "systemd-run.argv").read_text().splitlines()]
    assert len(runs) == 2 and all(f"--unit=pyblkback-{vid}" in a for a in runs), runs
    resets = [json.loads(x) for x in (d / "systemctl.argv").read_text().splitlines()]
    assert resets == [["reset-failed", f"pyblkback-{vid}.service"]] * 2, resets


def test_the_last_detach_removes_what_a_killed_server_left(rig, volume):
    """A server SIGKILLed and never needed again leaves its sockets, its ring's journal and
    (non-persistent) its device's overlay: the last detach removes them (rig.close checks the
    run directory)."""
    sim = rig.sim
    g = sim.create_domain("g1")
    uri = f"pyblkback://{volume}"
    rig.call("open", uri=uri, persistent=False)
    r = rig.call("attach", uri=uri, domain=str(g))
    rig.call("activate", uri=uri, domain=str(g))
    vbd = xenopsd.plug(rig.xs, g, r)
    fe = Frontend(sim.xen(g), vbd.devid)
    fe.connect()
    fe.write(0, b"k" * 4096)
    pid = rig.pid(uri)
    os.kill(pid, signal.SIGKILL)
    assert _gone(pid)
    fe.close(timeout=0.1)
    overlays = [n for n in os.listdir(volume.parent) if n.startswith(".pyblkback-overlay.")]
    assert overlays and len(os.listdir(rig.run)) >= 3      # ctl, nbd, journal
    xenopsd.hard_unplug(rig.xs, vbd)
    rig.call("deactivate", uri=uri, domain=str(g))
    rig.call("detach", uri=uri, domain=str(g))
    rig.call("close", uri=uri)
    assert [n for n in os.listdir(volume.parent) if n.startswith(".pyblkback-overlay.")] == []
    assert os.listdir(rig.run) == []
