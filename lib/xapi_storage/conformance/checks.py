"""The checks of `xapi-storage conformance`, for volume plugins.

Each check is a function of a `Context` registered with `@check(name, needs=...)`, in the order
they run. A check whose `needs` (executables, or features of Plugin.Query) are missing is
skipped with the reason; one that finds a problem raises `Failed` with a message that names the
call, the request and the answer. An executable that is installed but answers `Unimplemented` is
a failure, not a skip: the daemon advertises a capability for every executable present
(SR.create -> SR_CREATE, Volume.snapshot -> VDI_SNAPSHOT, ...), so xapi will call it.

What the checks expect is what the real daemon and xapi do (xen-api ocaml/xapi-storage-script
main.ml, ocaml/xapi/storage_mux.ml; see docs/vendors/guide.md): the call sequences of `xe`
commands, the metadata keys the daemon writes with Volume.set, its repeated calls.
"""

import os
import threading
import uuid as uuidlib

from ..sdk import schema
from ..toolstack import daemon as _daemon
from ..toolstack import sequences

CHECKS = []     # [Check], in running order


class Failed(Exception):
    """A check found a problem; the message says which call and what came back."""


class Skipped(Exception):
    """A check cannot run against this plugin (a missing executable, feature or hook)."""


class Check:
    def __init__(self, name, fn, needs, features, doc):
        self.name, self.fn, self.needs, self.features, self.doc = name, fn, needs, features, doc


def check(name, needs=(), features=()):
    def register(fn):
        doc = " ".join((fn.__doc__ or "").split())
        CHECKS.append(Check(name, fn, tuple(needs), tuple(features), doc))
        return fn
    return register


# The executables whose presence makes the daemon advertise a capability to xapi
# (xen-api ocaml/xapi-storage-script/main.ml, the Query.query handler).
CAPABILITY_OF_EXECUTABLE = {
    "SR.attach": "SR_ATTACH", "SR.create": "SR_CREATE", "SR.destroy": "SR_DELETE",
    "SR.detach": "SR_DETACH", "SR.ls": "SR_SCAN", "SR.stat": "SR_UPDATE", "SR.probe": "SR_PROBE",
    "Volume.create": "VDI_CREATE", "Volume.clone": "VDI_CLONE", "Volume.snapshot": "VDI_SNAPSHOT",
    "Volume.resize": "VDI_RESIZE", "Volume.destroy": "VDI_DELETE", "Volume.stat": "VDI_UPDATE",
}

# Features a volume plugin may declare only with the executable xapi will then call.
EXECUTABLE_OF_FEATURE = {
    "SR_PROBE": "SR.probe", "SR_CREATE": "SR.create", "SR_DELETE": "SR.destroy",
    "SR_ATTACH": "SR.attach", "SR_DETACH": "SR.detach", "SR_SCAN": "SR.ls", "SR_UPDATE": "SR.stat",
    "VDI_CREATE": "Volume.create", "VDI_DELETE": "Volume.destroy",
    "VDI_DESTROY": "Volume.destroy", "VDI_UPDATE": "Volume.stat", "VDI_RESIZE": "Volume.resize",
    "VDI_SNAPSHOT": "Volume.snapshot", "VDI_CLONE": "Volume.clone", "VDI_REVERT": "Volume.revert",
    "VDI_COMPOSE": "Volume.compose", "VDI_CONFIG_CBT": "Volume.enable_cbt",
}

# The keys the daemon itself writes with Volume.set (ocaml/xapi-storage-script/main.ml); a
# plugin must give every one back verbatim in Volume.stat and SR.ls.
DAEMON_KEYS = ("vdi-type", "content_id", "snapshot_time", "is_a_snapshot", "snapshot_of",
               "clone-on-boot", "_sm_config_", "tags")


class Options:
    """Knobs of a run. `hide_storage`/`restore_storage`: callables of the SR's configuration
    that make its storage unreachable and bring it back (the storage-gone check needs both).
    `uris`, `size`, `scratch_dir`: for a datapath plugin, the URIs to plug (see
    conformance/datapath.py), the size of the scratch files made for {file} and {loop} and the
    directory they are made in (default: the system's temporary directory, $TMPDIR)."""

    def __init__(self, configuration=None, repeat=10, parallel=8, timeout=60.0, only=(),
                 hide_storage=None, restore_storage=None, env=None, uris=(), size=64 << 20,
                 scratch_dir=None):
        self.configuration = dict(configuration or {})
        self.uris = list(uris)      # a datapath plugin's run: the URIs it serves ({file}, {loop})
        self.size = int(size)
        self.scratch_dir = scratch_dir  # where those are made (default: the temporary directory)
        self.repeat = max(1, int(repeat))
        self.parallel = max(2, int(parallel))
        self.timeout = float(timeout)
        self.only = tuple(only)
        self.hide_storage = hide_storage
        self.restore_storage = restore_storage
        self.env = env


