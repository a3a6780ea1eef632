"""How the conformance run reaches a plugin: through its executables, as the daemon does.

The checks only see `Caller.call(method, params)` (JSON mode, what xapi-storage-script uses) and
`Caller.call_cli(method, args)` (command-line mode, what static-vdis uses), each returning an
`Outcome`. The convention itself (argv [path, "--json"], cwd /, the request on stdin then EOF,
the call done only when stdout and stderr reach EOF and the process exited, case-insensitive
lookup of the executable) and the daemon's reading of the answer (SCRIPT_FAILED, SCRIPT_MISSING,
the plugin's error record) are xapi_storage.toolstack.daemon's, the project's one emulation of
xapi-storage-script: the Outcome keeps the raw exit status and output as well, for the checks
that look at them.

Unlike the daemon, the caller never waits forever: a call that does not finish within `timeout`
seconds has its whole session killed and is reported as such.
"""

import os
import time

from ..sdk import jsonio
from ..toolstack import daemon


class Outcome:
    """What one call gave: exit status, raw stdout/stderr, and the parsed stdout.

    `value` is the parsed JSON (None if stdout was not one strict JSON value: `parse_error`
    then says why); `ok` is exit status 0 with a parsed value; `record` is the error record
    when the exit status is not 0 and stdout parsed as an object."""

    def __init__(self, method, request, rc, stdout, stderr, seconds, timed_out=False,
                 argv=None):
        self.method = method
        self.request = request
        self.argv = argv
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        self.seconds = seconds
        self.timed_out = timed_out
        self.value = None
        self.parse_error = None
        self.xapi_sees = None    # (code, params) the daemon raises to xapi for a failure
        self.daemon_error = None  # that failure, as toolstack.daemon raises it
        try:
            self.value = jsonio.loads(stdout)
        except (jsonio.JSONError, ValueError) as e:
            self.parse_error = str(e)

    @property
    def ok(self):
        return self.rc == 0 and self.parse_error is None

    @property
    def record(self):
        if self.rc != 0 and isinstance(self.value, dict):
            return self.value
        return None

    def error_name(self):
        """params[0] of the error record (e.g. "Volume_does_not_exist"), or None."""
        rec = self.record
        params = rec.get("params") if rec else None
        if isinstance(params, list) and params and isinstance(params[0], str):
            return params[0]
        return None

    def describe(self, limit=400):
        """One line for a report: the call and what came back."""
        if self.argv is not None:
            call = " ".join([self.method] + list(self.argv))
        else:
            req = self.request if isinstance(self.request, str) else jsonio.dumps(self.request)
            call = f"{self.method} {_short(req, limit // 2)}"
        if self.timed_out:
            return f"{call} -> no answer within the timeout (process group killed)"
        if self.rc < 0:
            got = f"killed by signal {-self.rc}"
        else:
            got = f"exit {self.rc}"
        out = self.stdout.strip()
        rec = self.record
        if rec is not None and "code" in rec and "params" in rec:
            # the record's backtrace is for logs: the code and params say what went wrong
            out = jsonio.dumps({"code": rec["code"], "params": rec["params"]}) + " (backtrace omitted)"
        text = f"{call} -> {got}, stdout {_short(out, limit) if out else '(empty)'}"
        if self.xapi_sees is not None and self.xapi_sees[0].startswith("SCRIPT_"):
            text += f"; xapi sees {self.xapi_sees[0]}"
        if self.rc != 0 and self.stderr.strip():
            text += f", stderr ...{self.stderr.strip()[-limit // 2:]}"
        return text


def _short(text, limit):
    return text if len(text) <= limit else text[:limit] + "..."


def find_executable(plugin_dir, method):
    """The executable for `method` in plugin_dir, found as the daemon finds it, or None."""
    try:
        return daemon.find_executable(plugin_dir, method)
    except daemon.ScriptError:
        return None


class Caller:
    """Run a plugin's executables as the daemon does. `env` is the environment of every call
    (default: this process's, as the daemon passes its own)."""

    def __init__(self, plugin_dir, timeout=60.0, env=None):
        self.plugin_dir = os.path.abspath(plugin_dir)
        self.timeout = timeout
        self.env = env
        self.calls = []          # every Outcome, in order (the run's log)
        self.others = {}         # {directory: Caller} of the other plugins a Daemon called

    def has(self, method):
        return find_executable(self.plugin_dir, method) is not None

    def call(self, method, params):
        """JSON mode: argv [path, "--json"], the request as one line on stdin."""
        return self._run(method, ["--json"], jsonio.dumps(params).encode("utf-8"), params, None)

    def call_stdin(self, method, data):
        """JSON mode with `data` (bytes) as stdin, as it is: for requests that are not JSON."""
        return self._run(method, ["--json"], data, data.decode("utf-8", "replace"), None)

    def call_cli(self, method, args):
        """Command-line mode (static-vdis): positional arguments, nothing on stdin."""
        return self._run(method, list(args), b"", None, list(args))

    def _run(self, method, args, stdin, request, shown_argv):
        t0 = time.monotonic()
        try:
            path = daemon.find_executable(self.plugin_dir, method)
        except daemon.ScriptError as e:
            out = Outcome(method, request, 127, "", str(e), 0.0, argv=shown_argv)
            out.xapi_sees, out.daemon_error = (e.code, e.params), e
            self.calls.append(out)
            return out
        timed_out = False
        try:
            rc, stdout, stderr = daemon._communicate([path] + args, stdin, self.timeout,
                                                     self.env)
        except daemon.ScriptTimeout as e:
            rc, stdout, stderr, timed_out = -9, e.params[2], e.stderr, True
        out = Outcome(method, request, rc, stdout, stderr, time.monotonic() - t0, timed_out,
                      argv=shown_argv)
        if timed_out:
            out.daemon_error = daemon.ScriptTimeout("SCRIPT_TIMEOUT", [path, "timed out"], path,
                                                    stderr)
        else:
            try:
                daemon._outcome(path, rc, stdout, stderr)
            except daemon.ScriptError as e:
                out.daemon_error = e
                out.xapi_sees = (e.code, e.params)
        self.calls.append(out)
        return out

    def runner(self, script_dir, name, params, timeout=None, env=None):
        """The runner of a toolstack.daemon.Daemon (its calls then land in `calls` too):
        the decoded result, or the daemon's ScriptError."""
        if os.path.abspath(script_dir) != self.plugin_dir:
            d = os.path.abspath(script_dir)
            other = self.others.get(d)
            if other is None:
                other = self.others[d] = Caller(d, self.timeout, self.env)
            return other.runner(d, name, params)
        out = self.call(name, params)
        if out.daemon_error is not None:
            raise out.daemon_error
        return out.value
