"""A throw-away datapath plugin for the tests of `xapi-storage conformance` on a datapath
alone: our blkback datapath declaring NONPERSISTENT (its open and close hooks do nothing,
which the checks cannot tell from discarding), with ONE planted defect chosen by
CONFORMANCE_DEFECT (the name of the datapath check it must make fail; unset = none).
CONFORMANCE_STATE is a directory for the defects' markers. The defect `plugin-query` is
planted by the test itself: it removes the installed Datapath.detach executable.
CONFORMANCE_DEFECT=bad-uris-made is bad-uris' defect with something to release: the missing
file is made and attached (a loop device over it).
CONFORMANCE_DEFECT=signals is no check's defect: the run is sent SIGTERM at its first
Plugin.Query (the daemon's registration, before any check) when CONFORMANCE_STATE has no
`registered` marker; else during VM start's activate, and again at every later deactivate (a
repeated SIGTERM, also during the teardown).
CONFORMANCE_STRICT_CLOSE=1 (no defect): Datapath.close refuses a volume Datapath.open never
opened, as a plugin may: the toolstack never closes what it did not open."""

import json
import os
import signal
import time

from xapi_storage.datapath import blkback
from xapi_storage.datapath.lifecycle import plugin_class
from xapi_storage.sdk import errors, wire

DEFECT = os.environ.get("CONFORMANCE_DEFECT", "")
STATE = os.environ.get("CONFORMANCE_STATE", "/nonexistent")
STRICT_CLOSE = os.environ.get("CONFORMANCE_STRICT_CLOSE") == "1"


def _marker(*parts):
    return os.path.join(STATE, "-".join(p.replace("/", "_") for p in parts))


def _once_more(*parts):
    """True from the second call with these parts on."""
    m = _marker(*parts)
    if os.path.exists(m):
        return True
    open(m, "w").close()
    return False


def _fail(*params):
    raise errors.XenAPIError("SR_BACKEND_FAILURE", list(params))


class Datapath(blkback.Datapath):
    def open(self, dbg, uri, persistent):
        if DEFECT == "nonpersistent" and not persistent:    # declares it, refuses it
            _fail("Non-persistent open not supported", uri)
        result = super().open(dbg, uri, persistent)
        if STRICT_CLOSE:
            open(_marker("open", uri), "w").close()
        return result

    def close(self, dbg, uri):
        if STRICT_CLOSE and not os.path.exists(_marker("open", uri)):
            _fail("Datapath.close of a volume never opened", uri)
        return super().close(dbg, uri)

    def attach(self, dbg, uri, domain):
        if DEFECT == "bad-uris" and not os.path.exists(blkback.path_of(uri)):
            return {"implementations": [["BlockDevice", {"path": "/dev/null"}]]}   # made up
        if DEFECT == "bad-uris-made" and uri.endswith(".no-such-file"):
            with open(blkback.path_of(uri), "wb") as f:      # makes what is missing, serves it
                f.truncate(1 << 20)
        if DEFECT == "live-migration" and domain.isdigit():
            others = [n for n in os.listdir(STATE) if n.startswith("active-")
                      and n != f"active-{domain}"]
            if others:                  # a second domain while one is active: refused
                _fail("Volume in use by another domain", uri, others[0])
        if DEFECT == "parallel":        # refuses a concurrent call instead of waiting for it
            busy = _marker("busy")
            try:
                fd = os.open(busy, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                _fail("Another call is in progress", uri)
            try:
                time.sleep(0.3)
                result = super().attach(dbg, uri, domain)
            finally:
                os.close(fd)
                os.unlink(busy)
            return result
        result = super().attach(dbg, uri, domain)
        if DEFECT == "dom0-plug" and domain == "u0_vbd_0_xvdz" and _once_more("attach", domain):
            result = json.loads(json.dumps(result))          # a new device at each attach
            for impl in result["implementations"]:
                if impl[0] == "BlockDevice":
                    impl[1]["path"] = "/dev/null"
        if DEFECT == "static-vdis" and domain == "0":        # no path for static-vdis
            result = {"implementations": [i for i in result["implementations"]
                                          if i[0] == "XenDisk"]}
        return result

    def activate(self, dbg, uri, domain):
        if DEFECT == "vm-lifecycle" and domain == "7" and _once_more("activate", domain):
            _fail("Already active", uri, domain)             # a retried VBD plug fails
        super().activate(dbg, uri, domain)
        if DEFECT == "signals" and domain == "7" and not _once_more("signalled"):
            os.kill(os.getppid(), signal.SIGTERM)           # the run is cancelled here
            time.sleep(30)
        if DEFECT == "live-migration" and domain.isdigit():
            open(_marker("active", domain), "w").close()

    def deactivate(self, dbg, uri, domain):
        if DEFECT == "signals" and os.path.exists(_marker("signalled")):
            os.kill(os.getppid(), signal.SIGTERM)           # and cancelled again
        super().deactivate(dbg, uri, domain)
        if DEFECT == "live-migration":
            try:
                os.unlink(_marker("active", domain))
            except FileNotFoundError:
                pass
        if DEFECT == "results-valid":
            return "deactivated"                             # the result must be null

    def activate_hook(self, uri, domain, resources, readonly):
        if DEFECT == "readonly" and not readonly:
            return                      # never made writable again after a read-only plug
        super().activate_hook(uri, domain, resources, readonly)

    def teardown(self, uri, resources):
        if DEFECT == "cleanup":
            return                      # the loop device stays
        super().teardown(uri, resources)


if DEFECT == "results-valid":
    # printed as it is, without the SDK's check of the result (a plugin not using the SDK)
    from xapi_storage.sdk import jsonio
    wire.check_result = lambda method, result: jsonio.dumps(result)


class Plugin(plugin_class("blkback", "blkback with a planted defect",
                          features=["NONPERSISTENT"])):
    def query(self, dbg):
        if DEFECT == "signals" and dbg == "register" and not _once_more("registered"):
            os.kill(os.getppid(), signal.SIGTERM)           # cancelled at its very start
            time.sleep(30)
        return super().query(dbg)

IMPLEMENTATIONS = {"Plugin": Plugin, "Datapath": Datapath}
