"""Helpers of the SDK tests: toy plugins (tests/sdk/toyplugins), the real installer, and
running executables exactly as xapi-storage-script does."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TOYS = os.path.join(HERE, "toyplugins")
REPO = os.path.dirname(os.path.dirname(HERE))
if TOYS not in sys.path:
    sys.path.insert(0, TOYS)

TOY = "org.xen.xapi.storage.toy"


def plugin_env(**extra):
    """The environment of a plugin process: the daemon's, plus where the toy modules are,
    and no syslog (tests must not write to the host's log)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([TOYS] + [p for p in [env.get("PYTHONPATH")] if p])
    env["XAPI_STORAGE_SYSLOG"] = "0"
    env.pop("XAPI_STORAGE_LOG_STDERR", None)
    env.update(extra)
    return env


def install(root, *plugins, uninstall=False, extra=()):
    # the toys live on the tests' PYTHONPATH, which observer mode replaces: its check has its
    # own tests (test_installer.py)
    cmd = [sys.executable, "-m", "xapi_storage.cli", "install", "--root", str(root),
           "--observer-python", "none"]
    for p in plugins:
        cmd += ["--plugin", p]
    if uninstall:
        cmd.append("--uninstall")
    cmd += list(extra)
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=plugin_env(), timeout=120)


TOY_PLUGINS = (f"volume:{TOY}=sdk_toy", "datapath:toydp=sdk_toy_dp")


class Outcome:
    def __init__(self, proc, parse=True):
        self.rc = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        # stdout must be exactly one JSON value (the daemon's parser is strict)
        self.value = json.loads(proc.stdout) if parse and proc.stdout.strip() else None

    def __repr__(self):
        return f"<rc={self.rc} stdout={self.stdout!r} stderr={self.stderr[-2000:]!r}>"


def run_exe(path, request=None, args=("--json",), stdin=None, env=None, parse=True):
    """Run an executable as the daemon does: argv [path, "--json"], the request as JSON on
    stdin (no trailing newline), stdout captured."""
    if stdin is None:
        stdin = json.dumps(request) if request is not None else ""
    proc = subprocess.run([str(path), *args], input=stdin.encode() if isinstance(stdin, str) else stdin,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env or plugin_env(), timeout=60)
    proc.stdout = proc.stdout.decode()
    proc.stderr = proc.stderr.decode(errors="replace")
    return Outcome(proc, parse)


def reference_jsonschema(module_level=False):
    """jsonschema with draft 2020-12 (release 4.0 on), the reference the SDK's own validator
    is checked against. Python 3.6's last jsonschema is 3.2 (draft 7 at most): there the test
    skips, loudly, and the same test runs against the reference on the run's newer Pythons
    (`make test` runs the fast suite on 3.6, the default python3 and 3.12)."""
    import jsonschema
    if not hasattr(jsonschema, "Draft202012Validator"):
        pytest.skip("REFERENCE VALIDATOR NOT AVAILABLE on Python %d.%d: jsonschema %s has no "
                    "draft 2020-12 (it needs jsonschema 4, Python 3.7+); this test runs on the "
                    "newer Pythons" % (sys.version_info[:2] + (jsonschema.__version__,)),
                    allow_module_level=module_level)
    return jsonschema


def has_reference_jsonschema():
    import jsonschema
    return hasattr(jsonschema, "Draft202012Validator")


def reference(itf, part, method):
    """jsonschema's validator of one method's params or result, told the wire's one rule it
    does not know: an integer is a JSON number without fraction (3.0 is not an int on the
    wire). Skips where there is no jsonschema 4 (see reference_jsonschema)."""
    jsonschema = reference_jsonschema()
    from referencing import Registry, Resource  # jsonschema 4.18 on
    checker = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda checker, v: type(v) is int)
    wire = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=checker)
    doc = itf.doc
    registry = Registry().with_resource(doc["$id"], Resource.from_contents(doc))
    return wire({"$ref": f"{doc['$id']}#/methods/{method}/{part}"}, registry=registry)


# the keywords of schemas/error.json: all mean the same in drafts 7 and 2020-12
_DRAFT7_SAFE = {"$schema", "$id", "title", "description", "type", "required", "properties",
                "additionalProperties", "items"}
_error_validator = None


def _walk_keywords(node, out):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "properties":
                for sub in v.values():
                    _walk_keywords(sub, out)
            else:
                out.add(k)
                _walk_keywords(v, out)
    return out


def assert_error_record(value, code=None, first=None):
    """The value is a valid error record (schemas/error.json), with lines and files alike.
    Checked with jsonschema's draft 2020-12 validator, or with its draft 7 one where only
    jsonschema 3.2 exists (Python 3.6): error.json uses no keyword whose meaning differs."""
    global _error_validator
    import jsonschema
    if _error_validator is None:
        with open(os.path.join(REPO, "schemas", "error.json")) as f:
            doc = json.load(f)
        if hasattr(jsonschema, "Draft202012Validator"):
            _error_validator = jsonschema.Draft202012Validator(doc)
        else:
            assert _walk_keywords(doc, set()) <= _DRAFT7_SAFE, "error.json: check with draft 7"
            _error_validator = jsonschema.Draft7Validator(doc)
    _error_validator.validate(value)
    assert len(value["backtrace"]["files"]) == len(value["backtrace"]["lines"])
    if code is not None:
        assert value["code"] == code
    if first is not None:
        assert value["params"][0] == first, value
