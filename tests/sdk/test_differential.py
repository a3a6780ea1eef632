"""The SDK's own validator decides exactly as jsonschema does, on values generated from the
schemas (valid ones, and valid ones with one spot broken), for every method's params and
result. jsonschema is told the wire's one rule it does not know: an integer is a JSON number
without fraction (3.0 is not an int on the wire)."""

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xapi_storage.sdk import schema

from . import strategies
from .helpers import reference, reference_jsonschema

reference_jsonschema(module_level=True)

METHODS = [(i, m) for i in schema.INTERFACES for m in schema.interface(i).methods]


def mine(itf, part, method, value):
    m = itf.methods[method]
    try:
        (m.check_params if part == "params" else m.check_result)(copy.deepcopy(value))
        return None
    except schema.Violation as v:
        return v


def out_of_range_digit_string(v, violation):
    """The one documented difference: a digit string beyond the integer range passes the
    schema's pattern (jsonschema) but not the SDK's decode-and-range-check."""
    return violation is not None and violation.rule in ("minimum", "maximum")


@pytest.mark.parametrize("itf_name,method", METHODS)
@pytest.mark.parametrize("part", ["params", "result"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_same_decision_as_jsonschema(itf_name, method, part, data):
    itf = schema.interface(itf_name)
    node = itf.methods[method].node[part]
    value = data.draw(st.one_of(strategies.valid(itf, node), strategies.mutant(itf, node)))
    ref_valid = reference(itf, part, method).is_valid(value)
    v = mine(itf, part, method, value)
    if ref_valid and v is not None:
        assert out_of_range_digit_string(value, v), f"SDK rejects a value jsonschema accepts: {v}"
    else:
        assert ref_valid == (v is None), f"jsonschema {'accepts' if ref_valid else 'rejects'}, SDK: {v}"
    if v is not None:  # the violation names a real place in the value
        node_ = value
        for p in v.path[:-1]:
            node_ = node_[p]


@pytest.mark.parametrize("itf_name,method", METHODS)
@pytest.mark.parametrize("part", ["params", "result"])
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_same_decision_on_every_single_mutation(itf_name, method, part, data):
    itf = schema.interface(itf_name)
    node = itf.methods[method].node[part]
    ref = reference(itf, part, method)
    for value in strategies.all_mutants(data.draw(strategies.valid(itf, node))):
        ref_valid = ref.is_valid(value)
        v = mine(itf, part, method, value)
        if ref_valid and v is not None and out_of_range_digit_string(value, v):
            continue
        assert ref_valid == (v is None), (value, f"jsonschema {'accepts' if ref_valid else 'rejects'}, SDK: {v}")


@pytest.mark.parametrize("itf_name,method", METHODS)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_generated_valid_values_are_valid(itf_name, method, data):
    itf = schema.interface(itf_name)
    m = itf.methods[method]
    value = data.draw(strategies.valid(itf, m.node["result"]))
    m.check_result(value)
