"""The checks of `xapi-storage conformance` for a datapath plugin on its own.

A vendor of a datapath (a URI scheme) has no volume plugin to test it with, only URIs its
datapath serves. The run gives those URIs (`--uri`; `{file}` in one is replaced by the path of
a sparse scratch file the run makes, `{loop}` by a loop device over one) to a stand-in volume
plugin of the run's own, whose only executable, Volume.stat, answers one volume per URI. The
stand-in and the datapath (a symbolic link to its directory) form a plugin root of the run's
own, so that every datapath call is made by the project's emulation of the daemon
(xapi_storage.toolstack.daemon: registration by Plugin.Query, the datapath chosen by scheme,
Datapath.open/close at VDI.epoch_begin/epoch_end only with NONPERSISTENT) replaying the
toolstack's own call sequences (xapi_storage.toolstack.sequences): dom0 plugs, VM start and
shutdown, live migration, static-vdis. No XenStore is involved: what xenopsd then does with
the attach result is for the simulated Xen and the test bed.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time

from ..toolstack import daemon as _daemon
from ..toolstack import xenopsd
from . import checks as _c
from .caller import Caller
from .checks import Failed, Skipped

DATAPATH_CHECKS = []        # [checks.Check], in running order

STAND_IN = "org.xen.xapi.storage.conformance-uri"
SR = "conformance-sr"
PLACEHOLDERS = ("{file}", "{loop}")


class SetupError(Exception):
    """The run could not make its own scratch storage (a full or read-only scratch
    directory, a --size the filesystem cannot hold, no free loop device): nothing was checked,
    and what the run had made is removed."""


_STAND_IN_SOURCE = '''\
#!{python} -IS
# The conformance run's stand-in volume plugin: Volume.stat answers the volumes of volumes.json
# (one per URI given to the run), in JSON mode and in static-vdis' command-line mode.
import json, os, sys
with open(os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), "volumes.json")) as f:
    volumes = json.load(f)
if sys.argv[1:2] == ["--json"]:
    key = json.loads(sys.stdin.read()).get("key")
else:
    key = sys.argv[-1]
if key in volumes:
    print(json.dumps(volumes[key]))
else:
    print(json.dumps({{"code": "SR_BACKEND_FAILURE", "params": ["Volume_does_not_exist", str(key)],
                      "backtrace": {{"error": "", "files": [], "lines": []}}}}))
    sys.exit(1)
'''


def dp_check(name, needs=(), features=()):
    """Register a datapath check. Whatever it left plugged (a failure half-way) is unplugged
    right after it, so that the next check starts from a volume nobody holds."""
    def register(fn):
        doc = " ".join((fn.__doc__ or "").split())

        def run(ctx):
            try:
                fn(ctx)
            finally:
                ctx.unplug_all()
        DATAPATH_CHECKS.append(_c.Check(name, run, tuple(needs), tuple(features), doc))
        return fn
    return register


class DatapathContext(_c.Context):
    """What the datapath checks share: `caller` runs the datapath's executables, `keys` are
    the stand-in's volumes (one per URI), `uris` their URIs, `scratch` the files and loop
    devices the run made for {file} and {loop}."""

    def __init__(self, plugin_dir, options):
        self.plugin_dir = os.path.abspath(plugin_dir)
        self.scheme = os.path.basename(self.plugin_dir)
        try:
            self.work = tempfile.mkdtemp(prefix="xapi-storage-conformance.",
                                         dir=options.scratch_dir)
        except OSError as e:
            raise SetupError(f"cannot make the run's scratch directory: {e}") from None
        try:
            self.root = os.path.join(self.work, "root")
            os.makedirs(os.path.join(self.root, "datapath"))
            link = os.path.join(self.root, "datapath", self.scheme)
            os.symlink(self.plugin_dir, link)
            caller = Caller(link, timeout=options.timeout, env=options.env)
            super().__init__(caller, options, None)     # the daemon's registration runs here
        except BaseException:       # a signal during the registration: no teardown will run
            shutil.rmtree(self.work, ignore_errors=True)
            raise
        self.plugin = STAND_IN
        self.sr = SR
        self.uris, self.keys, self.scratch, self.loops = [], [], [], []
        self.scratch_of = {}        # key -> the scratch file of its URI ({file}, {loop})
        self.epochs = set()         # keys whose VDI.epoch_begin ran (epoch_end may be owed)
        self.closing = set()        # keys whose epoch_end the unplug owes (kept if cut short)
        self.unplug_problems = []

    def setup(self):
        out = self.caller.call("Plugin.Query", {"dbg": "register"})
        if out.ok and isinstance(out.value, dict):
            self.query = out.value
            feats = out.value.get("features")
            if isinstance(feats, list):
                self.features = {f.split("/", 1)[0] for f in feats if isinstance(f, str)}
        size = self.opts.size
        volumes = {}
        for i, template in enumerate(self.opts.uris):
            uri = template
            if any(p in template for p in PLACEHOLDERS):
                uri = self._scratch_for(i, template, size)
            key = f"conformance-{i}"
            self.uris.append(uri)
            self.keys.append(key)
            volumes[key] = {"key": key, "uuid": key, "name": key, "description": template,
                            "read_write": True, "sharable": False, "virtual_size": size,
                            "physical_utilisation": size, "uri": [uri], "keys": {}}
        d = os.path.join(self.root, "volume", STAND_IN)
        os.makedirs(d)
        with open(os.path.join(d, "volumes.json"), "w") as f:
            json.dump(volumes, f)
        exe = os.path.join(d, "Volume.stat")
        with open(exe, "w") as f:
            f.write(_STAND_IN_SOURCE.format(python=sys.executable))
        os.chmod(exe, 0o755)
        self.daemon.register()

    def _scratch_for(self, i, template, size):
        """The URI of `template` with {file} and {loop} replaced by a sparse file of `size`
        bytes the run makes (and a loop device over it); SetupError if it cannot be made."""
        from ..scratch import ScratchLeft, _run
        path = os.path.join(self.work, f"volume{i}.img")
        try:
            self.scratch.append(path)
            with open(path, "wb") as f:
                f.truncate(size)
            self.scratch_of[f"conformance-{i}"] = path
            uri = template.replace("{file}", path)
            if "{loop}" in uri:
                dev = _run(["losetup", "-f", "--show", path]).stdout.strip()
                self.loops.append(dev)
                uri = uri.replace("{loop}", dev)
        except (OSError, ScratchLeft, subprocess.TimeoutExpired) as e:
            raise SetupError(f"cannot make the scratch storage of --uri {template!r} "
                             f"({size} bytes in {self.work}): {e}") from None
        return uri

    def unplug_all(self):
        """Deactivate and detach every (key, domain) still in `plugged`, then (with
        NONPERSISTENT) end its epoch if one was begun (the toolstack never calls epoch_end,
        Datapath.close, without epoch_begin, Datapath.open); problems are kept for the
        teardown's report."""
        self.closing.update(k for k, _ in self.plugged if k in self.epochs)
        for key, domain in sorted(self.plugged):
            try:
                self.daemon.dp_destroy(self.dbg(), self.plugin, self.sr, key, domain)
            except _daemon.ScriptError as e:
                self.unplug_problems.append(f"detaching {key} from domain {domain!r} after "
                                            f"{self.check_name}: {e}")
        self.plugged.clear()
        if _daemon.NONPERSISTENT in self.daemon.datapaths.get(self.scheme, ()):
            for key in sorted(self.closing):
                try:
                    self.daemon.epoch_end(self.dbg(), self.plugin, self.sr, key)
                except _daemon.ScriptError as e:
                    self.unplug_problems.append(f"epoch_end of {key} after {self.check_name}: "
                                                f"{e}")
                self.closing.discard(key)
        self.closing.clear()
        self.epochs.clear()         # not before: an unplug cut short is done again in full

    def teardown(self, report=None):
        self.unplug_all()
        problems = [f"teardown: {p}" for p in self.unplug_problems]
        for dev in self.loops:
            from ..scratch import _run
            r = _run(["losetup", "-d", dev], check=False)
            if r.returncode != 0:
                problems.append(f"teardown: losetup -d {dev}: {r.stderr.strip()}")
        self.loops = []
        shutil.rmtree(self.work, ignore_errors=True)
        for p in problems:
            if report is not None:
                report(p)
        return problems

    def guest_start(self, key, domain, epochs=1, persistent=True, repeat=1):
        """A VM start without XenStore: VDI.epoch_begin `epochs` times (Datapath.open with
        NONPERSISTENT), then attach and activate, `repeat` times (retried plugs)."""
        self.plugged.add((key, domain))
        if epochs:
            self.epochs.add(key)
        try:
            for _ in range(epochs):
                self.daemon.epoch_begin(self.dbg(), self.plugin, self.sr, key,
                                        persistent=persistent)
            for _ in range(repeat):
                self.daemon.attach(self.dbg(), self.plugin, self.sr, key, domain)
                self.daemon.activate(self.dbg(), self.plugin, self.sr, key, domain)
        except _daemon.ScriptError as e:
            raise Failed(f"VM start for domain {domain} ({epochs} epoch_begin, persistent="
                         f"{persistent}; attach and activate {repeat} times): {e}") from None

    def run_op(self, op, **values):
        """ctx.operation, with the toolstack's own refusals of an answer (a dom0 plug that is
        no path under /dev) as failures of the check."""
        try:
            return self.operation(op, **values)
        except xenopsd.DeviceError as e:
            raise Failed(f"{op}: {e}") from None

    def need_uri(self):
        if not self.keys:
            raise Skipped("no --uri given")
        return self.keys[0]


