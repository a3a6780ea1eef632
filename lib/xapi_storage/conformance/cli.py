"""`xapi-storage conformance DIR`: the command-line face of xapi_storage.conformance."""

import os
import signal
import subprocess
import sys

HELP = ("check an installed volume or datapath plugin through its executables as the daemon "
        "calls them; prints a table, exit 1 if a check fails")


def add_arguments(parser):
    parser.add_argument("plugin_dir", metavar="DIR", nargs="?",
                        help="the installed plugin, e.g. /usr/libexec/xapi-storage-script/volume/"
                             "org.xen.xapi.storage.acme, or a datapath plugin alone, e.g. "
                             ".../datapath/acme+nbd (then give --uri)")
    parser.add_argument("--uri", action="append", default=[], metavar="URI",
                        help="datapath plugin: a URI of its scheme to plug (repeatable: a volume "
                             "each; the checks plug the first); {file} in it is replaced by "
                             "a sparse scratch file the run makes, {loop} by a loop device over "
                             "one, e.g. --uri 'acme+nbd://{file}'. Without {file} or {loop} the "
                             "volume is never written and the cleanup check is skipped")
    parser.add_argument("--size", type=int, default=64 << 20, metavar="BYTES",
                        help="datapath plugin: size of the scratch files (default 64 MiB)")
    parser.add_argument("--configuration", "-c", action="append", default=[], metavar="KEY=VALUE",
                        help="device-config for SR.create / SR.attach (repeatable)")
    parser.add_argument("--repeat", type=int, default=10, metavar="N",
                        help="how often each repeatable call is repeated (default 10)")
    parser.add_argument("--parallel", type=int, default=8, metavar="N",
                        help="how many calls run at once in the parallel check (default 8)")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="longest wait for one call; then its process group is killed "
                             "(default 60)")
    parser.add_argument("--only", action="append", default=[], metavar="CHECK",
                        help="run only this check (repeatable; results-valid always runs)")
    parser.add_argument("--hide-storage", metavar="CMD",
                        help="shell command that makes the SR's storage unreachable (for "
                             "storage-gone); the SR's configuration is in its environment as "
                             "XAPI_STORAGE_CONFIG_<KEY> (upper case) and XAPI_STORAGE_CONFIG (JSON)")
    parser.add_argument("--restore-storage", metavar="CMD",
                        help="shell command that brings the storage back (same environment)")
    parser.add_argument("--junit", metavar="FILE", help="also write JUnit XML to FILE")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")


def _write(text):
    """Write to stdout, also when its encoding cannot hold the text (Python 3.6 under the C
    locale is ASCII; a plugin's answers may hold any character)."""
    try:
        sys.stdout.write(text)
    except UnicodeEncodeError:
        sys.stdout.flush()
        sys.stdout.buffer.write(text.encode(sys.stdout.encoding or "ascii", "backslashreplace"))
    sys.stdout.flush()


def _datapath_usage(args):
    """Why the options do not fit a datapath plugin's run, or None."""
    from ..toolstack.daemon import uri_scheme
    scheme = os.path.basename(os.path.abspath(args.plugin_dir))
    if not args.uri:
        return (f"a datapath plugin is checked on URIs it serves: give --uri, e.g. "
                f"--uri '{scheme}://{{file}}'")
    for u in args.uri:
        if uri_scheme(u) != scheme:
            return (f"--uri {u!r}: its scheme is not {scheme!r}, the datapath's (the daemon "
                    "chooses a datapath by the URI's scheme)")
    if args.configuration or args.hide_storage or args.restore_storage:
        return "--configuration, --hide-storage and --restore-storage are for a volume plugin"
    if args.size < 1 << 20:
        return "--size: at least 1 MiB"
    if any("{loop}" in u for u in args.uri):
        from ..scratch import unavailable
        why = unavailable()
        if why:
            return f"--uri with {{loop}} cannot be served here: {why}"
    return None


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _hook(command):
    if not command:
        return None

    def run(configuration):
        from ..sdk import jsonio
        env = dict(os.environ)
        env["XAPI_STORAGE_CONFIG"] = jsonio.dumps(configuration)
        for k, v in configuration.items():
            env["XAPI_STORAGE_CONFIG_" + "".join(c if c.isalnum() else "_" for c in k.upper())] = v
        r = subprocess.run(["/bin/sh", "-c", command], env=env, timeout=120,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True)
        if r.returncode != 0:
            raise RuntimeError(f"{command!r} exited {r.returncode}: {r.stdout.strip()[-500:]}")
    return run


