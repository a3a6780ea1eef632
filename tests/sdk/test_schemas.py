"""The schemas: well-formed, complete, consistent with the SDK's base classes, and they accept
the spec's examples and reject what the wire rules forbid."""

import glob
import json
import os

import pytest

from xapi_storage.sdk import base, schema

from .helpers import REPO, reference_jsonschema

ALL = sorted(glob.glob(os.path.join(REPO, "schemas", "*.json")))


def test_top_level_schemas_are_the_ones_the_package_uses():
    # one copy only: schemas/ is a symlink to the package's data (which an install carries)
    assert os.path.islink(os.path.join(REPO, "schemas"))
    assert os.readlink(os.path.join(REPO, "schemas")) == "lib/xapi_storage/schemas"
    assert {os.path.basename(p)[:-5] for p in ALL} == set(schema.INTERFACES) | {"error"}
    for p in ALL:  # the same bytes, wherever the package is installed
        with open(p, "rb") as a, open(os.path.join(schema.SCHEMA_DIR, os.path.basename(p)), "rb") as b:
            assert a.read() == b.read()


@pytest.mark.parametrize("path", ALL, ids=os.path.basename)
def test_schema_is_valid_draft_2020_12(path):
    with open(path) as f:
        reference_jsonschema().Draft202012Validator.check_schema(json.load(f))


@pytest.mark.parametrize("name", schema.INTERFACES)
def test_every_method_compiles_with_the_fast_validator(name):
    itf = schema.interface(name)
    assert itf.methods
    for m in itf.methods.values():
        m.check_params  # noqa: B018
        itf.compiler.compile(m.params_schema)
        itf.compiler.compile(m.result_schema)
        assert m.param_names[0] == "dbg"
    for d in itf.doc["$defs"]:
        itf.compiler.ref("#/$defs/" + d)


def test_unsupported_keyword_is_refused():
    c = schema._Compiler({})
    with pytest.raises(schema.SchemaError, match="unsupported"):
        c.compile({"type": "string", "format": "uri"})


@pytest.mark.parametrize("name", schema.INTERFACES)
def test_base_classes_match_the_schemas(name):
    cls = getattr(base, name)
    itf = schema.interface(name)
    public = {n for n, v in vars(cls).items() if callable(v) and not n.startswith("_")}
    assert public == set(itf.methods), "base.py and the schema disagree on the methods"


@pytest.mark.parametrize("name", schema.INTERFACES)
def test_base_methods_raise_unimplemented(name):
    from xapi_storage.sdk import errors
    obj = getattr(base, name)()
    for m in schema.interface(name).methods.values():
        with pytest.raises(errors.Unimplemented) as e:
            getattr(obj, m.name)(dbg="d", **{p: None for p in m.param_names[1:]})
        assert str(e.value) == m.wire_name


def test_params_follow_the_interface_order():
    order = {
        "SR.create": ["dbg", "uuid", "configuration", "name", "description"],
        "Volume.create": ["dbg", "sr", "name", "description", "size", "sharable"],
        "Volume.revert": ["dbg", "sr", "snapshot", "key"],
        "Volume.list_changed_blocks": ["dbg", "sr", "key", "key2", "offset", "length"],
        "Datapath.attach": ["dbg", "uri", "domain"],
        "Data.copy": ["dbg", "uri", "domain", "remote", "blocklist"],
        "Plugin.query": ["dbg"],
    }
    for name, params in order.items():
        assert schema.lookup(name).param_names == params


def test_lookup_is_case_insensitive():
    assert schema.lookup("Plugin.Query").wire_name == "Plugin.query"
    assert schema.lookup("volume.CREATE").wire_name == "Volume.create"
    assert schema.lookup("sr.set_NAME").wire_name == "SR.set_name"
    for bad in ("Volume", "Volume.", "Nope.create", "Volume.nope", ".create", "plugin.py"):
        assert schema.lookup(bad) is None


# --- the spec's examples (section 3) ---------------------------------------------------------

VOLUME = {"key": "c1d4", "uuid": "c1d4", "name": "disk0", "description": "", "read_write": True,
          "sharable": False, "virtual_size": 10737418240, "physical_utilisation": 4096,
          "uri": ["loop+blkback:///var/run/sr-mount/6f3b/c1d4.img"], "keys": {}}
SR_STAT = {"sr": "file:///var/run/sr-mount/6f3b", "name": "NFS SR", "uuid": "6f3b", "description": "",
           "free_space": 53687091200, "total_space": 107374182400, "datasources": [],
           "clustered": False, "health": ["Healthy", ""]}
