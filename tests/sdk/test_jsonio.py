"""sdk.jsonio: the C-accelerated strict JSON the executables use instead of `json`, and its
pure-`json` fallback (used where `_json` is missing), which must behave the same."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xapi_storage.sdk import jsonio

JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
              st.text()),
    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=6), c, max_size=4)),
    max_leaves=12)


@pytest.fixture(params=["accelerated", "fallback"])
def mode(request, monkeypatch):
    if request.param == "fallback":
        monkeypatch.setattr(jsonio, "_scan", None)
        monkeypatch.setattr(jsonio, "_encode", None)
    return request.param


def test_the_accelerated_path_is_the_one_in_use():
    assert jsonio._scan is not None and jsonio._encode is not None


@settings(max_examples=150, deadline=None)
@given(value=JSON)
def test_round_trip_agrees_with_stdlib_json(value):
    for scan, enc in ((jsonio._scan, jsonio._encode), (None, None)):
        saved = jsonio._scan, jsonio._encode
        jsonio._scan, jsonio._encode = scan, enc
        try:
            text = jsonio.dumps(value)
            assert json.loads(text) == value
            assert jsonio.loads(text) == value
            assert jsonio.loads(json.dumps(value, indent=1) + "\n") == value
            assert text == json.dumps(value, separators=(",", ":"))
        finally:
            jsonio._scan, jsonio._encode = saved


@pytest.mark.parametrize("text,what", [
    ("", "empty"), ("  \n", "empty"), ("{", "not JSON"), ("[1,]", "not JSON"), ("[1] [2]", "junk"),
    ('{"a":1,"a":2}', "duplicate key"), ("NaN", "not JSON"), ("[Infinity]", "not JSON"),
    ("-Infinity", "not JSON"), ("1e999", "out of range"), ("'a'", "not JSON"), ('"\\x"', "not JSON"),
    ('"a\nb"', "not JSON"),  # a raw control character inside a string (strict)
])
def test_strictness(mode, text, what):
    with pytest.raises(jsonio.JSONError) as e:
        jsonio.loads(text)
    assert what in str(e.value)


def test_whitespace_around_one_value_is_fine(mode):
    assert jsonio.loads(' \t\r\n{"a": [1, 2.5, "x", null, true]}\n\n') == {"a": [1, 2.5, "x", None, True]}


def test_dumps_refuses_what_is_not_json(mode):
    with pytest.raises(ValueError):
        jsonio.dumps([math.nan])
    with pytest.raises(ValueError):
        jsonio.dumps({"x": math.inf})
    with pytest.raises(TypeError):
        jsonio.dumps({"s": {1, 2}})
    assert jsonio.dumps((1, (2, 3))) == "[1,[2,3]]"
    assert jsonio.dumps("é\u2028\ud800") == '"\\u00e9\\u2028\\ud800"'  # ASCII only, one line


def test_deep_nesting_is_an_error_not_a_crash(mode):
    with pytest.raises(jsonio.JSONError):
        jsonio.loads("[" * 100000 + "]" * 100000)
