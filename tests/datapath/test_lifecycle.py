"""The shared datapath lifecycle: the pure state machine, and the base class on real files.

A toy datapath records every hook it runs in a journal file and "acquires" a resource by
creating a file, so a leak is a file left behind.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from xapi_storage.datapath import lifecycle
from xapi_storage.datapath.lifecycle import Lifecycle, StateError, apply, empty_state, plan
from xapi_storage.sdk import errors

URI = "toy:///srv/sr/vol1.img"


@pytest.fixture
def state_root(tmp_path, monkeypatch):
    root = tmp_path / "state"
    monkeypatch.setenv(lifecycle.STATE_ENV, str(root))
    monkeypatch.setenv("TOY_DIR", str(tmp_path / "host"))
    (tmp_path / "host").mkdir()
    return root


class Toy(Lifecycle):
    SCHEME = "toy"
    fail = set()

    def _host(self):
        return os.environ["TOY_DIR"]

    def _journal(self, *entry):
        with open(os.path.join(self._host(), "journal"), "a") as f:
            f.write(json.dumps(list(entry)) + "\n")

    def _check(self, name):
        if name in self.fail or os.path.exists(os.path.join(self._host(), "fail-" + name)):
            raise OSError(5, f"{name} failed")

    def setup(self, uri, readonly=False):
        self._journal("setup", uri)
        res = os.path.join(self._host(), "resource")
        open(res, "w").close()
        self._check("setup")
        return {"file": res}

    def backend(self, uri, domain, resources):
        self._journal("backend", domain)
        self._check("backend")
        return {"implementations": [["BlockDevice", {"path": resources["file"]}]]}

    def activate_hook(self, uri, domain, resources, readonly):
        self._journal("activate", domain, readonly)
        self._check("activate")

    def deactivate_hook(self, uri, domain, resources):
        self._journal("deactivate", domain)
        self._check("deactivate")

    def teardown(self, uri, resources):
        self._journal("teardown", resources)
        self._check("teardown")
        res = os.path.join(self._host(), "resource")
        if os.path.exists(res):
            os.unlink(res)


def journal():
    p = os.path.join(os.environ["TOY_DIR"], "journal")
    if not os.path.exists(p):
        return []
    with open(p) as f:
        return [json.loads(line) for line in f]


def leftovers(root):
    out = []
    for d, _, files in os.walk(root):
        out += [os.path.join(d, f) for f in files]
    return out


def resource_exists():
    return os.path.exists(os.path.join(os.environ["TOY_DIR"], "resource"))


# --- the pure state machine ------------------------------------------------------------------

def run_pure(state, call, domain=None):
    for step in plan(state, call, domain):
        state = apply(state, step, {"x": 1} if step[0] in ("setup", "backend") else None)
    return state


def test_plan_refcounts_per_domain_and_tears_down_at_the_last_detach():
    s = empty_state(URI)
    assert plan(s, "attach", "7") == [["setup"], ["backend", "7"]]
    s = run_pure(s, "attach", "7")
    assert plan(s, "attach", "7") == []                     # idempotent
    assert plan(s, "attach", "u0_vbd_0_xvda") == [["backend", "u0_vbd_0_xvda"]]
    s = run_pure(s, "attach", "u0_vbd_0_xvda")
    assert plan(s, "detach", "7") == [["forget", "7"]]        # another domain still uses it
    s = run_pure(s, "detach", "7")
    assert plan(s, "detach", "7") == []
    assert plan(s, "detach", "u0_vbd_0_xvda") == [["forget", "u0_vbd_0_xvda"], ["teardown"]]
    s = run_pure(s, "detach", "u0_vbd_0_xvda")
    assert lifecycle.is_empty(s)


def test_plan_never_mixes_read_only_and_read_write_activations():
    s = run_pure(run_pure(run_pure(empty_state(URI), "attach", "1"), "attach", "2"), "attach", "3")
    s = run_pure(s, "activate_readonly", "1")
    s = run_pure(s, "activate_readonly", "2")               # many read-only: fine
    with pytest.raises(StateError) as e:
        plan(s, "activate", "3")
    assert e.value.error.code == "SR_BACKEND_FAILURE_24"
    assert e.value.error.params[0] == "VDIInUse"
    s = run_pure(run_pure(s, "deactivate", "1"), "deactivate", "2")
    s = run_pure(s, "activate", "3")
    with pytest.raises(StateError):
        plan(s, "activate_readonly", "1")
    # one domain switching its own mode deactivates first
    s = run_pure(run_pure(s, "deactivate", "3"), "activate", "1")
    assert plan(s, "activate_readonly", "1") == [["deactivate", "1"], ["activate", "1", "ro"]]


def test_plan_deactivate_twice_and_detach_of_an_active_domain():
    s = run_pure(run_pure(empty_state(URI), "attach", "5"), "activate", "5")
    assert plan(s, "deactivate", "5") == [["deactivate", "5"]]
    s = run_pure(s, "deactivate", "5")
    assert plan(s, "deactivate", "5") == []
    s = run_pure(s, "activate", "5")
    assert plan(s, "detach", "5") == [["deactivate", "5"], ["forget", "5"], ["teardown"]]


def test_plan_refuses_activate_before_attach():
    with pytest.raises(StateError) as e:
        plan(empty_state(URI), "activate", "9")
    assert e.value.error.params[0] == "Datapath_not_attached"


# --- the base class on real files ------------------------------------------------------------

def test_vm_start_and_shutdown_leave_nothing(state_root):
    dp = Toy()
    r1 = dp.attach("t", URI, "3")
    assert r1 == {"implementations": [["BlockDevice", {"path": os.environ["TOY_DIR"] + "/resource"}]]}
    assert dp.attach("t", URI, "3") == r1                    # same answer, no second setup
    dp.activate("t", URI, "3")
    dp.activate("t", URI, "3")
    assert leftovers(state_root)                             # state while attached
    dp.deactivate("t", URI, "3")
    dp.deactivate("t", URI, "3")                             # VM shutdown: twice
    dp.detach("t", URI, "3")
    dp.detach("t", URI, "3")
    kinds = [e[0] for e in journal()]
    assert kinds == ["setup", "backend", "activate", "deactivate", "teardown"]
    assert not resource_exists()
    assert leftovers(state_root) == []


def test_state_survives_the_process(state_root):
    Toy().attach("t", URI, "3")
    st = Toy().load_state(URI)                               # another instance = another call
    assert list(st["domains"]) == ["3"] and st["resources"]
    Toy().detach("t", URI, "3")
    assert Toy().load_state(URI) == empty_state(URI)


def test_detach_never_fails_and_the_next_call_finishes_the_cleanup(state_root):
    dp = Toy()
    dp.attach("t", URI, "3")
    Toy.fail = {"teardown"}
    try:
        dp.detach("t", URI, "3")                             # no exception
        st = dp.load_state(URI)
        assert st["teardown_failed"] and not st["domains"]
        assert resource_exists()
        with pytest.raises(errors.XenAPIError) as e:         # still failing: attach says why
            dp.attach("t", URI, "4")
        assert e.value.params[0] == "Datapath_cleanup_failed"
    finally:
        Toy.fail = set()
    dp.deactivate("t", URI, "nobody")                        # any call retries the teardown
    assert not resource_exists()
    assert leftovers(state_root) == []


def test_failed_setup_or_backend_leaves_nothing(state_root):
    dp = Toy()
    for what in ("setup", "backend"):
        Toy.fail = {what}
        try:
            with pytest.raises(OSError):
                dp.attach("t", URI, "3")
        finally:
            Toy.fail = set()
        assert not resource_exists(), what
        assert leftovers(state_root) == [], what


def test_activate_conflict_is_a_structured_error_and_changes_nothing(state_root):
    dp = Toy()
    dp.attach("t", URI, "1")
    dp.attach("t", URI, "2")
    dp.activate("t", URI, "1")
    before = dp.load_state(URI)
    with pytest.raises(errors.XenAPIError) as e:
        dp.activate_readonly("t", URI, "2")
    assert e.value.code == "SR_BACKEND_FAILURE_24"
    assert dp.load_state(URI) == before
    for d in ("1", "2"):
        dp.detach("t", URI, d)
    assert leftovers(state_root) == []


def test_lock_wait_is_bounded(state_root, monkeypatch):
    import fcntl
    monkeypatch.setenv(lifecycle.LOCK_TIMEOUT_ENV, "0.3")
    dp = Toy()
    d = dp.state_dir()
    os.makedirs(d)
    fd = os.open(os.path.join(d, lifecycle.volume_id(URI) + ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        t0 = time.monotonic()
        with pytest.raises(errors.XenAPIError) as e:
            dp.attach("t", URI, "3")
        assert e.value.params[0] == "Datapath_busy"
        assert time.monotonic() - t0 < 3
    finally:
        os.close(fd)
    assert journal() == []


def test_concurrent_calls_on_one_volume_are_serialised(state_root):
    dp = Toy()
    errs = []

    def worker(dom):
        try:
            for _ in range(5):
                Toy().attach("t", URI, dom)
                Toy().activate_readonly("t", URI, dom)
                Toy().deactivate("t", URI, dom)
                Toy().detach("t", URI, dom)
        except Exception as e:  # noqa: BLE001
            errs.append(e)
    threads = [threading.Thread(target=worker, args=(str(i),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errs
    # every setup is matched by one teardown, never two setups in a row
    level = 0
    for e in journal():
        if e[0] == "setup":
            assert level == 0
            level = 1
        elif e[0] == "teardown":
            assert level == 1
            level = 0
    assert level == 0 and not resource_exists()
    assert leftovers(state_root) == []
    assert dp.load_state(URI) == empty_state(URI)


# --- SIGKILL at every step ---------------------------------------------------------------------

CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
from test_lifecycle import Toy
call, uri, dom = sys.argv[2:5]
getattr(Toy(), call)("t", uri, dom)
"""