class Context:
    """What the checks share: the caller, the plugin's query, the SR the run made, and the
    volumes the run made and has not destroyed yet (the teardown destroys them)."""

    def __init__(self, caller, options, srtype):
        self.caller = caller
        self.opts = options
        self.srtype = srtype
        self.query = None
        self.features = set()
        self.sr = None
        self.sr_config = None
        self.sr_created = False
        self.sr_destroyed = False
        self.setup_problem = None
        self.storage_hidden = False
        self.volumes = set()
        self.plugged = set()     # (key, domain) a datapath may still hold: the teardown detaches
        self.check_name = "setup"
        self._lock = threading.Lock()
        d = caller.plugin_dir
        self.plugin = os.path.basename(d)
        self.daemon = _daemon.Daemon(os.path.dirname(os.path.dirname(d)), caller.timeout,
                                     options.env, runner=caller.runner)
        self.toolstack = sequences.Toolstack(self.daemon)

    def operation(self, op, **values):
        """Run a toolstack operation of the one table of call sequences
        (xapi_storage.toolstack.sequences) against the plugin, as the daemon would; returns
        its ctx (answers land there: "sr", "volume", "snapshot", "virtual_size", ...)."""
        ctx = dict(values, dbg=self.dbg(), plugin=self.plugin)
        if "sr" not in ctx and self.sr is not None:
            ctx["sr"] = self.sr
        before = len(self.caller.calls)
        try:
            return self.toolstack.run(op, ctx)
        except _daemon.ScriptError as e:
            failed = [o for o in self.caller.calls[before:] if o.daemon_error is e]
            what = failed[-1].describe() if failed else str(e)
            raise Failed(f"{op} (as xapi does it: {' '.join(sequences.plugin_calls(op))}): "
                         f"{what}{_unimplemented_hint(failed[-1] if failed else None)}") from None

    # --- calls ---------------------------------------------------------------------------

    def dbg(self):
        return f"conformance/{self.check_name}"

    def call(self, method, **params):
        params.setdefault("dbg", self.dbg())
        return self.caller.call(method, params)

    def ok(self, method, **params):
        """Call; the answer must be exit 0 with one JSON value. Returns the value."""
        out = self.call(method, **params)
        if not out.ok:
            raise Failed(f"{out.describe()}{_unimplemented_hint(out)}")
        return out.value

    def need(self, method):
        if not self.caller.has(method):
            raise Skipped(f"no executable {method}")

    def need_sr(self):
        """The check needs the run's SR: a failure if it could not be made (never a silent
        skip: a run with --only would otherwise pass on a plugin that cannot make an SR)."""
        if self.sr is None:
            if self.setup_problem and self.caller.has("SR.attach"):
                raise Failed(f"no attached SR: {self.setup_problem}")
            raise Skipped(f"no attached SR ({self.setup_problem or 'see sr-attach'})")

    # --- volumes ---------------------------------------------------------------------------

    def create(self, size=1 << 20, name="conformance", description="made by xapi-storage "
               "conformance", sharable=False):
        """A new volume as `xe vdi-create` makes it (Volume.create, Volume.set vdi-type)."""
        self.need("Volume.create")
        try:
            vol = self.operation("vdi-create", name=name, description=description, size=size,
                                 sharable=sharable)["volume"]
        except Failed:
            for o in list(self.caller.calls):           # made, but its Volume.set failed
                if o.method == "Volume.create" and o.ok and isinstance(o.value, dict) \
                        and isinstance(o.value.get("key"), str) \
                        and isinstance(o.request, dict) and o.request.get("name") == name:
                    self.track(o.value["key"])
            raise
        key = _key_of(vol, "Volume.create")
        self.track(key)
        return vol

    def track(self, key):
        with self._lock:
            self.volumes.add(key)

    def destroyed(self, key):
        with self._lock:
            self.volumes.discard(key)

    def stat(self, key):
        return _volume_of(self.ok("Volume.stat", sr=self.sr, key=key), "Volume.stat")

    def listing(self):
        """SR.ls as {key: volume}; fails if a key is listed twice."""
        vols = self.ok("SR.ls", sr=self.sr)
        if not isinstance(vols, list):
            raise Failed(f"SR.ls answered {type(vols).__name__}, not a list")
        out = {}
        for v in vols:
            key = _key_of(v, "SR.ls")
            if key in out:
                raise Failed(f"SR.ls lists volume {key} twice")
            out[key] = v
        return out

    # --- setup and teardown ----------------------------------------------------------------

    def setup(self):
        """Plugin.Query, then an SR: SR.create (when installed) with the run's configuration,
        SR.attach, SR.stat, as `xe sr-create` does. Problems are kept for sr-attach."""
        out = self.caller.call("Plugin.query", {"dbg": self.dbg()})
        if out.ok and isinstance(out.value, dict):
            self.query = out.value
            feats = out.value.get("features")
            if isinstance(feats, list):
                self.features = {f.split("/", 1)[0] for f in feats if isinstance(f, str)}
        if not self.caller.has("SR.attach"):
            self.setup_problem = "no SR.attach executable"
            return
        config = dict(self.opts.configuration)
        try:
            if self.caller.has("SR.create"):
                made = self.operation("sr-create", uuid=str(uuidlib.uuid4()),
                                      configuration=config, name="conformance",
                                      description="made by xapi-storage conformance")
                self.sr_created = True
                # the daemon gives this to every host's SR.attach (it replaces the PBDs' config)
                config = made["configuration"]
                if not isinstance(config, dict):
                    raise Failed(f"SR.create answered {config!r}, not a configuration map")
                sr = made["sr"]
            else:
                sr = self.operation("sr-attach", configuration=config)["sr"]
            self.sr_config = config
            if not isinstance(sr, str):
                raise Failed(f"SR.attach answered {sr!r}, not a string")
            self.sr = sr
            if self.caller.has("SR.stat"):
                stat = self.ok("SR.stat", sr=sr)
                health = stat.get("health") if isinstance(stat, dict) else None
                if not (isinstance(health, list) and health and health[0] == "Healthy"):
                    raise Failed(f"SR.stat right after SR.attach reports health {health!r}: "
                                 "the daemon's SR.scan refuses an SR that is not Healthy")
        except Failed as e:
            self.setup_problem = str(e)

    def teardown(self, report=None):
        """Destroy what the run made and is still there; bring hidden storage back. Never
        raises; returns the list of problems (also given to `report`)."""
        problems = []
        if self.storage_hidden and self.opts.restore_storage is not None:
            try:
                self.opts.restore_storage(self.sr_config)
                self.storage_hidden = False
            except Exception as e:  # noqa: BLE001 - teardown goes on and says it
                problems.append(f"restoring the storage: {type(e).__name__}: {e}")
        for key, domain in sorted(self.plugged):
            try:
                self.daemon.dp_destroy(self.dbg(), self.plugin, self.sr, key, domain)
            except _daemon.ScriptError as e:
                problems.append(f"teardown: detaching {key} from domain {domain!r}: {e}")
        self.plugged.clear()
        if self.sr is not None and not self.sr_destroyed:
            for key in sorted(self.volumes):
                out = self.call("Volume.destroy", sr=self.sr, key=key)
                if out.rc == 0:
                    self.destroyed(key)
                else:
                    problems.append(f"teardown: {out.describe()}")
            if self.sr_created and self.caller.has("SR.destroy"):
                # as xapi destroys an SR: attached (a check may have left it detached)
                self.call("SR.attach", configuration=self.sr_config)
                out = self.call("SR.destroy", sr=self.sr)
                if out.rc == 0:
                    self.sr_destroyed = True
                else:
                    problems.append(f"teardown: {out.describe()}")
            elif self.caller.has("SR.detach"):
                self.call("SR.detach", sr=self.sr)
        for p in problems:
            if report is not None:
                report(p)
        return problems


