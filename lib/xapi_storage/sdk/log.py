"""Logging for plugins: syslog facility local2 (SMlog on XenServer / XCP-ng), and stderr
when asked. Cheap: no `logging` import (it costs about 20 ms per process).

Lines look like the reference bindings' ones, plus the request id (the first line of dbg):

    SMAPIv3: [1234] - INFO - OpaqueRef:5c0a... - Volume.create: created vol-1

Environment:
    XAPI_STORAGE_LOG_STDERR=1       also write every line to stderr (the daemon logs a failed
                                    call's stderr; handy by hand and in tests)
    XAPI_STORAGE_LOG_LEVEL=LEVEL    threshold for both sinks: debug (default), info, warning,
                                    error
    XAPI_STORAGE_SYSLOG=0           do not write to syslog

If the plugin (or a library it uses) imported the standard `logging` package, the SDK adds a
handler to the root logger that forwards records here (see bridge_stdlib_logging).

Use:  from xapi_storage.sdk import log;  log.info("created %s", key)
"""

import os
import sys

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
_NAMES = {DEBUG: "DEBUG", INFO: "INFO", WARNING: "WARNING", ERROR: "ERROR"}
_LEVELS = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR}
# syslog priorities (syslog.LOG_*), without importing syslog until the first line
_PRIO = {DEBUG: 7, INFO: 6, WARNING: 4, ERROR: 3}
_LOCAL2 = 18 << 3

_state = {"request": "-", "method": "", "syslog": None, "configured": False}


def _configure():
    env = os.environ
    _state["stderr"] = env.get("XAPI_STORAGE_LOG_STDERR", "") not in ("", "0")
    _state["level"] = _LEVELS.get(env.get("XAPI_STORAGE_LOG_LEVEL", "debug").lower(), DEBUG)
    _state["use_syslog"] = env.get("XAPI_STORAGE_SYSLOG", "1") != "0"
    _state["configured"] = True


def request_id(dbg):
    """The part of dbg to log: its first line (dbg may carry a trace context after a newline)."""
    if not isinstance(dbg, str):
        return "-"
    return dbg.split("\n", 1)[0][:200] or "-"


def set_context(dbg=None, method=None):
    """Tag the following lines with the request id (first line of dbg) and the method."""
    if dbg is not None:
        _state["request"] = request_id(dbg)
    if method is not None:
        _state["method"] = method


def format_line(level, msg):
    method = _state["method"]
    return (f"[{os.getpid()}] - {_NAMES.get(level, level)} - {_state['request']} - "
            f"{method + ': ' if method else ''}{msg}")


def emit(level, msg, *args):
    if not _state["configured"]:
        _configure()
    if level < _state["level"]:
        return
    if args:
        try:
            msg = msg % args
        except (TypeError, ValueError):
            msg = f"{msg} {args!r}"
    line = format_line(level, msg)
    if _state["use_syslog"]:
        s = _state["syslog"]
        if s is None:
            import syslog as s
            s.openlog("SMAPIv3", 0, _LOCAL2)
            _state["syslog"] = s
        # one syslog line per text line, so multi-line messages stay readable in SMlog
        for part in line.split("\n"):
            s.syslog(_LOCAL2 | _PRIO.get(level, 7), part)
    if _state["stderr"]:
        try:
            sys.stderr.write("SMAPIv3: " + line + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def debug(msg, *args):
    emit(DEBUG, msg, *args)


def info(msg, *args):
    emit(INFO, msg, *args)


def warning(msg, *args):
    emit(WARNING, msg, *args)


def error(msg, *args):
    emit(ERROR, msg, *args)


def bridge_stdlib_logging():
    """If `logging` is already imported, send its records (from the root logger down) here.
    Never imports `logging` itself. Idempotent."""
    logging = sys.modules.get("logging")
    if logging is None or _state.get("bridged"):
        return
    _state["bridged"] = True

    class _Forward(logging.Handler):
        def emit(self, record):
            try:
                level = (ERROR if record.levelno >= 40 else WARNING if record.levelno >= 30
                         else INFO if record.levelno >= 20 else DEBUG)
                emit(level, "%s: %s", record.name, record.getMessage())
            except Exception:  # never let logging break a call
                pass

    root = logging.getLogger()
    root.addHandler(_Forward())
    if root.level == logging.WARNING and not root.handlers[:-1]:
        root.setLevel(logging.DEBUG)
