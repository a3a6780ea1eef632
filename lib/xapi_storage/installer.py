"""`xapi-storage install`: lay out the plugin executables that xapi-storage-script runs.

Plugins register through entry points (setup.cfg of this package, or a vendor's own):

    [options.entry_points]
    xapi_storage.volume =
        org.xen.xapi.storage.file-raw = xapi_storage.volume.file_raw
    xapi_storage.datapath =
        pyblkback = xapi_storage.datapath.pyblkback

For each plugin the installer imports its module, reads IMPLEMENTATIONS, and writes into
ROOT/volume/<name>/ (or ROOT/datapath/<scheme>/) one executable per method that the
plugin's classes override, named Interface.method (Plugin.Query with a capital Q). Every
executable is the same small Python 3 source file (runnable by runpy, as xapi's observer
needs), whose shebang is the interpreter running the installer with `-IS` (isolated, no
`site`: a call pays for the interpreter and our imports, not for a scan of site-packages);
the file itself appends to sys.path the directories the installer found the SDK, the plugin
and site-packages in (see shim_source). The SDK dispatches on the file's name. A manifest (.xapi-storage-install.json) in each plugin directory records what
was laid, so that:

  * running the installer again converges: it rewrites only files that differ, and removes
    executables of methods the plugin no longer implements;
  * --uninstall removes exactly what was laid (files changed since are kept, with a
    warning, and the manifest then names just those), then the plugin directory if it is
    empty; a manifest entry that is not an Interface.method file name is refused (it could
    name any file on the host); --prune does the same for plugins
    laid earlier that are no longer being installed (their package was removed). ROOT/volume and ROOT/datapath
    themselves are never removed (the daemon watches them).

A new plugin directory is assembled beside ROOT/volume (in ROOT) and renamed into place, so
the daemon never sees it half-written (it runs a datapath's Plugin.Query as soon as the
directory appears). Files are replaced by rename, never rewritten in place.

A registered plugin whose module cannot be imported is reported on stderr and skipped (its
directory, if any, is left as it was); the other plugins are still installed, and the exit
status is 1. A directory that exists but was not laid by this installer is never touched.
The installer also byte-compiles the modules it lays out executables for (a plugin call is
a new process; without .pyc files each call compiles the SDK again).

Last, it checks observer mode: with smapi tracing on, the daemon runs every executable with
the host's /usr/bin/python3 (whatever the shebang says) and PYTHONPATH=<plugin dir>. The
installer runs each laid plugin's Plugin.Query that way (--observer-python names another
interpreter, or none); a plugin that fails is reported as an error and the exit status is 1
(its executables stay: they work when tracing is off).
"""

import errno
import hashlib
import os
import re
import stat
import sys

HELP = "lay out the plugin executables under a root (default /usr/libexec/xapi-storage-script)"
DEFAULT_ROOT = "/usr/libexec/xapi-storage-script"
GROUPS = {"volume": "xapi_storage.volume", "datapath": "xapi_storage.datapath"}
MANIFEST = ".xapi-storage-install.json"
_VOLUME_NAME = re.compile(r"\Aorg\.xen\.xapi\.storage\.[a-z0-9][a-z0-9_-]*\Z")
_SCHEME = re.compile(r"\A[a-z][a-z0-9+.-]*\Z")
_MODULE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
# what the installer lays in a plugin directory: Interface.method executables, nothing else
# (a manifest entry is trusted for nothing: "../x" or "/etc/x" would have us delete that file)
_EXE_NAME = re.compile(r"\A[A-Z][A-Za-z]*\.[A-Za-z][A-Za-z_]*\Z")
_DIGEST = re.compile(r"\A[0-9a-f]{64}\Z")


# Under xapi's smapi tracing the daemon runs `/usr/bin/python3 -m observer <exe> --json` with
# PYTHONPATH=<plugin dir> (replacing its own) and cwd /; xen-api's python3/packages/observer.py
# then runs the executable with runpy.run_path(exe, run_name="__main__"). That interpreter, not
# the shebang's, must be able to import the SDK and the plugin: on XenServer 8 and XCP-ng 8.3
# it is Python 3.6.
OBSERVER_PYTHON = "/usr/bin/python3"
# what observer.py does with no tracing configured: argv shifted to [exe, --json], then runpy
_OBSERVER_RUN = ("import runpy, sys\n"
                 "sys.argv = [sys.argv[1], '--json']\n"
                 "runpy.run_path(sys.argv[0], run_name='__main__')\n")


