"""The datapath lifecycle, written once for every datapath plugin (ours and vendors').

A datapath plugin subclasses `Lifecycle` (a `sdk.base.Datapath`) and writes a few small hooks;
the base implements the seven Datapath calls the toolstack makes, with every rule they need:

    class MyDatapath(Lifecycle):
        SCHEME = "mydp"                             # state lives under <root>/mydp/
        def validate(self, uri): ...                # optional: refuse a malformed URI early
        def setup(self, uri, readonly):             # first attach of the volume on this host
            return {"dev": "/dev/..."}              #   -> resources (a JSON object)
        def backend(self, uri, domain, resources):  # each attach: the attach result
            return {"implementations": [...]}
        def activate_hook(self, uri, domain, resources, readonly): ...   # optional
        def deactivate_hook(self, uri, domain, resources): ...           # optional
        def teardown(self, uri, resources):         # last detach; resources=None: a crash
            ...                                     #   hit setup: find and release by uri
        # optional: open_hook(uri, persistent), close_hook(uri, persistent) for NONPERSISTENT

    IMPLEMENTATIONS = {"Plugin": plugin_class("mydp", "...", features=[]), "Datapath": MyDatapath}

What the base guarantees (the toolstack relies on each; see docs/sdk.md "Datapath plugins"):

* Every call is idempotent. State is reference-counted per (volume URI, domain token); the
  token is opaque: a domid ("7"), "u0_<dp>" for each dom0 plug by xapi, "0" from static-vdis,
  possibly "" during teardown. `setup` runs at the first attach of a volume, `teardown` after
  the last detach; `backend` once per (volume, domain): a repeated attach returns the stored
  result.
* `deactivate` may arrive twice (VM shutdown); deactivating or detaching what is not there is
  a no-op; `detach` of an active domain deactivates it first.
* Read-only and read-write activations never coexist on this host (SR_BACKEND_FAILURE_24
  VDIInUse); several read-only ones, or several read-write ones (sharable volumes), may.
* `detach` never fails: a teardown that raises is recorded and retried by the next call on that
  volume (any call; `detach` of a domain that is gone retries it too).
* State is one JSON file per volume under $XAPI_STORAGE_DATAPATH_STATE (default
  /run/xapi-storage/datapath), in a directory per SCHEME: it outlives the plugin process and
  goes with the host's reboot, like the loop devices and processes it describes. Each step that
  touches the host is written down first (an intent, `pending`) and its outcome after, both by
  atomic rename: a plugin SIGKILLed at any point leaves a record the next call completes (a
  teardown is redone) or rolls back (a setup is undone by `teardown(uri, None)`, an activation
  by `deactivate_hook`). A volume whose state is empty has no file left.
* A URI naming an lvm-raw logical volume (`/dev/xapi-sr-<uuid>/<key>`, ours by its tags) gets
  the LV held active before `setup` and released (deactivated unless something else on the
  host still needs it) after the last `teardown` (datapath/lvm_activation.py); any other URI
  costs nothing for this.
* Calls on one volume are serialised by an flock per volume, waited for at most
  $XAPI_STORAGE_DATAPATH_LOCK_TIMEOUT seconds (default 60): then a clear error, never a hang.

The state machine itself is pure (`plan` and `apply` below: no I/O, testable alone); the class
persists and acts on what they decide.
"""

import os
import time

from ..sdk import base, errors, log
from ..volume.store import Store, faultpoint

STATE_ENV = "XAPI_STORAGE_DATAPATH_STATE"
DEFAULT_STATE_ROOT = "/run/xapi-storage/datapath"
LOCK_TIMEOUT_ENV = "XAPI_STORAGE_DATAPATH_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 60.0
FORMAT = 1

RW, RO = "rw", "ro"

# SHA-256 from the interpreter's built-in module: `hashlib` loads OpenSSL first, a cost every
# datapath call would pay at start-up (the same digest either way)
try:
    from _sha256 import sha256 as _sha256          # Python 3.6 - 3.11
except ImportError:
    try:
        from _sha2 import sha256 as _sha256        # Python 3.12 and later
    except ImportError:
        from hashlib import sha256 as _sha256