def _holders(path):
    """What still uses `path`: loop devices backed by it (or by it as a device) and processes
    holding it open."""
    from ..scratch import loop_backings
    real = os.path.realpath(path)
    out = [f"loop device {dev}" for dev, backing in loop_backings().items()
           if backing == real or backing.startswith(real + " ")]
    try:
        st = os.stat(real)
    except OSError:
        return out
    if stat.S_ISBLK(st.st_mode):
        try:
            out += [f"device {h} on it" for h in
                    sorted(os.listdir(f"/sys/block/{os.path.basename(real)}/holders"))]
        except OSError:
            pass
    target = (st.st_rdev, "dev") if stat.S_ISBLK(st.st_mode) else ((st.st_dev, st.st_ino), "ino")
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                s = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            got = s.st_rdev if target[1] == "dev" and stat.S_ISBLK(s.st_mode) else \
                (s.st_dev, s.st_ino)
            if got == target[0]:
                out.append(f"process {pid} ({_comm(pid)})")
                break
    return out


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _backend_path(backend):
    return xenopsd.dom0_path(backend)


def _write(path, data, what):
    """Write `data` at the start of `path` and read it back; Failed if either does not work."""
    try:
        with open(path, "r+b", buffering=0) as f:
            f.write(data)
            f.seek(0)
            if f.read(len(data)) != data:
                raise Failed(f"{path} {what} did not give back what was written")
    except OSError as e:
        raise Failed(f"{path} {what} cannot be written: {e}") from None


