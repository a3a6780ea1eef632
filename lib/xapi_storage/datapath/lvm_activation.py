"""Activation of an lvm-raw volume's logical volume by the datapath that attaches it.

`lvm-raw` volumes have URIs `<scheme>:///dev/<vg>/<lv>` (docs/lvm-raw.md): the device node
exists only while the LV is active, and the plugin leaves activation to the datapath, so that
only the host that runs the VM has the LV active (what a VG shared between hosts, later under
lvmlockd, needs). `Lifecycle` (lifecycle.py) calls `activate` before a datapath's `setup` and
`deactivate` after its `teardown`, for every datapath plugin alike:

* a URI whose path is not `/dev/<vg>/<lv>` with `<vg>` named as lvm-raw names its VGs costs
  nothing (no lvm2 process);
* otherwise one `lvs` says whether the LV is ours (the LV tagged as an lvm-raw volume, its VG
  as an lvm-raw SR: nothing else is ever activated or deactivated) and active;
* an inactive LV of ours is activated (`lvchange -ay`), and the setup's resources record it,
  so that the last detach deactivates exactly what its attach activated. An LV that was
  active already (a volume just made by `lvcreate`) is left active by the detach.

lvm2 runs through volume/lvm.py (argument lists, a time limit: nothing waits forever);
failures are the datapath's structured errors.
"""

import time

from ..sdk import log
from .lifecycle import datapath_error

TIMEOUT = 120.0             # one lvm2 command; under TCG a second or two
CLOSE_WAIT = 5.0            # a kernel backend lets go of the device a moment after an unplug
FLAG = "lvm_activated"      # the key setup's resources carry when this module activated the LV


def lv_of(uri):
    """(vg, lv) of a URI naming an LV in a VG named as lvm-raw names its VGs, else None."""
    _, sep, rest = uri.partition("://") if isinstance(uri, str) else ("", "", "")
    parts = rest.split("/")
    if not sep or len(parts) != 4 or parts[:2] != ["", "dev"] or "%" in rest:
        return None
    from ..volume import lvm_raw
    vg, lv = parts[2], parts[3]
    if not vg.startswith(lvm_raw.VG_PREFIX) or not lv:
        return None
    return vg, lv


def _ours(uri):
    """(LVM, vg, lv, LV row) when the URI names one of our LVs, else None."""
    names = lv_of(uri)
    if names is None:
        return None
    from ..volume import command, lvm, lvm_raw
    lvm2 = lvm.LVM(runner=lvm.Runner(timeout=TIMEOUT))
    vg, lv = names
    try:
        vgrow, row = lvm2.lv_and_vg(vg, lv)
    except FileNotFoundError:
        return None                 # no lvm2 on this host: not an LV of ours
    except (lvm.LVMError, command.CommandTimeout) as e:
        raise datapath_error("Datapath_command_failed", uri, str(e)) from None
    if row is None or lvm_raw.VOL_TAG not in row["tags"] or \
            lvm_raw.SR_TAG not in vgrow["tags"]:
        return None
    return lvm2, vg, lv, row


def activate(uri):
    """Activate the URI's LV if it is an inactive LV of ours; True if this call did."""
    found = _ours(uri)
    if found is None or found[3]["active"]:
        return False
    lvm2, vg, lv, _ = found
    from ..volume import command, lvm
    try:
        lvm2.activate(vg, [lv])
    except (lvm.LVMError, command.CommandTimeout) as e:
        raise datapath_error("Datapath_command_failed", uri,
                             f"cannot activate {vg}/{lv}: {e}") from None
    log.info("%s: activated %s/%s", uri, vg, lv)
    return True


def deactivate(uri, best_effort=False):
    """Deactivate the URI's LV if it is an active LV of ours, waiting CLOSE_WAIT seconds for
    its last user to close it. best_effort (the undo of a setup that did not finish, which
    cannot know whether it activated the LV): an LV still open is left active, logged."""
    found = _ours(uri)
    if found is None or not found[3]["active"]:
        return
    lvm2, vg, lv, _ = found
    from ..volume import command, lvm
    end = time.monotonic() + CLOSE_WAIT
    while True:
        try:
            lvm2.activate(vg, [lv], active=False)
            log.info("%s: deactivated %s/%s", uri, vg, lv)
            return
        except (lvm.LVMError, command.CommandTimeout) as e:
            busy = isinstance(e, lvm.LVMError) and e.in_use()
            if busy and time.monotonic() < end:
                time.sleep(0.2)
                continue
            if best_effort:
                log.warning("%s: %s/%s left active: %s", uri, vg, lv, e)
                return
            raise datapath_error("Datapath_cleanup_failed", uri,
                                 f"cannot deactivate {vg}/{lv}: {e}") from None