# --- helpers --------------------------------------------------------------------------------

def _unimplemented_hint(out):
    if out is None or out.error_name() != "Unimplemented":
        return ""
    cap = CAPABILITY_OF_EXECUTABLE.get(out.method)
    return (" (the executable is installed, so the daemon "
            + (f"advertises {cap} and " if cap else "")
            + "xapi will call it: implement it or do not install it)")


def _key_of(vol, method):
    if not isinstance(vol, dict) or not isinstance(vol.get("key"), str) or not vol["key"]:
        raise Failed(f"{method} answered {vol!r}: not a volume with a key")
    return vol["key"]


def _volume_of(vol, method):
    _key_of(vol, method)
    return vol


def _require_record(out):
    problem = record_problem(out.value)
    if problem:
        raise Failed(f"{out.describe()}: {problem}")


def record_problem(value):
    """Why `value` is not an error record the daemon can read, or None."""
    if not isinstance(value, dict):
        return "stdout is not an error record {code, params, backtrace}"
    if not isinstance(value.get("code"), str):
        return "the error record's code is not a string"
    params = value.get("params")
    if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
        return "the error record's params is not a list of strings"
    bt = value.get("backtrace")
    if not isinstance(bt, dict):
        return "the error record has no backtrace object {error, files, lines}"
    if not isinstance(bt.get("error"), str):
        return "the backtrace's error is not a string"
    files, lines = bt.get("files"), bt.get("lines")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return "the backtrace's files is not a list of strings"
    if not isinstance(lines, list) or not all(type(n) is int for n in lines):
        return "the backtrace's lines is not a list of integers"
    if len(files) != len(lines):
        return "the backtrace's files and lines differ in length"
    return None


def result_problem(out):
    """Why a call's stdout is not what the daemon accepts for its exit status, or None."""
    if out.timed_out or out.rc == 127 and not out.stdout:
        return None
    if out.parse_error is not None:
        return f"stdout is not one strict JSON value ({out.parse_error})"
    if out.rc != 0:
        return record_problem(out.value)
    method = schema.lookup(out.method)
    if method is None:
        return None
    try:
        method.check_result(out.value)
    except schema.Violation as v:
        return f"result field {v.where}: {v.message} (rule {v.rule})"
    return None


def _parallel(fn, args_list):
    """Run fn(*args) for each args at once, in threads; results in order. Exceptions are
    returned in place of results."""
    results = [None] * len(args_list)

    def run(i, args):
        try:
            results[i] = fn(*args)
        except Exception as e:  # noqa: BLE001 - reported by the caller
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, Exception):
            raise r
    return results


# --- the checks, in running order ------------------------------------------------------------