class InstallError(Exception):
    """A plugin cannot be installed (or uninstalled); the message says why."""


class Plugin:
    """One registered plugin: kind ("volume" or "datapath"), name (directory), module."""

    def __init__(self, kind, name, module):
        self.kind, self.name, self.module = kind, name, module

    def check(self):
        if self.kind not in GROUPS:
            raise InstallError(f"unknown plugin kind {self.kind!r} (volume or datapath)")
        if self.kind == "volume" and not _VOLUME_NAME.match(self.name):
            raise InstallError(
                f"volume plugin name {self.name!r} must be org.xen.xapi.storage.<srtype>, with a "
                "lower-case <srtype> without dots (xapi takes the SR type from the last dot)")
        if self.kind == "datapath" and not _SCHEME.match(self.name):
            raise InstallError(f"datapath plugin name {self.name!r} must be a lower-case URI scheme "
                               "([a-z][a-z0-9+.-]*)")
        if not _MODULE.match(self.module):
            raise InstallError(f"{self.name}: {self.module!r} is not a module name")

    def __repr__(self):
        return f"<Plugin {self.kind}/{self.name} = {self.module}>"

    def __eq__(self, other):
        return (self.kind, self.name, self.module) == (other.kind, other.name, other.module)


def registered_plugins():
    """Every plugin registered through the entry point groups, sorted."""
    from .compat import entry_points
    out = []
    for kind, group in GROUPS.items():
        for ep in entry_points(group):
            out.append(Plugin(kind, ep.name, ep.value.split(":", 1)[0].strip()))
    return sorted(out, key=lambda p: (p.kind, p.name))


def shim_source(module, interpreter, paths=None):
    """The text of every executable of the plugin `module`.

    With `paths` (install_paths(): where the SDK, the plugin and their dependencies live for
    the installer's own Python), the executable starts isolated and without `site`
    (`python -IS`: no scan of site-packages and its .pth files, no PYTHONPATH, no user site;
    the scan costs a call several times the interpreter's own start on a host with many
    packages) and appends exactly those directories to sys.path itself, after the standard
    library as `site` would, - only when the
    running Python has the installer's version. Observer mode runs the file with the host's
    python3, PYTHONPATH=<plugin dir> and `site`: on another version (3.6 on XenServer 8) the
    directories are left out and that Python finds its own installation of the package.
    Without `paths`: a plain shebang, and the interpreter's usual sys.path."""
    if not _MODULE.match(module):
        raise InstallError(f"{module!r} is not a module name")
    if not interpreter or any(c.isspace() for c in interpreter) or "\0" in interpreter:
        raise InstallError(f"cannot use {interpreter!r} in a shebang line (empty or has spaces)")
    head = f"#!{interpreter}\n"
    setup = ""
    if paths is not None:
        if any("\n" in p or "\0" in p for p in paths):
            raise InstallError(f"cannot use a directory with a newline in its name: {paths!r}")
        head = f"#!{interpreter} -IS\n"
        setup = ("import sys\n"
                 f"if sys.version_info[:2] == {tuple(sys.version_info[:2])!r}:  # the installer's Python\n"
                 f"    sys.path.extend([p for p in {list(paths)!r} if p not in sys.path])\n")
    return (
        head +
        "# A SMAPIv3 plugin executable, laid out by `xapi-storage install`: every method of the\n"
        "# plugin is a copy of this file, named Interface.method; the SDK dispatches on the name.\n"
        "# Python 3 source, runnable by runpy (xapi's observer). Do not edit: rerun the installer.\n"
        + setup +
        "from xapi_storage.sdk.wire import main\n"
        "\n"
        f'main("{module}")\n'
    )


