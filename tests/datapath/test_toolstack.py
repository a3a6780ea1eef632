"""The toolstack emulation: the daemon's calling convention and datapath choice, and xenopsd's
XenStore work on the simulated Xen."""

import itertools
import os
import stat
import sys
import time

import pytest

from xapi_storage.toolstack import daemon, sequences, xenopsd
from xapi_storage.toolstack.daemon import ScriptError, ScriptTimeout, choose


def exe(path, body):
    with open(path, "w") as f:
        f.write(f"#!{sys.executable}\nimport sys, json, os, time, subprocess\n{body}\n")
    os.chmod(path, 0o755)
    return path


# --- running executables -------------------------------------------------------------------

def test_argv_stdin_cwd_and_result(tmp_path):
    exe(tmp_path / "Echo.call", "data = sys.stdin.read()\n"
        "print(json.dumps({'argv': sys.argv[1:], 'stdin': data, 'cwd': os.getcwd()}))")
    out = daemon.run_json(str(tmp_path), "echo.CALL", {"dbg": "d", "x": 1})   # case-insensitive
    assert out == {"argv": ["--json"], "stdin": '{"dbg":"d","x":1}', "cwd": "/"}


def test_error_record_and_script_failures(tmp_path):
    exe(tmp_path / "Err", "print(json.dumps({'code': 'SR_BACKEND_FAILURE_24', 'params': ['VDIInUse', 'u'],"
        " 'backtrace': {'error': '', 'files': [], 'lines': []}})); sys.exit(1)")
    with pytest.raises(ScriptError) as e:
        daemon.run_json(str(tmp_path), "Err", {"dbg": "d"})
    assert (e.value.code, e.value.params) == ("SR_BACKEND_FAILURE_24", ["VDIInUse", "u"])
    exe(tmp_path / "Bad", "print('junk'); sys.stderr.write('why'); sys.exit(3)")
    with pytest.raises(ScriptError) as e:
        daemon.run_json(str(tmp_path), "Bad", {"dbg": "d"})
    assert e.value.code == "SCRIPT_FAILED" and e.value.params[1:3] == [
        "non-zero exit and bad json on stdout", "3"] and e.value.stderr == "why"
    exe(tmp_path / "Kill", "os.kill(os.getpid(), 9)")
    with pytest.raises(ScriptError) as e:
        daemon.run_json(str(tmp_path), "Kill", {"dbg": "d"})
    assert e.value.params[1:3] == ["signalled", "SIGKILL"]
    with pytest.raises(ScriptError) as e:
        daemon.run_json(str(tmp_path), "Missing", {"dbg": "d"})
    assert e.value.code == "SCRIPT_MISSING"
    p = exe(tmp_path / "NoExec", "print(1)")
    os.chmod(p, 0o644)
    with pytest.raises(ScriptError) as e:
        daemon.run_json(str(tmp_path), "NoExec", {"dbg": "d"})
    assert e.value.code == "SCRIPT_NOT_EXECUTABLE"


def test_a_child_holding_stdout_holds_the_call_and_our_timeout_ends_it(tmp_path):
    """The daemon waits for EOF on stdout and stderr: a child left holding them blocks the
    call even though the plugin exited. Our emulation turns that into a failure, and kills."""
    exe(tmp_path / "Leak", "subprocess.Popen(['sleep', '30']); print('null')")
    t0 = time.monotonic()
    with pytest.raises(ScriptTimeout) as e:
        daemon.run_json(str(tmp_path), "Leak", {"dbg": "d"}, timeout=1.5)
    assert time.monotonic() - t0 < 15
    assert "kept stdout or stderr open" in e.value.params[1]


def test_cli_mode(tmp_path):
    exe(tmp_path / "Datapath.attach", "print(json.dumps(sys.argv[1:]))")
    assert daemon.run_cli(str(tmp_path), "Datapath.attach", ["u://x", "0"]) == [
        "static-vdis", "u://x", "0"]


# --- the datapath choice ---------------------------------------------------------------------

def test_choice_takes_the_first_registered_scheme():
    reg = {"blkback": [], "pyblkback": ["NONPERSISTENT"]}
    uris = ["nope:///a", "no-scheme", "blkback:///a", "pyblkback:///a"]
    assert choose(uris, reg) == ("blkback", "blkback:///a")
    assert choose(uris, reg, persistent=False) == ("pyblkback", "pyblkback:///a")
    assert choose(uris, {"other": []}) is None
    assert choose(["pyblkback:///a"], {"blkback": []}) is None


# --- xenopsd on the simulated Xen ------------------------------------------------------------

RESULT = {"implementations": [["XenDisk", {"backend_type": "vbd", "params": "/dev/null",
                                           "extra": {"volume": "v1"}}],
                              ["BlockDevice", {"path": "/dev/null"}]]}


def test_backend_of_follows_xenopsd():
    assert xenopsd.backend_of(RESULT) == ("vbd", "/dev/null", [("sm-data/volume", "v1"),
                                                               ("sm-data/backend-kind", "vbd")])
    nbd = {"implementations": [["XenDisk", {"backend_type": "qdisk", "params": "p:q", "extra": {}}],
                               ["Nbd", {"uri": "nbd:unix:/s:exportname=e"}]]}
    assert xenopsd.backend_of(nbd) == ("qdisk", "nbd:unix:/s:exportname=e",
                                       [("sm-data/backend-kind", "qdisk"), ("qemu-params", "p:q")])
    with pytest.raises(xenopsd.DeviceError, match="XenDisk"):
        xenopsd.backend_of({"implementations": [["BlockDevice", {"path": "/dev/x"}]]})
    with pytest.raises(xenopsd.DeviceError, match="Unknown_device_type"):
        xenopsd.backend_of(RESULT, backend_kind="pyvbd")