@check("plugin-query", needs=("Plugin.query",))
def plugin_query(ctx):
    """Plugin.Query answers a query record with required_api_version "5.0", a `plugin` equal
    to the SR type of the directory name (`org.xen.xapi.storage.<srtype>`), and no feature
    whose executable is missing."""
    q = ctx.ok("Plugin.query")
    if not isinstance(q, dict):
        raise Failed(f"Plugin.Query answered {q!r}, not a record")
    if q.get("required_api_version") != "5.0":
        raise Failed(f"required_api_version is {q.get('required_api_version')!r}: declare "
                     "\"5.0\" (xapi deletes the SM record of an older volume plugin at start)")
    if ctx.srtype is not None and q.get("plugin") != ctx.srtype:
        raise Failed(f"plugin is {q.get('plugin')!r} but the directory's SR type is "
                     f"{ctx.srtype!r}: xapi's SM record and SR type would disagree")
    for f in sorted(ctx.features):
        exe = EXECUTABLE_OF_FEATURE.get(f)
        if exe and not ctx.caller.has(exe):
            raise Failed(f"features has {f} but there is no {exe} executable: xapi will "
                         f"call it and get SCRIPT_MISSING")


@check("sr-attach", needs=("SR.attach",))
def sr_attach(ctx):
    """SR.create (when installed) answers a configuration that SR.attach takes; SR.stat works
    right after SR.attach and reports Healthy; SR.attach repeated (every host of a pool, every
    PBD.plug) answers the same `sr`; SR.detach repeated succeeds and the SR attaches again."""
    if ctx.setup_problem:
        raise Failed(ctx.setup_problem)
    for i in range(ctx.opts.repeat):
        again = ctx.ok("SR.attach", configuration=ctx.sr_config)
        if again != ctx.sr:
            raise Failed(f"SR.attach #{i + 2} answered {again!r}, the first {ctx.sr!r}: the "
                         "daemon keeps one sr per SR, for every host")
    if ctx.caller.has("SR.detach"):
        for _ in range(min(ctx.opts.repeat, 3)):
            ctx.ok("SR.detach", sr=ctx.sr)
        again = ctx.ok("SR.attach", configuration=ctx.sr_config)
        if again != ctx.sr:
            raise Failed(f"SR.attach after SR.detach answered {again!r}, before {ctx.sr!r}")
        if ctx.caller.has("SR.stat"):
            ctx.ok("SR.stat", sr=ctx.sr)


@check("probe", needs=("SR.probe",))
def probe(ctx):
    """SR.probe of the configuration the SR was made with (xe sr-probe, before xe
    sr-introduce on another pool) finds that SR: a complete result with `sr`, whose
    configuration has the SR's sr_uuid when the configuration has one."""
    ctx.need_sr()
    found = ctx.ok("SR.probe", configuration=ctx.sr_config)
    if not isinstance(found, list):
        raise Failed(f"SR.probe answered {found!r}, not a list")
    hits = [r for r in found if isinstance(r, dict) and r.get("complete") is True and "sr" in r]
    want = ctx.sr_config.get("sr_uuid")
    if want is not None:
        hits = [r for r in hits
                if isinstance(r.get("configuration"), dict)
                and r["configuration"].get("sr_uuid") == want]
    if not hits:
        raise Failed(f"SR.probe of the SR's own configuration {ctx.sr_config!r} answered "
                     f"{found!r}: no complete result with `sr`"
                     + (f" and sr_uuid {want}" if want else ""))


@check("create-size", needs=("Volume.create",))
def create_size(ctx):
    """Volume.create gives virtual_size >= the size asked (sizes not multiples of 512
    included), keeps name and description, and the volume is in Volume.stat and SR.ls with the
    same size."""
    ctx.need_sr()
    made = []
    for size in (1, 512, 4097, (1 << 20) + 1, 10 << 20):
        name = f"conformance size {size}"
        vol = ctx.create(size=size, name=name, description=f"asked for {size} bytes")
        if not isinstance(vol.get("virtual_size"), int) or vol["virtual_size"] < size:
            raise Failed(f"Volume.create size={size} answered virtual_size "
                         f"{vol.get('virtual_size')!r}: smaller than asked")
        if vol.get("name") != name:
            raise Failed(f"Volume.create name={name!r} answered name {vol.get('name')!r}")
        made.append(vol)
    listed = ctx.listing() if ctx.caller.has("SR.ls") else None
    for vol in made:
        if ctx.caller.has("Volume.stat"):
            st = ctx.stat(vol["key"])
            if st.get("virtual_size") != vol["virtual_size"]:
                raise Failed(f"Volume.stat of {vol['key']} says virtual_size "
                             f"{st.get('virtual_size')!r}, Volume.create said {vol['virtual_size']}")
        if listed is not None and vol["key"] not in listed:
            raise Failed(f"SR.ls does not list the new volume {vol['key']}")


_ODD_KEYS = {
    "vdi-type": "user", "is_a_snapshot": "false", "content_id": "cafe-0001",
    "snapshot_time": "20260101T00:00:00Z", "_sm_config_host_OpaqueRef:1": "RW",
    "tagsgold": "gold", "a key with spaces": "a value\twith\ntabs and \"quotes\"",
    "ünïcödé": "värde ✓", "empty": "",
}