def _child(call, dom, fault=None):
    env = dict(os.environ)
    env.pop("XAPI_STORAGE_FAULT", None)
    if fault:
        env["XAPI_STORAGE_FAULT"] = fault
    p = subprocess.run([sys.executable, "-c", CHILD, os.path.dirname(__file__), call, URI, dom],
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=60)
    return p.returncode, p.stderr


POINTS = ["setup", "backend", "activate", "deactivate", "teardown"]


@pytest.mark.parametrize("point", [f"datapath:{k}:{w}" for k in POINTS for w in ("intent", "done")])
def test_sigkill_at_any_step_is_completed_or_cleaned_by_the_next_call(state_root, point):
    """Kill the plugin at each point of a VM's life; the next calls must converge to the
    same end: nothing held, no state file."""
    seq = [("attach", "3"), ("activate", "3"), ("deactivate", "3"), ("detach", "3")]
    killed = False
    for call, dom in seq:
        rc, err = _child(call, dom, point)
        if rc == -signal.SIGKILL:
            killed = True
            rc, err = _child(call, dom)                     # the daemon's retry, or the next call
        assert rc == 0, err
    assert killed, f"{point} never reached"
    assert not resource_exists(), journal()
    assert leftovers(state_root) == []
    # nothing is set up twice without a teardown between
    level = 0
    for e in journal():
        if e[0] == "setup":
            level += 1
        elif e[0] == "teardown":
            level = 0
        assert level <= 1, journal()


