"""The interface, read from the JSON Schemas in xapi_storage/schemas/ (top-level schemas/).

Each interface file holds its types in `$defs` and, under `methods`, one entry per method
with a `params` schema (an object of named arguments, `dbg` first, in the interface's order)
and a `result` schema.

Validation runs on every call, in a fresh process, so it must start fast: this module
compiles the small subset of JSON Schema 2020-12 that the schemas use into closures, lazily,
one method at a time, and needs neither `jsonschema` nor `re` on the happy path. The
subset is listed in SUPPORTED below; compiling a schema with any other keyword is an error
(tests compile every schema, and check this validator against `jsonschema` itself).

Deliberate differences from plain JSON Schema, both from the wire's rules (spec section 3.1):
  * "integer" means a JSON number written without fraction or exponent: Python int, not
    bool, not float (jsonschema would accept 3.0; the daemon does not).
  * a node with "x-wire-decode": "integer" accepts what its anyOf accepts (an integer, or a
    string of digits), and a string is converted to int and checked against the first
    anyOf branch (its range) before the plugin sees it.
Arrays may be Python lists or tuples (both are written as JSON arrays).
"""

import os

from . import jsonio

SCHEMA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "schemas")

#: interface name -> schema file name (without .json); also the canonical spelling
INTERFACES = ("Plugin", "SR", "Volume", "Datapath", "Data", "Task")
#: which interfaces each kind of plugin implements
KINDS = {"volume": ("Plugin", "SR", "Volume"), "datapath": ("Plugin", "Datapath", "Data")}

SUPPORTED = {
    "$ref", "type", "const", "enum", "properties", "required", "additionalProperties",
    "items", "prefixItems", "minItems", "maxItems", "minimum", "maximum", "pattern",
    "oneOf", "anyOf", "allOf", "if", "then", "else",
    # annotations
    "$schema", "$id", "$defs", "title", "description", "methods", "x-namespace", "x-version",
    "x-plugin-kinds", "x-wire-decode",
}


class Violation(Exception):
    """A value does not match a schema. `path` is a list of keys/indices from the value
    validated, `rule` the JSON Schema keyword that failed, `message` says how."""

    def __init__(self, path, rule, message):
        super().__init__(message)
        self.path = _unlink(path)
        self.rule = rule
        self.message = message

    @property
    def where(self):
        return format_path(self.path)

    def __str__(self):
        return f"{self.where}: {self.message} (rule: {self.rule})"


def _unlink(path):
    """Paths are built as linked tuples (parent, key), () for the root: cheap on the happy
    path. Violation turns them into a list of keys."""
    if isinstance(path, list):
        return path
    out = []
    while path:
        path, key = path
        out.append(key)
    out.reverse()
    return out


def format_path(path):
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "(the value itself)"


def _short(value, limit=60):
    try:
        text = jsonio.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_TYPE_NAMES = {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null",
               list: "array", tuple: "array", dict: "object"}


def json_type(value):
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _is_type(value, t):
    cls = type(value)
    if t == "string":
        return cls is str
    if t == "integer":
        return cls is int
    if t == "number":
        return (cls is int) or (cls is float and value - value == 0.0)
    if t == "boolean":
        return cls is bool
    if t == "null":
        return value is None
    if t == "array":
        return cls is list or cls is tuple
    if t == "object":
        return cls is dict
    raise SchemaError(f"unknown type {t!r}")


class SchemaError(Exception):
    """The schema itself is wrong or uses an unsupported keyword (an SDK bug)."""


def _json_equal(a, b):
    if type(a) is bool or type(b) is bool:
        return type(a) is type(b) and a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if type(a) in (int, float) and type(b) in (int, float):
        return a == b
    return type(a) is type(b) and a == b


