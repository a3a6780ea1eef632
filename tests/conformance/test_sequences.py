"""The volume plugin's rows of the one table of call sequences (toolstack/sequences.py), run by
the toolstack emulation against file-raw's executables: the plugin sees exactly the calls the
table lists, and each operation does what xapi expects of it."""

import os
import uuid

import pytest

from xapi_storage.toolstack import daemon, sequences

VOLUME_OPS = ("sr-create", "sr-attach", "sr-scan", "vdi-create", "vdi-snapshot", "vdi-resize",
              "vdi-destroy")


@pytest.fixture
def toolstack(install_plugin, tmp_path):
    d = install_plugin("volume", "org.xen.xapi.storage.file-raw", "xapi_storage.volume.file_raw")
    env = dict(os.environ, XAPI_STORAGE_SYSLOG="0")
    dm = daemon.Daemon(os.path.dirname(os.path.dirname(d)), env=env)
    return sequences.Toolstack(dm), {"plugin": os.path.basename(d), "dbg": "t"}


def _run(ts, op, ctx):
    dm = ts.daemon
    before = len(dm.calls)
    ts.run(op, ctx)
    assert [name for _, name, _ in dm.calls[before:]] == sequences.plugin_calls(op), op
    return ctx


def test_every_volume_row_is_what_the_daemon_emulation_calls(toolstack, tmp_path):
    ts, base = toolstack
    ctx = _run(ts, "sr-create", dict(base, uuid=str(uuid.uuid4()),
                                     configuration={"path": str(tmp_path / "sr")}))
    sr = ctx["sr"]
    assert _run(ts, "sr-attach", dict(base, configuration=ctx["configuration"]))["sr"] == sr
    vol = _run(ts, "vdi-create", dict(base, sr=sr, size=4097))["volume"]
    snap = _run(ts, "vdi-snapshot", dict(base, sr=sr, key=vol["key"], content_id="c"))["snapshot"]
    size = _run(ts, "vdi-resize", dict(base, sr=sr, key=vol["key"], new_size=1 << 20))
    assert size["virtual_size"] >= 1 << 20
    listed = {v["key"]: v for v in _run(ts, "sr-scan", dict(base, sr=sr))["volumes"]}
    assert listed[vol["key"]]["keys"] == {"vdi-type": "user"}
    assert listed[snap["key"]]["keys"]["is_a_snapshot"] == "true"
    assert listed[snap["key"]]["keys"]["snapshot_of"] == vol["key"]
    for key in (vol["key"], snap["key"]):
        _run(ts, "vdi-destroy", dict(base, sr=sr, key=key))
    assert _run(ts, "sr-scan", dict(base, sr=sr))["volumes"] == []
    assert set(VOLUME_OPS) <= set(sequences.SEQUENCES)


def test_vdi_destroy_with_clone_on_boot_destroys_the_same_key_twice(toolstack, tmp_path):
    ts, base = toolstack
    ctx = _run(ts, "sr-create", dict(base, uuid=str(uuid.uuid4()),
                                     configuration={"path": str(tmp_path / "sr")}))
    key = _run(ts, "vdi-create", dict(base, sr=ctx["sr"], size=512))["volume"]["key"]
    ts.daemon.volume(base["plugin"], "Volume.set", {"dbg": "t", "sr": ctx["sr"], "key": key,
                                                    "k": "clone-on-boot", "v": key})
    before = len(ts.daemon.calls)
    ts.run("vdi-destroy", dict(base, sr=ctx["sr"], key=key))
    assert [(n, p.get("key")) for _, n, p in ts.daemon.calls[before:]] == [
        ("Volume.stat", key), ("Volume.destroy", key), ("Volume.destroy", key)]