@pytest.mark.parametrize("point", ["datapath:setup:done", "datapath:backend:intent",
                                   "datapath:backend:done"])
def test_an_attach_killed_then_given_up_is_cleaned_by_the_detach(state_root, point):
    """The toolstack may not retry a failed attach: it detaches (VBD unplug, VM start
    abandoned). The half-made attachment must not outlive that detach."""
    rc, _ = _child("attach", "3", point)
    assert rc == -signal.SIGKILL
    rc, err = _child("detach", "3")
    assert rc == 0, err
    assert not resource_exists(), journal()
    assert leftovers(state_root) == []


def test_hooks_see_the_state_before_their_step(state_root):
    seen = []

    class Peek(Toy):
        def setup(self, uri, readonly=False):
            seen.append(("setup", self.state["opened"], sorted(self.state["domains"])))
            return super().setup(uri, readonly)

        def backend(self, uri, domain, resources):
            seen.append(("backend", self.state["opened"], sorted(self.state["domains"])))
            return super().backend(uri, domain, resources)
    dp = Peek()
    dp.open("t", URI, False)
    dp.attach("t", URI, "1")
    dp.attach("t", URI, "2")
    assert seen == [("setup", {"persistent": False}, []),
                    ("backend", {"persistent": False}, []),
                    ("backend", {"persistent": False}, ["1"])]
    for d in ("1", "2"):
        dp.detach("t", URI, d)
    dp.close("t", URI)
    assert leftovers(state_root) == []