# --- errors --------------------------------------------------------------------------------------

def in_use(uri, why):
    """The volume cannot be activated this way now (SMAPIv1's VDIInUse code)."""
    return errors.XenAPIError("SR_BACKEND_FAILURE_24", ["VDIInUse", uri, why])


def datapath_error(name, uri, why):
    """Any other datapath failure, with a name saying what went wrong."""
    return errors.XenAPIError("SR_BACKEND_FAILURE", [name, uri, why])


class StateError(Exception):
    """The call is not allowed in the volume's state (raised by `plan`; the class turns it
    into the wire error `error`)."""

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


# --- the pure state machine ----------------------------------------------------------------------
#
# state = {"format": 1, "uri": str,
#          "opened": None | {"persistent": bool},
#          "resources": None | {...},              # what setup returned
#          "domains": {token: {"result": backend, "active": None | "rw" | "ro"}},
#          "pending": None | step}                 # the step under way (an intent)
#
# A step is a JSON list: ["setup"], ["backend", token], ["activate", token, mode],
# ["deactivate", token], ["teardown"], ["open", persistent], ["close"],
# and for recovery ["undo-setup"], ["undo-activate", token].

def empty_state(uri):
    return {"format": FORMAT, "uri": uri, "opened": None, "resources": None, "domains": {},
            "pending": None, "teardown_failed": None}


def is_empty(state):
    """True when nothing is left to remember (the state file can go)."""
    return (not state["domains"] and state["opened"] is None and state["resources"] is None
            and state["pending"] is None and state["teardown_failed"] is None)


def recovery(state):
    """The steps that finish or undo what a killed call left (`pending`), and retry a failed
    teardown. Run before any call's own steps."""
    p = state["pending"]
    steps = []
    if p is not None:
        kind = p[0]
        if kind == "setup":
            steps.append(["undo-setup"])
        elif kind == "activate":
            steps.append(["undo-activate", p[1]])
        elif kind in ("deactivate", "teardown", "open", "close"):
            steps.append(list(p))             # redo: hooks are idempotent (a non-persistent
                                              # close must not stay half done)
        # backend: nothing on the host to undo (a later attach makes it again)
    redo_teardown = any(s[0] in ("teardown", "undo-setup") for s in steps)
    if not redo_teardown and (state["teardown_failed"] is not None or (
            state["resources"] is not None and not state["domains"])):
        # a failed teardown to retry, or resources no domain uses any more (a call was
        # killed between a detach's bookkeeping and its teardown, or before an attach's
        # backend step): release them
        steps.append(["teardown"])
    return steps


def plan(state, call, domain=None, persistent=None):
    """The steps of one call, in order, from the state as it is after recovery.
    Raises StateError if the call is refused. Pure."""
    uri = state["uri"]
    doms = state["domains"]
    if call == "open":
        return [["open", bool(persistent)]]
    if call == "close":
        return [["close"]] if state["opened"] is not None else []
    if call == "attach":
        if domain in doms:
            return []
        steps = []
        if state["resources"] is None:
            if state["teardown_failed"] is not None:
                raise StateError(datapath_error(
                    "Datapath_cleanup_failed", uri,
                    "the last detach could not release this volume's resources and the retry "
                    "failed again: " + str(state["teardown_failed"])))
            steps.append(["setup"])
        steps.append(["backend", domain])
        return steps
    if call in ("activate", "activate_readonly"):
        mode = RO if call == "activate_readonly" else RW
        if domain not in doms:
            raise StateError(datapath_error(
                "Datapath_not_attached", uri,
                f"{call} for domain {domain!r} before Datapath.attach for that domain"))
        if doms[domain]["active"] == mode:
            return []
        others = {d: v["active"] for d, v in doms.items() if d != domain and v["active"]}
        clash = sorted(d for d, m in others.items() if m != mode)
        if clash:
            raise StateError(in_use(
                uri, f"{'read-only' if mode == RO else 'read-write'} activation for domain "
                f"{domain!r} while domain(s) {', '.join(map(repr, clash))} hold a "
                f"{'read-write' if mode == RO else 'read-only'} one: deactivate them first"))
        steps = []
        if doms[domain]["active"] is not None:
            steps.append(["deactivate", domain])
        steps.append(["activate", domain, mode])
        return steps
    if call == "deactivate":
        if domain in doms and doms[domain]["active"] is not None:
            return [["deactivate", domain]]
        return []
    if call == "detach":
        if domain not in doms:
            return []
        steps = []
        if doms[domain]["active"] is not None:
            steps.append(["deactivate", domain])
        steps.append(["forget", domain])
        if len(doms) == 1 and state["resources"] is not None:
            steps.append(["teardown"])
        return steps
    raise ValueError(f"unknown call {call!r}")