GOOD_RESULTS = [
    ("Volume.create", VOLUME),
    ("Volume.stat", {**VOLUME, "volume_type": "Data", "cbt_enabled": False}),
    ("SR.ls", [VOLUME, VOLUME]),
    ("SR.stat", SR_STAT),
    ("SR.attach", "file:///var/run/sr-mount/6f3b"),
    ("SR.detach", None),
    ("SR.probe", [{"configuration": {"server": "nfs1"}, "complete": False, "extra_info": {}},
                  {"configuration": {"sr_uuid": "6f3b"}, "complete": True, "sr": SR_STAT, "extra_info": {}}]),
    ("Datapath.attach", {"implementations": [["XenDisk", {"backend_type": "vbd", "params": "/dev/loop3", "extra": {}}],
                                             ["BlockDevice", {"path": "/dev/loop3"}]]}),
    ("Datapath.attach", {"implementations": [["XenDisk", {"backend_type": "qdisk", "params": "vdi:u", "extra": {}}],
                                             ["Nbd", {"uri": "nbd:unix:/s:exportname=q"}]]}),
    ("Volume.compare", {"blocksize": 512, "ranges": [[0, 1], (4, 2)]}),
    ("Data.mirror", ["MirrorV1", "op-1"]),
    ("Data.stat", {"failed": False, "complete": False, "progress": 0.5}),
    ("Data.stat", {"failed": False, "complete": True, "progress": 1}),
    ("Task.stat", {"id": "t", "debug_info": "d", "ctime": 1.5, "state": ["Completed", {"duration": 2.0, "result": "UnitResult"}]}),
    ("Task.stat", {"id": "t", "debug_info": "d", "ctime": 1, "state": ["Completed", {"duration": 2, "result": ["Volume", VOLUME]}]}),
    ("Plugin.query", {"plugin": "lvmplus", "name": "n", "description": "d", "vendor": "v", "copyright": "c",
                      "version": "1.0", "required_api_version": "5.0", "features": ["SR_ATTACH"],
                      "configuration": {"device": "block device"}, "required_cluster_stack": []}),
]


@pytest.mark.parametrize("name,value", GOOD_RESULTS)
def test_spec_examples_are_valid_results(name, value):
    schema.lookup(name).check_result(value)


BAD_RESULTS = [
    ("Volume.stat", {**VOLUME, "uuid": None}, "uuid", "type"),                 # null optional
    ("Volume.stat", {k: v for k, v in VOLUME.items() if k != "keys"}, "keys", "required"),
    ("Volume.stat", {**VOLUME, "virtual_size": 1.0}, "virtual_size", "type"),   # float for int64
    ("Volume.stat", {**VOLUME, "virtual_size": True}, "virtual_size", "type"),  # bool is no int
    ("Volume.stat", {**VOLUME, "virtual_size": "10"}, "virtual_size", "type"),  # strings only on input
    ("Volume.stat", {**VOLUME, "virtual_size": 2 ** 63}, "virtual_size", "maximum"),
    ("Volume.stat", {**VOLUME, "virtual_sise": 1}, "virtual_sise", "additionalProperties"),
    ("Volume.stat", {**VOLUME, "keys": {"a": 1}}, "keys.a", "type"),
    ("Volume.stat", {**VOLUME, "volume_type": ["Data"]}, "volume_type", "const"),
    ("Volume.stat", {**VOLUME, "volume_type": "data"}, "volume_type", "oneOf"),
    ("Volume.stat", {**VOLUME, "uri": "x://y"}, "uri", "type"),
    ("SR.stat", {**SR_STAT, "health": "Healthy"}, "health", "type"),
    ("SR.stat", {**SR_STAT, "health": ["Healthy"]}, "health", "minItems"),
    ("SR.stat", {**SR_STAT, "health": ["Healthy", "", ""]}, "health[2]", "items"),
    ("SR.stat", {**SR_STAT, "health": ["Fine", ""]}, "health", "oneOf"),
    ("SR.stat", {**SR_STAT, "health": ["Healthy", 3]}, "health[1]", "type"),
    ("SR.detach", {}, "(the value itself)", "type"),
    ("SR.probe", [{"configuration": {}, "complete": True, "sr": None, "extra_info": {}}], "[0].sr", "type"),
    ("Volume.compare", {"blocksize": 512, "ranges": [[0, 1, 2]]}, "ranges[0][2]", "items"),
    ("Datapath.attach", {"implementations": [["File", {"path": 1}]]}, "implementations[0][1].path", "type"),
    ("Data.stat", {"failed": False, "complete": True, "progress": float("nan")}, "progress", "type"),
]


@pytest.mark.parametrize("name,value,where,rule", BAD_RESULTS)
def test_bad_results_name_the_field_and_the_rule(name, value, where, rule):
    with pytest.raises(schema.Violation) as e:
        schema.lookup(name).check_result(value)
    assert (e.value.where, e.value.rule) == (where, rule), str(e.value)