# --- the checks, in running order ------------------------------------------------------------

@dp_check("plugin-query", needs=("Plugin.Query",))
def plugin_query(ctx):
    """Plugin.Query (the daemon's registration, dbg "register") answers a query record with a
    required_api_version the daemon registers ("3.0" or "5.0"); the four calls of every VM
    start and shutdown (Datapath.attach, activate, deactivate, detach) are installed; with
    NONPERSISTENT declared, Datapath.open and Datapath.close are too."""
    q = ctx.ok("Plugin.Query")
    if not isinstance(q, dict):
        raise Failed(f"Plugin.Query answered {q!r}, not a record")
    if q.get("required_api_version") not in _daemon.SUPPORTED_API_VERSIONS:
        raise Failed(f"required_api_version is {q.get('required_api_version')!r}: the daemon "
                     f"registers only {' or '.join(_daemon.SUPPORTED_API_VERSIONS)}, and "
                     "then every VM start with this scheme fails with MISSING_URI")
    if ctx.scheme not in ctx.daemon.datapaths:
        raise Failed("the daemon's registration (Plugin.Query, dbg \"register\") failed")
    need = ["Datapath.attach", "Datapath.activate", "Datapath.deactivate", "Datapath.detach"]
    if _daemon.NONPERSISTENT in ctx.features:
        need += ["Datapath.open", "Datapath.close"]
    missing = [m for m in need if not ctx.caller.has(m)]
    if missing:
        raise Failed(f"no executable {', '.join(missing)}: the daemon calls "
                     f"{'them' if len(missing) > 1 else 'it'} and xapi gets SCRIPT_MISSING")


_CALLS = ("Datapath.attach", "Datapath.activate", "Datapath.deactivate", "Datapath.detach")