def install_paths(modules):
    """The directories an executable run with `python -IS` needs on sys.path to import the SDK
    and `modules` with what they import, as this Python finds them now: the directory each
    one's top-level package or module was found in (the real directory, also for an editable
    install, whose .pth file or import hook `-S` skips), then this Python's site-packages
    (dependencies: pyxs, cffi, a vendor's own). In that order, without repeats."""
    import importlib.util
    import site
    out = []

    def add(d):
        d = os.path.abspath(d)
        if d not in out and os.path.isdir(d):
            out.append(d)
    for mod in list(modules) + ["xapi_storage"]:
        top = mod.split(".")[0]
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        if spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                add(os.path.dirname(loc))
        elif spec.origin and os.path.isabs(spec.origin):
            add(os.path.dirname(spec.origin))
    getsite = getattr(site, "getsitepackages", None)
    for d in (getsite() if getsite else []):
        if d in sys.path:
            add(d)
    for d in sys.path:                      # a venv's site-packages (and .pth-added ones)
        if os.path.basename(d) in ("site-packages", "dist-packages"):
            add(d)
    return out


def plan(plugin, interpreter, isolated=True):
    """{file name: content} for a plugin: one executable per overridden method.
    Imports the plugin module; raises InstallError if that fails. isolated: the executables
    start with `-IS` and their own sys.path (shim_source); only for this very interpreter,
    whose directories the installer knows."""
    from .sdk import errors, wire
    try:
        table = wire.load_implementations(plugin.module)
    except errors.PluginLoadError as e:
        raise InstallError(f"{plugin.kind} plugin {plugin.name}: {e.reason}") from None
    from .sdk.schema import KINDS
    allowed = KINDS[plugin.kind]
    wrong = [i for i in table if i not in allowed]
    if wrong:
        raise InstallError(f"{plugin.kind} plugin {plugin.name}: IMPLEMENTATIONS has {', '.join(wrong)}; "
                           f"a {plugin.kind} plugin implements {', '.join(allowed)}")
    names = wire.implemented_names(table)
    if "Plugin.Query" not in names:
        raise InstallError(f"{plugin.kind} plugin {plugin.name}: it must implement Plugin.query "
                           "(the daemon and xapi call Plugin.Query to learn what it is)")
    paths = install_paths([plugin.module]) if isolated else None
    text = shim_source(plugin.module, interpreter, paths)
    return {name: text for name in names}


def _sha(data):
    return hashlib.sha256(data).hexdigest()


