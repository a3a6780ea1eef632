"""wire.call / wire.run in-process: dispatch, validation, and every error path."""

import io
import json

import pytest

from xapi_storage.sdk import errors, jsonio, wire

from .helpers import assert_error_record  # also puts tests/sdk/toyplugins on sys.path

import sdk_toy  # noqa: E402  (a toy plugin module)

VOL_ARGS = {"dbg": "d", "name": "n", "description": "", "size": 1024, "sharable": False}


def test_call_dispatches_by_keyword_with_decoded_ints(sr):
    vol = wire.call("sdk_toy", "Volume.create", {**VOL_ARGS, "sr": sr, "size": "4096"})
    assert vol["virtual_size"] == 4096
    assert wire.call(sdk_toy, "volume.STAT", {"dbg": "d", "sr": sr, "key": vol["key"]}) == vol
    assert wire.call(sdk_toy.IMPLEMENTATIONS, "SR.ls", {"dbg": "d", "sr": sr}) == [vol]


def test_call_accepts_tuples_where_arrays_are():
    assert wire.call("sdk_toy", "SR.probe", {"dbg": "d", "configuration": {"a": "b"}}) == (
        {"configuration": {"a": "b"}, "complete": False, "extra_info": {}},)


def test_invalid_request_is_the_callers_error(sr):
    with pytest.raises(errors.InvalidRequest) as e:
        wire.call("sdk_toy", "Volume.create", {**VOL_ARGS, "sr": sr, "sharable": "no"})
    assert e.value.params == ["Invalid_request", "Volume.create", "sharable", "type",
                              'expected boolean, got string "no"']
    assert e.value.code == "SR_BACKEND_FAILURE"
    with pytest.raises(errors.InvalidRequest) as e:
        wire.call("sdk_toy", "Volume.create", {"dbg": "d"})
    assert e.value.field == "sr" and e.value.rule == "required"


def test_invalid_results_are_the_plugins_bug(sr):
    vol = wire.call("sdk_toy", "Volume.create", {**VOL_ARGS, "sr": sr})
    args = {"dbg": "d", "sr": sr, "key": vol["key"]}
    with pytest.raises(errors.InvalidResult) as e:
        wire.call("sdk_toy", "Volume.snapshot", args)
    assert (e.value.field, e.value.rule) == ("uuid", "type")
    assert "omit it" in e.value.message
    with pytest.raises(errors.InvalidResult) as e:
        wire.call("sdk_toy", "Volume.clone", args)
    assert (e.value.field, e.value.rule) == ("virtual_size", "required")
    with pytest.raises(errors.InvalidResult) as e:
        wire.call("sdk_toy", "Volume.resize", {**args, "new_size": 1})
    assert e.value.params[:4] == ["Invalid_result", "Volume.resize", "(the value itself)", "type"]


def test_plugin_errors_pass_through(sr):
    args = {"dbg": "d", "sr": sr, "key": "nope"}
    with pytest.raises(errors.Volume_does_not_exist):
        wire.call("sdk_toy", "Volume.stat", args)
    with pytest.raises(errors.Unimplemented) as e:
        wire.call("sdk_toy", "Volume.enable_cbt", args)
    assert e.value.params == ["Unimplemented", "Volume.enable_cbt"]
    with pytest.raises(ValueError):
        wire.call("sdk_toy", "Volume.revert", {**args, "snapshot": "s"})


def test_unknown_methods():
    for name in ("Volume.nope", "Datapath.attach", "plugin.py", "", "Volume"):
        with pytest.raises(errors.UnknownMethod) as e:
            wire.call("sdk_toy", name, {"dbg": "d"})
        assert e.value.params[0] == "Unknown_method"
        assert "Volume.create" in e.value.params[2] and "Plugin.Query" in e.value.params[2]


@pytest.mark.parametrize("impl,reason", [
    ("sdk_toy_broken", "cannot import sdk_toy_broken: RuntimeError: this plugin is broken on purpose"),
    ("no_such_module_here", "cannot import no_such_module_here: ModuleNotFoundError"),
    ("json", "no IMPLEMENTATIONS"),
    ({"Volume": dict}, "must be a subclass of xapi_storage.sdk.base.Volume"),
    ({"Frob": object}, "not an interface"),
])
def test_plugin_load_errors(impl, reason):
    with pytest.raises(errors.PluginLoadError) as e:
        wire.call(impl, "Plugin.query", {"dbg": "d"})
    assert reason in e.value.reason
    assert e.value.params[0] == "Plugin_load_failed"


def test_implemented_names_spell_plugin_query_with_a_capital_q():
    names = wire.implemented_names(sdk_toy.IMPLEMENTATIONS)
    assert "Plugin.Query" in names and "Plugin.query" not in names
    assert "Volume.create" in names and "Volume.enable_cbt" not in names and "SR.create" not in names


