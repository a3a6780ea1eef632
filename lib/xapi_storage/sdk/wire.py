"""The wire: run a plugin's classes exactly as xapi-storage-script calls its executables.

A plugin module exports

    IMPLEMENTATIONS = {"Plugin": MyPlugin, "SR": MySR, "Volume": MyVolume}   # volume plugin
    IMPLEMENTATIONS = {"Plugin": MyPlugin, "Datapath": MyDP, "Data": MyData}  # datapath plugin

(classes subclassing xapi_storage.sdk.base), and each executable is a shim that calls
`main("<module>")`. For one call, main:

 1. points file descriptor 1 at stderr, so that nothing but the one JSON value reaches the
    daemon (stray prints of the plugin, of libraries and of child processes go to stderr);
 2. finds the method from basename(argv[0]), case-insensitively (Plugin.Query -> Plugin.query);
 3. reads the request: with --json (or -j) ALL of stdin as one JSON object; otherwise the
    command-line form (positional arguments in the interface's order, dbg first; map
    arguments as --name KEY VALUE, repeatable); --help prints the method's documentation;
 4. validates the request against the schema (a violation is the caller's error:
    Invalid_request) and applies the wire decodes (digit strings to ints);
 5. instantiates the class with no arguments and calls the method with keyword arguments;
 6. validates the result (a violation is the plugin's bug: Invalid_result), writes it as
    one line of JSON on the real stdout and exits 0;
 on any error it writes the error record {"code", "params", "backtrace"} there instead and
 exits 1. Codes and params are documented in docs/sdk.md.

`call()` does steps 2 and 4-6 in-process and raises instead of writing the record.
"""

import os
import sys

from . import errors, jsonio, log, schema

USAGE_EXIT = 0


# ---------------------------------------------------------------------------------------
# Plugins and methods

def load_implementations(impl):
    """IMPLEMENTATIONS from a module name, a module, or the dict itself; checked.
    Raises PluginLoadError."""
    name = impl if isinstance(impl, str) else getattr(impl, "__name__", repr(impl))
    if isinstance(impl, str):
        try:
            __import__(impl)
            impl = sys.modules[impl]
        except BaseException as e:  # noqa: B902 - a plugin import may raise anything
            raise PluginLoadError(name, f"cannot import {name}: {type(e).__name__}: {e}") from e
    table = impl if isinstance(impl, dict) else getattr(impl, "IMPLEMENTATIONS", None)
    if not isinstance(table, dict) or not table:
        raise PluginLoadError(name, "the module has no IMPLEMENTATIONS dict "
                              "({'Plugin': class, 'SR': class, ...})")
    from . import base
    for itf, cls in table.items():
        if itf not in schema.INTERFACES:
            raise PluginLoadError(name, f"IMPLEMENTATIONS has {itf!r}, which is not an interface "
                                  f"(expected some of {', '.join(schema.INTERFACES)})")
        want = getattr(base, itf)
        if not (isinstance(cls, type) and issubclass(cls, want)):
            raise PluginLoadError(name, f"IMPLEMENTATIONS[{itf!r}] must be a subclass of "
                                  f"xapi_storage.sdk.base.{itf}, not {cls!r}")
    return table


PluginLoadError = errors.PluginLoadError


def supported_names(table):
    """Executable names of every method of the interfaces in `table`, overridden or not."""
    out = []
    for itf in schema.INTERFACES:
        if itf in table:
            for m in schema.interface(itf).methods.values():
                out.append("Plugin.Query" if m.wire_name == "Plugin.query" else m.wire_name)
    return out


def implemented_names(table):
    """Executable names of the methods the plugin's classes override without marking them
    @base.unimplemented (what the installer lays out). `Plugin.query` is spelt `Plugin.Query`, as the daemon and static-vdis expect."""
    from . import base
    out = []
    for itf in schema.INTERFACES:
        cls = table.get(itf)
        if cls is None:
            continue
        parent = getattr(base, itf)
        for m in schema.interface(itf).methods.values():
            if base.implements(cls, parent, m.name):
                out.append("Plugin.Query" if m.wire_name == "Plugin.query" else m.wire_name)
    return out


def resolve(table, name):
    """The schema Method for an executable name in a plugin; UnknownMethod otherwise."""
    method = schema.lookup(name)
    if method is None or method.interface.name not in table:
        raise errors.UnknownMethod(name, supported_names(table))
    return method


# ---------------------------------------------------------------------------------------
# Validation and dispatch

def check_request(method, args):
    """Validate a request (dict of named arguments); return the kwargs for the plugin."""
    try:
        return method.check_params(args)
    except schema.Violation as v:
        raise errors.InvalidRequest(method.wire_name, v.where, v.rule, v.message) from None