def apply(state, step, output=None):
    """The state after `step` succeeded (`output`: what its hook returned). Pure: returns a
    new dict."""
    s = dict(state)
    s["domains"] = {d: dict(v) for d, v in state["domains"].items()}
    kind = step[0]
    if kind == "setup":
        s["resources"] = output if output is not None else {}
    elif kind == "backend":
        s["domains"][step[1]] = {"result": output, "active": None}
    elif kind == "activate":
        s["domains"][step[1]]["active"] = step[2]
    elif kind in ("deactivate", "undo-activate"):
        if step[1] in s["domains"]:
            s["domains"][step[1]]["active"] = None
    elif kind == "forget":
        s["domains"].pop(step[1], None)
    elif kind == "teardown":
        s["resources"] = None
        s["teardown_failed"] = None
    elif kind == "undo-setup":
        pass
    elif kind == "open":
        s["opened"] = {"persistent": step[1]}
    elif kind == "close":
        s["opened"] = None
    else:
        raise ValueError(f"unknown step {step!r}")
    s["pending"] = None
    return s


# --- the base class ------------------------------------------------------------------------------

def state_root():
    return os.environ.get(STATE_ENV) or DEFAULT_STATE_ROOT


def lock_timeout():
    try:
        return max(0.0, float(os.environ.get(LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT)))
    except ValueError:
        return DEFAULT_LOCK_TIMEOUT


def volume_id(uri):
    """The file name stem of a volume's state: a digest of its URI (any text is safe)."""
    return _sha256(uri.encode("utf-8", "surrogateescape")).hexdigest()[:40]