@check("volume-keys", needs=("Volume.create", "Volume.set", "Volume.stat"))
def volume_keys(ctx):
    """Volume.set keys come back verbatim in Volume.stat and SR.ls: the daemon's own
    (vdi-type, is_a_snapshot, content_id, snapshot_time, snapshot_of, clone-on-boot,
    _sm_config_*, tags*), non-ASCII, spaces, quotes, newlines, empty values; a second set
    replaces the value; Volume.unset removes the key."""
    ctx.need_sr()
    vol = ctx.create()
    key = vol["key"]
    want = dict(_ODD_KEYS, snapshot_of=key, **{"clone-on-boot": key})
    for k, v in want.items():
        ctx.ok("Volume.set", sr=ctx.sr, key=key, k=k, v=v)
    ctx.ok("Volume.set", sr=ctx.sr, key=key, k="vdi-type", v="system")
    want["vdi-type"] = "system"
    sources = [("Volume.stat", ctx.stat(key).get("keys"))]
    if ctx.caller.has("SR.ls"):
        sources.append(("SR.ls", ctx.listing()[key].get("keys")))
    for where, got in sources:
        if not isinstance(got, dict):
            raise Failed(f"{where} of {key}: keys is {got!r}, not a map")
        for k, v in want.items():
            if got.get(k) != v:
                raise Failed(f"{where} of {key}: key {k!r} is {got.get(k)!r}, Volume.set gave {v!r}")
    if ctx.caller.has("Volume.unset"):
        ctx.ok("Volume.unset", sr=ctx.sr, key=key, k="tagsgold")
        got = ctx.stat(key).get("keys", {})
        if "tagsgold" in got:
            raise Failed(f"Volume.unset of key 'tagsgold' on {key}: Volume.stat still has it")


@check("snapshot", needs=("Volume.create", "Volume.snapshot", "Volume.set"))
def snapshot(ctx):
    """Volume.snapshot answers a new, read-only volume with its own key and the source's
    virtual_size; the source is unchanged; the daemon's Volume.set calls that follow every
    snapshot (snapshot_time, is_a_snapshot="true", snapshot_of, content_id, vdi-type on the
    snapshot, a tag on the source) work; is_a_snapshot is exactly "true" or "false" in SR.ls."""
    ctx.need_sr()
    src = ctx.create(size=(2 << 20) + 512)
    try:
        snap = ctx.operation("vdi-snapshot", key=src["key"], content_id="c0ffee",
                             tags=("conformance",))["snapshot"]
    finally:
        for o in ctx.caller.calls:
            if o.method == "Volume.snapshot" and o.ok and isinstance(o.value, dict) \
                    and isinstance(o.value.get("key"), str):
                ctx.track(o.value["key"])
    _volume_of(snap, "Volume.snapshot")
    if snap["key"] == src["key"]:
        raise Failed(f"Volume.snapshot of {src['key']} answered the same key")
    if snap.get("virtual_size") != src["virtual_size"]:
        raise Failed(f"Volume.snapshot: virtual_size {snap.get('virtual_size')!r}, the source "
                     f"has {src['virtual_size']}")
    if snap.get("read_write") is not False:
        raise Failed(f"Volume.snapshot answered read_write {snap.get('read_write')!r}: a "
                     "snapshot is read-only")
    if ctx.caller.has("Volume.stat"):
        after = ctx.stat(src["key"])
        if after.get("virtual_size") != src["virtual_size"] or after.get("read_write") is not True:
            raise Failed(f"the source {src['key']} changed after Volume.snapshot: {after!r}")
    if ctx.caller.has("SR.ls"):
        listed = ctx.listing()
        if snap["key"] not in listed:
            raise Failed(f"SR.ls does not list the snapshot {snap['key']}")
        for key, v in listed.items():
            flag = v.get("keys", {}).get("is_a_snapshot") if isinstance(v.get("keys"), dict) else None
            if flag is not None and flag not in ("true", "false"):
                raise Failed(f"SR.ls: volume {key} has is_a_snapshot {flag!r}: xapi's SR.scan "
                             "fails on anything but \"true\" or \"false\"")


@check("clone", needs=("Volume.create", "Volume.clone"))
def clone(ctx):
    """Volume.clone answers a new writable volume with its own key and the source's
    virtual_size; the non-persistent boot the daemon emulates with it works (clone, Volume.set
    clone-on-boot on the source, at shutdown Volume.destroy of the clone and Volume.unset)."""
    ctx.need_sr()
    src = ctx.create(size=(1 << 20) + 4096)
    cl = _volume_of(ctx.ok("Volume.clone", sr=ctx.sr, key=src["key"]), "Volume.clone")
    ctx.track(cl["key"])
    if cl["key"] == src["key"]:
        raise Failed(f"Volume.clone of {src['key']} answered the same key")
    if cl.get("virtual_size") != src["virtual_size"]:
        raise Failed(f"Volume.clone: virtual_size {cl.get('virtual_size')!r}, the source has "
                     f"{src['virtual_size']}")
    if cl.get("read_write") is not True:
        raise Failed(f"Volume.clone answered read_write {cl.get('read_write')!r}: a clone is "
                     "writable")
    if ctx.caller.has("Volume.set") and ctx.caller.has("Volume.destroy"):
        ctx.ok("Volume.set", sr=ctx.sr, key=src["key"], k="clone-on-boot", v=cl["key"])
        ctx.ok("Volume.destroy", sr=ctx.sr, key=cl["key"])
        ctx.destroyed(cl["key"])
        if ctx.caller.has("Volume.unset"):
            ctx.ok("Volume.unset", sr=ctx.sr, key=src["key"], k="clone-on-boot")


