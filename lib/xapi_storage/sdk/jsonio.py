"""Strict JSON in and out, without importing the `json` package on the happy path.

Why: every plugin call is a new Python process, and `import json` costs about 7 ms, mostly
for `re` and `enum` (measured with `python -X importtime`; see docs/sdk.md). The C
accelerator `_json` that `json` itself uses needs neither, so this module drives it
directly and falls back to `json` where `_json` is missing (e.g. PyPy).

Strict means what the daemon's parser means: one JSON value, surrounded only by JSON
whitespace; no NaN or Infinity either way; and, on input, no object with a duplicate key
(ambiguous: which one did the caller mean?).
"""

_WS = " \t\n\r"


class JSONError(ValueError):
    """Text that is not one strict JSON value. `pos` is a character offset."""

    def __init__(self, msg, pos=None):
        super().__init__(msg if pos is None else f"{msg} (at character {pos})")
        self.pos = pos


def _no_constant(name):
    raise JSONError(f"{name} is not JSON")


def _pairs(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise JSONError(f"duplicate key {k!r} in an object")
            seen.add(k)
    return d


def _finite_float(text):
    f = float(text)
    if f - f != 0.0:  # inf (NaN cannot be spelt as a number)
        raise JSONError(f"number {text} is out of range")
    return f


class _Context:
    """The attributes _json.make_scanner reads (those of json.JSONDecoder)."""
    strict = True
    object_hook = None
    object_pairs_hook = staticmethod(_pairs)
    parse_float = staticmethod(_finite_float)
    parse_int = int
    parse_constant = staticmethod(_no_constant)
    memo = None


def _default(o):
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


try:
    from _json import encode_basestring_ascii as _esc
    from _json import make_encoder as _make_encoder
    from _json import make_scanner as _make_scanner

    _scan = _make_scanner(_Context())
    _encode = _make_encoder(None, _default, _esc, None, ":", ",", False, False, False)
except (ImportError, TypeError):  # pragma: no cover - non-CPython
    _scan = _encode = None


def loads(text):
    """Parse `text` (str) as exactly one JSON value; raise JSONError otherwise."""
    if not isinstance(text, str):
        raise TypeError("loads() takes a str")
    start = len(text) - len(text.lstrip(_WS))
    end = len(text.rstrip(_WS))
    if start >= end:
        raise JSONError("no JSON value (empty input)", 0)
    if _scan is None:  # pragma: no cover
        return _loads_fallback(text, start, end)
    try:
        try:
            value, stop = _scan(text, start)
        except SystemError:
            # CPython < 3.12 raises its JSONDecodeError only if json.decoder is already
            # imported (else SystemError): import it, now that we are on the error path.
            import json.decoder  # noqa: F401
            value, stop = _scan(text, start)
    except StopIteration as e:
        raise JSONError("not JSON", e.value) from None
    except RecursionError:
        raise JSONError("JSON nested too deeply") from None
    except JSONError:
        raise
    except ValueError as e:  # json.JSONDecodeError (imported by _json on error only)
        raise JSONError(f"not JSON: {getattr(e, 'msg', e)}", getattr(e, "pos", None)) from None
    if stop != end:
        raise JSONError("junk after the JSON value", stop)
    return value


def _loads_fallback(text, start, end):  # pragma: no cover
    import json
    dec = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_no_constant,
                           parse_float=_finite_float)
    try:
        value, stop = dec.raw_decode(text, start)
    except json.JSONDecodeError as e:
        raise JSONError(f"not JSON: {e.msg}", e.pos) from None
    except RecursionError:
        raise JSONError("JSON nested too deeply") from None
    if stop != end:
        raise JSONError("junk after the JSON value", stop)
    return value


def dumps(value):
    """Compact ASCII JSON text of `value`; ValueError for NaN/Infinity, TypeError for
    values that are not JSON (tuples are written as arrays)."""
    if _encode is None:  # pragma: no cover
        import json
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    if isinstance(value, str):
        return _esc(value)
    return "".join(_encode(value, 0))