class Lifecycle(base.Datapath):
    """Base of a datapath plugin: the seven Datapath calls, idempotent and crash-safe.

    Subclasses set SCHEME and override `setup`, `backend`, `teardown` (and optionally
    `validate`, `activate_hook`, `deactivate_hook`, `open_hook`, `close_hook`). Hooks must be
    idempotent: after a crash they may run again for the same step. While a hook runs,
    `self.state` is the volume's state record as it was before the step (read it, do not
    change it): e.g. `self.state["opened"]` is None or {"persistent": bool} (Datapath.open),
    `self.state["domains"]` the domains attached and how they are active."""

    state = None

    #: the URI scheme = the plugin's directory name; names the state directory
    SCHEME = None

    # hooks ------------------------------------------------------------------------------------
    def validate(self, uri):
        """Raise (a structured error) if `uri` is not one this datapath can serve; runs before
        any state is read or written."""

    def setup(self, uri, readonly=False):
        """Acquire what the volume needs on this host (first attach); return a JSON object
        (stored, then given to the other hooks). Must find and reuse what a killed earlier
        setup of the same uri left, or raise."""
        return {}

    def backend(self, uri, domain, resources):
        """The attach result for `domain` (a `backend` record: {"implementations": [...]})."""
        raise errors.Unimplemented("Datapath.attach")

    def activate_hook(self, uri, domain, resources, readonly):
        """Just before I/O starts for `domain` (runs inside a migration's downtime: be fast)."""

    def deactivate_hook(self, uri, domain, resources):
        """I/O has ended for `domain` (inside a migration's downtime: be fast)."""

    def teardown(self, uri, resources):
        """Release everything `setup` acquired. `resources` is None when a setup was killed
        before its result was recorded: release whatever it may have acquired for `uri`.
        Raise if something could not be released: it is retried by the next call."""

    def open_hook(self, uri, persistent):
        """Datapath.open (only called if the plugin declares NONPERSISTENT)."""

    def close_hook(self, uri, persistent):
        """Datapath.close: discard the writes if the volume was opened non-persistent."""

    # activation of an lvm-raw LV around setup and teardown (datapath/lvm_activation.py) ----
    def _setup(self, uri):
        """`setup`, with the URI's logical volume held active first when it is an LV of an
        lvm-raw SR (released again if `setup` fails; `_teardown` asks the holder file)."""
        from . import lvm_activation
        lvm_activation.activate(uri)
        try:
            return self.setup(uri)
        except BaseException:
            lvm_activation.deactivate(uri, best_effort=True)
            raise

    def _teardown(self, uri, resources):
        """`teardown`, then the LV released if this datapath holds it (a file test: no lvm2
        process otherwise; resources None, a setup killed or failed before saying so: a
        release that cannot finish is logged, not raised)."""
        from . import lvm_activation
        self.teardown(uri, resources)
        lvm_activation.deactivate(uri, best_effort=resources is None)

    # the calls --------------------------------------------------------------------------------
    def open(self, dbg, uri, persistent):
        self._run(uri, "open", persistent=persistent)

    def attach(self, dbg, uri, domain):
        state = self._run(uri, "attach", domain)
        return state["domains"][domain]["result"]

    def activate(self, dbg, uri, domain):
        self._run(uri, "activate", domain)

    def activate_readonly(self, dbg, uri, domain):
        self._run(uri, "activate_readonly", domain)

    def deactivate(self, dbg, uri, domain):
        self._run(uri, "deactivate", domain)

    def detach(self, dbg, uri, domain):
        self._run(uri, "detach", domain)

    def close(self, dbg, uri):
        self._run(uri, "close")

    # machinery --------------------------------------------------------------------------------
    def state_dir(self):
        return os.path.join(state_root(), self.SCHEME or type(self).__name__)

    def _store(self):
        d = self.state_dir()
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
        except OSError as e:
            raise datapath_error("Datapath_state_unavailable", d,
                                 f"cannot create the state directory: {e.strerror}") from None
        return Store(d)

    def _lock(self, store, vid, uri):
        timeout = lock_timeout()
        end = time.monotonic() + timeout
        delay = 0.01
        while True:
            held = store.lock(vid + ".lock", blocking=False)
            if held is not None:
                return held
            if time.monotonic() >= end:
                raise datapath_error(
                    "Datapath_busy", uri,
                    f"another call on this volume held its lock for more than {timeout:g} s "
                    f"({store.path}/{vid}.lock); retry later")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def load_state(self, uri):
        """The volume's state as stored (or an empty one); for tests and diagnostics."""
        with self._store() as store:
            return self._read(store, volume_id(uri), uri)

    def _read(self, store, vid, uri):
        try:
            state = store.read(vid + ".json")
        except ValueError as e:
            raise datapath_error("Datapath_state_corrupt", uri,
                                 f"{store.path}/{vid}.json: {e}") from None
        if state is None:
            return empty_state(uri)
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("uri") != uri:
            raise datapath_error("Datapath_state_corrupt", uri,
                                 f"{store.path}/{vid}.json is not this volume's state")
        state.setdefault("teardown_failed", None)
        return state

    def _save(self, store, vid, state):
        if is_empty(state):
            store.unlink(vid + ".json")
            store.fsync_dir()
        else:
            store.write(vid + ".json", state, vid)

    def _run(self, uri, call, domain=None, persistent=None):
        if not isinstance(uri, str) or not uri:
            raise datapath_error("Datapath_invalid_uri", str(uri), "the URI is empty")
        self.validate(uri)
        with self._store() as store:
            vid = volume_id(uri)
            lock = self._lock(store, vid, uri)
            try:
                try:
                    state = self._read(store, vid, uri)
                except errors.StorageError as e:
                    if call not in ("deactivate", "detach"):
                        raise
                    # detach never fails, but a state file it cannot read tells it nothing
                    # safe to release (other domains may use the volume): leave it all as it
                    # is, say so loudly; attach keeps refusing until someone looks
                    log.error("%s of %s for domain %r: %s; nothing done", call, uri, domain, e)
                    return empty_state(uri)
                for step in recovery(state):
                    state = self._step(store, vid, state, step)
                state = dict(state, pending=None)    # a redone step's intent is moot now
                try:
                    steps = plan(state, call, domain, persistent)
                except StateError as e:
                    raise e.error from None
                for step in steps:
                    state = self._step(store, vid, state, step)
                return state
            finally:
                if not store.exists(vid + ".json"):
                    store.unlink(vid + ".lock")   # under the lock: see Store.lock
                lock.release()

    def _step(self, store, vid, state, step):
        """Write the intent, run the step's hook, write the outcome."""
        uri = state["uri"]
        kind = step[0]
        if kind != "forget":
            intent = dict(state)
            intent["pending"] = step if kind not in ("undo-setup", "undo-activate") else state["pending"]
            self._save(store, vid, intent)
            faultpoint(f"datapath:{kind}:intent")
        output = None
        self.state = state
        res = state["resources"]
        if res is None and state["teardown_failed"] is not None:
            res = state["teardown_failed"]["resources"]    # retrying a failed teardown
        try:
            if kind == "setup":
                output = self._setup(uri)
            elif kind == "backend":
                output = self.backend(uri, step[1], res)
            elif kind == "activate":
                self.activate_hook(uri, step[1], res, step[2] == RO)
            elif kind in ("deactivate", "undo-activate"):
                self.deactivate_hook(uri, step[1], res)
            elif kind in ("teardown", "undo-setup"):
                self._teardown(uri, res if kind == "teardown" else None)
            elif kind == "open":
                self.open_hook(uri, step[1])
            elif kind == "close":
                self.close_hook(uri, (state["opened"] or {}).get("persistent", True))
        except Exception as e:  # noqa: BLE001 - what a hook raised decides below
            if kind in ("teardown", "undo-setup", "deactivate", "undo-activate"):
                # never fail a detach or deactivate: remember, retry on the next call
                log.error("%s of %s failed (recorded, retried by the next call on this "
                          "volume): %s: %s", kind, uri, type(e).__name__, e)
                failed = dict(state)
                failed["domains"] = {d: dict(v) for d, v in state["domains"].items()}
                failed["pending"] = None
                if kind in ("teardown", "undo-setup"):
                    failed["resources"] = None
                    failed["teardown_failed"] = {"resources": res, "error": f"{type(e).__name__}: {e}"}
                else:
                    failed["domains"].get(step[1], {})["active"] = None
                self._save(store, vid, failed)
                return failed
            # a setup/backend/activate that failed leaves nothing: undo it now
            rolled = dict(state)
            rolled["pending"] = None
            if kind == "setup":
                try:
                    self._teardown(uri, None)
                except Exception as e2:  # noqa: BLE001
                    rolled["teardown_failed"] = {"resources": None,
                                                 "error": f"{type(e2).__name__}: {e2}"}
            elif kind == "backend" and not state["domains"] and res is not None:
                try:
                    self._teardown(uri, res)
                    rolled["resources"] = None
                except Exception as e2:  # noqa: BLE001
                    rolled["resources"] = None
                    rolled["teardown_failed"] = {"resources": res,
                                                 "error": f"{type(e2).__name__}: {e2}"}
            elif kind == "activate":
                try:
                    self.deactivate_hook(uri, step[1], res)
                except Exception:  # noqa: BLE001 - the activation error is the one to report
                    pass
            self._save(store, vid, rolled)
            raise
        faultpoint(f"datapath:{kind}:done")
        new = apply(state, step, output)
        self._save(store, vid, new)
        return new


def plugin_class(scheme, description, features=(), name=None, vendor="xapi-storage-suite",
                 version=None):
    """A `sdk.base.Plugin` subclass answering Plugin.Query for a datapath plugin
    (required_api_version "5.0", which the daemon requires to register it)."""
    class DatapathPlugin(base.Plugin):
        def query(self, dbg):
            return base.query_result(scheme, name or f"{scheme} datapath plugin", description,
                                     features, vendor=vendor, version=version)

        def diagnostics(self, dbg):
            return f"{scheme} datapath; state under {os.path.join(state_root(), scheme)}"

    DatapathPlugin.__name__ = DatapathPlugin.__qualname__ = f"Plugin_{scheme}"
    return DatapathPlugin
