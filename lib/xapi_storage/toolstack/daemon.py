"""The toolstack's storage daemon (xapi-storage-script), as far as plugins can tell.

Read from xen-api `ocaml/xapi-storage-script/main.ml` (`fork_exec_rpc`, `Script.path`,
`Datapath_plugins`, `choose_datapath`, the `vdi_*_impl` functions) and `lib.ml` (`Process`):

* an executable runs as `[path, "--json"]`, cwd `/`, the caller's environment; its stdin is the
  JSON object of the named parameters on one line without a newline, then closed; the call
  ends when stdout AND stderr reach end-of-file and the process has exited (a child that keeps
  either pipe open holds the call). The real daemon has no timeout: ours has one
  (`timeout`, default 120 s) so that a hang is a test failure, not a hung test;
* exit 0: stdout is one JSON value; anything else raises `ScriptError` with the code and params
  the daemon would raise (SCRIPT_FAILED with its reason, or the plugin's own error record);
* executables are found case-insensitively in the plugin's directory, must be regular files
  (after symlinks) and executable (SCRIPT_MISSING / SCRIPT_NOT_EXECUTABLE otherwise);
* a datapath directory is registered when its Plugin.Query (dbg "register") answers with
  required_api_version "3.0" or "5.0"; its features are kept (only NONPERSISTENT and
  VDI_MIRROR_IN are ever read);
* for each datapath call the volume's URIs come from a fresh Volume.stat (of the clone-on-boot
  volume if the key is set), and the first URI whose scheme is a registered datapath wins;
  only epoch_begin with persistent=false moves the NONPERSISTENT schemes to the front
  (`choose`).

static-vdis runs executables in command-line mode instead (`run_cli`): positional arguments,
"static-vdis" as dbg, no stdin.
"""

import os
import re
import signal
import subprocess
import time

from ..sdk import jsonio

DEFAULT_TIMEOUT = 120.0
SUPPORTED_API_VERSIONS = ("3.0", "5.0")
NONPERSISTENT = "NONPERSISTENT"
CLONE_ON_BOOT = "clone-on-boot"
_SCHEME = re.compile(r"\A([A-Za-z][A-Za-z0-9+.-]*):")


class ScriptError(Exception):
    """A call failed the way the daemon reports it: `code` and `params` are what xapi would
    see (Backend_error / Backend_error_with_backtrace, without the backtrace); `stderr` is
    what the daemon would only log."""

    def __init__(self, code, params, path=None, stderr="", backtrace=None):
        self.code, self.params = code, [str(p) for p in params]
        self.path, self.stderr, self.backtrace = path, stderr, backtrace
        super().__init__(f"{code} {jsonio.dumps(self.params)}"
                         + (f"\n--- stderr of {path}:\n{stderr[-4000:]}" if stderr else ""))


class ScriptTimeout(ScriptError):
    """Our emulation's own limit (the real daemon would wait forever)."""


# --- running one executable ------------------------------------------------------------------

def find_executable(script_dir, name):
    """The path of `name` in `script_dir`, matched case-insensitively (the smallest name wins
    when several match). Raises ScriptError SCRIPT_MISSING / SCRIPT_NOT_EXECUTABLE."""
    path = os.path.join(script_dir, name)
    if not os.path.isfile(path):
        try:
            found = sorted(n for n in os.listdir(script_dir) if n.lower() == name.lower())
        except OSError:
            found = []
        if found:
            path = os.path.join(script_dir, found[0])
    if not os.path.isfile(path):
        raise ScriptError("SCRIPT_MISSING",
                          [path, "Check whether the file exists and has correct permissions"], path)
    if not os.access(path, os.X_OK):
        raise ScriptError("SCRIPT_NOT_EXECUTABLE", [path, "Permission denied"], path)
    return path


