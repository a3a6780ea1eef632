"""The `blkback` datapath on real loop devices, through the installed executables, driven by
the daemon emulation exactly as the daemon drives it. Volumes are file-raw volumes on the
local disk and on a tmpfs (no O_DIRECT there: the loop device falls back to buffered I/O)."""

import os
import time
import signal

import pytest

from xapi_storage.datapath.blkback import _sys, loops_of
from xapi_storage.toolstack.daemon import ScriptError, run_cli

from xapi_storage.toolstack.daemon import Daemon

from .conftest import FILE_RAW, plugin_env

D = "t"


def data_path(env, vol):
    return os.path.join(env.sr_path, vol["key"] + ".img")


def takes_o_direct(path):
    """Whether the filesystem opens `path` with O_DIRECT (tmpfs does since Linux 6.6)."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


def impls(result):
    return {k: v for k, v in result["implementations"]}


def test_registers_with_api_5(dpenv):
    assert dpenv.daemon.datapaths["blkback"] == []
    q = dpenv.daemon.datapath("blkback", "Plugin.Query", {"dbg": "register"})
    assert q["required_api_version"] == "5.0" and q["plugin"] == "blkback"


def test_attach_gives_a_loop_device_found_again_and_released_at_the_last_detach(dpenv, sr_parent):
    env, dm = dpenv, dpenv.daemon
    vol = env.create()
    path = data_path(env, vol)
    r = dm.attach(D, FILE_RAW, env.sr, vol["key"], "5")
    i = impls(r)
    assert set(i) == {"XenDisk", "BlockDevice"}                   # never File
    dev = i["BlockDevice"]["path"]
    assert i["XenDisk"] == {"backend_type": "vbd", "params": dev, "extra": {}}
    assert loops_of(path) == [dev]
    assert _sys(dev, "loop", "dio") == ("1" if takes_o_direct(path) else "0"), sr_parent
    assert dm.attach(D, FILE_RAW, env.sr, vol["key"], "5") == r   # idempotent
    r2 = dm.attach(D, FILE_RAW, env.sr, vol["key"], "u0_vbd_0_xvda")
    assert impls(r2)["BlockDevice"]["path"] == dev                # one loop device per volume
    assert loops_of(path) == [dev]
    dm.detach(D, FILE_RAW, env.sr, vol["key"], "5")
    assert loops_of(path) == [dev]                                # still used by the dom0 plug
    dm.dp_destroy(D, FILE_RAW, env.sr, vol["key"], "u0_vbd_0_xvda")
    assert loops_of(path) == []
    assert env.state_files() == []


def attached(env, domain, size=1 << 20):
    """A new volume, attached and activated (read-write) for `domain`: (volume, key, device)."""
    vol = env.create(size)
    key = vol["key"]
    dev = impls(env.daemon.attach(D, FILE_RAW, env.sr, key, domain))["BlockDevice"]["path"]
    env.daemon.activate(D, FILE_RAW, env.sr, key, domain)
    return vol, key, dev


def test_data_and_read_only_activation(dpenv):
    env, dm = dpenv, dpenv.daemon
    vol, key, dev = attached(env, "7")
    fd = os.open(dev, os.O_WRONLY | os.O_SYNC)
    try:
        os.pwrite(fd, b"A" * 4096, 8192)
    finally:
        os.close(fd)
    dm.deactivate(D, FILE_RAW, env.sr, key, "7")                  # flushes the backing file
    with open(data_path(env, vol), "rb") as f:
        f.seek(8192)
        assert f.read(4096) == b"A" * 4096
    dm.activate(D, FILE_RAW, env.sr, key, "7", readonly=True)
    assert _sys(dev, "ro") == "1"
    with pytest.raises(OSError):                 # refused at open or at the write
        fd = os.open(dev, os.O_WRONLY | os.O_SYNC)
        try:
            os.pwrite(fd, b"B" * 4096, 8192)
        finally:
            os.close(fd)
    # a read-write activation elsewhere while read-only here: refused, nothing changes
    dm.attach(D, FILE_RAW, env.sr, key, "8")
    with pytest.raises(ScriptError) as e:
        dm.activate(D, FILE_RAW, env.sr, key, "8")
    assert e.value.code == "SR_BACKEND_FAILURE_24" and e.value.params[0] == "VDIInUse"
    assert _sys(dev, "ro") == "1"
    dm.deactivate(D, FILE_RAW, env.sr, key, "7")
    dm.activate(D, FILE_RAW, env.sr, key, "8")
    assert _sys(dev, "ro") == "0"
    for dom in ("7", "8"):
        dm.dp_destroy(D, FILE_RAW, env.sr, key, dom)
    assert loops_of(data_path(env, vol)) == [] and env.state_files() == []


def test_resize_while_attached_refreshes_the_loop_device(dpenv):
    env, dm = dpenv, dpenv.daemon
    vol, key, dev = attached(env, "3")
    assert int(_sys(dev, "size")) * 512 == 1 << 20
    dm.volume(FILE_RAW, "Volume.resize", {"dbg": D, "sr": env.sr, "key": key, "new_size": 3 << 20})
    assert int(_sys(dev, "size")) * 512 == 3 << 20                # file-raw told the datapath
    dm.dp_destroy(D, FILE_RAW, env.sr, key, "3")
    assert loops_of(data_path(env, vol)) == []


def test_static_vdis_command_line_mode(dpenv, plugin_root):
    env = dpenv
    vol = env.create()
    dp = os.path.join(str(plugin_root), "datapath", "blkback")
    uri = vol["uri"][0]
    assert uri.startswith("blkback:///")
    r = run_cli(dp, "Datapath.attach", [uri, "0"], env=env.env)
    dev = impls(r)["BlockDevice"]["path"]
    run_cli(dp, "Datapath.activate", [uri, "0"], env=env.env)
    assert loops_of(data_path(env, vol)) == [dev]
    run_cli(dp, "Datapath.deactivate", [uri, "0"], env=env.env)
    run_cli(dp, "Datapath.detach", [uri, "0"], env=env.env)
    assert loops_of(data_path(env, vol)) == [] and env.state_files() == []


def test_bad_uris_are_structured_errors(dpenv):
    dm = dpenv.daemon
    for uri in ("blkback://host/x", "blkback:relative", "blkback:///no/such/file",
                "blkback:///dev/null"):
        with pytest.raises(ScriptError) as e:
            dm.datapath("blkback", "Datapath.attach", {"dbg": D, "uri": uri, "domain": "1"})
        assert e.value.code == "SR_BACKEND_FAILURE", uri
        assert e.value.params[0].startswith("Datapath_"), (uri, e.value.params)
    assert dpenv.state_files() == []


STEPS = ["setup", "backend", "activate", "deactivate", "teardown"]


@pytest.mark.parametrize("point", [f"datapath:{k}:{w}" for k in STEPS for w in ("intent", "done")])
def test_sigkill_at_each_step_leaves_no_loop_device(dpenv, plugin_root, point):
    """The plugin SIGKILLed at each step of attach, activate, deactivate and detach: the
    daemon's next calls complete or clean up, and no loop device is left."""
    env = dpenv
    killer = Daemon(str(plugin_root), timeout=120,
                    env=plugin_env(env.state_root, XAPI_STORAGE_FAULT=point))
    vol = env.create()
    key = vol["key"]
    killed = False
    for step in ("attach", "activate", "deactivate", "detach"):
        try:
            getattr(killer, step)(D, FILE_RAW, env.sr, key, "4")
        except ScriptError as e:
            assert e.params[1:3] == ["signalled", "SIGKILL"], e
            killed = True
            getattr(env.daemon, step)(D, FILE_RAW, env.sr, key, "4")   # the retry
    assert killed, point
    assert loops_of(data_path(env, vol)) == []
    assert env.state_files() == []