def _read(path):
    """The bytes of the regular file `path`, None if there is nothing, or CHANGED if it is
    not a regular file (a symlink is not followed, a FIFO not waited on): never ours."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            return CHANGED
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return CHANGED
        return f.read()


# what _read answers for an entry that is not a regular file: equal to no content, and whose
# digest matches no manifest entry
CHANGED = b"\0not a regular file\0"


def _write_atomic(path, data, mode):
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(plugin_dir):
    from .sdk import jsonio
    data = _read(os.path.join(plugin_dir, MANIFEST))
    if data is None:
        return None
    try:
        m = jsonio.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise InstallError(f"{plugin_dir}: its manifest {MANIFEST} is not JSON") from None
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict):
        raise InstallError(f"{plugin_dir}: its manifest {MANIFEST} is not one this installer wrote")
    for name, digest in m["files"].items():
        if not (_EXE_NAME.match(name) and isinstance(digest, str) and _DIGEST.match(digest)):
            raise InstallError(
                f"{plugin_dir}: its manifest {MANIFEST} names {name[:80]!r}, which this "
                "installer never lays (only Interface.method files in that directory): "
                "refused, nothing touched; check who wrote it")
    return m


def _manifest_bytes(plugin, interpreter, files):
    from .sdk import jsonio
    m = {"installer": "xapi-storage install", "format": 1, "kind": plugin.kind, "name": plugin.name,
         "module": plugin.module, "interpreter": interpreter,
         "files": {n: _sha(files[n].encode()) for n in sorted(files)}}
    return (jsonio.dumps(m) + "\n").encode()


def converge(root, plugin, files, interpreter, report=print):
    """Make ROOT/<kind>/<name> hold exactly `files` (+ manifest). Returns the list of
    changes made, e.g. ["write Plugin.Query", "remove SR.probe"]; [] if none."""
    kind_dir = os.path.join(root, plugin.kind)
    os.makedirs(kind_dir, mode=0o755, exist_ok=True)
    target = os.path.join(kind_dir, plugin.name)
    changes = []
    manifest_data = _manifest_bytes(plugin, interpreter, files)
    if not os.path.lexists(target):
        # Assemble beside the watched directory, then rename into place in one step.
        tmp = os.path.join(root, f".xapi-storage-install-{plugin.kind}-{plugin.name}-{os.getpid()}")
        os.mkdir(tmp, 0o755)
        try:
            for name, text in sorted(files.items()):
                _write_atomic(os.path.join(tmp, name), text.encode(), 0o755)
                changes.append(f"write {name}")
            _write_atomic(os.path.join(tmp, MANIFEST), manifest_data, 0o644)
            _fsync_dir(tmp)
            os.rename(tmp, target)
        except BaseException:
            for n in os.listdir(tmp):
                os.unlink(os.path.join(tmp, n))
            os.rmdir(tmp)
            raise
        _fsync_dir(kind_dir)
        return changes
    if os.path.islink(target) or not os.path.isdir(target):
        raise InstallError(f"{target} exists and is not a directory laid by this installer; "
                           "remove it first")
    manifest = read_manifest(target)
    if manifest is None:
        raise InstallError(f"{target} exists but was not laid by this installer (no {MANIFEST}); "
                           "left untouched: remove it first to install here")
    owned = manifest["files"]
    for name, text in sorted(files.items()):
        path = os.path.join(target, name)
        data = text.encode()
        current = _read(path) if not os.path.islink(path) else None
        if current == data and os.stat(path).st_mode & 0o7777 == 0o755:
            continue
        if os.path.lexists(path) and name not in owned and current != data:
            raise InstallError(f"{path} exists and was not laid by this installer; left untouched")
        _write_atomic(path, data, 0o755)
        changes.append(f"write {name}")
    for name, digest in sorted(owned.items()):
        if name in files:
            continue
        path = os.path.join(target, name)
        current = _read(path)
        if current is None:
            continue
        if _sha(current) != digest:
            report(f"warning: {path} was changed since it was installed: kept (remove it by hand)")
            continue
        os.unlink(path)
        changes.append(f"remove {name}")
    if _read(os.path.join(target, MANIFEST)) != manifest_data:
        _write_atomic(os.path.join(target, MANIFEST), manifest_data, 0o644)
        if not changes:
            changes.append(f"write {MANIFEST}")
    if changes:
        _fsync_dir(target)
    return changes


def uninstall(root, plugin, report=print):
    """Remove what the installer laid for `plugin`. Returns the list of changes."""
    target = os.path.join(root, plugin.kind, plugin.name)
    if not os.path.lexists(target):
        return []
    if os.path.islink(target) or not os.path.isdir(target):
        raise InstallError(f"{target} is not a directory laid by this installer; left untouched")
    manifest = read_manifest(target)
    if manifest is None:
        raise InstallError(f"{target} was not laid by this installer (no {MANIFEST}); left untouched")
    changes, kept = [], {}
    for name, digest in sorted(manifest["files"].items()):
        path = os.path.join(target, name)
        current = _read(path)
        if current is None:
            continue
        if _sha(current) != digest:
            report(f"warning: {path} was changed since it was installed: kept")
            kept[name] = digest
            continue
        os.unlink(path)
        changes.append(f"remove {name}")
    if kept:
        # the manifest stays, naming what is kept: the directory is still this installer's,
        # so a later install converges (and a later uninstall retries) instead of refusing it
        from .sdk import jsonio
        _write_atomic(os.path.join(target, MANIFEST),
                      (jsonio.dumps(dict(manifest, files=kept)) + "\n").encode(), 0o644)
        _fsync_dir(target)
        report(f"warning: {target} kept, with its manifest naming the kept files")
        return changes
    os.unlink(os.path.join(target, MANIFEST))
    try:
        os.rmdir(target)
        changes.append(f"remove {plugin.kind}/{plugin.name}/")
    except OSError:
        report(f"warning: {target} is not empty (files not laid by the installer): kept")
    return changes


def precompile(modules):
    """Byte-compile the SDK and the given plugin modules' packages (best effort)."""
    import compileall
    import importlib.util
    import re
    dirs = {os.path.dirname(os.path.abspath(__file__))}
    for mod in modules:
        try:
            spec = importlib.util.find_spec(mod)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            dirs.add(os.path.dirname(spec.origin))
    ok = True
    for d in sorted(dirs):
        try:
            # bed-data holds scripts for the test bed's dom0, not modules: leave it alone
            ok &= bool(compileall.compile_dir(d, quiet=2, workers=1,
                                              rx=re.compile(r"[/\\]bed-data[/\\]")))
        except OSError:
            ok = False
    return ok