@check("resize", needs=("Volume.create", "Volume.resize", "Volume.stat"))
def resize(ctx):
    """Volume.resize to a size 2 MiB + 1 byte above the volume's virtual_size (not a multiple of
    512) gives virtual_size >= the new size in Volume.stat; resizing to the current size
    changes nothing."""
    ctx.need_sr()
    vol = ctx.create(size=1 << 20)
    # larger than what the plugin gave (xapi refuses a VDI.resize below the VDI's virtual size
    # before the daemon is called: a plugin rounding sizes up never sees one)
    new = vol["virtual_size"] + (2 << 20) + 1
    size = ctx.operation("vdi-resize", key=vol["key"], new_size=new)["virtual_size"]
    if not isinstance(size, int) or size < new:
        raise Failed(f"Volume.resize new_size={new}: Volume.stat then says virtual_size "
                     f"{size!r}")
    again = ctx.operation("vdi-resize", key=vol["key"], new_size=size)["virtual_size"]
    if again != size:
        raise Failed(f"Volume.resize to the current size changed virtual_size from "
                     f"{size} to {again!r}")


@check("destroy-missing", needs=("Volume.create", "Volume.destroy", "Volume.set", "Volume.stat"))
def destroy_missing(ctx):
    """Volume.destroy of a volume already destroyed succeeds: xe vdi-destroy of a disk with the
    key clone-on-boot makes the daemon destroy the same key twice, and a retried destroy once
    more; the volume is no longer listed."""
    ctx.need_sr()
    vol = ctx.create()
    # a disk that was booted non-persistent keeps the key clone-on-boot: xe vdi-destroy then
    # makes the daemon destroy the same key twice
    ctx.ok("Volume.set", sr=ctx.sr, key=vol["key"], k="clone-on-boot", v=vol["key"])
    try:
        ctx.operation("vdi-destroy", key=vol["key"])
    finally:
        if not ctx.call("Volume.stat", sr=ctx.sr, key=vol["key"]).ok:
            ctx.destroyed(vol["key"])       # gone: nothing left for the teardown
    ctx.ok("Volume.destroy", sr=ctx.sr, key=vol["key"])
    if ctx.caller.has("SR.ls") and vol["key"] in ctx.listing():
        raise Failed(f"SR.ls still lists {vol['key']} after Volume.destroy")


@check("repeat-converges", needs=("Volume.create", "Volume.stat"))
def repeat_converges(ctx):
    """Every call the daemon may repeat, repeated N times (--repeat), succeeds each time and
    ends where one call would: SR.stat, SR.ls, Volume.stat, Volume.set, Volume.unset (also of
    an absent key), Volume.set_name, Volume.set_description, Volume.resize to the same size."""
    ctx.need_sr()
    vol = ctx.create()
    key = vol["key"]
    calls = [("Volume.stat", {"key": key})]
    if ctx.caller.has("SR.stat"):
        calls.append(("SR.stat", {}))
    if ctx.caller.has("SR.ls"):
        calls.append(("SR.ls", {}))
    for method, extra in (("Volume.set", {"key": key, "k": "vdi-type", "v": "user"}),
                          ("Volume.unset", {"key": key, "k": "conformance-absent"}),
                          ("Volume.set_name", {"key": key, "new_name": "repeated"}),
                          ("Volume.set_description", {"key": key, "new_description": "again"}),
                          ("Volume.resize", {"key": key, "new_size": vol["virtual_size"]})):
        if ctx.caller.has(method):
            calls.append((method, extra))
    for method, extra in calls:
        first = None
        for i in range(ctx.opts.repeat):
            got = _comparable(method, ctx.ok(method, sr=ctx.sr, **extra))
            if i and got != first:
                raise Failed(f"{method} {extra!r} repeated: answer #{i + 1} {got!r} differs from "
                             f"the first {first!r}")
            first = got
    st = ctx.stat(key)
    want = {"Volume.set": ("keys", {"vdi-type": "user"}),
            "Volume.set_name": ("name", "repeated"),
            "Volume.set_description": ("description", "again")}
    for method, (field, value) in want.items():
        if not ctx.caller.has(method):
            continue
        got = st.get(field)
        if isinstance(value, dict):
            got = {k: got.get(k) for k in value} if isinstance(got, dict) else got
        if got != value:
            raise Failed(f"after {method} repeated, Volume.stat has {field} {st.get(field)!r}")


def _comparable(method, value):
    """An answer without the fields that may change between two identical calls."""
    if method == "SR.stat" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in ("free_space", "total_space",
                                                             "datasources")}
    if method == "SR.ls" and isinstance(value, list):
        return sorted(v.get("key") for v in value if isinstance(v, dict))
    if method == "Volume.stat" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "physical_utilisation"}
    return value