def check_result(method, result):
    """Validate a result and encode it; return the JSON text."""
    try:
        method.check_result(result)
    except schema.Violation as v:
        raise errors.InvalidResult(method.wire_name, v.where, v.rule, v.message) from None
    try:
        return jsonio.dumps(result)
    except (TypeError, ValueError) as e:
        raise errors.InvalidResult(method.wire_name, "(the value itself)", "json", str(e)) from None


def invoke(table, method, kwargs):
    cls = table[method.interface.name]
    return getattr(cls(), method.name)(**kwargs)


def call(impl, name, args):
    """Run one call in-process, with the same checks as the executables; return the result
    (a plain JSON value) or raise (InvalidRequest, InvalidResult, UnknownMethod,
    PluginLoadError, or whatever the plugin raised)."""
    table = load_implementations(impl)
    method = resolve(table, name)
    kwargs = check_request(method, args)
    result = invoke(table, method, kwargs)
    check_result(method, result)
    return result


# ---------------------------------------------------------------------------------------
# Error records

def error_record(exc):
    """The wire error record for any exception: {"code", "params", "backtrace"}.

    StorageError (and anything with a string `code` and a list `params`, as the reference
    bindings allow) gives its own code and params; any other exception gives
    SR_BACKEND_FAILURE [TypeName, str(exc)], as the reference bindings do. Never raises."""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not break the record
        text = f"<{type(exc).__name__}>"
    try:
        code = getattr(exc, "code", None)
        params = getattr(exc, "params", None)
    except Exception:  # noqa: BLE001 - a broken property must not break the record
        code = params = None
    try:
        if not isinstance(code, str) or not isinstance(params, (list, tuple)):
            code, params = "SR_BACKEND_FAILURE", [type(exc).__name__, text]
        params = [p if isinstance(p, str) else str(p) for p in params]
    except Exception:  # noqa: BLE001
        code, params = "SR_BACKEND_FAILURE", [type(exc).__name__, text]
    files, lines = [], []
    tb = getattr(exc, "__traceback__", None)
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename)
        lines.append(tb.tb_lineno)
        tb = tb.tb_next
    return {"code": code, "params": params,
            "backtrace": {"error": text, "files": files, "lines": lines}}


# ---------------------------------------------------------------------------------------
# Command-line mode

def _resolved(method, node):
    """Follow $ref chains of a parameter's schema node (for the command-line parser)."""
    itf = method.interface
    while isinstance(node, dict) and "$ref" in node:
        node = itf.compiler.resolve(node["$ref"])
    return node


def param_kind(method, name):
    """How a parameter is given on the command line: "map", "record", "bool", "int",
    "variant", "string" or "other"."""
    node = _resolved(method, method.params_schema["properties"][name])
    if not isinstance(node, dict):
        return "other"
    if node.get("type") == "object":
        return "record" if "properties" in node else "map"
    if node.get("type") == "boolean":
        return "bool"
    if node.get("x-wire-decode") == "integer" or node.get("type") == "integer":
        return "int"
    if "oneOf" in node:
        return "variant"
    if node.get("type") == "string":
        return "string"
    return "other"


def parse_cli(method, args):
    """The request for the command-line form (spec section 2.9): positional arguments in
    the interface's order, dbg first; a map argument NAME as --NAME KEY VALUE (repeatable;
    absent = empty map); booleans as true/false (any case); variants as JSON or a bare tag;
    integers as decimal text. Record arguments cannot be given this way (use --json)."""
    kinds = {n: param_kind(method, n) for n in method.param_names}
    maps = {n: {} for n, k in kinds.items() if k == "map"}
    positional = [n for n, k in kinds.items() if k not in ("map",)]
    values, i, only_positional = [], 0, False
    where = method.wire_name
    while i < len(args):
        a = args[i]
        if not only_positional and a == "--":
            only_positional = True
        elif not only_positional and a.startswith("--") and len(a) > 2:
            name = a[2:]
            if name not in maps:
                raise errors.InvalidRequest(where, name, "command-line",
                                            f"unknown option {a}; map arguments: "
                                            + (", ".join("--" + m for m in maps) or "none"))
            if i + 2 >= len(args):
                raise errors.InvalidRequest(where, name, "command-line",
                                            f"{a} needs two values: KEY VALUE")
            maps[name][args[i + 1]] = args[i + 2]
            i += 2
        else:
            values.append(a)
        i += 1
    if len(values) > len(positional):
        raise errors.InvalidRequest(where, "(the value itself)", "command-line",
                                    f"too many arguments: expected {len(positional)} "
                                    f"({' '.join(p.upper() for p in positional)}), got {len(values)}")
    request = {}
    for name, text in zip(positional, values):
        kind = kinds[name]
        if kind == "record":
            raise errors.InvalidRequest(where, name, "command-line",
                                        "a record argument cannot be given on the command line: use --json")
        if kind == "bool":
            try:
                request[name] = jsonio.loads(text.lower())
            except jsonio.JSONError:
                request[name] = text  # the validator reports it
        elif kind == "variant":
            try:
                request[name] = jsonio.loads(text)
            except jsonio.JSONError:
                request[name] = text  # a bare nullary tag
        else:
            request[name] = text  # ints stay text: the wire decode converts digit strings
    request.update(maps)
    return request  # missing positional arguments are reported by validation ("required")