def _communicate(argv, stdin_data, timeout, env):
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd="/", env=env, start_new_session=True)
    try:
        out, err = p.communicate(stdin_data, timeout=timeout)
    except subprocess.TimeoutExpired:
        # the plugin, or a child holding its stdout/stderr, outlived our limit: kill the
        # whole session it started, then collect what it wrote
        for sig in (signal.SIGKILL,):
            try:
                os.killpg(p.pid, sig)
            except OSError:
                pass
        try:
            out, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            out, err = b"", b""
        alive = p.poll() is None
        raise ScriptTimeout(
            "SCRIPT_TIMEOUT",
            [argv[0], f"no end of stdout and stderr within {timeout:g} s "
             + ("(the process itself had not exited)" if alive else
                "(a process it started kept stdout or stderr open)"),
             out.decode("utf-8", "replace")[-2000:]],
            argv[0], err.decode("utf-8", "replace")) from None
    except BaseException:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        p.wait()
        raise
    return p.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def _outcome(path, rc, out, err):
    """The daemon's reading of a finished process (main.ml fork_exec_rpc)."""
    if rc < 0:
        raise ScriptError("SCRIPT_FAILED",
                          [path, "signalled", signal.Signals(-rc).name, out, out], path, err)
    if rc != 0:
        try:
            rec = jsonio.loads(out)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
            low = {k.lower(): v for k, v in rec.items()}
            code, params, bt = low["code"], low["params"], low["backtrace"]
            if not (isinstance(code, str) and isinstance(params, list)
                    and all(isinstance(x, str) for x in params) and isinstance(bt, dict)):
                raise ValueError("bad types")
        except (ValueError, KeyError):
            raise ScriptError("SCRIPT_FAILED",
                              [path, "non-zero exit and bad json on stdout", str(rc), out, out],
                              path, err) from None
        raise ScriptError(code, params, path, err, bt)
    try:
        return jsonio.loads(out)
    except ValueError:
        raise ScriptError("SCRIPT_FAILED", [path, "bad json on stdout", out], path, err) from None


def run_json(script_dir, name, params, timeout=DEFAULT_TIMEOUT, env=None):
    """Run executable `name` of the plugin in `script_dir` as the daemon does; return the
    decoded result or raise ScriptError."""
    path = find_executable(script_dir, name)
    rc, out, err = _communicate([path, "--json"], jsonio.dumps(params).encode("utf-8"),
                                timeout, env)
    return _outcome(path, rc, out, err)


def run_cli(script_dir, name, args, timeout=DEFAULT_TIMEOUT, env=None):
    """Run executable `name` in command-line mode, as static-vdis does: argv
    [path, "static-vdis", *args], stdin closed at once (static-vdis finds the file by its
    exact name: no case folding)."""
    path = os.path.join(script_dir, name)
    if not os.access(path, os.X_OK):
        raise ScriptError("SCRIPT_MISSING", [path, "static-vdis: no such executable"], path)
    rc, out, err = _communicate([path, "static-vdis"] + [str(a) for a in args], b"",
                                timeout, env)
    return _outcome(path, rc, out, err)


# --- the datapath choice (pure) --------------------------------------------------------------

def uri_scheme(uri):
    """The scheme of a URI, as the daemon's URI parser sees it; None if there is none."""
    m = _SCHEME.match(uri) if isinstance(uri, str) else None
    return m.group(1) if m else None


def choose(uris, registered, persistent=True):
    """(scheme, uri) the daemon picks from a volume's `uris`, given `registered` =
    {scheme: [features]} of the registered datapath plugins; None when no URI has a registered
    scheme (the daemon then fails with MISSING_URI). persistent=False is epoch_begin of a
    non-persistent disk: the schemes declaring NONPERSISTENT go first, in their order."""
    possible = [(uri_scheme(u), u) for u in uris]
    possible = [(s, u) for s, u in possible if s is not None and s in registered]
    if not persistent:
        np = [(s, u) for s, u in possible if NONPERSISTENT in registered[s]]
        possible = np + [(s, u) for s, u in possible if NONPERSISTENT not in registered[s]]
    return possible[0] if possible else None


def missing_uri():
    return ScriptError("MISSING_URI", ["Please include a URI in the device-config"])


# --- the daemon -------------------------------------------------------------------------------