def test_a_tampered_state_file_refuses_attach_and_detach_does_no_harm(state_root):
    dp = Toy()
    dp.attach("t", URI, "1")
    path = os.path.join(dp.state_dir(), lifecycle.volume_id(URI) + ".json")
    for junk in (b"{not json", b'{"format": 1, "uri": "toy:///other"}', b"[]"):
        with open(path, "wb") as f:
            f.write(junk)
        with pytest.raises(errors.XenAPIError) as e:
            dp.attach("t", URI, "2")
        assert e.value.params[0] == "Datapath_state_corrupt"
        dp.deactivate("t", URI, "1")                         # no exception, nothing released
        dp.detach("t", URI, "1")
        assert resource_exists()
        with open(path, "rb") as f:
            assert f.read() == junk                          # left for someone to look at
    assert [e[0] for e in journal()] == ["setup", "backend"]


class NP(Toy):
    """A toy that declares NONPERSISTENT: open and close do something."""

    def open_hook(self, uri, persistent):
        self._journal("open", persistent)

    def close_hook(self, uri, persistent):
        self._journal("close", persistent)


@pytest.mark.parametrize("call", ["open", "close"])
def test_a_killed_open_or_close_is_redone_by_the_next_call(state_root, call):
    if call == "close":
        NP().open("t", URI, False)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from test_lifecycle import NP; "
            + ("NP().open('t', sys.argv[2], False)" if call == "open"
               else "NP().close('t', sys.argv[2])"))
    p = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__), URI],
                       env=dict(os.environ, XAPI_STORAGE_FAULT=f"datapath:{call}:done"),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert journal()[-1] == [call, False]                    # the hook ran, its outcome was lost
    NP().deactivate("t", URI, "nobody")                      # any later call redoes it
    assert journal()[-1] == [call, False] and len(journal()) == (2 if call == "open" else 3)
    if call == "open":
        assert NP().load_state(URI)["opened"] == {"persistent": False}
        NP().close("t", URI)
    assert leftovers(state_root) == []


# --- an lvm-raw volume's LV: held active by the attach, released by the last detach ----------

LV_SR = "9e570000-1111-4222-8333-00000000000f"
LV_VG = "xapi-sr-" + LV_SR
LV_KEY = "3c7f1f0c-0b01-4d7e-9a61-7d0a1d2e5b5c"
LV_URI = f"toy:///dev/{LV_VG}/{LV_KEY}"


@pytest.fixture
def lvm2(monkeypatch, state_root, tmp_path):
    """lvm2 as lvm.Runner runs it, answered by a model of one lvm-raw VG whose volume is
    inactive and activation-skip, as lvm-raw makes them (the real thing is proven in the test
    bed: tests/xen/dom0_volume_plugins.py); this host's holder files in a temporary dir."""
    from lvm_raw.test_lvm import ModelLVM2, _vol_tags
    from xapi_storage.volume import lvm
    monkeypatch.setenv(lvm.LOCK_DIR_ENV, str(tmp_path / "locks"))
    model = ModelLVM2(LV_VG, LV_SR)
    model.lvs[LV_KEY] = {"size": 4 << 20, "open": False, "active": False, "skip": True,
                         "tags": _vol_tags(LV_KEY)}
    monkeypatch.setattr(lvm.Runner, "__call__", lambda self, args: model(args))
    return model


def _lvm_calls(model):
    return [c[0] + ("".join(c[c.index("-a"):c.index("-a") + 2]) if "-a" in c else "")
            for c in model.calls]


def _holders(tmp_path):
    d = tmp_path / "locks"
    return sorted(p.name for p in d.iterdir() if ".holder." in p.name) if d.exists() else []