@pytest.mark.parametrize("sr_parent", ["disk"], indirect=True)
def test_sequences_run_as_the_table_says_and_leave_nothing(dpenv, simxen_guest):
    """Every operation of toolstack.sequences performed against the installed plugins and the
    simulated XenStore: the executables run are exactly plugin_calls(operation), and the
    whole life of a volume leaves no node, loop device or state behind."""
    from xapi_storage.toolstack import sequences, xenopsd
    sim, guest = simxen_guest
    env = dpenv
    vol = env.create()
    xs = xenopsd.open_xenstore(sim.xenstore_path(0))
    ts = sequences.Toolstack(env.daemon, xs, hotplug_timeout=5, unplug_timeout=0.5)
    ctx = {"plugin": FILE_RAW, "sr": env.sr, "key": vol["key"], "domain": str(guest)}
    try:
        for op in ("vm-start", "vm-shutdown", "vbd-plug", "dom0-plug", "dom0-unplug"):
            if op == "dom0-plug":
                ctx["dp"] = "vbd/0/xvdc"
            del env.daemon.calls[:]
            ts.run(op, dict(ctx) if op.startswith("dom0") else ctx)
            assert [c[1] for c in env.daemon.calls] == sequences.plugin_calls(op), op
        ctx["src_domain"], ctx["domain"] = str(guest), "99"
        del env.daemon.calls[:]
        ts.run("live-migration", ctx)
        assert [c[1] for c in env.daemon.calls] == sequences.plugin_calls("live-migration")
        ctx["domain"] = str(guest)
        xenopsd.hard_unplug(xs, ctx["vbd"], timeout=0.5)
        env.daemon.dp_destroy(D, FILE_RAW, env.sr, vol["key"], "99")
        assert loops_of(data_path(env, vol)) == [] and env.state_files() == []
        assert not xs.list("/local/domain/0/backend") and not xs.list("/xapi")
    finally:
        xs.close()