class Daemon:
    """The daemon over a plugin root (`<root>/volume/<name>/`, `<root>/datapath/<scheme>/`).

    Datapaths are registered at construction (and by `register()` again); the VDI-level
    methods below do what the daemon does for the SMAPIv2 call of the same name, returning
    the datapath's answer. Every plugin call made is appended to `calls` as
    (executable name, params) for tests and for the sequence table."""

    def __init__(self, root, timeout=DEFAULT_TIMEOUT, env=None, runner=None):
        self.root = root
        self.timeout = timeout
        self.env = env
        # runner(script_dir, name, params, timeout, env): run_json, or a caller's wrapper of it
        # that also keeps the raw answers (the conformance suite's)
        self.runner = runner or run_json
        self.calls = []
        self.datapaths = {}
        self.register()

    def register(self):
        self.datapaths = {}
        d = os.path.join(self.root, "datapath")
        for scheme in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            try:
                q = self._call(os.path.join(d, scheme), "Plugin.Query", {"dbg": "register"})
            except ScriptError:
                continue            # the daemon logs it and does not register the plugin
            if isinstance(q, dict) and q.get("required_api_version") in SUPPORTED_API_VERSIONS:
                self.datapaths[scheme] = list(q.get("features") or [])
        return dict(self.datapaths)

    def _call(self, script_dir, name, params):
        self.calls.append((os.path.basename(script_dir), name, dict(params)))
        return self.runner(script_dir, name, params, self.timeout, self.env)

    def volume(self, plugin, name, params):
        return self._call(os.path.join(self.root, "volume", plugin), name, params)

    def datapath(self, scheme, name, params):
        return self._call(os.path.join(self.root, "datapath", scheme), name, params)

    # SR- and VDI-level operations of the volume plugin (main.ml's SR.* and VDI.* handlers) ----
    def sr_create(self, dbg, plugin, uuid, configuration, name="", description=""):
        """SR.create: the configuration it answers replaces the device-config of every PBD of
        the SR (what each host's SR.attach then gets)."""
        return self.volume(plugin, "SR.create", {"dbg": dbg, "uuid": uuid,
                                                 "configuration": configuration, "name": name,
                                                 "description": description})

    def sr_attach(self, dbg, plugin, configuration):
        """PBD.plug: SR.attach, then SR.stat (the attach fails if that fails); the `sr`."""
        sr = self.volume(plugin, "SR.attach", {"dbg": dbg, "configuration": configuration})
        self.volume(plugin, "SR.stat", {"dbg": dbg, "sr": sr})
        return sr

    def sr_detach(self, dbg, plugin, sr):
        """PBD.unplug: SR.detach."""
        return self.volume(plugin, "SR.detach", {"dbg": dbg, "sr": sr})

    def sr_destroy(self, dbg, plugin, sr):
        """SR.destroy, of an SR xapi has just attached again (see sequences "sr-destroy")."""
        return self.volume(plugin, "SR.destroy", {"dbg": dbg, "sr": sr})

    def sr_scan(self, dbg, plugin, sr):
        """SR.scan2: SR.stat, whose health must be Healthy (xapi: SR_UNHEALTHY otherwise;
        the daemon retries Unreachable 3 times, 1 s apart: not emulated), then SR.ls; the
        volumes named by another's clone-on-boot key are hidden."""
        stat = self.volume(plugin, "SR.stat", {"dbg": dbg, "sr": sr})
        health = stat.get("health") if isinstance(stat, dict) else None
        if not (isinstance(health, list) and health and health[0] == "Healthy"):
            raise ScriptError("SR_UNHEALTHY", [sr, jsonio.dumps(health)])
        vols = self.volume(plugin, "SR.ls", {"dbg": dbg, "sr": sr})
        hidden = {(v.get("keys") or {}).get(CLONE_ON_BOOT) for v in vols}
        return [v for v in vols if v.get("key") not in hidden]

    def vdi_create(self, dbg, plugin, sr, name, description, size, sharable=False,
                   vdi_type="user"):
        """VDI.create: Volume.create, then Volume.set vdi-type (when xapi gives a type)."""
        vol = self.volume(plugin, "Volume.create", {"dbg": dbg, "sr": sr, "name": name,
                                                    "description": description, "size": size,
                                                    "sharable": sharable})
        if vdi_type:
            self.volume(plugin, "Volume.set", {"dbg": dbg, "sr": sr, "key": vol["key"],
                                               "k": "vdi-type", "v": vdi_type})
        return vol

    def vdi_snapshot(self, dbg, plugin, sr, key, content_id="", vdi_type="user", tags=(),
                     when=None):
        """VDI.snapshot: Volume.snapshot, then Volume.set on the snapshot of snapshot_time,
        is_a_snapshot "true", snapshot_of, content_id and vdi-type, then one Volume.set
        tags<t> = t on the source per tag of the VDI. Returns the snapshot as first answered."""
        snap = self.volume(plugin, "Volume.snapshot", {"dbg": dbg, "sr": sr, "key": key})
        stamp = when or time.strftime("%Y%m%dT%H:%M:%SZ", time.gmtime())
        for k, v in (("snapshot_time", stamp), ("is_a_snapshot", "true"), ("snapshot_of", key),
                     ("content_id", content_id), ("vdi-type", vdi_type)):
            self.volume(plugin, "Volume.set", {"dbg": dbg, "sr": sr, "key": snap["key"],
                                               "k": k, "v": v})
        for t in tags:
            self.volume(plugin, "Volume.set", {"dbg": dbg, "sr": sr, "key": key,
                                               "k": "tags" + t, "v": t})
        return snap

    def vdi_resize(self, dbg, plugin, sr, key, new_size):
        """VDI.resize: Volume.resize, then Volume.stat; the new virtual size xapi records."""
        self.volume(plugin, "Volume.resize", {"dbg": dbg, "sr": sr, "key": key,
                                              "new_size": new_size})
        return self.volume(plugin, "Volume.stat", {"dbg": dbg, "sr": sr, "key": key})["virtual_size"]

    def vdi_destroy(self, dbg, plugin, sr, key):
        """VDI.destroy: Volume.stat; with a clone-on-boot key, Volume.destroy of the *same* key
        first (upstream's quirk: not the clone), then Volume.destroy: a plugin must accept a
        destroy of a key already gone."""
        vol = self.volume(plugin, "Volume.stat", {"dbg": dbg, "sr": sr, "key": key})
        if (vol.get("keys") or {}).get(CLONE_ON_BOOT):
            self.volume(plugin, "Volume.destroy", {"dbg": dbg, "sr": sr, "key": key})
        self.volume(plugin, "Volume.destroy", {"dbg": dbg, "sr": sr, "key": key})

    # VDI-level operations ---------------------------------------------------------------------
    def _stat(self, dbg, plugin, sr, key, follow_clone=True):
        vol = self.volume(plugin, "Volume.stat", {"dbg": dbg, "sr": sr, "key": key})
        tmp = (vol.get("keys") or {}).get(CLONE_ON_BOOT)
        if follow_clone and tmp:
            vol = self.volume(plugin, "Volume.stat", {"dbg": dbg, "sr": sr, "key": tmp})
        return vol

    def _choose(self, vol, persistent=True):
        c = choose(vol.get("uri") or [], self.datapaths, persistent)
        if c is None:
            raise missing_uri()
        return c

    def epoch_begin(self, dbg, plugin, sr, key, persistent=True):
        vol = self._stat(dbg, plugin, sr, key, follow_clone=False)
        scheme, uri = self._choose(vol, persistent)
        if NONPERSISTENT in self.datapaths[scheme]:
            return self.datapath(scheme, "Datapath.open",
                                 {"dbg": dbg, "uri": uri, "persistent": persistent})
        if not persistent:
            old = (vol.get("keys") or {}).get(CLONE_ON_BOOT)
            if old:
                self.volume(plugin, "Volume.destroy", {"dbg": dbg, "sr": sr, "key": old})
            clone = self.volume(plugin, "Volume.clone", {"dbg": dbg, "sr": sr, "key": key})
            self.volume(plugin, "Volume.set", {"dbg": dbg, "sr": sr, "key": key,
                                               "k": CLONE_ON_BOOT, "v": clone["key"]})
        return None

    def epoch_end(self, dbg, plugin, sr, key):
        vol = self._stat(dbg, plugin, sr, key, follow_clone=False)
        scheme, uri = self._choose(vol)
        if NONPERSISTENT in self.datapaths[scheme]:
            return self.datapath(scheme, "Datapath.close", {"dbg": dbg, "uri": uri})
        tmp = (vol.get("keys") or {}).get(CLONE_ON_BOOT)
        if tmp:
            self.volume(plugin, "Volume.destroy", {"dbg": dbg, "sr": sr, "key": tmp})
            self.volume(plugin, "Volume.unset", {"dbg": dbg, "sr": sr, "key": key,
                                                 "k": CLONE_ON_BOOT})
        return None

    def _dp(self, dbg, plugin, sr, key, domain, *names):
        scheme, uri = self._choose(self._stat(dbg, plugin, sr, key))
        out = None
        for name in names:
            out = self.datapath(scheme, name, {"dbg": dbg, "uri": uri, "domain": domain})
        return out

    def attach(self, dbg, plugin, sr, key, domain):
        """VDI.attach3: the datapath's `backend` record."""
        return self._dp(dbg, plugin, sr, key, domain, "Datapath.attach")

    def activate(self, dbg, plugin, sr, key, domain, readonly=False):
        """VDI.activate3, or VDI.activate_readonly (xapi calls that for a read-only VBD when the
        volume plugin declares VDI_ACTIVATE_READONLY)."""
        return self._dp(dbg, plugin, sr, key, domain,
                        "Datapath.activate_readonly" if readonly else "Datapath.activate")

    def deactivate(self, dbg, plugin, sr, key, domain):
        return self._dp(dbg, plugin, sr, key, domain, "Datapath.deactivate")

    def detach(self, dbg, plugin, sr, key, domain):
        return self._dp(dbg, plugin, sr, key, domain, "Datapath.detach")

    def dp_destroy(self, dbg, plugin, sr, key, domain):
        """DP.destroy2: deactivate then detach."""
        return self._dp(dbg, plugin, sr, key, domain, "Datapath.deactivate", "Datapath.detach")


def dom0_token(dp):
    """The domain token the daemon gives a dom0 plug by xapi: "u0_" + the datapath name with
    every '/' and '-' made '_' (e.g. dp "vbd/0/xvda" -> "u0_vbd_0_xvda")."""
    return "u0_" + dp.replace("/", "_").replace("-", "_")


def wait_for(what, fn, timeout, interval=0.05):
    """fn() until it returns something true, at most `timeout` seconds; TimeoutError after."""
    end = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() >= end:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