def run(args):
    from . import CHECKS, DATAPATH_CHECKS, Options, SetupError, checks_for, plugin_kind
    from . import run as run_checks
    if args.list:
        for title, checks in (("volume plugin", CHECKS), ("datapath plugin", DATAPATH_CHECKS)):
            print(f"checks of a {title}:")
            for c in checks:
                print(f"  {c.name}\n      {c.doc}")
        return 0
    if not args.plugin_dir:
        print("xapi-storage conformance: give the plugin's directory (see --help)",
              file=sys.stderr)
        return 2
    if not 0 < args.timeout < float("inf"):        # also refuses nan
        print(f"xapi-storage conformance: --timeout {args.timeout}: a number of seconds "
              "above 0 (no call may wait forever)", file=sys.stderr)
        return 2
    kind, _ = plugin_kind(args.plugin_dir)
    if not os.path.isdir(args.plugin_dir) or kind not in ("volume", "datapath"):
        print(f"xapi-storage conformance: {args.plugin_dir} is not an installed plugin "
              "directory (ROOT/volume/org.xen.xapi.storage.<srtype> or ROOT/datapath/<scheme>; "
              "lay one out with `xapi-storage install --root ROOT`)", file=sys.stderr)
        return 2
    if kind == "datapath":
        problem = _datapath_usage(args)
        if problem:
            print(f"xapi-storage conformance: {problem}", file=sys.stderr)
            return 2
    elif args.uri:
        print("xapi-storage conformance: --uri is for a datapath plugin; a volume plugin's "
              "volumes have their own", file=sys.stderr)
        return 2
    config = {}
    for item in args.configuration:
        k, sep, v = item.partition("=")
        if not sep or not k:
            print(f"xapi-storage conformance: --configuration {item!r}: expected KEY=VALUE",
                  file=sys.stderr)
            return 2
        config[k] = v
    names = {c.name for c in checks_for(kind)}
    unknown = [o for o in args.only if o not in names]
    if unknown:
        print(f"xapi-storage conformance: unknown check {unknown[0]!r} (see --list)",
              file=sys.stderr)
        return 2
    if bool(args.hide_storage) != bool(args.restore_storage):
        print("xapi-storage conformance: give both --hide-storage and --restore-storage",
              file=sys.stderr)
        return 2
    options = Options(configuration=config, repeat=args.repeat, parallel=args.parallel,
                      timeout=args.timeout, only=args.only,
                      hide_storage=_hook(args.hide_storage),
                      restore_storage=_hook(args.restore_storage), uris=args.uri,
                      size=args.size)

    def progress(result):
        print(f"  {result.name}: {result.status}", file=sys.stderr)

    # SIGTERM (a CI job cancelled, a service stopped) and SIGHUP (the operator's terminal or
    # ssh session gone) end the run like Ctrl-C: through the teardown, which destroys what the
    # run made
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        report = run_checks(args.plugin_dir, options, progress=progress)
    except KeyboardInterrupt:
        print("xapi-storage conformance: interrupted; what the run made was destroyed",
              file=sys.stderr)
        return 130
    except SetupError as e:
        print(f"xapi-storage conformance: {e}; nothing was checked", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _write(report.table())
    if args.junit:
        with open(args.junit, "w", encoding="utf-8") as f:
            f.write(report.junit() + "\n")
    return 0 if report.ok else 1