class _Compiler:
    def __init__(self, doc):
        self.doc = doc
        self.refs = {}  # "#/$defs/x" -> check function (filled lazily, cycles allowed)

    def resolve(self, ref):
        if not ref.startswith("#/"):
            raise SchemaError(f"only local $ref are supported, not {ref!r}")
        node = self.doc
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            try:
                node = node[part]
            except (KeyError, TypeError):
                raise SchemaError(f"$ref {ref!r} does not resolve") from None
        return node

    def ref(self, ref):
        fn = self.refs.get(ref)
        if fn is None:
            box = []
            self.refs[ref] = lambda v, p: box[0](v, p)  # placeholder for recursive types
            fn = self.compile(self.resolve(ref))
            box.append(fn)
            self.refs[ref] = fn
        return fn

    def compile(self, s):
        if s is True:
            return lambda v, p: v
        if s is False:
            def never(v, p):
                raise Violation(p, "false", "no value is allowed here")
            return never
        if not isinstance(s, dict):
            raise SchemaError(f"a schema must be an object or a boolean, not {s!r}")
        unknown = set(s) - SUPPORTED
        if unknown:
            raise SchemaError(f"unsupported schema keywords {sorted(unknown)}")
        checks = []  # functions (v, p) -> v'  (v' is v unless a wire decode applied)
        if "$ref" in s:
            checks.append(self.ref(s["$ref"]))
        if "type" in s:
            types = s["type"] if isinstance(s["type"], list) else [s["type"]]
            for t in types:
                _is_type(None, t)  # reject unknown type names now

            def type_error(v, p, types=types):
                raise Violation(p, "type", f"expected {' or '.join(types)}, got {json_type(v)} {_short(v)}")

            exact = {"string": str, "integer": int, "boolean": bool, "object": dict}
            if len(types) == 1 and types[0] in exact:
                # the common case, specialised: SR.ls of 10,000 volumes runs ~150,000 of these
                cls = exact[types[0]]

                def check_type(v, p):
                    if type(v) is cls:
                        return v
                    type_error(v, p)
            else:
                def check_type(v, p):
                    for t in types:
                        if _is_type(v, t):
                            return v
                    type_error(v, p)
            checks.append(check_type)
        if "const" in s:
            c = s["const"]

            def check_const(v, p):
                if not _json_equal(v, c):
                    raise Violation(p, "const", f"expected {_short(c)}, got {_short(v)}")
                return v
            checks.append(check_const)
        if "enum" in s:
            allowed = s["enum"]

            def check_enum(v, p):
                if not any(_json_equal(v, a) for a in allowed):
                    raise Violation(p, "enum", f"expected one of {_short(allowed)}, got {_short(v)}")
                return v
            checks.append(check_enum)
        if "minimum" in s or "maximum" in s:
            lo, hi = s.get("minimum"), s.get("maximum")

            def check_range(v, p):
                if _is_type(v, "number"):
                    if lo is not None and v < lo:
                        raise Violation(p, "minimum", f"{v} is less than the minimum {lo}")
                    if hi is not None and v > hi:
                        raise Violation(p, "maximum", f"{v} is more than the maximum {hi}")
                return v
            checks.append(check_range)
        if "pattern" in s:
            pattern = s["pattern"]

            def check_pattern(v, p):
                if type(v) is str:
                    import re  # only strings that must match a pattern pay for `re`
                    if not re.search(pattern, v):
                        raise Violation(p, "pattern", f"{_short(v)} does not match {pattern}")
                return v
            checks.append(check_pattern)
        if any(k in s for k in ("properties", "required", "additionalProperties")):
            checks.append(self.object(s))
        if any(k in s for k in ("items", "prefixItems", "minItems", "maxItems")):
            checks.append(self.array(s))
        if "allOf" in s:
            subs = [self.compile(x) for x in s["allOf"]]

            def check_all(v, p):
                for f in subs:
                    v = f(v, p)
                return v
            checks.append(check_all)
        if "if" in s:
            checks.append(self.conditional(s))
        if "anyOf" in s:
            checks.append(self.alternatives(s["anyOf"], "anyOf", exactly_one=False))
        if "oneOf" in s:
            checks.append(self.alternatives(s["oneOf"], "oneOf", exactly_one=True))
        if s.get("x-wire-decode") == "integer":
            if "anyOf" not in s:
                raise SchemaError("x-wire-decode needs an anyOf whose first branch is the integer type")
            as_int = self.compile(s["anyOf"][0])
            inner = list(checks)

            def decode_int(v, p):
                try:
                    for f in inner:
                        v = f(v, p)
                except Violation as e:
                    if e.path != _unlink(p):
                        raise
                    raise Violation(p, "type", "expected an integer (or a string of decimal digits), "
                                    f"got {json_type(v)} {_short(v)}") from None
                if type(v) is str:
                    v = as_int(int(v.strip()), p)
                return v
            return decode_int
        if not checks:
            return lambda v, p: v
        if len(checks) == 1:
            return checks[0]

        def check_all_keywords(v, p):
            for f in checks:
                v = f(v, p)
            return v
        return check_all_keywords

    def object(self, s):
        props = {k: self.compile(sub) for k, sub in s.get("properties", {}).items()}
        required = list(s.get("required", ()))
        extra = s.get("additionalProperties", True)
        extra_fn = None if extra is True else (False if extra is False else self.compile(extra))

        def check_object(v, p):
            if type(v) is not dict:
                return v  # "type" says what v must be; these keywords only apply to objects
            for k in required:
                if k not in v:
                    raise Violation((p, k), "required", f"the field {k!r} is missing")
            out = None
            for k, x in v.items():
                if type(k) is not str:
                    raise Violation(p, "type", f"object keys must be strings, got {json_type(k)} {k!r}")
                f = props.get(k)
                if f is None:
                    if extra_fn is None:
                        continue
                    if extra_fn is False:
                        raise Violation((p, k), "additionalProperties", f"unknown field {k!r}")
                    f = extra_fn
                if x is None and f is not None and k not in required and props.get(k) is not None:
                    raise Violation((p, k), "type",
                                    f"optional field {k!r} is null: omit it instead (the daemon cannot read null)")
                y = f(x, (p, k))
                if y is not x:
                    if out is None:
                        out = dict(v)
                    out[k] = y
            return v if out is None else out
        return check_object

    def array(self, s):
        prefix = [self.compile(x) for x in s.get("prefixItems", ())]
        items = s.get("items", True)
        items_fn = None if items is True else (False if items is False else self.compile(items))
        lo, hi = s.get("minItems"), s.get("maxItems")

        def check_array(v, p):
            if type(v) is not list and type(v) is not tuple:
                return v
            n = len(v)
            if lo is not None and n < lo:
                raise Violation(p, "minItems", f"expected at least {lo} items, got {n}")
            if hi is not None and n > hi:
                raise Violation(p, "maxItems", f"expected at most {hi} items, got {n}")
            out = None
            for i, x in enumerate(v):
                if i < len(prefix):
                    f = prefix[i]
                elif items_fn is None:
                    continue
                elif items_fn is False:
                    raise Violation((p, i), "items", f"expected at most {len(prefix)} items, got {n}")
                else:
                    f = items_fn
                y = f(x, (p, i))
                if y is not x:
                    if out is None:
                        out = list(v)
                    out[i] = y
            return v if out is None else (out if type(v) is list else tuple(out))
        return check_array

    def conditional(self, s):
        """if/then/else: the value is checked against `then` if it matches `if`, else against
        `else`. A failure names the field and the rule, plus the node's description (why)."""
        cond = self.compile(s["if"])
        then_fn = self.compile(s["then"]) if "then" in s else None
        else_fn = self.compile(s["else"]) if "else" in s else None
        why = s.get("description", "")

        def check_conditional(v, p):
            try:
                cond(v, p)
                f = then_fn
            except Violation:
                f = else_fn
            if f is None:
                return v
            try:
                return f(v, p)
            except Violation as e:
                raise Violation(e.path, e.rule, f"{e.message}: {why}" if why else e.message) from None
        return check_conditional

    def alternatives(self, branches, rule, exactly_one):
        subs = [(self.compile(b), b) for b in branches]
        tags = [_tag_of(b) for b in branches]

        def check_alternatives(v, p):
            ok, errors = [], []
            for f, _ in subs:
                try:
                    ok.append(f(v, p))
                except Violation as e:
                    errors.append(e)
                if ok and not exactly_one:
                    return ok[0]
            if len(ok) == 1:
                return ok[0]
            if len(ok) > 1:
                raise Violation(p, rule, f"{_short(v)} matches {len(ok)} alternatives, expected exactly one")
            # A variant: if the value names a known tag, the error is in that tag's argument.
            tag = v if type(v) is str else (v[0] if type(v) in (list, tuple) and v and type(v[0]) is str else None)
            if tag is not None and tag in tags:
                branch = branches[tags.index(tag)]
                if type(v) is not str and isinstance(branch, dict) and "const" in branch:
                    raise Violation(p, "const", f"{tag} takes no argument: write the string "
                                    f"{_short(tag)}, not {_short(v)}")
                if type(v) is str and isinstance(branch, dict) and "prefixItems" in branch:
                    raise Violation(p, "type", f"{tag} takes an argument: write [{_short(tag)}, ...], "
                                    f"not {_short(v)}")
                return _raise(errors[tags.index(tag)])
            if any(t is not None for t in tags):
                names = ", ".join(t for t in tags if t is not None)
                raise Violation(p, rule, f"expected a variant, one of: {names}; got {_short(v)}")
            deepest = max(errors, key=lambda e: len(e.path))
            if len(deepest.path) > len(_unlink(p)):
                raise deepest
            raise Violation(p, rule, f"{_short(v)} matches none of the alternatives: "
                            + "; ".join(e.message for e in errors))
        return check_alternatives