def test_input_int_strings_are_decoded_and_range_checked():
    m = schema.lookup("Volume.create")
    req = {"dbg": "d", "sr": "s", "name": "n", "description": "", "size": "1024", "sharable": False}
    assert m.check_params(req)["size"] == 1024
    assert m.check_params({**req, "size": "-5"})["size"] == -5
    assert m.check_params({**req, "size": 7})["size"] == 7
    for bad, rule in (("1e3", "type"), ("", "type"), (" 12", "type"), ("0x10", "type"), (1.0, "type"),
                      (True, "type"), ("9223372036854775808", "maximum"), (2 ** 63, "type")):
        with pytest.raises(schema.Violation) as e:
            m.check_params({**req, "size": bad})
        assert e.value.path == ["size"], (bad, str(e.value))
        assert e.value.rule == rule, (bad, str(e.value))
    lcb = schema.lookup("Volume.list_changed_blocks")
    r = lcb.check_params({"dbg": "d", "sr": "s", "key": "a", "key2": "b", "offset": "0", "length": "-1"})
    assert (r["offset"], r["length"]) == (0, -1)
    copy = schema.lookup("Data.copy")
    r = copy.check_params({"dbg": "d", "uri": "u", "domain": "0", "remote": "r",
                           "blocklist": {"blocksize": "512", "ranges": [["1", 2]], "extra": 1}})
    assert r["blocklist"]["blocksize"] == 512 and r["blocklist"]["ranges"] == [[1, 2]]


def test_input_unknown_fields_are_ignored_and_dropped():
    m = schema.lookup("SR.attach")
    assert m.check_params({"dbg": "d", "configuration": {}, "uri": "legacy"}) == {"dbg": "d", "configuration": {}}


def test_input_missing_and_wrong_fields():
    m = schema.lookup("SR.create")
    with pytest.raises(schema.Violation) as e:
        m.check_params({"dbg": "d", "configuration": {}, "name": "n", "description": ""})
    assert (e.value.where, e.value.rule) == ("uuid", "required")
    with pytest.raises(schema.Violation) as e:
        m.check_params({"dbg": "d", "uuid": "u", "configuration": {"a": None}, "name": "n", "description": ""})
    assert (e.value.where, e.value.rule) == ("configuration.a", "type")
    with pytest.raises(schema.Violation) as e:
        m.check_params(["dbg"])
    assert e.value.rule == "type"


def test_nullary_variant_and_tag_errors():
    m = schema.lookup("Data.stat")
    assert m.check_params({"dbg": "d", "operation": ["CopyV1", "x"]})["operation"] == ["CopyV1", "x"]
    with pytest.raises(schema.Violation) as e:
        m.check_params({"dbg": "d", "operation": ["copyv1", "x"]})
    assert "CopyV1, MirrorV1" in e.value.message


_SR_STAT = {"sr": "file:///x", "name": "n", "description": "", "free_space": 1, "total_space": 2,
            "datasources": [], "clustered": False, "health": ["Healthy", ""]}


@pytest.mark.parametrize("result, field", [
    # spec 3.5: the daemon fails the whole probe (SCRIPT_FAILED) on any of these
    ([{"configuration": {"sr_uuid": "u"}, "complete": False, "extra_info": {}}], "[0].complete"),
    ([{"configuration": {}, "complete": True, "sr": _SR_STAT, "extra_info": {}}],
     "[0].configuration.sr_uuid"),
    ([{"configuration": {"sr_uuid": "u"}, "complete": False, "sr": _SR_STAT, "extra_info": {}}],
     "[0].complete"),
    ([{"configuration": {"a": "b"}, "complete": True, "extra_info": {}},
      {"configuration": {"path": "/p"}, "complete": False, "sr": _SR_STAT, "extra_info": {}}],
     "[1].configuration.sr_uuid"),
])
def test_probe_results_follow_the_daemons_rules(result, field):
    m = schema.lookup("SR.probe")
    with pytest.raises(schema.Violation) as e:
        m.check_result(result)
    assert e.value.where == field
    assert "3.5" in e.value.message or "sr_uuid" in e.value.message
    ref = reference_jsonschema().Draft202012Validator({**schema.interface("SR").doc, **m.result_schema})
    assert not ref.is_valid(result)


@pytest.mark.parametrize("result", [
    [],
    [{"configuration": {"a": "b"}, "complete": False, "extra_info": {}}],
    [{"configuration": {"a": "b"}, "complete": True, "extra_info": {}}],
    [{"configuration": {"sr_uuid": "u"}, "complete": True, "extra_info": {}}],
    [{"configuration": {"sr_uuid": "u"}, "complete": True, "sr": _SR_STAT, "extra_info": {}}],
])
def test_probe_results_the_daemon_accepts(result):
    m = schema.lookup("SR.probe")
    m.check_result(result)
    ref = reference_jsonschema().Draft202012Validator({**schema.interface("SR").doc, **m.result_schema})
    assert ref.is_valid(result)