def _tree(xs, path):
    out = {}
    for c in xs.list(path):
        p = f"{path}/{c}"
        out[p] = xs.read(p)
        out.update(_tree(xs, p))
    return out


@pytest.fixture
def sim_xs(simxen_guest):
    """(XenStore connection as dom0, guest domid) on the simulated Xen."""
    sim, guest = simxen_guest
    xs = xenopsd.open_xenstore(sim.xenstore_path(0))
    try:
        yield xs, guest
    finally:
        xs.close()


def test_plug_writes_xenopsd_nodes_and_both_unplugs_remove_them(sim_xs):
    xs, guest = sim_xs
    before = {p: _tree(xs, p) for p in ("/local/domain/0", f"/local/domain/{guest}")}
    vbd = xenopsd.plug(xs, guest, RESULT, timeout=5)
    assert vbd.name == "xvda" and vbd.devid == 51712
    be = f"/local/domain/0/backend/vbd/{guest}/51712"
    assert vbd.be == be
    assert xs.read(be + "/params") == "/dev/null"
    assert xs.read(be + "/physical-device") == "%x:%x" % (os.major(os.stat("/dev/null").st_rdev),
                                                         os.minor(os.stat("/dev/null").st_rdev))
    assert xs.read(be + "/hotplug-status") == "connected"
    assert xs.read(be + "/sm-data/volume") == "v1"
    assert xs.read(be + "/mode") == "w" and xs.read(be + "/type") == "phy"
    assert xs.read(vbd.fe + "/backend") == be and xs.read(vbd.fe + "/state") == "1"
    assert xs.read(vbd.fe_ro + "/backend") == be
    assert xs.client.get_perms(vbd.fe.encode()) == [f"n{guest}".encode(), b"r0"]
    assert xs.client.get_perms(be.encode()) == [b"n0", f"r{guest}".encode()]
    # a second plug takes the next number, never the guest's disk
    vbd2 = xenopsd.plug(xs, guest, RESULT, readonly=True, timeout=5)
    assert vbd2.name == "xvdb" and xs.read(vbd2.be + "/mode") == "r"
    xenopsd.hard_unplug(xs, vbd2, timeout=1)
    # clean unplug: the frontend must close first; play the guest
    xs.write(vbd.fe + "/state", "6")
    xenopsd.clean_unplug(xs, vbd, timeout=5)
    after = {p: _tree(xs, p) for p in ("/local/domain/0", f"/local/domain/{guest}")}
    for p in after:
        assert sorted(set(after[p].items()) ^ set(before[p].items())) == []
    assert not xs.list("/xenops") and not xs.list("/xapi")


def test_clean_unplug_of_a_guest_that_does_not_let_go_fails_in_bounded_time(sim_xs):
    xs, guest = sim_xs
    vbd = xenopsd.plug(xs, guest, RESULT, timeout=5)
    t0 = time.monotonic()
    with pytest.raises(xenopsd.DeviceError, match="did not release"):
        xenopsd.clean_unplug(xs, vbd, timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert xs.read(vbd.be + "/online") == "0" and xs.read(vbd.be + "/state") == "5"
    xenopsd.hard_unplug(xs, vbd, timeout=0.5)
    assert xs.read(vbd.be) is None and xs.read(vbd.fe) is None


def test_plug_with_a_bad_params_leaves_no_node(sim_xs):
    xs, guest = sim_xs
    bad = {"implementations": [["XenDisk", {"backend_type": "vbd", "params": "", "extra": {}}],
                               ["BlockDevice", {"path": "/nonexistent/dev"}]]}
    with pytest.raises(xenopsd.DeviceError, match="hotplug error"):
        xenopsd.plug(xs, guest, bad, timeout=5)
    assert not xs.list(f"/local/domain/0/backend") and not xs.list("/xenops")
    assert not xs.list(f"/local/domain/{guest}/device/vbd")


# --- the sequence table ------------------------------------------------------------------------

def test_sequences_expand_to_the_daemons_calls():
    assert sequences.plugin_calls("vm-start") == ["Volume.stat", "Volume.stat", "Datapath.attach",
                                                  "Volume.stat", "Datapath.activate"]
    assert sequences.plugin_calls("vm-start", nonpersistent=True, readonly=True)[:4] == [
        "Volume.stat", "Datapath.open", "Volume.stat", "Datapath.attach"]
    assert sequences.plugin_calls("vm-shutdown") == [
        "Volume.stat", "Datapath.deactivate", "Volume.stat", "Datapath.deactivate",
        "Datapath.detach", "Volume.stat"]
    assert sequences.plugin_calls("live-migration")[1::2] == [
        "Datapath.attach", "Datapath.deactivate", "Datapath.activate", "Datapath.detach"]
    for op in sequences.SEQUENCES:
        assert sequences.plugin_calls(op)