def _raise(e):
    raise e


def _tag_of(branch):
    """The constructor name of a variant branch: {"const": T} or [{"const": T}, arg]."""
    if isinstance(branch, dict):
        if isinstance(branch.get("const"), str):
            return branch["const"]
        pre = branch.get("prefixItems")
        if pre and isinstance(pre[0], dict) and isinstance(pre[0].get("const"), str):
            return pre[0]["const"]
    return None


class Method:
    """One method of an interface, e.g. Volume.create."""

    def __init__(self, interface, name, node):
        self.interface = interface
        self.name = name
        self.wire_name = f"{interface.name}.{name}"
        self.node = node
        self.description = node.get("description", "")
        self.params_schema = node["params"]
        self.result_schema = node["result"]
        self.param_names = list(self.params_schema["properties"])
        self._params = self._result = None

    def check_params(self, value):
        """Validate a request object; return it with wire decodes applied (a new dict of
        exactly the interface's parameters, unknown ones dropped). Raises Violation."""
        if self._params is None:
            self._params = self.interface.compiler.compile(self.params_schema)
        v = self._params(value, ())
        return {k: v[k] for k in self.param_names}

    def check_result(self, value):
        """Validate a result; raises Violation."""
        if self._result is None:
            self._result = self.interface.compiler.compile(self.result_schema)
        self._result(value, ())
        return value

    def __repr__(self):
        return f"<Method {self.wire_name}>"


