"""Helpers of the SDK tests: toy plugins (tests/sdk/toyplugins), the real installer, and
running executables exactly as xapi-storage-script does."""

import json
import os
import subprocess
import sys

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
    cmd = [sys.executable, "-m", "xapi_storage.cli", "install", "--root", str(root)]
    for p in plugins:
        cmd += ["--plugin", p]
    if uninstall:
        cmd.append("--uninstall")
    cmd += list(extra)
    return subprocess.run(cmd, capture_output=True, text=True, env=plugin_env(), timeout=120)


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
                          capture_output=True, env=env or plugin_env(), timeout=60)
    proc.stdout = proc.stdout.decode()
    proc.stderr = proc.stderr.decode(errors="replace")
    return Outcome(proc, parse)


_error_validator = None


def assert_error_record(value, code=None, first=None):
    """The value is a valid error record (schemas/error.json), with lines and files alike."""
    global _error_validator
    import jsonschema
    if _error_validator is None:
        with open(os.path.join(REPO, "schemas", "error.json")) as f:
            _error_validator = jsonschema.Draft202012Validator(json.load(f))
    _error_validator.validate(value)
    assert len(value["backtrace"]["files"]) == len(value["backtrace"]["lines"])
    if code is not None:
        assert value["code"] == code
    if first is not None:
        assert value["params"][0] == first, value