# ---------------------------------------------------------------------------------------
# --help

def help_text(method, module_name, table=None, argv0=None):
    lines = []
    exe = "Plugin.Query" if method.wire_name == "Plugin.query" else method.wire_name
    lines.append(f"{exe}: {method.description}")
    plugin_dir = os.path.basename(os.path.dirname(os.path.abspath(argv0))) if argv0 else "?"
    lines.append(f"Plugin: {plugin_dir} (module {module_name})")
    if table is not None:
        cls = table.get(method.interface.name)
        from . import base
        implemented = cls is not None and base.implements(
            cls, getattr(base, method.interface.name), method.name)
        lines.append(f"Implemented by this plugin: {'yes' if implemented else 'no (answers Unimplemented)'}")
    lines.append("")
    lines.append("Usage:")
    lines.append(f"  {exe} --json      < one JSON object of the named arguments on stdin")
    kinds = {n: param_kind(method, n) for n in method.param_names}
    pos = " ".join(n.upper() for n, k in kinds.items() if k != "map")
    opts = " ".join(f"[--{n} KEY VALUE]..." for n, k in kinds.items() if k == "map")
    lines.append(f"  {exe} {pos} {opts}".rstrip())
    lines.append("")
    lines.append("Parameters:")
    for n in method.param_names:
        node = method.params_schema["properties"][n]
        lines.append(f"  {n:<16} {schema.type_name(method.interface, node)}")
        desc = schema.describe(method.interface, node)
        if desc:
            lines.append(f"  {'':<16} {desc}")
    lines.append("")
    lines.append(f"Result: {schema.type_name(method.interface, method.result_schema)}")
    desc = schema.describe(method.interface, method.result_schema)
    if desc:
        lines.append(f"  {desc}")
    lines.append("")
    lines.append("On success: the result as one JSON value on stdout, exit status 0.")
    lines.append('On failure: {"code", "params", "backtrace"} on stdout, exit status 1.')
    lines.append("Logs: syslog local2 (SMAPIv3:); XAPI_STORAGE_LOG_STDERR=1 adds stderr.")
    return "\n".join(lines) + "\n"


def usage_text(name, module_name, table):
    names = implemented_names(table) if table is not None else []
    return (f"{name}: not a method of this plugin (module {module_name}).\n"
            "Run this file under the name of a method, as `xapi-storage install` lays it out.\n"
            "Methods implemented: " + (" ".join(names) or "(unknown)") + "\n")


# ---------------------------------------------------------------------------------------
# main

class _Output:
    """The real stdout, set aside; file descriptor 1 then points at stderr."""

    def __init__(self, stdout=None):
        self.written = False
        self.stream = stdout
        self.fd = None
        if stdout is None:
            try:
                sys.stdout.flush()
            except (OSError, ValueError, AttributeError):
                pass
            self.fd = os.dup(1)
            try:
                os.dup2(2, 1)
            except OSError:  # no stderr: send strays nowhere rather than to the daemon
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.close(null)
            os.set_inheritable(self.fd, False)

    def write(self, text):
        data = (text + "\n").encode("ascii")
        if self.fd is None:
            try:
                self.stream.write(text + "\n")
            except TypeError:  # a binary stream
                self.stream.write(data)
            return
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# The daemon writes the whole request and closes stdin at once; a stdin that is never closed
# (a caller that died holding the pipe, a forgotten terminal) must not hold a call forever:
# the whole request must arrive within this many seconds ($XAPI_STORAGE_STDIN_WAIT).
STDIN_WAIT = 60.0


class StdinTimeout(Exception):
    pass


def _stdin_wait():
    try:
        wait = float(os.environ.get("XAPI_STORAGE_STDIN_WAIT") or STDIN_WAIT)
    except ValueError:
        wait = STDIN_WAIT
    return wait if wait > 0 else STDIN_WAIT


