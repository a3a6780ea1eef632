"""A throw-away datapath plugin for the conformance suite's tests: our blkback datapath, with
the planted defect CONFORMANCE_DEFECT=datapath: a detach of a domain that is not attached
fails (the daemon repeats detach at VM shutdown and on retries). State of the defect lives in
CONFORMANCE_STATE."""

import os

from xapi_storage.datapath import blkback
from xapi_storage.sdk import errors

DEFECT = os.environ.get("CONFORMANCE_DEFECT", "")
STATE = os.environ.get("CONFORMANCE_STATE", "/nonexistent")


def _marker(domain):
    return os.path.join(STATE, "attached-" + (domain or "none").replace("/", "_"))


class Datapath(blkback.Datapath):
    def attach(self, dbg, uri, domain):
        result = super().attach(dbg, uri, domain)
        if DEFECT == "datapath":
            open(_marker(domain), "w").close()
        return result

    def detach(self, dbg, uri, domain):
        if DEFECT == "datapath":
            try:
                os.unlink(_marker(domain))
            except FileNotFoundError:
                raise errors.XenAPIError("SR_BACKEND_FAILURE", ["Not attached", uri, domain]) \
                    from None
        return super().detach(dbg, uri, domain)


IMPLEMENTATIONS = dict(blkback.IMPLEMENTATIONS, Datapath=Datapath)