@check("parallel", needs=("Volume.create", "Volume.destroy", "SR.ls"))
def parallel(ctx):
    """Calls on one SR at the same time (the daemon runs them concurrently): N Volume.create
    give N distinct volumes, each listed once; N Volume.set of different keys on one volume
    lose none; N Volume.destroy leave none listed."""
    ctx.need_sr()
    n = ctx.opts.parallel
    vols = _parallel(lambda i: ctx.create(name=f"parallel {i}"), [(i,) for i in range(n)])
    keys = [v["key"] for v in vols]
    if len(set(keys)) != n:
        raise Failed(f"{n} concurrent Volume.create answered {len(set(keys))} distinct keys: {keys}")
    listed = ctx.listing()
    missing = [k for k in keys if k not in listed]
    if missing:
        raise Failed(f"after {n} concurrent Volume.create, SR.ls does not list {missing}")
    if ctx.caller.has("Volume.set") and ctx.caller.has("Volume.stat"):
        target = keys[0]
        _parallel(lambda i: ctx.ok("Volume.set", sr=ctx.sr, key=target, k=f"parallel-{i}",
                                   v=str(i)), [(i,) for i in range(n)])
        got = ctx.stat(target).get("keys", {})
        lost = [i for i in range(n) if got.get(f"parallel-{i}") != str(i)]
        if lost:
            raise Failed(f"{n} concurrent Volume.set of different keys on {target}: Volume.stat "
                         f"then lacks parallel-{lost[0]} (and {len(lost) - 1} more): a lost update")

    def destroy(key):
        ctx.ok("Volume.destroy", sr=ctx.sr, key=key)
        ctx.destroyed(key)

    _parallel(destroy, [(k,) for k in keys])
    left = [k for k in keys if k in ctx.listing()]
    if left:
        raise Failed(f"after {n} concurrent Volume.destroy, SR.ls still lists {left}")


@check("bad-inputs", needs=("Volume.stat",))
def bad_inputs(ctx):
    """Bad requests get an error record on stdout with exit status 1, never a made-up answer:
    stdin that is not JSON, a missing parameter, a parameter of the wrong type, and the key of
    a volume that does not exist."""
    ctx.need_sr()
    cases = [("stdin not JSON", None), ("no key", {"dbg": ctx.dbg(), "sr": ctx.sr}),
             ("key is a number", {"dbg": ctx.dbg(), "sr": ctx.sr, "key": 42}),
             ("unknown key", {"dbg": ctx.dbg(), "sr": ctx.sr,
                              "key": f"conformance-no-such-volume-{uuidlib.uuid4()}"})]
    for what, request in cases:
        if request is None:
            out = ctx.caller.call_stdin("Volume.stat", b"{not json")
        else:
            out = ctx.caller.call("Volume.stat", request)
        if out.rc == 0:
            raise Failed(f"{what}: {out.describe()}: expected exit 1 and an error record")
        _require_record(out)
        if out.rc != 1:
            raise Failed(f"{what}: {out.describe()}: expected exit status 1")


@check("static-vdis", needs=("Plugin.query", "SR.attach", "Volume.create", "Volume.stat"),
       features=("VDI_ATTACH_OFFLINE",))
def static_vdis(ctx):
    """With VDI_ATTACH_OFFLINE declared, the command-line mode static-vdis uses at boot
    (`Plugin.Query static-vdis`, `SR.attach static-vdis --configuration K V ...`,
    `Volume.stat static-vdis SR KEY`) answers what JSON mode answers."""
    ctx.need_sr()
    vol = ctx.create()
    q = ctx.caller.call_cli("Plugin.Query", ["static-vdis"])
    if not q.ok or q.value != ctx.query:
        raise Failed(f"{q.describe()}: differs from Plugin.Query in JSON mode")
    args = ["static-vdis"]
    for k, v in sorted(ctx.sr_config.items()):
        args += ["--configuration", k, v]
    a = ctx.caller.call_cli("SR.attach", args)
    if not a.ok or a.value != ctx.sr:
        raise Failed(f"{a.describe()}: JSON mode answered {ctx.sr!r}")
    s = ctx.caller.call_cli("Volume.stat", ["static-vdis", ctx.sr, vol["key"]])
    want = ctx.stat(vol["key"])
    if not s.ok or not isinstance(s.value, dict) or s.value.get("uri") != want.get("uri"):
        raise Failed(f"{s.describe()}: JSON mode answered uri {want.get('uri')!r}")


@check("datapath", needs=("Volume.create", "Volume.stat"))
def datapath(ctx):
    """With a datapath plugin installed (in the same root) for one of a volume's URI schemes:
    the datapath calls as the toolstack repeats them succeed and converge. A dom0 plug (xapi's
    copies) answers a File or BlockDevice under /dev, the same on every repeated attach and
    activate; VM shutdown (deactivate, then deactivate again and detach, then epoch_end) runs
    twice, as a retried shutdown does; static-vdis (command-line mode, domain "0") attaches
    and detaches when the volume plugin declares VDI_ATTACH_OFFLINE. Every answer of the
    datapath plugin is one the daemon can read (as results-valid checks the volume plugin's)."""
    ctx.need_sr()
    vol = ctx.create()
    schemes = [_daemon.uri_scheme(u) for u in vol.get("uri") or []]
    if _daemon.choose(vol.get("uri") or [], ctx.daemon.datapaths) is None:
        raise Skipped(f"no datapath plugin installed beside this one for the volume's URI "
                      f"schemes {schemes}")
    key = vol["key"]
    seen = {d: len(c.calls) for d, c in ctx.caller.others.items()}
    try:
        _datapath_sequences(ctx, vol)
    finally:
        bad = []
        for d, c in sorted(ctx.caller.others.items()):
            for out in c.calls[seen.get(d, 0):]:
                problem = result_problem(out)
                if problem:
                    bad.append(f"{os.path.basename(d)}: {out.describe(200)}: {problem}")
    if bad:
        raise Failed(bad[0] + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))