class Interface:
    def __init__(self, name, doc):
        self.name = name
        self.doc = doc
        self.compiler = _Compiler(doc)
        self.methods = {m: Method(self, m, node) for m, node in doc["methods"].items()}
        self._lower = {m.lower(): m for m in self.methods}

    def method(self, name):
        """The method named `name`, case-insensitively (Plugin.Query -> query), or None."""
        m = self._lower.get(name.lower())
        return self.methods[m] if m else None

    def __repr__(self):
        return f"<Interface {self.name}>"


_loaded = {}
_LOWER = {i.lower(): i for i in INTERFACES}


def load_doc(name):
    with open(os.path.join(SCHEMA_DIR, name + ".json"), "rb") as f:
        return jsonio.loads(f.read().decode("utf-8"))


def interface(name):
    """The Interface called `name` (case-insensitive), loaded once; KeyError if unknown."""
    canonical = _LOWER[name.lower()]
    itf = _loaded.get(canonical)
    if itf is None:
        itf = _loaded[canonical] = Interface(canonical, load_doc(canonical))
    return itf


def lookup(wire_name):
    """The Method for an executable or RPC name such as "Plugin.Query" or "volume.CREATE",
    or None if there is no such method."""
    itf_name, dot, meth = wire_name.partition(".")
    if not dot or itf_name.lower() not in _LOWER:
        return None
    return interface(itf_name).method(meth)


# ---------------------------------------------------------------------------------------
# Describing types (for --help and the generated docs)

_SCALARS = {"string": "string", "integer": "integer", "number": "float", "boolean": "bool",
            "null": "unit (null)"}


def type_name(itf, node):
    """A short name for the type of a schema node, in the interface's terms:
    "int64", "volume", "string list", "(string, string) map", "volume_type (variant)", ..."""
    if not isinstance(node, dict):
        return "any"
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        if name.endswith("_in"):
            name = name[:-3]
        return name
    if "allOf" in node and len(node["allOf"]) == 1:
        return type_name(itf, node["allOf"][0])
    if node.get("x-wire-decode") == "integer":
        return type_name(itf, node["anyOf"][0])
    if "oneOf" in node:
        return "variant"
    t = node.get("type")
    if t == "array":
        if "prefixItems" in node:
            return "(" + ", ".join(type_name(itf, x) for x in node["prefixItems"]) + ")"
        return type_name(itf, node.get("items", {})) + " list"
    if t == "object":
        if "properties" in node:
            return "record"
        return "(string, " + type_name(itf, node.get("additionalProperties", {})) + ") map"
    if "const" in node:
        return jsonio.dumps(node["const"])
    return _SCALARS.get(t, str(t))


def describe(itf, node):
    """The description of a node, or of what its $ref names."""
    if not isinstance(node, dict):
        return ""
    if node.get("description"):
        return node["description"]
    if "$ref" in node:
        try:
            return describe(itf, itf.compiler.resolve(node["$ref"]))
        except SchemaError:
            return ""
    return ""