def test_error_record_of_each_kind():
    def raised(exc):
        try:
            raise exc
        except BaseException as e:  # noqa: B902
            return wire.error_record(e)
    r = raised(errors.Volume_does_not_exist("k"))
    assert_error_record(r, "SR_BACKEND_FAILURE", "Volume_does_not_exist")
    assert r["params"] == ["Volume_does_not_exist", "k"] and r["backtrace"]["error"] == "k"
    assert r["backtrace"]["files"] == [__file__]
    r = raised(errors.XenAPIError("SR_BACKEND_FAILURE_79", ["VDI Invalid size", 5]))
    assert (r["code"], r["params"]) == ("SR_BACKEND_FAILURE_79", ["VDI Invalid size", "5"])
    r = raised(errors.Activated_on_another_host("host-uuid"))
    assert r["params"] == ["Activated_on_another_host", "host-uuid"]
    r = raised(KeyError("field"))
    assert r["params"] == ["KeyError", "'field'"]

    class Odd(Exception):
        code = "CUSTOM"
        params = ["a", 1]
    assert raised(Odd())["params"] == ["a", "1"] and raised(Odd())["code"] == "CUSTOM"

    class Broken(Exception):
        def __str__(self):
            raise RuntimeError("no")
    assert_error_record(raised(Broken()), "SR_BACKEND_FAILURE", "Broken")
    assert_error_record(raised(SystemExit(3)), "SR_BACKEND_FAILURE", "SystemExit")


def run_inproc(name, request=None, args=("--json",), stdin_text=None):
    out = io.StringIO()
    stdin = io.StringIO(stdin_text if stdin_text is not None else json.dumps(request))
    rc = wire.run("sdk_toy", [f"/x/org.xen.xapi.storage.toy/{name}", *args], stdin, out)
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    return rc, jsonio.loads(text)


def test_run_in_process_success_and_failure(sr, capsys):
    rc, v = run_inproc("Plugin.Query", {"dbg": "d"})
    assert rc == 0 and v["plugin"] == "toy"
    rc, v = run_inproc("Volume.stat", {"dbg": "d", "sr": sr, "key": "x"})
    assert rc == 1
    assert_error_record(v, "SR_BACKEND_FAILURE", "Volume_does_not_exist")
    rc, v = run_inproc("Volume.set_description", {"dbg": "d", "sr": sr, "key": "x", "new_description": ""})
    assert rc == 1 and v["params"] == ["SystemExit", "3"]


@pytest.mark.parametrize("text,rule", [
    ("", "json"), ("{", "json"), ('{"dbg":"d"} x', "json"), ('{"dbg":"d","dbg":"e"}', "json"),
    ("[]", "type"), ("null", "type"), ('{"dbg": NaN}', "json"), ('{"dbg": 1}', "type"),
])
def test_run_in_process_bad_stdin(text, rule):
    rc, v = run_inproc("Plugin.Query", stdin_text=text)
    assert rc == 1
    assert_error_record(v, "SR_BACKEND_FAILURE", "Invalid_request")
    assert v["params"][3] == rule, v


def test_stray_prints_in_process_go_to_stderr(capfd):
    # in-process, the SDK moves sys.stdout (the executables also move file descriptor 1)
    out = io.StringIO()

    class Chatty(sdk_toy.Plugin):
        def diagnostics(self, dbg):
            print("a stray print")
            return "fine"
    rc = wire.run({"Plugin": Chatty}, ["/x/Plugin.diagnostics", "--json"], io.StringIO('{"dbg":"d"}'), out)
    assert rc == 0 and out.getvalue() == '"fine"\n'
    captured = capfd.readouterr()
    assert "a stray print" not in captured.out and "a stray print" in captured.err


def test_an_exception_whose_code_or_params_raise_still_gives_a_record():
    """error_record never raises: a plugin's exception class with a broken `params` or `code`
    property gives the generic record (else: a traceback, no record, SCRIPT_FAILED)."""
    class BadParams(Exception):
        @property
        def params(self):
            raise TypeError("broken params")

    class BadCode(Exception):
        params = ["p"]

        @property
        def code(self):
            raise ValueError("broken code")

    for cls in (BadParams, BadCode):
        try:
            raise cls("boom")
        except Exception as e:  # noqa: BLE001
            r = wire.error_record(e)
        assert_error_record(r, "SR_BACKEND_FAILURE", cls.__name__)
        assert r["params"] == [cls.__name__, "boom"]

    class Raises(sdk_toy.Plugin):
        def diagnostics(self, dbg):
            raise BadParams("boom")
    out = io.StringIO()
    rc = wire.run({"Plugin": Raises}, ["/x/Plugin.diagnostics", "--json"], io.StringIO('{"dbg":"d"}'), out)
    assert rc == 1
    assert jsonio.loads(out.getvalue())["params"] == ["BadParams", "boom"]