@pytest.mark.parametrize("sr_parent", ["disk"], indirect=True)
def test_detach_of_a_loop_device_still_open_marks_it_autoclear(dpenv):
    """After a hard unplug the kernel's blkback may hold the device a moment longer: detach
    succeeds, and the loop device goes at its last close."""
    env, dm = dpenv, dpenv.daemon
    vol, key, dev = attached(env, "6")
    fd = os.open(dev, os.O_RDONLY)
    try:
        dm.dp_destroy(D, FILE_RAW, env.sr, key, "6")               # waits a few seconds, then ok
        assert loops_of(data_path(env, vol)) == [dev]
        assert _sys(dev, "loop", "autoclear") == "1"
        assert env.state_files() == []
    finally:
        os.close(fd)
    for _ in range(50):
        if not loops_of(data_path(env, vol)):
            break
        time.sleep(0.1)
    assert loops_of(data_path(env, vol)) == []


@pytest.mark.parametrize("uri", [
    "blkback://host/srv/a.img",         # an authority
    "blkback:/srv/a.img",               # no authority part at all
    "blkback:///srv/a.img?x=1",         # a query
    "blkback:///srv/a.img#frag",        # a fragment
    "pyblkback:///srv/a.img",           # another scheme
    "blkback://",                       # no path
    "blkback:///srv/a%2",               # a cut escape
    "blkback:///srv/a%00b",             # a NUL
    "blkback:///srv/%e9",               # not quote_path's (lower-case hex)
])
def test_path_of_refuses_what_is_not_a_plain_percent_encoded_path(uri):
    from xapi_storage.datapath import blkback as dp
    from xapi_storage.sdk.errors import XenAPIError
    with pytest.raises(XenAPIError) as e:
        dp.path_of(uri)
    assert e.value.params[0] == "Datapath_invalid_uri"


def test_path_of_decodes_the_path():
    from xapi_storage.datapath import blkback as dp
    from xapi_storage.volume.store import quote_path
    name = "/srv/sr 1/a#b?c%d.img"
    assert dp.path_of("blkback://" + quote_path(name)) == name
    assert dp.path_of("pyblkback:///x/y", "pyblkback") == "/x/y"