@dp_check("dom0-plug", needs=_CALLS)
def dom0_plug(ctx):
    """A dom0 plug as xapi makes one for a copy or export (attach and activate, domain
    "u0_<dp>"), repeated N times, answers the same each time: a File or BlockDevice under /dev
    (written and read back on the run's scratch storage), or an Nbd (xapi would run nbd-client
    on it; not connected here); the unplug (deactivate, detach) runs twice, as a retried one
    does."""
    key = ctx.need_uri()
    ctx.plugged.add((key, _daemon.dom0_token("vbd/0/xvdz")))
    first = ctx.run_op("dom0-plug", key=key, dp="vbd/0/xvdz")["backend"]
    path = _backend_path(first)
    for i in range(ctx.opts.repeat):
        again = ctx.run_op("dom0-plug", key=key, dp="vbd/0/xvdz")["backend"]
        if again != first:
            raise Failed(f"dom0 plug #{i + 2}: Datapath.attach answered {again!r}, the first "
                         f"{first!r}")
    if key in ctx.scratch_of and path:      # never written unless the run made the storage
        _write(path, b"conformance" * 100, "of the dom0 plug")
    ctx.run_op("dom0-unplug", key=key, dp="vbd/0/xvdz")
    ctx.plugged.clear()
    ctx.run_op("dom0-unplug", key=key, dp="vbd/0/xvdz")


@dp_check("vm-lifecycle", needs=_CALLS)
def vm_lifecycle(ctx):
    """A guest's disk (domain "7"): VDI.epoch_begin (Datapath.open, persistent, when
    NONPERSISTENT is declared), attach then activate repeated (a retried VBD plug), then VM
    shutdown (deactivate; deactivate again and detach; epoch_end, Datapath.close with
    NONPERSISTENT) run twice, as a retried shutdown does."""
    key = ctx.need_uri()
    ctx.guest_start(key, "7", repeat=min(ctx.opts.repeat, 3))
    ctx.run_op("vm-shutdown", key=key, domain="7")
    ctx.plugged.clear()
    ctx.run_op("vm-shutdown", key=key, domain="7")


@dp_check("readonly", needs=_CALLS + ("Datapath.activate_readonly",))
def readonly(ctx):
    """While a guest (domain "11") has the volume attached: a read-only dom0 plug (xapi's
    export of a volume whose plugin declares VDI_ACTIVATE_READONLY: attach, then
    activate_readonly) repeated and unplugged twice; then a read-write plug writes again (a
    read-only activation must not outlive its unplug); then the guest detaches."""
    key = ctx.need_uri()
    ctx.plugged.add((key, "11"))
    try:
        ctx.daemon.attach(ctx.dbg(), ctx.plugin, ctx.sr, key, "11")
    except _daemon.ScriptError as e:
        raise Failed(f"attach for domain 11: {e}") from None
    ctx.plugged.add((key, _daemon.dom0_token("export")))
    for _ in range(min(ctx.opts.repeat, 3)):
        ctx.run_op("dom0-plug", key=key, dp="export", readonly=True)
    ctx.run_op("dom0-unplug", key=key, dp="export")
    ctx.plugged.discard((key, _daemon.dom0_token("export")))
    ctx.run_op("dom0-unplug", key=key, dp="export")
    ctx.plugged.add((key, _daemon.dom0_token("copy")))
    path = _backend_path(ctx.run_op("dom0-plug", key=key, dp="copy")["backend"])
    if key in ctx.scratch_of and path:
        _write(path, b"read-write again" * 32, "of a read-write plug after a read-only one")
    ctx.run_op("dom0-unplug", key=key, dp="copy")
    ctx.plugged.discard((key, _daemon.dom0_token("copy")))
    ctx.run_op("vm-shutdown", key=key, domain="11")
    ctx.plugged.clear()


@dp_check("nonpersistent", needs=("Datapath.open", "Datapath.close") + _CALLS,
          features=("NONPERSISTENT",))
def nonpersistent(ctx):
    """With NONPERSISTENT declared, a VM start with a disk reset on boot: epoch_begin is
    Datapath.open persistent=false (repeated: a retried start), attach and activate; the
    shutdown (deactivate, detach, epoch_end: Datapath.close) runs twice; then a persistent
    start and shutdown work again."""
    key = ctx.need_uri()
    ctx.guest_start(key, "8", epochs=2, persistent=False)
    ctx.run_op("vm-shutdown", key=key, domain="8")
    ctx.plugged.clear()
    ctx.run_op("vm-shutdown", key=key, domain="8")
    ctx.guest_start(key, "8")                   # persistent again
    ctx.run_op("vm-shutdown", key=key, domain="8")
    ctx.plugged.clear()


