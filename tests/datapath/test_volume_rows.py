"""The rows of the sequence table that involve both plugins and the volume plugin's clones or
a second VDI (non-persistent boot through clone-on-boot, xe vdi-copy in dom0), performed by the
toolstack emulation against the installed file-raw and blkback plugins: the executables run
are exactly plugin_calls(operation), the data is where it should be, nothing is left."""

import os

import pytest

from xapi_storage.datapath.blkback import loops_of
from xapi_storage.toolstack import sequences, xenopsd

from .conftest import FILE_RAW


def _run(ts, op, ctx):
    del ts.daemon.calls[:]
    ts.run(op, ctx)
    assert [c[1] for c in ts.daemon.calls] == sequences.plugin_calls(op), op


def _listed(env):
    return {v["key"]: v for v in env.daemon.volume(FILE_RAW, "SR.ls", {"dbg": "t", "sr": env.sr})}


@pytest.mark.parametrize("sr_parent", ["disk"], indirect=True)
def test_nonpersistent_boot_runs_a_clone_and_drops_it(dpenv, simxen_guest):
    sim, guest = simxen_guest
    env = dpenv
    vol = env.create()
    xs = xenopsd.open_xenstore(sim.xenstore_path(0))
    try:
        ts = sequences.Toolstack(env.daemon, xs, hotplug_timeout=5, unplug_timeout=0.5)
        ctx = {"plugin": FILE_RAW, "sr": env.sr, "key": vol["key"], "domain": str(guest)}
        _run(ts, "vm-start-nonpersistent", ctx)
        clone = _listed(env)[vol["key"]]["keys"]["clone-on-boot"]
        assert clone in _listed(env) and clone != vol["key"]
        # the guest's disk is the clone's data, not the volume's
        assert loops_of(os.path.join(env.sr_path, clone + ".img"))
        assert not loops_of(os.path.join(env.sr_path, vol["key"] + ".img"))
        _run(ts, "vm-shutdown-nonpersistent", ctx)
        listed = _listed(env)
        assert clone not in listed and "clone-on-boot" not in listed[vol["key"]]["keys"]
        assert loops_of(os.path.join(env.sr_path, clone + ".img")) == []
        assert env.state_files() == [] and not xs.list("/local/domain/0/backend")
    finally:
        xs.close()


@pytest.mark.parametrize("sr_parent", ["disk"], indirect=True)
def test_dom0_copy_copies_through_two_dom0_plugs(dpenv):
    env = dpenv
    vol = env.create(size=3 << 20)
    data = os.urandom(1 << 20) * 3
    with open(os.path.join(env.sr_path, vol["key"] + ".img"), "r+b") as f:
        f.write(data)
    ts = sequences.Toolstack(env.daemon)
    ctx = {"plugin": FILE_RAW, "sr": env.sr, "key": vol["key"], "size": vol["virtual_size"],
           "name": "copy"}
    _run(ts, "dom0-copy", ctx)
    copy = ctx["copy"]["volume"]["key"]
    assert copy != vol["key"] and copy in _listed(env)
    with open(os.path.join(env.sr_path, copy + ".img"), "rb") as f:
        assert f.read() == data
    for key in (vol["key"], copy):
        assert loops_of(os.path.join(env.sr_path, key + ".img")) == []
    assert env.state_files() == []
