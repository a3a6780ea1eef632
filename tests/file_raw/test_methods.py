"""Every method of the file-raw plugin and its error paths, called in-process as the SDK does
(classes instantiated without arguments, keyword arguments named as in the interface)."""

import json
import os

import pytest

from xapi_storage.sdk.errors import SR_does_not_exist, Volume_does_not_exist, XenAPIError
from xapi_storage.volume import file_raw

from .conftest import DBG, check_accounted, sr_files, volume_files

SR_UUID = "5f0c1d8e-0000-4000-8000-000000000001"


def make(V, sr, size=1 << 20, name="disk", description="", sharable=False):
    return V.create(dbg=DBG, sr=sr, name=name, description=description, size=size,
                    sharable=sharable)


def img(sr_dir, key):
    return os.path.join(sr_dir, key + ".img")


def write_at(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def read_all(path):
    with open(path, "rb") as f:
        return f.read()


# --- Plugin --------------------------------------------------------------------------------------

def test_query(plugin):
    q = plugin.query(dbg=DBG)
    assert q["plugin"] == "file-raw"
    assert q["required_api_version"] == "5.0"
    assert set(q) == {"plugin", "name", "description", "vendor", "copyright", "version",
                      "required_api_version", "features", "configuration",
                      "required_cluster_stack"}
    assert {"SR_PROBE", "VDI_SNAPSHOT", "VDI_CLONE", "VDI_RESIZE", "VDI_REVERT"} <= set(
        q["features"])
    assert set(q["configuration"]) == {"path", "datapath", "sr_uuid"}
    json.dumps(q)


def test_diagnostics(plugin):
    assert "file-raw" in plugin.diagnostics(dbg=DBG)


# --- SR.create / attach / detach -----------------------------------------------------------------

def test_create_makes_directory_and_returns_config(SR, sr_dir):
    config = SR.create(dbg=DBG, uuid=SR_UUID, configuration={"path": sr_dir + "/"},
                       name="n", description="d")
    assert config == {"path": sr_dir, "sr_uuid": SR_UUID}
    assert sr_files(sr_dir) == ["sr.json", "sr.lock"]
    with open(os.path.join(sr_dir, "sr.json")) as f:
        rec = json.load(f)
    assert rec["format"] == "xapi-storage/file-raw" and rec["uuid"] == SR_UUID


def test_create_keeps_other_config_keys(SR, sr_dir):
    config = SR.create(dbg=DBG, uuid=SR_UUID,
                       configuration={"path": sr_dir, "datapath": "pyblkback", "x": "y"},
                       name="n", description="d")
    assert config == {"path": sr_dir, "datapath": "pyblkback", "x": "y", "sr_uuid": SR_UUID}


def test_create_retry_converges(SR, sr_dir):
    a = SR.create(dbg=DBG, uuid=SR_UUID, configuration={"path": sr_dir}, name="n",
                  description="")
    b = SR.create(dbg=DBG, uuid=SR_UUID, configuration={"path": sr_dir}, name="n",
                  description="")
    assert a == b


def test_create_refuses_other_sr(SR, sr_dir):
    SR.create(dbg=DBG, uuid=SR_UUID, configuration={"path": sr_dir}, name="n", description="")
    with pytest.raises(XenAPIError) as e:
        SR.create(dbg=DBG, uuid="other", configuration={"path": sr_dir}, name="n",
                  description="")
    assert e.value.params[0] == "SR already exists"


def test_create_refuses_non_empty_directory(SR, tmp_path):
    (tmp_path / "precious").write_text("data")
    with pytest.raises(XenAPIError) as e:
        SR.create(dbg=DBG, uuid=SR_UUID, configuration={"path": str(tmp_path)}, name="n",
                  description="")
    assert e.value.params[0] == "Directory not empty"
    assert os.listdir(tmp_path) == ["precious"]


@pytest.mark.parametrize("config, why", [
    ({}, "missing"),
    ({"path": "relative/dir"}, "not an absolute path"),
    ({"path": "/"}, "root directory"),
    ({"path": "/tmp/x\x00y"}, "not an absolute path"),
    ({"path": "/nonexistent-parent-dir/sr"}, "parent"),
    ({"path": "@TMP@", "datapath": "tapdisk"}, "datapath"),
    ({"path": "@TMP@", "datapath": "blkback,blkback"}, "datapath"),
    ({"path": "@TMP@", "datapath": ""}, "datapath"),
    ({"path": "@TMP@", "sr_uuid": "another"}, "differs"),
])
def test_create_bad_config(SR, tmp_path, config, why):
    config = {k: v.replace("@TMP@", str(tmp_path / "sr")) for k, v in config.items()}
    with pytest.raises(XenAPIError) as e:
        SR.create(dbg=DBG, uuid=SR_UUID, configuration=config, name="n", description="")
    assert e.value.params[0] == "Invalid device-config"
    assert why in " ".join(e.value.params[1:])
    assert os.listdir(tmp_path) == []           # nothing left behind


def test_create_on_a_file(SR, tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(XenAPIError, match="not a directory"):
        SR.create(dbg=DBG, uuid=SR_UUID, configuration={"path": str(tmp_path / "f")},
                  name="n", description="")


@pytest.mark.parametrize("bad", [{"path": 1}, ["path"], {"path": "/x", "k": None}])
def test_create_bad_configuration_type(SR, bad):
    with pytest.raises(XenAPIError) as e:
        SR.create(dbg=DBG, uuid=SR_UUID, configuration=bad, name="n", description="")
    assert e.value.params[:2] == ["Invalid argument", "configuration"]


def test_attach_idempotent_and_key(SR, sr_dir):
    config = SR.create(dbg=DBG, uuid=SR_UUID, configuration={"path": sr_dir}, name="n",
                       description="")
    a = SR.attach(dbg=DBG, configuration=config)
    assert a == "file://" + sr_dir
    assert SR.attach(dbg=DBG, configuration=config) == a
    assert SR.attach(dbg=DBG, configuration={"path": sr_dir}) == a   # sr_uuid optional


def test_attach_not_an_sr(SR, tmp_path):
    with pytest.raises(SR_does_not_exist):
        SR.attach(dbg=DBG, configuration={"path": str(tmp_path)})
    with pytest.raises(SR_does_not_exist):
        SR.attach(dbg=DBG, configuration={"path": str(tmp_path / "missing")})


def test_attach_uuid_mismatch(SR, sr, sr_dir):
    with pytest.raises(XenAPIError) as e:
        SR.attach(dbg=DBG, configuration={"path": sr_dir, "sr_uuid": "wrong"})
    assert e.value.params[0] == "SR uuid mismatch"


def test_attach_datapath_sets_the_one_uri(SR, V, sr, sr_dir):
    v = make(V, sr)
    assert v["uri"] == [f"blkback://{sr_dir}/{v['key']}.img"]                  # the default
    SR.attach(dbg=DBG, configuration={"path": sr_dir, "datapath": "pyblkback,blkback"})
    uris = V.stat(dbg=DBG, sr=sr, key=v["key"])["uri"]
    assert uris == [f"pyblkback://{sr_dir}/{v['key']}.img"]             # the first name only
    SR.attach(dbg=DBG, configuration={"path": sr_dir, "datapath": "blkback"})
    assert SR.ls(dbg=DBG, sr=sr)[0]["uri"] == [f"blkback://{sr_dir}/{v['key']}.img"]


def test_path_with_odd_characters_is_percent_encoded(SR, V, tmp_path):
    path = str(tmp_path / "my SR%é")
    config = SR.create(dbg=DBG, uuid=SR_UUID, configuration={"path": path}, name="n",
                       description="")
    sr = SR.attach(dbg=DBG, configuration=config)
    assert sr == "file://" + str(tmp_path) + "/my%20SR%25%C3%A9"
    v = make(V, sr)
    assert v["uri"][0] == f"blkback://{str(tmp_path)}/my%20SR%25%C3%A9/{v['key']}.img"
    assert SR.stat(dbg=DBG, sr=sr)["sr"] == sr


def test_detach(SR, sr):
    assert SR.detach(dbg=DBG, sr=sr) is None
    assert SR.detach(dbg=DBG, sr=sr) is None
    with pytest.raises(SR_does_not_exist):
        SR.detach(dbg=DBG, sr="nfs://elsewhere")


# --- SR.probe ------------------------------------------------------------------------------------

def test_probe_sr(SR, sr, sr_dir):
    [r] = SR.probe(dbg=DBG, configuration={"path": sr_dir})
    assert r["complete"] is True
    assert r["configuration"] == {"path": sr_dir, "sr_uuid": SR_UUID}
    assert r["sr"]["sr"] == sr and r["sr"]["uuid"] == SR_UUID


def test_probe_empty_and_missing(SR, tmp_path):
    for path in (str(tmp_path), str(tmp_path / "new")):
        [r] = SR.probe(dbg=DBG, configuration={"path": path, "sr_uuid": "stale"})
        assert r["complete"] is True and "sr" not in r
        assert r["configuration"] == {"path": path}         # no sr_uuid without an sr


def test_probe_finds_srs_below(SR, tmp_path):
    (tmp_path / "junk").write_text("")
    SR.create(dbg=DBG, uuid="a", configuration={"path": str(tmp_path / "a")}, name="A",
              description="")
    (tmp_path / "b").mkdir()
    results = SR.probe(dbg=DBG, configuration={"path": str(tmp_path)})
    found = [r for r in results if "sr" in r]
    assert [r["configuration"] for r in found] == [{"path": str(tmp_path / "a"), "sr_uuid": "a"}]
    rest = [r for r in results if "sr" not in r]
    assert all(r["complete"] is False and "sr_uuid" not in r["configuration"] for r in rest)


def test_probe_rules_of_spec_3_5(SR, sr, sr_dir, tmp_path):
    """sr_uuid only with complete=true; an sr only with sr_uuid."""
    for path in (sr_dir, str(tmp_path), str(tmp_path / "missing")):
        for r in SR.probe(dbg=DBG, configuration={"path": path, "sr_uuid": "x"}):
            if "sr_uuid" in r["configuration"]:
                assert r["complete"] is True
            if "sr" in r:
                assert r["configuration"]["sr_uuid"] == r["sr"]["uuid"]


@pytest.mark.parametrize("config", [{}, {"path": "rel"}, {"path": "/nonexistent-x/y"}])
def test_probe_bad_config(SR, config):
    with pytest.raises(XenAPIError) as e:
        SR.probe(dbg=DBG, configuration=config)
    assert e.value.params[0] == "Invalid device-config"


def test_probe_a_file(SR, tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(XenAPIError, match="not a directory"):
        SR.probe(dbg=DBG, configuration={"path": str(tmp_path / "f")})


# --- SR.stat / set_name / set_description / ls / destroy -----------------------------------------

def test_stat(SR, sr):
    st = SR.stat(dbg=DBG, sr=sr)
    assert st["sr"] == sr and st["uuid"] == SR_UUID and st["name"] == "test SR"
    assert st["health"] == ["Healthy", ""] and st["clustered"] is False
    assert st["datasources"] == []
    assert 0 < st["free_space"] <= st["total_space"]
    assert all(type(st[k]) is int for k in ("free_space", "total_space"))


def test_set_name_and_description(SR, sr):
    SR.set_name(dbg=DBG, sr=sr, new_name="ü / ../ \x00 name")
    SR.set_description(dbg=DBG, sr=sr, new_description="d\nescription")
    st = SR.stat(dbg=DBG, sr=sr)
    assert (st["name"], st["description"]) == ("ü / ../ \x00 name", "d\nescription")
    with pytest.raises(XenAPIError):
        SR.set_name(dbg=DBG, sr=sr, new_name=3)


def test_ls(SR, V, sr, sr_dir):
    assert SR.ls(dbg=DBG, sr=sr) == []
    made = [make(V, sr, name=f"v{i}") for i in range(5)]
    listed = SR.ls(dbg=DBG, sr=sr)
    assert sorted(listed, key=lambda v: v["key"]) == sorted(made, key=lambda v: v["key"])
    check_accounted(SR, sr, sr_dir)


def test_destroy(SR, V, sr, sr_dir):
    v = make(V, sr)
    V.snapshot(dbg=DBG, sr=sr, key=v["key"])
    SR.destroy(dbg=DBG, sr=sr)
    assert os.listdir(sr_dir) == []             # the directory itself is left, empty
    for call in (lambda: SR.stat(dbg=DBG, sr=sr), lambda: SR.ls(dbg=DBG, sr=sr),
                 lambda: SR.destroy(dbg=DBG, sr=sr),
                 lambda: V.stat(dbg=DBG, sr=sr, key=v["key"]),
                 lambda: make(V, sr)):
        with pytest.raises(SR_does_not_exist):
            call()
    with pytest.raises(SR_does_not_exist):
        SR.attach(dbg=DBG, configuration={"path": sr_dir})
    # and the directory can hold a new SR
    SR.create(dbg=DBG, uuid="again", configuration={"path": sr_dir}, name="", description="")


BAD_SR_KEYS = ["", "/tmp/x", "file://", "file://relative", "file:///", "file:///a/../b",
               "file:///a//b", "file:///a/", "file:///a%00b", "file:///a%2fb", "file:///a%2Fb",
               "file:///a%zz", "file:///a b", "nfs:///tmp/x", "file:////tmp/x", None, 5]


@pytest.mark.parametrize("bad", BAD_SR_KEYS)
def test_bad_sr_keys(SR, V, bad):
    key = "5f0c1d8e-0000-4000-8000-000000000002"
    calls = [
        lambda: SR.stat(dbg=DBG, sr=bad), lambda: SR.ls(dbg=DBG, sr=bad),
        lambda: SR.destroy(dbg=DBG, sr=bad), lambda: SR.detach(dbg=DBG, sr=bad),
        lambda: SR.set_name(dbg=DBG, sr=bad, new_name="x"),
        lambda: SR.set_description(dbg=DBG, sr=bad, new_description="x"),
        lambda: make(V, bad), lambda: V.stat(dbg=DBG, sr=bad, key=key),
        lambda: V.destroy(dbg=DBG, sr=bad, key=key),
        lambda: V.set(dbg=DBG, sr=bad, key=key, k="a", v="b"),
        lambda: V.snapshot(dbg=DBG, sr=bad, key=key),
    ]
    for call in calls:
        with pytest.raises(SR_does_not_exist):
            call()


# --- Volume.create / stat / destroy --------------------------------------------------------------

@pytest.mark.parametrize("size, rounded", [(0, 0), (1, 512), (512, 512), (513, 1024),
                                           (10 << 30, 10 << 30)])
def test_create_rounds_size(V, sr, sr_dir, size, rounded):
    v = make(V, sr, size=size)
    assert v["virtual_size"] == rounded
    assert os.stat(img(sr_dir, v["key"])).st_size == rounded
    assert v["physical_utilisation"] == 0          # sparse


def test_create_record(V, sr, sr_dir):
    v = make(V, sr, name="n", description="d", sharable=True)
    key = v["key"]
    assert v == {"key": key, "uuid": key, "name": "n", "description": "d", "read_write": True,
                 "sharable": True, "virtual_size": 1 << 20, "physical_utilisation": 0,
                 "uri": [f"blkback://{sr_dir}/{key}.img"],
                 "keys": {}}
    assert V.stat(dbg=DBG, sr=sr, key=key) == v
    assert sr_files(sr_dir) == sorted(["sr.json", "sr.lock"] + volume_files([key]))


@pytest.mark.parametrize("size, code", [(-1, "SR_BACKEND_FAILURE_79"),
                                        (1 << 63, "SR_BACKEND_FAILURE_79"),
                                        ((1 << 63) - 512, "SR_BACKEND_FAILURE_79"),
                                        (True, "SR_BACKEND_FAILURE"),
                                        ("10", "SR_BACKEND_FAILURE"),
                                        (1.5, "SR_BACKEND_FAILURE")])
def test_create_bad_size_leaves_nothing(SR, V, sr, sr_dir, size, code):
    before = sr_files(sr_dir)
    with pytest.raises(XenAPIError) as e:
        make(V, sr, size=size)
    assert e.value.code == code
    assert sr_files(sr_dir) == before
    assert SR.ls(dbg=DBG, sr=sr) == []


def test_create_bad_arguments(V, sr):
    for kw in ({"name": None}, {"description": 1}, {"sharable": "no"}):
        args = dict(name="n", description="", size=0, sharable=False)
        args.update(kw)
        with pytest.raises(XenAPIError) as e:
            V.create(dbg=DBG, sr=sr, **args)
        assert e.value.params[0] == "Invalid argument"


def test_names_are_data(V, SR, sr, sr_dir, tmp_path):
    names = ["../../etc/passwd", "/etc/shadow", "a/b", "..", ".", "x\x00y", "ü\u202e", "",
             "sr.json", "\ud800"]
    made = [make(V, sr, name=n, description=n) for n in names]
    assert [v["name"] for v in made] == names
    assert sorted(os.listdir(tmp_path)) == ["sr"]          # nothing escaped the SR
    check_accounted(SR, sr, sr_dir)
    for v, n in zip(made, names):
        assert V.stat(dbg=DBG, sr=sr, key=v["key"])["name"] == n


def test_stat_missing(V, sr):
    with pytest.raises(Volume_does_not_exist):
        V.stat(dbg=DBG, sr=sr, key="5f0c1d8e-0000-4000-8000-000000000002")


def test_stat_reports_allocation(V, sr, sr_dir):
    v = make(V, sr)
    write_at(img(sr_dir, v["key"]), 65536, b"x" * 4096)
    st = V.stat(dbg=DBG, sr=sr, key=v["key"])
    assert st["virtual_size"] == 1 << 20
    assert 4096 <= st["physical_utilisation"] < 1 << 20


def test_destroy_volume(SR, V, sr, sr_dir):
    a, b = make(V, sr), make(V, sr)
    assert V.destroy(dbg=DBG, sr=sr, key=a["key"]) is None
    assert sr_files(sr_dir) == sorted(["sr.json", "sr.lock"] + volume_files([b["key"]]))
    # the daemon may destroy twice (VDI.destroy with clone-on-boot): tolerated
    assert V.destroy(dbg=DBG, sr=sr, key=a["key"]) is None
    with pytest.raises(Volume_does_not_exist):
        V.stat(dbg=DBG, sr=sr, key=a["key"])
    assert [v["key"] for v in SR.ls(dbg=DBG, sr=sr)] == [b["key"]]


TRAVERSAL_KEYS = ["../sr.json", "..", "/etc/passwd", "x", "", "5F0C1D8E-0000-4000-8000-000000000002",
                  "5f0c1d8e-0000-4000-8000-00000000000/", "5f0c1d8e-0000-4000-8000-000000000002\x00",
                  "5f0c1d8e-0000-4000-8000-0000000000022", "5f0c1d8e00000-4000-8000-000000000002",
                  "../../../../tmp/5f0c1d8e-0000-4000-8000-000000000002", None, 7,
                  "5f0c1d8e-0000-4000-8000-00000000000g"]


@pytest.mark.parametrize("key", TRAVERSAL_KEYS)
def test_keys_are_never_paths(SR, V, sr, sr_dir, key):
    good = make(V, sr)["key"]
    before = sr_files(sr_dir)
    calls = [
        lambda: V.stat(dbg=DBG, sr=sr, key=key),
        lambda: V.destroy(dbg=DBG, sr=sr, key=key),
        lambda: V.set(dbg=DBG, sr=sr, key=key, k="a", v="b"),
        lambda: V.unset(dbg=DBG, sr=sr, key=key, k="a"),
        lambda: V.set_name(dbg=DBG, sr=sr, key=key, new_name="a"),
        lambda: V.set_description(dbg=DBG, sr=sr, key=key, new_description="a"),
        lambda: V.resize(dbg=DBG, sr=sr, key=key, new_size=1 << 30),
        lambda: V.snapshot(dbg=DBG, sr=sr, key=key),
        lambda: V.clone(dbg=DBG, sr=sr, key=key),
        lambda: V.revert(dbg=DBG, sr=sr, snapshot=key, key=good),
        lambda: V.revert(dbg=DBG, sr=sr, snapshot=good, key=key),
    ]
    for call in calls:
        with pytest.raises(Volume_does_not_exist):
            call()
    assert sr_files(sr_dir) == before


# --- Volume.set / unset / set_name / set_description ---------------------------------------------

def test_set_unset_round_trip(V, sr):
    key = make(V, sr)["key"]
    pairs = {"vdi-type": "user", "is_a_snapshot": "false", "tags\u00e9": "\u00e9",
             "_sm_config_x": "", "k/../..": "v\x00", "\U0001f600": "\udc00", "\ud800": "x", "": "empty"}
    # (a lone surrogate can arrive from JSON as "\\ud800"; a surrogate pair cannot stay a pair)
    for k, v in pairs.items():
        assert V.set(dbg=DBG, sr=sr, key=key, k=k, v=v) is None
    assert V.stat(dbg=DBG, sr=sr, key=key)["keys"] == pairs
    V.set(dbg=DBG, sr=sr, key=key, k="vdi-type", v="system")
    assert V.stat(dbg=DBG, sr=sr, key=key)["keys"]["vdi-type"] == "system"
    assert V.unset(dbg=DBG, sr=sr, key=key, k="vdi-type") is None
    assert V.unset(dbg=DBG, sr=sr, key=key, k="never-set") is None
    assert "vdi-type" not in V.stat(dbg=DBG, sr=sr, key=key)["keys"]


def test_set_bad_arguments(V, sr):
    key = make(V, sr)["key"]
    for k, v in ((1, "v"), ("k", None)):
        with pytest.raises(XenAPIError):
            V.set(dbg=DBG, sr=sr, key=key, k=k, v=v)


def test_set_name_description(V, sr):
    key = make(V, sr)["key"]
    V.set_name(dbg=DBG, sr=sr, key=key, new_name="../new")
    V.set_description(dbg=DBG, sr=sr, key=key, new_description="desc")
    st = V.stat(dbg=DBG, sr=sr, key=key)
    assert (st["name"], st["description"]) == ("../new", "desc")


def test_updates_on_missing_volume(V, sr):
    key = "5f0c1d8e-0000-4000-8000-000000000002"
    for call in (lambda: V.set(dbg=DBG, sr=sr, key=key, k="a", v="b"),
                 lambda: V.unset(dbg=DBG, sr=sr, key=key, k="a"),
                 lambda: V.set_name(dbg=DBG, sr=sr, key=key, new_name="a"),
                 lambda: V.set_description(dbg=DBG, sr=sr, key=key, new_description="a"),
                 lambda: V.resize(dbg=DBG, sr=sr, key=key, new_size=0)):
        with pytest.raises(Volume_does_not_exist):
            call()


# --- Volume.resize -------------------------------------------------------------------------------

def test_resize_grow_keeps_data(V, sr, sr_dir):
    key = make(V, sr, size=4096)["key"]
    write_at(img(sr_dir, key), 0, b"abcd")
    V.resize(dbg=DBG, sr=sr, key=key, new_size=10000)
    st = V.stat(dbg=DBG, sr=sr, key=key)
    assert st["virtual_size"] == 10240
    assert read_all(img(sr_dir, key))[:4] == b"abcd"
    V.resize(dbg=DBG, sr=sr, key=key, new_size=10240)      # same size: fine
    V.resize(dbg=DBG, sr=sr, key=key, new_size=10239)      # rounds up to the same size


def test_resize_shrink_refused(V, sr):
    key = make(V, sr, size=8192)["key"]
    with pytest.raises(XenAPIError) as e:
        V.resize(dbg=DBG, sr=sr, key=key, new_size=4096)
    assert (e.value.code, e.value.params) == ("SR_BACKEND_FAILURE_79",
                                              ["VDI Invalid size", "shrinking not allowed"])
    assert V.stat(dbg=DBG, sr=sr, key=key)["virtual_size"] == 8192
    for bad in (-1, 1 << 63):
        with pytest.raises(XenAPIError) as e:
            V.resize(dbg=DBG, sr=sr, key=key, new_size=bad)
        assert e.value.code == "SR_BACKEND_FAILURE_79"
    with pytest.raises(XenAPIError) as e:        # larger than ext4/xfs allow
        V.resize(dbg=DBG, sr=sr, key=key, new_size=(1 << 63) - 512)
    assert e.value.code == "SR_BACKEND_FAILURE_79"
    assert V.stat(dbg=DBG, sr=sr, key=key)["virtual_size"] == 8192


def test_resize_snapshot_refused(V, sr):
    snap = V.snapshot(dbg=DBG, sr=sr, key=make(V, sr)["key"])
    with pytest.raises(XenAPIError, match="read-only"):
        V.resize(dbg=DBG, sr=sr, key=snap["key"], new_size=1 << 30)


# --- Volume.snapshot / clone / revert ------------------------------------------------------------

def test_snapshot(V, SR, sr, sr_dir):
    src = make(V, sr, size=8 << 20, name="src", description="d")
    write_at(img(sr_dir, src["key"]), 1 << 20, b"x" * 65536)
    V.set(dbg=DBG, sr=sr, key=src["key"], k="vdi-type", v="user")
    snap = V.snapshot(dbg=DBG, sr=sr, key=src["key"])
    assert snap["key"] != src["key"]
    assert (snap["name"], snap["description"]) == ("src", "d")
    assert snap["read_write"] is False and snap["keys"] == {}
    assert snap["virtual_size"] == 8 << 20
    assert snap["physical_utilisation"] < 1 << 20           # holes stayed holes
    assert read_all(img(sr_dir, snap["key"])) == read_all(img(sr_dir, src["key"]))
    write_at(img(sr_dir, src["key"]), 0, b"later")          # the snapshot does not change
    assert read_all(img(sr_dir, snap["key"]))[:5] == bytes(5)
    assert os.stat(img(sr_dir, snap["key"])).st_mode & 0o777 == 0o400
    assert V.stat(dbg=DBG, sr=sr, key=snap["key"]) == snap
    check_accounted(SR, sr, sr_dir)


def test_clone(V, sr, sr_dir):
    src = make(V, sr, size=65536)
    write_at(img(sr_dir, src["key"]), 0, b"orig")
    snap = V.snapshot(dbg=DBG, sr=sr, key=src["key"])
    clone = V.clone(dbg=DBG, sr=sr, key=snap["key"])
    assert clone["read_write"] is True and clone["keys"] == {}
    write_at(img(sr_dir, clone["key"]), 0, b"new!")
    assert read_all(img(sr_dir, snap["key"]))[:4] == b"orig"
    assert read_all(img(sr_dir, src["key"]))[:4] == b"orig"
    assert read_all(img(sr_dir, clone["key"]))[:4] == b"new!"


def test_snapshot_clone_missing(V, sr):
    for m in (V.snapshot, V.clone):
        with pytest.raises(Volume_does_not_exist):
            m(dbg=DBG, sr=sr, key="5f0c1d8e-0000-4000-8000-000000000002")


def test_revert(V, SR, sr, sr_dir):
    vol = make(V, sr, size=65536, name="vol")
    V.set(dbg=DBG, sr=sr, key=vol["key"], k="vdi-type", v="user")
    write_at(img(sr_dir, vol["key"]), 0, b"one")
    snap = V.snapshot(dbg=DBG, sr=sr, key=vol["key"])
    write_at(img(sr_dir, vol["key"]), 0, b"two")
    V.resize(dbg=DBG, sr=sr, key=vol["key"], new_size=1 << 20)
    assert V.revert(dbg=DBG, sr=sr, snapshot=snap["key"], key=vol["key"]) is None
    st = V.stat(dbg=DBG, sr=sr, key=vol["key"])
    assert read_all(img(sr_dir, vol["key"]))[:3] == b"one"
    assert st["virtual_size"] == 65536                    # the snapshot's size
    assert (st["key"], st["name"], st["keys"], st["read_write"]) == (
        vol["key"], "vol", {"vdi-type": "user"}, True)
    write_at(img(sr_dir, vol["key"]), 0, b"three")         # writable, snapshot unchanged
    assert read_all(img(sr_dir, snap["key"]))[:3] == b"one"
    check_accounted(SR, sr, sr_dir)


def test_revert_errors(V, sr):
    vol = make(V, sr)
    snap = V.snapshot(dbg=DBG, sr=sr, key=vol["key"])
    missing = "5f0c1d8e-0000-4000-8000-000000000002"
    with pytest.raises(Volume_does_not_exist):
        V.revert(dbg=DBG, sr=sr, snapshot=missing, key=vol["key"])
    with pytest.raises(Volume_does_not_exist):
        V.revert(dbg=DBG, sr=sr, snapshot=snap["key"], key=missing)
    with pytest.raises(XenAPIError, match="itself"):
        V.revert(dbg=DBG, sr=sr, snapshot=vol["key"], key=vol["key"])
    with pytest.raises(XenAPIError, match="read-only"):
        V.revert(dbg=DBG, sr=sr, snapshot=vol["key"], key=snap["key"])


def test_unimplemented_methods_raise_unimplemented(V, sr):
    from xapi_storage.sdk.errors import Unimplemented
    with pytest.raises(Unimplemented):
        V.enable_cbt(dbg=DBG, sr=sr, key="x")


def test_implementations_table():
    impl = file_raw.IMPLEMENTATIONS
    assert set(impl) == {"Plugin", "SR", "Volume"}
    for name in impl:
        assert impl[name]().NAMESPACE == name


def test_big_records(V, SR, sr, sr_dir):
    """Records larger than one read buffer (64 KiB) read back whole."""
    name = "n" * 200_000
    v = make(V, sr, name=name)
    for i in range(300):
        V.set(dbg=DBG, sr=sr, key=v["key"], k=f"tags{i}", v="x" * 300)
    st = V.stat(dbg=DBG, sr=sr, key=v["key"])
    assert st["name"] == name and len(st["keys"]) == 300
    assert os.stat(os.path.join(sr_dir, v["key"] + ".json")).st_size > 65536 * 4
    assert SR.ls(dbg=DBG, sr=sr)[0]["keys"] == st["keys"]


def test_create_losing_a_race_keeps_the_winners_sr(SR, V, sr_dir, monkeypatch):
    """Two SR.create calls with different uuids on one missing directory: the one that made
    the directory can lose the race for sr.lock. Its clean-up must not remove the winner's
    files (without sr.lock every later call on the winner's SR says SR_does_not_exist)."""
    real = file_raw._create_sr

    def other_creator_wins_first(path, uuid, name, description, datapath):
        real(path, "the-winner", "w", "", datapath)     # the concurrent call, in between
        return real(path, uuid, name, description, datapath)

    monkeypatch.setattr(file_raw, "_create_sr", other_creator_wins_first)
    with pytest.raises(XenAPIError) as e:
        SR.create(dbg=DBG, uuid=SR_UUID, configuration={"path": sr_dir}, name="n",
                  description="")
    assert e.value.params[0] == "SR already exists"
    monkeypatch.undo()
    sr = SR.attach(dbg=DBG, configuration={"path": sr_dir, "sr_uuid": "the-winner"})
    assert SR.stat(dbg=DBG, sr=sr)["uuid"] == "the-winner"
    make(V, sr)
    assert len(SR.ls(dbg=DBG, sr=sr)) == 1


@pytest.mark.parametrize("kind", ["symlink", "directory", "missing"])
def test_stat_gives_no_uri_for_data_that_is_not_a_regular_file(V, SR, sr, sr_dir, tmp_path,
                                                               kind):
    """Volume.stat precedes every datapath call, which opens the path of the volume's URI. If
    the data file was replaced (a symlink planted on the NFS server, say), stat must not hand
    out a URI that leads outside the SR; but xapi's VDI.destroy stats first, so stat still
    answers (no URI, sizes 0) and the volume can be destroyed. Nothing outside is touched, and
    a directory is left in place (destroy removes files, never someone's directory tree)."""
    v = make(V, sr)
    path = img(sr_dir, v["key"])
    os.unlink(path)
    if kind == "symlink":
        (tmp_path / "outside").write_bytes(b"secret")
        os.symlink(str(tmp_path / "outside"), path)
    elif kind == "directory":
        os.mkdir(path)
    for got in (V.stat(dbg=DBG, sr=sr, key=v["key"]), SR.ls(dbg=DBG, sr=sr)[0]):
        assert (got["uri"], got["virtual_size"], got["physical_utilisation"]) == ([], 0, 0)
    if kind == "directory":
        with open(os.path.join(path, "theirs"), "w") as f:
            f.write("not ours")
    V.destroy(dbg=DBG, sr=sr, key=v["key"])
    assert SR.ls(dbg=DBG, sr=sr) == []
    assert not os.path.exists(os.path.join(sr_dir, v["key"] + ".json"))
    if kind == "symlink":
        assert (tmp_path / "outside").read_bytes() == b"secret"
        assert not os.path.lexists(path)
    elif kind == "directory":
        # not ours to remove: left in place, with what it holds
        with open(os.path.join(path, "theirs")) as f:
            assert f.read() == "not ours"


def test_entries_planted_in_the_sr_neither_followed_nor_fatal(V, SR, sr, sr_dir, tmp_path):
    """Odd entries with volume-like names (a symlink, a directory, a FIFO as a record; a
    symlink as a lock) are not followed, do not hang a call, and do not make SR.ls (hence
    xapi's SR.scan) fail for the volumes that are fine. A record that is not a regular file is
    listed (read-only, no URI, the reason in its description) rather than hidden; a directory
    is no record at all; the symlink in a lock's place is removed, its target untouched."""
    import subprocess
    from .conftest import child_argv
    good = make(V, sr)
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"key": "5f0c1d8e-0000-4000-8000-0000000000a1",
                                   "state": "ready"}))
    planted = ["5f0c1d8e-0000-4000-8000-0000000000a%d" % i for i in range(1, 5)]
    os.symlink(str(outside), os.path.join(sr_dir, planted[0] + ".json"))
    os.mkdir(os.path.join(sr_dir, planted[1] + ".json"))
    os.mkfifo(os.path.join(sr_dir, planted[2] + ".json"))
    os.symlink(str(tmp_path / "nowhere"), os.path.join(sr_dir, planted[3] + ".lock"))
    before = sr_files(sr_dir)
    p = subprocess.run(child_argv("SR", "ls", sr=sr), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    assert p.returncode == 0, p.stderr
    listed = {v["key"]: v for v in json.loads(p.stdout)}
    assert sorted(listed) == sorted([good["key"], planted[0], planted[2]])
    for key in planted[0], planted[2]:
        assert (listed[key]["uri"], listed[key]["read_write"]) == ([], False)
        assert "is not a regular file" in listed[key]["description"]
    p = subprocess.run(child_argv("Volume", "stat", sr=sr, key=planted[2]),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=30)
    assert p.returncode == 0 and json.loads(p.stdout)["uri"] == [], p.stdout + p.stderr
    with pytest.raises(Volume_does_not_exist):
        V.stat(dbg=DBG, sr=sr, key=planted[1])
    # (sr.meta.lock serialises the removal of what is planted under a lock's name)
    assert set(sr_files(sr_dir)) - {"sr.meta.lock"} == set(before) - {planted[3] + ".lock"}
    assert not (tmp_path / "nowhere").exists()
    assert json.loads(outside.read_text())["state"] == "ready"


def test_create_makes_the_new_directory_durable(SR, tmp_path, monkeypatch):
    """SR.create makes the SR's directory: its entry in the parent must reach the disk (fsync
    of the parent) before the call returns, or a crash can lose the whole new SR."""
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    SR.create(dbg=DBG, uuid=SR_UUID, configuration={"path": str(tmp_path / "sr")}, name="n",
              description="")
    assert str(tmp_path) in synced


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory", "missing"])
def test_data_that_is_not_a_regular_file_is_refused_without_hanging(V, SR, sr, sr_dir,
                                                                     tmp_path, kind):
    """snapshot, clone, revert and resize open the data file: one replaced by a FIFO must not
    hang the call (with the volume's lock held, and no caller timeout), and a symlink is not
    followed; each call answers a structured error and leaves the SR as it was."""
    import subprocess
    from .conftest import child_argv
    v, other = make(V, sr), make(V, sr)
    snap = V.snapshot(dbg=DBG, sr=sr, key=other["key"])
    path = img(sr_dir, v["key"])
    os.unlink(path)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        (tmp_path / "outside").write_bytes(b"secret")
        os.symlink(str(tmp_path / "outside"), path)
    elif kind == "directory":
        os.mkdir(path)
    before = sr_files(sr_dir)
    for method, args in (("snapshot", {"key": v["key"]}), ("clone", {"key": v["key"]}),
                         ("resize", {"key": v["key"], "new_size": 1 << 21}),
                         ("revert", {"snapshot": v["key"], "key": other["key"]})):
        p = subprocess.run(child_argv("Volume", method, sr=sr, **args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=30)
        assert p.returncode == 1, (method, p.stdout, p.stderr)
        code, params = json.loads(p.stdout)["error"]
        assert params[:2] == ["Volume data is not a regular file", v["key"]], (method, params)
        assert sr_files(sr_dir) == before
    assert V.stat(dbg=DBG, sr=sr, key=snap["key"])["virtual_size"] == 1 << 20
    assert V.stat(dbg=DBG, sr=sr, key=v["key"])["uri"] == []
    if kind == "symlink":
        assert (tmp_path / "outside").read_bytes() == b"secret"


LEASE_HOLDER = r"""
import fcntl, os, signal, sys, time
fd = os.open(sys.argv[1], os.O_RDWR if sys.argv[2] == "write" else os.O_RDONLY)
signal.signal(signal.SIGIO, lambda *a: fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK))
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK if sys.argv[2] == "write" else fcntl.F_RDLCK)
print("leased", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("leased, kind", [("img", "read"), ("json", "write")])
def test_files_leased_by_a_file_server_are_waited_for(V, sr, sr_dir, leased, kind):
    """An SR directory exported by a file server (Samba oplocks, knfsd delegations) has leases
    on its files: an open that conflicts starts a lease break and must wait for it. Opening
    with O_NONBLOCK (to never wait on a FIFO) fails with EAGAIN there instead: the plugin
    must then wait, not fail."""
    import subprocess
    import sys
    v = make(V, sr)
    path = os.path.join(sr_dir, f"{v['key']}.{leased}")
    holder = subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, path, kind],
                              stdout=subprocess.PIPE, universal_newlines=True)
    try:
        assert holder.stdout.readline().strip() == "leased"
        if leased == "img":
            V.resize(dbg=DBG, sr=sr, key=v["key"], new_size=2 << 20)
        assert V.stat(dbg=DBG, sr=sr, key=v["key"])["virtual_size"] == (
            2 << 20 if leased == "img" else 1 << 20)
    finally:
        holder.kill()
        holder.wait()


def test_destroy_of_an_immutable_data_file_keeps_the_volume(V, SR, sr, sr_dir):
    """unlink refused with EPERM on a regular file (chattr +i, here): destroy fails with the
    error and the volume stays whole (record and data), rather than dropping its record and
    leaking the data file. Only a directory in the data file's place is left behind."""
    import subprocess
    v = make(V, sr)
    path = img(sr_dir, v["key"])
    r = subprocess.run(["chattr", "+i", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True)
    if r.returncode != 0:
        msg = f"cannot make a file immutable here (chattr +i): {r.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        with pytest.raises(PermissionError):
            V.destroy(dbg=DBG, sr=sr, key=v["key"])
    finally:
        subprocess.run(["chattr", "-i", path], check=True)
    # the record says destroying; the data file is still there; a retry finishes the job
    assert os.path.exists(path)
    V.destroy(dbg=DBG, sr=sr, key=v["key"])
    assert SR.ls(dbg=DBG, sr=sr) == []
    assert not os.path.exists(path)