@dp_check("live-migration", needs=_CALLS)
def live_migration(ctx):
    """A live migration between two domains of this host (xe vm-migrate to the same host):
    attach for the destination while the source is active, deactivate of the source,
    activate of the destination, detach of the source; then the destination's shutdown."""
    key = ctx.need_uri()
    ctx.guest_start(key, "9", epochs=0)
    ctx.plugged.add((key, "10"))
    ctx.run_op("live-migration", key=key, src_domain="9", domain="10")
    ctx.plugged.discard((key, "9"))
    ctx.run_op("vm-shutdown", key=key, domain="10")
    ctx.plugged.clear()


@dp_check("static-vdis", needs=_CALLS)
def static_vdis(ctx):
    """static-vdis' command-line mode at boot (domain "0", positional arguments, nothing on
    stdin): `Datapath.attach static-vdis URI 0` answers a BlockDevice, File or Nbd, activate,
    then deactivate and detach."""
    key = ctx.need_uri()
    ctx.plugged.add((key, "0"))
    ctx.run_op("static-vdis-attach", key=key)
    ctx.run_op("static-vdis-detach", key=key)
    ctx.plugged.clear()


@dp_check("parallel", needs=_CALLS)
def parallel(ctx):
    """N dom0 plugs of one volume at once (the daemon runs calls concurrently: several copies
    of one disk), each with its own domain, all succeed; so do their N unplugs at once."""
    key = ctx.need_uri()
    n = ctx.opts.parallel
    dps = [f"parallel/{i}" for i in range(n)]
    ctx.plugged.update((key, _daemon.dom0_token(dp)) for dp in dps)
    _c._parallel(lambda dp: ctx.run_op("dom0-plug", key=key, dp=dp), [(dp,) for dp in dps])
    _c._parallel(lambda dp: ctx.run_op("dom0-unplug", key=key, dp=dp), [(dp,) for dp in dps])
    ctx.plugged.clear()


@dp_check("bad-uris", needs=("Datapath.attach",))
def bad_uris(ctx):
    """Bad requests get an error record on stdout with exit status 1, never a made-up
    backend: a URI of another scheme, one naming a file that does not exist (from a {file}
    or {loop} URI), a URI that is not a string, no URI at all, stdin that is not JSON. What a
    bad request attached anyway is detached again."""
    cases = [("another scheme", {"uri": "conformance-no-such-scheme:///nothing"}),
             ("uri is a number", {"uri": 42}), ("no uri", {})]
    for i, template in enumerate(ctx.opts.uris):
        if any(p in template for p in PLACEHOLDERS):
            missing = ctx.scratch_of[ctx.keys[i]] + ".no-such-file"
            for p in PLACEHOLDERS:
                template = template.replace(p, missing)
            cases.append(("a file that does not exist", {"uri": template}))
            break
    for what, request in cases + [("stdin not JSON", None)]:
        if request is None:
            out = ctx.caller.call_stdin("Datapath.attach", b"{not json")
        else:
            out = ctx.caller.call("Datapath.attach", dict(request, dbg=ctx.dbg(), domain="0"))
        if out.rc == 0:
            if request is not None:     # whatever it attached is released, as far as it can be
                ctx.caller.call("Datapath.detach", dict(request, dbg=ctx.dbg(), domain="0"))
            raise Failed(f"{what}: {out.describe()}: expected exit 1 and an error record")
        _c._require_record(out)
        if out.rc != 1:
            raise Failed(f"{what}: {out.describe()}: expected exit status 1")


@dp_check("cleanup")
def cleanup(ctx):
    """After every plug was unplugged, nothing uses the run's scratch files or loop devices
    ({file}, {loop}): no loop device of the datapath's over them, no process (a server the
    datapath started) holding them open. Checked a few seconds, the time a loop device
    released by its last user takes to go."""
    if not ctx.scratch:
        raise Skipped("give a URI with {file} or {loop} for the run to see what is left")
    deadline = time.monotonic() + 5.0
    while True:
        left = [h for path in ctx.scratch for h in _holders(path)
                if h.split()[-1] not in ctx.loops]
        left += [h for dev in ctx.loops for h in _holders(dev)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if left:
        raise Failed(f"after the last detach, still in use: {', '.join(left)}")


@dp_check("results-valid")
def results_valid(ctx):
    """Every answer of the datapath in the whole run is what the daemon can read: one strict
    JSON value on stdout; on exit 0 a result valid against the interface's schema (an attach
    result's implementations, null for the calls without a result); otherwise an error
    record {code, params: [string], backtrace}."""
    _c.results_valid(ctx)
