"""Hypothesis strategies built from the interface's JSON Schemas: valid values of any schema
node, and "mutants" (a valid value with one spot broken) that are usually invalid."""

import copy
import math

from hypothesis import strategies as st

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
ANY_JSON = st.recursive(JSON_SCALARS, lambda c: st.one_of(st.lists(c, max_size=3),
                                                          st.dictionaries(st.text(max_size=5), c, max_size=3)),
                        max_leaves=6)
TEXT = st.text(max_size=12)
# values that confuse types: bool for int, float for int, digit strings, null, empty containers
INTERESTING = [None, True, False, 0, -1, 1.5, 3.0, "", "1", "-1", "x", [], {}, [1, 2], ["Data"],
               ["Healthy", ""], "Data", 2 ** 63, -2 ** 63 - 1, 2 ** 62, {"a": None}]
JUNK = st.one_of(st.sampled_from(INTERESTING), ANY_JSON)


def valid(itf, node, depth=0):
    """Strategy for values valid under `node` of the interface document `itf.doc`."""
    if node is True or node == {}:
        return ANY_JSON
    if "$ref" in node:
        target = itf.compiler.resolve(node["$ref"])
        rest = {k: v for k, v in node.items() if k not in ("$ref", "description", "title")}
        return valid(itf, target, depth) if not rest else valid(itf, {**target, **rest}, depth)
    if "const" in node:
        return st.just(node["const"])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    for key in ("oneOf", "anyOf"):
        if key in node:
            return st.one_of([valid(itf, b, depth + 1) for b in node[key]])
    if "allOf" in node and all("if" in b for b in node["allOf"]):
        # conditionals (if/then) on a record: generate the record, then make each `then` hold
        # where its `if` does
        base = {k: v for k, v in node.items() if k != "allOf"}
        rules = node["allOf"]
        return valid(itf, base, depth).map(lambda v: _repair_all(itf, v, rules))
    if "allOf" in node:
        return valid(itf, node["allOf"][0], depth)
    t = node.get("type")
    if t == "string":
        if node.get("pattern") == "^-?[0-9]{1,19}$":
            return st.from_regex(r"\A-?[0-9]{1,19}\Z")
        return TEXT
    if t == "integer":
        return st.integers(node.get("minimum", -2 ** 70), node.get("maximum", 2 ** 70))
    if t == "number":
        return st.one_of(st.integers(-10, 10), st.floats(allow_nan=False, allow_infinity=False))
    if t == "boolean":
        return st.booleans()
    if t == "null":
        return st.none()
    if t == "array":
        if "prefixItems" in node:
            return st.tuples(*[valid(itf, x, depth + 1) for x in node["prefixItems"]]).map(list)
        return st.lists(valid(itf, node.get("items", True), depth + 1), max_size=3 if depth < 3 else 0)
    if t == "object":
        props = node.get("properties")
        if props is None:
            return st.dictionaries(TEXT, valid(itf, node.get("additionalProperties", True), depth + 1), max_size=3)
        required = node.get("required", [])
        optional = [k for k in props if k not in required]
        return st.fixed_dictionaries({k: valid(itf, props[k], depth + 1) for k in required},
                                     optional={k: valid(itf, props[k], depth + 1) for k in optional})
    raise NotImplementedError(node)


@st.composite
def mutant(draw, itf, node):
    """A valid value with one spot replaced, removed or added."""
    value = draw(valid(itf, node))
    spots = list(_spots(value, []))
    path = draw(st.sampled_from(spots))
    how = draw(st.sampled_from(["replace", "delete", "add", "null"]))
    return _apply(value, path, how, draw(JUNK), draw(TEXT))


def all_mutants(value):
    """Every single-spot mutation of `value` with the INTERESTING values (deterministic)."""
    for path in _spots(value, []):
        for how in ("replace", "delete", "add", "null"):
            if how == "delete" and not path:
                continue
            for junk in (INTERESTING if how in ("replace", "add") else [None]):
                yield _apply(copy.deepcopy(value), path, how, copy.deepcopy(junk), "unknown_field")


def _spots(v, path):
    yield path
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _spots(x, path + [k])
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _spots(x, path + [i])


def _apply(value, path, how, junk, key):
    if not path:
        return junk
    parent = value
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    if how == "delete":
        del parent[last]
    elif how == "add" and isinstance(parent, dict):
        parent[key] = junk
    elif how == "add":
        parent.append(junk)
    elif how == "null":
        parent[last] = None
    else:
        parent[last] = junk
    return value


def finite(v):
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, list):
        return all(finite(x) for x in v)
    if isinstance(v, dict):
        return all(finite(x) for x in v.values())
    return True


def _repair_all(itf, value, rules):
    from .helpers import reference_jsonschema
    jsonschema = reference_jsonschema()
    for rule in rules:
        if jsonschema.Draft202012Validator({**itf.doc, **rule["if"]}).is_valid(value):
            _repair(value, rule.get("then", {}))
    return value


def _repair(value, then):
    """Make `value` (a dict) satisfy `then`, for the shapes the schemas use: required keys
    (added with an empty string) and const fields, nested under properties."""
    if not isinstance(value, dict):
        return
    for k in then.get("required", ()):
        value.setdefault(k, "")
    for k, sub in then.get("properties", {}).items():
        if "const" in sub:
            value[k] = sub["const"]
        elif k in value:
            _repair(value[k], sub)