def _datapath_sequences(ctx, vol):
    key = vol["key"]
    dom0 = _daemon.dom0_token("vbd/0/xvdz")
    ctx.plugged.add((key, dom0))
    plug = ctx.operation("dom0-plug", key=key, dp="vbd/0/xvdz")
    backend, token = plug["backend"], plug["domain"]
    for i in range(ctx.opts.repeat):
        again = ctx.operation("dom0-plug", key=key, dp="vbd/0/xvdz")["backend"]
        if again != backend:
            raise Failed(f"dom0-plug #{i + 2}: Datapath.attach answered {again!r}, the first "
                         f"{backend!r}")
    ctx.operation("dom0-unplug", key=key, dp="vbd/0/xvdz")
    ctx.plugged.discard((key, dom0))
    ctx.operation("dom0-unplug", key=key, dp="vbd/0/xvdz")
    # a guest's disk, without XenStore: VDI.epoch_begin, attach3, activate3, then the shutdown
    guest = {"key": key, "domain": "7"}
    ctx.plugged.add((key, "7"))
    ctx.daemon.epoch_begin(ctx.dbg(), ctx.plugin, ctx.sr, key)
    try:
        for _ in range(min(ctx.opts.repeat, 3)):
            ctx.daemon.attach(ctx.dbg(), ctx.plugin, ctx.sr, key, "7")
            ctx.daemon.activate(ctx.dbg(), ctx.plugin, ctx.sr, key, "7")
    except _daemon.ScriptError as e:
        raise Failed(f"attach/activate for domain 7, repeated: {e}") from None
    ctx.operation("vm-shutdown", **guest)
    ctx.plugged.discard((key, "7"))
    ctx.operation("vm-shutdown", **guest)
    if "VDI_ATTACH_OFFLINE" in ctx.features:
        ctx.plugged.add((key, "0"))
        first = ctx.operation("static-vdis-attach", key=key)["uri"]
        if first != vol["uri"][0]:
            raise Failed(f"static-vdis used {first!r}, the volume's first URI is {vol['uri'][0]!r}")
        ctx.operation("static-vdis-detach", key=key)
    ctx.plugged.clear()


@check("storage-gone", needs=("Volume.create", "SR.ls"))
def storage_gone(ctx):
    """With the SR's storage made unreachable (--hide-storage), SR.ls fails instead of
    answering an empty list (xapi's SR.scan would forget every VDI of the SR); once the
    storage is back (--restore-storage) the volume is listed again."""
    ctx.need_sr()
    if ctx.opts.hide_storage is None or ctx.opts.restore_storage is None:
        raise Skipped("give --hide-storage and --restore-storage to run it")
    vol = ctx.create()
    ctx.opts.hide_storage(ctx.sr_config)
    ctx.storage_hidden = True
    try:
        out = ctx.call("SR.ls", sr=ctx.sr)
        if out.ok and out.value == []:
            raise Failed(f"storage hidden: {out.describe()}: an SR whose storage is gone must "
                         "not be reported empty (SR.scan would drop every VDI)")
    finally:
        ctx.opts.restore_storage(ctx.sr_config)
        ctx.storage_hidden = False
    if vol["key"] not in ctx.listing():
        raise Failed(f"storage restored: SR.ls does not list {vol['key']} again")


@check("cleanup", needs=("Volume.destroy",))
def cleanup(ctx):
    """Everything the run made goes: Volume.destroy of each remaining volume, SR.ls lists none
    of them, then (when the run created the SR) xe sr-destroy succeeds as xapi does it (SR.detach
    by xe pbd-unplug, then SR.attach and SR.stat, then SR.destroy of the attached SR) and
    SR.attach of the same configuration fails afterwards."""
    ctx.need_sr()
    made = sorted(ctx.volumes)
    for key in made:
        ctx.ok("Volume.destroy", sr=ctx.sr, key=key)
        ctx.destroyed(key)
    if ctx.caller.has("SR.ls"):
        left = [k for k in made if k in ctx.listing()]
        if left:
            raise Failed(f"SR.ls still lists {left} after Volume.destroy")
    if ctx.sr_created and ctx.caller.has("SR.destroy"):
        if ctx.caller.has("SR.detach"):
            ctx.operation("sr-destroy", configuration=ctx.sr_config)
        else:
            ctx.ok("SR.destroy", sr=ctx.sr)
        ctx.sr_destroyed = True
        out = ctx.call("SR.attach", configuration=ctx.sr_config)
        if out.rc == 0:
            raise Failed(f"after SR.destroy, {out.describe()}: the SR is still there")


@check("results-valid")
def results_valid(ctx):
    """Every answer of the whole run is what the daemon can read: one strict JSON value on
    stdout; on exit 0 a result valid against the interface's schema and rpclib's rules (no null
    for an optional field, maps as objects, integers never written as floats); otherwise an
    error record {code, params: [string], backtrace: {error, files, lines}}."""
    bad = []
    for out in list(ctx.caller.calls):
        problem = result_problem(out)
        if problem:
            bad.append(f"{out.describe(200)}: {problem}")
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise Failed(bad[0] + more)
