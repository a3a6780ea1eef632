"""`xapi-storage conformance`: check an installed plugin through its executables.

    from xapi_storage.conformance import run, Options
    report = run("/usr/libexec/xapi-storage-script/volume/org.xen.xapi.storage.acme",
                 Options(configuration={"path": "/srv/acme"}))
    print(report.table()); report.failed  # -> [Result]

The run calls the plugin only as the daemon does (caller.py), makes an SR and volumes, runs the
checks of checks.py in order (each gated on the executables and features the plugin has), and
always ends by destroying what it made, even when a check failed or the run was interrupted.
A datapath plugin's directory (ROOT/datapath/<scheme>) gets the checks of datapath.py instead,
on the URIs of Options(uris=[...]).
"""

import os
import signal
import threading
import time

from . import checks as _checks
from .caller import Caller
from .checks import CHECKS, Options
from .datapath import DATAPATH_CHECKS, DatapathContext, SetupError

__all__ = ["run", "Options", "Report", "Result", "CHECKS", "DATAPATH_CHECKS", "plugin_kind",
           "checks_for", "SetupError"]

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


class Result:
    def __init__(self, name, status, detail, seconds, calls):
        self.name, self.status, self.detail = name, status, detail
        self.seconds, self.calls = seconds, calls

    def __repr__(self):
        return f"<Result {self.name} {self.status}: {self.detail}>"


class Report:
    """The outcome of a run: `results` (one per check), `plugin` (its Plugin.Query or None),
    `teardown` (problems met while removing what the run made)."""

    def __init__(self, plugin_dir, query, results, teardown, seconds):
        self.plugin_dir, self.query, self.results = plugin_dir, query, results
        self.teardown, self.seconds = teardown, seconds

    @property
    def failed(self):
        return [r for r in self.results if r.status == FAIL]

    @property
    def passed(self):
        return [r for r in self.results if r.status == PASS]

    @property
    def ok(self):
        return not self.failed and not self.teardown

    def assert_ok(self):
        """Raise AssertionError with the table unless every check passed or was skipped and
        the teardown removed everything (for tests)."""
        if not self.ok:
            raise AssertionError("conformance failed:\n" + self.table())
        return self

    def table(self):
        from .report import table
        return table(self)

    def junit(self):
        from .report import junit
        return junit(self)


def plugin_kind(plugin_dir):
    """("volume", srtype) or ("datapath", scheme) from an installed plugin directory's path,
    or (None, None) if its parent is neither."""
    d = os.path.abspath(plugin_dir)
    parent, name = os.path.basename(os.path.dirname(d)), os.path.basename(d)
    if parent == "volume":
        prefix = "org.xen.xapi.storage."
        return "volume", (name[len(prefix):] if name.startswith(prefix) else None)
    if parent == "datapath":
        return "datapath", name
    return None, None


def checks_for(kind):
    """The checks of a run against a plugin of `kind` ("volume" or "datapath")."""
    return DATAPATH_CHECKS if kind == "datapath" else CHECKS


def run(plugin_dir, options=None, progress=None):
    """Run the checks against the plugin installed in `plugin_dir` (a volume plugin, or a
    datapath plugin with options.uris); return a Report. `progress(result)` is called after
    each check. SetupError (after removing what the run made) when a datapath plugin's run
    cannot make its scratch storage."""
    options = options or Options()
    t0 = time.monotonic()
    kind, name = plugin_kind(plugin_dir)
    results = []
    teardown = []
    if kind == "datapath":
        ctx = DatapathContext(plugin_dir, options)
    else:
        caller = Caller(plugin_dir, timeout=options.timeout, env=options.env)
        ctx = _checks.Context(caller, options, name if kind == "volume" else None)
    try:
        ctx.setup()
        for chk in checks_for(kind):
            if options.only and chk.name not in options.only and chk.name != "results-valid":
                continue
            results.append(_run_check(ctx, chk))
            if progress is not None:
                progress(results[-1])
    finally:
        ctx.check_name = "teardown"
        with _signals_held():
            teardown = ctx.teardown()
    return Report(os.path.abspath(plugin_dir), ctx.query, results, teardown,
                  time.monotonic() - t0)


class _signals_held:
    """SIGINT, SIGTERM and SIGHUP wait until the block is done (the teardown: every call in it
    has the run's timeout), then are sent again to this process under their own handlers: a
    second Ctrl-C or a CI job's repeated SIGTERM cannot cut the teardown short and leave a
    volume plugged, a loop device or a scratch file behind. Outside the main thread (where
    Python cannot set handlers) the block runs as it is."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __enter__(self):
        self.held, self.previous = [], {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._hold)
        return self

    def _hold(self, signum, frame):
        self.held.append(signum)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        for sig in sorted(set(self.held)):
            os.kill(os.getpid(), sig)
        return False


def _run_check(ctx, chk):
    ctx.check_name = chk.name
    before = len(ctx.caller.calls)
    t0 = time.monotonic()
    missing = [m for m in chk.needs if not ctx.caller.has(m)]
    unfeatured = [f for f in chk.features if f not in ctx.features]
    if missing:
        status, detail = SKIP, f"no executable {', '.join(missing)}"
    elif unfeatured:
        status, detail = SKIP, f"Plugin.Query does not declare {', '.join(unfeatured)}"
    else:
        try:
            chk.fn(ctx)
            status, detail = PASS, ""
        except _checks.Skipped as e:
            status, detail = SKIP, str(e)
        except _checks.Failed as e:
            status, detail = FAIL, str(e)
        except Exception as e:  # noqa: BLE001 - a bug of the check or an OS error: say it
            status, detail = FAIL, f"the check itself failed: {type(e).__name__}: {e}"
    return Result(chk.name, status, detail, time.monotonic() - t0, len(ctx.caller.calls) - before)