def test_the_attach_activates_an_lv_of_ours_and_the_last_detach_deactivates_it(lvm2, tmp_path):
    dp = Toy()
    dp.attach("t", LV_URI, "3")
    assert lvm2.lvs[LV_KEY]["active"] and _lvm_calls(lvm2) == ["lvs", "lvchange-ay"]
    assert "-K" in lvm2.calls[-1]           # an activation-skip LV needs it
    assert _holders(tmp_path) == [f"{LV_VG}.{LV_KEY}.holder.datapath.toy"]
    dp.attach("t", LV_URI, "4")                 # a second domain: set up already
    dp.detach("t", LV_URI, "3")
    assert lvm2.lvs[LV_KEY]["active"]
    dp.detach("t", LV_URI, "4")                 # the last one
    assert not lvm2.lvs[LV_KEY]["active"]
    assert _lvm_calls(lvm2) == ["lvs", "lvchange-ay", "lvchange-an"]
    assert not resource_exists() and _holders(tmp_path) == []


def test_an_lv_a_copy_still_needs_stays_active_and_others_are_never_touched(lvm2, tmp_path):
    from xapi_storage.volume import lvm, lvm_raw
    dp = Toy()
    lv = lvm.LVM()
    lvm_raw.hold_active(LV_VG, [LV_KEY], lvm_raw.copy_holder(), lvm=lv)    # a snapshot's copy
    dp.attach("t", LV_URI, "3")
    dp.detach("t", LV_URI, "3")
    assert lvm2.lvs[LV_KEY]["active"], "the detach deactivated an LV a copy was reading"
    assert lvm_raw.release_active(LV_VG, [LV_KEY], lvm_raw.copy_holder(), lvm=lv) == []
    assert not lvm2.lvs[LV_KEY]["active"] and _holders(tmp_path) == []
    # and the other way round: a copy that ends while a VM runs leaves the LV to the VM
    dp.attach("t", LV_URI, "3")
    lvm_raw.hold_active(LV_VG, [LV_KEY], lvm_raw.copy_holder(), lvm=lv)
    lvm_raw.release_active(LV_VG, [LV_KEY], lvm_raw.copy_holder(), lvm=lv)
    assert lvm2.lvs[LV_KEY]["active"], "the copy deactivated an LV a VM was using"
    dp.detach("t", LV_URI, "3")
    assert not lvm2.lvs[LV_KEY]["active"]
    # the holder of a copy whose process is gone (killed) no longer counts
    open(tmp_path / "locks" / f"{LV_VG}.{LV_KEY}.holder.copy.999999999", "w").close()
    dp.attach("t", LV_URI, "3")
    dp.detach("t", LV_URI, "3")
    assert not lvm2.lvs[LV_KEY]["active"] and _holders(tmp_path) == []
    del lvm2.calls[:]
    lvm2.lvs[LV_KEY].update(tags=["someone-else"])    # not ours
    dp.attach("t", LV_URI, "3")
    dp.detach("t", LV_URI, "3")
    assert not lvm2.lvs[LV_KEY]["active"] and _lvm_calls(lvm2) == ["lvs"]
    del lvm2.calls[:]
    # nor for an LV in our VG whose name is not a volume key (one with ".holder." in it
    # would be read as another LV's holder: <vg>.<key>.holder.copy.1.holder.datapath.toy)
    from lvm_raw.test_lvm import _vol_tags
    lvm2.lvs[LV_KEY + ".holder.copy.1"] = dict(lvm2.lvs.pop(LV_KEY), tags=_vol_tags(LV_KEY))
    for uri in (URI, "toy:///dev/sda", "toy:///dev/vg0/lv0", "toy:///dev/mapper/x",
                LV_URI + ".holder.copy.1"):
        dp.attach("t", uri, "3")
        dp.detach("t", uri, "3")
    assert lvm2.calls == []                     # no lvm2 process for any other path


def test_a_failed_setup_releases_what_it_held(lvm2, tmp_path):
    Toy.fail = {"setup"}
    try:
        with pytest.raises(OSError):
            Toy().attach("t", LV_URI, "3")
    finally:
        Toy.fail = set()
    assert not lvm2.lvs[LV_KEY]["active"] and _holders(tmp_path) == []
    assert _lvm_calls(lvm2)[:2] == ["lvs", "lvchange-ay"] and "lvchange-an" in _lvm_calls(lvm2)