def observer_env(plugin_dir):
    """The environment of an executable run in observer mode: ours, as the daemon's stand-in,
    without any PYTHON* variable (the daemon's service has none), and PYTHONPATH the plugin
    directory alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = plugin_dir
    return env


def observer_problem(plugin_dir, python):
    """Run the plugin's Plugin.Query as the daemon does in observer mode (`python -m observer
    <exe> --json`: runpy.run_path of the executable, PYTHONPATH=<plugin dir>, cwd /). None if
    it answers; else a sentence saying what fails and why it matters."""
    import json
    import subprocess
    exe = os.path.join(plugin_dir, "Plugin.Query")
    request = json.dumps({"dbg": "xapi-storage install: observer-mode check"})
    try:
        r = subprocess.run([python, "-c", _OBSERVER_RUN, exe], input=request,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, env=observer_env(plugin_dir), cwd="/",
                           timeout=60)
    except subprocess.TimeoutExpired:
        why = "no answer within 60 s"
    except OSError as e:
        why = f"cannot run it: {e}"
    else:
        try:
            ok = r.returncode == 0 and isinstance(json.loads(r.stdout), dict)
        except ValueError:
            ok = False
        if ok:
            return None
        why = _failure_summary(r)
    return (f"{python} cannot run {exe} the way xapi-storage-script does with smapi tracing on "
            f"(`{python} -m observer <exe> --json`, PYTHONPATH={plugin_dir}, ignoring the "
            f"shebang): {why}. Every call of this plugin would fail while tracing is on: make "
            f"the package and the plugin importable by {python} (install them for it), or name "
            "the interpreter the host uses with --observer-python")


def _failure_summary(r):
    """The gist of a failed run: the error record's message, else stderr's last line."""
    import json
    try:
        rec = json.loads(r.stdout)
        return f"exit status {r.returncode}: " + " ".join(str(p) for p in rec["params"])
    except (ValueError, KeyError, TypeError):
        last = (r.stderr.strip().splitlines() or [r.stdout.strip()[-300:]])[-1]
        return f"exit status {r.returncode}: {last}"


def default_interpreter():
    """The interpreter running the installer, as an absolute normalised path. Symlinks are
    kept: a virtualenv's python is a symlink, and resolving it would leave the virtualenv."""
    return os.path.abspath(sys.executable)


def add_arguments(parser):
    parser.add_argument("--root", default=DEFAULT_ROOT,
                        help=f"where the daemon looks for plugins (default {DEFAULT_ROOT})")
    parser.add_argument("--uninstall", action="store_true",
                        help="remove what the installer laid for these plugins")
    parser.add_argument("--plugin", action="append", metavar="KIND:NAME=MODULE", default=[],
                        help="install this plugin instead of the registered ones (repeatable), "
                             "e.g. volume:org.xen.xapi.storage.toy=mypkg.toy")
    parser.add_argument("--python", default=default_interpreter(), metavar="PATH",
                        help="interpreter for the executables' shebang (default: this one, "
                             f"{default_interpreter()})")
    parser.add_argument("--prune", action="store_true",
                        help="also uninstall plugins this installer laid earlier that are no longer "
                             "among those being installed (e.g. their package was removed)")
    parser.add_argument("--list", action="store_true",
                        help="list the registered plugins and exit")
    parser.add_argument("--no-compile", action="store_true",
                        help="do not byte-compile the SDK and the plugins")
    parser.add_argument("--no-isolate", action="store_true",
                        help="executables start with the interpreter's full start-up (site-packages "
                             "scan, PYTHONPATH) instead of `-IS` and the directories this installer "
                             "found the package and the plugins in (always so with a --python "
                             "other than this one)")
    parser.add_argument("--observer-python", default=OBSERVER_PYTHON, metavar="PATH",
                        help="after installing, run each plugin's Plugin.Query with this "
                             "interpreter exactly as xapi-storage-script does with smapi "
                             "tracing on (`PATH -m observer <exe> --json`, PYTHONPATH=<plugin "
                             "dir>, cwd /, whatever the shebang says); a plugin that fails is "
                             "an error (exit status 1). Default %(default)s, the host's, as "
                             "the daemon runs it (Python 3.6 on XenServer 8 and XCP-ng 8.3); "
                             "skipped, with a note, where it does not exist; 'none': no check")


def laid_plugins(root):
    """Plugins whose directory under root holds this installer's manifest."""
    out = []
    for kind in GROUPS:
        kind_dir = os.path.join(root, kind)
        try:
            names = sorted(os.listdir(kind_dir))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            d = os.path.join(kind_dir, name)
            if os.path.islink(d) or not os.path.isdir(d):
                continue
            try:
                m = read_manifest(d)
            except InstallError:
                continue
            if m is not None:
                out.append(Plugin(kind, name, str(m.get("module", "?"))))
    return out


def parse_plugin(spec):
    kind, sep, rest = spec.partition(":")
    name, sep2, module = rest.partition("=")
    if not sep or not sep2:
        raise InstallError(f"--plugin {spec!r}: expected KIND:NAME=MODULE")
    return Plugin(kind.strip(), name.strip(), module.strip())


def run(args):
    def report(msg):
        print(msg, file=sys.stderr)

    try:
        plugins = [parse_plugin(s) for s in args.plugin] if args.plugin else registered_plugins()
    except InstallError as e:
        report(f"xapi-storage install: {e}")
        return 2
    if args.list:
        for p in plugins:
            print(f"{p.kind}\t{p.name}\t{p.module}")
        return 0
    root = os.path.abspath(args.root)
    if os.path.exists(root) and not os.path.isdir(root):
        report(f"xapi-storage install: error: --root {root} exists and is not a directory")
        return 1
    status = 0
    installed = []
    laid = []
    for p in plugins:
        try:
            p.check()
            if args.uninstall:
                changes = uninstall(root, p, report)
            else:
                isolated = (not args.no_isolate
                            and os.path.abspath(args.python) == default_interpreter())
                changes = converge(root, p, plan(p, args.python, isolated), args.python, report)
                installed.append(p.module)
                laid.append(os.path.join(root, p.kind, p.name))
        except InstallError as e:
            report(f"xapi-storage install: error: {e}; skipped")
            status = 1
            continue
        except OSError as e:
            report(f"xapi-storage install: error: {p.kind}/{p.name}: {e}; skipped")
            status = 1
            continue
        where = os.path.join(root, p.kind, p.name)
        print(f"{where}: " + (", ".join(changes) if changes else "unchanged"))
    wanted = {(p.kind, p.name) for p in plugins}
    stale = [] if args.uninstall else [p for p in laid_plugins(root) if (p.kind, p.name) not in wanted]
    for p in stale:
        where = os.path.join(root, p.kind, p.name)
        if not args.prune:
            report(f"note: {where} was laid by this installer for {p.module}, which is not being "
                   "installed now; --prune removes it")
            continue
        try:
            changes = uninstall(root, p, report)
        except (InstallError, OSError) as e:
            report(f"xapi-storage install: error: {e}")
            status = 1
            continue
        print(f"{where}: pruned: " + ", ".join(changes))
    if installed and not args.no_compile and not precompile(installed):
        report("xapi-storage install: warning: byte-compiling failed (calls will be slower)")
    observer = getattr(args, "observer_python", OBSERVER_PYTHON)
    if laid and observer != "none" and not os.path.exists(observer):
        report(f"note: no {observer} here: observer mode (smapi tracing) not checked")
    elif observer != "none":
        for d in laid:
            problem = observer_problem(d, observer)
            if problem:
                report(f"xapi-storage install: error: {problem}")
                status = 1
    if not plugins:
        report("xapi-storage install: no plugin registered (entry point groups "
               + ", ".join(GROUPS.values()) + ")")
    return status
