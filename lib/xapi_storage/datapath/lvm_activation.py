"""Activation of an lvm-raw volume's logical volume by the datapath that attaches it.

`lvm-raw` volumes have URIs `<scheme>:///dev/<vg>/<lv>` (docs/lvm-raw.md), and their LVs are
made inactive and flagged activation-skip: the device node exists only while something on
this host needs it, so that only the host that runs the VM has the LV active (what a VG
shared between hosts, later under lvmlockd, needs). `Lifecycle` (lifecycle.py) calls
`activate` before a datapath's `setup` and `deactivate` after its `teardown`, for every
datapath plugin alike:

* a URI whose path is not `/dev/<vg>/<lv>` with `<vg>` and `<lv>` named as lvm-raw names its
  VGs and volumes (`xapi-sr-<uuid>`, a uuid) costs nothing (no lvm2 process);
* otherwise one `lvs` says whether the LV is ours (the LV tagged as an lvm-raw volume, its VG
  as an lvm-raw SR: nothing else is ever activated or deactivated); an LV of ours is held
  active for this datapath (volume/lvm_raw.py `hold_active`: a holder file, then
  `lvchange -ay -K`);
* the last detach releases that hold (`release_active`): the LV is deactivated unless
  something else on this host still needs it (a snapshot's copy reading it). A device still
  open after DEACTIVATE_WAIT seconds (a backend that has not let go) fails the teardown, which
  the next call retries (the hold is kept for it).

lvm2 runs through volume/lvm.py (argument lists, a time limit: nothing waits forever);
failures are the datapath's structured errors.
"""

from ..sdk import log
from .lifecycle import datapath_error

TIMEOUT = 120.0             # one lvm2 command; under TCG a second or two


def lv_of(uri):
    """(vg, lv) of a URI naming an LV in a VG named as lvm-raw names its VGs and its
    volumes (a key), else None."""
    _, sep, rest = uri.partition("://") if isinstance(uri, str) else ("", "", "")
    parts = rest.split("/")
    if not sep or len(parts) != 4 or parts[:2] != ["", "dev"] or "%" in rest:
        return None
    from ..volume import lvm_raw
    vg, lv = parts[2], parts[3]
    if not vg.startswith(lvm_raw.VG_PREFIX) or not lvm_raw.is_uuid(lv):     # a volume key
        return None
    return vg, lv


def holder(uri):
    """The name this datapath holds an LV under: one per scheme (a volume has one URI)."""
    return "datapath." + "".join(c if c.isalnum() or c in "-_" else "_"
                                 for c in uri.partition(":")[0])


def _lvm2():
    from ..volume import lvm
    return lvm.LVM(runner=lvm.Runner(timeout=TIMEOUT))


def _errors(uri, name, what):
    """A function mapping a failure of lvm2, a lock or the lock directory to the datapath
    error `name` (None for anything else: raised as it is)."""
    from ..volume import command, lvm, store

    def wrap(e):
        if isinstance(e, (lvm.LVMError, command.CommandTimeout, store.LockTimeout, OSError)):
            return datapath_error(name, uri, f"cannot {what}: {e}")
        return None
    return wrap


def activate(uri):
    """Hold the URI's LV active if it is an LV of ours; True if this call did."""
    names = lv_of(uri)
    if names is None:
        return False
    from ..volume import lvm_raw
    vg, lv = names
    lvm2 = _lvm2()
    wrap = _errors(uri, "Datapath_command_failed", f"activate {vg}/{lv}")
    try:
        vgrow, row = lvm2.lv_and_vg(vg, lv)
    except FileNotFoundError:
        return False                # no lvm2 on this host: not an LV of ours
    except Exception as e:          # noqa: BLE001 - mapped to a structured error, or raised
        raise (wrap(e) or e) from None
    if row is None or vgrow is None or lvm_raw.VOL_TAG not in row["tags"] or \
            lvm_raw.SR_TAG not in vgrow["tags"]:
        return False
    try:
        lvm_raw.hold_active(vg, [lv], holder(uri), lvm=lvm2)
    except Exception as e:          # noqa: BLE001
        raise (wrap(e) or e) from None
    log.info("%s: %s/%s active for this datapath", uri, vg, lv)
    return True


def deactivate(uri, best_effort=False):
    """Release this datapath's hold on the URI's LV (if it has one): deactivated unless
    another holder needs it. A device still open is an error (the hold is kept, so the
    retried teardown deactivates it); best_effort (the undo of a setup that did not finish,
    which cannot know how far it got): logged instead, the hold kept too (the LV is still
    active: the volume's next detach, or SR.detach, lets go of it)."""
    names = lv_of(uri)
    if names is None:
        return
    from ..volume import lvm_raw
    vg, lv = names
    who = holder(uri)
    lvm2 = _lvm2()
    wrap = _errors(uri, "Datapath_cleanup_failed", f"deactivate {vg}/{lv}")
    try:
        if not lvm_raw.holds(vg, lv, who, lvm=lvm2):
            return                  # never held (not ours), or released already
        busy = lvm_raw.release_active(vg, [lv], who, keep_claim_if_busy=True, lvm=lvm2)
    except Exception as e:          # noqa: BLE001
        if best_effort:
            log.warning("%s: %s/%s: %s", uri, vg, lv, e)
            return
        raise (wrap(e) or e) from None
    if busy:
        if best_effort:
            log.warning("%s: %s/%s left active: still open", uri, vg, lv)
            return
        raise datapath_error("Datapath_cleanup_failed", uri,
                             f"cannot deactivate {vg}/{lv}: still open after "
                             f"{lvm_raw.DEACTIVATE_WAIT:g} s")
    log.info("%s: %s/%s released", uri, vg, lv)
