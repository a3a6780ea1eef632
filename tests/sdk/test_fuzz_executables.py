"""Generated requests (from the schemas, one spot broken) sent to the installed executables
as the daemon sends them: always exactly one JSON value on stdout; a request the schema
rejects always gives exit 1 and an Invalid_request error record, and never reaches the plugin."""

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xapi_storage.sdk import schema

from . import strategies
from .helpers import assert_error_record, has_reference_jsonschema, reference, run_exe


def rejected(method, request):
    """jsonschema's decision where there is a jsonschema 4; on Python 3.6 (jsonschema 3.2) the
    SDK's own validator, run in this process: the executable must then decide as it does."""
    if has_reference_jsonschema():
        return not reference(method.interface, "params", method.name).is_valid(request)
    try:
        method.check_params(json.loads(json.dumps(request)))
        return False
    except schema.Violation:
        return True

TARGETS = ["Volume.create", "Volume.stat", "SR.attach", "Volume.list_changed_blocks", "Plugin.Query"]


@pytest.mark.parametrize("exe", TARGETS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bad_requests_give_an_error_record_and_exit_1(toy_dir, tmp_path, exe, data):
    method = schema.lookup(exe)
    itf = method.interface
    sr = tmp_path / "sr"
    sr.mkdir(exist_ok=True)
    request = data.draw(strategies.mutant(itf, method.params_schema))
    if isinstance(request, dict) and "sr" in request:
        request["sr"] = str(sr)  # keep the toy's files in this test's directory
    before = sorted(os.listdir(sr))
    r = run_exe(toy_dir / exe, request)
    assert r.stdout.count("\n") == 1  # exactly one JSON value, one line
    if r.rc != 0:
        assert r.rc == 1
        assert_error_record(r.value)
    if rejected(method, request):
        assert r.rc == 1, r
        assert_error_record(r.value, "SR_BACKEND_FAILURE", "Invalid_request")
        assert r.value["params"][1] == method.wire_name
        assert sorted(os.listdir(sr)) == before  # the plugin never ran


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode),
                     strategies.ANY_JSON.map(lambda v: json.dumps(v).encode())))
def test_arbitrary_stdin_gives_one_json_value(toy_dir, raw):
    r = run_exe(toy_dir / "Plugin.Query", stdin=raw)
    assert r.stdout.count("\n") == 1
    if r.rc == 0:
        assert r.value["plugin"] == "toy"
    else:
        assert r.rc == 1
        assert_error_record(r.value, "SR_BACKEND_FAILURE", "Invalid_request")
