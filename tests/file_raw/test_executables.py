"""The file-raw plugin through its installed executables, exactly as xapi-storage-script calls
them: argv [path, "--json"], the named arguments as one JSON object on stdin, one JSON value on
stdout; on failure an error record {"code", "params", "backtrace"} and exit 1. Also the
command-line mode of static-vdis (spec §2.9)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

PLUGIN_DIR = "volume/org.xen.xapi.storage.file-raw"
METHODS = ["Plugin.Query", "Plugin.diagnostics", "SR.probe", "SR.create", "SR.attach",
           "SR.detach", "SR.destroy", "SR.stat", "SR.set_name", "SR.set_description", "SR.ls",
           "Volume.create", "Volume.destroy", "Volume.stat", "Volume.set", "Volume.unset",
           "Volume.set_name", "Volume.set_description", "Volume.resize", "Volume.snapshot",
           "Volume.clone", "Volume.revert"]


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    exe = shutil.which("xapi-storage", path=os.path.dirname(sys.executable))
    subprocess.run([exe, "install", "--root", str(root), "--observer-python", sys.executable], check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return str(root / PLUGIN_DIR)


def call(plugin_dir, method, env=None, **args):
    """(exit status, the one JSON value on stdout)."""
    args.setdefault("dbg", "OpaqueRef:test\n{\"trace\": 1}")
    r = subprocess.run([os.path.join(plugin_dir, method), "--json"], input=json.dumps(args),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=60,
                       env=dict(os.environ, **(env or {})))
    return r.returncode, json.loads(r.stdout)     # json.loads: exactly one value, no junk


def ok(plugin_dir, method, **args):
    rc, out = call(plugin_dir, method, **args)
    assert rc == 0, out
    return out


def fails(plugin_dir, method, **args):
    rc, out = call(plugin_dir, method, **args)
    assert rc == 1, out
    assert set(out) == {"code", "params", "backtrace"}
    assert type(out["code"]) is str and all(type(p) is str for p in out["params"])
    bt = out["backtrace"]
    assert type(bt["error"]) is str and len(bt["files"]) == len(bt["lines"])
    return out["code"], out["params"]


@pytest.fixture
def exe_sr(plugin_dir, tmp_path):
    path = str(tmp_path / "sr")
    config = ok(plugin_dir, "SR.create", uuid="sr-uuid", configuration={"path": path},
                name="n", description="")
    return ok(plugin_dir, "SR.attach", configuration=config), path


def test_every_method_is_installed(plugin_dir):
    assert sorted(n for n in os.listdir(plugin_dir) if not n.startswith(".")) == sorted(METHODS)
    for m in METHODS:
        assert os.access(os.path.join(plugin_dir, m), os.X_OK)


def test_lifecycle(plugin_dir, tmp_path):
    q = ok(plugin_dir, "Plugin.Query")
    assert (q["plugin"], q["required_api_version"]) == ("file-raw", "5.0")
    assert "file-raw" in ok(plugin_dir, "Plugin.diagnostics")
    path = str(tmp_path / "sr")
    [probe] = ok(plugin_dir, "SR.probe", configuration={"path": path})
    assert probe["complete"] is True and "sr" not in probe
    config = ok(plugin_dir, "SR.create", uuid="sr-uuid", configuration={"path": path},
                name="n", description="")
    sr = ok(plugin_dir, "SR.attach", configuration=config)
    assert sr == "file://" + path
    assert ok(plugin_dir, "SR.stat", sr=sr)["uuid"] == "sr-uuid"
    assert ok(plugin_dir, "SR.set_name", sr=sr, new_name="new") is None
    assert ok(plugin_dir, "SR.set_description", sr=sr, new_description="d") is None
    st = ok(plugin_dir, "SR.stat", sr=sr)
    assert (st["name"], st["description"], st["health"]) == ("new", "d", ["Healthy", ""])
    [probe] = ok(plugin_dir, "SR.probe", configuration={"path": path})
    assert probe["configuration"]["sr_uuid"] == "sr-uuid" and probe["sr"]["sr"] == sr

    v = ok(plugin_dir, "Volume.create", sr=sr, name="disk", description="", size=1000,
           sharable=False)
    key = v["key"]
    assert v["virtual_size"] == 1024 and v["uri"][0] == f"blkback://{path}/{key}.img"
    # the daemon's sequence after a create and a snapshot
    assert ok(plugin_dir, "Volume.set", sr=sr, key=key, k="vdi-type", v="user") is None
    snap = ok(plugin_dir, "Volume.snapshot", sr=sr, key=key)
    for k, val in (("snapshot_time", "20260101T00:00:00Z"), ("is_a_snapshot", "true"),
                   ("snapshot_of", key), ("content_id", "c"), ("vdi-type", "user")):
        ok(plugin_dir, "Volume.set", sr=sr, key=snap["key"], k=k, v=val)
    assert ok(plugin_dir, "Volume.stat", sr=sr, key=snap["key"])["keys"]["snapshot_of"] == key
    assert snap["read_write"] is False
    clone = ok(plugin_dir, "Volume.clone", sr=sr, key=snap["key"])
    assert clone["read_write"] is True
    assert ok(plugin_dir, "Volume.unset", sr=sr, key=key, k="vdi-type") is None
    assert ok(plugin_dir, "Volume.set_name", sr=sr, key=key, new_name="n2") is None
    assert ok(plugin_dir, "Volume.set_description", sr=sr, key=key, new_description="d2") is None
    assert ok(plugin_dir, "Volume.resize", sr=sr, key=key, new_size=1 << 20) is None
    st = ok(plugin_dir, "Volume.stat", sr=sr, key=key)
    assert (st["name"], st["description"], st["keys"], st["virtual_size"]) == (
        "n2", "d2", {}, 1 << 20)
    assert ok(plugin_dir, "Volume.revert", sr=sr, snapshot=snap["key"], key=key) is None
    assert ok(plugin_dir, "Volume.stat", sr=sr, key=key)["virtual_size"] == 1024
    assert len(ok(plugin_dir, "SR.ls", sr=sr)) == 3
    assert ok(plugin_dir, "Volume.destroy", sr=sr, key=clone["key"]) is None
    assert ok(plugin_dir, "Volume.destroy", sr=sr, key=clone["key"]) is None
    assert ok(plugin_dir, "SR.detach", sr=sr) is None
    assert ok(plugin_dir, "SR.destroy", sr=sr) is None
    assert os.listdir(path) == []


def test_error_paths(plugin_dir, exe_sr):
    sr, path = exe_sr
    missing = "5f0c1d8e-0000-4000-8000-000000000002"
    key = ok(plugin_dir, "Volume.create", sr=sr, name="", description="", size=4096,
             sharable=False)["key"]
    snap = ok(plugin_dir, "Volume.snapshot", sr=sr, key=key)["key"]
    before = sorted(os.listdir(path))
    expect = [
        ("Volume.stat", dict(key=missing), ["Volume_does_not_exist", missing]),
        ("Volume.stat", dict(key="../sr.json"), ["Volume_does_not_exist", "../sr.json"]),
        ("Volume.set", dict(key=missing, k="a", v="b"), ["Volume_does_not_exist", missing]),
        ("Volume.unset", dict(key=missing, k="a"), ["Volume_does_not_exist", missing]),
        ("Volume.set_name", dict(key=missing, new_name="a"), ["Volume_does_not_exist", missing]),
        ("Volume.set_description", dict(key=missing, new_description="a"),
         ["Volume_does_not_exist", missing]),
        ("Volume.snapshot", dict(key=missing), ["Volume_does_not_exist", missing]),
        ("Volume.clone", dict(key="/etc/passwd"), ["Volume_does_not_exist", "/etc/passwd"]),
        ("Volume.revert", dict(snapshot=missing, key=key), ["Volume_does_not_exist", missing]),
        ("Volume.resize", dict(key=key, new_size=512),
         ["VDI Invalid size", "shrinking not allowed"]),
        ("Volume.resize", dict(key=snap, new_size=1 << 20),
         ["Volume is read-only", snap, "a snapshot cannot be resized"]),
        ("Volume.destroy", dict(key="x/../.."), ["Volume_does_not_exist", "x/../.."]),
    ]
    for method, args, params in expect:
        code, got = fails(plugin_dir, method, sr=sr, **args)
        assert got == params, (method, got)
    code, got = fails(plugin_dir, "Volume.create", sr=sr, name="", description="", size=-1,
                      sharable=False)
    assert (code, got[0]) == ("SR_BACKEND_FAILURE_79", "VDI Invalid size")
    for method, args in (("SR.stat", {}), ("SR.ls", {}), ("SR.destroy", {}),
                         ("SR.set_name", {"new_name": "x"}),
                         ("Volume.stat", {"key": key})):
        assert fails(plugin_dir, method, sr="file:///nonexistent", **args) == (
            "SR_BACKEND_FAILURE", ["SR_does_not_exist", "file:///nonexistent"])
    code, got = fails(plugin_dir, "SR.create", uuid="x", configuration={"path": path},
                      name="", description="")
    assert got[0] == "SR already exists"
    code, got = fails(plugin_dir, "SR.probe", configuration={})
    assert got[:2] == ["Invalid device-config", "path"]
    code, got = fails(plugin_dir, "SR.attach", configuration={"path": path, "sr_uuid": "no"})
    assert got[0] == "SR uuid mismatch"
    assert sorted(os.listdir(path)) == before


def test_caller_errors_from_the_schemas(plugin_dir, exe_sr):
    sr, path = exe_sr
    before = sorted(os.listdir(path))
    for method, args in (("Volume.create", dict(sr=sr, name="", description="", size=1.5,
                                                 sharable=False)),
                         ("Volume.create", dict(sr=sr, name="", description="", size=1)),
                         ("Volume.set", dict(sr=sr, key="k", k=1, v="v")),
                         ("SR.create", dict(uuid="u", configuration={"path": 3}, name="",
                                            description=""))):
        code, params = fails(plugin_dir, method, **args)
        assert params[0] == "Invalid_request", params
    assert sorted(os.listdir(path)) == before


def test_static_vdis_command_line_mode(plugin_dir, exe_sr):
    """static-vdis: positional arguments, --configuration k v, JSON on stdout."""
    sr, path = exe_sr
    key = ok(plugin_dir, "Volume.create", sr=sr, name="ha", description="", size=4096,
             sharable=True)["key"]
    def cli(*argv):
        r = subprocess.run([os.path.join(plugin_dir, argv[0])] + list(argv[1:]),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)
    assert cli("Plugin.Query", "static-vdis")["plugin"] == "file-raw"
    assert cli("SR.attach", "static-vdis", "--configuration", "path", path,
               "--configuration", "sr_uuid", "sr-uuid") == sr
    st = cli("Volume.stat", "static-vdis", sr, key)
    assert st["key"] == key and st["uri"][0].startswith("blkback:///")


def test_32_concurrent_creates_through_executables(plugin_dir, exe_sr):
    sr, path = exe_sr
    exe = os.path.join(plugin_dir, "Volume.create")
    procs = []
    for i in range(32):
        p = subprocess.Popen([exe, "--json"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True)
        procs.append(p)
    outs = []
    for i, p in enumerate(procs):
        out, err = p.communicate(json.dumps({"dbg": f"c{i}", "sr": sr, "name": f"v{i}",
                                             "description": "", "size": 1 << 20,
                                             "sharable": False}), timeout=300)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
    keys = {o["key"] for o in outs}
    assert len(keys) == 32
    listed = ok(plugin_dir, "SR.ls", sr=sr)
    assert {v["key"] for v in listed} == keys
    assert len(os.listdir(path)) == 2 + 3 * 32


def test_killed_executable_then_retried(plugin_dir, exe_sr):
    sr, path = exe_sr
    key = ok(plugin_dir, "Volume.create", sr=sr, name="", description="", size=4096,
             sharable=False)["key"]
    r = subprocess.run([os.path.join(plugin_dir, "Volume.snapshot"), "--json"],
                       input=json.dumps({"dbg": "d", "sr": sr, "key": key}), universal_newlines=True,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       env=dict(os.environ, XAPI_STORAGE_FAULT="snapshot:data"))
    assert r.returncode == -9 and r.stdout == ""
    assert [v["key"] for v in ok(plugin_dir, "SR.ls", sr=sr)] == [key]
    assert len(os.listdir(path)) == 2 + 3
    ok(plugin_dir, "Volume.snapshot", sr=sr, key=key)
    assert len(ok(plugin_dir, "SR.ls", sr=sr)) == 2


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=12)
    | st.sampled_from(["../x", "/", "file:///", "5f0c1d8e-0000-4000-8000-000000000002",
                       "@SR@", "@SR@", "@KEY@", "@KEY@", "@PATH@", "-1", str(2**63)]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from([m for m in METHODS if m != "SR.create"]), junk=st.dictionaries(
    st.sampled_from(["sr", "key", "size", "name", "description", "sharable", "k", "v",
                     "configuration", "new_size", "snapshot", "uuid", "new_name"]),
    json_values, max_size=5))
def test_generated_bad_input_gives_error_record_and_no_change(plugin_dir, exe_sr, method,
                                                              junk):
    """Arguments of the wrong shape, or pointing at nothing, never change the SR.
    (SR.create is left out: a generated absolute path could make a directory anywhere.)"""
    sr, path = exe_sr
    # "@SR@", "@KEY@" and "@PATH@" stand for the real SR, one of its volumes and its directory,
    # so that bad values also reach calls on things that exist
    vols = ok(plugin_dir, "SR.ls", sr=sr)
    key = vols[0]["key"] if vols else ok(plugin_dir, "Volume.create", sr=sr, name="", description="",
                                         size=0, sharable=False)["key"]
    real = {"@SR@": sr, "@KEY@": key, "@PATH@": path}

    def subst(v):
        if isinstance(v, str):
            return real.get(v, v)
        if isinstance(v, list):
            return [subst(x) for x in v]
        if isinstance(v, dict):
            return {k: subst(x) for k, x in v.items()}
        return v
    junk = subst(junk)

    def state():
        return {n: (st_.st_size, st_.st_mode, st_.st_mtime_ns) for n in sorted(os.listdir(path))
                for st_ in [os.lstat(os.path.join(path, n))]}
    before = state()
    rc, out = call(plugin_dir, method, **junk)
    if rc:
        assert rc == 1 and set(out) == {"code", "params", "backtrace"}
        assert state() == before, (method, junk, out)


def test_set_keys_round_trip_verbatim_on_the_wire(plugin_dir, exe_sr):
    """Keys and values arrive as JSON text; what Volume.stat prints is the same JSON text,
    lone surrogates and non-ASCII included."""
    sr, path = exe_sr
    key = ok(plugin_dir, "Volume.create", sr=sr, name="", description="", size=0,
             sharable=False)["key"]
    raw_k, raw_v = '"tags\\u00e9\\ud800 \\/x"', '"\\udfff\\u0000\\u202e\\ud83d\\ude00"'
    stdin = f'{{"dbg":"d","sr":{json.dumps(sr)},"key":"{key}","k":{raw_k},"v":{raw_v}}}'
    r = subprocess.run([os.path.join(plugin_dir, "Volume.set"), "--json"], input=stdin,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True)
    assert r.returncode == 0 and r.stdout.strip() == "null", r.stdout
    keys = ok(plugin_dir, "Volume.stat", sr=sr, key=key)["keys"]
    assert keys == {json.loads(raw_k): json.loads(raw_v)}