def test_a_detach_while_the_lv_is_open_is_retried_by_the_next_call(lvm2, monkeypatch):
    from xapi_storage.volume import lvm_raw
    monkeypatch.setattr(lvm_raw, "DEACTIVATE_WAIT", 0.3)
    dp = Toy()
    dp.attach("t", LV_URI, "3")
    lvm2.lvs[LV_KEY]["open"] = True             # a backend that has not let go yet
    dp.detach("t", LV_URI, "3")                 # never fails: recorded
    assert lvm2.lvs[LV_KEY]["active"]
    lvm2.lvs[LV_KEY]["open"] = False
    dp.detach("t", LV_URI, "3")                 # the retry
    assert not lvm2.lvs[LV_KEY]["active"]


class _Killed(BaseException):
    """A SIGKILL, as far as the code under test can tell: nothing after it runs."""


@pytest.mark.parametrize("how", ["killed", "timed out"])
def test_a_deactivation_killed_or_failed_is_redone_by_the_next_call(lvm2, tmp_path, how,
                                                                    monkeypatch):
    """The hold goes only once the LV is inactive: a datapath killed in its `lvchange -an`,
    or one whose `lvchange -an` failed (not because the device is open), leaves its holder
    file, so the next call's retried teardown deactivates the LV."""
    from xapi_storage.volume import command
    dp = Toy()
    dp.attach("t", LV_URI, "3")
    from xapi_storage.volume import lvm

    def broken(self, args):
        if args[:4] == ["lvchange", "-qq", "-a", "n"]:
            if how == "killed":
                raise _Killed()
            raise command.CommandTimeout(["lvm"] + list(args), 120)
        return lvm2(args)
    with monkeypatch.context() as m:
        m.setattr(lvm.Runner, "__call__", broken)
        if how == "killed":
            with pytest.raises(_Killed):
                dp.detach("t", LV_URI, "3")
        else:
            dp.detach("t", LV_URI, "3")                 # never fails: recorded
    assert lvm2.lvs[LV_KEY]["active"]
    assert _holders(tmp_path) == [f"{LV_VG}.{LV_KEY}.holder.datapath.toy"]
    dp.detach("t", LV_URI, "3")                         # the next call redoes the teardown
    assert not lvm2.lvs[LV_KEY]["active"], "the retried teardown left the LV active"
    assert _holders(tmp_path) == [] and leftovers(tmp_path / "state") == []


def test_an_activation_that_timed_out_leaves_the_lv_inactive(lvm2, tmp_path, monkeypatch):
    """An `lvchange -ay -K` killed at its time limit may have activated the LV (lvm2 waiting
    for udev, say): the failed attach deactivates it and leaves no holder."""
    from xapi_storage.volume import command, lvm

    def slow(self, args):
        out = lvm2(args)
        if args[:4] == ["lvchange", "-qq", "-a", "y"]:
            raise command.CommandTimeout(["lvm"] + list(args), 120)
        return out
    with monkeypatch.context() as m:
        m.setattr(lvm.Runner, "__call__", slow)
        with pytest.raises(errors.XenAPIError) as e:
            Toy().attach("t", LV_URI, "3")
    assert e.value.params[0] == "Datapath_command_failed", e.value.params
    assert not lvm2.lvs[LV_KEY]["active"], "a timed-out activation left the LV active"
    assert _holders(tmp_path) == [] and leftovers(tmp_path / "state") == []


def test_a_setup_whose_resources_are_not_an_object_still_releases_its_lv(lvm2, tmp_path):
    """The resources should be a JSON object; a vendor's setup that returns something else
    (a list) must not leave the LV active or break the detach."""
    class Listy(Toy):
        def setup(self, uri, readonly=False):
            return [Toy.setup(self, uri, readonly)["file"]]

        def backend(self, uri, domain, resources):
            return {"implementations": [["BlockDevice", {"path": resources[0]}]]}
    dp = Listy()
    dp.attach("t", LV_URI, "3")
    assert lvm2.lvs[LV_KEY]["active"]
    dp.detach("t", LV_URI, "3")
    assert not lvm2.lvs[LV_KEY]["active"] and _holders(tmp_path) == []
