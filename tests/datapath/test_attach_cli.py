"""`xapi-storage attach` / `detach` on the simulated Xen: the installed blkback datapath makes a
real loop device; nobody serves a `vbd` ring on the simulated Xen, so these check the XenStore
nodes, the order of the plugin calls, the clean-up, and the errors."""

import os
import threading
import time

import pytest

from xapi_storage import cli
from xapi_storage.datapath.blkback import loops_of
from xapi_storage.toolstack import daemon as daemon_mod
from xapi_storage.toolstack import xenopsd

pytestmark = pytest.mark.parametrize("sr_parent", ["disk"], indirect=True)


@pytest.fixture
def setup(dpenv, plugin_root, simxen_guest, monkeypatch):
    sim, guest = simxen_guest
    monkeypatch.setenv("XAPI_STORAGE_DATAPATH_STATE", str(dpenv.state_root))
    monkeypatch.setenv("XAPI_STORAGE_SYSLOG", "0")
    calls = []
    real = daemon_mod.Daemon._call

    def record(self, script_dir, name, params):
        calls.append(name)
        return real(self, script_dir, name, params)
    monkeypatch.setattr(daemon_mod.Daemon, "_call", record)
    vol = dpenv.create()
    del calls[:]
    xs = xenopsd.open_xenstore(sim.xenstore_path(0))
    yield dpenv, sim, guest, vol, calls, xs
    xs.close()


def run(sim, root, *argv):
    return cli.main([argv[0], "--root", str(root), "--xen", f"sim:{sim.dir}", "--timeout", "3"]
                    + list(argv[1:]))


def vbds(xs, guest):
    return xenopsd.find_vbds(xs, guest)


def test_attach_then_forced_detach(setup, plugin_root, capsys):
    env, sim, guest, vol, calls, xs = setup
    uri = vol["uri"][0]
    assert run(sim, plugin_root, "attach", uri, "--vm", "guest1") == 0
    out = capsys.readouterr().out
    assert out == "xvda\n"
    assert [c for c in calls if c != "Plugin.Query"] == ["Datapath.attach", "Datapath.activate"]
    (vbd,) = vbds(xs, guest)
    dev = xs.read(vbd.be + "/params")
    assert loops_of(os.path.join(env.sr_path, vol["key"] + ".img")) == [dev]
    assert xs.read(vbd.be + "/hotplug-status") == "connected"
    assert xs.read(vbd.be + "/mode") == "w"
    assert xs.read(vbd.fe + "/backend") == vbd.be
    assert xs.read(vbd.private + "/xapi-storage-uri") == uri
    del calls[:]
    assert run(sim, plugin_root, "detach", uri, "--vm", str(guest), "--force") == 0
    assert [c for c in calls if c != "Plugin.Query"] == ["Datapath.deactivate", "Datapath.detach"]
    assert vbds(xs, guest) == [] and xs.read(vbd.be) is None and xs.read(vbd.fe) is None
    assert not xs.list("/xapi") and not xs.list("/local/domain/0/backend")
    assert loops_of(os.path.join(env.sr_path, vol["key"] + ".img")) == []
    assert env.state_files() == []


def test_readonly_attach_and_clean_detach(setup, plugin_root, capsys):
    env, sim, guest, vol, calls, xs = setup
    uri = vol["uri"][0]
    assert run(sim, plugin_root, "attach", uri, "--vm", "guest1", "--readonly") == 0
    assert "Datapath.activate_readonly" in calls
    (vbd,) = vbds(xs, guest)
    assert xs.read(vbd.be + "/mode") == "r"

    def guest_lets_go():                   # play the guest's blkfront: Closed when asked
        for _ in range(200):
            if xs.read(vbd.be + "/state") == "5":
                xs.write(vbd.fe + "/state", "6")
                return
            time.sleep(0.02)
    t = threading.Thread(target=guest_lets_go)
    t.start()
    assert run(sim, plugin_root, "detach", uri, "--vm", "guest1") == 0
    t.join()
    assert vbds(xs, guest) == [] and xs.read(vbd.be) is None
    assert loops_of(os.path.join(env.sr_path, vol["key"] + ".img")) == []
    assert env.state_files() == []


def test_clean_detach_of_a_disk_the_guest_keeps_fails_then_force_works(setup, plugin_root, capsys):
    env, sim, guest, vol, calls, xs = setup
    uri = vol["uri"][0]
    assert run(sim, plugin_root, "attach", uri, "--vm", "guest1") == 0
    capsys.readouterr()
    t0 = time.monotonic()
    assert run(sim, plugin_root, "detach", uri, "--vm", "guest1") == 1
    assert time.monotonic() - t0 < 30
    err = capsys.readouterr().err
    assert "Device_in_use" in err and "--force" in err
    (vbd,) = vbds(xs, guest)                                 # still plugged, still attached
    assert env.state_files()
    assert run(sim, plugin_root, "detach", uri, "--vm", "guest1", "--force") == 0
    assert vbds(xs, guest) == [] and env.state_files() == []


def test_errors_leave_nothing(setup, plugin_root, capsys, tmp_path):
    env, sim, guest, vol, calls, xs = setup
    uri = vol["uri"][0]
    assert run(sim, plugin_root, "attach", "pyblkback" + uri[len("blkback"):], "--vm",
               "guest1") == 1
    assert "MISSING_URI" in capsys.readouterr().err
    assert run(sim, plugin_root, "attach", uri, "--vm", "nosuchvm") == 1
    assert "No_such_vm" in capsys.readouterr().err
    assert run(sim, plugin_root, "attach", uri, "--vm", "0") == 1
    assert "Invalid_vm" in capsys.readouterr().err
    assert run(sim, plugin_root, "attach", "blkback:///nonexistent/x.img", "--vm", "guest1") == 1
    assert "Datapath_volume_missing" in capsys.readouterr().err
    assert vbds(xs, guest) == [] and not xs.list("/local/domain/0/backend")
    assert env.state_files() == []
    assert loops_of(os.path.join(env.sr_path, vol["key"] + ".img")) == []


def test_a_plug_that_fails_is_rolled_back_in_the_datapath(setup, plugin_root, capsys,
                                                          monkeypatch):
    """xenopsd's part fails (here: no hotplug-status in time): the CLI unplugs and the
    datapath is deactivated and detached, leaving no loop device and no state."""
    env, sim, guest, vol, calls, xs = setup
    uri = vol["uri"][0]
    real = xenopsd.plug

    def no_hotplug(*a, **kw):
        kw["run_block_script"] = False
        kw["timeout"] = 0.5
        return real(*a, **kw)
    monkeypatch.setattr(xenopsd, "plug", no_hotplug)
    assert run(sim, plugin_root, "attach", uri, "--vm", "guest1") == 1
    assert "hotplug-status" in capsys.readouterr().err
    assert calls[-2:] == ["Datapath.deactivate", "Datapath.detach"]
    assert vbds(xs, guest) == [] and not xs.list("/local/domain/0/backend")
    assert loops_of(os.path.join(env.sr_path, vol["key"] + ".img")) == []
    assert env.state_files() == []