def _read_fd(fd, wait):
    """All of `fd` up to end of file, within `wait` seconds (StdinTimeout otherwise)."""
    import select
    import time
    deadline = time.monotonic() + wait
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise StdinTimeout(f"stdin was not closed within {wait:g} s "
                               f"({sum(map(len, chunks))} bytes read)")
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def _read_all(stdin):
    if stdin is None:
        stdin = sys.stdin
    try:
        fd = stdin.fileno()
    except (AttributeError, OSError, ValueError):     # in-process: a StringIO, say
        fd = None
    if fd is not None:
        data = _read_fd(fd, _stdin_wait())
    else:
        data = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read()
    if isinstance(data, bytes):
        data = data.decode("utf-8")
    return data


def run(module_name, argv=None, stdin=None, stdout=None):
    """One call as an executable; returns the exit status. See main()."""
    argv = sys.argv if argv is None else argv
    out = _Output(stdout)
    saved_stdout = sys.stdout
    if stdout is not None:
        sys.stdout = sys.stderr  # in-process: still keep the plugin's prints off our output
    import time
    t0 = time.monotonic()
    name = os.path.basename(argv[0]) if argv else ""
    args = list(argv[1:])
    status = 1
    table = None
    method = None
    options = args[:args.index("--")] if "--" in args else args
    wants_help = "--help" in options or "-h" in options
    try:
        log.set_context(method=name)
        try:
            table = load_implementations(module_name)
            method = resolve(table, name)
        except errors.UnknownMethod:
            if wants_help:
                out.write(usage_text(name, module_name, table).rstrip("\n"))
                return USAGE_EXIT
            raise
        except errors.PluginLoadError:
            if wants_help and schema.lookup(name):
                out.write(help_text(schema.lookup(name), module_name, None, argv[0]).rstrip("\n"))
                return USAGE_EXIT
            raise
        log.set_context(method=method.wire_name)
        if wants_help:
            out.write(help_text(method, module_name, table, argv[0]).rstrip("\n"))
            return USAGE_EXIT
        if "--json" in options or "-j" in options:
            try:
                request = jsonio.loads(_read_all(stdin))
            except (jsonio.JSONError, UnicodeDecodeError) as e:
                raise errors.InvalidRequest(method.wire_name, "(the value itself)", "json",
                                            f"stdin is not one JSON object: {e}") from None
            except StdinTimeout as e:
                raise errors.InvalidRequest(method.wire_name, "(the value itself)", "json",
                                            f"no complete request: {e}") from None
        else:
            request = parse_cli(method, args)
        if isinstance(request, dict):
            log.set_context(dbg=request.get("dbg"))
        kwargs = check_request(method, request)
        log.debug("request %s", _redact(kwargs))
        log.bridge_stdlib_logging()
        result = invoke(table, method, kwargs)
        text = check_result(method, result)
        log.debug("ok in %.1f ms", (time.monotonic() - t0) * 1000)
        out.written = True  # from here on, never a second JSON value
        out.write(text)
        status = 0
    except BaseException as e:  # noqa: B902 - every failure becomes an error record
        if out.written:
            raise
        rec = error_record(e)
        try:
            log.error("failed in %.1f ms: %s %s", (time.monotonic() - t0) * 1000,
                      rec["code"], jsonio.dumps(rec["params"]))
            if not isinstance(e, errors.StorageError):
                log.error("backtrace: %s", jsonio.dumps(rec["backtrace"]))
        except BaseException:  # noqa: B902
            pass
        out.write(jsonio.dumps(rec))
        status = 1
        if "--json" not in options and "-j" not in options:
            # command-line mode is for people and boot scripts: say it on stderr too
            try:
                sys.stderr.write(f"{name}: {rec['code']} {jsonio.dumps(rec['params'])}\n")
                sys.stderr.flush()
            except BaseException:  # noqa: B902
                pass
    finally:
        out.close()
        sys.stdout = saved_stdout
    return status


_SECRET_WORDS = ("password", "secret", "chap", "token", "key_data")


def _redact(kwargs):
    """The request for the log, with the values of secret-looking map keys hidden."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, dict):
            v = {mk: ("<hidden>" if any(w in mk.lower() for w in _SECRET_WORDS) else mv)
                 for mk, mv in v.items()}
        out[k] = v
    try:
        return jsonio.dumps(out)
    except (TypeError, ValueError):
        return repr(out)


def main(module_name, argv=None, stdin=None, stdout=None):
    """Entry point of a plugin executable: run one call and exit with its status."""
    sys.exit(run(module_name, argv, stdin, stdout))
